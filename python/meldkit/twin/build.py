"""Twin-Merging, knowledge disentanglement: a shared expert and compressed exclusive knowledge.

Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging"
(NeurIPS 2024, arXiv 2406.15479). From a base model θ_0 and T fine-tuned experts θ_t:

* the shared expert θ_s is an ordinary merge of the experts (task arithmetic with λ = 0.29 by
  default, the paper's: θ_s = θ_0 + 0.29·Σ_t (θ_t − θ_0)), by any method of
  :mod:`meldkit.merging`;
* the exclusive knowledge of task t is v_t = θ_t − θ_s, per tensor. Each 2-D tensor is compressed
  by truncated SVD to rank r = max(1, ⌊rank_ratio·min(m, n)⌋) (or the given ``rank``) and kept as
  its factors ``a_t = U_r·S_r`` ``[m, r]`` and ``b_t = V_r`` ``[n, r]`` (v_t ≈ a_t·b_tᵀ), never as a
  dense rebuild; 1-D tensors are kept dense. The reference code rounds 1×n matrices down to rank 0
  and silently zeroes them: here the rank is at least 1.
* excluded tensors are never merged: each task keeps its own (its head, its biases), and the
  shared model keeps the base's. By default (:data:`DEFAULT_EXCLUDE`) every name matching
  ``classifier`` or ``bias`` (the paper's filter) or naming another Hugging Face classification
  head (``score``, ``classification_head``), and every tensor whose first dimension differs
  between the experts and the base (a head with another label count under any name, with a
  warning). Tensors that only the experts have (classification heads over a bare base) are task
  specific too.

The SVD runs in float32 on ``device`` (a CUDA device when given), falling back to the CPU when the
GPU solver fails to converge (Twin-Merging issue #8).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from meldkit._storage import storage_key
from meldkit.ops._checks import FLOAT_DTYPES

# The paper's filter (heads named ``classifier``, every bias) and the other names Hugging Face
# gives a classification head: ``score`` (Llama, Qwen, Mistral, GPT-2 …ForSequenceClassification)
# and ``classification_head`` (BART, T5). A causal LM's ``lm_head`` is merged.
DEFAULT_EXCLUDE = (r"classifier", r"classification_head", r"(^|\.)score\.", r"bias")


class TwinError(ValueError):
    """Experts that do not fit the base (or each other), or an unusable Twin-Merging setting."""


def task_names(experts: Mapping, where: str) -> list[str]:
    """The task names of a mapping of experts (its keys as strings), refusing two keys that
    name one task (``1`` and ``"1"``): routing by ``task=`` could not tell them apart."""
    tasks = [str(k) for k in experts]
    seen = set()
    for name in tasks:
        if name in seen:
            raise TwinError(f"{where}: two experts are named {name!r}; task names must differ")
        seen.add(name)
    return tasks


def check_top_k(top_k: object, num_tasks: int, where: str) -> int | None:
    """``top_k`` as an int in 1 … ``num_tasks``, or None."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TwinError(f"{where}: 'top_k' must be an int or None, got {top_k!r}")
    if not 1 <= int(top_k) <= num_tasks:
        raise TwinError(f"{where}: 'top_k' {top_k} is not in 1 … {num_tasks}")
    return int(top_k)


# ---- tensor sources: modules, state dicts and checkpoint folders behind one interface ---------


