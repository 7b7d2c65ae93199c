"""The merge family's public ops: exact magnitude thresholds and the fused task-vector merge.

``meldkit::merge_tensors`` is a torch.library custom op whose default implementation is the
reference (:func:`meldkit.ops.merge_ref.generalized_merge_ref` and friends). Its CPU and CUDA
implementations run the native pipeline for the sparsifiers the kernels implement (none,
magnitude with ``tie="keep_ties"``, random): radix-select thresholds → L1 norms when rescaling by
L1 → one fused pass that masks, weighs, elects signs and merges. Breadcrumbs (without
rescaling, its definition) selects its two boundary magnitudes exactly, resolves ties at them by
index (one native pass on the CPU), and merges the masked models without masks. DELLA (rescale
``l1`` or none, on the CPU) ranks each row by a native radix sort, draws its masks natively and
merges the masked models with each model's L1 factor. TIES with ``tie="exact_k"`` (mergekit's
rule; without L1 rescaling) adds, on the CPU, one counting pass that finds per model the index at
which the ties at the threshold stop being kept (the fused pass keeps ties only before it), and
on CUDA masks each model by one selection and a running count of its ties, then merges the masked
models without masks. DELLA elsewhere and ``exact_k`` with L1 rescaling run the reference (with a
one-time warning naming the reason), as does any merge of more than 32 models (the kernels take the
models' pointers in a fixed-size array); ``linear`` runs on :func:`meldkit.ops.weighted_sum`;
``model_stock`` and ``slerp`` are a few reductions in PyTorch.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from meldkit import _native
from meldkit.merging.methods import METHODS, get_method
from meldkit.ops import _checks
from meldkit.ops import merge_ref as ref
from meldkit.ops._library import custom_op

_OP = "merge"
_NATIVE_SPARSIFY = ("none", "magnitude", "random")
_MAX_MODELS_PER_CALL = 32  # meldkit._C.MERGE_MAX_MODELS


def magnitude_threshold(
    tensors: Sequence[torch.Tensor],
    density: float,
    base: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> float:
    """The magnitude that keeps the top ``density`` fraction of ``|tensors − base|``, exactly.

    The k-th largest magnitude over all elements of all ``tensors`` (k = ``int(numel·density)``),
    the value ``torch.kthvalue(|τ|, numel − k + 1)`` gives, found without sorting: keep
    ``|τ| ≥ threshold``. On the CPU, inputs of 2^20 elements or more take one counting pass
    inside a bracket given by a strided sample of one magnitude in 1024 (4096 to 65536 of
    them; a sample that misses falls back to the radix path), smaller ones two radix-histogram
    passes, and up to 16384 elements a selection among their bits in one buffer; CUDA uses
    three radix-histogram passes. A list of many tensors gives the global (whole-model)
    threshold of the TIES paper; one tensor, mergekit's per-tensor one.

    Parameters
    ----------
    tensors : Tensor or sequence of Tensor
        Fine-tuned tensors θ (or task vectors τ when ``base`` is None), any shapes, one dtype
        (float32, bfloat16, float16) and device; one tensor alone is a list of one.
    density : float
        Fraction kept, in [0, 1].
    base : Tensor or sequence of Tensor, optional
        θ₀ for each tensor (same shapes): the magnitudes are ``|θ − θ₀|`` computed in float32,
        without materialising the task vectors.

    Returns
    -------
    float
        ``+inf`` when nothing is kept (k = 0), ``-inf`` when everything is (k = numel).

    Raises
    ------
    ValueError
        If the task vectors contain NaN, or ``density`` is outside [0, 1].
    """
    if isinstance(tensors, torch.Tensor):  # one tensor
        tensors = [tensors]
    tensors = _checks.tensor_list("magnitude_threshold", "tensors", tensors, same_shape=False)
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(
            f"meldkit.magnitude_threshold: argument 'density': expected a float, got {density!r}"
        )
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(
            f"meldkit.magnitude_threshold: argument 'density': {density} not in [0, 1]"
        )
    bases = None
    if base is not None:
        bases = [base] * len(tensors) if isinstance(base, torch.Tensor) else list(base)
        if len(bases) != len(tensors):
            raise ValueError(
                "meldkit.magnitude_threshold: argument 'base': "
                f"{len(bases)} tensors for {len(tensors)}"
            )
        _checks.tensor_list("magnitude_threshold", "base", bases, same_shape=False)
        for i, (t, b) in enumerate(zip(tensors, bases, strict=True)):
            if b.shape != t.shape or b.dtype != t.dtype or b.device != t.device:
                raise ValueError(
                    f"meldkit.magnitude_threshold: argument 'base[{i}]': {b.dtype} "
                    f"{list(b.shape)} on {b.device} does not match 'tensors[{i}]' {t.dtype} "
                    f"{list(t.shape)} on {t.device}"
                )
    numel = sum(t.numel() for t in tensors)
    k = int(numel * float(density))
    if k <= 0:
        return float("inf")
    if k >= numel:
        return float("-inf")
    device, dtype = tensors[0].device, tensors[0].dtype
    reasons = _native.unavailable(_OP, device, (dtype,))
    if reasons:
        _native.warn_fallback(_OP, device, (dtype,), reasons)
        taus = [
            (t.float() - (b.float() if bases else 0)).abs().flatten()
            for t, b in zip(tensors, bases or tensors, strict=True)
        ]
        with _naming_threshold_nan(tensors, bases, one_base=isinstance(base, torch.Tensor)):
            return float(ref.magnitude_threshold_ref(torch.cat(taus), density))
    a = [t.detach().contiguous() for t in tensors]
    b = [x.detach().contiguous() for x in bases] if bases else None
    workspace = None
    if device.type == "cuda":
        n = _native._C.MAGNITUDE_SELECT_CUDA_WORKSPACE
        workspace = torch.empty(n, dtype=torch.float64, device=device)
    with _naming_threshold_nan(tensors, bases, one_base=isinstance(base, torch.Tensor)):
        return _native._C.magnitude_select(a, b, k, workspace, _native.stream_of(device))


@contextlib.contextmanager
def _naming_threshold_nan(
    tensors: Sequence[torch.Tensor], bases: Sequence[torch.Tensor] | None, *, one_base: bool
) -> Iterator[None]:
    """Re-raises the selection's NaN error (which knows no argument) naming the first argument
    of :func:`magnitude_threshold` that puts NaN among the magnitudes, found only then."""
    try:
        yield
    except ValueError as e:
        if "contain NaN" not in str(e):
            raise
        if bases is None:
            bad = [i for i, t in enumerate(tensors) if torch.isnan(t).any()]
            where = f"'tensors[{bad[0]}]' holds NaN" if bad else "a magnitude is NaN"
        else:

            def labels(j: int, t: int | None) -> str:
                if t is not None:
                    return f"'tensors[{j}]'"
                return "'base'" if one_base else f"'base[{j}]'"

            where = _nan_source(bases, [tensors], labels)
        raise ValueError(
            f"meldkit.magnitude_threshold: {where}, and magnitudes cannot be ranked with NaN"
        ) from e


def _kth_largest(theta: torch.Tensor, base: torch.Tensor, k: int) -> float:
    """The exact k-th largest ``|θ − θ₀|`` (float32), 1 ≤ k ≤ numel, by the native selection."""
    device = theta.device
    workspace = None
    if device.type == "cuda":
        n = _native._C.MAGNITUDE_SELECT_CUDA_WORKSPACE
        workspace = torch.empty(n, dtype=torch.float64, device=device)
    return _native._C.magnitude_select(
        [theta.detach().contiguous()],
        [base.detach().contiguous()],
        k,
        workspace,
        _native.stream_of(device),
    )


@contextlib.contextmanager
def _naming_nan(op: str, method: str, bases, models) -> Iterator[None]:
    """Re-raises the native magnitude selection's NaN error (which knows no model) naming ``op``,
    ``method`` and the first input that puts NaN in a task vector ``models[t][j] − bases[j]``
    (:func:`_nan_source`), found only then."""
    try:
        yield
    except ValueError as e:
        if "contain NaN" not in str(e):
            raise
        where = _nan_source(bases, models)
        raise ValueError(
            f"meldkit.{op}: method {method!r} selects by magnitude, which cannot rank NaN, and "
            f"{where} (only at density 1, where nothing is selected, does NaN merge, "
            "as NaN)"
        ) from e


def _nan_source(
    bases: Sequence[torch.Tensor],
    models: Sequence[Sequence[torch.Tensor]],
    labels: Callable[[int, int | None], str] | None = None,
) -> str:
    """Says which input first makes a task vector ``models[t][j] − bases[j]`` hold NaN: a base
    holding NaN (every model's task vector then does), else a model holding NaN, else a model
    and its base both infinite, of one sign, at one entry (∞ − ∞; the kernels subtract in
    float32, which holds every finite value of their input dtypes, so nothing else makes NaN).
    Checked without forming the task vectors: no float32 copy of any input. ``labels(j, t)``
    names base ``j`` (t None) or model ``t``'s tensor ``j`` (default: merge_tensors' names)."""
    one = len(bases) == 1
    if labels is None:

        def labels(j: int, t: int | None) -> str:
            if t is None:
                return "base" if one else f"bases[{j}]"
            return f"models[{t}]" if one else f"models[{t}][{j}]"

    for j, b in enumerate(bases):
        base = labels(j, None)
        model = [labels(j, t) for t in range(len(models))]
        if torch.isnan(b).any():
            return f"{base} holds NaN"
        for t, ms in enumerate(models):
            if torch.isnan(ms[j]).any():
                return f"{model[t]} holds NaN"
        if torch.isinf(b).any():
            for t, ms in enumerate(models):
                if (torch.isinf(ms[j]) & (ms[j] == b)).any():
                    return (
                        f"{model[t]} − {base} holds NaN (both are infinite, of one sign, at one "
                        "entry: ∞ − ∞)"
                    )
    return "a task vector holds NaN"


def _breadcrumbs_band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """The ascending ranks ``[start, stop)`` Model Breadcrumbs keeps (mergekit's counts; see
    :func:`merge_ref.breadcrumbs_mask_ref`)."""
    n_top = int(gamma * numel)
    n_bot = numel - int(density * numel) - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, numel - n_top


def _breadcrumbs_model(
    base: torch.Tensor, theta: torch.Tensor, density: float, gamma: float
) -> torch.Tensor:
    """θ with the entries Breadcrumbs drops set back to θ₀, so that a merge without masks of
    the result equals the Breadcrumbs merge of θ (no rescaling).

    The kept entries are the ascending ranks ``[start, stop)`` of ``|θ − θ₀|`` (float32), equal
    magnitudes ordered by index, as :func:`merge_ref.breadcrumbs_mask_ref` sorts them. Instead
    of a sort: the magnitudes at the two boundary ranks by exact selection (two native
    selections), everything strictly between kept, and only the entries equal to a boundary
    value ordered by index. Entries with ``|τ| = 0`` are left as they are whatever their rank:
    kept or dropped, they add nothing to the merge. On the CPU one native pass
    (``_C.band_select``) writes the result; elsewhere PyTorch ops do the same steps.
    """
    n = theta.numel()
    start, stop = _breadcrumbs_band(n, density, gamma)
    if start == 0 and stop == n:
        return theta
    if start >= stop:
        return base.clone()
    lo = _kth_largest(theta, base, n - start) if start > 0 else None  # value at rank start
    hi = _kth_largest(theta, base, n - stop + 1) if stop < n else None  # at rank stop − 1
    if theta.device.type == "cpu":
        out = torch.empty_like(theta, memory_format=torch.contiguous_format)
        _native._C.band_select(
            theta.detach().contiguous(), base.detach().contiguous(), out, lo, hi, start, stop
        )
        return out
    a = theta.float().flatten()  # a copy for float32 inputs too: worked on in place
    if a.data_ptr() == theta.data_ptr():
        a = a.clone()
    a.sub_(base.flatten()).abs_()  # float32 τ, as the kernels and the reference compute it
    keep = (a > lo) if lo is not None else torch.ones_like(a, dtype=torch.bool)
    if hi is not None:
        keep &= a < hi
    keep |= a == 0  # |τ| = 0: θ already equals θ₀ (up to the sign of a zero)

    def keep_ties(value: float, first: int, last: int) -> None:
        """Of the entries equal to ``value`` (in index order, ascending ranks c, c+1, …), keep
        those whose rank lies in [first, last)."""
        if value == 0:
            return
        idx = (a == value).nonzero().flatten()
        c = int(torch.count_nonzero(a < value))
        keep[idx[max(first - c, 0) : max(last - c, 0)]] = True

    if lo is not None and hi is not None and lo == hi:
        keep_ties(lo, start, stop)
    else:
        if lo is not None:
            keep_ties(lo, start, n)  # below hi: all of them rank before stop
        if hi is not None:
            keep_ties(hi, 0, stop)  # above lo: all of them rank at or after start
    return torch.where(keep.view(theta.shape), theta, base)


def _exact_k_model(base: torch.Tensor, theta: torch.Tensor, density: float) -> torch.Tensor:
    """θ with all but its top ``k`` magnitudes (:func:`merge_ref.exact_k_count`) set back to
    θ₀, equal magnitudes ranked by index (lower first): :func:`merge_ref.magnitude_mask_ref` with
    ``tie="exact_k"``, by one native selection and a few tensor ops on the tensors' device (the
    path of devices without the CPU's cutoff pass). It holds a float32 copy of ``|τ|`` for one
    tensor and reads two counts back to the host; only when some ties at the threshold are
    dropped does it find the kept ones' positions (``nonzero`` over the ties)."""
    n = theta.numel()
    k = ref.exact_k_count(n, density)
    if k >= n:
        return theta
    if k <= 0:
        return base.clone()
    t = _kth_largest(theta, base, k)
    a = (theta.float() - base.float()).abs().flatten()  # float32 τ, as the kernels compute it
    above = a > t
    ties = a == t
    n_above, n_ties = torch.stack([above.sum(), ties.sum()]).tolist()
    r = k - n_above  # ties to keep, the first ones in index order: 1 <= r <= n_ties
    if r >= n_ties:
        keep = a >= t
    else:
        keep = above.index_fill_(0, ties.nonzero().flatten()[:r], True)
    return torch.where(keep.view(theta.shape), theta, base)


