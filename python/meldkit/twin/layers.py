"""Twin-Merging's layers: the shared weights plus each sample's mix of exclusive knowledge, computed
on activations (``meldkit.ops.routed_lora`` in gate mode), never by rebuilding dense weights.

Each layer subclasses the layer it replaces and keeps its parameters under the same names
(``weight``, ``bias``), so a :class:`TwinModel`'s ``state_dict`` and ``torch.func.functional_call``
see the original model. The exclusive factors are non-persistent buffers. In ``"plain"`` routing
mode (router features, and the per-sample rebuild of ``materialize=True``) a layer is exactly the
layer it replaces.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meldkit.ops import routed_lora


class Routing:
    """The current forward's routing, shared by every twin layer of one model.

    ``weights [B, T]`` (float32) mixes the exclusive parts per sample; ``task [B]`` (int64) picks
    the task-specific tensors (heads, biases); ``mode`` is ``"twin"`` or ``"plain"``.

    ``runs``: set by :class:`~meldkit.twin.TwinModel` when it has ordered the batch so that
    each sample uses one expert and the samples of one (expert, task) pair are consecutive:
    ``[(expert, task, start, end, ones)]`` over sample indices, ``ones`` when every weight of
    the run is exactly 1. Twin layers then work on contiguous slices (no gathering per layer).
    Setting ``weights`` or ``task`` clears it, and the per-forward facts derived from the
    weights (:meth:`sparse`, :meth:`groups`).

    ``lock``: this state belongs to one forward at a time; the models hold this (re-entrant)
    lock for the whole of a forward, a routing pass or a ``generate``, so that calls from
    several threads run one after the other instead of reading each other's routing.
    """

    def __init__(self) -> None:
        self.mode = "plain"
        self._weights: torch.Tensor | None = None
        self._task: torch.Tensor | None = None
        self.lock = threading.RLock()
        # the latest layer of this forward that got an input shared by the batch (first
        # dimension 1 of B > 1) and computed it per sample, [B, ...] (:meth:`batch`)
        self.shared_input: str | None = None
        self._clear()

    def __getstate__(self) -> dict:
        # a lock can be neither copied nor pickled: a copied model gets a lock of its own
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def _clear(self) -> None:
        self.runs: list[tuple[int, int, int, int, bool]] | None = None
        self._sparse: bool | None = None
        self._groups: list | None = None

    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights = value
        self._clear()

    @property
    def task(self) -> torch.Tensor | None:
        return self._task

    @task.setter
    def task(self, value: torch.Tensor | None) -> None:
        self._task = value
        self._clear()

    def sparse(self) -> bool:
        """Whether some sample leaves some expert out (a zero weight): read once per forward."""
        if self._sparse is None:
            self._sparse = bool((self._weights == 0).any())
        return self._sparse

    def groups(self) -> list[tuple[int, torch.Tensor, torch.Tensor, bool]]:
        """Per expert used by some sample: ``(t, samples, their weights [b_t, 1, 1], whole)``,
        ``whole`` when every sample uses it; computed once per forward (host-side)."""
        if self._groups is None:
            w = self._weights
            groups = []
            for t in range(w.shape[1]):
                sel = w[:, t].nonzero().flatten()
                if sel.numel():
                    groups.append((t, sel, w[sel, t].view(-1, 1, 1), sel.numel() == w.shape[0]))
            self._groups = groups
        return self._groups

    def state(self) -> tuple:
        return self._weights, self._task, self.runs

    def restore(self, state: tuple) -> None:
        self.weights, self.task, runs = state
        self.runs = runs

    def batch(self, layer: str, lead: int) -> int:
        """The batch size B for an input of first dimension ``lead`` to ``layer``: B, or 1 for an
        input shared by the batch, which the layer computes with each sample's weights (its
        output ``[B, ...]``; noted in :attr:`shared_input`, since a model that expects the
        shared input's output back at batch 1 cannot use it)."""
        assert self.weights is not None
        b = self.weights.shape[0]
        if lead not in (b, 1):
            raise RuntimeError(
                f"meldkit.twin: layer {layer!r} got an input whose first dimension {lead} is not "
                f"the batch size {b}: per-sample routing needs [B, ...] inputs"
            )
        if lead != b:
            self.shared_input = layer
        return b


