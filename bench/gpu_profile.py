"""One timed-region call of each GPU kernel furthest from its target, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \\
        python bench/gpu_profile.py [--case NAME ...] [--list] [--device cuda|cpu] [--scale S]

``scripts/gpu_check.sh OUTDIR profile`` runs it so under ``ncu`` and writes the per-kernel
metrics to ``OUTDIR/ncu.log``: the benchmarks say how far each op is from its target, this says
why (DRAM against SM throughput, the busiest pipe, occupancy, registers). One case at a time, its
inputs are made and it is run once (warm-up: plans, workspaces) with the profiler off; only its
second call is profiled, inside an NVTX range named after it, so the kernels come out in the
case order. ``--device cpu --scale 0.01`` runs the same calls, unprofiled, at 1 % of every
dimension: the test suite's smoke test (GPU minutes are too scarce to find a typo with).

Cases (bf16 unless named; sizes large enough to leave launch overhead behind, small enough that
ncu's save and restore of memory between replays stays quick):

* ``blend_masked``: a :class:`meldkit.ops.BlendPlan` over 64 tensors of 4 M elements with two
  masks (keep 0.3): ExDe's per-step blend, 38.8 % of the copy ceiling on an H200 (target 70 %);
* ``blend_dense``: the same plan without masks: how much of the masked case is the hashing;
* ``task_arithmetic_n8``, ``ties_n8``, ``dare_ties_n8``: ``merge_tensors`` over 8 models of
  4096×14336 (22-32 %, 5-8 % and 10 % of the ceiling);
* ``logit_fusion_b256``: one DLF step, B 256, V 32000, T 1 (10.8x the naive grid; target 20x).
"""

from __future__ import annotations

import argparse
import sys

import torch


def _dim(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _randn(shape, gen, device):
    return torch.randn(shape, generator=gen, device=device).bfloat16()


def _blend(masked: bool, device: str, scale: float):
    from meldkit.ops import BlendPlan

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (_dim(2048, scale), _dim(2048, scale))
    bases = [_randn(shape, gen, device) for _ in range(64)]
    taus = [_randn(shape, gen, device) for _ in range(64)]
    outs = [torch.empty_like(b) for b in bases]
    plan = BlendPlan(outs, bases, taus, tensor_keys=list(range(64)))
    keep = (0.3, 0.3) if masked else (1.0, 1.0)
    return lambda: plan((1.0, -0.625, 0.833), keep=keep, seed=1)


def _merge(name: str, device: str, scale: float):
    from meldkit.bench.merge import METHODS
    from meldkit.ops import merge_tensors

    method, kw = METHODS[name]  # the keywords of `meldkit bench --op merge`
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (_dim(4096, scale), _dim(14336, scale))
    base = _randn(shape, gen, device)
    models = [base + 0.01 * _randn(shape, gen, device) for _ in range(8)]
    return lambda: merge_tensors(base, models, method, **kw)


def _logit_fusion(device: str, scale: float):
    from meldkit.ops import logit_fusion

    gen = torch.Generator(device=device).manual_seed(0)
    b, v = _dim(256, scale), _dim(32000, scale)
    large, small = _randn((b, v), gen, device), _randn((b, v), gen, device)
    experts = _randn((1, b, v), gen, device)
    return lambda: logit_fusion(large, small, experts)


CASES = {
    "blend_masked": lambda *a: _blend(True, *a),
    "blend_dense": lambda *a: _blend(False, *a),
    "task_arithmetic_n8": lambda *a: _merge("task_arithmetic", *a),
    "ties_n8": lambda *a: _merge("ties", *a),
    "dare_ties_n8": lambda *a: _merge("dare_ties", *a),
    "logit_fusion_b256": _logit_fusion,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of every dimension")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_profile: no CUDA device", file=sys.stderr)
        return 2
    names = args.case or list(CASES)
    for name in names:
        # One case's inputs at a time (ncu saves and restores what a replayed kernel can write).
        call = CASES[name](args.device, args.scale)
        call()  # warm-up: plans, workspaces, cuBLAS handles, lazy module loading
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            torch.cuda.nvtx.range_push(name)
            call()
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        del call
        print(f"gpu_profile: {name} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