def _della_model(
    base: torch.Tensor,
    theta: torch.Tensor,
    density: float,
    epsilon: float,
    seed: int,
    stream: int,
    l1: bool,
) -> tuple[torch.Tensor, float]:
    """θ with the entries DELLA's MagPrune drops set back to θ₀ (CPU, one native call): per row,
    the magnitude ranks, each entry's keep probability from its rank, the seeded draw — the
    mask of :func:`merge_ref.della_keep_prob_ref` and :func:`random_ref.bernoulli_mask_ref`.
    Also returns the L1 factor ``‖τ‖₁ / ‖kept τ‖₁`` of :func:`merge_ref.rescale_ref` (1 when
    nothing is kept): float64 sums (in index order, where the reference lets PyTorch choose the
    order, as the native DARE path does), the ratio rounded once to float32. A density of 1
    keeps θ, 0 gives θ₀ (mergekit's short-circuits, without drawing); at density 1 with ``l1``
    the factor is ‖τ‖₁ / ‖τ‖₁: 1, or NaN when τ holds NaN or ±inf (one check, no sums)."""
    if density >= 1.0:
        if l1 and not bool(torch.isfinite(theta.float() - base.float()).all()):
            return theta.contiguous(), math.nan
        return theta.contiguous(), 1.0
    if density <= 0.0:
        return base.contiguous(), 1.0
    ref.check_della(density, epsilon)
    out = torch.empty_like(theta, memory_format=torch.contiguous_format)
    if theta.numel() == 0:
        return out, 1.0
    row_len = theta.shape[-1] if theta.dim() >= 2 else theta.numel()
    tau_l1, kept_l1 = _native._C.della_select(
        theta.detach().contiguous(),
        base.detach().contiguous(),
        out,
        row_len,
        density,
        epsilon,
        seed,
        stream,
    )
    if kept_l1 == 0:
        return out, 1.0
    return out, float(torch.tensor(tau_l1 / kept_l1, dtype=torch.float64).to(torch.float32))


