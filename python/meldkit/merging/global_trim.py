"""Whole-model magnitude thresholds, streamed: the original TIES paper trims each task vector
over all of the model's parameters at once, not tensor by tensor.

Two streaming passes over the checkpoints, never holding more than one tensor per model:

1. a histogram of the high 16 bits of every ``|θ_t − θ₀|`` (as float32 bits, whose order is the
   magnitudes' order), per model, from which the bin holding the k-th largest is known;
2. the magnitudes that fall in that bin (usually a tiny fraction), from which the exact k-th
   largest is selected.

The result is exactly :func:`meldkit.ops.merge_ref.magnitude_threshold_ref` over the concatenation
of all tensors (the same tie rule), which is what ``merge_tensors(..., thresholds=...)`` takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

_BINS = 1 << 15  # non-negative float32: the sign bit is 0, so the high 16 bits are < 2**15


def _high_bits(tau_abs: torch.Tensor) -> torch.Tensor:
    return (tau_abs.contiguous().view(torch.int32) >> 16).to(torch.int64)


def global_thresholds(
    names: Sequence[str],
    load_base: Callable[[str], torch.Tensor],
    load_models: Callable[[str], list[torch.Tensor]],
    densities: Sequence[float],
    *,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Per-model thresholds that keep the top ``densities[t]`` of ``|θ_t − θ₀|`` over all tensors.

    Parameters
    ----------
    names : sequence of str
        The floating-point tensors taking part.
    load_base, load_models : callable
        ``name -> θ₀`` and ``name -> [θ_1 .. θ_N]`` (loaded lazily, one name at a time).
    densities : sequence of float
        Kept fraction per model.
    progress : callable, optional
        Called with 1 after each tensor of each pass.

    Returns
    -------
    list of float
        ``+inf`` for a model that keeps nothing, ``-inf`` for one that keeps everything.

    Raises
    ------
    ValueError
        If a task vector contains NaN.
    """
    n = len(densities)
    hist = torch.zeros(n, _BINS, dtype=torch.int64)
    total = 0
    for name in names:
        base = load_base(name).float()
        for t, m in enumerate(load_models(name)):
            tau = (m.float() - base).abs().flatten()
            if torch.isnan(tau).any():
                raise ValueError(f"{name}: the task vector of model {t} contains NaN")
            hist[t] += torch.bincount(_high_bits(tau), minlength=_BINS)[:_BINS]
        total += base.numel()
        if progress:
            progress(1)
    ks = [int(total * float(d)) for d in densities]
    # The bin holding the k-th largest, and the rank of the k-th largest within it.
    targets: list[tuple[int, int] | None] = []
    for t, k in enumerate(ks):
        if k <= 0 or k >= total:
            targets.append(None)
            continue
        above = torch.flip(torch.cumsum(torch.flip(hist[t], [0]), 0), [0])  # count of bins >= d
        digit = int(torch.nonzero(above >= k).max())
        above_digit = int(above[digit + 1]) if digit + 1 < _BINS else 0
        targets.append((digit, k - above_digit))
    candidates: list[list[torch.Tensor]] = [[] for _ in range(n)]
    if any(tgt is not None for tgt in targets):
        for name in names:
            base = load_base(name).float()
            for t, m in enumerate(load_models(name)):
                if targets[t] is None:
                    continue
                tau = (m.float() - base).abs().flatten()
                candidates[t].append(tau[_high_bits(tau) == targets[t][0]])
            if progress:
                progress(1)
    out = []
    for t, k in enumerate(ks):
        if targets[t] is None:
            out.append(math.inf if k <= 0 else -math.inf)
            continue
        values = torch.cat(candidates[t])
        rank = targets[t][1]  # the rank-th largest among the candidates
        out.append(float(values.kthvalue(values.numel() - rank + 1).values))
    return out
