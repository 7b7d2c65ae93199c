"""``logit_fusion``: Dynamic Logit Fusion (weak-to-strong), the per-step α and expert search.

One torch.library custom op::

    meldkit::logit_fusion(Tensor large, Tensor small_base, Tensor experts, float[] alphas,
                          bool return_logits, float[]? ranges) -> (Tensor alpha, Tensor expert,
                                                                   Tensor logits, Tensor loss)

``ranges`` is None or the T per-expert ranges flattened, ``[lo_0, hi_0, lo_1, hi_1, ...]``.

Its default implementation (any device) is :func:`logit_fusion_forward_ref` (float64, straight
from the softmaxes); the CPU and CUDA implementations call ``meldkit._C.logit_fusion`` and fall
back to the reference, with a warning naming the reason, when the native kernel cannot run (see
:mod:`meldkit._native`). The native calling convention::

    _C.logit_fusion(large, small_base, experts, alphas, loss, alpha, expert, logits, stream,
                    allowed)

with ``large``, ``small_base`` ``[B, V]`` and ``experts`` ``[T, B, V]`` contiguous, of one dtype;
``alphas`` a list of n ≥ 1 Python floats (the binding copies them, rounded to the accumulation
dtype); outputs written: ``loss`` ``[B, T, n]`` and ``alpha`` ``[B]`` in the accumulation dtype
(float32, or float64 for float64 inputs), ``expert`` ``[B]`` int64, ``logits`` ``[B, V]`` in the
accumulation dtype or None (not written); ``allowed`` None (every candidate) or T ints, bit j of
the t-th set when candidate (t, alphas[j]) is searched (the others get loss +inf). The op never
calls it with B = 0.

Custom ops cannot return None: ``logits`` is an empty ``[0]`` tensor when ``return_logits`` is
False. There is no autograd formula (the selection is piecewise constant); the public wrapper
detaches its inputs. A fake kernel makes the op traceable by ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from meldkit import _native
from meldkit.ops import _checks
from meldkit.ops._library import custom_op
from meldkit.ops.logit_fusion_ref import (
    DEFAULT_ALPHAS,
    LogitFusionResult,
    accumulation_dtype,
    allowed_ref,
    alpha_grid,
    logit_fusion_forward_ref,
    select_index_ref,
)

_OP = "logit_fusion"

# The native kernel's limits per call (its per-row accumulators are fixed arrays; see
# bindings/logit_fusion.cpp). Larger grids run as chunks of MAX_ALPHAS points; more experts are
# refused on every path (the loss's targets are means over all experts: no chunking).
MAX_ALPHAS = 64
MAX_EXPERTS = 16


def _use_reference(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> bool:
    """True when the native kernel cannot run (after warning why, once)."""
    reasons = _native.unavailable(_OP, device, dtypes)
    if reasons:
        _native.warn_fallback(_OP, device, dtypes, reasons)
    return bool(reasons)


# ---- the op --------------------------------------------------------------------------------


def _pairs(ranges: list[float] | None) -> list[tuple[float, float]] | None:
    """The op's flat ``[lo_0, hi_0, lo_1, hi_1, ...]`` as T pairs."""
    return None if ranges is None else list(zip(ranges[0::2], ranges[1::2], strict=True))


def _masks(allowed: torch.Tensor | None, j0: int = 0, j1: int | None = None) -> list[int] | None:
    """The native kernel's bit masks of grid points ``[j0, j1)`` (bit j - j0 of mask t: candidate
    (t, j) is searched) from ``allowed`` ``[T, n]`` bool; None for no restriction."""
    if allowed is None:
        return None
    return [sum(1 << k for k, on in enumerate(row[j0:j1].tolist()) if on) for row in allowed]


