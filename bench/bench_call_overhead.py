"""The fixed cost of one call of each public op: tiny inputs, so the time is the host's work
(argument checks, dispatch, DLPack import, allocation, launch, and on CUDA the synchronisation
some ops need), not the kernels'.

    python bench/bench_call_overhead.py [--device cpu|cuda] [--compare dlpack|dispatch]
                                        [--repeats 5] [--json rows.jsonl]

Each op is timed twice in the same process, alternated, so the difference is measured on the
same machine at the same moment. ``--compare dlpack`` (the default): the bindings taking torch
tensors through DLPack 1.3's C exchange table (the default) against every tensor going through
``__dlpack__`` (``_C.set_dlpack_exchange(False)``). ``--compare dispatch``: eager calls that need
no autograd going straight to the op's implementation (the default,
``meldkit._native.plain_eager_call``) against every call going through ``torch.library``'s
dispatch. On CUDA every call is followed by a synchronisation (the
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

    gates, w0 = t(4, 4), t(16, 16)

    @torch.no_grad()
    def lora_inference():
        routed_lora(x, a, b, 2.0, gates=gates, base_weight=w0)

    return [
        ("logit_fusion B1 V7 T2", lambda: logit_fusion(large, small, experts)),
        ("weighted_sum 3x64", lambda: weighted_sum(models, [1.0, 2.0, 3.0])),
        (
            "merge task_arithmetic 3x64",
            lambda: merge_tensors(base, models, "task_arithmetic", out=out),
        ),
        ("merge ties 3x64", lambda: merge_tensors(base, models, "ties", densities=0.3, out=out)),
        ("routed_lora fwd+bwd N4 E4", lora_step),
        ("routed_lora no-grad gates+base N4", lora_inference),
    ]


def _switches(compare: str):
    """``(on, off, restore)`` for the A/B named by ``--compare``."""
    c = _native._C
    if compare == "dlpack":
        return (
            lambda: c.set_dlpack_exchange(True),
            lambda: c.set_dlpack_exchange(False),
            lambda: c.set_dlpack_exchange(True),
        )
    real = _native.plain_eager_call

    def through_the_op(*_):
        return False

    def on():
        _native.plain_eager_call = real

    def off():
        _native.plain_eager_call = through_the_op

    return on, off, on


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
    ap.add_argument(
        "--compare",
        default="dlpack",
        choices=["dlpack", "dispatch"],
        help="what the A/B toggles: DLPack's C exchange table, or the direct eager call",
    )
    ap.add_argument("--repeats", type=int, default=5, help="best of this many timed loops")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed loop")
    ap.add_argument("--json", help="append one JSON row per op to this file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    on, off, restore = _switches(args.compare)
    labels = ("table", "__dlpack__") if args.compare == "dlpack" else ("direct", "via op")
    keys = (
        ("exchange_table_us", "dunder_dlpack_us")
        if args.compare == "dlpack"
        else ("direct_us", "dispatch_us")
    )
    rows = []
    print(f"per-call time on {args.device}, best of {args.repeats} x {args.calls} calls (µs)")
    print(f"{'op':36s} {labels[0]:>9s} {labels[1]:>11s} {'saved':>8s}")
    try:
        for name, fn in cases(args.device):
            times = {True: [], False: []}
            for switch in (on, off):  # warm up both routes
                switch()
                for _ in range(20):
                    fn()
            for _ in range(2):  # alternated, twice
                for flag, switch in ((True, on), (False, off)):
                    switch()
                    times[flag].append(per_call_us(fn, sync, args.calls, args.repeats))
            fast, slow = min(times[True]), min(times[False])
            print(f"{name:36s} {fast:9.1f} {slow:11.1f} {slow - fast:8.1f}")
            rows.append(
                {
                    "bench": "call_overhead",
                    "compare": args.compare,
                    "device": args.device,
                    "device_name": (
                        torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
                    ),
                    "case": name,
                    keys[0]: fast,
                    keys[1]: slow,
                    "torch": torch.__version__,
                }
            )
    finally:
        restore()
    if args.json:
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
