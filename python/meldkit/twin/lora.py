"""Twin-Merging's generative variant: LoRA experts (PEFT format) over one causal LM.

As the released code does it: the merge works on the LoRA factors themselves, not on
B·A. For every adapted module, with T adapters (A_t ``[r, n]``, B_t ``[m, r]``):

* shared: A_s = λ·Σ_t A_t and B_s = λ·Σ_t B_t (task arithmetic on the factors, λ = 0.3);
* exclusive: A_t − A_s and B_t − B_s, each compressed by truncated SVD to rank ``rank`` (8 of the
  experts' 32 in the reference) and kept as factors;
* inference: per sequence, router weights w (softmax; the router reads the shared model's hidden
  state of the prompt's last token) give A* = A_s + Σ_t w_t·ΔA_t and B* = B_s + Σ_t w_t·ΔB_t, and
  the layer computes W·x + s·B*·(A*·x), s the adapters' ``lora_alpha / r``. Both sums run on the
  activations through :func:`meldkit.ops.routed_lora` in gate mode: h = A_s·x + Σ_t w_t·ΔA_t·x,
  then B_s·h + Σ_t w_t·ΔB_t·h; no adapter is rebuilt per request (the reference writes A* and B*
  into the PEFT model and serves one request at a time).

Adapters of different ranks, ``lora_alpha``, rsLoRA or target modules (which the reference cannot
merge) are first aligned by :func:`align_adapters`: each adapter's scaling folded into its B,
smaller ranks zero-padded to the largest, zero factors where an adapter leaves a module alone.

:meth:`TwinLoraModel.generate` routes each prompt once and keeps its weights for every new token.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meldkit.goat.model import replace_module
from meldkit.ops import routed_lora
from meldkit.twin.build import (
    TwinError,
    _check_rank,
    check_top_k,
    compress,
    default_svd_device,
    task_names,
)
from meldkit.twin.layers import Routing, _broadcast, is_conv1d
from meldkit.twin.model import (
    RoutedMixin,
    TwinRouter,
    _batch_size,
    _copy,
    _hidden_size,
    _last_hidden,
    declare_inputs,
    one_at_a_time,
)

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$"
)


@dataclass
class LoraAdapter:
    """One LoRA adapter as plain tensors: ``a[module] [r, n]``, ``b[module] [m, r]``, scaling."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    scaling: dict[str, float]


def read_adapter(adapter: Any, adapter_name: str = "default") -> LoraAdapter:
    """A PEFT LoRA adapter from a folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    or a ``PeftModel`` (its ``adapter_name``). Module names are the base model's."""
    if isinstance(adapter, LoraAdapter):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        from safetensors.torch import load_file

        folder = Path(adapter)
        cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise TwinError(
                f"meldkit.twin: {folder} is not a PEFT adapter folder (needs adapter_config.json "
                "and adapter_model.safetensors)"
            )
        config = json.loads(cfg_file.read_text())
        state = load_file(str(weights))
    elif hasattr(adapter, "peft_config"):
        from peft.utils import get_peft_model_state_dict

        config = adapter.peft_config[adapter_name].to_dict()
        state = get_peft_model_state_dict(adapter, adapter_name=adapter_name)
    else:
        raise TypeError(
            "meldkit.twin: an adapter must be a PEFT adapter folder or a PeftModel, got "
            f"{type(adapter).__name__}"
        )
    peft_type = config.get("peft_type", "LORA")
    peft_type = str(getattr(peft_type, "value", peft_type))  # PeftConfig.to_dict keeps the enum
    if peft_type.upper() != "LORA":
        raise TwinError(f"meldkit.twin: adapter type {peft_type} is not LoRA")
    _check_plain_lora(config)
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if config.get("use_rslora"):
        base_scale = alpha / r**0.5
    else:
        base_scale = alpha / r
    a, b = {}, {}
    other = []
    for key, t in state.items():
        m = _KEY.match(key)
        if m is None:
            other.append(key)
            continue
        (a if m["which"] == "A" else b)[m["module"]] = t.detach().float().cpu()
    if other:
        raise TwinError(
            f"meldkit.twin: the adapter holds tensors other than lora_A / lora_B weights "
            f"({', '.join(other[:3])}{', …' if len(other) > 3 else ''}): only plain LoRA "
            "adapters on linear layers are supported"
        )
    if not a or a.keys() != b.keys():
        raise TwinError("meldkit.twin: the adapter has no complete lora_A / lora_B pairs")
    return LoraAdapter(a, b, {name: base_scale for name in a})


