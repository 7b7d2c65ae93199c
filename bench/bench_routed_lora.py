"""A GOAT layer's forward + backward against the frozen base linear alone, GOAT's official
per-expert loop, and PEFT's LoRA of the same total rank.

    python bench/bench_routed_lora.py [--device cpu|cuda] [--tokens 2048] [--dim 1024]
                                      [--experts 8] [--top-k 2] [--rank 32] [--dtype fp32|bf16]
                                      [--dropout 0.05] [--json rows.jsonl]

Each implementation is a layer ``y = W₀x + adapter(x)`` with a frozen ``nn.Linear`` base
(``meldkit_goat`` runs the base inside the op, as ``GoatLinear`` does; ``meldkit_goat_added``
adds the base's output to the op's, the two elementwise additions it saves); a
timed call runs the forward and the backward from a fixed ``dy`` (gradients of x and of the
adapter's parameters, as in training). All calls go through :func:`meldkit.bench.time_impls`
(interleaved rounds, cache flush before every call, CUDA events on GPUs), so the rows compare
like with like. Dropout is off by default; ``--dropout P`` applies it in all three (GOAT's
training default is 0.05; the loop and PEFT draw their masks from torch's generator, meldkit
from its counter-based one), and adds ``meldkit_goat_shared_dropout``, one mask for every expert
(``GoatConfig(dropout_mode="shared")``).

The issue's targets: the GOAT layer's forward+backward within 1.15x of the base linear's alone,
and the adapter's added time (layer minus base) at least 5x smaller than the official loop's.
Defaults are the CPU case (fp32, T=2048, d=1024, E=8, k=2, r=32); the GPU case is
``--device cuda --dtype bf16 --tokens 8192 --dim 4096``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from meldkit.bench import DTYPES, cache_flusher, run_metadata, time_impls, write_rows
from meldkit.bench.routed_lora import official_loop
from meldkit.ops import routed_lora


def build(args) -> tuple[dict, dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    d, e, k, r = args.dim, args.experts, args.top_k, args.rank // args.experts
    p = args.dropout
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, dt=torch.float32, grad=True):
        t = torch.randn(*shape, generator=gen, device=device, dtype=dt) * scale
        return t.requires_grad_(grad)

    base = torch.nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = rand(args.tokens, d, dt=dtype)
    dy = rand(args.tokens, d, dt=dtype, grad=False)
    # GOAT keeps its adapter in fp32 (the official code casts it after get_peft_model).
    lora_a, lora_b = rand(e, r, d, scale=d**-0.5), rand(e, d, r, scale=r**-0.5)
    router = rand(e, d, scale=d**-0.5)
    peft_a, peft_b = rand(args.rank, d, scale=d**-0.5), rand(d, args.rank, scale=0.01)
    params = [x, lora_a, lora_b, router, peft_a, peft_b]

    def step(forward):
        def call():
            for p in params:
                p.grad = None
            forward().backward(dy)

        return call

    kw = dict(router_weight=router, top_k=k, dropout=p, seed=1 if p else None)

    def goat():  # as GoatLinear runs it: the base linear inside the op
        return routed_lora(x, lora_a, lora_b, 2.0, base_weight=base.weight, **kw)[0]

    def goat_added():  # the adapter alone, its output added to the base's
        return base(x) + routed_lora(x, lora_a, lora_b, 2.0, **kw)[0]

    def loop():
        return base(x) + official_loop(x, lora_a, lora_b, 2.0, router, k, dropout=p)[0]

    impls = {
        "base_linear": step(lambda: base(x)),
        "meldkit_goat": step(goat),
        "meldkit_goat_added": step(goat_added),
        "official_loop": step(loop),
    }
    if p > 0:  # GoatConfig(dropout_mode="shared"): one mask for every expert, one GEMM each

        def goat_shared():
            return routed_lora(
                x, lora_a, lora_b, 2.0, base_weight=base.weight, shared_dropout=True, **kw
            )[0]

        impls["meldkit_goat_shared_dropout"] = step(goat_shared)
    try:  # PEFT's own LoRA layer over the same base, total rank r·E
        from peft import LoraConfig, get_peft_model

        holder = torch.nn.Module()
        holder.proj = base
        config = LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=["proj"], lora_dropout=p
        )
        lora = get_peft_model(holder, config).base_model.model.proj
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(peft_a)
            lora.lora_B["default"].weight.copy_(peft_b)
        lora.to(device)
        impls["peft_lora"] = step(lambda: lora(x))
    except ImportError:
        print("peft is not installed: no PEFT LoRA row", file=sys.stderr)
    shape = dict(tokens=args.tokens, dim=d, experts=e, top_k=k, rank=args.rank, dropout=p)
    return impls, shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32, help="total rank (per expert: rank/E)")
    parser.add_argument("--dropout", type=float, default=0.0, help="in all three (GOAT: 0.05)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", help="append one JSON row per implementation to this file")
    args = parser.parse_args(argv)
    impls, shape = build(args)
    timings = time_impls(impls, args.device, flush=cache_flusher(args.device), repeats=args.repeats)
    base = timings["base_linear"].median_s
    ours_added = timings["meldkit_goat"].median_s - base
    meta = run_metadata()
    rows = []
    print(f"{'impl':<18} {'median':>10} {'x base':>8} {'added':>10}")
    for name, t in timings.items():
        added = t.median_s - base
        ratio = t.median_s / base
        print(f"{name:<18} {t.median_s * 1e3:8.2f} ms {ratio:7.3f}x {added * 1e3:8.2f} ms")
        rows.append(
            {
                "bench": "routed_lora_layer",
                "impl": name,
                **shape,
                "dtype": args.dtype,
                "device": args.device,
                "median_s": t.median_s,
                "min_s": t.min_s,
                "iqr_s": t.iqr_s,
                "repeats": t.repeats,
                "layer_over_base": t.median_s / base,
                "added_s": added,
                **meta,
            }
        )
    loop_added = timings["official_loop"].median_s - base
    print(
        f"targets: layer/base {timings['meldkit_goat'].median_s / base:.3f} (<= 1.15); "
        f"official loop's added time / ours {loop_added / max(ours_added, 1e-12):.1f} (>= 5)"
    )
    if args.json:
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
