"""Whole-model magnitude thresholds, streamed: the original TIES paper trims each task vector
over all of the model's parameters at once, not tensor by tensor.

Two streaming passes over the checkpoints, never holding more than one tensor per model, and no
list of candidates (a bf16 or sparse task vector can put most of its elements in one tie group):

1. a histogram of the high 16 bits of every ``|θ_t − θ₀|`` (as float32 bits, whose order is the
   magnitudes' order), per model, from which the bin holding the k-th largest is known;
2. a histogram of the low 16 bits of the magnitudes in that bin, from which the exact k-th
   largest follows: its high and low 16 bits.

The result is exactly :func:`meldkit.ops.merge_ref.magnitude_threshold_ref` over the concatenation
of all tensors (the k-th largest value), which is what ``merge_tensors(..., thresholds=...)``
takes. CPU tensors of float32, bfloat16 and float16 use the native histogram kernel
(``_C.magnitude_histogram``, one pass over θ and θ₀, equal digits in a row counted in a
register); others PyTorch's ``bincount``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

_BINS = 1 << 16  # one 16-bit digit of the float32 bits (NaN's high digit is below 2**16 too)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _add_histogram(hist: torch.Tensor, theta: torch.Tensor, base: torch.Tensor, prefix: int) -> int:
    """Adds the histogram of one digit of ``|θ − θ₀|`` to ``hist`` (``prefix`` −1: the high
    digit of every element; else the low digit of those whose high digit is ``prefix``);
    returns the NaN count."""
    from meldkit import _native

    if base.dtype == theta.dtype and not _native.unavailable("merge", theta.device, (theta.dtype,)):
        if theta.device.type == "cpu" and theta.dtype in _NATIVE_DTYPES:
            return _native._C.magnitude_histogram(
                theta.contiguous(), base.contiguous(), hist, prefix
            )
    bits = (theta.float() - base.float()).abs().flatten().view(torch.int32)
    nans = int((bits > 0x7F800000).sum())
    high = bits >> 16
    digits = high if prefix < 0 else (bits[high == prefix] & 0xFFFF)
    hist += torch.bincount(digits.to(torch.int64), minlength=_BINS)[:_BINS].cpu()
    return nans


def _pick(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The digit holding the k-th largest (bins scanned from the top) and its rank there."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # count of bins >= d
    digit = int(torch.nonzero(above >= k).max())
    above_digit = int(above[digit + 1]) if digit + 1 < _BINS else 0
    return digit, k - above_digit


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
        base = load_base(name)
        for t, m in enumerate(load_models(name)):
            if _add_histogram(hist[t], m, base, -1):
                raise ValueError(f"{name}: the task vector of model {t} contains NaN")
        total += base.numel()
        if progress:
            progress(1)
    ks = [int(total * float(d)) for d in densities]
    # The high digit holding the k-th largest, and the rank of the k-th largest within it.
    targets = [None if k <= 0 or k >= total else _pick(hist[t], k) for t, k in enumerate(ks)]
    low = torch.zeros(n, _BINS, dtype=torch.int64)
    if any(tgt is not None for tgt in targets):
        for name in names:
            base = load_base(name)
            for t, m in enumerate(load_models(name)):
                if targets[t] is not None:
                    _add_histogram(low[t], m, base, targets[t][0])
            if progress:
                progress(1)
    out = []
    for t, k in enumerate(ks):
        if targets[t] is None:
            out.append(math.inf if k <= 0 else -math.inf)
            continue
        high, rank = targets[t]
        digit, _ = _pick(low[t], rank)
        bits = torch.tensor([(high << 16) | digit], dtype=torch.int32)
        out.append(float(bits.view(torch.float32)))
    return out
