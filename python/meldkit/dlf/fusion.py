"""One fusion step: the large, small-base and expert logits of a batch row → fused logits.

``dynamic`` solves the paper's per-step problem with :func:`meldkit.ops.logit_fusion`; ``static`` is
the fixed-α form of proxy-tuning / EFT; ``contrastive`` is contrastive decoding (Li et al., ACL
2023) between the large model (the expert) and the small one (the amateur).
"""

from __future__ import annotations

import math

import torch

from meldkit.ops.logit_fusion import _check_peaks, _peaks

MODES = ("dynamic", "static", "contrastive")
# Contrastive decoding's defaults (Li et al. 2023): the plausibility cut α and the amateur's
# temperature.
PLAUSIBILITY = 0.1
AMATEUR_TEMPERATURE = 1.0


def check_mode(
    mode: str, alpha: float, alphas, ranges=None, plausibility=None, amateur_temperature=None
) -> None:
    """Validate the fusion arguments of :func:`meldkit.dlf.generate` and the processor."""
    if mode not in MODES:
        raise ValueError(f"dlf: mode must be one of {MODES}, got {mode!r}")
    if mode != "dynamic" and alphas is not None:
        raise ValueError(
            f"dlf: alphas (the search grid) is for mode='dynamic', not {mode!r} (static uses alpha)"
        )
    if mode != "dynamic" and ranges is not None:
        raise ValueError("dlf: ranges (per-expert search ranges) is for mode='dynamic'")
    if mode != "contrastive" and (plausibility is not None or amateur_temperature is not None):
        raise ValueError(
            "dlf: plausibility and amateur_temperature are for mode='contrastive' (contrastive "
            "decoding)"
        )
    if plausibility is not None and (
        isinstance(plausibility, bool)
        or not isinstance(plausibility, (int, float))
        or not 0.0 < plausibility <= 1.0
    ):
        raise ValueError(f"dlf: plausibility must be in (0, 1], got {plausibility!r}")
    if amateur_temperature is not None and (
        isinstance(amateur_temperature, bool)
        or not isinstance(amateur_temperature, (int, float))
        or not 0.0 < amateur_temperature < math.inf
    ):
        raise ValueError(
            f"dlf: amateur_temperature must be a finite number > 0, got {amateur_temperature!r}"
        )
    # bool is an int subclass: alpha=True would silently mean 1.0.
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"dlf: alpha must be a finite number, got {alpha!r}")
    if abs(alpha) > torch.finfo(torch.float32).max:
        raise ValueError(f"dlf: alpha {alpha!r} is beyond float32's range (the fusion runs in it)")


def check_ranges(ranges, n_experts: int, alphas: list[float] | None) -> list | None:
    """``ranges`` validated against the experts and the grid before any model runs (the errors
    :func:`meldkit.ops.logit_fusion` would raise at the first step), as T ``(lo, hi)`` pairs."""
    if ranges is None:
        return None
    from meldkit.ops.logit_fusion import _range_list
    from meldkit.ops.logit_fusion_ref import DEFAULT_ALPHAS

    grid = list(DEFAULT_ALPHAS) if alphas is None else alphas
    flat = _range_list(ranges, n_experts, grid, torch.float32)
    return list(zip(flat[0::2], flat[1::2], strict=True))


