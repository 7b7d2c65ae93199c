"""``blend``: ExDe's per-step parameter blend over every tensor of a model in one call.

``out = θ₀ + τ·(a + b·m₁ + c·m₂)`` per element, the two DARE masks regenerated from the seed
inside the kernel (never stored), 1-D tensors dense; semantics in :mod:`meldkit.ops.blend_ref`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from meldkit import _native
from meldkit.ops.blend_ref import blend_coefficients, blend_ref
from meldkit.ops.merge_ref import stream_of

_OP = "blend"


def _error(kind: type[Exception], arg: str, message: str) -> Exception:
    return kind(f"meldkit.blend_tensors: argument '{arg}': {message}")


def _real(name: str, value: object, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _error(TypeError, name, f"expected a float, got {type(value).__name__}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise _error(ValueError, name, f"must be finite, got {v}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise _error(ValueError, name, f"{v} is not in [{low}, {high}]")
    return v


def blend_tensors(
    outs: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    taus: Sequence[torch.Tensor],
    coeffs: tuple[float, float, float],
    *,
    keep: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
    tensor_keys: Sequence[int],
    dense: Sequence[bool] | None = None,
) -> None:
    """Write ``bases[i] + taus[i]·g`` into ``outs[i]`` for every tensor, in one native call.

    Parameters
    ----------
    outs : sequence of Tensor
        Written in place (e.g. a model's parameters); each like its base (shape, dtype, device).
    bases, taus : sequence of Tensor
        θ₀ and τ = θ_ft − θ₀ of each tensor; one float dtype (float32, bfloat16, float16) and
        device for all.
    coeffs : (float, float, float)
        ``(a, b, c)``: g = a + b·m₁ + c·m₂.
    keep : (float, float)
        Keep probabilities of the masks m₁, m₂ (DARE's 1 − p), in [0, 1].
    seed : int
        Seed of the masks, 0 ≤ seed < 2⁶⁴.
    tensor_keys : sequence of int
        Each tensor's key (``meldkit.merging.engine.tensor_key(name)``: the CRC-32 of its name), so
        the masks do not depend on the order of the tensors.
    dense : sequence of bool, optional
        Tensors that are never masked (g = a + b·k₁ + c·k₂); default: the 1-D ones.

    Raises
    ------
    TypeError, ValueError
        Mismatched lists, shapes, dtypes or devices, non-finite coefficients, a keep outside
        [0, 1], an output that is one of the task vectors.
    """
    outs, bases, taus = list(outs), list(bases), list(taus)
    if not bases:
        raise _error(ValueError, "bases", "is empty")
    if not len(outs) == len(bases) == len(taus):
        raise _error(ValueError, "outs", "outs, bases and taus must have the same length")
    keys = [int(k) for k in tensor_keys]
    if len(keys) != len(bases) or any(not 0 <= k < 2**32 for k in keys):
        raise _error(ValueError, "tensor_keys", "needs one key in [0, 2**32) per tensor")
    if len(coeffs) != 3:
        raise _error(ValueError, "coeffs", f"expected (a, b, c), got {coeffs!r}")
    if len(keep) != 2:
        raise _error(ValueError, "keep", f"expected (keep1, keep2), got {keep!r}")
    a, b, c = (_real(f"coeffs[{i}]", v) for i, v in enumerate(coeffs))
    k1, k2 = (_real(f"keep[{i}]", v, 0.0, 1.0) for i, v in enumerate(keep))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise _error(ValueError, "seed", f"must be an int in [0, 2**64), got {seed!r}")
    flags = [t.dim() <= 1 for t in bases] if dense is None else [bool(d) for d in dense]
    if len(flags) != len(bases):
        raise _error(ValueError, "dense", "needs one flag per tensor")
    for name, ts in (("bases", bases), ("taus", taus), ("outs", outs)):
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor):
                raise _error(TypeError, f"{name}[{i}]", f"expected a tensor, got {type(t)}")
    device, dtype = bases[0].device, bases[0].dtype
    reasons = _native.unavailable(_OP, device, (dtype,))
    if reasons:
        _native.warn_fallback(_OP, device, (dtype,), reasons)
        for i, (o, bt, tt) in enumerate(zip(outs, bases, taus, strict=True)):
            if bt.shape != tt.shape or bt.shape != o.shape:
                raise _error(ValueError, f"taus[{i}]", "shape differs from its base or output")
            with torch.no_grad():
                o.copy_(
                    blend_ref(
                        bt,
                        tt,
                        (a, b, c),
                        keep=(k1, k2),
                        seed=seed,
                        tensor_key=keys[i],
                        dense=flags[i],
                    )
                )
        return
    table, g_dense = blend_coefficients(a, b, c, k1, k2)
    targets = [
        o if o.is_contiguous() else torch.empty_like(o, memory_format=torch.contiguous_format)
        for o in outs
    ]
    _native._C.blend(
        [t.detach() for t in targets],
        [t.detach().contiguous() for t in bases],
        [t.detach().contiguous() for t in taus],
        flags,
        table,
        g_dense,
        k1,
        k2,
        table[1] != table[0] or table[3] != table[2],
        table[2] != table[0] or table[3] != table[1],
        seed,
        [stream_of(k, 2, 0) for k in keys],
        [stream_of(k, 2, 1) for k in keys],
        _native.stream_of(device),
    )
    for t, o in zip(targets, outs, strict=True):
        if t is not o:
            with torch.no_grad():
                o.copy_(t)


__all__ = ["blend_tensors"]