def _per_sample(values: torch.Tensor, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
    """Σ_t w_bt·values[t] ``[B, *shape]`` for dense exclusive parts ``values [T, *shape]``."""
    w = routing.weights.to(torch.float32)
    return (w @ values.flatten(1).float()).view(w.shape[0], *values.shape[1:]).to(dtype)


def _fresh_op(y: torch.Tensor, v: torch.Tensor, op: str) -> torch.Tensor:
    """``y + v`` (``op="add"``) or ``y * v`` (``"mul"``), in place where that is safe: ``y`` is a
    fresh output of this layer (the caller's promise), not an expanded view, and no gradient
    is being recorded for either. A fresh ``[B·L, d]`` result costs a pass and its page faults
    at large batches (inference is what Twin-Merging's routing is for)."""
    recording = torch.is_grad_enabled() and (y.requires_grad or v.requires_grad)
    if recording or y.stride(0) == 0 or not _broadcasts_into(v.shape, y.shape):
        return y + v if op == "add" else y * v
    return y.add_(v) if op == "add" else y.mul_(v)


def _broadcasts_into(small: torch.Size, shape: torch.Size) -> bool:
    """Whether ``small`` broadcasts to ``shape`` without growing it (``torch.broadcast_shapes``
    took about 65 µs a call, more than the in-place operation it guards)."""
    if len(small) > len(shape):
        return False
    return all(a in (1, b) for a, b in zip(reversed(small), reversed(shape), strict=False))


def _broadcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B, d]`` → ``[B, 1, …, 1, d]`` with ``ndim`` dimensions."""
    return v.view(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


def _stack_padded(values: list[torch.Tensor]) -> torch.Tensor:
    """Task-specific values of one parameter, stacked ``[T, *max shape]`` and padded with 0."""
    shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
    out = torch.zeros((len(values), *shape), dtype=values[0].dtype)
    for t, v in enumerate(values):
        out[(t, *(slice(0, s) for s in v.shape))] = v
    return out


def _column_mask(sizes: list[int]) -> torch.Tensor | None:
    """``[T, max(sizes)]`` float32: 0 in the first ``sizes[t]`` columns of row t, -inf past them
    (a head's logits past its task's label count never win); None when every size is equal."""
    if len(set(sizes)) < 2:
        return None
    mask = torch.zeros(len(sizes), max(sizes))
    for t, n in enumerate(sizes):
        mask[t, n:] = float("-inf")
    return mask


def _add_sparse_experts(
    y: torch.Tensor,
    x: torch.Tensor,
    routing: Routing,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
) -> torch.Tensor:
    """``y + Σ_t w_bt·(x_b·A_tᵀ)·B_tᵀ`` computing each expert only on the samples that use it.

    For sparse routing (``top_k``, or one-hot weights given by the caller): with k of T experts
    per sample the exclusive parts cost k/T of the dense path's multiply-adds. The same sums as
    the dense path (``routed_lora`` in gate mode) up to their order. CPU only: picking the
    samples reads the weights on the host (once per forward, :meth:`Routing.groups`).
    """
    b = routing.weights.shape[0]
    x3 = x.reshape(b, -1, x.shape[-1]).to(lora_a.dtype)
    in_place = y.dtype == lora_a.dtype and not (torch.is_grad_enabled() and y.requires_grad)
    if in_place:  # y is the fresh output of this layer's base GEMM: accumulate into it
        acc = y.view(b, x3.shape[1], lora_b.shape[1])
    else:
        acc = torch.zeros(b, x3.shape[1], lora_b.shape[1], dtype=lora_a.dtype, device=x.device)
    for t, sel, w_sel, whole in routing.groups():
        xs = x3 if whole else x3.index_select(0, sel)
        h = xs @ lora_a[t].T  # [b_t, L, r]
        h *= w_sel.to(h.dtype)
        if whole:
            acc.view(-1, acc.shape[-1]).addmm_(h.view(-1, h.shape[-1]), lora_b[t].T)
        else:
            acc.index_add_(0, sel, h @ lora_b[t].T)
    return y if in_place else y + acc.view(*y.shape).to(y.dtype)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly a Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's
    projections: ``weight [in, out]``, ``y = x·W + b``), checked without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


class TwinLinear(nn.Linear):
    """``y = x·θ_sᵀ + Σ_t w_t·(x·b_t)·a_tᵀ + bias`` per sample; task-specific weight or bias taken
    from each sample's task.

    It also replaces a GPT-2 ``Conv1D`` (``weight [in, out]``, ``y = x·W + b``): the layer keeps
    that parameter as it is (same name, shape and storage) and reads it as the ``[out, in]`` view
    ``Wᵀ`` (:meth:`linear_weight`); the exclusive factors of W, ``ΔW_t = a_t·b_tᵀ`` with
    ``a_t [in, r]``, ``b_t [out, r]``, are swapped once here (``ΔW_tᵀ = b_t·a_tᵀ``), so no
    activation is transposed per call.

    A task-specific head whose tasks have different output sizes (label counts C_t) returns
    ``[..., max_t C_t]`` in every mode: the columns past a sample's own C_t are -inf, whether or
    not the head has a bias (a per-task additive mask ``[T, max_t C_t]``)."""

    def __init__(
        self,
        linear: nn.Module,
        name: str,
        routing: Routing,
        *,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
        dense_bias: torch.Tensor | None = None,
        specific_weight: list[torch.Tensor] | None = None,
        specific_bias: list[torch.Tensor] | None = None,
    ) -> None:
        nn.Module.__init__(self)  # keep the layer's own parameters, do not re-initialise
        self.training = linear.training  # the replaced layer's train/eval mode
        self.weight, self.bias = linear.weight, linear.bias
        # a Conv1D's weight is [in, out]: the layer computes with its [out, in] view
        self.transposed = is_conv1d(linear)
        # the weight's own shape: a task-specific head may have been resized to the experts'
        self.out_features, self.in_features = self.linear_weight().shape
        self.name, self.routing = name, routing
        device = linear.weight.device
        if self.transposed:
            if factors is not None:  # ΔWᵀ = b·aᵀ: the factors of the [out, in] view
                factors = (factors[1], factors[0])
            if specific_weight is not None:
                specific_weight = [v.T for v in specific_weight]
        if factors is not None:  # lora_a [T, r, n] = b_tᵀ, lora_b [T, m, r] = a_t
            a, b = factors
            self.register_buffer("lora_a", b.transpose(1, 2).contiguous().to(device), False)
            self.register_buffer("lora_b", a.contiguous().to(device), False)
        else:
            self.lora_a = self.lora_b = None
        self.register_buffer(
            "dense_bias", None if dense_bias is None else dense_bias.to(device), False
        )
        self.register_buffer(
            "specific_weight",
            None if specific_weight is None else _stack_padded(specific_weight).to(device),
            False,
        )
        self.register_buffer(
            "specific_bias",
            None if specific_bias is None else _stack_padded(specific_bias).to(device),
            False,
        )
        # Heads whose tasks have different output sizes (label counts): the output is always
        # the widest task's, the columns past a task's own size -inf (with or without a bias).
        specific = specific_weight if specific_weight is not None else specific_bias
        mask = None if specific is None else _column_mask([int(v.shape[0]) for v in specific])
        self.register_buffer("column_mask", None if mask is None else mask.to(device), False)

    def linear_weight(self) -> torch.Tensor:
        """The base weight as ``nn.Linear`` holds it, ``[out, in]`` (a view for a Conv1D)."""
        return self.weight.T if self.transposed else self.weight

    def _pad_columns(self, y: torch.Tensor) -> torch.Tensor:
        """A plain-mode output of a head with task-specific sizes, widened to the widest task's
        with -inf columns (what the routed path returns; ``materialize=True`` runs this way)."""
        width = self.column_mask.shape[1]
        if y.shape[-1] >= width:
            return y
        return F.pad(y, (0, width - y.shape[-1]), value=float("-inf"))

    def _run_biases(self, runs: list) -> list[torch.Tensor | None] | None:
        """Each run's bias (its task's, or the shared one plus its expert's exclusive part when
        every weight of the run is 1); None when some run's samples need a mix of biases."""
        if self.specific_bias is not None:
            return [self.specific_bias[k] for _, k, *_ in runs]
        if self.bias is None or self.dense_bias is None:
            return [self.bias] * len(runs)
        if not all(ones for *_, ones in runs):
            return None
        shared = self.bias.float()
        return [(shared + self.dense_bias[t].float()).to(self.bias.dtype) for t, *_ in runs]

    def _forward_runs(self, x: torch.Tensor, r: Routing) -> torch.Tensor | None:
        """The layer on a batch ordered into runs of one expert and task (:attr:`Routing.runs`):
        per run the expert's shrink, then its expand plus the run's bias written into the run's
        rows of the output; then one base GEMM over the whole batch accumulates into them. No
        sample is gathered or scattered and no per-sample bias pass runs. None when the layer
        does not qualify (inference only, every tensor in one dtype, a batch-first input)."""
        b = r.weights.shape[0]
        if (
            self.lora_a is None
            or self.specific_weight is not None
            or self.column_mask is not None
            or x.dim() < 2
            or x.shape[0] != b
            or not (x.dtype == self.weight.dtype == self.lora_a.dtype)
            or (
                torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad or r.weights.requires_grad)
            )
        ):
            return None
        biases = self._run_biases(r.runs)
        if biases is None:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        per = x2.shape[0] // b  # rows per sample
        # Per run, the expert's expand (with the run's bias) writes its rows first; then one
        # base GEMM over the whole batch accumulates into them. Measured against one base GEMM
        # per run followed by the expand: 1.37x against 1.46x the shared model at batch 32,
        # 1.26x against 1.34x at 256 (the expand's K = r is memory-bound when it re-reads y).
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for (t, _, start, end, ones), bias in zip(r.runs, biases, strict=True):
            xs, ys = x2[start * per : end * per], y[start * per : end * per]
            h = xs @ self.lora_a[t].T  # [rows, r]
            if not ones:
                h.view(end - start, per, -1).mul_(r.weights[start:end, t].view(-1, 1, 1))
            if bias is None:
                torch.mm(h, self.lora_b[t].T, out=ys)
            else:
                torch.addmm(bias.to(x.dtype), h, self.lora_b[t].T, out=ys)
        y.addmm_(x2, self.linear_weight().T)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if r.mode == "plain":
            y = F.linear(x, self.linear_weight(), self.bias)
            return y if self.column_mask is None else self._pad_columns(y)
        if r.runs is not None:
            y = self._forward_runs(x, r)
            if y is not None:
                return y
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(0)
        b = r.batch(self.name, x.shape[0])
        if x.shape[0] != b:
            x = x.expand(b, *x.shape[1:])
        # The shared bias goes into the base GEMM (one pass less) unless a task-specific one
        # replaces it.
        bias = self.bias if self.specific_bias is None else None
        sparse = self.lora_a is not None and x.device.type == "cpu" and r.sparse()
        # Dense routing with the shared weights: the base GEMM runs inside routed_lora, whose
        # expand accumulates into it (one elementwise pass less than adding the two outputs).
        base_in_op = (
            self.lora_a is not None
            and not sparse
            and self.specific_weight is None
            and x.dtype == self.weight.dtype == self.lora_a.dtype
            and (bias is None or bias.dtype == x.dtype)
        )
        if self.specific_weight is not None:
            w = self.specific_weight[r.task].to(x.dtype)  # [B, m, n]
            y = torch.einsum("b...n,bmn->b...m", x, w)
            if bias is not None:
                y = _fresh_op(y, bias, "add")
        elif not base_in_op:
            y = F.linear(x, self.linear_weight(), bias)
        if self.lora_a is not None:
            if sparse:
                y = _add_sparse_experts(y, x, r, self.lora_a, self.lora_b)
            else:
                gates = _broadcast(r.weights, x.dim()).expand(*x.shape[:-1], r.weights.shape[1])
                if base_in_op:
                    y, _ = routed_lora(
                        x,
                        self.lora_a,
                        self.lora_b,
                        1.0,
                        gates=gates,
                        base_weight=self.linear_weight(),
                        base_bias=bias,
                    )
                else:
                    delta, _ = routed_lora(
                        x.to(self.lora_a.dtype), self.lora_a, self.lora_b, 1.0, gates=gates
                    )
                    y = y + delta.to(y.dtype)
        if self.specific_bias is not None:
            y = _fresh_op(y, _broadcast(self.specific_bias[r.task].to(y.dtype), y.dim()), "add")
        elif self.bias is not None and self.dense_bias is not None:
            y = _fresh_op(y, _broadcast(_per_sample(self.dense_bias, r, y.dtype), y.dim()), "add")
        if self.column_mask is not None:
            y = _fresh_op(y, _broadcast(self.column_mask[r.task].to(y.dtype), y.dim()), "add")
        return y.squeeze(0) if squeeze else y


