"""Expert initialisation and the weight alignment of the frozen base (GOAT paper §3.3–3.4).

Notation: W0 ∈ R^{m×n} (out × in), full SVD W0 = U Σ Vᵀ in fp32, h = min(m, n), E experts of
rank d (total r = E·d), scaling s, damping ρ.

SVD inits (``goat``, ``pissa``, ``milora``) differ only in which singular triplets expert j
(0-based) receives, starting at index k_j and taking d consecutive ones:

======== =================== =====================================================================
init     k_j                 source
======== =================== =====================================================================
goat     j·⌊h/E⌋             Eq. 13 / official ``svd_init``: the first d triplets of the j-th of E
                             equal spectral chunks ("O" in the paper's Table 5)
pissa    j·d                 the r principal triplets, split in order ("P" in Table 5)
milora   h − r + j·d         the r minor triplets, split in spectral order as the official
                             ``milora`` init does; the same set as the paper's "M"
                             (k_j = h − (j+1)·d), with the experts numbered the other way
======== =================== =====================================================================

Each then gets (Eq. 19) B_j = U_j (Σ_j/(sρ))^{1/2} and A_j = (Σ_j/(sρ))^{1/2} V_jᵀ, so that
s·B_j A_j = (1/ρ) U_j Σ_j V_jᵀ, and the base becomes (Theorem 3.4, ``init_cof = 1/E``)

    W̃0 = W0 − (s/E) Σ_j B_j A_j.

GOAT-s (the paper's App. E, Table 8) gives each expert its own factor instead of one s:
s_j = s·√(σ_1/σ_j), σ_j the sum of the singular values of expert j's segment (expert 1 keeps s;
:func:`goat_s_scaling`). Everything above then holds with s_j in place of s per expert: s_j·B_j A_j
is still (1/ρ) U_j Σ_j V_jᵀ, and W̃0 = W0 − (1/E) Σ_j s_j B_j A_j.

All three need h ≥ r. ``lora`` is plain LoRA: every A_j Kaiming-uniform (a = √5, PyTorch's
``nn.Linear`` default: U(−1/√n, 1/√n)), B_j = 0, base untouched.

The subtraction is computed by :func:`base_delta` as a fixed-order sum of rank-1 terms in fp32,
elementwise only, so it gives the same bits on every device and in every run: that is what lets
:func:`meldkit.goat.load_adapter` rebuild the adjusted base bit-exactly from the stored factors.
"""

from __future__ import annotations

import math

import torch


def segment_starts(init: str, h: int, num_experts: int, expert_rank: int) -> list[int]:
    """First singular-triplet index k_j of each expert's segment (0-based, see the module table).

    Parameters
    ----------
    init : {"goat", "pissa", "milora"}
    h : int
        min(m, n), the number of singular values of the weight.
    num_experts, expert_rank : int
        E and d.

    Raises
    ------
    ValueError
        When h < E·d (the segments would overlap or run past the spectrum).
    """
    e, d = num_experts, expert_rank
    if h < e * d:
        raise ValueError(
            f"init {init!r} needs min(out_features, in_features) ≥ rank = {e * d}, got {h}"
        )
    if init == "goat":
        width = h // e
        return [j * width for j in range(e)]
    if init == "pissa":
        return [j * d for j in range(e)]
    if init == "milora":
        return [h - e * d + j * d for j in range(e)]
    raise ValueError(f"no SVD segments for init {init!r}")


def goat_s_scaling(sv: torch.Tensor, scaling: float, num_experts: int) -> torch.Tensor:
    """GOAT-s's per-expert factors ``[E]`` fp32: s_j = s·√(σ_1/σ_j) (paper App. E).

    Parameters
    ----------
    sv : Tensor [E, d]
        The singular values of each expert's segment (row j: expert j's, in spectral order).
    scaling : float
        s, the factor of the first expert.
    num_experts : int
        E.

    σ_j is the sum of row j. An expert whose segment sums to 0 (a rank-deficient weight) keeps
    s: its factors start at 0, and no finite ratio exists.
    """
    sigma = sv.detach().to(torch.float64).reshape(num_experts, -1).sum(-1)
    ratio = sigma[0] / sigma  # inf, 0 or NaN where a segment sums to 0: no finite ratio
    ratio = torch.where(ratio.isfinite() & (ratio > 0), ratio, 1.0)
    return (scaling * ratio.sqrt()).to(torch.float32)