def _della_merge_cpu(
    base,
    models,
    m,
    weights,
    densities,
    epsilons,
    lam,
    normalize,
    rescale,
    seed,
    tensor_index,
    out_dtype,
    out,
    consensus,
) -> torch.Tensor:
    """DELLA / DELLA-linear of one position on the CPU: native MagPrune per model, then the fused
    native merge of the masked models with each model's rescale factor (L1 ratio or 1)."""
    n = len(models)
    masked, ratios = zip(
        *(
            _della_model(base, x, d, e, seed, ref.stream_of(tensor_index, n, t), rescale == "l1")
            for t, (x, d, e) in enumerate(zip(models, densities, epsilons, strict=True))
        ),
        strict=True,
    )
    masked = list(masked)
    scales = list(ratios) if rescale == "l1" else [1.0] * n
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype or base.dtype, device=base.device)
    if not all(math.isfinite(s) for s in scales):
        # NaN or ±inf in a task vector makes its L1 factor NaN (rescale_ref), and so, as in the
        # reference, every element of the result.
        return out.fill_(math.nan)
    _native._C.task_merge(
        base.detach().contiguous(),
        masked,
        out,
        weights,
        scales,
        None,
        None,
        seed,
        None,
        "none",
        consensus,
        normalize,
        float(lam),
    )
    return out


