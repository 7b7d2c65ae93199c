"""mergekit-style merge configurations: parsed, validated, and rejected loudly when a key is
unknown or unsupported (never silently ignored).

Accepted (the ``models`` form of mergekit's YAML)::

    merge_method: ties
    base_model: path/to/base          # required by every method but linear
    models:
      - model: path/to/finetune_a
        parameters: {weight: 0.5, density: 0.5}
      - model: path/to/finetune_b
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}   # top-level method parameters
    dtype: float32                    # compute dtype: every input is converted to it
    out_dtype: bfloat16               # storage dtype of the result (default: dtype)

Per-model parameters may also appear at the top level, as defaults for every model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from meldkit.merging.methods import MergeMethod, get_method

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
# mergekit keys that meldkit knows but does not implement yet: named in the error.
UNSUPPORTED_KEYS = ("slices", "modules", "tokenizer", "tokenizer_source", "chat_template")
GLOBAL_ONLY = ("normalize", "lambda", "rescale", "int8_mask", "t", "filter_wise")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ConfigError(ValueError):
    """A merge configuration that cannot run, with the offending key in the message."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned model: its folder and its parameters (weight, density, gamma, epsilon)."""

    path: Path
    params: dict[str, float]


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration."""

    method: MergeMethod
    base: Path | None
    models: tuple[ModelSpec, ...]
    params: dict[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None

    def model_param(self, name: str, default: float) -> list[float]:
        """Per-model values of ``name`` (weight, density, gamma, epsilon), with defaults."""
        return [float(m.params.get(name, default)) for m in self.models]


def _dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[value]


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(
            f"{where}: gradient and filtered parameter values (lists) are not supported yet; "
            "give one number"
        )
    if isinstance(value, bool) or value is None:
        return value
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return value


def parse_config(
    raw: Mapping[str, Any] | str | os.PathLike, base_dir: Path | None = None
) -> MergeConfig:
    """Validate a mergekit-style configuration (a mapping, or a path to a YAML file).

    Relative model paths resolve against the YAML file's folder (or ``base_dir``).

    Raises
    ------
    ConfigError
        Naming every unknown key, a parameter the method does not take, a missing base model, a
        dtype meldkit does not know, or a model listed without a path.
    """
    if not isinstance(raw, Mapping):
        import yaml

        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        base_dir = base_dir or path.parent
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    base_dir = base_dir or Path.cwd()
    unsupported = [k for k in raw if k in UNSUPPORTED_KEYS]
    if unsupported:
        raise ConfigError(f"keys not supported yet: {', '.join(unsupported)}")
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(
            f"unknown keys: {', '.join(map(str, unknown))} (known: {', '.join(TOP_LEVEL_KEYS)})"
        )
    if "merge_method" not in raw:
        raise ConfigError("merge_method is missing")
    try:
        method = get_method(str(raw["merge_method"]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    def resolve(p: Any, where: str) -> Path:
        if not isinstance(p, (str, os.PathLike)) or not str(p):
            raise ConfigError(f"{where}: expected a model folder path, got {p!r}")
        path = Path(p)
        return path if path.is_absolute() else (base_dir / path)

    base = raw.get("base_model")
    base = resolve(base, "base_model") if base is not None else None
    if method.needs_base and base is None:
        raise ConfigError(f"merge_method {method.name} needs base_model")

    top = dict(raw.get("parameters") or {})
    allowed_global = set(method.global_params) | set(method.model_params)
    bad = [k for k in top if k not in allowed_global]
    if bad:
        raise ConfigError(
            f"parameters: {', '.join(bad)} not accepted by {method.name} "
            f"(accepted: {', '.join(sorted(allowed_global)) or 'none'})"
        )
    params = {k: _scalar(v, f"parameters.{k}") for k, v in top.items()}
    defaults = {k: v for k, v in params.items() if k in method.model_params}

    entries = raw.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError("models: expected a non-empty list")
    models = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ConfigError(f"models[{i}]: expected {{model: PATH, parameters: {{...}}}}")
        extra = [k for k in entry if k not in ("model", "parameters")]
        if extra:
            raise ConfigError(f"models[{i}]: unknown keys: {', '.join(map(str, extra))}")
        p = dict(entry.get("parameters") or {})
        bad = [k for k in p if k not in method.model_params]
        if bad:
            raise ConfigError(
                f"models[{i}].parameters: {', '.join(bad)} not accepted by {method.name} "
                f"(accepted: {', '.join(method.model_params) or 'none'})"
            )
        merged = {
            **defaults,
            **{k: _scalar(v, f"models[{i}].parameters.{k}") for k, v in p.items()},
        }
        path = resolve(entry["model"], f"models[{i}].model")
        if base is not None and path.resolve() == base.resolve():
            continue  # mergekit lists the base among the models at times: it contributes τ = 0
        models.append(ModelSpec(path, merged))
    if method.name == "slerp" and len(models) != 1:
        raise ConfigError("slerp merges the base with exactly one other model")
    if method.kind == "model_stock" and len(models) < 2:
        raise ConfigError("model_stock needs at least two fine-tuned models besides the base")
    for i, m in enumerate(models):
        d = m.params.get("density")
        if d is not None and not 0 <= d <= 1:
            raise ConfigError(f"models[{i}].parameters.density: {d} is not in [0, 1]")
    return MergeConfig(
        method=method,
        base=base,
        models=tuple(models),
        params=params,
        dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
    )
