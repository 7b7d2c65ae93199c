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


def _demo_merge(device: torch.device) -> bool:
    """Write a tiny base model and three sparse fine-tunes as safetensors, merge them with TIES
    through the streaming engine, and check the result against the reference tensor by tensor."""
    import tempfile
    from pathlib import Path

    from meldkit.merging import Checkpoint, merge
    from meldkit.merging.synthetic import write_checkpoint
    from meldkit.ops import merge_ref

    gen = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (512, 64), "layer.0.mlp.weight": (256, 64), "norm.weight": (64,)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    tunes = [
        {
            k: v
            + 0.02
            * torch.randn(v.shape, generator=gen)
            * (torch.rand(v.shape, generator=gen) < 0.3)
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        states = [("base", base)] + [(f"ft{i}", t) for i, t in enumerate(tunes)]
        paths = [str(write_checkpoint(root / name, state)) for name, state in states]
        config = {
            "merge_method": "ties",
            "base_model": paths[0],
            "models": [
                {"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in paths[1:]
            ],
            "parameters": {"normalize": True},
        }
        out = merge(config, root / "merged", device=device, progress=False)
        merged = Checkpoint(out)
        ok = True
        for name in shapes:
            expected = merge_ref.generalized_merge_ref(
                base[name],
                [t[name] for t in tunes],
                weights=[1.0] * 3,
                densities=[0.5] * 3,
                sparsify="magnitude",
                consensus="sum",
                normalize=True,
            )
            same = torch.equal(merged.get(name), expected)
            ok &= same
            print(
                f"  merge ties  {name:<20} {list(shapes[name])!s:<12} "
                f"{'equals the reference' if same else 'DIFFERS from the reference'}"
            )
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
    print(f"\nmerging checkpoints (TIES, streaming engine) on {dev}:")
    ok &= _demo_merge(dev)
    print(f"\nbenchmark (quick) on {dev}:")
    rows = bench.run_op("weighted_sum", device=dev.type, quick=True)
    rows += bench.run_op("merge", device=dev.type, quick=True)
    print(bench.format_table(rows))
    return 0 if ok else 1