def _merge_native(
    bases: list[torch.Tensor],
    models: list[list[torch.Tensor]],
    outs: list[torch.Tensor],
    *,
    sparsify: str,
    consensus: str,
    normalize: bool,
    rescale: str,
    weights: list[float],
    densities: list[float],
    lam: float,
    seed: int,
    tensor_indices: list[int],
    thresholds: list[float] | None,
    exact_k: bool = False,
) -> None:
    """One native call over J tensor positions (``models[t][j]``): thresholds, norms, merge.
    ``exact_k`` (CPU, magnitude masks selected per tensor): mergekit's exactly-k rule."""
    device = bases[0].device
    targets = [
        o if o.is_contiguous() else torch.empty_like(o, memory_format=torch.contiguous_format)
        for o in outs
    ]
    workspace = None
    if device.type == "cuda":
        workspace = torch.empty(
            _native._C.merge_many_workspace_numel(len(models), max(b.numel() for b in bases)),
            dtype=torch.float64,
            device=device,
        )
    _native._C.merge_many(
        [b.detach().contiguous() for b in bases],
        [[m.detach().contiguous() for m in ms] for ms in models],
        [t.detach() for t in targets],
        weights,
        densities,
        thresholds if sparsify == "magnitude" else None,
        sparsify,
        consensus,
        normalize,
        rescale,
        lam,
        seed,
        tensor_indices,
        workspace,
        _native.stream_of(device),
        exact_k,
    )
    for t, o in zip(targets, outs, strict=True):
        if t is not o:
            o.copy_(t)


def _merge_reference(
    base,
    models,
    method,
    weights,
    densities,
    gammas,
    epsilons,
    lam,
    normalize,
    rescale,
    tie,
    consensus,
    seed,
    tensor_index,
    thresholds,
    out_dtype,
) -> torch.Tensor:
    m = get_method(method)
    return ref.generalized_merge_ref(
        base,
        models,
        weights=weights,
        densities=densities,
        sparsify=m.sparsify,
        consensus=consensus,
        normalize=normalize,
        rescale=rescale,
        lam=lam,
        tie=tie,
        gammas=gammas,
        epsilons=epsilons,
        seed=seed,
        tensor_index=tensor_index,
        thresholds=thresholds,
        out_dtype=out_dtype,
    )


@custom_op(
    "meldkit::merge_tensors",
    schema="(Tensor base, Tensor[] models, str method, float[] weights, float[] densities,"
    " float[] gammas, float[] epsilons, float lam, bool normalize, str rescale, str tie,"
    " str consensus, SymInt seed, SymInt tensor_index, float[]? thresholds,"
    " ScalarType? out_dtype) -> Tensor",
)
def _merge_tensors(
    base: torch.Tensor,
    models: list[torch.Tensor],
    method: str,
    weights: list[float],
    densities: list[float],
    gammas: list[float],
    epsilons: list[float],
    lam: float,
    normalize: bool,
    rescale: str,
    tie: str,
    consensus: str,
    seed: int,
    tensor_index: int,
    thresholds: list[float] | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    return _merge_reference(
        base,
        models,
        method,
        weights,
        densities,
        gammas,
        epsilons,
        lam,
        normalize,
        rescale,
        tie,
        consensus,
        seed,
        tensor_index,
        thresholds,
        out_dtype,
    )


@_merge_tensors.register_kernel(["cpu", "cuda"])
def _merge_tensors_native(*args):
    base, models, method = args[:3]
    with _naming_nan("merge_tensors", method, [base], [[x] for x in models]):
        return _merge_into(None, *args)


def _merge_into(
    out,
    base,
    models,
    method,
    weights,
    densities,
    gammas,
    epsilons,
    lam,
    normalize,
    rescale,
    tie,
    consensus,
    seed,
    tensor_index,
    thresholds,
    out_dtype,
):
    """The op's CPU/CUDA kernel, writing into ``out`` (contiguous, of the result's shape, dtype
    and device: the caller checks) when given, else into a new tensor; returns the result."""
    m = get_method(method)
    out_dtype = out_dtype or base.dtype
    dtypes = (base.dtype, out_dtype)
    reasons = _native.unavailable(_OP, base.device, dtypes)
    if not reasons and len(models) > _MAX_MODELS_PER_CALL:
        # Every native merge (DELLA's and the masked-model paths included) takes the models'
        # pointers in a fixed-size array.
        reasons = [
            f"the native kernels merge at most {_MAX_MODELS_PER_CALL} models per call, "
            f"got {len(models)}"
        ]
    sparsify = m.sparsify
    if (
        not reasons
        and sparsify == "della"
        and rescale in ("l1", "none")
        and base.device.type == "cpu"
    ):
        return _della_merge_cpu(
            base,
            models,
            m,
            weights,
            densities,
            epsilons,
            lam,
            normalize,
            rescale,
            seed,
            tensor_index,
            out_dtype,
            out,
            consensus,
        )
    if not reasons and sparsify == "breadcrumbs" and rescale == "none":
        models = [
            _breadcrumbs_model(base, x, d, g)
            for x, d, g in zip(models, densities, gammas, strict=True)
        ]
        sparsify = "none"
    exact_k = sparsify == "magnitude" and tie == "exact_k" and thresholds is None
    if not reasons and exact_k and rescale == "none" and base.device.type != "cpu":
        models = [_exact_k_model(base, x, d) for x, d in zip(models, densities, strict=True)]
        sparsify = "none"
        exact_k = False
    native_exact_k = (
        not reasons
        and exact_k
        and rescale in ("none", "inverse_density")
        and base.device.type == "cpu"
    )
    if not reasons and sparsify == "della":
        reasons = [
            "the native DELLA path runs on the CPU with rescale 'l1' or 'none', "
            f"not on {base.device.type} with {rescale!r}"
        ]
    elif not reasons and sparsify not in _NATIVE_SPARSIFY:
        reasons = [f"no native kernel for {m.sparsify} masks with rescale {rescale!r}"]
    if (
        not reasons
        and sparsify == "magnitude"
        and tie != "keep_ties"
        and thresholds is None
        and not native_exact_k
    ):
        reasons = [
            f"tie={tie!r} runs natively on the CPU without L1 rescaling, not on "
            f"{base.device.type} with rescale {rescale!r}"
        ]
    if reasons:
        _native.warn_fallback(f"merge_tensors[{method}]", base.device, dtypes, reasons)
        res = _merge_reference(
            base,
            models,
            method,
            weights,
            densities,
            gammas,
            epsilons,
            lam,
            normalize,
            rescale,
            tie,
            consensus,
            seed,
            tensor_index,
            thresholds,
            out_dtype,
        )
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _merge_native(
        [base],
        [[x] for x in models],
        [out],
        sparsify=sparsify,
        consensus=consensus,
        normalize=normalize,
        rescale=rescale,
        weights=weights,
        densities=densities,
        lam=lam,
        seed=seed,
        tensor_indices=[tensor_index],
        thresholds=thresholds,
        exact_k=native_exact_k,
    )
    return out


@_merge_tensors.register_fake
def _merge_tensors_fake(base, models, method, *args):
    out_dtype = args[-1]
    return base.new_empty(base.shape, dtype=out_dtype or base.dtype)


class _MergeArgs(NamedTuple):
    weights: list[float]
    densities: list[float]
    gammas: list[float]
    epsilons: list[float]
    normalize: bool
    rescale: str
    thresholds: list[float] | None
    consensus: str
    lam: float


def _check_float(name: str, value: object) -> float:
    """``value`` as a float, finite in float32 (the kernels' λ), else a TypeError/ValueError
    naming ``name``. A real number: Python's, NumPy's, or a 0-d tensor or array (read with
    ``.item()``); not a bool."""
    given = value
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()  # a bool tensor gives a bool, a complex one a complex: refused
    elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # NumPy: a 0-d array, or a scalar (np.bool_ gives a bool)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"meldkit.merge_tensors: argument '{name}': expected a float, got {given!r}"
        )
    f = float(value)
    if not math.isfinite(f) or abs(f) > torch.finfo(torch.float32).max:
        raise ValueError(
            f"meldkit.merge_tensors: argument '{name}': must be finite in float32, got {f}"
        )
    return f