# PEFT LoraConfig fields that, when set (truthy), make the adapter compute something other than
# W·x + s·B·(A·x) with plain A and B: the generative variant cannot represent them.
_UNSUPPORTED_FIELDS = (
    "use_dora",  # a learned magnitude renormalises W + s·B·A per output row
    "lora_bias",  # a bias on lora_B
    "modules_to_save",  # whole trained copies of other modules
    "rank_pattern",  # per-module ranks and scalings
    "alpha_pattern",
    "layer_replication",  # duplicated base layers
    "trainable_token_indices",  # trained embedding rows
    "target_parameters",  # LoRA on raw parameters, not on modules' activations
    "alora_invocation_tokens",  # activated LoRA: the adapter switches on mid-sequence
    "use_qalora",  # pooled inputs
    "arrow_config",  # its own routing over adapters
)
# init_lora_weights that rewrite the base weights (the adapter needs that modified base).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _check_plain_lora(config: Mapping[str, Any]) -> None:
    """Refuse adapter configs whose math the generative variant does not implement."""
    bad = [f"{key}={config[key]!r}" for key in _UNSUPPORTED_FIELDS if config.get(key)]
    if str(config.get("bias", "none")).lower() not in ("none", "null"):
        bad.append(f"bias={config['bias']!r}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        bad.append(f"init_lora_weights={init!r} (it modifies the base weights)")
    if bad:
        raise TwinError(
            f"meldkit.twin: the adapter sets {', '.join(bad)}: only plain LoRA adapters "
            "(W·x + s·B·A·x on linear layers) are supported"
        )


@dataclass
class TwinLoraExperts:
    """Shared LoRA factors and compressed exclusive parts (see the module docstring)."""

    tasks: list[str]
    scaling: dict[str, float]
    shared_a: dict[str, torch.Tensor]
    shared_b: dict[str, torch.Tensor]
    delta_a: dict[
        str, tuple[torch.Tensor, torch.Tensor]
    ]  # ΔA_t ≈ u[t] @ v[t].T: [T, r, k], [T, n, k]
    delta_b: dict[
        str, tuple[torch.Tensor, torch.Tensor]
    ]  # ΔB_t ≈ u[t] @ v[t].T: [T, m, k], [T, r, k]
    errors: dict[str, list[float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def storage(self) -> dict[str, int]:
        """Bytes: ``twin`` (shared and exclusive factors) and ``experts`` (the T adapters as
        read, float32: their own ranks and modules, before :func:`align_adapters`)."""

        def nbytes(*ts: torch.Tensor) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        shared = sum(nbytes(self.shared_a[m], self.shared_b[m]) for m in self.shared_a)
        exclusive = sum(nbytes(*self.delta_a[m], *self.delta_b[m]) for m in self.delta_a)
        return {
            "shared": shared,
            "exclusive": exclusive,
            "twin": shared + exclusive,
            "experts": int(self.config.get("expert_bytes", self.num_tasks * shared)),
        }


def align_adapters(adapters: Sequence[LoraAdapter]) -> tuple[list[LoraAdapter], dict[str, float]]:
    """Bring adapters of different ranks, scalings and target modules to common factor shapes.

    For every module adapted by at least one adapter, with s_t adapter t's scaling there
    (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA) and R the largest rank:

    * scaling: the module keeps one scaling c, the s_t's common value when all adapters adapting
      it share one, else 1; each B_t becomes (s_t / c)·B_t, so c·B_t'·A_t = s_t·B_t·A_t (scalings
      folded into B before the shared factors are formed; pulling a common c out of every B is
      exact, and leaves equal-scaling adapters bit for bit as the reference merges them);
    * rank: A_t ``[r_t, n]`` gets R − r_t zero rows, B_t ``[m, r_t]`` R − r_t zero columns
      (B_t·A_t unchanged);
    * an adapter that does not adapt the module gets zero factors ``[R, n]``, ``[m, R]``.

    Returns the aligned adapters (``scaling`` 1 for every module, or c where pulled out: the
    returned mapping) and ``{module: c}`` in first-seen module order.
    """
    modules: dict[str, None] = {}
    for ad in adapters:
        modules.update(dict.fromkeys(ad.a))
    aligned = [LoraAdapter({}, {}, {}) for _ in adapters]
    common: dict[str, float] = {}
    for m in modules:
        have = [ad for ad in adapters if m in ad.a]
        a0, b0 = have[0].a[m], have[0].b[m]
        for ad in have[1:]:
            if ad.a[m].shape[1] != a0.shape[1] or ad.b[m].shape[0] != b0.shape[0]:
                raise TwinError(
                    f"meldkit.twin.build_lora: {m}: the adapters' factors do not fit one "
                    f"layer (A {list(ad.a[m].shape)} vs {list(a0.shape)}, B "
                    f"{list(ad.b[m].shape)} vs {list(b0.shape)})"
                )
        scales = {ad.scaling[m] for ad in have}
        c = scales.pop() if len(scales) == 1 else 1.0
        common[m] = c
        rank = max(ad.a[m].shape[0] for ad in have)
        for ad, out in zip(adapters, aligned, strict=True):
            a = torch.zeros(rank, a0.shape[1])
            b = torch.zeros(b0.shape[0], rank)
            if m in ad.a:
                r = ad.a[m].shape[0]
                a[:r] = ad.a[m]
                s = ad.scaling[m]
                b[:, :r] = ad.b[m] if s == c else (s / c) * ad.b[m]
            out.a[m], out.b[m], out.scaling[m] = a, b, c
    return aligned, common


def build_lora(
    adapters: Sequence[Any] | Mapping[str, Any],
    *,
    lam: float = 0.3,
    rank: int = 8,
    device: str | torch.device | None = None,
    adapter_name: str = "default",
) -> TwinLoraExperts:
    """Twin-Merging over LoRA adapters of one base model (the released generative pipeline).

    Parameters
    ----------
    adapters : sequence or mapping of adapters
        PEFT adapter folders or ``PeftModel`` objects (their ``adapter_name``), all over the same
        base model; a mapping names the tasks. Ranks, ``lora_alpha``, rsLoRA and target modules
        may differ between adapters: see :func:`align_adapters`.
    lam : float
        λ of the shared factors A_s = λ·ΣA_t, B_s = λ·ΣB_t (0.3, the reference's).
    rank : int
        Rank kept of each exclusive factor difference (8, the reference's), capped at its size.
    device : str or torch.device, optional
        Where the SVDs run (default the GPU when there is one, else the CPU).
    """
    if isinstance(adapters, Mapping):
        tasks = task_names(adapters, "meldkit.twin.build_lora")
        items = list(adapters.values())
    else:
        items = list(adapters)
        tasks = [f"task{i}" for i in range(len(items))]
    if not items:
        raise TwinError("meldkit.twin.build_lora: 'adapters' is empty")
    rank = _check_rank(rank, "meldkit.twin.build_lora")
    if rank is None:
        raise TwinError("meldkit.twin.build_lora: 'rank' must be an int ≥ 1, got None")
    read = [read_adapter(a, adapter_name) for a in items]
    expert_bytes = sum(
        t.numel() * t.element_size() for ad in read for t in (*ad.a.values(), *ad.b.values())
    )
    read, scaling = align_adapters(read)
    modules = list(scaling)
    dev = torch.device(device) if device is not None else default_svd_device()
    out = TwinLoraExperts(
        tasks=tasks,
        scaling=scaling,
        shared_a={},
        shared_b={},
        delta_a={},
        delta_b={},
        config={"lam": float(lam), "rank": rank, "expert_bytes": expert_bytes},
    )
    for m in modules:
        for which, store_s, store_d in (
            ("a", out.shared_a, out.delta_a),
            ("b", out.shared_b, out.delta_b),
        ):
            mats = [getattr(ad, which)[m] for ad in read]
            for task, mat in zip(tasks, mats, strict=True):
                if not bool(torch.isfinite(mat).all()):
                    raise TwinError(
                        f"meldkit.twin.build_lora: {m}.lora_{which.upper()} of adapter {task!r} "
                        "holds NaN or inf"
                    )
            shared = float(lam) * torch.stack(mats).sum(0)
            us, vs, errs = [], [], []
            for mat in mats:
                u, v, err = compress(mat - shared, rank, dev)
                us.append(u.cpu())
                vs.append(v.cpu())
                errs.append(err)
            store_s[m] = shared
            store_d[m] = (torch.stack(us), torch.stack(vs))
            out.errors[f"{m}.lora_{which.upper()}"] = errs
    return out


class TwinLoraLinear(nn.Linear):
    """``W·x + b + s·B*(A*·x)`` with A*, B* mixed per sequence from the shared and exclusive
    LoRA factors; the base layer's parameters keep their names."""

    def __init__(self, linear: nn.Linear, name: str, routing: Routing, ex: TwinLoraExperts) -> None:
        nn.Module.__init__(self)
        self.training = linear.training  # the replaced layer's train/eval mode
        self.weight, self.bias = linear.weight, linear.bias
        # A GPT-2 Conv1D holds weight [in, out] (y = x·W + b); PEFT's LoRA on it is the same
        # x·Aᵀ·Bᵀ as on nn.Linear, so only the base product differs.
        self.transposed = is_conv1d(linear)
        w = self.weight.T if self.transposed else self.weight
        self.out_features, self.in_features = w.shape
        self.name, self.routing, self.scaling = name, routing, ex.scaling[name]
        dev = linear.weight.device
        ua, va = ex.delta_a[name]
        ub, vb = ex.delta_b[name]
        buffers = {
            "shared_a": ex.shared_a[name],  # [r, n]
            "shared_b": ex.shared_b[name],  # [m, r]
            "da_in": va.transpose(1, 2).contiguous(),  # [T, k, n]
            "da_out": ua.contiguous(),  # [T, r, k]
            "db_in": vb.transpose(1, 2).contiguous(),  # [T, k, r]
            "db_out": ub.contiguous(),  # [T, m, k]
        }
        for key, t in buffers.items():
            self.register_buffer(key, t.to(dev), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.T if self.transposed else self.weight, self.bias)
        xa = x.to(self.shared_a.dtype)
        h = F.linear(xa, self.shared_a)
        r = self.routing
        gates = None
        if r.mode == "twin":
            b = r.batch(self.name, x.shape[0])
            if xa.shape[0] != b:
                xa = xa.expand(b, *xa.shape[1:])
                h = h.expand(b, *h.shape[1:])
            gates = _broadcast(r.weights, xa.dim()).expand(*xa.shape[:-1], r.weights.shape[1])
            h = h + routed_lora(xa, self.da_in, self.da_out, 1.0, gates=gates)[0]
        out = F.linear(h, self.shared_b)
        if gates is not None:
            out = out + routed_lora(h, self.db_in, self.db_out, 1.0, gates=gates)[0]
        return y + (self.scaling * out).to(y.dtype)


def last_token_hidden(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The router input of the generative variant: the last layer's hidden state at each
    sequence's last real token (left or right padding; ``attention_mask`` by keyword or
    position, and over cached positions too: its last L columns are the input's), ``[B, d]``
    float32. The caller's ``return_dict``, ``output_hidden_states``, ``output_attentions`` and
    cache arguments are left out of this pass."""
    hidden, mask = _last_hidden(model, args, kwargs)
    if mask is None:
        return hidden[:, -1]
    length = mask.shape[1]
    # the last position whose mask is 1
    last = (mask.long() * torch.arange(1, length + 1, device=mask.device)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


class TwinLoraModel(RoutedMixin, nn.Module):
    """A causal LM with Twin-Merged LoRA experts, routed per sequence (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The base model (the adapters' base; copied unless ``copy=False``, frozen).
    experts : TwinLoraExperts
        From :func:`build_lora`.
    router : TwinRouter, optional
        Default: a new one over ``config.hidden_size``, for :func:`meldkit.twin.train_router`.
    top_k : int, optional
        Mix only the k most likely tasks.
    features : callable, optional
        ``features(model, *args, **kwargs) -> [B, d]``: the router input, computed with the
        shared adapters; default :func:`last_token_hidden`.
    copy : bool
        Deep-copy ``model`` first (default) rather than modify it. Its parameters are frozen.
    """

    def __init__(
        self,
        model: nn.Module,
        experts: TwinLoraExperts,
        *,
        router: TwinRouter | None = None,
        top_k: int | None = None,
        features: Callable[..., torch.Tensor] | None = None,
        copy: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(experts, TwinLoraExperts):
            raise TypeError(
                f"TwinLoraModel: 'experts' must be TwinLoraExperts, got {type(experts)}"
            )
        top_k = check_top_k(top_k, experts.num_tasks, "TwinLoraModel")
        self.model = _copy(model) if copy else model
        self.model.requires_grad_(False)
        self.tasks, self.top_k, self.experts = list(experts.tasks), top_k, experts
        self.routing = Routing()
        self.features_fn = features or last_token_hidden
        for name in experts.shared_a:
            try:
                module = self.model.get_submodule(name)
            except AttributeError:
                raise TwinError(
                    f"TwinLoraModel: the model has no module {name!r} that the adapters adapt"
                ) from None
            if type(module) is not nn.Linear and not is_conv1d(module):
                raise TwinError(
                    f"TwinLoraModel: {name!r} is a {type(module).__name__}, not nn.Linear "
                    "(or GPT-2's Conv1D)"
                )
            out_features, in_features = (
                module.weight.T.shape if is_conv1d(module) else module.weight.shape
            )
            if experts.shared_a[name].shape[1] != in_features or (
                experts.shared_b[name].shape[0] != out_features
            ):
                raise TwinError(f"TwinLoraModel: {name!r}: the adapters do not fit its shape")
            replace_module(self.model, name, TwinLoraLinear(module, name, self.routing, experts))
        if router is None:
            d = _hidden_size(self.model)
            if d is None:
                raise TwinError(
                    "TwinLoraModel: no config.hidden_size: pass router=TwinRouter(d, T)"
                )
            router = TwinRouter(d, experts.num_tasks)
        self.router = router.to(next(self.model.parameters()).device)

    def _routed(self, args, kwargs, weights):
        device = next(self.model.parameters()).device
        b = _batch_size(args, kwargs)
        return self._routing_weights(args, kwargs, weights, b, device)

    @declare_inputs
    @one_at_a_time
    def forward(self, *args: Any, weights: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The model's forward with each sequence's merged adapters (``weights [B, T]`` or the
        router's).

        KV caches: the routing pass never sees the caller's cache. A decoding step that passes
        a cache this model returned (``cache``/``past_key_values``) keeps the weights its
        sequences were routed with (their prompt's, as :meth:`generate`); a non-empty cache
        from elsewhere needs ``weights``."""
        self._refuse_untrainable_step(args, kwargs, weights)
        w = self._routed(args, kwargs, weights)
        r = self.routing
        r.mode, r.weights, r.task = "twin", w, w.argmax(-1)
        try:
            out = self.model(*args, **kwargs)
        finally:
            r.mode, r.weights, r.task = "plain", None, None
        self._remember_cache(out, w)
        return out

    @one_at_a_time
    @torch.no_grad()
    def generate(self, *args: Any, weights: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with each prompt routed once (its weights kept for every new token),
        at the positions ``generate`` gives it (a left-padded prompt is routed as it is alone).
        Beam search and several sequences per prompt are refused: they change the batch."""
        return self._generate(args, kwargs, weights, None)


__all__ = [
    "LoraAdapter",
    "TwinLoraExperts",
    "TwinLoraLinear",
    "TwinLoraModel",
    "align_adapters",
    "build_lora",
    "last_token_hidden",
    "read_adapter",
]