def fuse_logits(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    *,
    mode: str = "dynamic",
    alpha: float = 1.0,
    alphas: list[float] | None = None,
    ranges: list | None = None,
    plausibility: float | None = None,
    amateur_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuse one decoding step's logits.

    Parameters
    ----------
    large : torch.Tensor
        ``[B, V]`` raw logits M_L of the large model.
    small_base : torch.Tensor
        ``[B, V]`` raw logits M_S of the small base model.
    experts : torch.Tensor or None
        ``[T, B, V]`` raw logits M_t of the small experts (None, or T = 0, in ``contrastive``
        mode, which uses none).
    mode : {"dynamic", "static", "contrastive"}
        ``dynamic``: per row, the expert t and α on the grid that minimise the DLF objective
        (:func:`meldkit.ops.logit_fusion`), fused logits M_L + α·(M_t − M_S).
        ``static``: M_L + alpha·Σ_t (M_t − M_S) with the fixed ``alpha`` (proxy-tuning for T = 1,
        DExperts-style sum of expert deltas for T > 1).
        ``contrastive``: contrastive decoding (Li et al., ACL 2023) with the large model as the
        expert and the small base as the amateur: log softmax(M_L) − log softmax(M_S/τ) on the
        plausible tokens, those with p_L ≥ ``plausibility``·max p_L, and −inf elsewhere.
    alpha : float
        The fixed α of ``static`` mode.
    alphas : sequence of float, optional
        The α search grid of ``dynamic`` mode (default 0.0, 0.1, …, 2.0).
    ranges : sequence of (lo, hi), optional
        Per-expert parts of the grid that ``dynamic`` mode searches
        (:func:`meldkit.ops.logit_fusion`'s ``ranges``).
    plausibility, amateur_temperature : float, optional
        ``contrastive`` mode's α (default 0.1) and amateur temperature τ (default 1.0).

    Returns
    -------
    logits : torch.Tensor
        ``[B, V]`` fused logits, float32 (float64 when every input is float64, as the solver
        then searches in float64); −inf wherever any input logit is −inf.
    alpha : torch.Tensor
        ``[B]`` in the logits' dtype, the α used per row.
    expert : torch.Tensor
        ``[B]`` int64, the expert used per row (static mode: 0 for T = 1, −1 = all for T > 1;
        contrastive mode: −1, and α is 1).

    Raises
    ------
    ValueError
        In both modes, when an input holds NaN or +inf (−inf marks a masked token), naming it.
    """
    # float32, or float64 when every model's logits are (the solver then runs in float64 too).
    dtypes = {large.dtype, small_base.dtype} | ({experts.dtype} if experts is not None else set())
    acc = torch.float64 if dtypes == {torch.float64} else torch.float32
    large, small_base = large.to(acc), small_base.to(acc)
    rows = large.shape[0]
    if mode == "contrastive":
        experts = large.new_empty(0, *large.shape)
        _check_peaks(_peaks(large, small_base, experts))
        fused = contrastive_logits(
            large,
            small_base,
            PLAUSIBILITY if plausibility is None else plausibility,
            AMATEUR_TEMPERATURE if amateur_temperature is None else amateur_temperature,
        )
        a = torch.ones(rows, dtype=acc, device=large.device)
        e = torch.full((rows,), -1, dtype=torch.long, device=large.device)
        return fused, a, e
    experts = experts.to(acc)
    if mode == "dynamic":
        from meldkit import ops

        res = ops.logit_fusion(
            large, small_base, experts, alphas, return_logits=True, ranges=ranges
        )
        return res.logits, res.alpha, res.expert
    # As the dynamic solver: NaN or +inf logits are refused, naming the model (one check of
    # each input's peak; a NaN would otherwise decode as token 0 every step).
    _check_peaks(_peaks(large, small_base, experts))
    delta = (experts - small_base).sum(0)
    fused = large + alpha * delta
    masked = large.isneginf() | small_base.isneginf() | experts.isneginf().any(0)
    fused = fused.masked_fill(masked, float("-inf"))
    a = torch.full((rows,), float(alpha), dtype=acc, device=large.device)
    which = 0 if experts.shape[0] == 1 else -1
    e = torch.full((rows,), which, dtype=torch.long, device=large.device)
    return fused, a, e


def contrastive_logits(
    expert: torch.Tensor, amateur: torch.Tensor, plausibility: float, amateur_temperature: float
) -> torch.Tensor:
    """Contrastive decoding's scores (Li et al., "Contrastive Decoding: Open-ended Text Generation
    as Optimization", ACL 2023): ``log p_EXP − log p_AMA`` with p_AMA = softmax(M_AMA/τ), on the
    plausible tokens V_head = {v : p_EXP(v) ≥ α·max p_EXP} and −inf elsewhere.

    Parameters
    ----------
    expert, amateur : torch.Tensor
        ``[B, V]`` raw logits of the expert (large) and the amateur (small) model; −inf marks a
        masked token (−inf in the result).
    plausibility : float
        α ∈ (0, 1]; the paper's 0.1. 1 keeps only the expert's most likely tokens.
    amateur_temperature : float
        τ > 0 (the paper's runs use 0.5 for GPT-2 amateurs, 1.0 for OPT-125m).

    Returns
    -------
    torch.Tensor
        ``[B, V]`` scores, float32 (float64 when both inputs are), their argmax the greedy
        CD token.
    """
    acc = torch.float64 if expert.dtype == amateur.dtype == torch.float64 else torch.float32
    masked = expert.isneginf() | amateur.isneginf()
    log_exp = expert.to(acc).masked_fill(masked, float("-inf")).log_softmax(-1)
    log_ama = (amateur.to(acc) / amateur_temperature).masked_fill(masked, float("-inf"))
    log_ama = log_ama.log_softmax(-1)
    cut = log_exp.amax(-1, keepdim=True) + math.log(plausibility)
    keep = ~masked & (log_exp >= cut)
    return torch.where(keep, log_exp - log_ama.masked_fill(~keep, 0.0), float("-inf"))


def fusion_diagnostics(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor | None,
    fused: torch.Tensor,
) -> torch.Tensor:
    """What the DLF objective compares, per row, for logits already fused (any mode).

    With P = softmax(M_L), P̃ = softmax(``fused``), Q = softmax(M_S) and Q_t = softmax(M_t), over
    the positions where no input is −inf::

        [KL(P̃‖P), KL(P‖P̃), mean_t KL(Q_t‖Q), mean_t KL(Q‖Q_t)]

    The first two are how far the step moved the large model, the last two the targets the
    dynamic solver matches them to (its loss is the squared distance of the pairs). Use it to
    see why the solver picked an α: a step whose targets are near 0 (the experts agree with the
    small base there) gets α near 0.

    Parameters
    ----------
    large, small_base : torch.Tensor
        ``[B, V]`` raw logits M_L and M_S.
    experts : torch.Tensor or None
        ``[T, B, V]`` raw expert logits M_t (None or T = 0: the targets are NaN).
    fused : torch.Tensor
        ``[B, V]`` fused logits (−inf where masked).

    Returns
    -------
    torch.Tensor
        ``[B, 4]`` float32, computed in float64 from the softmaxes.
    """
    from meldkit.ops.logit_fusion_ref import _log_softmax, kl_ref

    if experts is None:
        experts = large.new_empty(0, *large.shape)
    keep = ~(large.isneginf() | small_base.isneginf() | fused.isneginf())
    if experts.shape[0]:
        keep &= ~experts.isneginf().any(0)

    def log_softmax(z: torch.Tensor) -> torch.Tensor:
        return _log_softmax(z.double(), keep)

    log_p, log_fused, log_q = log_softmax(large), log_softmax(fused), log_softmax(small_base)
    rows = keep.any(-1)
    out = [kl_ref(log_fused, log_p, keep), kl_ref(log_p, log_fused, keep)]
    if experts.shape[0]:
        log_qt = [log_softmax(z) for z in experts]
        out.append(torch.stack([kl_ref(lq, log_q, keep) for lq in log_qt]).mean(0))
        out.append(torch.stack([kl_ref(log_q, lq, keep) for lq in log_qt]).mean(0))
    else:
        out += [torch.full_like(out[0], float("nan"))] * 2
    res = torch.stack(out, -1)
    return torch.where(rows[:, None], res, 0.0).float()
