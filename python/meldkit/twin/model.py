"""Twin-Merging, dynamic merging: a router and the per-sample model θ_s + Σ_t w_t(x)·v_t."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import operator
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from meldkit._native import _outside_stacklevel
from meldkit.goat.model import replace_module
from meldkit.twin.build import (
    TwinError,
    TwinExperts,
    _named_tensors,
    check_top_k,
    module_tensors,
)
from meldkit.twin.layers import (
    Routing,
    TwinEmbedding,
    TwinLayerNorm,
    TwinLinear,
    TwinPerSample,
    cat_samples,
    is_conv1d,
    slice_sample,
)


class TwinRouter(nn.Module):
    """The paper's router: Linear(d → h) · BatchNorm · LeakyReLU · Dropout(0.5) ·
    Linear(h → h) · BatchNorm · LeakyReLU · Dropout(0.5) · Linear(h → T), h = 2·d by default.
    Returns logits ``[B, T]``.

    ``trained`` says whether :func:`train_router` trained it (or :func:`meldkit.twin.load`
    loaded a trained one); a model that routes with an untrained router warns once. Set it to
    True after training the router another way."""

    def __init__(
        self, in_features: int, num_tasks: int, hidden: int | None = None, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.trained = False
        h = 2 * in_features if hidden is None else hidden
        self.in_features, self.num_tasks, self.hidden, self.dropout = (
            in_features,
            num_tasks,
            h,
            dropout,
        )
        self.net = nn.Sequential(
            nn.Linear(in_features, h),
            nn.BatchNorm1d(h),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(h, h),
            nn.BatchNorm1d(h),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(h, num_tasks),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def _router_dtype(router: nn.Module) -> torch.dtype:
    """The dtype of the router's parameters (float32 when it has none)."""
    p = next(router.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


# Modules called with inputs that have no batch dimension (T5's and MPNet's relative-position
# bias tables, looked up with [query, key] bucket ids): routed one sample at a time.
_BATCH_FREE = ("relative_attention_bias",)
# Keyword arguments of Hugging Face models that are batch-first whenever their first dimension is
# the batch size (see BATCH_KWARGS); a routed model's forward also names them in its signature
# (see declare_inputs).
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "labels",
    "start_positions",
    "end_positions",
    "pixel_values",
    "pixel_mask",
    "input_values",
    "input_features",
    "decoder_input_ids",
    "decoder_attention_mask",
    "decoder_inputs_embeds",
)
# Keyword arguments that only feed a Hugging Face model's loss: never part of the routing pass.
LOSS_KWARGS = ("labels", "start_positions", "end_positions", "num_items_in_batch")
# Keyword arguments that carry a Hugging Face model's KV cache (``cache`` since transformers 5,
# ``past_key_values`` before): the routing pass never runs with the caller's cache, which it
# would extend with the shared model's keys and values.
CACHE_KWARGS = ("cache", "past_key_values", "cache_params", "use_cache", "cache_position")
# Keyword arguments that shape a Hugging Face model's output: the routing pass sets its own.
OUTPUT_KWARGS = ("return_dict", "output_hidden_states", "output_attentions")


class _Signature:
    """What this module reads off a ``forward``'s signature: the signature (None where it has
    none) and whether it takes ``**kwargs``."""

    __slots__ = ("sig", "var_keyword")

    def __init__(self, forward: Any) -> None:
        try:
            self.sig: inspect.Signature | None = inspect.signature(forward)
        except (TypeError, ValueError):
            self.sig = None
        self.var_keyword = self.sig is not None and any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in self.sig.parameters.values()
        )


# A method's function -> its _Signature as a bound method (the instance's parameter left out):
# ``inspect.signature`` costs tens of µs per call, and a forward reads it several times.
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward_signature(model: nn.Module) -> _Signature:
    """:class:`_Signature` of ``model.forward``: cached by the method's function (the class's
    ``forward``, or the one an instance's own bound ``forward`` wraps); a ``forward`` that is no
    bound method (a hook's ``functools.partial``, a plain function) is read each time."""
    forward = model.forward
    if not isinstance(forward, MethodType):
        return _Signature(forward)
    func = forward.__func__
    try:
        facts = _SIGNATURES.get(func)
    except TypeError:  # not hashable
        return _Signature(forward)
    if facts is None:
        facts = _Signature(forward)
        try:
            _SIGNATURES[func] = facts
        except TypeError:  # not weakly referenceable
            pass
    return facts


# The binding of the call a :class:`RoutedMixin` forward is routing, while its routing pass runs:
# ``(model, args, kwargs, named)``, ``named`` as :func:`bind_arguments` gives it. The default
# feature functions bind that call again (less its loss and cache keywords); they read it here.
_ROUTED_CALL: ContextVar[tuple | None] = ContextVar("meldkit_twin_routed_call", default=None)