class TwinEmbedding(nn.Embedding):
    """``E[ids] + Σ_t w_t·a_t[ids]·b_tᵀ`` per sample."""

    def __init__(
        self,
        embedding: nn.Embedding,
        name: str,
        routing: Routing,
        *,
        factors: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        nn.Module.__init__(self)
        self.training = embedding.training  # the replaced layer's train/eval mode
        for attr in (
            "num_embeddings",
            "embedding_dim",
            "padding_idx",
            "max_norm",
            "norm_type",
            "scale_grad_by_freq",
            "sparse",
        ):
            setattr(self, attr, getattr(embedding, attr))
        self.weight = embedding.weight
        self.name, self.routing = name, routing
        a, b = factors
        self.register_buffer("factor_a", a.to(embedding.weight.device), False)  # [T, V, r]
        self.register_buffer("factor_b", b.to(embedding.weight.device), False)  # [T, d, r]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = super().forward(ids)
        r = self.routing
        if r.mode == "plain":
            return y
        if ids.dim() < 2:
            raise RuntimeError(f"meldkit.twin: embedding {self.name!r} needs [B, ...] ids")
        b = r.batch(self.name, ids.shape[0])
        ids = ids.expand(b, *ids.shape[1:])
        n_tasks, d, rank = self.factor_b.shape
        # Σ_t w_bt·a_t[ids]·b_tᵀ as one GEMM: u = [w_b1·a_1[ids] | … | w_bT·a_T[ids]]
        # [B·L, T·r] against [b_1 … b_T]ᵀ, in float32
        w = r.weights.float().T.reshape(n_tasks, b, *([1] * (ids.dim() - 1)), 1)
        u = (self.factor_a[:, ids].float() * w).permute(*range(1, ids.dim() + 1), 0, -1)
        u = u.reshape(-1, n_tasks * rank)
        b_cat = self.factor_b.float().permute(1, 0, 2).reshape(d, n_tasks * rank)
        recording = torch.is_grad_enabled() and y.requires_grad
        if y.dtype == torch.float32 and y.shape[0] == b and not recording:
            return y.view(-1, d).addmm_(u, b_cat.T).view(*ids.shape, d)  # y is fresh
        delta = (u @ b_cat.T).view(*ids.shape, d)
        return y.expand(*delta.shape) + delta.to(y.dtype)


def _unit_affine(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(weight, bias)`` for a LayerNorm without an affine part: ones and zeros for float32
    (the same bits; torch's CPU kernel without them took about 3x as long, 369 against 119 µs
    for [32, 32, 384]), None otherwise."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None, None
    key = x.shape[-1]
    unit = _UNIT_AFFINE.get(key)
    if unit is None:
        unit = _UNIT_AFFINE[key] = (torch.ones(key, dtype=x.dtype), torch.zeros(key, dtype=x.dtype))
    return unit


_UNIT_AFFINE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class TwinLayerNorm(nn.LayerNorm):
    """LayerNorm whose scale and shift are mixed (exclusive parts) or chosen (task-specific) per
    sample."""

    def __init__(
        self,
        norm: nn.LayerNorm,
        name: str,
        routing: Routing,
        *,
        dense: dict[str, torch.Tensor],
        specific: dict[str, list[torch.Tensor]],
    ) -> None:
        nn.Module.__init__(self)
        self.training = norm.training  # the replaced layer's train/eval mode
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps
        self.elementwise_affine = norm.elementwise_affine
        self.weight, self.bias = norm.weight, norm.bias
        if len(self.normalized_shape) != 1:
            raise NotImplementedError(
                f"meldkit.twin: LayerNorm {name!r} over {len(self.normalized_shape)} dimensions"
            )
        self.name, self.routing = name, routing
        dev = norm.weight.device
        for attr in ("weight", "bias"):
            d = dense.get(attr)
            s = specific.get(attr)
            self.register_buffer(f"dense_{attr}", None if d is None else d.to(dev), False)
            self.register_buffer(
                f"specific_{attr}", None if s is None else torch.stack(s).to(dev), False
            )

    def _param(self, attr: str, dtype: torch.dtype) -> torch.Tensor | None:
        r = self.routing
        specific = getattr(self, f"specific_{attr}")
        if specific is not None:
            return specific[r.task].to(dtype)
        own = getattr(self, attr)
        if own is None:
            return None
        dense = getattr(self, f"dense_{attr}")
        out = own.to(dtype).expand(r.weights.shape[0], -1)
        return out if dense is None else out + _per_sample(dense, r, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if r.mode == "plain":
            return super().forward(x)
        b = r.batch(self.name, x.shape[0])
        y = F.layer_norm(x, self.normalized_shape, *_unit_affine(x), self.eps)
        if y.shape[0] != b:
            y = y.expand(b, *y.shape[1:])
        w = self._param("weight", y.dtype)
        if w is not None:
            y = _fresh_op(y, _broadcast(w, y.dim()), "mul")
        bias = self._param("bias", y.dtype)
        if bias is not None:
            y = _fresh_op(y, _broadcast(bias, y.dim()), "add")
        return y


def slice_sample(v: Any, i: int, b: int) -> Any:
    """Sample ``i`` of a batch-first tensor (kept 4-D etc.); other values unchanged."""
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b:
        return v[i : i + 1]
    return v


def cat_samples(outs: list[Any]) -> Any:
    """Concatenate per-sample outputs along dim 0 (tensors, tuples, dicts, ModelOutputs); a last
    dimension that differs (heads with different label counts) is padded with -inf."""
    first = outs[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return torch.stack(outs)
        width = max(o.shape[-1] for o in outs)
        outs = [F.pad(o, (0, width - o.shape[-1]), value=float("-inf")) for o in outs]
        return torch.cat(outs)
    if isinstance(first, Mapping):
        items = {k: cat_samples([o[k] for o in outs]) for k in first}
        try:
            return type(first)(**items)
        except TypeError:
            return items
    if isinstance(first, (tuple, list)):
        return type(first)(cat_samples(list(parts)) for parts in zip(*outs, strict=True))
    return outs


class TwinPerSample:
    """Any other module with routed parameters or buffers (RMSNorm scales,
    BatchNorm running statistics, …) runs once per sample with that sample's merged tensors
    (``torch.func.functional_call``), through a forward hook: the module stays where it is,
    under its own name.

    Correct for any module; cheap for 1-D parameters (norm scales). 2-D parameters are rebuilt
    densely per sample (the reference's cost), with a warning.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        routing: Routing,
        *,
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
        dense: dict[str, torch.Tensor],
        specific: dict[str, list[torch.Tensor]],
        warn: bool = True,
    ) -> None:
        self.name, self.routing = name, routing
        self.factors, self.dense, self.specific = factors, dense, specific
        if factors and warn:
            warnings.warn(
                f"meldkit.twin: {type(module).__name__} {name!r} has 2-D exclusive parts "
                f"({', '.join(factors)}): they are rebuilt densely per sample",
                stacklevel=3,
            )
        self.active = False
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _params(self, module: nn.Module, w: torch.Tensor, task: int) -> dict[str, torch.Tensor]:
        own = dict(module.named_buffers(recurse=False)) | dict(
            module.named_parameters(recurse=False)
        )
        w = w.float()
        out = {}
        for k, (fa, fb) in self.factors.items():
            p = own[k]
            delta = torch.einsum("t,tmr,tnr->mn", w.cpu(), fa.float(), fb.float())
            out[k] = p + delta.to(p.device, p.dtype)
        for k, v in self.dense.items():
            p = own[k]
            out[k] = p + (w.cpu() @ v.flatten(1).float()).view(v.shape[1:]).to(p.device, p.dtype)
        for k, v in self.specific.items():
            out[k] = v[task].to(own[k].device)
        return out

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        r = self.routing
        if r.mode != "twin" or self.active:
            return None
        state = r.state()
        weights, task = r.weights, r.task
        b = weights.shape[0]
        outs = []
        # Run the module again for each sample, with the routing narrowed to that sample (for
        # twin layers inside it) and this hook switched off.
        self.active = True
        try:
            for i in range(b):
                r.weights, r.task = weights[i : i + 1], task[i : i + 1]
                params = self._params(module, weights[i], int(task[i]))
                a_i = tuple(slice_sample(a, i, b) for a in args)
                k_i = {k: slice_sample(v, i, b) for k, v in kwargs.items()}
                outs.append(torch.func.functional_call(module, params, a_i, k_i))
        finally:
            self.active = False
            r.restore(state)
        return cat_samples(outs)


__all__ = [
    "Routing",
    "TwinEmbedding",
    "TwinLayerNorm",
    "TwinLinear",
    "TwinPerSample",
    "cat_samples",
    "is_conv1d",
    "slice_sample",
]
