"""The reference of ``blend``: ExDe's per-step parameter blend, in plain PyTorch (the spec).

For one tensor with base θ₀ and task vector τ (fine-tuned − base), coefficients (a, b, c) and
keep probabilities (k₁, k₂)::

    m_k[e] = uniform(seed, stream_of(key, 2, k - 1), e) < k_k   (the merge family's DARE masks)
    g[e]   = a + b·m₁[e] + c·m₂[e]                               (tensors of 2+ dimensions)
           = a + b·k₁ + c·k₂                                     (dense: 1-D, never dropped)
    out[e] = θ₀[e] + τ[e]·g[e]                                   (float32, stored in θ₀'s dtype)

With b = −α·β_dyn/k₁ the mask-1 term is ExDe's degree vector β_dyn·DARE(−α·τ); with c = β_con/k₂
the mask-2 term is β_con·DARE(τ); a multiplies τ itself. Every coefficient is rounded to float32
first and g is summed left to right in float32, as the kernels do: reference and kernels agree
bit for bit.
"""

from __future__ import annotations

import torch

from meldkit.ops.merge_ref import stream_of
from meldkit.ops.random_ref import uniform_ref


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def blend_coefficients(
    a: float, b: float, c: float, keep1: float, keep2: float
) -> tuple[list[float], float]:
    """The float32 table ``g[m₁ + 2·m₂]`` and the dense ``g``, rounded as the kernels take them."""
    fa, fb, fc = _f32(a), _f32(b), _f32(c)
    table = [fa, fa + fb, fa + fc, (fa + fb) + fc]
    dense = (fa + fb * _f32(keep1)) + fc * _f32(keep2)
    return [float(t) for t in table], float(dense)


def blend_masks(
    numel: int, keep1: float, keep2: float, seed: int, tensor_key: int, *, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two keep masks ``[numel]`` (bool) of one tensor."""
    m1 = uniform_ref(numel, seed, stream_of(tensor_key, 2, 0), device=device) < keep1
    m2 = uniform_ref(numel, seed, stream_of(tensor_key, 2, 1), device=device) < keep2
    return m1, m2


def blend_ref(
    base: torch.Tensor,
    tau: torch.Tensor,
    coeffs: tuple[float, float, float],
    *,
    keep: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
    tensor_key: int = 0,
    dense: bool | None = None,
) -> torch.Tensor:
    """``θ₀ + τ·g`` for one tensor (see the module docstring); ``dense`` defaults to
    ``base.dim() <= 1``."""
    table, g_dense = blend_coefficients(*coeffs, *keep)
    if dense is None:
        dense = base.dim() <= 1
    if dense:
        g = torch.full(base.shape, g_dense, dtype=torch.float32, device=base.device)
    else:
        m1, m2 = blend_masks(base.numel(), *keep, seed, tensor_key, device=base.device)
        sel = (m1.long() + 2 * m2.long()).view(base.shape)
        g = torch.tensor(table, dtype=torch.float32, device=base.device)[sel]
    return (base.float() + tau.float() * g).to(base.dtype)


__all__ = ["blend_coefficients", "blend_masks", "blend_ref"]