def _check_int(name: str, value: object, bound: int) -> int:
    """``value`` as an int in [0, bound), else a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"meldkit.merge_tensors: argument '{name}': expected an int, got {value!r}")
    if not 0 <= int(value) < bound:
        raise ValueError(f"meldkit.merge_tensors: {name} must be in [0, {bound}), got {value}")
    return int(value)


def _check_out_dtype(out_dtype: object) -> None:
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(
            "meldkit.merge_tensors: argument 'out_dtype': expected one of float32, bfloat16, "
            f"float16, float64, got {out_dtype!r}"
        )


def _merge_args(
    m,
    n,
    weights,
    densities,
    gammas,
    epsilons,
    normalize,
    rescale,
    tie,
    seed,
    thresholds,
    consensus,
    lam,
) -> _MergeArgs:
    """Validates the per-model parameters of a merge and fills in the method's defaults."""
    method = m.name
    weights = _checks.float_list(
        method, "weights", [1.0] * n if weights is None else weights, n, "models"
    )

    def per_model(name, value, default):
        value = default if value is None else value
        if isinstance(value, (int, float)):
            value = [float(value)] * n
        return _checks.float_list(method, name, value, n, "models")

    densities = per_model("densities", densities, 1.0)
    if any(not 0.0 <= d <= 1.0 for d in densities):
        raise ValueError(f"meldkit.merge_tensors: densities must be in [0, 1], got {densities}")
    gammas = per_model("gammas", gammas, 0.01)
    if any(not 0.0 <= g <= 1.0 for g in gammas):
        raise ValueError(
            f"meldkit.merge_tensors: argument 'gammas': must be in [0, 1] (the fraction of the "
            f"largest magnitudes breadcrumbs drops), got {gammas}"
        )
    epsilons = per_model("epsilons", epsilons, 0.15)
    if method == "della" and any(e < 0 for e in epsilons):
        raise ValueError(
            f"meldkit.merge_tensors: argument 'epsilons': must be >= 0 (DELLA's spread of keep "
            f"probabilities around the density), got {epsilons}"
        )
    # mergekit's `rescale: true` is its L1 matching; None keeps the method's default.
    rescale = {None: m.rescale, True: "l1", False: "none"}.get(rescale, rescale)
    if rescale not in ref.RESCALES:
        raise ValueError(f"meldkit.merge_tensors: rescale must be one of {ref.RESCALES}")
    if thresholds is not None:
        if not isinstance(thresholds, (list, tuple)) or not all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) for x in thresholds
        ):
            raise TypeError(
                f"meldkit.merge_tensors: argument 'thresholds': expected a list of {n} floats, "
                f"got {thresholds!r}"
            )
        thresholds = [float(x) for x in thresholds]
        if len(thresholds) != n or any(x != x for x in thresholds):
            raise ValueError(
                f"meldkit.merge_tensors: thresholds must be {n} numbers (±inf allowed, no NaN)"
            )
    if tie not in ref.TIE_RULES:
        raise ValueError(f"meldkit.merge_tensors: tie must be one of {ref.TIE_RULES}")
    _check_int("seed", seed, 2**63)
    if normalize is not None and not isinstance(normalize, bool):
        raise TypeError(
            f"meldkit.merge_tensors: argument 'normalize': expected True, False or None, "
            f"got {normalize!r}"
        )
    normalize = m.normalize if normalize is None else normalize
    return _MergeArgs(
        weights,
        densities,
        gammas,
        epsilons,
        normalize,
        rescale,
        thresholds,
        _check_consensus(m, consensus),
        _check_float("lam", lam),
    )


