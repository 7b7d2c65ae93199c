"""Saving and loading GOAT adapters as one safetensors file.

Layout, for every GOAT layer ``NAME`` (its qualified module name in the wrapped model)::

    NAME.lora_a         [E, d, n]   expert down-projections A_j (their dtype, normally fp32)
    NAME.lora_b         [E, m, d]   expert up-projections B_j
    NAME.router.weight  [E, n]      router W_z
    NAME.alignment_a    [r, n] fp32 only for the SVD inits: the base was adjusted to
    NAME.alignment_b    [m, r] fp32 W̃0 = W0 − alignment_b @ alignment_a
    NAME.scaling        [E]    fp32 only for GOAT-s (``per_expert_scaling``): the factors s_j
    NAME.base_sketch    [m]    fp32 a fingerprint of the original base weight W0 (or of W̃0):
                                    W @ v for a fixed pseudo-random v (older files have none)

and for every parameter ``P`` of a module ``MOD`` trained in full (``modules_to_save``, e.g. a
classification head), in its dtype::

    modules_to_save.MOD.P

and, for every other parameter ``P`` of the base (embeddings, norms, the adapted layers' biases
as ``LAYER.bias``, layers not adapted; older files have none), a fingerprint: ``W @ v`` of the
parameter as ``[shape[0], -1]``, or a vector's values (fp32)::

    base_other.P

Metadata (strings): ``format = "pt"``, ``meldkit_goat`` (the layout version), ``config`` (the
:class:`GoatConfig` as JSON) and ``layers`` (JSON: per layer ``in_features``, ``out_features``,
``base_dtype``, the dtype :func:`meldkit.goat.wrap` rounded W̃0 to (the base weight's when it
was wrapped, whatever the model was cast to later; older files: the base weight's when saved),
``sketch_of``: ``"W0"``, or ``"adjusted"`` when the sketch is of W̃0 as the layer held it, for
a model wrapped with ``keep_original=False``, and ``sketch_dtype``, the sketched weight's dtype)
and ``modules_to_save`` (JSON: the saved modules' names; absent in older files) and
``architecture`` (JSON: the model config's :data:`ARCHITECTURE_FIELDS`, the settings that change
the computation but no shape, and its RoPE settings as ``rope`` in one form whatever
``transformers`` version wrote them, :func:`rope_settings`; absent in older files and for models
without a config) and ``base_other_dtypes`` (JSON: the fingerprinted parameters' dtypes).

:func:`load_adapter` compares each layer's sketch with the model's base weight: an adapter
loaded into a model of the same architecture but other weights (another checkpoint, another
fine-tune) is refused instead of silently giving a model nobody trained.

The alignment factors are the *initial* experts (times s/E), not the trained ones, so the file
holds everything needed to rebuild W̃0 from the original base weights; the adjustment is
recomputed with :func:`meldkit.goat.init.base_delta`, whose arithmetic is fixed, so a base
model loaded fresh from its checkpoint gets bit-for-bit the weights the trained model had when
it is loaded in the dtype the base was wrapped in (``base_dtype``) or a wider one. The common
recipe "load in fp32, wrap, ``model.to(torch.bfloat16)``, train" is therefore reproduced
exactly by loading the adapter into the fp32 base and casting to bf16. A base in a narrower
dtype (that recipe's adapter loaded straight into a bf16 base) is adjusted in fp32 from its
own weights and rounded once to its dtype: the trained model within that dtype's rounding. The
file is written to a temporary name beside ``path`` and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meldkit._fingerprint import (
    base_sketch,
    parameter_sketches,
    sketch_distance,
    sketch_rtol,
    sketches_difference,
)
from meldkit.goat.config import GoatConfig
from meldkit.goat.layer import GoatLinear
from meldkit.goat.model import (
    HEAD_NAMES,
    HEAD_NAMES_V1,
    build_layer,
    config_of,
    find_targets,
    freeze_base,
    goat_layers,
    hook_input_grads,
    min_target_size,
    remember_requires_grad,
    replace_module,
    saved_modules,
    set_saved_modules,
    shifted,
    track_forwards,
    unwrap,
)

FORMAT_VERSION = "1"
# File name used when ``path`` is a directory.
ADAPTER_FILE = "goat_adapter.safetensors"
_PARTS = ("lora_a", "lora_b", "router.weight")
_SAVED_PREFIX = "modules_to_save."
_ALIGNMENT = ("alignment_a", "alignment_b")
# Path components that wrappers insert between a module and its children: FSDP1's unit and
# torch.distributed's activation-checkpointing wrapper.
_FSDP1_PART = "_fsdp_wrapped_module"
_WRAPPER_PARTS = (_FSDP1_PART, "_checkpoint_wrapped_module")


# Fields of a Hugging Face model config that change what a model computes without changing any
# parameter's shape (a file's tensors cannot tell them apart): the saved model's are kept
# beside its tensors and compared on load. RoPE is recorded apart, under ``"rope"``
# (:data:`ROPE_FIELDS`, :func:`rope_settings`).
ARCHITECTURE_FIELDS = (
    "model_type",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "activation_function",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "position_embedding_type",
    "sliding_window",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "attention_multiplier",
    "embedding_multiplier",
    "residual_multiplier",
    "logits_scaling",
)
# Config fields that hold the rotary embedding's settings: ``rope_parameters`` in transformers 5
# (one dict, or one per attention type); ``rope_theta`` (GPT-NeoX: ``rotary_emb_base``),
# ``rope_scaling``, ``partial_rotary_factor`` (GPT-NeoX: ``rotary_pct``) and Gemma 3's
# ``rope_local_base_freq`` before.
ROPE_FIELDS = (
    "rope_parameters",
    "rope_theta",
    "rotary_emb_base",
    "rope_scaling",
    "partial_rotary_factor",
    "rotary_pct",
    "rope_local_base_freq",
)
# Relative tolerance for numbers in the record: a setting written by another transformers
# version (10000 vs 10000.0, a float printed otherwise) is the same setting.
_NUMBER_RTOL = 1e-6


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _config_fields(config: Any, keys: tuple[str, ...]) -> dict:
    """The ``keys`` that ``config`` sets (not None), as JSON values."""
    fields = {}
    for key in keys:
        try:
            value = getattr(config, key, None)
        except Exception:  # a config property that cannot be computed for this model
            value = None
        if value is not None:
            fields[key] = _json(value)
    return fields


def _rope_params(params: dict) -> dict:
    """One attention type's RoPE dict in the record's form: ``rope_type`` under that name
    (older configs call it ``type``; transformers 5 keeps both)."""
    params = dict(params)
    kind = params.pop("type", None)
    if kind is not None:
        params.setdefault("rope_type", kind)
    return params


def rope_settings(fields: Mapping[str, Any], scaling_known: bool = True) -> dict | None:
    """The RoPE settings among a config's :data:`ROPE_FIELDS` (``fields``: name -> JSON value,
    those set), in one form whatever ``transformers`` version wrote them: the
    ``rope_parameters`` dict of transformers 5 (``{"rope_type": "default", "rope_theta":
    10000.0, ...}``, or per attention type ``{"full_attention": {...}, "sliding_attention":
    {...}}``), built from ``rope_theta`` + ``rope_scaling`` + ``partial_rotary_factor`` (and
    their GPT-NeoX and Gemma 3 names) when the config has no ``rope_parameters``. None for a
    model without RoPE. ``scaling_known=False``: ``fields`` may lack ``rope_scaling`` (files
    recorded without it), so no ``rope_type`` is assumed when it is missing."""
    params = fields.get("rope_parameters")
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):  # one dict per attention type
            return {kind: _rope_params(v) for kind, v in params.items()}
        return _rope_params(params)
    theta = fields.get("rope_theta", fields.get("rotary_emb_base"))
    if theta is None:
        return None
    scaling = fields.get("rope_scaling")
    rope = _rope_params(scaling) if isinstance(scaling, dict) else {}
    if scaling_known or isinstance(scaling, dict):
        rope.setdefault("rope_type", "default")
    rope["rope_theta"] = theta
    partial = fields.get("partial_rotary_factor", fields.get("rotary_pct"))
    if partial is not None:
        rope.setdefault("partial_rotary_factor", partial)
    local = fields.get("rope_local_base_freq")
    if local is not None:  # Gemma 3 before transformers 5: sliding layers' own base
        return {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
    return rope


def architecture(model: nn.Module) -> dict | None:
    """The :data:`ARCHITECTURE_FIELDS` of ``model.config`` that it sets (not None), as JSON
    values, and its RoPE settings as ``"rope"`` (:func:`rope_settings`, where it has RoPE);
    None for a model without a config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    fields = _config_fields(config, ARCHITECTURE_FIELDS)
    rope = rope_settings(_config_fields(config, ROPE_FIELDS))
    if rope is not None:
        fields["rope"] = rope
    return fields


