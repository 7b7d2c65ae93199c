"""Pure-PyTorch reference of the merge family: the executable spec of every sparsifier, sign
election, disjoint merge and merge method, as mergekit (Goddard et al., arXiv:2403.13257)
computes them; :data:`meldkit.merging.methods.METHODS` names each method's paper.

Readable and float64-capable, slow on purpose. Every function works on one tensor position of a
model: ``base`` is θ₀ of some shape ``S`` and ``tensors`` the N fine-tuned θ_t of shape ``S``
(or the N task vectors τ_t = θ_t − θ₀). Native kernels must reproduce these results: exactly for
the discrete choices (which entries are kept, which sign wins), to the accumulation dtype's
rounding for the arithmetic.

Tie rules (the papers and mergekit leave them to the implementation; these are meldkit's):

- ``magnitude`` with ``tie="keep_ties"``: k = ``int(numel·density)``; threshold = the k-th largest
  ``|τ|`` (``kthvalue(|τ|, numel − k + 1)``); keep ``|τ| ≥ threshold``: exactly k entries when the
  magnitudes are distinct, and every entry tied at the threshold. (The original TIES code takes
  ``kthvalue(numel − k)`` and so keeps k + 1 entries; meldkit keeps the k that ``density`` says.)
- ``magnitude`` with ``tie="exact_k"`` (mergekit's count): keep exactly ``int(numel·density)``
  entries, the largest magnitudes, equal magnitudes ordered by lower flat index first
  (mergekit's ``argsort`` is not stable: its choice among tied entries is undefined, so only
  the count is mergekit's, not always which tied entries are kept).
- ranks (breadcrumbs, DELLA): ascending ``|τ|``, equal magnitudes ordered by flat index.
- sign election: ``+1`` where the vote is ``≥ 0`` (mergekit: a zero vote goes to +1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from meldkit.ops.random_ref import bernoulli_mask_ref

TIE_RULES = ("keep_ties", "exact_k")
RESCALES = ("none", "inverse_density", "l1")
CONSENSUS = ("none", "sum", "count")


def stream_of(tensor_index: int, num_models: int, model: int) -> int:
    """The counter-based stream of model ``model`` at tensor position ``tensor_index``:
    ``(tensor_index·N + model) mod 2³²``."""
    return (tensor_index * num_models + model) % 2**32


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Elements per block of _fixed_sum: below torch's parallel grain (32768), so one block is summed
# by one thread in an order fixed by the shapes.
_SUM_BLOCK = 4096


def _fixed_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension of ``x`` ``[R, L]``, in float64, in an order that depends on the
    shapes only, never on torch's thread count: blocks of 4096 elements, each summed by one
    thread (a reduction with several outputs runs each output on one thread; one of fewer than
    32768 elements runs serially), then the block sums the same way, level by level.
    (``x.sum()`` splits one large reduction between the threads, so its rounding depends on
    how many there are.)"""
    rows, length = x.shape
    while length > _SUM_BLOCK:
        full = (length // _SUM_BLOCK) * _SUM_BLOCK
        parts = [x[:, :full].reshape(rows, -1, _SUM_BLOCK).sum(-1, dtype=torch.float64)]
        if full < length:
            parts.append(x[:, full:].sum(-1, dtype=torch.float64, keepdim=True))
        x = torch.cat(parts, -1)
        length = x.shape[1]
    return x.sum(-1, dtype=torch.float64)


def _stable_order(absval: torch.Tensor, descending: bool) -> torch.Tensor:
    """Flat indices ordering ``absval`` by value, equal values by lower index first."""
    return torch.sort(absval.flatten(), descending=descending, stable=True).indices


# ---- sparsifiers: τ (one tensor) -> keep mask -----------------------------------------------


def magnitude_threshold_ref(absval: torch.Tensor, density: float) -> torch.Tensor:
    """The magnitude at which ``tie="keep_ties"`` trimming cuts: ``|τ| ≥ threshold`` is kept.

    The k-th largest of ``absval`` with k = ``int(numel·density)``, i.e.
    ``kthvalue(absval, numel − k + 1)``; ``+inf`` (keep nothing) when k = 0, ``-inf`` (keep
    everything) when k ≥ numel. ``absval`` may be a concatenation of many tensors (the global scope
    of the TIES paper).
    """
    flat = absval.flatten()
    n = flat.numel()
    keep = int(n * density)
    if keep <= 0:
        return torch.tensor(math.inf, dtype=absval.dtype)
    if keep >= n:
        return torch.tensor(-math.inf, dtype=absval.dtype)
    _refuse_nan(flat)
    return flat.kthvalue(n - keep + 1).values


def _refuse_nan(absval: torch.Tensor) -> None:
    """Magnitude selection cannot rank NaN: a ValueError (the kernels' message), raised only
    where entries are ranked (not when all or none are kept)."""
    if torch.isnan(absval).any():
        raise ValueError("magnitude_select: the task vectors contain NaN")


def exact_k_count(numel: int, density: float) -> int:
    """How many entries ``tie="exact_k"`` keeps: ``int(density·numel)``, and at least one of a
    non-empty tensor when ``density > 0`` (mergekit's ``sparsify.magnitude``)."""
    k = min(int(numel * density), numel)
    return max(k, 1) if density > 0 and numel > 0 else max(k, 0)


def magnitude_mask_ref(tau: torch.Tensor, density: float, tie: str = "keep_ties") -> torch.Tensor:
    """Keep mask of magnitude trimming: the top ``density`` fraction of ``|τ|`` (TIES, mergekit)."""
    if tie not in TIE_RULES:
        raise ValueError(f"tie must be one of {TIE_RULES}, got {tie!r}")
    absval = tau.abs()
    if tie == "keep_ties":
        return absval >= magnitude_threshold_ref(absval, density)
    k = exact_k_count(tau.numel(), density)
    if 0 < k < tau.numel():
        _refuse_nan(absval)
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[_stable_order(absval, descending=True)[:k]] = True
    return mask.view(tau.shape)


def random_mask_ref(tau: torch.Tensor, density: float, seed: int, tensor_index: int):
    """DARE's keep mask: each entry independently with probability ``density`` (seeded)."""
    return bernoulli_mask_ref(tau.shape, density, seed, tensor_index, device=tau.device)


def breadcrumbs_mask_ref(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest magnitudes (outliers) and the
    smallest ones, keeping ``density`` of the entries (mergekit's counts).

    ``n_top = int(gamma·N)``, ``n_bot = N − int(density·N) − n_top`` (if negative, ``n_top`` absorbs
    it and ``n_bot = 0``); keep ascending ranks ``[n_bot, N − n_top)``. Unlike mergekit's slice
    ``[n_bot:-n_top]``, ``n_top = 0`` keeps ranks ``[n_bot, N)`` instead of dropping everything.
    """
    n = tau.numel()
    n_top = int(gamma * n)
    n_bot = n - int(density * n) - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    if n_bot < n - n_top and (n_bot > 0 or n_top > 0):
        _refuse_nan(tau.abs())
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[_stable_order(tau.abs(), descending=False)[n_bot : n - n_top]] = True
    return mask.view(tau.shape)


def check_della(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities lie in (0, 1] and grow with the magnitude only when
    ``0 ≤ ε``, ``0 < density − ε`` and ``density + ε ≤ 1``; raises ValueError otherwise (the
    native kernels refuse a negative ε too)."""
    if not (epsilon >= 0 and 0 < density - epsilon and density + epsilon <= 1):
        raise ValueError(
            f"della needs 0 <= epsilon, 0 < density - epsilon and density + epsilon <= 1 "
            f"(density={density}, epsilon={epsilon})"
        )


def della_keep_prob_ref(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities, per row (a 1-D tensor is one row).

    Ascending magnitude rank r ∈ [0, n−1] within the row, ``p = (density − ε) + 2ε·r/(n−1)``
    (``r/(n−1)`` taken as 0 for a one-element row). Requires ``0 < density − ε`` and
    ``density + ε ≤ 1``. (A density of 1 or 0 never gets here: as in mergekit, the merge keeps
    τ whole or drops it without drawing.) A row is the last axis: for 1-D and 2-D tensors that
    is mergekit's ranking (its ``argsort(dim=1)``); a tensor of three or more dimensions (a fused
    MoE expert stack ``[E, out, in]``) is ranked here along its last axis, by mergekit along its
    second, so the keep probabilities differ in which elements share a ranking (their spread and
    mean do not; DELLA's masks cannot match mergekit's generator anyway).
    """
    check_della(density, epsilon)
    if tau.numel() == 0:  # no rows to rank (a 0-length dimension)
        return torch.empty(tau.shape, dtype=torch.float32, device=tau.device)
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(-1, tau.shape[-1])
    n = rows.shape[1]
    # Every row at once: a stable ascending sort (equal magnitudes by index), rank r at each
    # element's place.
    order = torch.sort(rows.abs(), dim=-1, stable=True).indices
    arange = torch.arange(n, dtype=torch.float64, device=tau.device).expand_as(order)
    ranks = torch.empty_like(rows, dtype=torch.float64).scatter_(1, order, arange)
    norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + 2 * epsilon * norm).to(torch.float32).view(tau.shape)


def rescale_ref(
    tau: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor, mode: str, keep_prob=None
) -> torch.Tensor:
    """Rescale the sparsified ``kept = mask·τ``.

    ``inverse_density``: divide by the keep probability (the DARE paper), as a multiplication by
    its reciprocal (in the compute dtype) for a scalar probability, a division for DELLA's
    per-element ones. Only the kept entries are scaled: a density so small that its reciprocal
    overflows (below about 2.9e-39 in float32) makes kept entries ±inf (kept zeros NaN) and
    leaves the dropped ones 0, as the kernels do. ``l1``: multiply by ``‖τ‖₁ / ‖kept‖₁``
    (mergekit since its PR #245), the norms summed in float64 and the ratio rounded once to the
    compute dtype; left unscaled when nothing was kept; a factor that is not finite in the
    compute dtype (NaN or ±inf anywhere in τ, kept or dropped, or a ratio beyond its range) is
    NaN, and so is every element. ``none``: as is.
    """
    if mode == "none":
        return kept
    if mode == "inverse_density":
        if isinstance(keep_prob, torch.Tensor):
            return kept / keep_prob
        if keep_prob <= 0:  # density 0 keeps nothing: nothing to rescale (as the kernels do)
            return kept
        zero = torch.zeros((), dtype=kept.dtype, device=kept.device)
        return torch.where(mask, kept * (1.0 / keep_prob), zero)
    if mode == "l1":
        kept_norm = torch.sum(kept.abs(), dtype=torch.float64)
        if kept_norm == 0:
            return kept
        factor = (torch.sum(tau.abs(), dtype=torch.float64) / kept_norm).to(kept.dtype)
        if not torch.isfinite(factor):
            factor = torch.full_like(factor, math.nan)
        return kept * factor
    raise ValueError(f"rescale must be one of {RESCALES}, got {mode!r}")


# ---- consensus -------------------------------------------------------------------------------


def signed_parts_ref(weighted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_t max(W_t, 0), Σ_t min(W_t, 0))`` over ``weighted [N, *S]``, summed in model order.

    Every sum over models is taken as its positive part plus its negative part, which is how the
    kernels accumulate (one pass, O(1) state per element); the reference sums the same way so
    that discrete choices (the elected sign) agree exactly.
    """
    pos = torch.zeros_like(weighted[0])
    neg = torch.zeros_like(weighted[0])
    for w in weighted:
        pos = pos + w.clamp(min=0)
        neg = neg + w.clamp(max=0)
    return pos, neg


def elect_sign_ref(weighted: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Elected sign per entry from the N weighted sparse task vectors ``weighted [N, *S]``.

    ``sum`` (TIES "mass"): sign of Σ_t W_t; ``count``: sign of Σ_t sgn(W_t). A vote of 0 gives +1.
    """
    if method == "sum":
        pos, neg = signed_parts_ref(weighted)
        vote = pos + neg
    elif method == "count":
        vote = weighted.sign().sum(0)
    else:
        raise ValueError(f"consensus must be one of {CONSENSUS[1:]}, got {method!r}")
    return torch.where(vote >= 0, 1.0, -1.0).to(weighted.dtype)


# ---- the generalized routine -----------------------------------------------------------------


def generalized_merge_ref(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    sparsify: str = "none",
    consensus: str = "none",
    normalize: bool = False,
    rescale: str = "none",
    lam: float = 1.0,
    tie: str = "keep_ties",
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    seed: int = 0,
    tensor_index: int = 0,
    thresholds: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic, one tensor position.

    For each model t: τ_t = θ_t − θ₀; τ̂_t = rescale(mask_t ⊙ τ_t) with the ``sparsify`` mask at
    density d_t; W_t = w_t·τ̂_t (weights before election, so they sway the vote). Then

    - ``consensus="none"``: Δ = Σ_t W_t, divided by Σ_t w_t when ``normalize``;
    - ``consensus="sum"|"count"``: s = elected sign, m_t = [sgn(W_t) = s] (zeros never agree),
      Δ = Σ_t m_t W_t, divided by Σ_t m_t w_t (0 → 1) when ``normalize``.

    Result θ₀ + λ·Δ in ``out_dtype`` (default: the base's dtype). Random masks (DARE, DELLA) of
    model t at tensor position i draw from the counter-based stream :func:`stream_of` ``(i, N, t)``
    of ``seed``.

    Parameters
    ----------
    base : Tensor
        θ₀, shape ``S``.
    tensors : sequence of Tensor
        The N fine-tuned θ_t, shape ``S``.
    sparsify : {"none", "magnitude", "random", "breadcrumbs", "della"}
        Which mask: TIES trimming, DARE, Model Breadcrumbs, DELLA's MagPrune.
    thresholds : sequence of float, optional
        With ``magnitude``: keep ``|τ_t| ≥ thresholds[t]`` instead of selecting per tensor (the
        thresholds of a global, whole-model selection), at any density (1 included; the
        density still sets ``inverse_density``'s factor); ``-inf`` keeps everything, NaN too.
    rescale : {"none", "inverse_density", "l1"}
        See :func:`rescale_ref`; ignored with ``sparsify="none"`` (no mask, nothing dropped).
    """
    n = len(tensors)
    dt = _compute_dtype(base)
    theta0 = base.to(dt)
    densities = list(densities) if densities is not None else [1.0] * n
    w = torch.tensor([float(x) for x in weights], dtype=dt, device=base.device)
    w_view = w.view(-1, *([1] * base.dim()))
    sparse = []
    for t, theta in enumerate(tensors):
        tau = theta.to(dt) - theta0
        d = float(densities[t])
        keep_prob = d
        if sparsify == "magnitude" and thresholds is not None:
            # Given thresholds decide whatever the density; -inf keeps everything, NaN included.
            thr = float(thresholds[t])
            mask = torch.ones_like(tau, dtype=torch.bool) if thr == -math.inf else tau.abs() >= thr
        elif sparsify == "none" or (d >= 1.0 and sparsify in ("magnitude", "random")):
            mask = torch.ones_like(tau, dtype=torch.bool)
            keep_prob = 1.0
        elif sparsify == "magnitude":
            mask = magnitude_mask_ref(tau, d, tie)
        elif sparsify == "random":
            mask = random_mask_ref(tau, d, seed, stream_of(tensor_index, n, t))
        elif sparsify == "breadcrumbs":
            mask = breadcrumbs_mask_ref(tau, d, float(gammas[t]))
        elif sparsify == "della" and d >= 1.0:  # mergekit's short-circuit: τ unchanged
            mask = torch.ones_like(tau, dtype=torch.bool)
            keep_prob = 1.0
        elif sparsify == "della" and d <= 0.0:  # and: τ dropped (no rescaling of nothing)
            mask = torch.zeros_like(tau, dtype=torch.bool)
            keep_prob = 1.0
        elif sparsify == "della":
            keep_prob = della_keep_prob_ref(tau, d, float(epsilons[t])).to(dt)
            mask = bernoulli_mask_ref(
                tau.shape, keep_prob, seed, stream_of(tensor_index, n, t), device=tau.device
            )
        else:
            raise ValueError(f"unknown sparsify {sparsify!r}")
        kept = torch.where(mask, tau, torch.zeros((), dtype=dt, device=tau.device))
        # Without a mask there is nothing to rescale (the methods declare rescale inert there).
        sparse.append(
            rescale_ref(tau, kept, mask, rescale if sparsify != "none" else "none", keep_prob)
        )
    weighted = torch.stack(sparse) * w_view
    pos, neg = signed_parts_ref(weighted)
    if consensus == "none":
        delta = pos + neg
        if normalize:
            total = w[0]
            for x in w[1:]:
                total = total + x  # in model order, as the kernels add
            delta = delta / (total if total != 0 else 1.0)
    else:
        positive = elect_sign_ref(weighted, consensus) > 0
        # The agreeing entries are the positive ones where +1 won, the negative ones elsewhere.
        delta = torch.where(positive, pos, neg)
        if normalize:
            # Σ of the agreeing models' weights, in model order.
            w_pos = torch.zeros_like(pos)
            w_neg = torch.zeros_like(neg)
            for wt, wi in zip(weighted, w, strict=True):
                w_pos = w_pos + (wt > 0) * wi
                w_neg = w_neg + (wt < 0) * wi
            divisor = torch.where(positive, w_pos, w_neg)
            delta = delta / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (theta0 + lam * delta).to(out_dtype or base.dtype)


def linear_ref(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted average Σ w_t θ_t / Σ w_t (model soups; mergekit ``linear``, no base)."""
    dt = _compute_dtype(tensors[0])
    acc = sum(float(w) * t.to(dt) for t, w in zip(tensors, weights, strict=True))
    if normalize:
        acc = acc / sum(float(w) for w in weights)
    return acc.to(out_dtype or tensors[0].dtype)


def model_stock_ref(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    filter_wise: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Model Stock (Jang et al., arXiv:2403.19522), as mergekit computes it.

    θ = t·mean_i θ_i + (1 − t)·θ₀ with t = N·cos / (1 + (N − 1)·cos), cos the mean over pairs
    i < j of ⟨τ_i, τ_j⟩ / max(‖τ_i‖·‖τ_j‖, 1e-6) clamped to [−1, 1] (mergekit clamps the product
    of the norms, not each norm); t = 0 (the base) where |1 + (N − 1)·cos| < 1e-6. Per tensor,
    or with ``filter_wise`` per vector along the last dimension (a 1-D tensor is one vector).
    The norms and inner products are summed in float64 in a fixed order (:func:`_fixed_sum`),
    so the result does not depend on torch's thread count (mergekit's float32 sums do).
    """
    n = len(tensors)
    if n < 2:
        raise ValueError("model_stock needs at least 2 fine-tuned models besides the base")
    dt = _compute_dtype(base)
    theta0 = base.to(dt)
    taus = [t.to(dt) - theta0 for t in tensors]
    rows = filter_wise and base.dim() >= 1  # one cosine per vector along the last dimension
    flat = [x.reshape(-1, x.shape[-1]) if rows else x.reshape(1, -1) for x in taus]
    cos_sum = torch.zeros(flat[0].shape[0], dtype=torch.float64, device=base.device)
    norms = [_fixed_sum(x * x).sqrt() for x in flat]
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            norm_product = norms[i] * norms[j]
            dot = _fixed_sum(flat[i] * flat[j])
            cos_sum += (dot / norm_product.clamp_min(1e-6)).clamp(-1, 1)
            pairs += 1
    cos = cos_sum / pairs
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, (n * cos) / torch.where(singular, 1.0, denominator)).to(dt)
    t = t.view(*base.shape[:-1], 1) if rows else t.view(())
    mean = sum(x.to(dt) for x in tensors) / n
    return (t * mean + (1 - t) * theta0).to(out_dtype or base.dtype)


def slerp_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), as mergekit's ``slerp``.

    The angle comes from the normalised tensors (a norm ≤ eps leaves a tensor unnormalised); when
    ``|cos| > dot_threshold`` the tensors are nearly colinear and it falls back to linear
    interpolation. The result combines the unnormalised tensors:
    ``sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b``. The norms and the inner product are summed in
    float64 in a fixed order (:func:`_fixed_sum`): the result does not depend on torch's thread
    count.
    """
    dt = _compute_dtype(a)
    v0, v1 = a.to(dt), b.to(dt)
    flat0, flat1 = v0.reshape(1, -1), v1.reshape(1, -1)
    n0, n1 = (_fixed_sum(x * x).sqrt()[0].to(dt) for x in (flat0, flat1))
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = _fixed_sum(u0.reshape(1, -1) * u1.reshape(1, -1))[0].to(dt)
    if dot.abs() > dot_threshold:
        res = (1 - t) * v0 + t * v1
    else:
        omega = torch.arccos(dot)
        sin_omega = torch.sin(omega)
        res = torch.sin((1 - t) * omega) / sin_omega * v0 + torch.sin(t * omega) / sin_omega * v1
    return res.to(out_dtype or a.dtype)