def _bound(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[tuple, dict[str, Any]] | None:
    """:func:`bind_arguments` of a call whose binding :data:`_ROUTED_CALL` holds (the same
    model and positional arguments, keywords a subset of its), else None."""
    routed = _ROUTED_CALL.get()
    if routed is None:
        return None
    r_model, r_args, r_kwargs, named = routed
    if model is not r_model or len(args) != len(r_args):
        return None
    if any(a is not b for a, b in zip(args, r_args, strict=True)):
        return None
    if any(k not in r_kwargs or r_kwargs[k] is not v for k, v in kwargs.items()):
        return None
    dropped = [k for k in r_kwargs if k not in kwargs]
    if dropped:
        params = _forward_signature(model).sig.parameters
        if any(k in params and _required(params[k]) for k in dropped):
            return None  # a required argument left out: that call does not bind
        return (), {k: v for k, v in named.items() if k not in dropped}
    return (), dict(named)


def _required(p: inspect.Parameter) -> bool:
    return p.default is inspect.Parameter.empty and p.kind not in (
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    )


def bind_arguments(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of a call to ``model`` with the positional arguments named by its
    ``forward``'s signature (``model(ids, mask)`` → ``attention_mask=mask``), so that callers
    can find them by name; unchanged where they cannot be named (``*args``, positional-only
    parameters, a signature that does not bind)."""
    if not args:
        return (), dict(kwargs)
    sig = _forward_signature(model).sig
    if sig is None:
        return tuple(args), dict(kwargs)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return tuple(args), dict(kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            return tuple(args), dict(kwargs)
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return (), named


def _last_hidden(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden [B, L, d] float32, mask [B, L] or None)``: a Hugging Face model's last hidden
    state in a pass of its own (hidden states on, a ``ModelOutput``, no cache, whatever the
    caller asked of its own forward) and the attention mask of those L positions. For an
    encoder-decoder (an output without ``hidden_states``), the encoder's last state."""
    bound = _bound(model, args, kwargs) if args else None
    args, kwargs = bind_arguments(model, args, kwargs) if bound is None else bound
    kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS + OUTPUT_KWARGS}
    mask = kwargs.get("attention_mask")
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None:
        if tokens.dim() >= 2 and mask.shape[1] > tokens.shape[1]:
            # a mask over cached positions as well (a decoding step): this pass runs without
            # the cache, on the input's own positions, its mask's last L columns
            mask = kwargs["attention_mask"] = mask[:, -tokens.shape[1] :]
    if _accepts(model, "return_dict"):
        kwargs["return_dict"] = True
    out = model(*args, output_hidden_states=True, **kwargs)
    if isinstance(out, Mapping):
        # an encoder-decoder's output has no hidden_states: its encoder's last state, over the
        # input's tokens (the ones the attention mask covers)
        states = out.get("hidden_states")
        hidden = states[-1] if states is not None else out.get("encoder_last_hidden_state")
        if hidden is None:
            raise TwinError(
                f"meldkit.twin: {type(model).__name__}'s output has neither hidden_states nor "
                "encoder_last_hidden_state to route on: pass features=..."
            )
    else:
        hidden = out.hidden_states[-1]
    return hidden.float(), mask


def _generating_model(model: nn.Module) -> nn.Module:
    """The model whose ``generate`` derives the prompt's positions: a PEFT ``PeftModel``'s
    base model (``get_base_model()``; its own ``forward`` names no ``position_ids`` and its
    ``generate`` calls the base model's), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        inner = get_base()
        if isinstance(inner, nn.Module):
            return inner
    return model


def _generation_positions(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> torch.Tensor | None:
    """The ``position_ids`` that Hugging Face's ``generate`` gives the prompt's first forward
    when the caller passes none, so that the routing pass reads the prompt as the generation
    does. Where the model has transformers' hook for them
    (``_prepare_position_ids_for_generation``, transformers 5; multimodal models such as
    Qwen3-VL override it to give 3-D M-RoPE positions), the hook's, on the prompt (ids, else
    embeddings) and its mask; else, as ``generate`` derived them before (models'
    ``prepare_inputs_for_generation``), ``cumsum(mask) - 1`` ``[B, L]`` int64 over the
    attention mask (by keyword or position), padding at 0: a left-padded prompt has the
    positions it has alone. None where ``generate`` derives none: a model whose ``forward``
    has no ``position_ids`` parameter (by name; a ``PeftModel``'s base model's, which its
    ``generate`` runs), an encoder-decoder, or (without the hook) no 2-D mask."""
    inner = _generating_model(model)
    sig = _forward_signature(inner).sig
    if sig is None or "position_ids" not in sig.parameters:
        return None
    if getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        return None
    named = bind_arguments(model, args, kwargs)[1]
    mask = named.get("attention_mask")
    hook = getattr(inner, "_prepare_position_ids_for_generation", None)
    prompt = named.get("input_ids")
    if prompt is None:
        prompt = named.get("inputs_embeds")
    if callable(hook) and isinstance(prompt, torch.Tensor) and prompt.dim() >= 2:
        model_kwargs = {} if mask is None else {"attention_mask": mask}
        positions = hook(prompt, model_kwargs)
        if isinstance(positions, torch.Tensor):
            return positions
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name`` (by name or through ``**kwargs``)."""
    facts = _forward_signature(model)
    return facts.sig is not None and (facts.var_keyword or name in facts.sig.parameters)