def _agree(ours: Any, saved: Any) -> bool:
    """Whether two recorded values are the same setting: numbers within :data:`_NUMBER_RTOL`
    (``True`` is no number), lists element by element, dicts on the keys both have (a key one
    side lacks is a default its ``transformers`` version did not write), anything else
    equal."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(ours) and number(saved):
        return math.isclose(ours, saved, rel_tol=_NUMBER_RTOL)
    if isinstance(ours, list) and isinstance(saved, list):
        return len(ours) == len(saved) and all(map(_agree, ours, saved))
    if isinstance(ours, dict) and isinstance(saved, dict):
        return all(_agree(ours[k], saved[k]) for k in ours.keys() & saved.keys())
    return ours == saved


def architecture_difference(saved: dict | None, model: nn.Module) -> str | None:
    """The fields where ``model``'s config differs from ``saved`` (:func:`architecture` of the
    model a file was saved from), as ``"key=model's (saved: saved's)"``; None when they agree.
    Numbers agree within a relative 1e-6. A field only one side sets is not compared (a file
    from another ``transformers`` version may name a setting otherwise), nor are files saved
    without the fields (``saved`` None). RoPE is compared in :func:`rope_settings`' form, so a
    file of transformers 4 (``rope_theta``, ``rope_scaling``) and a model of transformers 5
    (``rope_parameters``) compare their settings; records of meldkit before ``"rope"`` are
    read in that form too (without ``rope_scaling``: its type is then not compared)."""
    ours = architecture(model)
    if not isinstance(saved, dict) or ours is None:
        return None
    saved = dict(saved)
    if "rope" not in saved:
        legacy = {k: saved.pop(k) for k in ROPE_FIELDS if k in saved}
        rope = rope_settings(legacy, scaling_known=False)
        if rope is not None:
            saved["rope"] = rope
    differ = [
        f"{key}={ours[key]!r} (saved: {value!r})"
        for key, value in saved.items()
        if key in ours and not _agree(ours[key], value)
    ]
    return ", ".join(differ) or None


class AdapterError(ValueError):
    """An adapter file that cannot be loaded into the given model (the message says why)."""


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / ADAPTER_FILE if p.is_dir() else p


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s, DDP's, DataParallel's and FSDP1's wrappers, so that
    layer names carry no ``_orig_mod.``, ``module.`` or ``_fsdp_wrapped_module.`` prefix."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, _FSDP1_PART, None), nn.Module):  # FSDP1's root
            model = getattr(model, _FSDP1_PART)
        else:
            return model


def _clean_name(name: str) -> str:
    """``name`` without the path components that FSDP1 and activation-checkpointing wrappers
    insert (``0._fsdp_wrapped_module.lora_a`` -> ``0.lora_a``): the names of the model before
    it was wrapped."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _fsdp1_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP1 (``FullyShardedDataParallel``) modules in ``model``."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")  # torch.distributed DTensor


