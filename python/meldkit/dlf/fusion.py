"""One fusion step: the large, small-base and expert logits of a batch row → fused logits.

``dynamic`` solves the paper's per-step problem with :func:`meldkit.ops.logit_fusion`; ``static`` is
the fixed-α form of proxy-tuning / EFT.
"""

from __future__ import annotations

import math

import torch

from meldkit.ops.logit_fusion import _check_peaks, _peaks

MODES = ("dynamic", "static")


def check_mode(mode: str, alpha: float, alphas, ranges=None) -> None:
    """Validate the fusion arguments of :func:`meldkit.dlf.generate` and the processor."""
    if mode not in MODES:
        raise ValueError(f"dlf: mode must be one of {MODES}, got {mode!r}")
    if mode == "static" and alphas is not None:
        raise ValueError("dlf: alphas (the search grid) is for mode='dynamic'; static uses alpha")
    if mode == "static" and ranges is not None:
        raise ValueError("dlf: ranges (per-expert search ranges) is for mode='dynamic'")
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuse one decoding step's logits.

    Parameters
    ----------
    large : torch.Tensor
        ``[B, V]`` raw logits M_L of the large model.
    small_base : torch.Tensor
        ``[B, V]`` raw logits M_S of the small base model.
    experts : torch.Tensor
        ``[T, B, V]`` raw logits M_t of the small experts.
    mode : {"dynamic", "static"}
        ``dynamic``: per row, the expert t and α on the grid that minimise the DLF objective
        (:func:`meldkit.ops.logit_fusion`), fused logits M_L + α·(M_t − M_S).
        ``static``: M_L + alpha·Σ_t (M_t − M_S) with the fixed ``alpha`` (proxy-tuning for T = 1,
        DExperts-style sum of expert deltas for T > 1).
    alpha : float
        The fixed α of ``static`` mode.
    alphas : sequence of float, optional
        The α search grid of ``dynamic`` mode (default 0.0, 0.1, …, 2.0).
    ranges : sequence of (lo, hi), optional
        Per-expert parts of the grid that ``dynamic`` mode searches
        (:func:`meldkit.ops.logit_fusion`'s ``ranges``).

    Returns
    -------
    logits : torch.Tensor
        ``[B, V]`` float32 fused logits; −inf wherever any input logit is −inf.
    alpha : torch.Tensor
        ``[B]`` float32, the α used per row.
    expert : torch.Tensor
        ``[B]`` int64, the expert used per row (static mode: 0 for T = 1, −1 = all for T > 1).

    Raises
    ------
    ValueError
        In both modes, when an input holds NaN or +inf (−inf marks a masked token), naming it.
    """
    large, small_base, experts = large.float(), small_base.float(), experts.float()
    rows = large.shape[0]
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
    a = torch.full((rows,), float(alpha), dtype=torch.float32, device=large.device)
    which = 0 if experts.shape[0] == 1 else -1
    e = torch.full((rows,), which, dtype=torch.long, device=large.device)
    return fused, a, e