def _check_consensus(m, consensus: object) -> str:
    """The sign election ``m`` runs: its own, or ``consensus`` (``"sum"``, ``"count"``) for a
    method that elects signs; a TypeError/ValueError naming the argument otherwise."""
    if consensus is None or consensus == m.consensus:
        return m.consensus
    if not isinstance(consensus, str):
        raise TypeError(
            f"meldkit.merge_tensors: argument 'consensus': expected 'sum', 'count' or None, "
            f"got {consensus!r}"
        )
    if consensus not in ref.CONSENSUS[1:]:
        raise ValueError(
            f"meldkit.merge_tensors: argument 'consensus': must be 'sum' (sign of the weighted "
            f"mass, TIES' default) or 'count' (majority of the signs), got {consensus!r}"
        )
    if m.consensus == "none":
        electing = sorted(k for k, v in METHODS.items() if v.consensus != "none")
        raise ValueError(
            f"meldkit.merge_tensors: argument 'consensus': method {m.name!r} elects no signs; "
            f"the methods that do: {', '.join(electing)}"
        )
    return consensus


# Merging produces new weights: under no_grad, a result of inputs that require grad (a model's
# parameters) requires none (the custom ops have no gradient: a backward through them failed
# with torch's "no autograd formula" error).
@torch.no_grad()
def merge_tensors(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    method: str = "ties",
    *,
    weights: Sequence[float] | None = None,
    densities: Sequence[float] | float | None = None,
    gammas: Sequence[float] | float | None = None,
    epsilons: Sequence[float] | float | None = None,
    lam: float = 1.0,
    normalize: bool | None = None,
    rescale: str | bool | None = None,
    tie: str = "keep_ties",
    consensus: str | None = None,
    seed: int = 0,
    tensor_index: int = 0,
    thresholds: Sequence[float] | None = None,
    t: float = 0.5,
    filter_wise: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor position of N fine-tuned models with a registered method.

    ``θ = θ₀ + λ·Δ`` for the task-vector methods (task_arithmetic, ties, dare_linear, dare_ties,
    breadcrumbs, breadcrumbs_ties, della, della_linear), with mergekit's semantics and defaults
    (see :mod:`meldkit.ops.merge_ref` for the formulas and tie rules); ``linear`` (weighted
    average, no base), ``model_stock`` and ``slerp`` (``t``, two tensors: base and one model).

    Parameters
    ----------
    base : Tensor or None
        θ₀, shape ``S``; None only for ``linear``.
    models : sequence of Tensor
        The N fine-tuned tensors, shape ``S``, same dtype and device as ``base``. Any N ≥ 1:
        the native kernels take up to 32; more run the reference (with a one-time warning).
    method : str
        A name of :data:`meldkit.merging.METHODS`.
    weights : sequence of float, optional
        Per model; default 1 each.
    densities, gammas, epsilons : float or sequence of float, optional
        Per-model density (kept fraction, default 1), breadcrumbs' γ (default 0.01), DELLA's ε
        (default 0.15); a float applies to every model.
    lam : float
        λ, the final scale of Δ: a real number, finite in float32.
    normalize, rescale : optional
        Override the method's defaults (``rescale``: ``"none"``, ``"inverse_density"``, ``"l1"``,
        or a bool as in mergekit: True means the method's own rescaling). ``inverse_density``
        multiplies the kept entries only by ``1/density`` rounded to float32: a density below
        about 2.9e-39 makes that ``inf`` (kept entries ±inf, dropped ones 0). A method without
        a mask (task_arithmetic) ignores ``rescale``.
    tie : str
        Magnitude selection's tie rule: ``"keep_ties"`` (``|τ| ≥`` the k-th largest, the TIES
        paper's kthvalue) or ``"exact_k"`` (exactly k entries, ties by index: mergekit's order).
    consensus : str, optional
        The sign election of a method that elects signs (ties, dare_ties, breadcrumbs_ties,
        della): ``"sum"`` (the sign of Σ_t w_t·τ̂_t, the "mass" of the TIES paper and mergekit;
        every method's default) or ``"count"`` (the sign most models vote for, Σ_t sgn(w_t·τ̂_t)).
        A zero vote elects +1, as in mergekit. None keeps the method's own.
    seed, tensor_index : int
        Key of the random masks (DARE, DELLA): same seed and index, same mask on every backend.
    thresholds : sequence of float, optional
        Precomputed magnitude thresholds per model (global trimming: see
        :func:`magnitude_threshold` over all of a model's tensors): model t keeps
        ``|τ_t| ≥ thresholds[t]`` whatever its density (which still sets ``inverse_density``'s
        factor).
    t : float
        slerp's interpolation parameter (0: the base, 1: the model; default 0.5, the midpoint:
        mergekit's configs must give it): a real number, finite.
    out_dtype : torch.dtype, optional
        Dtype of the result (default: ``out``'s, else the inputs').
    out : Tensor, optional
        Write the result here: contiguous, shape ``S``, on the inputs' device. The native
        kernels write into it directly (a streaming merge reuses one buffer instead of
        allocating each result); the other paths compute the result, then copy it. Runs
        eagerly, without autograd.

    The merge is not differentiable: the result never requires grad, whatever the inputs, and
    ``out`` may be a parameter that requires grad (a model's own weight, written in place).

    Returns
    -------
    Tensor
        Shape ``S``, dtype ``out_dtype`` (default: the inputs'); ``out`` when given.

    Raises
    ------
    TypeError, ValueError
        A bad argument, named. ValueError also when magnitude selection (ties, breadcrumbs
        below density 1) meets NaN in a task vector, naming the first model whose task vector
        holds it.

    Notes
    -----
    NaN and ±inf elsewhere give the reference's values on every backend, NaN wherever it
    gives NaN: a NaN or ±inf the mask keeps (or any at density 1, or in the base) makes that
    element NaN or ±inf (NaN where infinities of opposite signs, or an inf and a NaN, meet);
    one the mask drops is dropped. Magnitude selection ranks ±inf as the largest magnitudes.
    With L1 rescaling a task vector's factor ``‖τ‖₁ / ‖kept τ‖₁`` is NaN when it is not finite
    in the compute dtype (NaN or ±inf anywhere in the task vector, kept or dropped), and then
    so is every element of the result (a task vector of which nothing is kept is left
    unscaled: it adds nothing). Nothing is silently replaced. One difference remains, for an
    infinite *base* element: the paths that merge masked copies of the models (breadcrumbs,
    DELLA on the CPU, ``exact_k`` off the CPU) set a dropped entry to θ₀, whose task vector
    is then ∞ − ∞ = NaN, where the reference drops it and keeps θ₀'s ±inf.
    """
    m = get_method(method)
    models = _checks.tensor_list(method, "models", models)
    n = len(models)
    if base is None:
        if m.needs_base:
            raise ValueError(f"meldkit.merge_tensors: method {method!r} needs a base tensor")
    else:
        labels = ["base", *(f"models[{i}]" for i in range(n))]
        _checks.tensor_list(method, "base", [base, *models], labels=labels)
    a = _merge_args(
        m,
        n,
        weights,
        densities,
        gammas,
        epsilons,
        normalize,
        rescale,
        tie,
        seed,
        thresholds,
        consensus,
        lam,
    )
    _check_int("tensor_index", tensor_index, 2**32)
    _check_out_dtype(out_dtype)
    if out is not None:
        inputs = models if base is None else [base, *models]
        out_dtype = _check_out(out, models[0], out_dtype, inputs)
    if m.kind == "linear":
        from meldkit.ops.weighted_sum import weighted_sum

        total = sum(a.weights) if a.normalize else 1.0
        if total == 0.0:
            raise ValueError(
                f"meldkit.merge_tensors: argument 'weights': {a.weights} sum to 0, which "
                "normalize=True cannot divide by (pass normalize=False)"
            )
        scaled = [w / total for w in a.weights]
        if out is not None:  # written in place: no result allocated, then copied
            return weighted_sum(models, scaled, out=out)
        res = weighted_sum(models, scaled, out_dtype=out_dtype)
    elif m.kind == "model_stock":
        res = ref.model_stock_ref(base, models, filter_wise=filter_wise, out_dtype=out_dtype)
    elif m.kind == "slerp":
        if n != 1:
            raise ValueError(
                "meldkit.merge_tensors: slerp takes exactly one model besides the base"
            )
        res = ref.slerp_ref(base, models[0], _check_float("t", t), out_dtype=out_dtype)
    else:
        args = (
            base,
            models,
            method,
            a.weights,
            a.densities,
            a.gammas,
            a.epsilons,
            a.lam,
            a.normalize,
            a.rescale,
            tie,
            a.consensus,
            int(seed),
            int(tensor_index),
            a.thresholds,
            out_dtype,
        )
        if out is None:
            return _merge_tensors(*args)
        with torch.no_grad(), _naming_nan("merge_tensors", method, [base], [[x] for x in models]):
            return _merge_into(out, *args)
    if out is None:
        return res
    with torch.no_grad():
        return out.copy_(res)


def _check_out(
    out: torch.Tensor, like: torch.Tensor, out_dtype: torch.dtype | None, inputs
) -> torch.dtype:
    """Validates merge_tensors' ``out`` against the inputs; returns the result dtype."""
    where = "meldkit.merge_tensors: argument 'out'"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where}: expected a Tensor, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"{where}: shape {list(out.shape)}, the inputs have {list(like.shape)}")
    if out.device != like.device:
        raise ValueError(f"{where}: on {out.device}, the inputs on {like.device}")
    if out_dtype is not None and out.dtype != out_dtype:
        raise ValueError(f"{where}: dtype {out.dtype}, but out_dtype={out_dtype}")
    if out.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"{where}: dtype {out.dtype} is not a floating dtype")
    if not out.is_contiguous():
        raise ValueError(f"{where}: must be contiguous")
    if _overlaps_any(out, inputs):
        # The kernels read each element before writing it, but the reference paths do not.
        raise ValueError(f"{where}: shares memory with an input")
    return out.dtype


def _overlaps_any(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the bytes ``out`` spans (first to last element, strides ≥ 0) intersect those of
    any of ``inputs``: never for an empty tensor (it holds no bytes, whatever its pointer); a
    disjoint slice of the same buffer does not overlap.

    Tensors whose storages' bytes are disjoint (separate allocations: the usual case) cannot
    overlap, which one comparison per input tells; only the others (views of one buffer, or
    storages over overlapping memory, as ``torch.from_numpy`` of an array and of a slice of it
    give) compare their elements' spans. Each call of ``merge_tensors(out=)`` runs this, so it
    stays cheap."""
    if out.numel() == 0:
        return False
    storage = out.untyped_storage()
    lo = storage.data_ptr()
    hi = lo + storage.nbytes()
    span = None
    for x in inputs:
        s = x.untyped_storage()
        p = s.data_ptr()
        if p >= hi or lo >= p + s.nbytes() or x.numel() == 0 or x.device != out.device:
            continue
        if span is None:
            span = _span(out)
        b0, b1 = _span(x)
        if span[0] < b1 and b0 < span[1]:
            return True
    return False


def _span(x: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[first, end)`` from a non-empty tensor's first element to its last (strides
    ≥ 0)."""
    last = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True))
    return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()


