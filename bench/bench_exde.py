"""ExDe's per-step blend: ``meldkit.ops.BlendPlan`` against a per-tensor PyTorch loop.

    python bench/bench_exde.py [--device cpu|cuda] [--dtype bf16|fp16|fp32] [--scale 0.05]
                               [--steps 25] [--json rows.jsonl]

The tensors have the shapes of Stable Video Diffusion's UNet parameters (diffusers'
``UNetSpatioTemporalConditionModel`` default config, built on the meta device: 1.52 B parameters
in 1428 tensors), every one scaled down by ``--scale`` in its first dimension (default 0.05 on the
CPU, 1.0 on CUDA) so that a run fits the machine. Both sides compute θ = θ₀ + τ·(a + b·m₁ + c·m₂)
for every tensor with two DARE masks (keep 0.3), 1-D tensors dense:

* ``meldkit``: one call of a :class:`meldkit.ops.BlendPlan` made beforehand (what ExDe's
  ``attach`` does: the plan is made once, each schedule change is one call), masks regenerated
  in the kernel;
* ``meldkit_oneshot``: :func:`meldkit.ops.blend_tensors`, a plan made and used once (its
  validation of every tensor included);
* ``torch_loop``: for each tensor, two ``torch.rand(...) < keep`` masks, then the arithmetic in
  float32, then a copy into the parameter (what a straightforward implementation does).

GB/s counts the bytes that must move (read θ₀ and τ, write θ) against the copy bandwidth measured
in the same run; the issue's target is ≥ 70 %. The added time per denoising step is the blend
time for a schedule that changes every step (linear, cosine), and 2 blends per ``--steps`` for the
release's switch.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from meldkit.bench import (
    DTYPES,
    cache_flusher,
    device_name,
    measure_ceiling,
    run_metadata,
    time_impls,
    write_rows,
)
from meldkit.ops import BlendPlan, blend_tensors


def svd_shapes(scale: float) -> tuple[list[tuple[int, ...]], str]:
    """The parameter shapes and where they come from."""
    try:
        import diffusers
    except ImportError:  # a fixed mix of the same size: 1428 tensors, 1.54 B parameters
        full = [(1280, 1280)] * 640 + [(640, 640)] * 400 + [(2560, 1280)] * 100 + [(1280,)] * 288
        source = "an SVD-sized mix (diffusers not installed)"
    else:
        with torch.device("meta"):
            unet = diffusers.UNetSpatioTemporalConditionModel()
        full = [tuple(p.shape) for p in unet.parameters()]
        source = "SVD UNet shapes"
    shapes = []
    for shape in full:
        s = list(shape)
        if s:
            s[0] = max(1, round(s[0] * scale))
        shapes.append(tuple(s))
    return shapes, source


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_exde: no CUDA device", file=sys.stderr)
        return 2
    scale = args.scale if args.scale is not None else (1.0 if args.device == "cuda" else 0.05)
    dtype, dev = DTYPES[args.dtype], args.device
    shapes, source = svd_shapes(scale)
    gen = torch.Generator().manual_seed(0)
    bases = [torch.randn(s, generator=gen).to(dev, dtype) for s in shapes]
    taus = [(0.01 * torch.randn(s, generator=gen)).to(dev, dtype) for s in shapes]
    outs = [torch.empty_like(b) for b in bases]
    keys = list(range(len(shapes)))
    keep = 0.3
    coeffs = (1.0, -0.25 * 0.75 / keep, 0.25 / keep)  # a mixed step: τ, τ_deg and τ_ctl
    numel = sum(b.numel() for b in bases)
    moved = 3 * numel * bases[0].element_size()
    tgen = torch.Generator(device=dev).manual_seed(1)

    start = time.perf_counter()
    plan = BlendPlan(outs, bases, taus, tensor_keys=keys)
    plan_s = time.perf_counter() - start

    def ours():
        plan(coeffs, keep=(keep, keep), seed=1)

    def oneshot():
        blend_tensors(outs, bases, taus, coeffs, keep=(keep, keep), seed=1, tensor_keys=keys)

    @torch.no_grad()
    def torch_loop():
        a, b, c = coeffs
        for o, base, tau in zip(outs, bases, taus, strict=True):
            if base.dim() <= 1:
                g = a + b * keep + c * keep
                o.copy_(base.float() + tau.float() * g)
                continue
            m1 = torch.rand(base.shape, generator=tgen, device=dev) < keep
            m2 = torch.rand(base.shape, generator=tgen, device=dev) < keep
            o.copy_(base.float() + tau.float() * (a + b * m1 + c * m2))

    flush = cache_flusher(dev)
    ceiling = measure_ceiling(dev, flush=flush)
    times = time_impls(
        {"meldkit": ours, "meldkit_oneshot": oneshot, "torch_loop": torch_loop},
        dev,
        flush=flush,
        repeats=args.repeats,
    )
    meta = run_metadata()
    print(
        f"{device_name(dev)}: {source} x {scale:g} ({len(shapes)} tensors, "
        f"{numel / 1e6:.1f} M parameters, {args.dtype}); copy ceiling {ceiling:.1f} GB/s"
    )
    ours_s = times["meldkit"].median_s
    for name, t in times.items():
        gbs = moved / t.median_s / 1e9
        print(
            f"  {name:<15} {t.median_s * 1e3:9.2f} ms  {gbs:7.1f} GB/s  "
            f"{100 * gbs / ceiling:5.1f}% of the ceiling  {t.median_s / ours_s:6.2f}x meldkit"
        )
    print(f"  making the plan (once): {plan_s * 1e3:.2f} ms")
    print(
        f"  added per denoising step: {ours_s * 1e3:.2f} ms with a per-step schedule (linear, "
        f"cosine); {2 * ours_s / args.steps * 1e3:.3f} ms averaged with the switch over "
        f"{args.steps} steps"
    )
    if args.json:
        write_rows(
            args.json,
            [
                {
                    **meta,
                    "bench": "exde_blend",
                    "impl": name,
                    "device": dev,
                    "dtype": args.dtype,
                    "scale": scale,
                    "numel": numel,
                    "median_s": t.median_s,
                    "gb_s": moved / t.median_s / 1e9,
                    "ceiling_gb_s": ceiling,
                }
                for name, t in times.items()
            ],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