def _is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP-sharded parameters (FSDP2 DTensors or FSDP1 units)."""
    return any(_is_dtensor(p) for p in model.parameters()) or bool(_fsdp1_units(model))


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor (FSDP2's shard) gathered from every rank (a collective: every
    rank must call it, in the same order), any other tensor as it is; detached."""
    t = t.detach()
    return t.full_tensor() if _is_dtensor(t) else t


# Prefix of the fingerprints of the base's other parameters in an adapter file.
_OTHER_PREFIX = "base_other."


def _other_parameters(
    model: nn.Module, layers: Iterable[str], saved: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The base's parameters that the adapter neither replaces nor fingerprints per layer, by
    their names in the unwrapped base (FSDP1's parts left out): every parameter outside the
    adapted ``layers`` and the ``saved`` modules, and each adapted layer's bias (named
    ``LAYER.bias`` whether ``model`` is wrapped or not). FSDP2 shards are gathered."""
    layers = set(layers)
    saved = tuple(saved)
    # A saved module's parameter tied to another name (a trained lm_head tied to the input
    # embeddings, listed under the embeddings' name) is the saved module's, not the base's.
    trained = {
        id(p)
        for qualified, module in model.named_modules()
        if any(_clean_name(qualified) == m for m in saved)
        for p in module.parameters()
    }
    out: dict[str, torch.Tensor] = {}
    for qualified, p in model.named_parameters():
        if id(p) in trained:
            continue
        name = _clean_name(qualified)
        owner, _, rest = name.rpartition(".")
        if owner.endswith(".base_layer") and owner.removesuffix(".base_layer") in layers:
            owner = owner.removesuffix(".base_layer")
        if owner in layers or any(name.startswith(f"{layer}.") for layer in layers):
            if owner in layers and rest == "bias":
                out.setdefault(f"{owner}.bias", _full(p))
            continue
        if any(name == m or name.startswith(f"{m}.") for m in saved):
            continue
        out.setdefault(name, _full(p))
    return out


def _layer_sketch(layer: GoatLinear) -> tuple[torch.Tensor, str, torch.dtype]:
    """``(sketch, of, dtype)``: the sketch of the layer's original W0 (``of = "W0"``) when the
    layer knows it exactly (the kept copy, or a base the init left alone), else of the adjusted
    W̃0 it holds (``"adjusted"``): exact bits either way, never a rebuilt approximation;
    ``dtype`` is the sketched weight's."""
    if layer.original_weight is not None:
        return base_sketch(layer.original_weight), "W0", layer.original_weight.dtype
    weight = _full(layer.base_layer.weight)
    return base_sketch(weight), "W0" if layer.alignment is None else "adjusted", weight.dtype


def _model_sketch(
    base: nn.Linear,
    layer: GoatLinear | None,
    of: str,
    alignment: tuple | None,
    adjusted_in: torch.dtype | None,
) -> tuple[torch.Tensor, bool]:
    """The model's side of the comparison with a file's sketch ``of`` W0 or of W̃0 (the file's
    ``alignment`` subtracted from W0 in the dtype ``adjusted_in``, as :func:`load_adapter`
    does): ``(sketch, exact)``, exact unless W0 had to be rebuilt from an adjusted layer that
    kept no copy of it, or W̃0 was rounded to another dtype than the model's."""
    w0 = None
    if layer is None:
        w0 = base.weight
    elif layer.original_weight is not None:
        w0 = layer.original_weight.to(base.weight.device)
    elif layer.alignment is None:
        w0 = base.weight
    same_dtype = adjusted_in in (None, base.weight.dtype)
    if w0 is not None:
        if of == "adjusted":
            dtype = adjusted_in or w0.dtype
            adjusted = shifted(w0.detach().to(dtype), *alignment, -1).to(base.weight.dtype)
            return base_sketch(adjusted), same_dtype
        return base_sketch(w0), True
    if of == "adjusted":  # both sides hold W̃0 as the adjustment left it
        return base_sketch(base.weight), same_dtype and layer.base_dtype in (None, adjusted_in)
    return base_sketch(shifted(base.weight, *layer.alignment, +1)), False


def _dtype_named(name: str) -> torch.dtype | None:
    """The floating torch dtype called ``name`` (``"bfloat16"``), None for anything else."""
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the GOAT layers of ``model`` (experts, routers, base alignment, config) to ``path``.

    A model sharded by FSDP (``fully_shard``, or ``FullyShardedDataParallel``) is gathered
    whole: call this on every rank (each takes part in the gathers), rank 0 writes the file and
    the others wait until it is written. Any other model is written by the process that calls
    this (under DDP, call it on every rank or on rank 0 only: the ranks write the same
    contents).

    Parameters
    ----------
    model : nn.Module
        A model wrapped by :func:`meldkit.goat.wrap` or :func:`load_adapter`, also inside
        ``torch.compile``, DDP, DataParallel or FSDP (the names saved are the inner model's).
    path : path-like
        The ``.safetensors`` file to write (replaced if it exists), or a directory to write
        ``goat_adapter.safetensors`` into.

    Returns
    -------
    Path
        The file written.
    """
    from safetensors.torch import save_file

    target = _resolve(path)
    sharded = _is_sharded(model)
    fsdp1 = _fsdp1_units(model)
    if fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        gathered = FullyShardedDataParallel.summon_full_params(model, writeback=False)
    else:
        gathered = contextlib.nullcontext()
    try:
        with torch.no_grad(), gathered:
            tensors, metadata = _adapter_contents(_unwrapped(model))
    except RuntimeError as exc:
        text = str(exc).lower()
        distributed = isinstance(exc, getattr(torch.distributed, "DistError", ()))
        if not sharded or isinstance(exc, torch.OutOfMemoryError):
            raise
        if not (distributed or "timed out" in text or "timeout" in text):
            raise
        # A gather that timed out: most often the other ranks never called this.
        raise AdapterError(
            f"save_adapter: gathering the FSDP-sharded parameters failed ({exc}); under FSDP "
            "call save_adapter on every rank, not on rank 0 only (each rank takes part in the "
            "gathers; rank 0 writes the file)"
        ) from exc
    distributed = sharded and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    if distributed:
        torch.distributed.barrier()  # the file exists on every rank's return
    return target


def _adapter_contents(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of :func:`save_adapter`'s file for the unwrapped ``model``: CPU
    tensors, sharded ones gathered whole, under the names of the model before FSDP wrapped it."""
    config = config_of(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for qualified, layer in goat_layers(model):
        name = _clean_name(qualified)
        tensors[f"{name}.lora_a"] = _full(layer.lora_a)
        tensors[f"{name}.lora_b"] = _full(layer.lora_b)
        tensors[f"{name}.router.weight"] = _full(layer.router.weight)
        if layer.alignment is not None:
            tensors[f"{name}.alignment_a"], tensors[f"{name}.alignment_b"] = layer.alignment
        if isinstance(layer.scaling, torch.Tensor):
            tensors[f"{name}.scaling"] = _full(layer.scaling)
        tensors[f"{name}.base_sketch"], sketch_of, sketch_dtype = _layer_sketch(layer)
        # The dtype wrap adjusted the base in, not the one it may have been cast to since.
        base_dtype = layer.base_dtype or layer.base_layer.weight.dtype
        layers[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "base_dtype": str(base_dtype).removeprefix("torch."),
            "sketch_of": sketch_of,
            "sketch_dtype": str(sketch_dtype).removeprefix("torch."),
        }
    saved = saved_modules(model)
    modules: dict[str, nn.Module] = {}
    for qualified, module in model.named_modules():
        modules.setdefault(_clean_name(qualified), module)
    for mname in saved:
        params: dict[str, torch.Tensor] = {}
        for pname, p in modules[mname].named_parameters():
            params.setdefault(_clean_name(pname), p)
        for pname, p in params.items():
            tensors[f"{_SAVED_PREFIX}{mname}.{pname}"] = _full(p)
    others, other_dtypes = parameter_sketches(_other_parameters(model, layers, saved))
    tensors.update({f"{_OTHER_PREFIX}{name}": sketch for name, sketch in others.items()})
    # Copies: FSDP1 frees the gathered parameters when its summon_full_params context ends.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {
        "format": "pt",
        "meldkit_goat": FORMAT_VERSION,
        "config": config.to_json(),
        "layers": json.dumps(layers),
        "modules_to_save": json.dumps(saved),
        "base_other_dtypes": json.dumps(other_dtypes),
    }
    fields = architecture(model)
    if fields is not None:
        metadata["architecture"] = json.dumps(fields)
    return tensors, metadata


def read_adapter(
    path: str | os.PathLike,
) -> tuple[GoatConfig, dict[str, dict], dict[str, torch.Tensor]]:
    """``(config, layers, tensors)`` of an adapter file (CPU tensors), checked for consistency.

    The parameters of the saved modules are the tensors named ``modules_to_save.MODULE.PARAM``.

    Raises
    ------
    AdapterError
        Not a GOAT adapter, an unknown layout version, or tensors that disagree with the
        config or the layer table.
    """
    config, layers, tensors, *_ = _read_adapter(path)
    return config, layers, tensors


def _read_adapter(
    path: str | os.PathLike,
) -> tuple[
    GoatConfig,
    dict[str, dict],
    dict[str, torch.Tensor],
    list[str] | None,
    dict | None,
    dict[str, str],
]:
    """:func:`read_adapter`, the names of the saved modules (None: a file from before
    ``modules_to_save``), the saved model's :func:`architecture` (None: a file from before
    it, or of a model without a config) and the dtypes of the base parameters its
    ``base_other.*`` tensors fingerprint (``{}`` for files from before them).

    Raises
    ------
    AdapterError
        Not a GOAT adapter, an unknown layout version, or tensors that disagree with the
        config or the layer table.
    """
    from safetensors import safe_open

    file = _resolve(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own types for missing or broken files
        raise AdapterError(f"{file}: not a readable safetensors file ({exc})") from None
    if "meldkit_goat" not in metadata:
        raise AdapterError(f"{file}: not a GOAT adapter (no 'meldkit_goat' metadata)")
    if metadata["meldkit_goat"] != FORMAT_VERSION:
        raise AdapterError(
            f"{file}: adapter layout version {metadata['meldkit_goat']!r}, this meldkit reads "
            f"{FORMAT_VERSION!r}"
        )
    try:
        config = GoatConfig.from_json(metadata["config"])
        layers = {
            name: {key: int(info[key]) for key in ("in_features", "out_features")}
            | {
                "base_dtype": str(info.get("base_dtype")),
                # older files: the sketched weight had the base's dtype when saved
                "sketch_dtype": str(info.get("sketch_dtype", info.get("base_dtype"))),
                "sketch_of": "adjusted" if info.get("sketch_of") == "adjusted" else "W0",
            }
            for name, info in json.loads(metadata["layers"]).items()
        }
        saved = json.loads(metadata.get("modules_to_save", "null"))  # null: an older file
        if saved is not None and not (
            isinstance(saved, list) and all(isinstance(n, str) for n in saved)
        ):
            raise ValueError(f"modules_to_save is {saved!r}")
        arch = json.loads(metadata.get("architecture", "null"))  # null: an older file
        if arch is not None and not isinstance(arch, dict):
            raise ValueError(f"architecture is {arch!r}")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise AdapterError(f"{file}: bad GOAT metadata ({exc!r})") from None
    e, d, r = config.num_experts, config.expert_rank, config.rank
    aligned = config.init != "lora"
    expected_keys = set()
    for name, info in layers.items():
        n, m = info["in_features"], info["out_features"]
        shapes = {"lora_a": (e, d, n), "lora_b": (e, m, d), "router.weight": (e, n)}
        if aligned:
            shapes |= {"alignment_a": (r, n), "alignment_b": (m, r)}
        if config.per_expert_scaling:
            shapes |= {"scaling": (e,)}
        for part, shape in shapes.items():
            key = f"{name}.{part}"
            expected_keys.add(key)
            if key not in tensors:
                raise AdapterError(f"{file}: tensor {key} missing")
            if tuple(tensors[key].shape) != shape:
                raise AdapterError(
                    f"{file}: tensor {key} has shape {tuple(tensors[key].shape)}, the config "
                    f"(E={e}, rank={r}) and layer nn.Linear({n}, {m}) need {shape}"
                )
            if not tensors[key].is_floating_point():
                raise AdapterError(
                    f"{file}: tensor {key} has dtype {tensors[key].dtype}, not a floating dtype"
                )
        if config.per_expert_scaling:
            factors = tensors[f"{name}.scaling"]
            if not bool(torch.isfinite(factors).all()) or not bool((factors > 0).all()):
                raise AdapterError(
                    f"{file}: tensor {name}.scaling holds factors that are not finite and > 0"
                )
        expert_dtype = tensors[f"{name}.lora_a"].dtype
        for part in ("lora_b", "router.weight"):
            if tensors[f"{name}.{part}"].dtype != expert_dtype:
                raise AdapterError(
                    f"{file}: tensor {name}.{part} has dtype {tensors[f'{name}.{part}'].dtype}, "
                    f"{name}.lora_a {expert_dtype}: a layer's experts and router share one dtype"
                )
        sketch = f"{name}.base_sketch"  # optional: older files have none
        if sketch in tensors:
            expected_keys.add(sketch)
            if not tensors[sketch].is_floating_point():
                raise AdapterError(
                    f"{file}: tensor {sketch} has dtype {tensors[sketch].dtype}, not a floating "
                    "dtype"
                )
            if tuple(tensors[sketch].shape) != (m,):
                raise AdapterError(
                    f"{file}: tensor {sketch} has shape {tuple(tensors[sketch].shape)}, layer "
                    f"nn.Linear({n}, {m}) needs {(m,)}"
                )
    for key in tensors:
        if key.startswith(_SAVED_PREFIX) and any(
            key.startswith(f"{_SAVED_PREFIX}{m}.") for m in saved or ()
        ):
            expected_keys.add(key)
        elif key.startswith(_OTHER_PREFIX) and tensors[key].is_floating_point():
            expected_keys.add(key)  # fingerprints of the base's other parameters
    for mname in saved or ():
        if not any(k.startswith(f"{_SAVED_PREFIX}{mname}.") for k in tensors):
            raise AdapterError(f"{file}: saved module {mname!r} has no tensors")
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise AdapterError(f"{file}: unexpected tensors {extra[:5]}")
    try:
        other_dtypes = json.loads(metadata.get("base_other_dtypes", "{}"))
    except ValueError:
        other_dtypes = {}
    if not isinstance(other_dtypes, dict):
        other_dtypes = {}
    return config, layers, tensors, saved, arch, other_dtypes


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    keep_original: bool = True,
    check_base: bool = True,
) -> nn.Module:
    """Wrap ``model`` with the GOAT adapter saved at ``path``, in place.

    ``model`` is normally the base model freshly loaded (unwrapped): its targeted layers become
    GOAT layers holding the saved experts and routers, and their weights are adjusted by the
    saved alignment (fp32 arithmetic on W0 taken in the dtype the base was wrapped in, rounded
    to that dtype, then cast to the model's), giving bit-for-bit the model that was saved when
    the base weights are the ones it was trained from, in the dtype they were wrapped in or a
    wider one; in a narrower dtype, within one rounding to it. No SVD runs. A model that
    already has GOAT layers must have the same config and layers; it is unwrapped first
    (exactly when it kept its original weights, see :func:`meldkit.goat.wrap`) and then
    loaded. A model sharded by FSDP is refused: load into the unsharded model, then shard.

    Parameters
    ----------
    model : nn.Module
        The base model (or a GOAT model with the same config).
    path : path-like
        A file written by :func:`save_adapter` (or its directory).
    keep_original : bool
        As in :func:`meldkit.goat.wrap`: keep CPU copies of the base weights for a bit-exact
        :func:`meldkit.goat.unwrap`.
    check_base : bool
        Compare every layer's base weight with the fingerprint the file holds (``base_sketch``),
        every other base parameter (embeddings, norms, the layers' biases, layers not adapted,
        but not the saved modules: ``base_other.NAME``; files from before these have none)
        and the model's config with the saved one's (``architecture``: head counts, RoPE,
        norm epsilons, activation, … that change the computation but no shape), and refuse a
        model whose weights or config are not the ones the adapter was trained on. False
        loads it anyway (to apply an adapter to a related checkpoint on purpose).

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    AdapterError
        The file is not a GOAT adapter, or it does not fit the model: a layer it names is
        missing, not an ``nn.Linear`` or of another shape, the config's ``target_modules``
        select other layers of this model, the base weights or config are not the ones it was
        trained on (``check_base``), the model already has GOAT layers with another config, or
        the model is sharded by FSDP.
        The model is left untouched.
    """
    config, layers, tensors, saved, arch, other_dtypes = _read_adapter(path)
    file = _resolve(path)
    if _is_sharded(model):
        raise AdapterError(
            f"{file}: the model is sharded by FSDP; load the adapter into the unsharded model, "
            "then shard it"
        )
    # Files from before modules_to_save were selected with the heads "all-linear" skipped then.
    head_names = HEAD_NAMES if saved is not None else HEAD_NAMES_V1
    saved = saved or []
    model = _unwrapped(model)
    existing = dict(goat_layers(model))
    if existing:
        if config_of(model) != config:
            ours, theirs = config_of(model).to_dict(), config.to_dict()
            fields = [
                f"{k}={theirs[k]!r} (model: {ours[k]!r})" for k in theirs if theirs[k] != ours[k]
            ]
            raise AdapterError(
                f"{file}: adapter config differs from the model's GOAT config in "
                f"{', '.join(fields)}; unwrap the model first to load this adapter"
            )
        if set(existing) != set(layers):
            raise AdapterError(
                f"{file}: adapter layers differ from the model's GOAT layers "
                f"(only in adapter: {sorted(set(layers) - set(existing))[:5]}, only in model: "
                f"{sorted(set(existing) - set(layers))[:5]})"
            )
        bases = {name: layer.base_layer for name, layer in existing.items()}
    else:
        bases = {}
        for name in layers:
            try:
                bases[name] = model.get_submodule(name)
            except AttributeError:
                raise AdapterError(f"{file}: layer {name!r} not found in the model") from None
    for name, info in layers.items():
        linear = bases[name]
        if not isinstance(linear, nn.Linear) or isinstance(linear, GoatLinear):
            raise AdapterError(
                f"{file}: {name!r} is a {type(linear).__name__} in the model, not an nn.Linear"
            )
        if linear.weight.device.type == "meta":
            raise AdapterError(
                f"{file}: layer {name!r}: the model's weight is on the meta device (not loaded, "
                "e.g. built under init_empty_weights); load the base model's weights first"
            )
        want = (info["out_features"], info["in_features"])
        if tuple(linear.weight.shape) != want:
            raise AdapterError(
                f"{file}: layer {name!r} is nn.Linear({linear.in_features}, "
                f"{linear.out_features}) in the model, the adapter was saved for "
                f"nn.Linear({want[1]}, {want[0]})"
            )
    if check_base:
        difference = architecture_difference(arch, model)
        if difference is not None:
            raise AdapterError(
                f"{file}: base config check: the model's config differs from the one the "
                f"adapter was saved with in {difference}: same shapes, another computation; "
                "load the base it was trained on, or pass check_base=False to apply it to this "
                "one anyway (that also skips the base weight fingerprints)"
            )
        for name, info in layers.items():
            sketch = tensors.get(f"{name}.base_sketch")
            if sketch is None:
                continue
            of = info["sketch_of"]
            alignment = None
            if of == "adjusted":
                alignment = (tensors[f"{name}.alignment_a"], tensors[f"{name}.alignment_b"])
            adjusted_in = _dtype_named(info["base_dtype"])
            now, exact = _model_sketch(bases[name], existing.get(name), of, alignment, adjusted_in)
            dtype = bases[name].weight.dtype
            sketched = _dtype_named(info["sketch_dtype"]) or dtype
            # inexact: W0 rebuilt from W̃0, or a weight rounded to another dtype
            rtol = sketch_rtol(sketched, dtype, exact=exact)
            distance = sketch_distance(sketch, now)
            if not distance <= rtol:
                raise AdapterError(
                    f"{file}: base weight check: layer {name!r}: the model's base weight is not "
                    f"the one the adapter was trained on (its fingerprint differs by "
                    f"{distance:.3g} relative, more than {rtol:.1g}); load the base checkpoint it "
                    "was trained from, or pass check_base=False to apply it to this one anyway "
                    "(that also skips the config check)"
                )
        others = {
            k.removeprefix(_OTHER_PREFIX): t
            for k, t in tensors.items()
            if k.startswith(_OTHER_PREFIX)
        }
        if others:  # files from before these fingerprints have none
            current = _other_parameters(model, layers, saved)
            meta = [k for k, t in current.items() if t.device.type == "meta"]
            if meta:
                raise AdapterError(
                    f"{file}: base weight check: the model's parameters {meta[:5]}"
                    f"{' …' if len(meta) > 5 else ''} are on the meta device (not loaded); load "
                    "the base model's weights first, or pass check_base=False to leave them out "
                    "of the check"
                )
            difference = sketches_difference(others, other_dtypes, current)
            if difference is not None:
                raise AdapterError(
                    f"{file}: base weight check: the model is not the base the adapter was "
                    f"trained on: it {difference}; load the base checkpoint it was trained "
                    "from, or pass check_base=False to apply it to this one anyway (that also "
                    "skips the config check)"
                )
    if not existing:
        try:
            selected = find_targets(
                model,
                config.target_modules,
                adjusts_base=config.init != "lora",
                head_names=head_names,
                min_size=min_target_size(config),
                warn_skipped=False,  # wrap warned when the adapter was made
            )
        except ValueError as exc:
            raise AdapterError(f"{file}: {exc}") from None
        if set(selected) != set(layers):
            raise AdapterError(
                f"{file}: target_modules={config.target_modules!r} selects other layers of this "
                f"model than the adapter holds (only in adapter: "
                f"{sorted(set(layers) - set(selected))[:5]}, only in model: "
                f"{sorted(set(selected) - set(layers))[:5]})"
            )
    saved_params: dict[str, torch.Tensor] = {}
    for mname in saved:
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            raise AdapterError(f"{file}: saved module {mname!r} not found in the model") from None
        params = dict(module.named_parameters())
        meta = [k for k, p in params.items() if p.device.type == "meta"]
        if meta:
            raise AdapterError(
                f"{file}: saved module {mname!r}: the model's {meta} are on the meta device "
                "(not loaded); load the base model's weights first"
            )
        prefix = f"{_SAVED_PREFIX}{mname}."
        stored = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(stored) != set(params):
            raise AdapterError(
                f"{file}: saved module {mname!r} has parameters {sorted(stored)} in the file, "
                f"{sorted(params)} in the model"
            )
        for pname, value in stored.items():
            if tuple(value.shape) != tuple(params[pname].shape):
                raise AdapterError(
                    f"{file}: {mname}.{pname} has shape {list(value.shape)} in the file, "
                    f"{list(params[pname].shape)} in the model"
                )
            saved_params[f"{mname}.{pname}"] = value
    if existing:
        unwrap(model)

    remember_requires_grad(model)
    set_saved_modules(model, saved, keep_original=keep_original)
    with torch.no_grad():
        for mname in saved:
            module = model.get_submodule(mname)
            for pname, p in module.named_parameters():
                p.copy_(saved_params[f"{mname}.{pname}"])
    for name in layers:
        linear = bases[name]
        device = linear.weight.device
        alignment = None
        if config.init != "lora":
            alignment = (tensors[f"{name}.alignment_a"], tensors[f"{name}.alignment_b"])
        layer = build_layer(
            linear,
            config,
            lora_a=tensors[f"{name}.lora_a"].to(device),
            lora_b=tensors[f"{name}.lora_b"].to(device),
            router_weight=tensors[f"{name}.router.weight"].to(device),
            alignment=alignment,
            keep_original=keep_original,
            scaling=tensors.get(f"{name}.scaling") if config.per_expert_scaling else None,
            base_dtype=_dtype_named(layers[name]["base_dtype"]),
        )
        replace_module(model, name, layer)
    freeze_base(model)
    track_forwards(model)
    hook_input_grads(model)
    return model