@torch.no_grad()
def merge_tensor_list(
    bases: Sequence[torch.Tensor] | None,
    models: Sequence[Sequence[torch.Tensor]],
    method: str = "ties",
    *,
    weights: Sequence[float] | None = None,
    densities: Sequence[float] | float | None = None,
    gammas: Sequence[float] | float | None = None,
    epsilons: Sequence[float] | float | None = None,
    lam: float = 1.0,
    normalize: bool | None = None,
    rescale: str | bool | None = None,
    tie: str = "keep_ties",
    consensus: str | None = None,
    seed: int = 0,
    tensor_indices: Sequence[int] | None = None,
    thresholds: Sequence[float] | None = None,
    t: float = 0.5,
    filter_wise: bool = False,
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Merge J tensor positions of N fine-tuned models in one call: :func:`merge_tensors` over a
    list, with one native call for the whole list (no Python loop per tensor).

    Parameters
    ----------
    bases : sequence of Tensor or None
        θ₀ of each position j; shapes may differ between positions; one dtype and device. None
        only for ``linear``.
    models : sequence of sequences of Tensor
        ``models[t][j]``: model t's tensor at position j, shaped like ``bases[j]``.
    method, weights, densities, gammas, epsilons, lam, normalize, rescale, tie, consensus, \
seed, t, filter_wise :
        As for :func:`merge_tensors`; per-model values apply to every position.
    tensor_indices : sequence of int, optional
        The random-mask key of each position (default ``0 .. J-1``): position j merges exactly as
        ``merge_tensors(..., tensor_index=tensor_indices[j])`` does.
    thresholds : sequence of float, optional
        Per-model magnitude thresholds applied to every position (a whole-model selection, see
        :func:`magnitude_threshold`); by default each position selects its own, as mergekit.

    Returns
    -------
    list of Tensor
        J merged tensors, ``out[j]`` shaped like ``bases[j]``, dtype ``out_dtype`` (default: the
        inputs').

    Notes
    -----
    The task-vector methods whose masks the kernels implement (task_arithmetic, ties (on the
    CPU with either tie rule, elsewhere with ``keep_ties``), dare_linear, dare_ties) run natively
    as one call, breadcrumbs (no rescale) natively position by position; breadcrumbs holds one
    masked copy of one position's tensors at a time, and DARE with L1 rescaling on the CPU one
    byte per element of the largest tensor (its masks, kept between the L1 pass and the merge
    pass). The others (linear, model_stock, slerp, della, breadcrumbs with a rescale,
    ``tie="exact_k"`` off the CPU or with L1 rescaling, more than 32 models) and the reference
    backend merge position by position. No autograd: merging produces new weights.
    """
    m = get_method(method)
    models = [list(ms) for ms in models]
    if not models:
        raise ValueError(f"meldkit.{method}: argument 'models': is empty")
    no_base = bases is None
    if no_base:
        if m.needs_base:
            raise ValueError(f"meldkit.merge_tensor_list: method {method!r} needs base tensors")
        bases = models[0]
    bases = _checks.tensor_list(method, "bases", bases, same_shape=False)
    for i, ms in enumerate(models):
        if len(ms) != len(bases):
            raise ValueError(
                f"meldkit.{method}: argument 'models[{i}]': has {len(ms)} tensors "
                f"for {len(bases)} bases"
            )
    indices = list(range(len(bases))) if tensor_indices is None else list(tensor_indices)
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in indices):
        raise TypeError(
            f"meldkit.{method}: argument 'tensor_indices': expected integers, got {indices!r}"
        )
    if len(indices) != len(bases) or any(not 0 <= int(i) < 2**32 for i in indices):
        raise ValueError(
            f"meldkit.{method}: argument 'tensor_indices': needs {len(bases)} integers in "
            "[0, 2**32)"
        )
    n = len(models)
    a = _merge_args(
        m,
        n,
        weights,
        densities,
        gammas,
        epsilons,
        normalize,
        rescale,
        tie,
        seed,
        thresholds,
        consensus,
        lam,
    )
    for j, base in enumerate(bases):
        labels = [f"bases[{j}]", *(f"models[{t}][{j}]" for t in range(len(models)))]
        _checks.tensor_list(
            method, f"models[*][{j}]", [base, *(ms[j] for ms in models)], labels=labels
        )
    device, dtype = bases[0].device, bases[0].dtype
    _check_out_dtype(out_dtype)
    out_dtype = out_dtype or dtype
    needs_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (*bases, *(y for ms in models for y in ms))
    )
    crumbs = m.sparsify == "breadcrumbs" and a.rescale == "none"
    exact_k = (
        m.sparsify == "magnitude"
        and tie == "exact_k"
        and a.thresholds is None
        and device.type == "cpu"
        and a.rescale in ("none", "inverse_density")
    )
    native = (
        m.kind == "generalized"
        and (m.sparsify in _NATIVE_SPARSIFY or crumbs)
        and (m.sparsify != "magnitude" or tie == "keep_ties" or a.thresholds is not None or exact_k)
        and n <= _MAX_MODELS_PER_CALL
        and not needs_grad
    )
    if native:
        reasons = _native.unavailable(_OP, device, (dtype, out_dtype))
        if not reasons:
            outs = [torch.empty(b.shape, dtype=out_dtype, device=device) for b in bases]
            common = dict(
                consensus=a.consensus,
                normalize=a.normalize,
                rescale=a.rescale,
                weights=a.weights,
                densities=a.densities,
                lam=a.lam,
                seed=int(seed),
                thresholds=a.thresholds,
            )
            with _naming_nan("merge_tensor_list", method, bases, models):
                if crumbs:
                    # Masks by selection, then a merge without masks, position by position: one
                    # masked copy of one position's tensors at a time, not of whole models.
                    for j, b in enumerate(bases):
                        masked = [
                            [_breadcrumbs_model(b, ms[j], d, g)]
                            for ms, d, g in zip(models, a.densities, a.gammas, strict=True)
                        ]
                        _merge_native(
                            [b],
                            masked,
                            [outs[j]],
                            sparsify="none",
                            tensor_indices=[int(indices[j])],
                            **common,
                        )
                else:
                    _merge_native(
                        bases,
                        models,
                        outs,
                        sparsify=m.sparsify,
                        tensor_indices=[int(i) for i in indices],
                        exact_k=exact_k,
                        **common,
                    )
            return outs
    return [
        merge_tensors(
            None if no_base else base,
            [ms[j] for ms in models],
            method,
            weights=a.weights,
            densities=a.densities,
            gammas=a.gammas,
            epsilons=a.epsilons,
            lam=a.lam,
            normalize=a.normalize,
            rescale=a.rescale,
            tie=tie,
            consensus=a.consensus,
            seed=seed,
            tensor_index=int(indices[j]),
            thresholds=a.thresholds,
            t=t,
            filter_wise=filter_wise,
            out_dtype=out_dtype,
        )
        for j, base in enumerate(bases)
    ]
