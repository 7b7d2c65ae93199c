"""The reference of ``logit_fusion``: Dynamic Logit Fusion (weak-to-strong), per row, in plain
PyTorch.

Dynamic Logit Fusion (DLF; Fan, Lu, Wei, Tian, Qu, Chen, Cheng, "On Giant's Shoulders: Effortless
Weak to Strong by Dynamic Logits Fusion", NeurIPS 2024, arXiv 2406.15480) steers a large base model
with small fine-tuned experts at every decoding step: it adds the experts' shift of the raw logits,
scaled by an α chosen per step so that the large model moves as far, in both KL directions, as the
small model moved under fine-tuning. Everything the paper leaves open (the multi-task
reduction, per-expert ranges, ties, masking, precision) is decided below.

Notation, per row b (one decoding step of one sequence), over the vocabulary positions v that are
not masked (below); α_j is the j-th grid point rounded to the accumulation dtype::

    M_L = large[b], M_S = small_base[b], M_t = experts[t, b]       raw logits          [V]
    P = softmax(M_L),  Q = softmax(M_S),  Q_t = softmax(M_t)
    d_t = M_t − M_S                                                 expert t's shift    [V]
    P̃_{t,j} = softmax(M_L + α_j·d_t)                                candidate (t, α_j)
    A = mean_t KL(Q_t‖Q),  B = mean_t KL(Q‖Q_t)                     the two targets
    loss[b, t, j] = (KL(P̃_{t,j}‖P) − A)² + (KL(P‖P̃_{t,j}) − B)²
    KL(p‖q) = Σ_v p_v (log p_v − log q_v),  with 0·log 0 = 0

For T = 1 this is the paper's single-task objective (Eq. 3). For T > 1 it is the paper's
multi-task objective Σ_t [(KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²] restricted, as the
paper's own search is, to one active expert per step; the sum over t equals T times the loss
above plus a constant, so only the two mean targets matter (derived here, not stated in the
paper).

Per-expert ranges (optional; the paper searches "within a certain range" per expert without giving
the ranges): expert t's candidates are the grid points with lo_t ≤ α_j ≤ hi_t, both sides rounded
to the accumulation dtype as the grid is. A candidate outside its expert's range has loss +inf and
is never selected.

Selection: per row the candidate with the smallest loss (as stored, in the accumulation dtype);
among exactly equal losses the one with the smaller α value, then the one with the lower expert
index. The paper scans its ascending grid and keeps the first strict minimum, which is the same
rule on that grid; here the rule does not depend on the order in which the grid is given.
Output::

    alpha[b] = α_{j*},  expert[b] = t*,  logits[b] = M_L + α_{j*}·(M_{t*} − M_S)

Masking: position v of row b is masked when any of the T + 2 inputs is −inf there. A masked
position has probability 0 in every distribution (it is left out of every softmax and every KL)
and fused logit −inf; no −inf ever becomes NaN. A row with every position masked gets
``alpha = 0``, ``expert = 0``, ``loss = 0`` (+inf for a candidate outside its expert's range,
as on every row) and logits all −inf. (With one unmasked position every distribution is a
point mass, every loss is 0 and the tie rule picks the smallest α.)

Precision: the grid is rounded to the accumulation dtype (float32, or float64 for float64
inputs), as the native kernels receive it, so the default 0.1 is float32(0.1); every other
quantity is computed here in float64; loss, alpha and logits are returned in the accumulation
dtype, logits rounded once from float64.

Two formulations of the loss, which agree to float64 rounding:

* :func:`logit_fusion_loss_ref`: the objective straight from the softmaxes, candidate by
  candidate (the readable spec; slow on purpose).
* :func:`logit_fusion_loss_cgf_ref`: the log-partition (cumulant generating function)
  identities below, which the native kernels evaluate in one streaming pass over V.
  With K_t(α) = log Σ_v exp(M_L + α·d_t) (so K_t(0) = LSE(M_L))::

      KL(P̃_{t,α}‖P) = α·K_t′(α) − (K_t(α) − K_t(0)),      K_t′(α) = E_{P̃_{t,α}}[d_t]
      KL(P‖P̃_{t,α}) = (K_t(α) − K_t(0)) − α·K_t′(0),      K_t′(0) = E_P[d_t]
      KL(Q_t‖Q) = E_{Q_t}[d_t] − (LSE(M_t) − LSE(M_S))
      KL(Q‖Q_t) = −E_Q[d_t] + (LSE(M_t) − LSE(M_S))

Entry points: :func:`logit_fusion_ref` and :func:`logit_fusion_cgf_ref` (the public signature of
``meldkit.ops.logit_fusion``), and :func:`logit_fusion_forward_ref` (the custom op's calling
convention, which ``meldkit.ops.logit_fusion`` runs when no native kernel can).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

# The paper's grid, 0.0:0.1:2.0 (21 points); round() makes each the double nearest its decimal.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(i * 0.1, 10) for i in range(21))


class LogitFusionResult(NamedTuple):
    """What :func:`meldkit.ops.logit_fusion` returns (shapes for B rows, vocabulary V, T experts,
    n grid points; "acc" is float32, or float64 for float64 inputs).

    Attributes
    ----------
    alpha : Tensor
        ``[B]`` acc: the chosen α of each row (a grid point rounded to acc; 0 for a fully
        masked row).
    expert : Tensor
        ``[B]`` int64: the chosen expert t* of each row.
    logits : Tensor or None
        ``[B, V]`` acc: the fused logits ``M_L + α·(M_{t*} − M_S)``, −inf at masked positions;
        None when ``return_logits=False``.
    loss : Tensor
        ``[B, T, n]`` acc: the objective of every candidate, grid points in the order given.
    """

    alpha: torch.Tensor
    expert: torch.Tensor
    logits: torch.Tensor | None
    loss: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the dtype of alpha, loss and logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def alpha_grid(alphas: Sequence[float], dtype: torch.dtype, device=None) -> torch.Tensor:
    """The grid ``[n]`` rounded to the accumulation dtype of inputs of ``dtype``."""
    return torch.tensor([float(a) for a in alphas], dtype=accumulation_dtype(dtype), device=device)


def allowed_ref(
    alphas: Sequence[float], ranges: Sequence[Sequence[float]] | None, n_experts: int, dtype
) -> torch.Tensor:
    """``[T, n]`` bool: whether candidate (t, α_j) is searched, ``lo_t ≤ α_j ≤ hi_t`` compared in
    the accumulation dtype of inputs of ``dtype`` (all True without ``ranges``)."""
    grid = alpha_grid(alphas, dtype)
    if ranges is None:
        return torch.ones(n_experts, len(grid), dtype=torch.bool)
    bounds = torch.tensor([[float(lo), float(hi)] for lo, hi in ranges], dtype=grid.dtype)
    return (bounds[:, :1] <= grid) & (grid <= bounds[:, 1:])


def vocab_keep_ref(
    large: torch.Tensor, small_base: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """``[B, V]`` bool: True where no input is −inf (the positions every softmax and KL uses)."""
    keep = (large != float("-inf")) & (small_base != float("-inf"))
    return keep & (experts != float("-inf")).all(0)


def _float64_inputs(large, small_base, experts, keep):
    """The inputs in float64 with 0 at masked positions (so differences never meet −inf − −inf)."""
    return tuple(torch.where(keep, z.to(torch.float64), 0.0) for z in (large, small_base, experts))


def _log_softmax(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log softmax over the kept positions; −inf elsewhere (NaN on a row with none kept)."""
    return torch.where(keep, z, float("-inf")).log_softmax(-1)