@custom_op(
    "meldkit::logit_fusion",
    schema="(Tensor large, Tensor small_base, Tensor experts, float[] alphas, bool return_logits,"
    " float[]? ranges) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _logit_fusion(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    alphas: list[float],
    return_logits: bool,
    ranges: list[float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return logit_fusion_forward_ref(
        large, small_base, experts, alphas, return_logits, ranges=_pairs(ranges)
    )


@_logit_fusion.register_kernel(["cpu", "cuda"])
def _logit_fusion_native(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    alphas: list[float],
    return_logits: bool,
    ranges: list[float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = _pairs(ranges)
    if _use_reference(large.device, (large.dtype,)):
        return logit_fusion_forward_ref(
            large, small_base, experts, alphas, return_logits, ranges=pairs
        )
    allowed = None
    if pairs is not None:
        allowed = allowed_ref(alphas, pairs, experts.shape[0], large.dtype)
    if len(alphas) > MAX_ALPHAS:
        return _native_chunks(large, small_base, experts, alphas, return_logits, allowed)
    return _native_call(large, small_base, experts, alphas, return_logits, _masks(allowed))


def _native_call(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    alphas: list[float],
    return_logits: bool,
    masks: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One native call: T ≤ ``MAX_EXPERTS``, n ≤ ``MAX_ALPHAS`` (the binding checks); ``masks``
    the candidates searched (:func:`_masks`)."""
    acc = accumulation_dtype(large.dtype)
    n_rows, vocab = large.shape
    device = large.device
    loss = torch.empty(n_rows, experts.shape[0], len(alphas), dtype=acc, device=device)
    alpha = torch.empty(n_rows, dtype=acc, device=device)
    expert = torch.empty(n_rows, dtype=torch.int64, device=device)
    logits = torch.empty(n_rows, vocab, dtype=acc, device=device) if return_logits else None
    if n_rows:
        _native._C.logit_fusion(
            large.detach().contiguous(),
            small_base.detach().contiguous(),
            experts.detach().contiguous(),
            [float(a) for a in alphas],
            loss,
            alpha,
            expert,
            logits,
            _native.stream_of(device),
            masks,
        )
    return alpha, expert, (loss.new_empty(0) if logits is None else logits), loss


def _native_chunks(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    alphas: list[float],
    return_logits: bool,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A grid of more than ``MAX_ALPHAS`` points: one native call per chunk of the grid, each
    a pass over the inputs (a candidate's loss does not depend on the other grid points). The
    loss is the chunks' side by side; each row takes α, expert and logits from the chunk that
    holds the tie rule's argmin of the whole loss (that chunk's own argmin, by the same rule).

    Experts cannot be chunked this way: the loss's targets are means over all T experts.
    """
    chunks = [
        _native_call(
            large,
            small_base,
            experts,
            alphas[j : j + MAX_ALPHAS],
            return_logits,
            _masks(allowed, j, j + MAX_ALPHAS),
        )
        for j in range(0, len(alphas), MAX_ALPHAS)
    ]
    loss = torch.cat([out[3] for out in chunks], dim=2)
    # NaN losses (the unchecked op fed NaN) must not break the selection.
    grid = alpha_grid(alphas, large.dtype, large.device)
    index, _ = select_index_ref(torch.nan_to_num(loss, nan=math.inf), grid)
    chunk = index // MAX_ALPHAS  # [B]
    alpha, expert, logits, _ = chunks[0]
    for c, (a, e, z, _) in enumerate(chunks[1:], start=1):
        here = chunk == c
        alpha = torch.where(here, a, alpha)
        expert = torch.where(here, e, expert)
        if return_logits:
            logits = torch.where(here[:, None], z, logits)
    return alpha, expert, logits, loss


@_logit_fusion.register_fake
def _logit_fusion_fake(large, small_base, experts, alphas, return_logits, ranges):
    acc = accumulation_dtype(large.dtype)
    n_rows, vocab = large.shape
    alpha = large.new_empty(n_rows, dtype=acc)
    expert = large.new_empty(n_rows, dtype=torch.int64)
    logits = large.new_empty((n_rows, vocab) if return_logits else (0,), dtype=acc)
    loss = large.new_empty(n_rows, experts.shape[0], len(alphas), dtype=acc)
    return alpha, expert, logits, loss


# ---- public API ----------------------------------------------------------------------------


def _error(exc: type[Exception], name: str, message: str) -> Exception:
    return exc(f"meldkit.{_OP}: argument '{name}': {message}")


def _check_logits(name: str, t: object, like: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``t`` as a floating tensor of ``dim`` dimensions, with the dtype and device of ``like``."""
    _checks.float_tensor(_OP, name, t, dim)
    if like is not None:
        if t.dtype != like.dtype:
            raise _error(TypeError, name, f"dtype {t.dtype} differs from 'large' ({like.dtype})")
        if t.device != like.device:
            raise _error(TypeError, name, f"is on {t.device} but 'large' is on {like.device}")
    return t


def _experts_tensor(experts: object, large: torch.Tensor) -> torch.Tensor:
    """``experts`` as one ``[T, B, V]`` tensor (a sequence of ``[B, V]`` tensors is stacked)."""
    if isinstance(experts, torch.Tensor):
        if experts.dim() == 2:
            raise _error(
                ValueError,
                "experts",
                f"expected [T, B, V], got shape {list(experts.shape)} (for one expert pass "
                "experts[None] or a list)",
            )
        experts = _check_logits("experts", experts, large, 3)
    elif isinstance(experts, Sequence) and not isinstance(experts, str):
        if not experts:
            raise _error(ValueError, "experts", "is empty (T ≥ 1 experts are needed)")
        for i, t in enumerate(experts):
            _check_logits(f"experts[{i}]", t, large, 2)
            if t.shape != large.shape:
                raise _error(
                    ValueError,
                    f"experts[{i}]",
                    f"shape {list(t.shape)} does not match 'large' {list(large.shape)}",
                )
        experts = torch.stack([t.detach() for t in experts])
    else:
        raise _error(
            TypeError,
            "experts",
            "expected a [T, B, V] tensor or a list of [B, V] tensors, "
            f"got {type(experts).__name__}",
        )
    if experts.shape[0] < 1:
        raise _error(ValueError, "experts", "has T = 0 experts (T ≥ 1 are needed)")
    if experts.shape[0] > MAX_EXPERTS:
        raise _error(
            ValueError,
            "experts",
            f"has T = {experts.shape[0]} experts; at most {MAX_EXPERTS} are supported (the "
            "native kernel's limit, applied on every path)",
        )
    if experts.shape[1:] != large.shape:
        raise _error(
            ValueError,
            "experts",
            f"shape {list(experts.shape)} does not match [T, B, V] = [T, {large.shape[0]}, "
            f"{large.shape[1]}] (B and V from 'large')",
        )
    return experts


def _alpha_list(alphas: object) -> list[float]:
    """``alphas`` as a non-empty list of finite floats (a 1-D tensor is copied to the host)."""
    if alphas is None:
        return list(DEFAULT_ALPHAS)
    if isinstance(alphas, torch.Tensor):
        if alphas.dim() != 1:
            raise _error(
                ValueError, "alphas", f"expected a 1-D tensor, got shape {list(alphas.shape)}"
            )
        if alphas.dtype == torch.bool or alphas.is_complex():
            raise _error(TypeError, "alphas", f"dtype {alphas.dtype} is not a real dtype")
        alphas = alphas.detach().cpu().tolist()
    elif isinstance(alphas, np.ndarray):
        if alphas.ndim != 1:
            raise _error(
                ValueError, "alphas", f"expected a 1-D array, got shape {list(alphas.shape)}"
            )
        if alphas.dtype.kind not in "iuf":
            raise _error(TypeError, "alphas", f"dtype {alphas.dtype} is not a real dtype")
        alphas = alphas.tolist()
    if not isinstance(alphas, Sequence) or isinstance(alphas, str):
        raise _error(
            TypeError,
            "alphas",
            f"expected a sequence of floats, a 1-D tensor or a 1-D NumPy array, got "
            f"{type(alphas).__name__}",
        )
    if not alphas:
        raise _error(ValueError, "alphas", "is empty (the grid needs at least one point)")
    out = []
    for i, a in enumerate(alphas):
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise _error(TypeError, f"alphas[{i}]", f"expected a float, got {type(a).__name__}")
        a = float(a)
        if not math.isfinite(a) or abs(a) > torch.finfo(torch.float32).max:
            raise _error(ValueError, f"alphas[{i}]", f"must be finite, got {a}")
        out.append(a)
    return out


def _range_list(
    ranges: object, n_experts: int, alphas: list[float], dtype: torch.dtype
) -> list[float] | None:
    """``ranges`` (None, one ``(lo, hi)`` for every expert, T pairs, or a ``[T, 2]`` tensor) as
    the op's flat ``[lo_0, hi_0, ...]``; each range must hold a grid point."""
    if ranges is None:
        return None
    if not isinstance(ranges, torch.Tensor) and hasattr(ranges, "__array__"):
        ranges = torch.as_tensor(ranges)  # a NumPy array
    if isinstance(ranges, torch.Tensor):
        if ranges.dim() == 1 and ranges.shape[0] == 2:
            ranges = ranges[None].expand(n_experts, 2)  # one (lo, hi) for every expert
        if ranges.dim() != 2 or ranges.shape[1] != 2:
            raise _error(
                ValueError, "ranges", f"expected a [T, 2] tensor, got shape {list(ranges.shape)}"
            )
        if ranges.dtype == torch.bool or ranges.is_complex():
            raise _error(TypeError, "ranges", f"dtype {ranges.dtype} is not a real dtype")
        ranges = ranges.detach().cpu().tolist()
    if not isinstance(ranges, Sequence) or isinstance(ranges, str):
        raise _error(
            TypeError,
            "ranges",
            f"expected (lo, hi) or T such pairs, got {type(ranges).__name__}",
        )
    if len(ranges) == 2 and all(isinstance(x, numbers.Real) for x in ranges):
        ranges = [tuple(ranges)] * n_experts  # one range for every expert
    if len(ranges) != n_experts:
        raise _error(ValueError, "ranges", f"has {len(ranges)} ranges for T = {n_experts} experts")
    grid = alpha_grid(alphas, dtype)
    flat = []
    for t, pair in enumerate(ranges):
        name = f"ranges[{t}]"
        if (
            not isinstance(pair, Sequence)
            or isinstance(pair, str)
            or len(pair) != 2
            or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in pair)
        ):
            raise _error(TypeError, name, f"expected a pair of floats (lo, hi), got {pair!r}")
        lo, hi = float(pair[0]), float(pair[1])
        if lo != lo or hi != hi or lo > hi:
            raise _error(ValueError, name, f"expected lo <= hi (no NaN), got ({lo}, {hi})")
        flat += [lo, hi]
    allowed = allowed_ref(alphas, _pairs(flat), n_experts, dtype)
    for t in range(n_experts):
        if not bool(allowed[t].any()):
            raise _error(
                ValueError,
                f"ranges[{t}]",
                f"({flat[2 * t]}, {flat[2 * t + 1]}) holds no point of the grid "
                f"[{float(grid.min())}, {float(grid.max())}] (n = {len(alphas)})",
            )
    return flat


def _peaks(large: torch.Tensor, small_base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The largest logit of each input, ``[2 + T]`` on the inputs' device (no synchronisation):
    NaN propagates through a max, so a peak that is NaN or +inf flags its input."""
    return torch.cat([large.amax().view(1), small_base.amax().view(1), experts.amax(dim=(1, 2))])


def _check_peaks(peaks: torch.Tensor) -> None:
    """Raise on a NaN or +inf peak (``_peaks``), naming the input: one host synchronisation."""
    values = peaks.tolist()
    names = ["large", "small_base", *(f"experts[{t}]" for t in range(len(values) - 2))]
    for what, bad in (("contains NaN", math.isnan), ("contains +inf", lambda v: v == math.inf)):
        for name, v in zip(names, values, strict=True):
            if bad(v):
                raise _error(ValueError, name, f"{what} (only −inf logits are allowed: masked)")


def logit_fusion(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor | Sequence[torch.Tensor],
    alphas: Sequence[float] | torch.Tensor | None = None,
    *,
    return_logits: bool = True,
    ranges: Sequence[Sequence[float]] | Sequence[float] | torch.Tensor | None = None,
) -> LogitFusionResult:
    """Dynamic Logit Fusion: per row, the expert and α that make the large model move like the
    small one, and the fused logits.

    Fan et al., "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits Fusion"
    (NeurIPS 2024, arXiv 2406.15480), one decoding step. For each row b, with the raw logits
    M_L = ``large[b]``, M_S = ``small_base[b]``, M_t = ``experts[t, b]``, P = softmax(M_L),
    Q = softmax(M_S), Q_t = softmax(M_t), and each candidate (expert t, grid point α_j)::

        P̃_{t,j}       = softmax(M_L + α_j·(M_t − M_S))
        loss[b, t, j] = (KL(P̃_{t,j}‖P) − mean_t KL(Q_t‖Q))² + (KL(P‖P̃_{t,j}) − mean_t KL(Q‖Q_t))²
        (α*, t*)      = the candidate with the smallest loss
        logits[b]     = M_L + α*·(M_{t*} − M_S)

    For T = 1 this is the paper's single-task objective (Eq. 3); for T > 1 its multi-task
    objective with one active expert per step, the paper's own search (the sum over experts
    reduces exactly to the two mean targets). Logits are fused raw: no log-softmax, no
    temperature (apply sampling settings afterwards).

    Parameters
    ----------
    large : Tensor
        M_L ``[B, V]``, the large base model's logits: float32, bfloat16, float16 or float64.
        V ≥ 1; B = 0 gives empty results.
    small_base : Tensor
        M_S ``[B, V]``, the small base model's logits; same dtype and device as ``large``.
    experts : Tensor or sequence of Tensor
        M_t ``[T, B, V]`` (1 ≤ T ≤ ``MAX_EXPERTS`` = 16), the small fine-tuned experts' logits,
        or a sequence of T ``[B, V]`` tensors (stacked, one copy); same dtype and device.
    alphas : sequence of float, 1-D Tensor or 1-D NumPy array, optional
        The grid of α, n ≥ 1 finite values, in any order, duplicates and negative values
        allowed. Default: the paper's 0.0, 0.1, …, 2.0 (21 points). Each value is rounded to
        the accumulation dtype (so 0.1 is float32(0.1) for non-float64 inputs). A CUDA tensor
        here costs a device synchronisation. Any n works; see *Sizes*.
    return_logits : bool
        Whether to compute the fused logits (False: ``logits`` is None and not computed).
    ranges : sequence of (lo, hi), one (lo, hi), or a ``[T, 2]`` or ``[2]`` tensor, optional
        Per-expert search ranges: expert t's candidates are the grid points with
        ``lo_t ≤ α ≤ hi_t`` (both sides rounded to the accumulation dtype, as the grid is; ±inf
        allowed). One pair applies to every expert; NumPy arrays are taken as tensors. The
        paper searches each expert "within a certain range" without publishing the ranges; use
        them to keep a weak or noisy expert's α small. A candidate outside its range has loss
        +inf and is never chosen; each range must hold at least one grid point. Default: the
        whole grid for every expert.

    Returns
    -------
    LogitFusionResult
        A named tuple; "acc" is float32, or float64 when the inputs are float64.

        * ``alpha`` ``[B]`` acc: α* (a grid point; 0 for a fully masked row).
        * ``expert`` ``[B]`` int64: t*.
        * ``logits`` ``[B, V]`` acc or None: ``M_L + α*·(M_{t*} − M_S)``, −inf at masked
          positions.
        * ``loss`` ``[B, T, n]`` acc: the objective of every candidate, grid in the order given
          (+inf outside the expert's range).

    Raises
    ------
    TypeError, ValueError
        On a bad argument, naming it: not a tensor, unsupported or mismatched dtype, another
        device, wrong number of dimensions or mismatched B, V, T = 0 or T > 16, V = 0, an empty
        grid, a non-finite or non-real grid value, a malformed range or one that holds no grid
        point; ValueError when an input contains NaN or +inf.

    Notes
    -----
    *Ties.* ``(alpha, expert)`` is the argmin of the returned ``loss``; among exactly equal
    losses the smaller α value wins (equal α: the earlier grid point), then the lower expert
    index. This is the paper's rule (it scans its ascending grid and keeps the first strict
    minimum) made independent of the order of the grid. A row whose experts all equal the
    small base has loss 0 for every candidate, hence gets the smallest α of the grid (0 for the
    default grid): plain large-model decoding.

    *Masking.* A position where any of the T + 2 inputs is −inf (vocabulary padding,
    constrained decoding) is left out of every softmax and KL (probability 0 everywhere) and
    its fused logit is −inf; −inf never produces NaN. A row with every position masked gets
    α = 0, expert 0 (even when ``ranges`` leave that candidate out), loss 0 for every candidate
    inside its expert's range (+inf outside, as on every row) and logits all −inf. Only −inf
    masks: a finite stand-in such as −1e9 or ``torch.finfo(dtype).min`` (what some processors
    and attention code write) is a logit like any other, whose difference to the other models
    enters every KL term (a single one can move α, and ``finfo.min`` overflows the losses to
    inf); write −inf to mask.

    *Checks.* NaN and +inf in the inputs are refused; finding them costs one pass over the
    inputs and one host synchronisation per call (so the call graph-breaks under
    ``torch.compile``; the custom op ``torch.ops.meldkit.logit_fusion`` itself does not check
    and traces). Very large finite logits whose fusion overflows are not guarded.

    *Precision.* The native kernels make one streaming pass over V with the log-partition
    identities of the reference (``logit_fusion_loss_cgf_ref`` in
    :mod:`meldkit.ops.logit_fusion_ref`), accumulating in float32 (float64 for float64
    inputs): candidates whose losses differ by less than that rounding may be chosen either
    way. The reference (used when no native kernel can run) computes in float64. On the CPU,
    a grid with a uniform step h (the default) costs few exponentials: within each block of
    256 tokens, the candidate α + h is the candidate α times exp(h·d), for up to 10 grid points
    after each directly computed one while the exponent moves by at most 16 (blocks whose
    logit shifts d are larger take fewer or none); the rounding stays within the same bound.

    *Sizes.* One native call handles at most ``MAX_ALPHAS`` = 64 grid points and
    ``MAX_EXPERTS`` = 16 experts. A larger grid (a finer 0, 0.01, …, 2.0 has 201 points) runs
    as ⌈n/64⌉ native calls, each one more pass over the inputs, with the results one call
    would give (losses, tie rule, masking). More than 16 experts are refused on every path,
    the reference's included, so that a call does not depend on the build: the targets are
    means over all experts, so the experts cannot be split into calls.

    *Autograd.* None: the outputs do not require grad; inputs that require grad are detached.
    """
    large = _check_logits("large", large, None, 2)
    if large.shape[1] == 0:
        raise _error(ValueError, "large", f"shape {list(large.shape)}: V = 0 (V ≥ 1 is needed)")
    large = large.detach()
    small_base = _check_logits("small_base", small_base, large, 2).detach()
    if small_base.shape != large.shape:
        raise _error(
            ValueError,
            "small_base",
            f"shape {list(small_base.shape)} does not match 'large' {list(large.shape)}",
        )
    experts = _experts_tensor(experts, large).detach()
    alphas = _alpha_list(alphas)
    flat_ranges = _range_list(ranges, experts.shape[0], alphas, large.dtype)
    if not isinstance(return_logits, bool):
        raise _error(
            TypeError, "return_logits", f"expected a bool, got {type(return_logits).__name__}"
        )
    # The peaks are reduced before the kernel runs, read after it is launched: on a GPU the
    # one synchronisation then waits for work already queued, instead of holding the launch
    # back. The kernels tolerate NaN and +inf (the unchecked custom op feeds them as given);
    # such results are never returned.
    peaks = _peaks(large, small_base, experts) if large.shape[0] else None
    args = (large, small_base, experts, alphas, return_logits, flat_ranges)
    try:
        alpha, expert, logits, loss = _native.call(
            _logit_fusion, _logit_fusion_native, "meldkit::logit_fusion", large.device, args
        )
    except Exception:
        # The reference (MELDKIT_BACKEND=reference, or a dtype without a kernel) is not made
        # for NaN or +inf and may fail on them: such inputs get their own named error.
        if peaks is not None:
            _check_peaks(peaks)
        raise
    if peaks is not None:
        _check_peaks(peaks)
    return LogitFusionResult(alpha, expert, logits if return_logits else None, loss)
