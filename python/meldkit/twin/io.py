"""Save and load Twin-Merging: one safetensors file and a small JSON beside it.

The file holds the shared weights, the exclusive factors and dense parts, each task's specific
tensors and the router; the JSON the task names, the build settings, the router's shape, the
base config's settings that change the computation without changing a shape (``architecture``,
:data:`meldkit.goat.io.ARCHITECTURE_FIELDS` and RoPE, :func:`meldkit.goat.io.architecture`:
:func:`load` refuses a base whose config differs unless told ``check_base=False``) and the
dtypes the saved model computed in (``dtypes``: a twin cast to bf16 reloads into a bf16 base as
it was). Loading a full twin needs only the base model's architecture. A LoRA twin adds to the
base's own weights, so its files also fingerprint that base: ``base_sketch/NAME`` (``W @ v`` for a
fixed ``v``, see :mod:`meldkit._fingerprint`) of each adapted layer, ``base_other/NAME`` of
every other base parameter (embeddings, norms, biases, layers not adapted), and in the JSON
every base parameter's name, shape and dtype. :func:`load` refuses another base
(other layers, another vocabulary, other weights) unless told ``check_base=False``; files
written before the fingerprint load without the check. Both files are written atomically
(temporary name, then rename) and carry one random ``save_id`` (the JSON's, and the safetensors
header's metadata): :func:`load` refuses a pair from two saves.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meldkit._fingerprint import (
    base_sketch,
    layout_difference,
    parameter_layout,
    parameter_sketches,
    sketch_distance,
    sketch_rtol,
    sketches_difference,
)
from meldkit.goat.io import architecture, architecture_difference
from meldkit.twin.build import TwinError, TwinExperts
from meldkit.twin.lora import TwinLoraExperts, TwinLoraModel
from meldkit.twin.model import TwinModel, TwinRouter, _router_dtype

FORMAT = "meldkit.twin/1"
WEIGHTS = "twin.safetensors"
CONFIG = "twin.json"
# Prefix of a LoRA twin's base fingerprints in its safetensors file: the adapted layers'
# weights, and every other parameter of the base (embeddings, norms, biases, other layers).
_SKETCH = "base_sketch"
_OTHER = "base_other"


def _other_parameters(model: nn.Module, adapted: Iterable[str]) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` other than the adapted layers' weights (those have their own
    fingerprint), by name (tied ones once)."""
    skip = {f"{name}.weight" for name in adapted}
    return {n: p for n, p in model.named_parameters() if n not in skip}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _lora_tensors(ex: TwinLoraExperts) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in ex.shared_a:
        tensors[f"shared_a/{name}"] = ex.shared_a[name]
        tensors[f"shared_b/{name}"] = ex.shared_b[name]
        tensors[f"delta_a_u/{name}"], tensors[f"delta_a_v/{name}"] = ex.delta_a[name]
        tensors[f"delta_b_u/{name}"], tensors[f"delta_b_v/{name}"] = ex.delta_b[name]
    return tensors


