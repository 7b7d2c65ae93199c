"""Saving and loading GOAT adapters as one safetensors file.

Layout, for every GOAT layer ``NAME`` (its qualified module name in the wrapped model)::

    NAME.lora_a         [E, d, n]   expert down-projections A_j (their dtype, normally fp32)
    NAME.lora_b         [E, m, d]   expert up-projections B_j
    NAME.router.weight  [E, n]      router W_z
    NAME.alignment_a    [r, n] fp32 only for the SVD inits: the base was adjusted to
    NAME.alignment_b    [m, r] fp32 W̃0 = W0 − alignment_b @ alignment_a

Metadata (strings): ``format = "pt"``, ``meldkit_goat`` (the layout version), ``config`` (the
:class:`GoatConfig` as JSON) and ``layers`` (JSON: per layer ``in_features``, ``out_features``
and the base weight's dtype when saved).

The alignment factors are the *initial* experts (times s/E), not the trained ones, so the file
holds everything needed to rebuild W̃0 from the original base weights; the adjustment is
recomputed with :func:`meldkit.goat.init.base_delta`, whose arithmetic is fixed, so a base
model loaded fresh from its checkpoint (in the dtype it was trained in) gets bit-for-bit the
weights the trained model had. The file is written to a temporary name beside ``path`` and
renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from meldkit.goat.config import GoatConfig
from meldkit.goat.layer import GoatLinear
from meldkit.goat.model import (
    build_layer,
    config_of,
    find_targets,
    freeze_base,
    goat_layers,
    replace_module,
    track_forwards,
    unwrap,
)

FORMAT_VERSION = "1"
# File name used when ``path`` is a directory.
ADAPTER_FILE = "goat_adapter.safetensors"
_PARTS = ("lora_a", "lora_b", "router.weight")
_ALIGNMENT = ("alignment_a", "alignment_b")


class AdapterError(ValueError):
    """An adapter file that cannot be loaded into the given model (the message says why)."""


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / ADAPTER_FILE if p.is_dir() else p


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the GOAT layers of ``model`` (experts, routers, base alignment, config) to ``path``.

    Parameters
    ----------
    model : nn.Module
        A model wrapped by :func:`meldkit.goat.wrap` or :func:`load_adapter`.
    path : path-like
        The ``.safetensors`` file to write (replaced if it exists), or a directory to write
        ``goat_adapter.safetensors`` into.

    Returns
    -------
    Path
        The file written.
    """
    from safetensors.torch import save_file

    config = config_of(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, layer in goat_layers(model):
        tensors[f"{name}.lora_a"] = layer.lora_a.detach()
        tensors[f"{name}.lora_b"] = layer.lora_b.detach()
        tensors[f"{name}.router.weight"] = layer.router.weight.detach()
        if layer.alignment is not None:
            tensors[f"{name}.alignment_a"], tensors[f"{name}.alignment_b"] = layer.alignment
        layers[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "base_dtype": str(layer.base_layer.weight.dtype).removeprefix("torch."),
        }
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {
        "format": "pt",
        "meldkit_goat": FORMAT_VERSION,
        "config": config.to_json(),
        "layers": json.dumps(layers),
    }
    target = _resolve(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_adapter(
    path: str | os.PathLike,
) -> tuple[GoatConfig, dict[str, dict], dict[str, torch.Tensor]]:
    """``(config, layers, tensors)`` of an adapter file (CPU tensors), checked for consistency.

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
            | {"base_dtype": str(info.get("base_dtype"))}
            for name, info in json.loads(metadata["layers"]).items()
        }
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
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise AdapterError(f"{file}: unexpected tensors {extra[:5]}")
    return config, layers, tensors


def load_adapter(
    model: nn.Module, path: str | os.PathLike, *, keep_original: bool = True
) -> nn.Module:
    """Wrap ``model`` with the GOAT adapter saved at ``path``, in place.

    ``model`` is normally the base model freshly loaded (unwrapped): its targeted layers become
    GOAT layers holding the saved experts and routers, and their weights are adjusted by the
    saved alignment, giving bit-for-bit the model that was saved when the base weights (and
    dtype) are the ones it was trained from. No SVD runs. A model that already has GOAT layers
    must have the same config and layers; it is unwrapped first (exactly when it kept its
    original weights, see :func:`meldkit.goat.wrap`) and then loaded.

    Parameters
    ----------
    model : nn.Module
        The base model (or a GOAT model with the same config).
    path : path-like
        A file written by :func:`save_adapter` (or its directory).
    keep_original : bool
        As in :func:`meldkit.goat.wrap`: keep CPU copies of the base weights for a bit-exact
        :func:`meldkit.goat.unwrap`.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    AdapterError
        The file is not a GOAT adapter, or it does not fit the model: a layer it names is
        missing, not an ``nn.Linear`` or of another shape, its base weight has another dtype
        than the adapter was trained with (SVD inits: the adjusted base would differ), the
        config's ``target_modules`` select other layers of this model, or the model already has
        GOAT layers with another config.
        The model is left untouched.
    """
    config, layers, tensors = read_adapter(path)
    file = _resolve(path)
    existing = dict(goat_layers(model))
    if existing:
        if config_of(model) != config:
            raise AdapterError(
                f"{file}: adapter config {config} differs from the model's GOAT config "
                f"{config_of(model)}"
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
        want = (info["out_features"], info["in_features"])
        if tuple(linear.weight.shape) != want:
            raise AdapterError(
                f"{file}: layer {name!r} is nn.Linear({linear.in_features}, "
                f"{linear.out_features}) in the model, the adapter was saved for "
                f"nn.Linear({want[1]}, {want[0]})"
            )
        # The adjusted base W̃0 is rounded to the base dtype it was trained in: another dtype
        # gives other weights than the trained model's (init "lora" adjusts nothing).
        saved_dtype = info["base_dtype"]
        dtype = str(linear.weight.dtype).removeprefix("torch.")
        if config.init != "lora" and saved_dtype != "None" and saved_dtype != dtype:
            raise AdapterError(
                f"{file}: layer {name!r} was trained on a {saved_dtype} base, the model's is "
                f"{dtype}: the adjusted base weights would differ from the trained model's. "
                f"Load into the base in {saved_dtype} (then cast the model if you need {dtype})"
            )
    if not existing:
        try:
            selected = find_targets(model, config.target_modules)
        except ValueError as exc:
            raise AdapterError(f"{file}: {exc}") from None
        if set(selected) != set(layers):
            raise AdapterError(
                f"{file}: target_modules={config.target_modules!r} selects other layers of this "
                f"model than the adapter holds (only in adapter: "
                f"{sorted(set(layers) - set(selected))[:5]}, only in model: "
                f"{sorted(set(selected) - set(layers))[:5]})"
            )
    else:
        unwrap(model)

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
        )
        replace_module(model, name, layer)
    freeze_base(model)
    track_forwards(model)
    return model