def mean_pooled_last_hidden(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The router input of the paper: the last hidden state averaged over the sequence, padding
    left out (``attention_mask``, by keyword or position), ``[B, d]`` float32. For Hugging Face
    models; the caller's ``return_dict``, ``output_hidden_states``, ``output_attentions`` and
    cache arguments are left out of this pass."""
    hidden, mask = _last_hidden(model, args, kwargs)
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _batch_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    for v in [*args, *kwargs.values()]:
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return v.shape[0]
    raise TwinError("meldkit.twin: no tensor input to take the batch size from")


def _first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in nested tuples/lists (a legacy KV cache's first layer's keys)."""
    while isinstance(obj, (tuple, list)) and len(obj) > 0:
        obj = obj[0]
    return obj if isinstance(obj, torch.Tensor) else None


def _cache_key(cache: Any) -> Any:
    """What identifies a KV cache between steps: the object itself (a ``transformers`` Cache,
    extended in place), or for a legacy tuple cache (``((k, v), ...)`` per layer, rebuilt on
    every step) its first key tensor; None when neither can be held by a weak reference."""
    if isinstance(cache, (tuple, list)):
        return _first_tensor(cache)
    try:
        weakref.ref(cache)
    except TypeError:
        return None
    return cache


def _cache_length(cache: Any) -> int:
    """Positions a KV cache holds (a ``transformers`` Cache or a legacy tuple of per-layer
    ``(keys [B, H, T, D], values)``); 1 for a cache of another kind (taken as holding some)."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):
        first = _first_tensor(cache)
        if first is None:
            return 0 if len(cache) == 0 else 1
        return int(first.shape[-2]) if first.dim() >= 2 else 1
    return 1


def declare_inputs(forward: Callable) -> Callable:
    """``forward`` (a routed model's ``forward(self, *args, ..., **kwargs)``) with a signature
    that also names the Hugging Face inputs of :data:`MODEL_INPUTS` as keyword-only parameters
    (default None), before its ``**kwargs``. Code that reads a model's inputs off its forward's
    signature then sees the wrapped model's: ``transformers.Trainer`` keeps only the dataset
    columns the signature names (``remove_unused_columns``) and takes those with "label" in
    their name as the labels. Calls bind as before (the names went to ``**kwargs``)."""
    sig = inspect.signature(forward)
    params = list(sig.parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    named = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    inputs = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in MODEL_INPUTS
        if name not in sig.parameters
    ]
    forward.__signature__ = sig.replace(parameters=[*named, *inputs, *var_keyword])
    return forward


def one_at_a_time(method: Callable) -> Callable:
    """A method of a routed model that holds its routing's lock (:attr:`Routing.lock`): the
    twin layers read the routing of the forward that set it, so forwards from several threads
    run one after the other."""

    @functools.wraps(method)
    def locked(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo cannot trace a lock: take it outside
            return method(self, *args, **kwargs)
        with self.routing.lock:
            return method(self, *args, **kwargs)

    return locked


class RoutedMixin:
    """The router side shared by :class:`TwinModel` and :class:`meldkit.twin.TwinLoraModel`
    (``self.model``, ``self.router``, ``self.routing``, ``self.features_fn``, ``self.tasks``,
    ``self.top_k``)."""

    def _refuse_untrainable_step(self, args, kwargs, weights) -> None:
        """Refuse ``Trainer.train``'s call (train mode, gradients on, labels, the router's
        weights) when nothing in it can get a gradient: the routing pass gives the task loss
        none (the router is trained by :func:`train_router`), and backward would fail with
        "element 0 of tensors does not require grad". A wrapped model with trainable
        parameters, or inputs or ``weights`` that require grad, train as before."""
        if not (self.training and torch.is_grad_enabled()) or kwargs.get("labels") is None:
            return
        if weights is not None or any(p.requires_grad for p in self.model.parameters()):
            return
        if any(isinstance(v, torch.Tensor) and v.requires_grad for v in (*args, *kwargs.values())):
            return
        raise TwinError(
            f"{type(self).__name__}: a training step with labels, but nothing in it can get a "
            "gradient: the router is not trained through the task loss; train it with "
            "meldkit.twin.train_router (Trainer.evaluate and predict work), unfreeze the "
            "wrapped model's parameters to fine-tune them, or pass weights= that require grad"
        )

    # ---- routing ------------------------------------------------------------------------------

    @one_at_a_time
    @torch.no_grad()
    def features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The router input ``[B, d]`` under the shared weights (base values for excluded ones).
        Loss-only keywords (``labels``, …) are left out: the shared model's head need not fit
        them; so are KV-cache keywords (``cache``, ``past_key_values``, ``use_cache``, …): the
        routing pass must not extend the caller's cache."""
        self.routing.mode = "plain"
        kwargs = {k: v for k, v in kwargs.items() if k not in LOSS_KWARGS + CACHE_KWARGS}
        return self.features_fn(self.model, *args, **kwargs).float()

    def _routing_weights(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], weights: Any, b: int, device
    ) -> torch.Tensor:
        """The checked ``[B, T]`` weights of a forward: ``weights`` when given; for a KV cache
        that holds positions, the weights its sequences were routed with when this model filled
        it (a cached decoding step continues the prompt's routing, as :meth:`generate` does);
        else the router's on these inputs."""
        routed = None
        if weights is None:
            named = kwargs
            if len(args) >= 2:
                unnamed, named = bind_arguments(self.model, args, kwargs)
                if not unnamed:  # every argument named: the routing pass reuses this binding
                    routed = (self.model, tuple(args), kwargs, named)
            cache = next((named[k] for k in CACHE_KWARGS[:3] if named.get(k) is not None), None)
            if cache is not None and _cache_length(cache) > 0:
                key = _cache_key(cache)
                weights = None if key is None else self._cache_weights().get(key)
                if weights is None:
                    raise TwinError(
                        f"{type(self).__name__}: the KV cache passed holds positions that this "
                        "model did not route (a cache of its own outputs continues their "
                        "routing): pass the sequence's routing, weights=model.route(...) of "
                        "its prompt"
                    )
        if weights is None:
            token = _ROUTED_CALL.set(routed)
            try:
                weights = self.route(*args, **kwargs)
            finally:
                _ROUTED_CALL.reset(token)
        return self._check_weights(weights, b, device)

    def _generate(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], weights: Any, task: Any
    ) -> Any:
        """``self.model.generate(*args, **kwargs)`` with each prompt routed once: its weights
        (``weights``, else the router's on the prompt) and task (``task``, else its top task)
        stay for every new token. The routing pass reads the prompt at the positions
        ``generate`` gives it (the caller's ``position_ids``, else those it derives from the
        mask: :func:`_generation_positions`), so a left-padded prompt is routed as it is alone.
        Beam search and several sequences per prompt change the batch: refused."""
        where = f"{type(self).__name__}.generate"
        # The effective settings: the call's, else its generation_config's, else the model's
        # own (summarisation checkpoints ship num_beams=4).
        configs = [kwargs.get("generation_config"), getattr(self.model, "generation_config", None)]
        for key in ("num_beams", "num_return_sequences"):
            value = kwargs.get(key)
            for config in configs:
                if value is None and config is not None:
                    value = getattr(config, key, None)
            if int(value or 1) != 1:
                raise TwinError(
                    f"{where}: {key} = {value} is not supported (it changes the batch); pass "
                    f"{key}=1"
                )
        generate = getattr(self.model, "generate", None)
        if not callable(generate):
            raise TwinError(
                f"{where}: the wrapped model ({type(self.model).__name__}) has no generate"
            )
        # The prompt, as ids or embeddings (the embeddings when both are given, as the model
        # then reads them), its mask and its positions; never a cache.
        route_args = tuple(args)
        keys = ("input_ids", "attention_mask", "position_ids")
        route_kwargs = {k: kwargs[k] for k in keys if kwargs.get(k) is not None}
        if kwargs.get("inputs_embeds") is not None:
            route_args = ()
            route_kwargs.pop("input_ids", None)
            route_kwargs["inputs_embeds"] = kwargs["inputs_embeds"]
        if "position_ids" not in route_kwargs:
            positions = _generation_positions(self.model, route_args, route_kwargs)
            if positions is not None:
                route_kwargs["position_ids"] = positions
        device = next(self.model.parameters()).device
        b = _batch_size(route_args, route_kwargs)
        given = weights is not None
        w = self._routing_weights(route_args, route_kwargs, weights, b, device)
        task = self._top_task(w, given) if task is None else self._check_task(task, b, device)
        r = self.routing
        r.mode, r.weights, r.task = "twin", w, task
        try:
            return generate(*args, **kwargs)
        finally:
            r.mode, r.weights, r.task = "plain", None, None

    def _cache_weights(self) -> WeakIdKeyDictionary:
        """KV caches this model returned (by :func:`_cache_key`, held weakly, compared by
        identity) -> the weights ``[B, T]`` their sequences run with."""
        caches = self.__dict__.get("_routed_caches")
        if caches is None:
            caches = self.__dict__["_routed_caches"] = WeakIdKeyDictionary()
        return caches

    def _remember_cache(self, out: Any, weights: torch.Tensor) -> None:
        """Keep the weights of the sequences whose KV cache ``out`` returns, for later steps."""
        if not isinstance(out, Mapping):
            return
        # by the output's own keys: asking transformers 5 for an old name warns
        for key, cache in out.items():
            if key in CACHE_KWARGS[:3] and cache is not None:
                handle = _cache_key(cache)
                if handle is not None:
                    self._cache_weights()[handle] = weights
                return

    @one_at_a_time
    @torch.no_grad()
    def route(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Softmax router weights ``[B, T]`` float32 (top-k renormalised when ``top_k``). The
        float32 features are cast to the router's dtype (a model cast with ``.to(bfloat16)``
        or ``.half()`` casts its router too)."""
        self._warn_untrained()
        was = self.router.training
        self.router.eval()
        try:
            features = self.features(*args, **kwargs)
            logits = self.router(features.to(_router_dtype(self.router)))
        finally:
            self.router.train(was)
        return self._weights(logits)

    def _warn_untrained(self) -> None:
        """Warn, once per model, when routing with a router nobody trained: its weights are
        those of a randomly initialised network, not a choice of task."""
        if getattr(self.router, "trained", True) or getattr(self, "_warned_untrained", False):
            return
        self._warned_untrained = True
        warnings.warn(
            f"{type(self).__name__}: its router has not been trained, so its routing weights "
            "are those of a randomly initialised network; train it with "
            "meldkit.twin.train_router, pass weights=, or set "
            "model.router.trained = True if you trained it another way",
            UserWarning,
            stacklevel=_outside_stacklevel(),  # the user's line, however deep the call
        )

    def _weights(self, logits: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(logits.float(), -1)
        if self.top_k is not None and self.top_k < w.shape[-1]:
            top = w.topk(self.top_k, -1)
            w = torch.zeros_like(w).scatter_(-1, top.indices, top.values)
            w = w / w.sum(-1, keepdim=True)
        return w

    def _check_weights(self, weights: Any, b: int, device) -> torch.Tensor:
        w = torch.as_tensor(weights, dtype=torch.float32, device=device)
        if w.shape != (b, len(self.tasks)):
            raise TwinError(
                f"TwinModel: 'weights' has shape {list(w.shape)}, expected "
                f"[{b}, {len(self.tasks)}] (batch, tasks)"
            )
        if not torch.isfinite(w).all():
            raise TwinError("TwinModel: 'weights' contains NaN or inf")
        return w

    def _top_task(self, weights: torch.Tensor, given: bool) -> torch.Tensor:
        """Each sample's top task ``[B]`` int64, the default ``task``. Warns when ``weights``
        the caller gave (``given``; the router's are never all zero) have an all-zero row:
        that sample runs θ_s with task 0's task-specific tensors, most likely not meant."""
        if given and weights.numel() and not bool(weights.any(-1).all()):
            rows = (~weights.any(-1)).nonzero().flatten().tolist()
            warnings.warn(
                f"{type(self).__name__}: 'weights' of sample(s) {rows[:5]} are all zero: "
                f"they run the shared model with task {self.tasks[0]!r}'s task-specific "
                "tensors (the top task of a zero row is the first); pass 'task' to choose",
                stacklevel=6,  # the caller of forward or generate
            )
        return weights.argmax(-1)

    def _check_task(self, task: Any, b: int, device) -> torch.Tensor:
        if isinstance(task, str) or (isinstance(task, int) and not isinstance(task, bool)):
            task = [task] * b
        if isinstance(task, Sequence) and task and isinstance(task[0], str):
            unknown = [t for t in task if t not in self.tasks]
            if unknown:
                raise TwinError(f"TwinModel: unknown task {unknown[0]!r} (tasks: {self.tasks})")
            task = [self.tasks.index(t) for t in task]
        try:
            t = torch.as_tensor(task, device=device)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            # a float or bool tensor would be cast to int64 silently (1.9 -> 1, True -> 1)
            what = type(task).__name__ if t is None else f"{type(task).__name__} of {t.dtype}"
            raise TwinError(
                "TwinModel: 'task' must be task indices (ints, an integer tensor) or names, "
                f"got a {what}: {task!r}"
            )
        t = t.to(torch.int64).reshape(-1)
        if t.numel() != b or (t.numel() and (t.min() < 0 or t.max() >= len(self.tasks))):
            raise TwinError(
                f"TwinModel: 'task' must give one task in 0 … {len(self.tasks) - 1} per sample "
                f"({b}), got {task!r}"
            )
        return t


class TwinModel(RoutedMixin, nn.Module):
    """A model that merges per input: θ*(x) = θ_s + Σ_t w_t(x)·v_t (Twin-Merging's inference).

    For each batch the router reads the shared model's features (by default the last hidden
    state averaged over the tokens, :func:`mean_pooled_last_hidden`) and gives softmax weights
    ``w [B, T]`` (optionally only the top k, renormalised). Every adapted ``nn.Linear`` (and
    GPT-2 ``Conv1D``, read as the transpose of its ``[in, out]`` weight) then computes
    ``θ_s·x + Σ_t w_t·a_t·(b_tᵀ·x)`` per sample through :func:`meldkit.ops.routed_lora` in gate
    mode (no dense weight is rebuilt per sample), embeddings add ``Σ_t w_t a_t[ids]·b_tᵀ``,
    LayerNorm scales and 1-D exclusive parts are mixed per sample, and modules with other routed
    tensors (RMSNorm scales, BatchNorm running statistics: floating buffers are merged like
    parameters) run once per sample. Task-specific tensors (heads, biases) come from each
    sample's task: the given ``task``, else the router's top task.

    ``materialize=True`` instead rebuilds the dense merged weights for each sample and runs the
    original model with them (``torch.func.functional_call``), as the reference code does: for
    parity checks and for layers the activation path does not handle. Heads whose tasks have
    different label counts return the widest task's ``[..., max_t C_t]`` either way, columns past
    a sample's own task's count -inf (with or without a bias).

    :meth:`generate` routes each prompt once and keeps its merge for every new token. A model
    cast with ``.to(torch.bfloat16)`` or ``.half()`` casts its router too (its float32 features
    are cast to the router's dtype). Calls from several threads run one after the other (the
    routing is state every twin layer reads: :attr:`Routing.lock`). A model that cannot take
    the per-sample output of an input its batch shares (DeBERTa's relative-position embeddings)
    runs one sample at a time, with a warning; so does, from the start, a model whose routed
    modules take inputs without a batch dimension (T5's and MPNet's relative-position tables).

    Parameters
    ----------
    model : nn.Module
        The base model's architecture (its weights are replaced by θ_s; copied unless
        ``copy=False``). Its parameter names must match the experts', and their shapes, except
        for task-specific tensors (a head with another label count takes the experts' shape).
    experts : TwinExperts
        From :func:`meldkit.twin.build`.
    router : TwinRouter, optional
        Default: a new one over the model's hidden size (``config.hidden_size``), to train with
        :func:`train_router`.
    top_k : int, optional
        Mix only the k most likely tasks (renormalised); default all (the paper's).
    features : callable, optional
        ``features(model, *args, **kwargs) -> [B, d]``: the router input, computed with the shared
        weights; default :func:`mean_pooled_last_hidden`.
    copy : bool
        Deep-copy ``model`` first (default) rather than modify it. Its parameters are frozen.
    """

    def __init__(
        self,
        model: nn.Module,
        experts: TwinExperts,
        *,
        router: TwinRouter | None = None,
        top_k: int | None = None,
        features: Callable[..., torch.Tensor] | None = None,
        copy: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(experts, TwinExperts):
            raise TypeError(f"TwinModel: 'experts' must be TwinExperts, got {type(experts)}")
        top_k = check_top_k(top_k, experts.num_tasks, "TwinModel")
        self.model = _copy(model) if copy else model
        self.model.requires_grad_(False)  # merged inference: only the router trains
        self.tasks = list(experts.tasks)
        self.top_k = top_k
        self.features_fn = features or mean_pooled_last_hidden
        self.experts = experts
        self.routing = Routing()
        self._order_batches = True
        self._sample_by_sample = False  # see _routed
        self._batch_free: list[str] = []
        self._load_shared()
        self.per_sample_modules = self._install()
        if self._batch_free:
            # T5's and MPNet's relative-position tables are looked up with [query, key] bucket
            # ids, one result for the whole batch: no per-sample weights can reach it.
            self._sample_by_sample = True
            warnings.warn(
                f"meldkit.twin: {self._batch_free} take position buckets without a batch "
                "dimension (one lookup serves the whole batch), so each sample's merge cannot "
                "reach them in a batch: this TwinModel runs one sample at a time (exact, slower)",
                stacklevel=2,
            )
        if router is None:
            d = _hidden_size(self.model)
            if d is None:
                raise TwinError(
                    "TwinModel: cannot tell the model's hidden size (no config.hidden_size): "
                    "pass router=TwinRouter(d, T)"
                )
            router = TwinRouter(d, experts.num_tasks)
        if router.num_tasks != experts.num_tasks:
            raise TwinError(
                f"TwinModel: the router has {router.num_tasks} outputs for "
                f"{experts.num_tasks} tasks"
            )
        device = next(self.model.parameters()).device
        self.router = router.to(device)
        # Output size of each task's head when the task-specific tensors differ in shape
        # (classification heads with different label counts; padded with -inf), or when the
        # model's head had another size (its config's label count is not the heads'), else None.
        ragged = [
            v
            for n, v in experts.specific.items()
            if len({tuple(t.shape) for t in v}) > 1 or n in self._resized
        ]
        self.label_counts: list[int] | None = None
        if ragged:
            self.label_counts = [max(v[t].shape[0] for v in ragged) for t in range(len(self.tasks))]

    # ---- setup --------------------------------------------------------------------------------

    def _load_shared(self) -> None:
        """Copy θ_s into the model, after checking that the experts and the model hold the same
        tensors: each expert tensor is one of the model's (under any of its names, when tied)
        and every floating parameter and persistent buffer of the model is one of the
        experts'. Sets ``self._model_name``: expert name -> the model's first name of it."""
        params, aliases = _named_tensors(self.model)  # parameters and persistent buffers
        ex = self.experts
        names = list(dict.fromkeys([*ex.factors, *ex.dense, *ex.specific, *ex.shared]))
        missing = sorted(n for n in names if aliases.get(n, n) not in params)
        if missing:
            raise TwinError(
                f"TwinModel: the model has no parameter or buffer {missing[0]!r} (of "
                f"{len(missing)} missing): the experts were built for another architecture"
            )
        model_name: dict[str, str] = {}
        expert_name: dict[str, str] = {}
        for n in names:
            m = aliases.get(n, n)
            if m in expert_name:
                raise TwinError(
                    f"TwinModel: the experts hold {expert_name[m]!r} and {n!r} as two tensors, "
                    "but the model ties them (one parameter): build the experts from a model "
                    "tied the same way"
                )
            model_name[n], expert_name[m] = m, n
        uncovered = [n for n, t in params.items() if t.is_floating_point() and n not in expert_name]
        if uncovered:
            listed = ", ".join(repr(n) for n in uncovered[:3])
            raise TwinError(
                f"TwinModel: the experts have no tensor for the model's {listed}"
                f"{', …' if len(uncovered) > 3 else ''} ({len(uncovered)} uncovered): the "
                "experts were built for another architecture"
            )
        self._model_name = model_name
        self._resized: list[str] = []
        with torch.no_grad():
            for name, value in ex.shared.items():
                p = params[model_name[name]]
                if p.shape != value.shape and name in ex.specific:
                    # a task-specific tensor (a head with another label count): each task's own
                    # is used, the shared one only in the routing pass; take its shape
                    p.data = value.to(p.device, p.dtype, copy=True)
                    self._resized.append(name)
                    continue
                if p.shape != value.shape:
                    raise TwinError(
                        f"TwinModel: {name!r}: the model's shape {list(p.shape)} does not match "
                        f"the experts' {list(value.shape)}"
                    )
                p.copy_(value)

    def _install(self) -> list[str]:
        """Replace every module with routed parameters (each module holding a tied one too);
        returns the names of the modules that run per sample (:class:`TwinPerSample`)."""
        ex = self.experts
        aliases = _named_tensors(self.model)[1]
        # every name of a routed tensor (tied ones have several) -> the experts' name for it
        expert_of = {m: n for n, m in self._model_name.items()}
        expert_of |= {a: expert_of[m] for a, m in aliases.items() if m in expert_of}
        routed = set(ex.factors) | set(ex.dense) | set(ex.specific)
        # Buffers whose exclusive parts are all zero (statistics no expert changed) need no
        # routing: the shared value is every task's.
        routed -= {
            expert_of[n]
            for n, _ in self.model.named_buffers(remove_duplicate=False)
            if expert_of.get(n) in ex.dense and not bool(ex.dense[expert_of[n]].any())
        }
        per_sample = []
        done: dict[int, nn.Module | None] = {}  # a module registered twice is routed once
        for mod_name, module in list(self.model.named_modules(remove_duplicate=False)):
            if id(module) in done:
                if done[id(module)] is not None:
                    replace_module(self.model, mod_name, done[id(module)])
                continue
            prefix = f"{mod_name}." if mod_name else ""
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            full = {n: expert_of[prefix + n] for n, _ in own if expert_of.get(prefix + n) in routed}
            if not full:
                continue
            w, b = full.get("weight"), full.get("bias")
            batch_free = mod_name.endswith(_BATCH_FREE)
            layer: nn.Module | None = None  # batch-free: TwinPerSample below
            if batch_free:
                pass
            elif type(module) is nn.Linear or is_conv1d(module):
                layer = TwinLinear(
                    module,
                    mod_name,
                    self.routing,
                    factors=ex.factors.get(w),
                    dense_bias=ex.dense.get(b) if b else None,
                    specific_weight=ex.specific.get(w),
                    specific_bias=ex.specific.get(b) if b else None,
                )
            elif type(module) is nn.Embedding and set(full.values()) <= set(ex.factors):
                layer = TwinEmbedding(module, mod_name, self.routing, factors=ex.factors[w])
            elif type(module) is nn.LayerNorm and not any(f in ex.factors for f in full.values()):
                layer = TwinLayerNorm(
                    module,
                    mod_name,
                    self.routing,
                    dense={k: ex.dense[f] for k, f in full.items() if f in ex.dense},
                    specific={k: ex.specific[f] for k, f in full.items() if f in ex.specific},
                )
            else:
                layer = None
            if layer is None:
                TwinPerSample(
                    module,
                    mod_name,
                    self.routing,
                    factors={k: ex.factors[f] for k, f in full.items() if f in ex.factors},
                    dense={k: ex.dense[f] for k, f in full.items() if f in ex.dense},
                    specific={k: ex.specific[f] for k, f in full.items() if f in ex.specific},
                    warn=not batch_free,
                )
                per_sample.append(mod_name)
                done[id(module)] = None
                if batch_free:
                    self._batch_free.append(mod_name)
                continue
            replace_module(self.model, mod_name, layer)
            done[id(module)] = layer
        return per_sample

    # ---- forward ------------------------------------------------------------------------------

    @declare_inputs
    @one_at_a_time
    def forward(
        self,
        *args: Any,
        weights: torch.Tensor | None = None,
        task: Any = None,
        materialize: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run the model with each sample's merged weights.

        ``weights [B, T]`` replaces the router (e.g. one-hot for an oracle); ``task`` (an index,
        a name, or one per sample) picks the task-specific tensors, by default the top task of
        ``weights``. Other arguments go to the wrapped model. Returns its output.

        ``labels`` never reach the routing pass. When every task's head has the same shape they
        go to the wrapped model, whose loss then uses each sample's own head. When the heads
        differ in size (or with ``materialize=True``) the loss is computed here, as Hugging
        Face's single-label classification loss: mean cross-entropy of logits ``[B, C]``
        (padding columns -inf) against int labels ``[B]`` (-100 ignored), each label checked
        against its sample's task's label count; other losses must be computed from the
        outputs (a :class:`TwinError` says so).

        KV caches: the routing pass never sees the caller's cache. A step that passes a cache
        this model returned (``cache``/``past_key_values``) keeps the weights its sequences
        were routed with; a non-empty cache from elsewhere needs ``weights``.
        """
        self._refuse_untrainable_step(args, kwargs, weights)
        device = next(self.model.parameters()).device
        b = _batch_size(args, kwargs)
        given = weights is not None
        weights = self._routing_weights(args, kwargs, weights, b, device)
        task = self._top_task(weights, given) if task is None else self._check_task(task, b, device)
        labels = kwargs.get("labels")
        own_loss = labels is not None and (materialize or self.label_counts is not None)
        if own_loss:
            kwargs = {k: v for k, v in kwargs.items() if k not in LOSS_KWARGS}
        if materialize:
            out = self._materialized(weights, task, args, kwargs)
        else:
            out = self._routed(weights, task, args, kwargs)
            self._remember_cache(out, weights)
        return self._with_loss(out, labels, task) if own_loss else out

    @one_at_a_time
    @torch.no_grad()
    def generate(
        self, *args: Any, weights: torch.Tensor | None = None, task: Any = None, **kwargs: Any
    ) -> Any:
        """The wrapped model's ``generate`` with each prompt merged once: its ``weights [B, T]``
        (else the router's on the prompt, ``input_ids`` or ``inputs_embeds``,
        ``attention_mask`` and the positions ``generate`` gives it: ``position_ids``, else
        ``cumsum(mask) - 1`` for a model whose forward takes them, so that a left-padded prompt
        is routed as it is alone) and its ``task`` (else its top task) are kept for every new token,
        so each sequence continues under its own θ_s + Σ_t w_t·v_t (``self.model.generate``
        alone would run the shared model). Other arguments go to ``generate``.

        Raises
        ------
        TwinError
            ``num_beams`` or ``num_return_sequences`` > 1 (they change the batch), or a wrapped
            model without ``generate``.
        """
        return self._generate(args, kwargs, weights, task)

    def _routed(self, weights: torch.Tensor, task: torch.Tensor, args, kwargs) -> Any:
        """The wrapped model under the routing (:meth:`_routed_batch`), or one sample at a time
        for a model that cannot take the per-sample output of an input its batch shares."""
        b = weights.shape[0]
        if self._sample_by_sample and b > 1:
            return self._one_by_one(weights, task, args, kwargs)
        try:
            return self._routed_batch(weights, task, args, kwargs)
        except _SharedInput as shared:
            error = shared.__cause__
            if any(_opaque(v) for v in [*args, *kwargs.values()]):
                raise TwinError(
                    f"TwinModel: layer {shared.layer!r} got an input shared by the batch (first "
                    f"dimension 1 of {b}), computed per sample as [{b}, ...], which "
                    f"{type(self.model).__name__} could not use ({error}); with a KV cache "
                    "or another stateful argument it cannot run one sample at a time: pass "
                    "batches of one"
                ) from error
            # DeBERTa projects its relative-position embeddings [1, 2k, d] once for the batch
            # and repeats the result: one sample at a time, each with its own weights, is exact.
            # Only a retry that succeeds switches the model over; otherwise the batch's own
            # error stands (it was not about the shared input).
            try:
                out = self._one_by_one(weights, task, args, kwargs)
            except Exception:
                raise error from None
            warnings.warn(
                f"meldkit.twin: layer {shared.layer!r} gets an input shared by the batch (first "
                f"dimension 1 of {b}); computed with each sample's weights it becomes "
                f"[{b}, ...], which {type(self.model).__name__} could not use ({error}). This "
                "TwinModel runs one sample at a time from now on (exact, slower)",
                stacklevel=6,  # the caller of TwinModel(...)
            )
            self._sample_by_sample = True
            return out

    def _one_by_one(self, weights: torch.Tensor, task: torch.Tensor, args, kwargs) -> Any:
        """:meth:`_routed_batch` on each sample alone (batch-first tensors sliced), the outputs
        concatenated; ``labels`` give the batch's loss here (:meth:`_with_loss`), not a loss
        per sample."""
        b = weights.shape[0]
        labels = kwargs.get("labels")
        kwargs = {k: v for k, v in kwargs.items() if k not in LOSS_KWARGS}
        outs = []
        for i in range(b):
            a_i = tuple(slice_sample(a, i, b) for a in args)
            k_i = {k: slice_sample(v, i, b) for k, v in kwargs.items()}
            outs.append(self._routed_batch(weights[i : i + 1], task[i : i + 1], a_i, k_i))
        out = cat_samples(outs)
        return out if labels is None else self._with_loss(out, labels, task)

    def _routed_batch(self, weights: torch.Tensor, task: torch.Tensor, args, kwargs) -> Any:
        """The wrapped model under the routing; a batch where each sample uses one expert runs
        ordered by (expert, task) (see :func:`_batch_order`), its outputs put back in order.
        Raises :class:`_SharedInput` when the forward fails after a layer computed an input
        shared by the batch per sample."""
        r = self.routing
        order = _batch_order(weights, task, args, kwargs) if self._order_batches else None
        perm = inv = None
        if order is not None:
            perm, inv, runs = order
            if perm is not None:
                b = weights.shape[0]
                args = tuple(_take(a, perm, b) for a in args)
                kwargs = {k: _take(v, perm, b) for k, v in kwargs.items()}
                weights, task = weights[perm], task[perm]
        r.mode, r.weights, r.task = "twin", weights, task
        if order is not None:
            r.runs = runs
        r.shared_input = None
        try:
            out = self.model(*args, **kwargs)
        except Exception as error:
            # Only a shape error can come from a per-sample input where the model expected
            # one shared by the batch; anything else (out of memory, bad labels) is raised.
            shape_error = type(error) is RuntimeError and any(
                w in str(error).lower() for w in ("size", "shape", "dimension")
            )
            if r.shared_input is None or weights.shape[0] < 2 or not shape_error:
                raise
            raise _SharedInput(r.shared_input) from error
        finally:
            r.mode, r.weights, r.task = "plain", None, None
            r.shared_input = None
        if perm is None:
            return out
        try:
            return _unpermute(out, inv, weights.shape[0])
        except _Unmappable:
            # An output this wrapper cannot put back in order (a cache object, …): run the
            # batch as given from now on.
            self._order_batches = False
            return self._routed(weights[inv], task[inv], _restore(args, inv), _restore(kwargs, inv))

    def _with_loss(self, out: Any, labels: Any, task: torch.Tensor) -> Any:
        """``out`` with the classification loss of ``labels`` against each sample's task head
        (see :meth:`forward`)."""
        logits = out if isinstance(out, torch.Tensor) else out[0]
        if isinstance(out, Mapping):
            logits = out["logits"]
        labels = torch.as_tensor(labels, device=logits.device)
        if logits.dim() != 2 or labels.dtype.is_floating_point or labels.shape != logits.shape[:1]:
            raise TwinError(
                "TwinModel: with task heads of different sizes (or materialize=True, or a "
                "model run one sample at a time), 'labels' give a single-label classification "
                "loss only (logits [B, C], int labels [B]); "
                f"got logits {list(logits.shape)}, labels {list(labels.shape)} {labels.dtype}: "
                "compute the loss from the outputs instead"
            )
        counts = self.label_counts or [logits.shape[-1]] * len(self.tasks)
        limit = torch.tensor(counts, device=logits.device)[task]
        bad = (labels != -100) & ((labels < 0) | (labels >= limit))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise TwinError(
                f"TwinModel: label {int(labels[i])} of sample {i} is not a class of its task "
                f"{self.tasks[int(task[i])]!r} ({int(limit[i])} labels)"
            )
        loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=-100)
        if isinstance(out, torch.Tensor):
            return loss, out
        if isinstance(out, Mapping):
            fields = {k: v for k, v in out.items() if k != "loss"}
            try:
                return type(out)(loss=loss, **fields)
            except TypeError:
                return {"loss": loss, **fields}
        return (loss, *out)

    def merged_state(self, weights: torch.Tensor, task: int) -> dict[str, torch.Tensor]:
        """Dense θ_s + Σ_t w_t·v_t for one sample's ``weights [T]``, task-specific tensors of
        ``task`` (the reference code's per-sample rebuild), by the model's names (a tied tensor
        under its first name)."""
        ex = self.experts
        params = module_tensors(self.model)
        out = {}
        for name in list(ex.factors) + list(ex.dense):
            key = self._model_name[name]
            p = params[key]
            acc = ex.shared[name].to(p.device, torch.float32).clone()
            for t in range(ex.num_tasks):
                if float(weights[t]) != 0.0:
                    acc += float(weights[t]) * ex.exclusive(name, t).to(p.device, torch.float32)
            out[key] = acc.to(p.dtype)
        for name, values in ex.specific.items():
            key = self._model_name[name]
            out[key] = values[task].to(params[key].device)
        return out

    @torch.no_grad()
    def _materialized(self, weights, task, args, kwargs) -> Any:
        self.routing.mode = "plain"
        b = weights.shape[0]
        outs = []
        for i in range(b):
            params = self.merged_state(weights[i], int(task[i]))
            a_i = [slice_sample(a, i, b) for a in args]
            k_i = {k: slice_sample(v, i, b) for k, v in kwargs.items()}
            outs.append(torch.func.functional_call(self.model, params, tuple(a_i), k_i))
        return cat_samples(outs)


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# ---- batches ordered by expert ------------------------------------------------------------------

# Another tensor keyword with the batch's first dimension leaves the batch unordered (it might
# not be batch-first).
BATCH_KWARGS = frozenset(MODEL_INPUTS)


class _Unmappable(Exception):
    """An output holds an object whose batch order cannot be restored."""


class _SharedInput(Exception):
    """A forward failed after ``layer`` computed an input shared by the batch per sample."""

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.layer = layer


def _holds_tensors(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, Mapping):
        return any(_holds_tensors(x) for x in v.values())
    if isinstance(v, (tuple, list)):
        return any(_holds_tensors(x) for x in v)
    return False


def _opaque(v: Any) -> bool:
    """An argument whose batch order this wrapper cannot see (a KV cache object, …): reordering
    the other inputs would mismatch it, and a stateful one would be written out of order."""
    return not isinstance(
        v, (torch.Tensor, bool, int, float, str, type(None), tuple, list, Mapping, torch.dtype)
    )


def _batch_order(weights: torch.Tensor, task: torch.Tensor, args, kwargs):
    """``(perm, inv, runs)`` when every sample uses exactly one expert (top-1 routing, one-hot
    weights) on the CPU: the stable order of the samples by (expert, task) (``perm``/``inv``
    None when the batch is in that order already) and the runs ``(expert, task, start, end,
    ones)`` of :attr:`Routing.runs`. Each expert then sees one contiguous slice of the batch in
    every layer instead of gathered samples. None when that does not apply, or when a tensor
    keyword other than :data:`BATCH_KWARGS` (or a container of tensors) has the batch's first
    dimension, or when an argument is an object it cannot see into (a KV cache). Positional
    tensors with the batch's first dimension are taken as batch-first, as ``materialize=True``
    takes them."""
    b, n_tasks = weights.shape
    if weights.device.type != "cpu" or b < 2:
        return None
    nonzero = weights != 0
    if not bool((nonzero.sum(-1) == 1).all()):
        return None
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            if v.dim() >= 1 and v.shape[0] == b and k not in BATCH_KWARGS:
                return None
        elif _holds_tensors(v) or _opaque(v):
            return None
    if any(_opaque(a) or (_holds_tensors(a) and not isinstance(a, torch.Tensor)) for a in args):
        return None
    expert = nonzero.to(torch.uint8).argmax(-1)
    key = expert * n_tasks + task
    perm = torch.argsort(key, stable=True)
    sorted_key = key[perm]
    values, counts = torch.unique_consecutive(sorted_key, return_counts=True)
    w_sorted = weights[perm]
    runs, start = [], 0
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        t, k = divmod(v, n_tasks)
        end = start + c
        runs.append((t, k, start, end, bool((w_sorted[start:end, t] == 1).all())))
        start = end
    if torch.equal(perm, torch.arange(b)):
        return None, None, runs
    return perm, torch.argsort(perm), runs


def _take(v: Any, index: torch.Tensor, b: int) -> Any:
    """A batch-first tensor's samples in ``index``'s order; anything else unchanged."""
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b:
        return v.index_select(0, index.to(v.device))
    return v


def _restore(v: Any, inv: torch.Tensor) -> Any:
    if isinstance(v, dict):
        return {k: _take(x, inv, inv.numel()) for k, x in v.items()}
    return tuple(_take(x, inv, inv.numel()) for x in v)


def _unpermute(out: Any, inv: torch.Tensor, b: int) -> Any:
    """The model's output with its batch-first tensors back in the caller's order (tensors,
    tuples, lists, dicts and ``ModelOutput``s); scalars and other sizes unchanged."""
    if out is None or isinstance(out, (bool, int, float, str)):
        return out
    if isinstance(out, torch.Tensor):
        return _take(out, inv, b)
    if isinstance(out, Mapping):
        items = {k: _unpermute(v, inv, b) for k, v in out.items()}
        try:
            return type(out)(**items)
        except TypeError:
            return items
    if isinstance(out, (tuple, list)):
        parts = [_unpermute(v, inv, b) for v in out]
        return type(out)(*parts) if hasattr(out, "_fields") else type(out)(parts)
    raise _Unmappable(type(out).__name__)


# ---- router training ----------------------------------------------------------------------------


@dataclass
class RouterTraining:
    """What :func:`train_router` did: per-epoch training losses, held-out accuracies and losses,
    and the epoch whose router was kept (the best held-out accuracy; among equal accuracies the
    lowest held-out loss)."""

    train_loss: list[float]
    val_accuracy: list[float]
    val_loss: list[float]
    best_epoch: int
    best_val_accuracy: float


@torch.no_grad()
def text_features(
    twin: TwinModel,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = False,
    desc: str = "twin features",
) -> torch.Tensor:
    """Router features ``[N, d]`` of ``texts`` (tokenised with padding and truncation), one
    forward of the shared model per ``batch_size`` texts (a tqdm bar over the texts with
    ``progress``).

    Batches are padded on the right whatever the tokenizer's ``padding_side``: a text's real
    tokens then have the positions they have alone (a left-padded text would get shifted
    absolute positions in GPT-2-style models, whose plain forward does not derive them from the
    mask), so a text's features do not depend on the rest of its batch, and they are the ones
    :meth:`TwinModel.generate` routes a prompt on (it derives the positions from the mask)."""
    device = next(twin.model.parameters()).device
    # The tokenizer's side is switched for the call and restored (transformers < 4.45 takes no
    # `padding_side` keyword; a custom tokenizer need not either).
    left = getattr(tokenizer, "padding_side", None) == "left"
    bar = None
    if progress:
        from meldkit._progress import progress_bar

        bar = progress_bar(total=len(texts), desc=desc, unit="text")
    out = []
    try:
        if left:
            tokenizer.padding_side = "right"
        for i in range(0, len(texts), batch_size):
            batch = list(texts[i : i + batch_size])
            enc = tokenizer(
                batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            out.append(twin.features(**enc).cpu())
            if bar is not None:
                bar.update(len(batch))
    finally:
        if left:
            tokenizer.padding_side = "left"
        if bar is not None:
            bar.close()
    return torch.cat(out) if out else torch.empty(0, twin.router.in_features)


def _features_by_task(
    twin, data, tokenizer, batch_size, max_length, what, progress=False
) -> list[torch.Tensor]:
    if not isinstance(data, Mapping):
        raise TypeError(f"train_router: '{what}' must map task names to examples")
    unknown = [k for k in data if k not in twin.tasks]
    if unknown:
        raise TwinError(f"train_router: '{what}' has unknown task {unknown[0]!r}")
    missing = [t for t in twin.tasks if t not in data or len(data[t]) == 0]
    if missing:
        raise TwinError(f"train_router: '{what}' has no examples of task {missing[0]!r}")
    feats = []
    for t in twin.tasks:
        v = data[t]
        if isinstance(v, torch.Tensor):
            d = twin.router.in_features
            if v.dim() != 2 or v.shape[1] != d:
                raise TwinError(
                    f"train_router: '{what}' features of task {t!r} have shape "
                    f"{list(v.shape)}, expected [N, {d}] (the router's input size)"
                )
            feats.append(v.float().cpu())
        else:
            if tokenizer is None:
                raise TwinError(f"train_router: '{what}' holds texts: pass a tokenizer")
            feats.append(
                text_features(
                    twin,
                    v,
                    tokenizer,
                    batch_size=batch_size,
                    max_length=max_length,
                    progress=progress,
                    desc=f"twin features ({what}, {t})",
                )
            )
    return feats


def _int_at_least(name: str, value: Any, low: int, why: str = "") -> int:
    """``value`` as an int ≥ ``low`` (bools refused), else a TwinError naming ``name``."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low:
        raise TwinError(f"train_router: '{name}' must be an int ≥ {low}{why}, got {value!r}")
    return number


def train_router(
    twin: TwinModel,
    train: Mapping[str, Sequence[str] | torch.Tensor],
    val: Mapping[str, Sequence[str] | torch.Tensor],
    *,
    tokenizer: Any = None,
    epochs: int = 50,
    lr: float = 5e-4,
    batch_size: int = 256,
    patience: int | None = 10,
    max_length: int = 128,
    feature_batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> RouterTraining:
    """Train ``twin.router`` by cross-entropy on the task id, keeping the epoch with the best
    accuracy on ``val``.

    ``train`` and ``val`` map each task name to its texts (with ``tokenizer``) or to precomputed
    features ``[N, d]`` (:func:`text_features`). The features come from the shared model, once.
    ``val`` must be held-out examples, not the test set (the reference code selects its router
    on the test set: that leaks). The kept epoch has the best held-out accuracy, ties broken by
    the held-out loss. Adam, ``lr`` 5e-4 and 50 epochs as the paper; stops after ``patience``
    epochs without improvement. The router is left in eval mode. ``batch_size`` must be at
    least 2 and ``train`` hold at least two examples (the router's BatchNorm trains on two or
    more samples); a last batch of one sample joins the batch before it. Texts are tokenised
    (at most ``max_length`` tokens) and run through the shared model ``feature_batch_size`` at
    a time. ``progress`` shows tqdm bars over the texts of each task, then over the epochs.
    """
    batch_size = _int_at_least(
        "batch_size", batch_size, 2, " (the router's BatchNorm needs two samples per batch)"
    )
    fbs = _int_at_least("feature_batch_size", feature_batch_size, 1)
    train_x = _features_by_task(twin, train, tokenizer, fbs, max_length, "train", progress)
    val_x = _features_by_task(twin, val, tokenizer, fbs, max_length, "val", progress)
    x = torch.cat(train_x)
    if len(x) < 2:
        raise TwinError(
            f"train_router: 'train' holds {len(x)} example(s): the router's BatchNorm needs at "
            "least two to train on"
        )
    # Batch starts; a last batch of one sample joins the one before (BatchNorm needs two).
    starts = list(range(0, len(x), batch_size))
    if len(x) - starts[-1] == 1:
        starts.pop()
    ends = [*starts[1:], len(x)]
    y = torch.cat([torch.full((len(f),), t, dtype=torch.int64) for t, f in enumerate(train_x)])
    vx = torch.cat(val_x)
    vy = torch.cat([torch.full((len(f),), t, dtype=torch.int64) for t, f in enumerate(val_x)])
    router = twin.router
    device, dtype = next(router.parameters()).device, _router_dtype(router)
    x, vx = x.to(device, dtype), vx.to(device, dtype)
    y, vy = y.to(device), vy.to(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        opt = torch.optim.Adam(router.parameters(), lr=lr)
        best_state, best_acc, best_loss, best_epoch, since = None, -1.0, math.inf, -1, 0
        losses, accs, val_losses = [], [], []
        bar = None
        if progress:
            from meldkit._progress import progress_bar

            bar = progress_bar(total=epochs, desc="twin router", unit="epoch")
        try:
            for epoch in range(epochs):
                router.train()
                order = torch.randperm(len(x), generator=gen).to(device)
                total, count = 0.0, 0
                for i, j in zip(starts, ends, strict=True):
                    idx = order[i:j]
                    loss = F.cross_entropy(router(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
                router.eval()
                with torch.no_grad():
                    val_logits = router(vx)
                    acc = float((val_logits.argmax(-1) == vy).float().mean())
                    val_loss = float(F.cross_entropy(val_logits, vy))
                losses.append(total / max(count, 1))
                accs.append(acc)
                val_losses.append(val_loss)
                if acc > best_acc or (acc == best_acc and val_loss < best_loss):
                    best_acc, best_loss, best_epoch, since = acc, val_loss, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in router.state_dict().items()}
                else:
                    since += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", val_acc=f"{acc:.3f}")
                if patience is not None and since >= patience:
                    break
        finally:
            if bar is not None:
                bar.close()
    if best_state is not None:
        router.load_state_dict(best_state)
    router.eval()
    if not math.isfinite(losses[-1] if losses else 0.0):
        raise TwinError("train_router: the loss is not finite")
    router.trained = True
    return RouterTraining(losses, accs, val_losses, best_epoch, best_acc)


__all__ = [
    "RouterTraining",
    "TwinModel",
    "TwinRouter",
    "mean_pooled_last_hidden",
    "text_features",
    "train_router",
]
