"""``meldkit demo``: runs each op on random data, checks it against its reference, and times it.

Later issues add their methods here; for now it exercises the pilot op, ``weighted_sum``.
"""

from __future__ import annotations

import torch

from meldkit import _native


def _demo_weighted_sum(device: torch.device) -> bool:
    from meldkit.ops import weighted_sum, weighted_sum_ref

    gen = torch.Generator(device="cpu").manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensors = [torch.randn(1000, 1003, generator=gen).to(device, dtype) for _ in range(4)]
        weights = [0.5, -0.25, 1.0, 0.3]
        got = weighted_sum(tensors, weights)
        ref = weighted_sum_ref([t.double() for t in tensors], weights)
        err = ((got.double() - ref).norm() / ref.norm()).item()
        # Relative error of one rounding to the output dtype, with room for a few ulps.
        bound = 4 * torch.finfo(dtype).eps
        status = "ok" if err <= bound else "FAILED"
        ok &= err <= bound
        print(f"  weighted_sum {dtype!s:<15} 4 x [1000, 1003]  rel. error {err:.2e}  {status}")
    return ok


def run_demo(device: str | None = None) -> int:
    """Run the demo on ``device`` (default: CUDA when usable, else CPU); return an exit code."""
    from meldkit import bench
    from meldkit.info import info

    info()
    if device is None:
        device = "cuda" if _native.cuda_usable()[0] and torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    print(f"\ncorrectness against the float64 reference on {dev}:")
    ok = _demo_weighted_sum(dev)
    print(f"\nbenchmark (quick) on {dev}:")
    rows = bench.run_op("weighted_sum", device=dev.type, quick=True)
    print(bench.format_table(rows))
    return 0 if ok else 1
