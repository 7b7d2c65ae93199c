"""Fingerprints of a base model, stored in adapter files so that loading into another base
fails with a clear error instead of giving a silently different model.

* :func:`base_sketch`: ``W @ v`` for a fixed pseudo-random ``v``, a cheap fingerprint of a
  weight's values (``[m]`` floats for an ``[m, n]`` weight); two sketches are compared by their
  relative L2 distance (:func:`sketch_distance`) against :func:`sketch_rtol`.
* :func:`parameter_layout`: every parameter's name and shape, which tells a base with other
  layers or another vocabulary.
* :func:`parameter_sketches`: a fingerprint of every other parameter (embeddings, norms,
  biases, layers not adapted), which tells a base that differs only there.
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
_NARROW = (torch.bfloat16, torch.float16)


# Elements converted to fp32 at a time by the fingerprints (a 128K-token embedding matrix is
# not copied whole).
_CHUNK = 1 << 22


def base_sketch(weight: torch.Tensor, round_to: torch.dtype | None = None) -> torch.Tensor:
    """``W @ v`` in fp32 on the weight's device, returned on the CPU, for a fixed v ~ N(0, 1)
    drawn from a generator seeded by W's width: a fingerprint of W ``[m, n]`` (``[m]``),
    computed a block of rows at a time (each block first rounded to ``round_to`` if given)."""
    m, n = weight.shape
    generator = torch.Generator().manual_seed(0x60A7 + n)
    v = torch.randn(n, generator=generator, dtype=torch.float32).to(weight.device)
    rows = max(1, _CHUNK // max(n, 1))
    with torch.no_grad():
        w = weight.detach()
        out = torch.empty(m, dtype=torch.float32, device=weight.device)
        for i in range(0, m, rows):
            block = w[i : i + rows]
            if round_to is not None:
                block = block.to(round_to)
            torch.mv(block.float(), v, out=out[i : i + rows])
        return out.cpu()


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


def parameter_sketch(p: torch.Tensor, round_to: torch.dtype | None = None) -> torch.Tensor:
    """A fingerprint of any parameter's values, fp32 on the CPU: :func:`base_sketch` of ``p``
    viewed as ``[shape[0], -1]`` (2-D and more), the values themselves for a vector (norm
    weights, biases: small), ``[1]`` for a scalar; of ``p``'s values rounded to ``round_to``
    when given."""
    p = p.detach()
    if p.dim() >= 2:
        return base_sketch(p.reshape(p.shape[0], -1), round_to)
    if round_to is not None:
        p = p.to(round_to)
    return p.reshape(-1).float().cpu().clone()


def parameter_sketches(
    params: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(sketches, dtypes)`` of ``params`` (:func:`parameter_sketch`, and each one's dtype
    name), for an adapter file: the base's parameters the adapter neither replaces nor
    fingerprints otherwise, so that loading into a base that differs only there is refused."""
    sketches = {name: parameter_sketch(p) for name, p in params.items()}
    dtypes = {name: str(_held_dtype(p)).removeprefix("torch.") for name, p in params.items()}
    return sketches, dtypes


def _held_dtype(p: torch.Tensor) -> torch.dtype:
    """The narrowest dtype that holds ``p``'s values exactly: bfloat16 or float16 for a wider
    tensor whose values were rounded to one (a model loaded in bf16 and cast to fp32), so that
    the same base loaded in another precision still passes; else ``p``'s own."""
    if p.dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            parts = p.detach().reshape(-1).split(_CHUNK)
            for narrow in (torch.bfloat16, torch.float16):
                if all(torch.equal(c.to(narrow).to(c.dtype), c) for c in parts):
                    return narrow
    return p.dtype


def sketches_difference(
    saved: dict[str, torch.Tensor], dtypes: dict[str, str], now: dict[str, torch.Tensor]
) -> str | None:
    """The first parameter of ``now`` whose values differ from the ones ``saved`` fingerprints
    (:func:`parameter_sketches`; ``dtypes``: the saved parameters' dtypes, a rounding to
    another dtype passes), as a phrase whose subject is the model, or None. Parameters absent
    from ``now`` are left to the layout check."""
    for name, sketch in saved.items():
        p = now.get(name)
        if p is None:
            continue
        saved_dtype = getattr(torch, dtypes.get(name, ""), p.dtype)
        if not isinstance(saved_dtype, torch.dtype):
            saved_dtype = p.dtype
        if saved_dtype in _NARROW and p.dtype.itemsize > saved_dtype.itemsize:
            # The saved base held values of a narrower dtype (parameter_sketches): the same
            # base, wider here, rounds to exactly those values, so compare the rounded values
            # exactly (a bf16 tolerance would let a fine-tune's small changes pass).
            current, rtol = parameter_sketch(p, round_to=saved_dtype), SKETCH_RTOL_EXACT
        else:
            current, rtol = parameter_sketch(p), sketch_rtol(saved_dtype, p.dtype)
        if current.shape != sketch.shape:
            return f"has parameter {name!r} of another shape than the saved base's"
        distance = sketch_distance(sketch, current)
        if not distance <= rtol:
            return (
                f"has other values in parameter {name!r} than the saved base (its fingerprint "
                f"differs by {distance:.3g} relative, more than {rtol:.1g})"
            )
    return None