def save(twin: TwinModel | TwinLoraModel, path: str | os.PathLike) -> Path:
    """Write ``twin`` (a :class:`TwinModel` or :class:`TwinLoraModel`) into the folder ``path``
    (created if needed): ``twin.safetensors`` and ``twin.json``. Returns the folder."""
    from safetensors.torch import save_file

    if not isinstance(twin, (TwinModel, TwinLoraModel)):
        raise TypeError(
            f"meldkit.twin.save: expected a TwinModel or TwinLoraModel, got {type(twin).__name__}"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    ex = twin.experts
    if isinstance(twin, TwinLoraModel):
        tensors = _lora_tensors(ex)
        layers = {name: twin.model.get_submodule(name) for name in ex.shared_a}
        for name, layer in layers.items():
            tensors[f"{_SKETCH}/{name}"] = base_sketch(layer.weight)
        others, other_dtypes = parameter_sketches(_other_parameters(twin.model, layers))
        for name, sketch in others.items():
            tensors[f"{_OTHER}/{name}"] = sketch
        extra: dict[str, Any] = {
            "kind": "lora",
            "scaling": ex.scaling,
            "base": {
                "dtype": {n: str(m.weight.dtype).removeprefix("torch.") for n, m in layers.items()},
                "parameters": parameter_layout(twin.model),
                "other_dtypes": other_dtypes,
            },
        }
    else:
        tensors = _full_tensors(ex)
        extra = {"kind": "full"}
    for name, t in twin.router.state_dict().items():
        tensors[f"router/{name}"] = t
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        **extra,
        "architecture": architecture(twin.model),
        "dtypes": _dtypes(twin),
        "tasks": ex.tasks,
        "build": ex.config,
        "errors": ex.errors,
        "top_k": twin.top_k,
        "router": {
            "in_features": twin.router.in_features,
            "hidden": twin.router.hidden,
            "dropout": twin.router.dropout,
            "trained": bool(getattr(twin.router, "trained", True)),
        },
    }
    # One id in both files: a save interrupted between the two renames leaves a pair that
    # load refuses, instead of new weights read with the old settings.
    meta["save_id"] = save_id = uuid.uuid4().hex
    file_meta = {"format": FORMAT, "save_id": save_id}
    _atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, str(p), file_meta))
    _atomic_write(folder / CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return folder


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _dtypes(twin: TwinModel | TwinLoraModel) -> dict[str, Any]:
    """What the saved model computes in, beyond the experts (which keep the dtype they were
    built in: a twin cast with ``.to(torch.bfloat16)`` casts its layers' copies of them, its
    buffers, not ``twin.experts``): the model's parameter dtype, every floating buffer's
    (``twin``'s names) and the router's parameter dtype."""
    first = next((p for p in twin.model.parameters() if p.is_floating_point()), None)
    return {
        "model": None if first is None else _dtype_name(first),
        "router": str(_router_dtype(twin.router)).removeprefix("torch."),
        "buffers": {n: _dtype_name(b) for n, b in twin.named_buffers() if b.is_floating_point()},
    }


def _restore_dtypes(twin: TwinModel | TwinLoraModel, dtypes: Any) -> None:
    """Cast ``twin``'s buffers and router to the dtypes the saved model had (:func:`_dtypes`)
    when its parameters have the saved model's dtype: a twin saved after ``.to(bfloat16)`` and
    loaded into a bf16 base then computes with the same bf16 copies of its experts (the file
    holds them as built, and casting them again gives the same values). A base in another
    dtype keeps the experts' own dtype."""
    if not isinstance(dtypes, dict) or not isinstance(dtypes.get("buffers"), dict):
        return  # a file from before the record
    first = next((p for p in twin.model.parameters() if p.is_floating_point()), None)
    if first is None or dtypes.get("model") != _dtype_name(first):
        return
    saved = dtypes["buffers"]
    for prefix, module in twin.named_modules():
        for key, buffer in module._buffers.items():
            name = f"{prefix}.{key}" if prefix else key
            dtype = getattr(torch, str(saved.get(name)), None)
            if buffer is not None and isinstance(dtype, torch.dtype) and buffer.dtype != dtype:
                if buffer.is_floating_point() and dtype.is_floating_point:
                    module._buffers[key] = buffer.to(dtype)
    dtype = getattr(torch, str(dtypes.get("router")), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        twin.router.to(dtype)


def _full_tensors(ex: TwinExperts) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, t in ex.shared.items():
        tensors[f"shared/{name}"] = t
    for name, (a, b) in ex.factors.items():
        tensors[f"factor_a/{name}"] = a
        tensors[f"factor_b/{name}"] = b
    for name, t in ex.dense.items():
        tensors[f"dense/{name}"] = t
    for name, values in ex.specific.items():
        for i, t in enumerate(values):
            tensors[f"specific/{i}/{name}"] = t
    return tensors


def load(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    copy: bool = True,
    check_base: bool = True,
    **kwargs: Any,
):
    """A :class:`TwinModel` (or :class:`TwinLoraModel`) over ``model`` (the base architecture)
    from a folder written by :func:`save`. ``kwargs`` go to the class (``top_k``,
    ``features``).

    ``check_base``: compare ``model``'s config with the saved model's, the settings that
    change the computation without changing a shape (head counts, RoPE, norm epsilons,
    activation: :data:`meldkit.goat.io.ARCHITECTURE_FIELDS`; files saved before that record
    load without it), and for a LoRA twin the base the twin was saved over, its parameters'
    names and shapes and each adapted layer's weight fingerprint. A LoRA twin adds to the
    base's weights, so another base (a checkpoint with other weights, more layers, a resized
    vocabulary) gives a silently different model; ``False`` applies it anyway. A base in
    another dtype than the saved one's passes if its weights round to the same ones.

    A twin saved after a cast (``.to(torch.bfloat16)``) and loaded into a base in the dtype it
    was saved in computes as the saved one did (its layers' copies of the experts and its
    router are cast as they were); into a base in another dtype, with the experts as built.

    Raises
    ------
    TwinError
        Missing or foreign files, a model whose parameters do not match the saved ones, or
        (``check_base``) a model whose config differs from the saved one's, or a LoRA twin's
        base that is not ``model``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise TwinError(f"meldkit.twin.load: {folder} has no {CONFIG} and {WEIGHTS}")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TwinError(f"meldkit.twin.load: {cfg_path} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TwinError(f"meldkit.twin.load: {cfg_path} is not a {FORMAT} file")
    try:
        tensors = load_file(str(w_path))
        with safe_open(str(w_path), "pt") as handle:
            file_id = (handle.metadata() or {}).get("save_id")
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise TwinError(
            f"meldkit.twin.load: {w_path} is not a readable safetensors file ({e})"
        ) from None
    if file_id != meta.get("save_id"):  # both None for files from before the id
        raise TwinError(
            f"meldkit.twin.load: {folder}: {WEIGHTS} and {CONFIG} come from different saves "
            "(a save was interrupted, or one file was copied over another); save again"
        )
    r = meta.get("router")
    keys = ("in_features", "hidden", "dropout")
    tasks = meta.get("tasks")
    if (
        not isinstance(tasks, list)
        or not tasks
        or not isinstance(r, dict)
        or any(k not in r for k in keys)
    ):
        raise TwinError(
            f"meldkit.twin.load: {cfg_path} lacks its task list or router settings "
            "(a damaged or hand-edited file)"
        )
    router = {k.partition("/")[2]: t for k, t in tensors.items() if k.startswith("router/")}
    try:
        twin_router = TwinRouter(r["in_features"], len(tasks), r["hidden"], r["dropout"])
        twin_router.load_state_dict(router)
    except (RuntimeError, TypeError, ValueError) as e:
        raise TwinError(
            f"meldkit.twin.load: {folder}: the router's tensors do not match its settings in "
            f"{CONFIG} ({len(tasks)} tasks): {e}"
        ) from None
    twin_router.eval()
    twin_router.trained = bool(r.get("trained", True))  # files from before the flag: trained
    kwargs.setdefault("top_k", meta.get("top_k"))
    if check_base:
        difference = architecture_difference(meta.get("architecture"), model)
        if difference is not None:
            raise TwinError(
                f"meldkit.twin.load: {folder}: base config check: the model's config differs "
                f"from the saved twin's in {difference}: same shapes, another computation; load "
                "the base the twin was saved over, or pass check_base=False to use this one "
                "anyway (for a LoRA twin that also skips the base weight checks)"
            )
    if meta.get("kind", "full") == "lora":
        sketches = {
            k.partition("/")[2]: tensors.pop(k)
            for k in list(tensors)
            if k.startswith(f"{_SKETCH}/")
        }
        others = {
            k.partition("/")[2]: tensors.pop(k) for k in list(tensors) if k.startswith(f"{_OTHER}/")
        }
        if check_base and "base" in meta:
            _check_base(model, meta["base"], sketches, folder, others)
        twin = TwinLoraModel(
            model, _lora_experts(meta, tensors, w_path), router=twin_router, copy=copy, **kwargs
        )
        _restore_dtypes(twin, meta.get("dtypes"))
        return twin
    shared, factors_a, factors_b, dense = {}, {}, {}, {}
    specific: dict[str, list[torch.Tensor | None]] = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "shared":
            shared[rest] = t
        elif kind == "factor_a":
            factors_a[rest] = t
        elif kind == "factor_b":
            factors_b[rest] = t
        elif kind == "dense":
            dense[rest] = t
        elif kind == "specific":
            i, _, name = rest.partition("/")
            specific.setdefault(name, [None] * len(tasks))[int(i)] = t
        elif kind == "router":
            continue
        else:
            raise TwinError(f"meldkit.twin.load: {w_path}: unexpected tensor {key!r}")
    if set(factors_a) != set(factors_b):
        raise TwinError(f"meldkit.twin.load: {w_path}: factor pairs are incomplete")
    incomplete = [n for n, v in specific.items() if any(t is None for t in v)]
    if incomplete:
        raise TwinError(f"meldkit.twin.load: {w_path}: {incomplete[0]!r} lacks a task's tensor")
    experts = TwinExperts(
        tasks=tasks,
        shared=shared,
        factors={n: (factors_a[n], factors_b[n]) for n in factors_a},
        dense=dense,
        specific=specific,  # type: ignore[arg-type]
        errors={k: list(v) for k, v in meta.get("errors", {}).items()},
        config=meta.get("build", {}),
    )
    twin = TwinModel(model, experts, router=twin_router, copy=copy, **kwargs)
    _restore_dtypes(twin, meta.get("dtypes"))
    return twin


def _check_base(
    model: nn.Module,
    base: dict,
    sketches: dict[str, torch.Tensor],
    folder: Path,
    others: dict[str, torch.Tensor] | None = None,
) -> None:
    """Raise :class:`TwinError` unless ``model`` is the base a LoRA twin was saved over: its
    parameters' names and shapes, the adapted layers' weights (``sketches``) and every other
    parameter (``others``; files from before them have none) match the saved ones."""
    hint = (
        "load the base the adapters were trained on, or pass check_base=False (that also "
        "skips the config check)"
    )
    difference = layout_difference(base["parameters"], parameter_layout(model))
    if difference is not None:
        raise TwinError(
            f"meldkit.twin.load: {folder}: base weight check: the model is not the twin's "
            f"base: it {difference}; {hint}"
        )
    for name, sketch in sketches.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            continue  # TwinLoraModel names the missing module
        saved_dtype = getattr(torch, base["dtype"].get(name, ""), weight.dtype)
        rtol = sketch_rtol(saved_dtype, weight.dtype)
        distance = sketch_distance(sketch, base_sketch(weight))
        if not distance <= rtol:
            raise TwinError(
                f"meldkit.twin.load: {folder}: base weight check: layer {name!r}: the model's "
                f"weight is not the twin's base's (its fingerprint differs by {distance:.3g} "
                f"relative, more than {rtol:.1g}); {hint}"
            )
    if others:
        difference = sketches_difference(
            others, base.get("other_dtypes", {}), dict(model.named_parameters())
        )
        if difference is not None:
            raise TwinError(
                f"meldkit.twin.load: {folder}: base weight check: the model is not the twin's "
                f"base: it {difference}; {hint}"
            )


def _lora_experts(meta: dict, tensors: dict[str, torch.Tensor], w_path: Path) -> TwinLoraExperts:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind != "router":
            parts.setdefault(kind, {})[name] = t
    kinds = ("shared_a", "shared_b", "delta_a_u", "delta_a_v", "delta_b_u", "delta_b_v")
    names = set(parts.get("shared_a", {}))
    if set(parts) != set(kinds) or any(set(parts[k]) != names for k in kinds):
        raise TwinError(f"meldkit.twin.load: {w_path}: incomplete LoRA factors")
    return TwinLoraExperts(
        tasks=list(meta["tasks"]),
        scaling={k: float(v) for k, v in meta["scaling"].items()},
        shared_a=parts["shared_a"],
        shared_b=parts["shared_b"],
        delta_a={n: (parts["delta_a_u"][n], parts["delta_a_v"][n]) for n in names},
        delta_b={n: (parts["delta_b_u"][n], parts["delta_b_v"][n]) for n in names},
        errors={k: list(v) for k, v in meta.get("errors", {}).items()},
        config=meta.get("build", {}),
    )


__all__ = ["load", "save"]