def svd_experts(
    weight: torch.Tensor,
    *,
    init: str,
    num_experts: int,
    expert_rank: int,
    scaling: float | torch.Tensor,
    rho: float,
    per_expert_scaling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
    """Expert factors from segments of the full fp32 SVD of ``weight`` (Eq. 13, 19).

    Parameters
    ----------
    weight : Tensor [m, n]
        W0, any floating dtype; the SVD runs in fp32 on its device.
    init : {"goat", "pissa", "milora"}
        Which segments (:func:`segment_starts`).
    num_experts, expert_rank : int
        E and d.
    scaling : float or Tensor [E]
        s (or explicit per-expert factors s_j): expert j's singular values are divided by
        s_j·ρ before the square-root split.
    rho : float
        ρ.
    per_expert_scaling : bool
        GOAT-s: replace a float ``scaling`` s by s_j = s·√(σ_1/σ_j) (:func:`goat_s_scaling`)
        from this SVD's segments.

    Returns
    -------
    lora_a : Tensor [E, d, n] fp32
        A_j = diag(√(σ/(sρ))) V_jᵀ.
    lora_b : Tensor [E, m, d] fp32
        B_j = U_j diag(√(σ/(sρ))).
    scaling : float or Tensor [E] fp32
        The factor(s) used: ``scaling`` as given, or GOAT-s's s_j.
    """
    w = weight.detach().to(torch.float32)
    m, n = w.shape
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    d = expert_rank
    starts = segment_starts(init, min(m, n), num_experts, d)
    idx = torch.tensor([k + i for k in starts for i in range(d)], device=w.device)
    if per_expert_scaling:
        scaling = goat_s_scaling(sv[idx].view(num_experts, d), float(scaling), num_experts)
    factor = scaling
    if isinstance(scaling, torch.Tensor):  # per expert: s_j for each of expert j's d triplets
        factor = scaling.to(device=w.device, dtype=torch.float32).repeat_interleave(d)
    root = torch.sqrt(sv[idx] / (factor * rho))  # [r]
    a_all = root[:, None] * vh[idx]  # [r, n]
    b_all = u[:, idx] * root[None, :]  # [m, r]
    lora_a = a_all.reshape(num_experts, d, n).contiguous()
    lora_b = b_all.reshape(m, num_experts, d).permute(1, 0, 2).contiguous()
    return lora_a, lora_b, scaling


def lora_experts(
    in_features: int,
    out_features: int,
    *,
    num_experts: int,
    expert_rank: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-LoRA experts: A_j ~ Kaiming-uniform(a = √5) (draws from the default generator, one
    expert after the other), B_j = 0.

    Returns
    -------
    lora_a : Tensor [E, d, n] fp32
    lora_b : Tensor [E, m, d] fp32, zeros
    """
    a = torch.empty(num_experts, expert_rank, in_features, device=device, dtype=torch.float32)
    for j in range(num_experts):
        torch.nn.init.kaiming_uniform_(a[j], a=math.sqrt(5))
    b = torch.zeros(num_experts, out_features, expert_rank, device=device, dtype=torch.float32)
    return a, b


def alignment_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, coef: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the base adjustment, ``coef · Σ_j B_j A_j = delta_b @ delta_a``.

    Parameters
    ----------
    lora_a : Tensor [E, d, n]
    lora_b : Tensor [E, m, d]
    coef : float or Tensor [E]
        s/E for GOAT's weight alignment (per expert, s_j/E, for GOAT-s).

    Returns
    -------
    delta_a : Tensor [r, n] fp32
        A_all = [A_1; …; A_E].
    delta_b : Tensor [m, r] fp32
        coef · B_all = coef · [B_1 … B_E].
    """
    e, d, n = lora_a.shape
    delta_a = lora_a.detach().to(torch.float32).reshape(e * d, n).clone()
    b_all = lora_b.detach().to(torch.float32).permute(1, 0, 2).reshape(-1, e * d)
    if isinstance(coef, torch.Tensor):  # per expert
        coef = coef.to(device=b_all.device, dtype=torch.float32).repeat_interleave(d)
    return delta_a, (b_all * coef).contiguous()


def base_delta(delta_a: torch.Tensor, delta_b: torch.Tensor) -> torch.Tensor:
    """``delta_b @ delta_a`` in fp32, computed so that every device gives the same bits.

    A fixed-order sum of r rank-1 terms, each a separate elementwise multiply and add (so no
    fused multiply-add and no BLAS blocking can change the rounding). Costs r passes over an
    m×n fp32 buffer (≈ 1.5 s for 4096² and r = 32 on two CPU cores; milliseconds on a GPU).

    Parameters
    ----------
    delta_a : Tensor [r, n] fp32
    delta_b : Tensor [m, r] fp32

    Returns
    -------
    Tensor [m, n] fp32
    """
    m, r = delta_b.shape
    acc = torch.zeros(m, delta_a.shape[1], dtype=torch.float32, device=delta_a.device)
    b = delta_b.to(device=delta_a.device, dtype=torch.float32)
    a = delta_a.to(torch.float32)
    for k in range(r):
        acc.add_(b[:, k, None] * a[None, k, :])
    return acc
