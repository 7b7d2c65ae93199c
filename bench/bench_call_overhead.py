"""The fixed cost of one call of each public op: tiny inputs, so the time is the host's work
(argument checks, dispatch, DLPack import, allocation, launch, and on CUDA the synchronisation
some ops need), not the kernels'.

    python bench/bench_call_overhead.py [--device cpu|cuda] [--repeats 5] [--json rows.jsonl]

Each op is timed twice in the same process, alternated: with the bindings taking torch tensors
through DLPack 1.3's C exchange table (the default) and with every tensor going through
``__dlpack__`` (``_C.set_dlpack_exchange(False)``), so the ratio between the two is measured on
the same machine at the same moment. On CUDA every call is followed by a synchronisation (the
cost of a call is then its latency); on the CPU calls are synchronous anyway. The decode loop of
Dynamic Logit Fusion calls ``logit_fusion`` once per generated token, which is why its fixed cost
matters (issue 5's GPU target was limited by it, not by the kernel).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from meldkit import _native
from meldkit.bench import write_rows
from meldkit.ops import logit_fusion, merge_tensors, routed_lora, weighted_sum


def cases(device: str):
    """(name, fn) pairs: each fn makes one call of a public op on tiny inputs."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    large, small, experts = t(1, 7), t(1, 7), t(2, 1, 7)
    base, models, out = t(64), [t(64) for _ in range(3)], t(64)
    x, a, b = t(4, 16, grad=True), t(4, 2, 16, grad=True), t(4, 16, 2, grad=True)
    wz = t(4, 16, grad=True)

    def lora_step():
        y, _ = routed_lora(x, a, b, 2.0, router_weight=wz, top_k=2)
        y.sum().backward()

    return [
        ("logit_fusion B1 V7 T2", lambda: logit_fusion(large, small, experts)),
        ("weighted_sum 3x64", lambda: weighted_sum(models, [1.0, 2.0, 3.0])),
        (
            "merge task_arithmetic 3x64",
            lambda: merge_tensors(base, models, "task_arithmetic", out=out),
        ),
        ("merge ties 3x64", lambda: merge_tensors(base, models, "ties", densities=0.3, out=out)),
        ("routed_lora fwd+bwd N4 E4", lora_step),
    ]


def per_call_us(fn, sync, calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5, help="best of this many timed loops")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed loop")
    ap.add_argument("--json", help="append one JSON row per op to this file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    c = _native._C
    rows = []
    print(f"per-call time on {args.device}, best of {args.repeats} x {args.calls} calls (µs)")
    print(f"{'op':32s} {'table':>9s} {'__dlpack__':>11s} {'saved':>8s}")
    for name, fn in cases(args.device):
        for _ in range(20):  # warm up both routes
            fn()
        times = {True: [], False: []}
        for _ in range(2):  # alternated, twice
            for exchange in (True, False):
                c.set_dlpack_exchange(exchange)
                times[exchange].append(per_call_us(fn, sync, args.calls, args.repeats))
        c.set_dlpack_exchange(True)
        fast, slow = min(times[True]), min(times[False])
        print(f"{name:32s} {fast:9.1f} {slow:11.1f} {slow - fast:8.1f}")
        rows.append(
            {
                "bench": "call_overhead",
                "device": args.device,
                "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "case": name,
                "exchange_table_us": fast,
                "dunder_dlpack_us": slow,
                "torch": torch.__version__,
            }
        )
    if args.json:
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