class _DictSource:
    """A module's parameters or a state dict, with the interface of ``merging.Checkpoint``.

    ``aliases`` maps other names of a tensor (tied weights: GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) to the name it is listed under; an alias is found
    (``in``, :meth:`get`) but not listed in :attr:`names`."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        label: str,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self._tensors = dict(tensors)
        self.aliases = dict(aliases or {})
        self.label = label

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self.aliases

    def _tensor(self, name: str) -> torch.Tensor:
        return self._tensors[self.aliases.get(name, name)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name).detach()


def _named_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)``: the parameters and persistent buffers of ``module`` by the first
    qualified name they are reached under, and every further name of one of them (tied weights,
    a module registered twice) mapped to that first name."""
    tensors: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}

    def add(name: str, t: torch.Tensor) -> None:
        if id(t) in first:
            if first[id(t)] != name:
                aliases.setdefault(name, first[id(t)])
        else:
            first[id(t)] = name
            tensors[name] = t

    # parameters first, as named_parameters() lists them (its first names are the ones kept)
    for name, p in module.named_parameters(remove_duplicate=False):
        add(name, p)
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                add(f"{prefix}.{name}" if prefix else name, buf)
    return tensors, aliases


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and persistent buffers (BatchNorm's running statistics, …) by
    qualified name: what its state dict holds, tied parameters once (under their first name;
    :func:`module_aliases` gives the others)."""
    return _named_tensors(module)[0]


def module_aliases(module: nn.Module) -> dict[str, str]:
    """The further names of a module's tied parameters and buffers, each mapped to the name
    :func:`module_tensors` lists it under (GPT-2: ``{"lm_head.weight":
    "transformer.wte.weight"}``)."""
    return _named_tensors(module)[1]


def _storage_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names of a state dict whose tensor is the same memory as an earlier name's (a tied model's
    ``state_dict()`` lists each tied weight under every name, as views of one storage)."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in tensors.items():
        key = storage_key(t)
        if key is None:
            continue
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _source(obj: Any, label: str, allow_pickle: bool = False):
    if isinstance(obj, nn.Module):
        tensors, aliases = _named_tensors(obj)
        return _DictSource(tensors, label, aliases)
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"meldkit.twin.build: {label}: {bad[0]!r} is not a tensor")
        aliases = _storage_aliases(obj)
        tensors = {k: v for k, v in obj.items() if k not in aliases}
        return _DictSource(tensors, label, aliases)
    if isinstance(obj, (str, os.PathLike)):
        from meldkit.merging.checkpoint import Checkpoint, CheckpointError

        try:
            src = Checkpoint(obj, allow_pickle=allow_pickle)
        except CheckpointError as exc:  # its advice names meldkit merge's --allow-pickle
            text = str(exc).replace("--allow-pickle (allow_pickle=True)", "allow_pickle=True")
            raise type(exc)(f"meldkit.twin.build: {label}: {text}") from None
        src.label = f"{label} ({obj})"
        return src
    raise TypeError(
        f"meldkit.twin.build: {label}: expected an nn.Module, a state dict or a checkpoint "
        f"folder, got {type(obj).__name__}"
    )


# ---- the result ---------------------------------------------------------------------------------


@dataclass
class TwinExperts:
    """What :func:`build` produces: everything Twin-Merging needs besides the base model.

    Attributes
    ----------
    tasks : list of str
        Task names, in expert order (T of them).
    shared : dict of str to Tensor
        θ_s for every merged tensor (the base's value for excluded ones it has).
    factors : dict of str to (Tensor, Tensor)
        For each 2-D merged tensor ``[m, n]``: ``(a [T, m, r], b [T, n, r])`` with
        v_t ≈ ``a[t] @ b[t].T``.
    dense : dict of str to Tensor
        For each merged tensor of another rank: the exclusive parts ``[T, *shape]``, uncompressed.
    specific : dict of str to list of Tensor
        Excluded (task-specific) tensors: each task's own, in task order (shapes may differ, e.g.
        heads with different label counts).
    errors : dict of str to list of float
        Relative Frobenius error ‖v_t − a_t b_tᵀ‖ / ‖v_t‖ of each compressed tensor, per task (0
        where v_t = 0), of the factors as stored (rounded to bfloat16 or float16 with such a
        base or ``factor_dtype``: full rank is then exact only up to that rounding).
    config : dict
        The settings :func:`build` ran with (JSON-serialisable).
    """

    tasks: list[str]
    shared: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]
    specific: dict[str, list[torch.Tensor]]
    errors: dict[str, list[float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def rank(self, name: str) -> int:
        """The kept rank of a compressed tensor."""
        return int(self.factors[name][0].shape[-1])

    def exclusive(self, name: str, task: int) -> torch.Tensor:
        """v_t of one merged tensor as a dense tensor (rebuilt from its factors when 2-D)."""
        if name in self.factors:
            a, b = self.factors[name]
            return (a[task].float() @ b[task].float().T).to(a.dtype)
        return self.dense[name][task]

    def storage(self) -> dict[str, int]:
        """Bytes: ``twin`` (factors, dense exclusive parts, task-specific tensors, shared),
        ``experts`` (T dense experts of the merged and task-specific tensors) and ``shared``."""

        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        shared = sum(nbytes(t) for t in self.shared.values())
        exclusive = sum(nbytes(a) + nbytes(b) for a, b in self.factors.values())
        exclusive += sum(nbytes(t) for t in self.dense.values())
        specific = sum(nbytes(t) for ts in self.specific.values() for t in ts)
        merged_names = set(self.factors) | set(self.dense)
        per_expert = sum(nbytes(self.shared[n]) for n in merged_names)
        return {
            "shared": shared,
            "exclusive": exclusive,
            "specific": specific,
            "twin": shared + exclusive + specific,
            "experts": self.num_tasks * per_expert + specific,
        }


# ---- SVD -------------------------------------------------------------------------------------


def default_svd_device() -> torch.device:
    """A CUDA device when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _svd(v: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Thin SVD of ``v`` in float32 on ``device``; on the CPU if the GPU solver fails."""
    x = v.to(device=device, dtype=torch.float32)
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
        if x.device.type == "cpu":
            raise TwinError(f"SVD failed on the CPU too: {exc}") from None
        return tuple(t.to(device) for t in torch.linalg.svd(x.cpu(), full_matrices=False))


def compress(v: torch.Tensor, rank: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(a [m, r], b [n, r], relative error)`` with ``a·bᵀ`` the best rank-``rank``
    approximation of the 2-D ``v`` (float32)."""
    u, s, vh = _svd(v, device)
    r = min(rank, s.numel())
    a = u[:, :r] * s[:r]
    b = vh[:r].T
    total = float(s.square().sum())
    err = math.sqrt(max(total - float(s[:r].square().sum()), 0.0) / total) if total > 0 else 0.0
    return a, b, err


def tensor_rank(shape: Sequence[int], rank_ratio: float, rank: int | None) -> int:
    """The kept rank of an ``[m, n]`` tensor: ``rank`` (capped at min(m, n)) or
    max(1, ⌊rank_ratio·min(m, n)⌋)."""
    full = min(shape)
    if rank is not None:
        return min(rank, full)
    return max(1, min(full, int(rank_ratio * full)))


# ---- build -----------------------------------------------------------------------------------


def _compile(patterns: Iterable[str] | str | None) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"meldkit.twin.build: 'exclude': {p!r} is not a regex string")
        out.append(re.compile(p))
    return out


def _shared_params(shared_params: Mapping[str, Any] | None, n: int) -> dict[str, Any]:
    params = dict(shared_params or {})
    if "lambda" in params:  # mergekit's name
        params["lam"] = params.pop("lambda")
    plural = {"weight": "weights", "density": "densities", "gamma": "gammas", "epsilon": "epsilons"}
    for key, many in plural.items():  # mergekit's per-model names: a scalar for every expert
        if key in params:
            value = params.pop(key)
            params[many] = [float(value)] * n if not isinstance(value, Sequence) else value
    return params


def _check_trim_scope(method: str, params: dict[str, Any]) -> str:
    """Pops ``trim_scope`` from the shared merge's parameters and checks it against the method
    and ``tie`` (whole-model trimming keeps ties: ``tie="keep_ties"``, set here)."""
    from meldkit.merging.methods import get_method

    scope = params.pop("trim_scope", "tensor")
    if scope not in ("tensor", "model"):
        raise TwinError(
            f"meldkit.twin.build: shared_params 'trim_scope' must be 'tensor' or 'model', "
            f"got {scope!r}"
        )
    if scope == "tensor":
        return scope
    if get_method(method).sparsify != "magnitude":
        raise TwinError(
            f"meldkit.twin.build: shared_params trim_scope='model' applies to magnitude "
            f"trimming (ties); shared={method!r} has none"
        )
    if params.setdefault("tie", "keep_ties") != "keep_ties":
        raise TwinError(
            "meldkit.twin.build: shared_params trim_scope='model' keeps every magnitude at or "
            f"above the whole-model threshold (tie='keep_ties'), got tie={params['tie']!r}"
        )
    densities = params.get("densities")
    if isinstance(densities, Sequence) and any(
        isinstance(d, (Sequence, Mapping)) for d in densities
    ):
        raise TwinError(
            "meldkit.twin.build: shared_params trim_scope='model' needs one density per expert"
        )
    return scope


def _aligned(
    base: torch.Tensor, thetas: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``base`` and ``thetas`` in their widest floating dtype (``torch.promote_types``), so that
    experts stored in another dtype than the base (bfloat16 fine-tunes of a float32 base, or
    the other way) merge at their precision, as ``meldkit merge`` merges them."""
    if not base.is_floating_point() or all(t.dtype == base.dtype for t in thetas):
        return base, thetas
    dtype = base.dtype
    for t in thetas:
        dtype = torch.promote_types(dtype, t.dtype)
    return base.to(dtype), [t.to(dtype) for t in thetas]


def _model_thresholds(
    names: Sequence[str],
    base_src: Any,
    srcs: Sequence[Any],
    where: Sequence[Mapping[str, str]],
    tasks: Sequence[str],
    params: Mapping[str, Any],
) -> list[float]:
    """Each expert's magnitude threshold over the task vector of all merged tensors
    (:func:`meldkit.merging.global_trim.global_thresholds`: two streaming passes, one tensor
    per expert held at a time)."""
    from meldkit.merging.global_trim import global_thresholds

    densities = params.get("densities", 1.0)
    if not isinstance(densities, Sequence):
        densities = [densities] * len(srcs)
    try:
        last: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}

        def inputs(n: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
            # Each step asks for the base, then the experts, of one tensor: read them once.
            if n not in last:
                thetas = [src.get(found[n]) for src, found in zip(srcs, where, strict=True)]
                last.clear()
                last[n] = _aligned(base_src.get(n), thetas)
            return last[n]

        return global_thresholds(
            names,
            lambda n: inputs(n)[0],
            lambda n: inputs(n)[1],
            [float(d) for d in densities],
        )
    except ValueError as exc:  # a NaN in a task vector: name the expert
        match = re.search(r"model (\d+) contains NaN", str(exc))
        who = f"expert {tasks[int(match[1])]!r}" if match else "an expert"
        raise TwinError(
            f"meldkit.twin.build: whole-model trimming: {exc} ({who} or the base holds NaN)"
        ) from None


def _listed(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (", …" if len(names) > limit else "")


def _check_rank(rank: Any, where: str) -> int | None:
    """``rank`` as an int ≥ 1 (any integer scalar: Python, NumPy, a 0-d integer tensor), or None."""
    if rank is None:
        return None
    try:
        value = None if isinstance(rank, bool) else operator.index(rank)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise TwinError(f"{where}: 'rank' must be an int ≥ 1, got {rank!r}")
    return value


def _check_tied(src: Any, name: str, held: list[str]) -> None:
    """Names tied in the base (``held``: those of them that ``src`` has) must hold one value in
    ``src`` too: an expert that unties them cannot be merged as one tensor."""
    if len(held) < 2:
        return
    aliases = getattr(src, "aliases", {})
    first = src.get(held[0])
    for other in held[1:]:
        if aliases.get(other, other) == aliases.get(held[0], held[0]):
            continue  # tied in this source as well
        if src.shape(other) != tuple(first.shape) or not torch.equal(src.get(other), first):
            raise TwinError(
                f"meldkit.twin.build: {other!r} and {held[0]!r} are one (tied) tensor in the "
                f"base but differ in {src.label}"
            )


def build(
    base: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    experts: Sequence[nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike]
    | Mapping[str, nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike],
    *,
    shared: str = "task_arithmetic",
    shared_params: Mapping[str, Any] | None = None,
    rank_ratio: float = 0.1,
    rank: int | None = None,
    exclude: Iterable[str] | str | None = DEFAULT_EXCLUDE,
    device: str | torch.device | None = None,
    factor_dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = True,
    allow_pickle: bool = False,
) -> TwinExperts:
    """Build Twin-Merging's shared expert and compressed exclusive knowledge.

    Parameters
    ----------
    base : nn.Module, state dict or path
        θ_0: a model (its parameters and persistent buffers), a state dict, or a checkpoint
        folder (safetensors, read one tensor at a time, as ``meldkit merge`` reads). Floating
        buffers (BatchNorm running statistics) are merged like parameters, so each task keeps
        its own statistics; integer ones (``num_batches_tracked``) stay the base's. Tied
        tensors (a module's shared parameters; in a state dict, names that are views of one
        storage) are one tensor, listed under the base's first name; the experts may hold it
        under any of its names, and must hold one value under all of them.
    experts : sequence or mapping of the same
        The T fine-tuned experts θ_t; a mapping names the tasks (else ``"task0"``, …). They
        may store another floating dtype than the base (bfloat16 fine-tunes of a float32
        base): each tensor merges in the widest of its dtypes, and θ_s is stored in the base's.
    shared : str
        The merge method for θ_s (any name of :func:`meldkit.merging.get_method` that
        :func:`meldkit.merging.merge_state_dicts` runs); default task arithmetic.
    shared_params : mapping, optional
        Its parameters, mergekit's names accepted (``lambda``, ``weight``, ``density``, …);
        default ``{"lambda": 0.29}`` for task arithmetic (the paper's), else none.
        ``trim_scope`` (methods with magnitude trimming, TIES): ``"tensor"`` (default, each
        tensor keeps its own top ``density``, as mergekit) or ``"model"`` (each expert's task
        vector keeps its top ``density`` over all merged tensors at once, as the original TIES
        and the Twin-Merging code; ties at the threshold are all kept, as
        ``meldkit merge --trim-scope model``).
    rank_ratio : float
        Kept rank of each ``[m, n]`` exclusive part: max(1, ⌊rank_ratio·min(m, n)⌋); default 0.1
        (the paper's 90 % "mask rate"). 1.0 keeps everything (exact reconstruction).
    rank : int, optional
        A fixed rank instead (capped at min(m, n)); any integer scalar (NumPy, 0-d tensor).
    exclude : regex or regexes
        Names (``re.search``) that are never merged; each task keeps its own. Default
        (:data:`DEFAULT_EXCLUDE`): biases and classification heads, ``classifier`` (the paper's
        filter), ``score`` (Llama, Qwen, Mistral, GPT-2 sequence classifiers) and
        ``classification_head`` (BART, T5); with the default, a tensor whose first dimension
        (output size) differs between the experts or from the base, its other dimensions equal,
        is task specific as well, with a warning naming it. An explicit value is taken as given
        (such a tensor is then an error); ``None`` or ``()`` merges everything.
    device : str or torch.device, optional
        Where the SVDs run: default the GPU when there is one (falling back to the CPU for a
        matrix whose GPU solve fails), else the CPU. Results are stored on the CPU.
    factor_dtype : torch.dtype, optional
        Storage dtype of the factors and dense parts; default each tensor's dtype.
    seed : int
        Seed of the shared merge's random masks (DARE-based methods).
    progress : bool
        Show a progress bar (tqdm) over the tensors.
    allow_pickle : bool
        Read checkpoint folders that hold only pickle files (``pytorch_model.bin``), which can
        run code when loaded; refused by default, as by ``meldkit merge``.

    Returns
    -------
    TwinExperts

    Raises
    ------
    TwinError
        No experts, an expert that lacks a tensor of the base or has it in another shape, an
        expert with floating tensors that the base and another expert lack (or the reverse),
        tied tensors of the base that an expert unties, NaN or inf in a merged tensor of the
        base or an expert (named), bad ``rank_ratio``/``rank``.
    """
    from meldkit.merging import merge_state_dicts

    if isinstance(experts, Mapping):
        tasks = task_names(experts, "meldkit.twin.build")
        expert_list = list(experts.values())
    else:
        expert_list = list(experts)
        tasks = [f"task{i}" for i in range(len(expert_list))]
    if not expert_list:
        raise TwinError("meldkit.twin.build: 'experts' is empty")
    if factor_dtype is not None and factor_dtype not in FLOAT_DTYPES:
        raise TwinError(
            "meldkit.twin.build: 'factor_dtype' must be a floating torch.dtype (float32, "
            f"bfloat16, float16, float64) or None, got {factor_dtype!r}"
        )
    rank = _check_rank(rank, "meldkit.twin.build")
    if (
        isinstance(rank_ratio, bool)
        or not isinstance(rank_ratio, numbers.Real)
        or not 0.0 < float(rank_ratio) <= 1.0
    ):
        raise TwinError(
            f"meldkit.twin.build: 'rank_ratio' must be a number in (0, 1], got {rank_ratio!r}"
        )
    if shared_params is None:
        shared_params = {"lambda": 0.29} if shared == "task_arithmetic" else {}
    params = _shared_params(shared_params, len(expert_list))
    trim_scope = _check_trim_scope(shared, params)
    if exclude is not None and not isinstance(exclude, str):
        exclude = list(exclude)
    # the default also keeps per task whatever differs in shape (a head under another name)
    by_shape = exclude is not None and tuple(exclude) == DEFAULT_EXCLUDE
    patterns = _compile(exclude)
    svd_device = torch.device(device) if device is not None else default_svd_device()

    base_src = _source(base, "base", allow_pickle)
    srcs = [_source(e, f"expert {tasks[i]!r}", allow_pickle) for i, e in enumerate(expert_list)]
    # Tied tensors are one tensor under several names: the base's first name stands for all of
    # them, and each source may hold it under any of them.
    names_of = {n: [n] for n in base_src.names}
    for alias, name in getattr(base_src, "aliases", {}).items():
        names_of[name].append(alias)
    where = [{} for _ in srcs]  # per expert: base name -> the expert's name for that tensor
    # Merged: floating tensors of the base that no pattern excludes (under any of their names);
    # everything else the experts have is task specific.
    merged, specific_names = [], []
    for name in base_src.names:
        if not base_src.dtype(name).is_floating_point:
            continue
        excluded = any(p.search(n) for p in patterns for n in names_of[name])
        (specific_names if excluded else merged).append(name)
        for src, found in zip(srcs, where, strict=True):
            held = [n for n in names_of[name] if n in src]
            if held:
                found[name] = held[0]
            _check_tied(src, name, held)
    # Task specific by shape (the default exclude only): tensors whose first dimension (a
    # head's output size, its label count) differs between the experts or from the base, the
    # rest equal. Any other difference is an error (a broken or foreign checkpoint).
    reshaped = []
    for name in merged:
        for src, found in zip(srcs, where, strict=True):
            if name not in found:
                raise TwinError(f"meldkit.twin.build: {src.label} has no tensor {name!r}")
        shapes = [src.shape(found[name]) for src, found in zip(srcs, where, strict=True)]
        base_shape = base_src.shape(name)
        if (
            by_shape
            and len(base_shape) >= 1
            and any(s != base_shape for s in shapes)
            and all(len(s) == len(base_shape) and s[1:] == base_shape[1:] for s in shapes)
        ):
            reshaped.append(name)
            continue
        for src, shape in zip(srcs, shapes, strict=True):
            if shape != base_shape:
                raise TwinError(
                    f"meldkit.twin.build: {name!r}: shape {list(shape)} in {src.label} does "
                    f"not match the base's {list(base_shape)}"
                )
    if reshaped:
        warnings.warn(
            f"meldkit.twin.build: {len(reshaped)} tensor(s) differ in shape between the experts "
            f"(or from the base) and are kept per task, not merged: {_listed(reshaped)}; pass "
            "exclude= to choose the task-specific tensors yourself",
            stacklevel=2,
        )
        merged = [n for n in merged if n not in set(reshaped)]
        specific_names += reshaped
    for name in specific_names:
        missing = [src.label for src, found in zip(srcs, where, strict=True) if name not in found]
        if missing:
            raise TwinError(f"meldkit.twin.build: {name!r} is missing from {missing[0]}")
    # Floating tensors that only the experts have (heads over a bare base): every expert must
    # have the same ones.
    known = {n for names in names_of.values() for n in names}
    extras = [
        [n for n in src.names if n not in known and src.dtype(n).is_floating_point] for src in srcs
    ]
    for src, extra in zip(srcs[1:], extras[1:], strict=True):
        more = [n for n in extra if n not in set(extras[0])]
        fewer = [n for n in extras[0] if n not in set(extra)]
        if more:
            raise TwinError(
                f"meldkit.twin.build: {src.label} has {len(more)} tensor(s) that the base and "
                f"{srcs[0].label} lack: {_listed(more)}"
            )
        if fewer:
            raise TwinError(
                f"meldkit.twin.build: {src.label} lacks {len(fewer)} tensor(s) that "
                f"{srcs[0].label} has (and the base lacks): {_listed(fewer)}"
            )
    for name in extras[0]:
        for found in where:
            found[name] = name
    specific_names += extras[0]

    out = TwinExperts(
        tasks=tasks,
        shared={},
        factors={},
        dense={},
        specific={},
        config={
            "shared": shared,
            "shared_params": {k: v for k, v in dict(shared_params).items()},
            "rank_ratio": float(rank_ratio),
            "rank": rank,
            "exclude": [p.pattern for p in patterns],
            "specific_by_shape": reshaped,
            "seed": int(seed),
        },
    )
    if trim_scope == "model":
        params["thresholds"] = _model_thresholds(merged, base_src, srcs, where, tasks, params)
    bar = None
    if progress:
        from meldkit._progress import progress_bar

        bar = progress_bar(
            total=len(merged) + len(specific_names), desc="twin build", unit="tensor"
        )
    try:
        for name in merged:
            base_t = base_src.get(name)
            if not bool(torch.isfinite(base_t).all()):
                raise TwinError(f"meldkit.twin.build: {name!r} of the base holds NaN or inf")
            thetas = [src.get(found[name]) for src, found in zip(srcs, where, strict=True)]
            for task, theta in zip(tasks, thetas, strict=True):
                if theta.is_floating_point() and not bool(torch.isfinite(theta).all()):
                    raise TwinError(
                        f"meldkit.twin.build: {name!r} of expert {task!r} holds NaN or inf"
                    )
            base_w, thetas_w = _aligned(base_t, thetas)
            theta_s = merge_state_dicts(
                {name: base_w}, [{name: t} for t in thetas_w], shared, seed=seed, **params
            )[name].to(base_t.dtype)  # stored as the base stores it
            out.shared[name] = theta_s.cpu()
            store = factor_dtype or base_t.dtype
            if base_t.dim() == 2:
                r = tensor_rank(base_t.shape, rank_ratio, rank)
                a_all, b_all, errs = [], [], []
                for theta in thetas:
                    v = theta.float() - theta_s.float()
                    a, b, err = compress(v, r, svd_device)
                    a, b = a.cpu().to(store), b.cpu().to(store)
                    if store.itemsize < 4:
                        # The stored factors, rounded, are what rebuilds v_t: their error.
                        norm = float(v.norm())
                        rebuilt = a.float() @ b.float().T
                        err = float((v.cpu() - rebuilt).norm()) / norm if norm > 0 else 0.0
                    a_all.append(a)
                    b_all.append(b)
                    errs.append(err)
                out.factors[name] = (torch.stack(a_all), torch.stack(b_all))
                out.errors[name] = errs
            else:
                out.dense[name] = torch.stack(
                    [(t.float() - theta_s.float()).to(store).cpu() for t in thetas]
                )
            if bar is not None:
                bar.update(1)
        for name in specific_names:
            out.specific[name] = [
                src.get(found[name]).clone().cpu() for src, found in zip(srcs, where, strict=True)
            ]
            if name in base_src:
                out.shared[name] = base_src.get(name).clone().cpu()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


__all__ = [
    "DEFAULT_EXCLUDE",
    "TwinError",
    "TwinExperts",
    "build",
    "compress",
    "default_svd_device",
    "module_aliases",
    "module_tensors",
    "tensor_rank",
]
