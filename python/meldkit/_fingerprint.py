"""Fingerprints of a base model, stored in adapter files so that loading into another base
fails with a clear error instead of giving a silently different model.

* :func:`base_sketch`: ``W @ v`` for a fixed pseudo-random ``v``, a cheap fingerprint of a
  weight's values (``[m]`` floats for an ``[m, n]`` weight); two sketches are compared by their
  relative L2 distance (:func:`sketch_distance`) against :func:`sketch_rtol`.
* :func:`parameter_layout`: every parameter's name and shape, which tells a base with other
  layers or another vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

# Relative L2 distance between two sketches of one base weight that still counts as the same
# weight: the fp32 rounding of the products when both are of the same bits; when one side is
# rounded to another dtype (or rebuilt from an adjusted weight), about three times the rounding
# error measured (bf16 2.2e-3, fp16 3e-4).
SKETCH_RTOL_EXACT = 1e-5
SKETCH_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
SKETCH_RTOL_DEFAULT = 1e-4


def base_sketch(weight: torch.Tensor) -> torch.Tensor:
    """``W @ v`` in fp32 on the weight's device, returned on the CPU, for a fixed v ~ N(0, 1)
    drawn from a generator seeded by W's width: a fingerprint of W ``[m, n]`` (``[m]``)."""
    n = weight.shape[1]
    generator = torch.Generator().manual_seed(0x60A7 + n)
    v = torch.randn(n, generator=generator, dtype=torch.float32).to(weight.device)
    with torch.no_grad():
        return torch.mv(weight.detach().float(), v).cpu()


def sketch_distance(saved: torch.Tensor, now: torch.Tensor) -> float:
    """Relative L2 distance of two sketches (0 for identical ones, NaN-safe: NaN compares as
    far)."""
    scale = max(float(saved.norm()), float(now.norm()), 1e-30)
    return float((saved - now).norm()) / scale


def sketch_rtol(saved_dtype: torch.dtype, dtype: torch.dtype, *, exact: bool = True) -> float:
    """The largest :func:`sketch_distance` that still means "the same weight": exact bits when
    both sides hold the weight in one dtype (and ``exact``), else the wider dtype's rounding."""
    if exact and saved_dtype == dtype:
        return SKETCH_RTOL_EXACT
    return max(SKETCH_RTOL.get(d, SKETCH_RTOL_DEFAULT) for d in (saved_dtype, dtype))


def parameter_layout(model: nn.Module) -> dict[str, list[int]]:
    """``{name: shape}`` of every parameter of ``model`` (tied ones once, by their first name)."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def layout_difference(saved: dict[str, list[int]], now: dict[str, list[int]]) -> str | None:
    """The first difference of the model's layout ``now`` from the ``saved`` one, as a phrase
    whose subject is the model ("has no parameter 'x'"), or None when they are the same."""
    for name, shape in saved.items():
        if name not in now:
            return f"has no parameter {name!r}"
        if list(now[name]) != list(shape):
            now_shape = list(now[name])
            return f"has parameter {name!r} of shape {now_shape}, the saved base {list(shape)}"
    for name in now:
        if name not in saved:
            return f"has a parameter {name!r} the saved base did not have"
    return None
