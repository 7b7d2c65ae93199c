"""A GOAT-wrapped stack's training step, eager and under ``torch.compile``, with dropout.

    python bench/bench_goat_compile.py [--device cpu|cuda] [--layers 8] [--dim 256]
                                       [--tokens 128] [--experts 4] [--top-k 2] [--rank 16]
                                       [--dropout 0.05] [--dtype fp32|bf16] [--json rows.jsonl]

The model is ``--layers`` blocks of ``nn.Linear(d, d)`` + GELU, every linear wrapped by
``meldkit.goat.wrap`` (GOAT's training default: dropout 0.05). A timed call is one training
step: forward, ``aux_loss``, backward (gradients of the experts and routers, reset before each
call). Rows: ``base`` (the frozen stack's forward and the backward to its input, the cost GOAT
adds to), ``goat_eager`` and ``goat_compiled`` (inductor, compiled before timing). The script
first counts ``torch.compile``'s graph breaks in the wrapped model: the per-step dropout seed is
a tensor the layers never read, so the count is 0 (an int seed broke the graph at every layer).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from meldkit import goat
from meldkit.bench import DTYPES, cache_flusher, run_metadata, time_impls, write_rows


def build(args) -> tuple[dict, dict, int]:
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    blocks = []
    for _ in range(args.layers):
        blocks += [nn.Linear(args.dim, args.dim), nn.GELU()]
    base = nn.Sequential(*blocks).to(device=device, dtype=dtype).requires_grad_(False)
    model = nn.Sequential(*blocks).to(device=device, dtype=dtype)
    model.load_state_dict(base.state_dict())
    config = goat.GoatConfig(
        num_experts=args.experts, top_k=args.top_k, rank=args.rank, dropout=args.dropout
    )
    model = goat.wrap(model, config).train()
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    x_base = x.clone().requires_grad_()
    breaks = torch._dynamo.explain(model)(x).graph_break_count
    torch._dynamo.reset()
    compiled = torch.compile(model)
    trained = [p for p in model.parameters() if p.requires_grad]

    def goat_step(forward):
        def call():
            for p in trained:
                p.grad = None
            (forward(x).float().pow(2).mean() + goat.aux_loss(model)).backward()

        return call

    def base_step():
        x_base.grad = None
        base(x_base).float().pow(2).mean().backward()

    impls = {
        "base": base_step,
        "goat_eager": goat_step(model),
        "goat_compiled": goat_step(compiled),
    }
    for _ in range(3):  # compile (forward and backward graphs) before any timing
        impls["goat_compiled"]()
    shape = dict(
        layers=args.layers,
        dim=args.dim,
        tokens=args.tokens,
        experts=args.experts,
        top_k=args.top_k,
        rank=args.rank,
        dropout=args.dropout,
    )
    return impls, shape, breaks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16, help="total rank (per expert: rank/E)")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", help="append one JSON row per implementation to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    impls, shape, breaks = build(args)
    print(f"graph breaks under torch.compile: {breaks}")
    timings = time_impls(impls, args.device, flush=cache_flusher(args.device), repeats=args.repeats)
    eager = timings["goat_eager"].median_s
    meta = run_metadata()
    rows = []
    print(f"{'impl':<14} {'median':>10} {'x eager':>8}")
    for name, t in timings.items():
        print(f"{name:<14} {t.median_s * 1e3:8.2f} ms {t.median_s / eager:7.3f}x")
        rows.append(
            {
                "bench": "goat_compile",
                "impl": name,
                **shape,
                "dtype": args.dtype,
                "device": args.device,
                "median_s": t.median_s,
                "min_s": t.min_s,
                "iqr_s": t.iqr_s,
                "repeats": t.repeats,
                "over_goat_eager": t.median_s / eager,
                "graph_breaks": breaks,
                **meta,
            }
        )
    if args.json:
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