def kl_ref(log_p: torch.Tensor, log_q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``KL(p‖q) = Σ_v p_v (log p_v − log q_v)`` over the kept positions, per row ``[...]``.

    0·log 0 = 0: a probability that underflows to 0 contributes nothing; a row with no kept
    position has KL 0.
    """
    return torch.where(keep, log_p.exp() * (log_p - log_q), 0.0).sum(-1)


# ---- the two formulations of the loss -----------------------------------------------------------


def logit_fusion_loss_ref(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    alphas: Sequence[float],
) -> torch.Tensor:
    """The objective of every candidate, straight from the softmaxes (the readable spec).

    Parameters
    ----------
    large, small_base : Tensor
        M_L and M_S ``[B, V]``, one floating dtype.
    experts : Tensor
        M_t ``[T, B, V]``, same dtype.
    alphas : sequence of float
        The grid (n ≥ 1 points), rounded to the accumulation dtype of the inputs' dtype.

    Returns
    -------
    Tensor
        ``loss`` ``[B, T, n]`` float64, ``(KL(P̃_{t,j}‖P) − A)² + (KL(P‖P̃_{t,j}) − B)²``
        (module docstring); 0 on rows with every position masked.
    """
    keep = vocab_keep_ref(large, small_base, experts)
    z_large, z_small, z_experts = _float64_inputs(large, small_base, experts, keep)
    grid = alpha_grid(alphas, large.dtype).tolist()
    log_p = _log_softmax(z_large, keep)
    log_q = _log_softmax(z_small, keep)
    log_q_experts = [_log_softmax(z, keep) for z in z_experts]
    target_fwd = torch.stack([kl_ref(lq, log_q, keep) for lq in log_q_experts]).mean(0)  # A [B]
    target_rev = torch.stack([kl_ref(log_q, lq, keep) for lq in log_q_experts]).mean(0)  # B [B]

    n_rows = large.shape[0]
    loss = torch.zeros(
        n_rows, len(log_q_experts), len(grid), dtype=torch.float64, device=large.device
    )
    for t, z_expert in enumerate(z_experts):
        shift = z_expert - z_small  # d_t
        for j, alpha in enumerate(grid):
            log_fused = _log_softmax(z_large + alpha * shift, keep)  # log P̃_{t,j}
            kl_fwd = kl_ref(log_fused, log_p, keep)
            kl_rev = kl_ref(log_p, log_fused, keep)
            loss[:, t, j] = (kl_fwd - target_fwd) ** 2 + (kl_rev - target_rev) ** 2
    return loss


def logit_fusion_loss_cgf_ref(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    alphas: Sequence[float],
) -> torch.Tensor:
    """The objective of every candidate from the log-partition identities (module docstring).

    The quantities a streaming kernel accumulates per row: the log-sum-exps of M_L, M_S and each
    M_t; the expectations E_{Q_t}[d_t], E_Q[d_t] and E_P[d_t]; and, per candidate, K_t(α_j) and
    K_t′(α_j). Same arguments and result as :func:`logit_fusion_loss_ref`.
    """
    keep = vocab_keep_ref(large, small_base, experts)
    z_large, z_small, z_experts = _float64_inputs(large, small_base, experts, keep)
    grid = alpha_grid(alphas, large.dtype).to(device=large.device, dtype=torch.float64)
    rows = keep.any(-1)

    def lse(z):
        return torch.where(keep, z, float("-inf")).logsumexp(-1)

    def expect(z, values):  # E_{softmax(z)}[values], over the kept positions
        return (torch.where(keep, z, float("-inf")).softmax(-1) * values).sum(-1)

    lse_large, lse_small = lse(z_large), lse(z_small)
    fwd_targets, rev_targets, losses = [], [], []
    for z_expert in z_experts:
        shift = z_expert - z_small  # d_t
        lse_gap = lse(z_expert) - lse_small
        fwd_targets.append(expect(z_expert, shift) - lse_gap)  # KL(Q_t‖Q)
        rev_targets.append(-expect(z_small, shift) + lse_gap)  # KL(Q‖Q_t)
    target_fwd = torch.stack(fwd_targets).mean(0)  # A [B]
    target_rev = torch.stack(rev_targets).mean(0)  # B [B]
    for z_expert in z_experts:
        shift = z_expert - z_small
        slope0 = expect(z_large, shift)  # K_t′(0) = E_P[d_t]  [B]
        fused = z_large + grid[:, None, None] * shift  # [n, B, V]
        k_alpha = lse(fused) - lse_large  # K_t(α) − K_t(0)  [n, B]
        slope = expect(fused, shift)  # K_t′(α)  [n, B]
        kl_fwd = grid[:, None] * slope - k_alpha
        kl_rev = k_alpha - grid[:, None] * slope0
        losses.append(((kl_fwd - target_fwd) ** 2 + (kl_rev - target_rev) ** 2).T)  # [B, n]
    loss = torch.stack(losses, 1)  # [B, T, n]
    return torch.where(rows[:, None, None], loss, 0.0)


# ---- selection and fused logits -----------------------------------------------------------------


def select_ref(
    loss: torch.Tensor, grid: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen candidate of each row: ``(alpha [B], expert [B] int64)``.

    Parameters
    ----------
    loss : Tensor
        ``[B, T, n]``, as returned (accumulation dtype).
    grid : Tensor
        ``[n]``, the grid in the accumulation dtype.
    rows : Tensor
        ``[B]`` bool, False for the rows with every position masked (alpha 0, expert 0).

    The smallest loss; among exactly equal losses the smaller α value (equal α values: the
    earlier grid point), then the lower expert index.
    """
    index, expert = select_index_ref(loss, grid)
    return torch.where(rows, grid[index], 0.0), torch.where(rows, expert, 0)


def select_index_ref(loss: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tie rule's argmin of ``loss`` ``[B, T, n]`` as ``(grid index [B], expert [B])``, both
    int64: the smallest loss, then the smaller α value of ``grid`` ``[n]`` (equal α values: the
    earlier grid point), then the lower expert index (fully masked rows are not special here)."""
    n_rows, n_experts, n_alphas = loss.shape
    order = torch.sort(grid, stable=True).indices  # ascending α
    # Candidate k = (α index order[k // T], expert k % T): the order of the tie rule.
    flat = loss[:, :, order].transpose(1, 2).reshape(n_rows, n_alphas * n_experts)
    best = flat.amin(-1, keepdim=True)
    rank = torch.arange(n_alphas * n_experts, device=loss.device)
    k = torch.where(flat == best, rank, n_alphas * n_experts).amin(-1)
    return order[k // n_experts], k % n_experts


def fused_logits_ref(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    alpha: torch.Tensor,
    expert: torch.Tensor,
) -> torch.Tensor:
    """``M_L + α·(M_{t*} − M_S)`` ``[B, V]`` in float64, −inf at masked positions.

    ``alpha`` ``[B]`` and ``expert`` ``[B]`` are the chosen candidates.
    """
    keep = vocab_keep_ref(large, small_base, experts)
    z_large, z_small, z_experts = _float64_inputs(large, small_base, experts, keep)
    z_chosen = z_experts[expert, torch.arange(large.shape[0], device=large.device)]
    fused = z_large + alpha.to(torch.float64)[:, None] * (z_chosen - z_small)
    return torch.where(keep, fused, float("-inf"))


# ---- entry points -------------------------------------------------------------------------------


LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[float]], torch.Tensor]


def logit_fusion_forward_ref(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    alphas: Sequence[float],
    return_logits: bool,
    loss_function: LossFunction = logit_fusion_loss_ref,
    ranges: Sequence[Sequence[float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's calling convention: ``(alpha, expert, logits, loss)``.

    Arguments as :func:`logit_fusion_ref` (already valid: ``experts`` one ``[T, B, V]`` tensor,
    ``alphas`` a non-empty list, ``ranges`` None or T pairs each holding a grid point). Returns
    ``alpha [B]``, ``expert [B]``, ``logits [B, V]`` and ``loss [B, T, n]`` as in
    :class:`LogitFusionResult`; ``logits`` is an empty ``[0]`` tensor when ``return_logits`` is
    False (custom ops cannot return None). ``loss_function`` computes the float64 loss
    (:func:`logit_fusion_loss_ref` or :func:`logit_fusion_loss_cgf_ref`).
    """
    acc = accumulation_dtype(large.dtype)
    with torch.no_grad():
        loss = loss_function(large, small_base, experts, alphas).to(acc)
        if ranges is not None:
            allowed = allowed_ref(alphas, ranges, experts.shape[0], large.dtype)
            loss = loss.masked_fill(~allowed.to(loss.device), float("inf"))
        grid = alpha_grid(alphas, large.dtype, large.device)
        rows = vocab_keep_ref(large, small_base, experts).any(-1)
        alpha, expert = select_ref(loss, grid, rows)
        if return_logits:
            logits = fused_logits_ref(large, small_base, experts, alpha, expert).to(acc)
        else:
            logits = loss.new_empty(0)
    return alpha, expert, logits, loss


def _as_inputs(experts, alphas):
    if not isinstance(experts, torch.Tensor):
        experts = torch.stack(list(experts))
    if alphas is None:
        alphas = DEFAULT_ALPHAS
    elif isinstance(alphas, torch.Tensor):
        alphas = alphas.tolist()
    return experts, [float(a) for a in alphas]


def logit_fusion_ref(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor | Sequence[torch.Tensor],
    alphas: Sequence[float] | torch.Tensor | None = None,
    *,
    return_logits: bool = True,
    ranges: Sequence[Sequence[float]] | None = None,
) -> LogitFusionResult:
    """Dynamic Logit Fusion by grid search, directly from the softmaxes (the spec).

    Same arguments and result as :func:`meldkit.ops.logit_fusion` (formulas in the module
    docstring), without its argument checks. Not differentiable.

    Parameters
    ----------
    large, small_base : Tensor
        M_L and M_S ``[B, V]``.
    experts : Tensor or sequence of Tensor
        M_t ``[T, B, V]``, or T tensors ``[B, V]``.
    alphas : sequence of float or 1-D Tensor, optional
        The grid; default :data:`DEFAULT_ALPHAS` (0.0, 0.1, …, 2.0).
    return_logits : bool
        Whether to compute the fused logits.
    ranges : sequence of (lo, hi), optional
        Per expert, the part of the grid searched (module docstring).

    Returns
    -------
    LogitFusionResult
        ``(alpha [B], expert [B] int64, logits [B, V] or None, loss [B, T, n])``, floats in the
        accumulation dtype.
    """
    experts, alphas = _as_inputs(experts, alphas)
    alpha, expert, logits, loss = logit_fusion_forward_ref(
        large, small_base, experts, alphas, return_logits, ranges=ranges
    )
    return LogitFusionResult(alpha, expert, logits if return_logits else None, loss)


def logit_fusion_cgf_ref(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor | Sequence[torch.Tensor],
    alphas: Sequence[float] | torch.Tensor | None = None,
    *,
    return_logits: bool = True,
    ranges: Sequence[Sequence[float]] | None = None,
) -> LogitFusionResult:
    """:func:`logit_fusion_ref` with the loss from the log-partition identities (module
    docstring).

    What the native kernels compute, in float64; agrees with :func:`logit_fusion_ref` to float64
    rounding (the selection may differ only between candidates whose losses are within it).
    """
    experts, alphas = _as_inputs(experts, alphas)
    alpha, expert, logits, loss = logit_fusion_forward_ref(
        large, small_base, experts, alphas, return_logits, logit_fusion_loss_cgf_ref, ranges
    )
    return LogitFusionResult(alpha, expert, logits if return_logits else None, loss)
