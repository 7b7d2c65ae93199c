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
    tokenizer_source: base            # or tokenizer: {source: base}; see below
    chat_template: chatml             # or auto, alpaca, llama3, mistral, exaone, a Jinja text

Each model is listed once (mergekit refuses duplicate inputs too; a second entry would count its
task vector twice). ``dtype`` and ``out_dtype`` may carry torch's prefix (``torch.bfloat16``),
as mergekit reads them.

Per-model parameters may also appear at the top level, as defaults for every model. The keys
each method accepts are mergekit's (its method registry): for the task-vector methods
(task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
della_linear) ``weight`` and ``density`` per model, ``gamma`` (breadcrumbs) or ``epsilon``
(della) per model, and ``normalize``, ``lambda``, ``rescale``, ``int8_mask`` at the top level;
``weight`` and ``normalize`` for linear; ``filter_wise`` for model_stock; ``t`` for slerp
(required, as in mergekit). ``weight`` is required too, as in mergekit (it has no default
there): every model of a task-vector or linear merge needs one for every tensor, from its own
parameters, its slice's or the top-level ones; a missing weight, or a filtered weight that
matches some tensor by no filter and has no value below it, is an error naming the model, the
tensor and the parameter (before any tensor is merged). Some change nothing, in meldkit as in
mergekit: ``int8_mask`` (mergekit's memory saving for its sign masks; meldkit holds no mask
tensor), and task_arithmetic's ``density`` and ``rescale`` (it sparsifies nothing; accepted
with a warning saying so). A top-level parameter given per model (say, ``lambda`` in a model's
``parameters``), which mergekit ignores silently, is taken as the top-level value when every
merged model gives the same one (with a warning: mergekit would merge with its top-level value
or default), and is a ConfigError otherwise (or when the top-level value differs).
``rescale`` is a bool as in mergekit (``true``: the method's own rescaling, L1 matching) or
one of meldkit's named rescalings ``none``, ``l1``, ``inverse_density`` (divide by the keep
probability, as the DARE paper does). The sign-electing methods (ties, dare_ties,
breadcrumbs_ties, della) also take meldkit's top-level ``consensus``: ``sum`` (the sign of the
weighted mass, the default and mergekit's only election) or ``count`` (the sign most models
vote for), which mergekit does not read.

Each resolved ``density``, ``gamma`` and ``epsilon`` lies in [0, 1]; DELLA with a
density strictly between 0 and 1 needs ``density − epsilon > 0`` and ``density + epsilon ≤ 1``
(density 1 keeps every task vector whole and 0 drops it, as in mergekit). These are checked
before any tensor is merged, with the key named.

A per-model parameter is a number, or, as in mergekit:

- a **gradient**, a list of numbers interpolated over the layers: layer i of L gets
  ``t = i / (L − 1)``, and the value at position ``t·(len − 1)`` of the list, linearly between
  neighbours; tensors outside the layers (embeddings, final norm, head) get ``t = 0``. Each
  stack of layers counts its own L, as mergekit counts each module's (a multimodal model's
  ``model.layers`` and ``visual.blocks``, T5's ``encoder.block`` and ``decoder.block``); where
  the positions are not certain (a stack with missing layers, a layer count config.json
  contradicts) a gradient is refused (:func:`meldkit.merging.engine.layer_layout`);
- **filtered** values, a list of ``{filter: SUBSTRING, value: V}`` entries tried in order: the
  first whose ``filter`` occurs in the tensor's name (or that has no filter, or ``*``) gives V,
  itself a number or a gradient; where none matches, the value given at the next level down
  (a source's, then its slice's, then the top-level ``parameters``) applies, else the default.

The numeric top-level parameters ``lambda`` and ``t`` may be gradients or filtered values too,
evaluated per tensor as mergekit evaluates them.

mergekit's ``slices`` form is read where it describes the same thing: every slice lists the
same models over the same layer range, and the slices cover the layers in order from 0 (a
schedule of parameters over layer ranges; stacking or reordering layers, as passthrough merges
do, is refused)::

    slices:
      - sources:
          - {model: path/to/base, layer_range: [0, 16]}
          - {model: path/to/finetune_a, layer_range: [0, 16], parameters: {density: 0.3}}
        parameters: {weight: 0.5}     # per-model defaults for this slice
      - sources:
          - {model: path/to/base, layer_range: [16, 32]}
          - {model: path/to/finetune_a, layer_range: [16, 32], parameters: {density: 0.7}}

As in mergekit, a source's parameters override its slice's, which override the top-level ones; a
slice's ``parameters`` may also give the method's top-level parameters (``lambda``,
``normalize``, ``rescale``, ``int8_mask``, slerp's ``t``, ...), which override the top-level ones
for that slice's tensors (a filter of the slice's that matches no tensor name falls through to the
top-level value), while a source's are taken as the slice's when every merged source of the
slice gives the same value (with a warning: mergekit ignores them) and refused otherwise; a
gradient is interpolated over the slice's layers (``t = (i − start) / (length − 1)``, 1 for a
one-layer slice); the tensors before the layers (embeddings: a name with ``embed``, ``wte`` or
``wpe``, but not GPT-NeoX's ``embed_out`` head) take the first slice's values at ``t = 0``, the
others outside the layers (final norm, head) the last slice's at ``t = 0``. One slice over all
layers is the ``models`` form.

The tokenizer files of the result (``tokenizer.json``, ``tokenizer_config.json``, ...) come from
the base model (or the first model without one), or from the folder that ``tokenizer_source`` or
``tokenizer: {source: ...}`` names: ``base``, or the path or Hugging Face ID of one of the merged
models, also with older mergekit's ``model:`` prefix. The output's embeddings have the base's
vocabulary rows (a fine-tune with more rows, added tokens, is trimmed to them with a warning;
without a base, every model must have the same: see :mod:`meldkit.merging.engine`), so a merged
model is accepted as the source only when its embeddings and head have the base's shapes: a model
whose rows are trimmed is refused (a ConfigError, before any tensor is merged), as its tokenizer
would not match the output. mergekit's
``union`` (a merged vocabulary, with the embeddings rebuilt over it), a tokenizer from a model
outside the merge, and per-token ``tokens`` overrides are refused: they need embedding surgery,
which meldkit does not do.

``chat_template`` (mergekit's) sets the output tokenizer's chat template: a built-in one by name
(``chatml``, ``llama3``, ``alpaca``, ``mistral``, ``exaone``), ``auto`` (the template most of the
merged models' tokenizers have, the first of them on a tie; none found: the tokenizer keeps its
own, with a warning), or a Jinja template given in full (at least 20 characters with a ``{``;
shorter values are taken for misspelt names and refused). See
:mod:`meldkit.merging.chat_templates`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from meldkit.merging import chat_templates
from meldkit.merging.methods import MergeMethod, get_method

TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "slices",
    "chat_template",
)
# mergekit keys that meldkit knows but does not implement yet: named in the error.
UNSUPPORTED_KEYS = ("modules",)
# Top-level parameters that may vary per tensor (gradients, filters), as in mergekit.
NUMERIC_GLOBALS = ("lambda", "t")
# Named rescalings of the sparsified task vectors (merge_tensors' ``rescale``), besides a bool.
RESCALES = ("none", "l1", "inverse_density")
CONSENSUS = ("sum", "count")  # meldkit's sign elections (mergekit's methods all use "sum")
# Defaults of the per-model parameters (mergekit's). ``weight`` has none in mergekit: the methods
# that take it require it (MergeMethod.required, checked per tensor before merging); its 1 here
# only fills the weights of the methods that take none (model_stock, slerp).
MODEL_DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}

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
    """One fine-tuned model: its folder and its parameters (weight, density, gamma, epsilon);
    ``where`` names its entry in the config for error messages."""

    path: Path
    params: dict[str, float]
    where: str = ""


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration."""

    method: MergeMethod
    base: Path | None
    models: tuple[ModelSpec, ...]
    # Top-level parameters (per-model defaults may be settings; in the slices form, a method
    # parameter that varies by slice is a per-slice setting).
    params: dict[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    # Folder the tokenizer files come from (None: the base's, or the first model's).
    tokenizer_source: Path | None = None
    # The layer count the config's slices cover (None: a models-form config).
    slice_layers: int | None = None
    # Why a model path named in the config was not found (the folders tried, the Hugging Face
    # cache), by the path the config resolves it to: the engine's error when it is still missing.
    missing: dict[Path, str] = dataclasses.field(default_factory=dict)
    # How the config names each model (its path as written, or its Hugging Face ID), by the
    # path it resolves to: the model card names the models so, not by this machine's paths.
    names: dict[Path, str] = dataclasses.field(default_factory=dict)
    # The output tokenizer's chat template: "auto", a built-in name or a Jinja template
    # (:mod:`meldkit.merging.chat_templates`); None keeps the tokenizer's own.
    chat_template: str | None = None

    def model_param(
        self,
        name: str,
        default: float,
        tensor_name: str = "",
        t: float = 0.0,
        layer: int | None = None,
    ) -> list[float]:
        """Per-model values of ``name`` (weight, density, gamma, epsilon) for one tensor
        (``tensor_name`` at layer position ``t``, in layer ``layer`` or outside the layers:
        gradients, filters and slices resolved), with ``default`` where a model gives none (or
        no filter matches)."""
        out = []
        for m in self.models:
            value = evaluate_setting(m.params.get(name, default), tensor_name, t, layer)
            out.append(float(default if value is None else value))
        return out

    def global_param(
        self, name: str, tensor_name: str = "", t: float = 0.0, layer: int | None = None
    ) -> Any:
        """The top-level parameter ``name`` for one tensor (gradients and filters resolved;
        None when it is not given, or no filter matches)."""
        if name not in self.params:
            return None
        return evaluate_setting(self.params[name], tensor_name, t, layer)

    def check_tensor(self, tensor_name: str, t: float = 0.0, layer: int | None = None) -> None:
        """Raise ConfigError if the parameters resolved for one tensor cannot merge it: a DELLA
        keep probability outside (0, 1], slerp's ``t`` matched by no filter, linear weights
        summing to 0 under ``normalize``, or a required
        per-model parameter (``weight``) that no filter, slice or top-level value gives this
        tensor. The engine calls it for every tensor before merging any."""
        method = self.method
        if method.kind == "slerp" and self.global_param("t", tensor_name, t, layer) is None:
            raise ConfigError(
                f"parameters.t: no filter matches {tensor_name} (add a last entry without a "
                "filter, {value: V}, as a default)"
            )
        for name in method.required:
            for m in self.models:
                if evaluate_setting(m.params.get(name), tensor_name, t, layer) is None:
                    raise ConfigError(
                        f"{m.where} ({m.path}): {name}: no value for tensor {tensor_name} (no "
                        f"filter matches it, and no slice or top-level {name} gives one); "
                        f"{method.name} needs a {name} for every tensor of every model, as "
                        f"mergekit does (Missing required parameter {name}): add a last entry "
                        f"without a filter, {{value: V}}, or a top-level {name}"
                    )
        if method.kind == "linear":
            normalize = self.global_param("normalize", tensor_name, t, layer)
            if (method.normalize if normalize is None else bool(normalize)) and sum(
                self.model_param("weight", MODEL_DEFAULTS["weight"], tensor_name, t, layer)
            ) == 0:
                raise ConfigError(
                    f"{tensor_name}: the models' weights sum to 0, which a linear merge with "
                    "normalize cannot divide by (mergekit writes NaN there): give this tensor "
                    "other weights, or set parameters: {normalize: false}"
                )
        if method.sparsify != "della":
            return
        densities = self.model_param("density", MODEL_DEFAULTS["density"], tensor_name, t, layer)
        epsilons = self.model_param("epsilon", MODEL_DEFAULTS["epsilon"], tensor_name, t, layer)
        for m, d, e in zip(self.models, densities, epsilons, strict=True):
            _check_della(d, e, "epsilon" not in m.params, f"{m.where} ({m.path}), {tensor_name}")


def _dtype(value: Any, key: str) -> torch.dtype | None:
    """A dtype by name; ``torch.bfloat16`` spelt with its module too, as mergekit reads it."""
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPES:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _number(value: Any) -> int | float | None:
    """``value`` as a Python number where it is one: an int or float (not a bool), a NumPy
    scalar, or a string that reads as a number (YAML reads ``5e-1``, without a decimal point,
    as a string; mergekit takes it as 0.5); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str) and "_" not in value:  # float() reads "1_000" too: YAML does not
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None  # "nan", "inf": not numbers here
    return None


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{where}: expected one value here, not a list (no gradient)")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"  # a quoted YAML boolean, as mergekit reads it
    number = _number(value)
    if number is None:
        raise ConfigError(f"{where}: expected a number or true/false, got {value!r}")
    return number


def _check_della(density: float, epsilon: float, default_epsilon: bool, where: str) -> None:
    """DELLA's keep probabilities ``density ± epsilon`` must lie in (0, 1] when the density is
    strictly between 0 and 1 (1 keeps τ whole, 0 drops it: mergekit's short-circuits)."""
    if 0 < density < 1 and not (0 < density - epsilon and density + epsilon <= 1):
        eps = f"epsilon {epsilon}" + (" (the default)" if default_epsilon else "")
        raise ConfigError(
            f"{where}: della needs 0 < density - epsilon and density + epsilon <= 1, got "
            f"density {density} and {eps}; choose a smaller epsilon"
        )


def _check_ranges(params: Mapping[str, Any], where: str) -> None:
    """Every value a per-model ``density``, ``gamma`` or ``epsilon`` can take lies in [0, 1]
    (gradients interpolate between their values, so checking those is enough)."""
    for key in ("density", "gamma", "epsilon"):
        for x in _numbers(params.get(key)):
            if not 0 <= x <= 1:
                raise ConfigError(f"{where}.{key}: {x} is not in [0, 1]")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """A ``parameters`` block: a mapping of names to values (empty when absent)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of parameter names to values, got {value!r}"
        )
    return dict(value)


def _global(key: str, value: Any, where: str) -> Any:
    """A top-level method parameter: ``lambda`` and ``t`` may be gradients or filtered (as
    per-model settings are), ``rescale`` a bool or a named rescaling, the others one value."""
    if key in NUMERIC_GLOBALS:
        return _setting(value, where)
    if key == "rescale" and isinstance(value, str):
        if value not in RESCALES:
            raise ConfigError(
                f"{where}: {value!r} is not a rescaling; expected true, false or one of "
                f"{', '.join(RESCALES)}"
            )
        return value
    if key == "consensus":
        if value not in CONSENSUS:
            raise ConfigError(
                f"{where}: expected {' or '.join(CONSENSUS)} (the sign election), got {value!r}"
            )
        return value
    value = _scalar(value, where)
    if key == "rescale" and not isinstance(value, bool):
        raise ConfigError(
            f"{where}: expected true, false or one of {', '.join(RESCALES)}, got {value!r}"
        )
    return value


def _setting(value: Any, where: str) -> Any:
    """A per-model parameter: a number, a gradient (list of numbers), or filtered values."""
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return _scalar(value, where)
    if not value:
        raise ConfigError(f"{where}: empty list")
    if all(_number(v) is not None for v in value):
        return [float(_number(v)) for v in value]
    entries = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping) or "value" not in entry:
            raise ConfigError(
                f"{where}[{i}]: expected a number (gradient) or {{filter: NAME, value: V}}"
            )
        extra = [k for k in entry if k not in ("filter", "value")]
        if extra:
            raise ConfigError(f"{where}[{i}]: unknown keys: {', '.join(map(str, extra))}")
        flt = entry.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise ConfigError(f"{where}[{i}].filter: expected a string, got {flt!r}")
        inner = _setting(entry["value"], f"{where}[{i}].value")
        if isinstance(inner, dict):
            raise ConfigError(f"{where}[{i}].value: filters cannot nest")
        entries.append((flt, inner))
    return {"filters": entries}


def _fall_through(first: Any, then: Any) -> Any:
    """The setting that reads ``first`` and, where ``first`` is absent (None) or no filter of
    it matches the tensor, ``then``: mergekit's resolution from a higher-precedence scope to a
    lower one."""
    if first is None:
        return then
    if not isinstance(first, dict) or then is None:
        return first  # a number or a gradient: always a value
    rest = then["filters"] if isinstance(then, dict) else [(None, then)]
    return {"filters": [*first["filters"], *rest]}


def is_pre_layer(tensor_name: str) -> bool:
    """Whether a tensor outside the numbered layers comes before them (embeddings), for the
    slices form: mergekit plans those with the first slice, the rest with the last."""
    name = tensor_name.lower()
    parts = name.split(".")
    if "embed_out" in name:  # GPT-NeoX's output head
        return False
    return "embed" in name or "wte" in parts or "wpe" in parts


def evaluate_setting(setting: Any, tensor_name: str, t: float, layer: int | None = None) -> Any:
    """The value of a per-model parameter for one tensor at layer position ``t`` in [0, 1]
    (``layer``: its layer index, None outside the layers; read by per-slice settings)."""
    if isinstance(setting, dict) and "slices" in setting:
        ranges = setting["slices"]
        if layer is None:
            value = ranges[0][2] if is_pre_layer(tensor_name) else ranges[-1][2]
            return evaluate_setting(value, tensor_name, 0.0)
        for start, stop, value in ranges:
            if start <= layer < stop:
                local = (layer - start) / (stop - start - 1) if stop - start > 1 else 1.0
                return evaluate_setting(value, tensor_name, local)
        return None
    if isinstance(setting, dict):
        for flt, value in setting["filters"]:
            if flt is None or flt == "*" or flt in tensor_name:
                return evaluate_setting(value, tensor_name, t)
        return None
    if isinstance(setting, list):
        pos = t * (len(setting) - 1)
        i0 = int(pos)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = pos - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def hub_cache_folder(name: str) -> Path | None:
    """The local Hugging Face cache's snapshot of the model ``org/name`` (``org/name@revision``
    for a branch, tag or commit), as mergekit configs name models; None when ``name`` is not
    such an ID, ``huggingface_hub`` is not installed, or the model is not in the cache. Nothing
    is downloaded."""
    if not _HUB_ID.match(name):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    repo, _, revision = name.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed ID
        return None


def hub_missing_reason(name: str) -> str:
    """Why the Hugging Face model ID ``name`` has no local folder (for an error message):
    ``huggingface_hub`` not installed, or the model not in its cache."""
    repo, _, revision = name.partition("@")
    if revision:
        repo = f"{repo} --revision {revision}"
    try:
        from huggingface_hub import constants
    except ImportError:
        return (
            f"as a Hugging Face model ID, {name} needs the huggingface_hub package, which is not "
            "installed (meldkit does not depend on it): pip install huggingface_hub, then "
            f"download the model (hf download {repo}), or give its local folder"
        )
    return (
        f"as a Hugging Face model ID, {name} is not in the local cache ({constants.HF_HUB_CACHE}):"
        f" meldkit reads the local cache only: download the model first (hf download {repo}), "
        "or give its local folder"
    )


def _yaml_problem(path: Path, exc: Exception) -> str:
    """A YAML error in one line, its position named in the file (PyYAML, given the text, says
    ``"<unicode string>", line 3``): ``ties.yaml, line 4, column 1: not valid YAML: expected
    ',' or ']', but got '<stream end>' (while parsing a flow sequence, from line 3, column 12)``."""

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return f"{path}: not valid YAML: {' '.join(str(exc).split())}"
    text = f"{path}, {at(mark)}: not valid YAML: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        text += f" ({context}" + (f", from {at(context_mark)})" if context_mark else ")")
    return text


def parse_config(
    raw: Mapping[str, Any] | str | os.PathLike, base_dir: Path | None = None
) -> MergeConfig:
    """Validate a mergekit-style configuration (a mapping, or a path to a YAML file).

    A relative model path resolves against the working directory, as in mergekit, then against
    the YAML file's folder (or ``base_dir``); then a name such as ``org/model`` is looked up in
    the local Hugging Face cache. mergekit's ``MODEL+LORA`` (a LoRA applied to a model) is
    refused.

    Raises
    ------
    ConfigError
        Naming every unknown key, a parameter the method does not take, a missing base model, a
        dtype meldkit does not know, or a model listed without a path.
    """
    if not isinstance(raw, Mapping):
        import yaml

        path = Path(raw)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_problem(path, exc)) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.object[exc.start]:#04x})"
            ) from None
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
    chat_template = _chat_template(raw.get("chat_template"))
    if "merge_method" not in raw:
        raise ConfigError("merge_method is missing")
    try:
        method = get_method(str(raw["merge_method"]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    folders = [(Path.cwd(), "the working directory, where mergekit looks")]
    if base_dir is not None and Path(base_dir).resolve() != Path.cwd().resolve():
        folders.append((Path(base_dir), "the config's folder"))
    missing: dict[Path, str] = {}
    names: dict[Path, str] = {}

    def resolve(p: Any, where: str) -> Path:
        path = find(p, where)
        names.setdefault(path, os.fspath(p))
        return path

    def find(p: Any, where: str) -> Path:
        if not isinstance(p, (str, os.PathLike)) or not str(p):
            raise ConfigError(f"{where}: expected a model folder path, got {p!r}")
        path = Path(p)
        tried = [(path, "")] if path.is_absolute() else [(f / path, why) for f, why in folders]
        found = [c for c, _ in tried if c.exists()]
        if found:
            if len(found) > 1 and found[0].resolve() != found[1].resolve():
                warnings.warn(
                    f"{where}: {p} names {found[0]} (in the working directory, as mergekit "
                    f"reads it) and {found[1]} (beside the config): merging {found[0]}",
                    UserWarning,
                    stacklevel=3,
                )
            return found[0]
        if isinstance(p, str) and "+" in p:
            raise ConfigError(
                f"{where}: {p}: mergekit's MODEL+LORA syntax (a LoRA adapter applied to a model) "
                "is not supported: merge the adapter into its model first (peft's "
                "merge_and_unload) and give the merged model's folder (no folder of that name "
                "exists either)"
            )
        if isinstance(p, str):
            cached = hub_cache_folder(p)  # mergekit configs usually name Hugging Face models
            if cached is not None:
                return cached
        lines = [f"{c}{f' ({why})' if why else ''}" for c, why in tried]
        text = f"{where}: {p}: no such model folder or file: tried {' and '.join(lines)}"
        if isinstance(p, str) and _HUB_ID.match(p):
            text += f"; {hub_missing_reason(p)}"
        elif str(p).startswith("~"):
            text += f" (~ is not expanded, as in mergekit: write {Path(str(p)).expanduser()})"
        missing[tried[0][0]] = text
        return tried[0][0]

    base = raw.get("base_model")
    base = resolve(base, "base_model") if base is not None else None
    if method.needs_base and base is None:
        raise ConfigError(f"merge_method {method.name} needs base_model")

    top = _mapping(raw.get("parameters"), "parameters")
    allowed_global = set(method.global_params) | set(method.model_params)
    bad = [k for k in top if k not in allowed_global]
    if bad:
        raise ConfigError(
            f"parameters: {', '.join(map(str, bad))} not accepted by {method.name} "
            f"(accepted: {', '.join(sorted(allowed_global)) or 'none'})"
        )
    params = {
        k: _setting(v, f"parameters.{k}")
        if k in method.model_params
        else _global(k, v, f"parameters.{k}")
        for k, v in top.items()
    }
    defaults = {k: v for k, v in params.items() if k in method.model_params}
    _check_ranges(defaults, "parameters")

    # The base is the merge's θ₀ for every method but linear, which (as in mergekit) averages
    # it like any other model: listed among the models (or a slice's sources) with its weight,
    # or, in the models form, when only named as base_model, added with the top-level
    # parameters.
    base_is_theta0 = method.needs_base
    slice_layers = None
    models = []
    if "slices" in raw:
        if "models" in raw:
            raise ConfigError("give models or slices, not both")
        entries, spans, slice_globals = _entries_from_slices(
            raw["slices"],
            method,
            defaults,
            resolve,
            base.resolve() if base_is_theta0 and base else None,
        )
        slice_layers = spans[-1][1]
        if method.kind == "slerp" and "t" not in params:
            missing = [i for i, g in enumerate(slice_globals) if "t" not in g]
            if missing:
                raise ConfigError(
                    f"merge_method slerp needs parameters.t (mergekit has no default): "
                    f"slices[{missing[0]}].parameters gives none, nor do the top-level ones"
                )
        shared = {k for g in slice_globals for k in g} | {
            k for k in params if k not in method.model_params
        }
        for k in shared:
            # As in mergekit, a slice's value overrides the top-level one for the slice's
            # tensors (a filter that matches nothing falls through to it), and gradients run
            # over the slice's layers.
            top = params.get(k)
            if not isinstance(top, (list, dict)) and all(k not in g for g in slice_globals):
                continue  # one value for every tensor
            per_slice = [_fall_through(g.get(k), top) for g in slice_globals]
            params[k] = {"slices": [(a, b, v) for (a, b), v in zip(spans, per_slice, strict=True)]}
        for entry in entries:  # checked by _entries_from_slices; per-slice settings
            path = resolve(entry["model"], "slices")
            if base_is_theta0 and base is not None and path.resolve() == base.resolve():
                continue  # the base contributes τ = 0
            models.append(ModelSpec(path, entry["parameters"], "slices"))  # named with its path
    else:
        entries = raw.get("models") or []
        if not isinstance(entries, list) or not entries:
            raise ConfigError("models: expected a non-empty list")
        seen: dict[Path, int] = {}  # resolved folder -> its first entry
        given: list[tuple[str, dict[str, Any]]] = []  # top-level parameters given per model
        needed: list[str] = []  # the merged models' entries
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or "model" not in entry:
                raise ConfigError(f"models[{i}]: expected {{model: PATH, parameters: {{...}}}}")
            extra = [k for k in entry if k not in ("model", "parameters")]
            if extra:
                raise ConfigError(f"models[{i}]: unknown keys: {', '.join(map(str, extra))}")
            where = f"models[{i}].parameters"
            p, own_shared = _model_params(entry.get("parameters"), method, where)
            path = resolve(entry["model"], f"models[{i}].model")
            given.append((where, own_shared))
            first = seen.setdefault(path.resolve(), i)
            if first != i:
                # mergekit refuses it too ("Duplicate merge inputs"); counting it twice would
                # silently double its task vector.
                raise ConfigError(
                    f"models[{i}].model: {entry['model']} is the model of models[{first}] "
                    f"({path.resolve()}): list each model once (give it a larger weight "
                    "instead)"
                )
            if base_is_theta0 and base is not None and path.resolve() == base.resolve():
                continue  # mergekit lists the base among the models at times: it adds τ = 0
            needed.append(where)
            merged = {k: _fall_through(p.get(k), defaults.get(k)) for k in {**defaults, **p}}
            models.append(ModelSpec(path, merged, f"models[{i}]"))
        params |= _shared_given_per_model(given, needed, params, "parameters", method)
        if method.kind == "slerp" and "t" not in params:
            raise ConfigError("merge_method slerp needs parameters.t (mergekit has no default)")
    if (
        not base_is_theta0
        and base is not None
        and "slices" not in raw  # mergekit adds it to the models form only
        and all(m.path.resolve() != base.resolve() for m in models)
    ):
        if "weight" not in defaults:
            raise ConfigError(
                f"base_model: linear averages the base with the models (as mergekit does), but "
                f"{base} is not among the models and parameters.weight gives it no weight: list "
                "it under models with its weight, or drop base_model"
            )
        models.append(ModelSpec(base, dict(defaults), "base_model"))
    if not models:
        raise ConfigError("no model to merge: every model listed is the base model")
    inert = [k for k in method.inert if k != "int8_mask"]  # int8_mask saves memory in mergekit
    given_inert = [
        k for k in inert if k in params or any(k in m.params for m in models) or k in defaults
    ]
    if given_inert:
        warnings.warn(
            f"{' and '.join(given_inert)} change nothing in {method.name}, which sparsifies "
            "nothing (mergekit ignores them too): the task vectors are added whole",
            UserWarning,
            stacklevel=2,
        )
    for name in method.required:  # per tensor (filters, slices): MergeConfig.check_tensor
        for m in models:
            if name not in m.params:
                raise ConfigError(
                    f"{m.where} ({m.path}): {name} is missing: {method.name} needs a {name} for "
                    f'every model, as mergekit does (it stops with "Missing required parameter '
                    f"{name}\"); give it in the model's parameters, or in the top-level "
                    "parameters for every model"
                )
    if method.name == "slerp" and len(models) != 1:
        raise ConfigError("slerp merges the base with exactly one other model")
    if method.kind == "model_stock" and len(models) < 2:
        raise ConfigError("model_stock needs at least two fine-tuned models besides the base")
    if method.sparsify == "della":  # the common case, one value each, checked here already
        for m in models:
            d = m.params.get("density", MODEL_DEFAULTS["density"])
            e = m.params.get("epsilon", MODEL_DEFAULTS["epsilon"])
            if not isinstance(d, (list, dict)) and not isinstance(e, (list, dict)):
                _check_della(d, e, "epsilon" not in m.params, f"{m.where} ({m.path})")
    return MergeConfig(
        method=method,
        base=base,
        models=tuple(models),
        params=params,
        dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
        # The entries as the config names them: a Hugging Face ID resolves from the cache.
        tokenizer_source=_tokenizer_source(raw, base, [e["model"] for e in entries], resolve),
        slice_layers=slice_layers,
        missing=missing,
        names=names,
        chat_template=chat_template,
    )


def _chat_template(value: Any) -> str | None:
    """The config's ``chat_template``, checked (None where it gives none)."""
    if value is None:
        return None
    try:
        return chat_templates.check(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _numbers(setting: Any) -> list[float]:
    """Every number a per-model setting can take (None: none)."""
    if setting is None:
        return []
    if isinstance(setting, dict) and "slices" in setting:
        return [x for _, _, v in setting["slices"] for x in _numbers(v)]
    if isinstance(setting, dict):
        return [x for _, v in setting["filters"] for x in _numbers(v)]
    if isinstance(setting, list):
        return list(setting)
    return [setting]


def _entries_from_slices(
    slices: Any,
    method: MergeMethod,
    defaults: dict[str, Any],
    resolve,
    theta0: Path | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[int, int]], list[dict[str, Any]]]:
    """mergekit's slices as model entries whose parameters are per-slice settings
    (``{"slices": [(start, stop, setting), ...]}``), the layer range of each slice, and the
    top-level method parameters (``lambda``, ``normalize``, ...) each slice gives (its own, or
    the one value all its merged sources give: :func:`_shared_given_per_model`; ``theta0`` is
    the resolved base of a task-vector method, whose source need not give it)."""
    if not isinstance(slices, list) or not slices:
        raise ConfigError("slices: expected a non-empty list")
    order: list[str] = []  # the models as slices[0] names them, in its order
    values: dict[str, dict[str, list]] = {}  # resolved path -> parameter -> [setting per slice]
    spans = []
    slice_globals = []  # per slice: its own top-level method parameters
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(sl, Mapping) or "sources" not in sl:
            raise ConfigError(f"{where}: expected {{sources: [...], parameters: {{...}}}}")
        extra = [k for k in sl if k not in ("sources", "parameters")]
        if extra:
            raise ConfigError(f"{where}: unknown keys: {', '.join(map(str, extra))}")
        raw_params = _mapping(sl.get("parameters"), f"{where}.parameters")
        own_globals = {
            k: _global(k, v, f"{where}.parameters.{k}")
            for k, v in raw_params.items()
            if k in method.global_params and k not in method.model_params
        }
        slice_params, _ = _model_params(  # its top-level parameters are own_globals
            {k: v for k, v in raw_params.items() if k not in own_globals},
            method,
            f"{where}.parameters",
        )
        sources = sl["sources"]
        if not isinstance(sources, list) or not sources:
            raise ConfigError(f"{where}.sources: expected a non-empty list")
        span, paths = None, []
        given: list[tuple[str, dict[str, Any]]] = []  # top-level parameters given per source
        needed: list[str] = []  # the sources merged as models
        for j, src in enumerate(sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{at}: expected {{model: PATH, layer_range: [START, END]}}")
            extra = [k for k in src if k not in ("model", "layer_range", "parameters")]
            if extra:
                raise ConfigError(f"{at}: unknown keys: {', '.join(map(str, extra))}")
            lr = src["layer_range"]
            if (
                not isinstance(lr, (list, tuple))
                or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                or not 0 <= lr[0] < lr[1]
            ):
                raise ConfigError(f"{at}.layer_range: expected [START, END], 0 <= START < END")
            if span is not None and tuple(lr) != span:
                raise ConfigError(
                    f"{at}.layer_range: {list(lr)} differs from the slice's {list(span)}: "
                    "meldkit merges each layer with the same layer of every model (stacking or "
                    "shifting layers, as passthrough merges do, is not supported)"
                )
            span = tuple(lr)
            key = str(resolve(src["model"], f"{at}.model").resolve())
            if key in paths:
                raise ConfigError(f"{at}.model: listed twice in the slice")
            paths.append(key)
            own, own_shared = _model_params(src.get("parameters"), method, f"{at}.parameters")
            given.append((f"{at}.parameters", own_shared))
            if theta0 is None or Path(key) != theta0:
                needed.append(f"{at}.parameters")
            merged = {
                k: _fall_through(own.get(k), _fall_through(slice_params.get(k), defaults.get(k)))
                for k in {**defaults, **slice_params, **own}
            }
            entry = values.setdefault(key, {})
            for name in set(entry) | set(merged):
                entry.setdefault(name, [None] * i).append(merged.get(name))
            if i == 0:
                order.append(src["model"])
        # As a slice's own value (mergekit ignores a source's): when every source gives the same.
        own_globals |= _shared_given_per_model(
            given, needed, own_globals, f"{where}.parameters", method
        )
        slice_globals.append(own_globals)
        if i == 0:
            first = set(paths)
        elif set(paths) != first:
            other = sorted(first ^ set(paths))[0]
            raise ConfigError(
                f"{where}.sources: lists other models than slices[0] ({other}): meldkit needs "
                "every model in every slice"
            )
        start = spans[-1][1] if spans else 0
        if span[0] != start:
            raise ConfigError(
                f"{where}: starts at layer {span[0]}, expected {start}: the slices must cover "
                "the layers in order, from layer 0, without gaps or overlaps"
            )
        spans.append(span)
    entries = []
    for model in order:
        key = str(resolve(model, "slices").resolve())
        params = {}
        for name, per_slice in values[key].items():
            params[name] = {
                "slices": [(a, b, v) for (a, b), v in zip(spans, per_slice, strict=True)]
            }
        entries.append({"model": model, "parameters": params})
    return entries, spans, slice_globals


def _model_params(
    raw: Any, method: MergeMethod, where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-model parameters given for a model, a source or a slice, parsed as settings, and the
    method's top-level parameters given there (``lambda``, ``normalize``, ...), parsed, for
    :func:`_shared_given_per_model` to check. (A slice's own top-level parameters are read by
    :func:`_entries_from_slices` before its per-model defaults come here.)
    """
    raw = _mapping(raw, where)
    shared = [k for k in raw if k in method.global_params and k not in method.model_params]
    bad = [k for k in raw if k not in method.model_params and k not in shared]
    if bad:
        raise ConfigError(
            f"{where}: {', '.join(map(str, bad))} not accepted by {method.name} per model "
            f"(accepted: {', '.join(method.model_params) or 'none'}; global parameters go in "
            "the top-level parameters)"
        )
    params = {k: _setting(v, f"{where}.{k}") for k, v in raw.items() if k not in shared}
    _check_ranges(params, where)
    return params, {k: _global(k, raw[k], f"{where}.{k}") for k in shared}


def _shared_given_per_model(
    given: list[tuple[str, dict[str, Any]]],
    needed: list[str],
    top: Mapping[str, Any],
    top_where: str,
    method: MergeMethod,
) -> dict[str, Any]:
    """The top-level parameters (``lambda``, ``normalize``, ...) that models give in their own
    ``parameters``: ``given`` holds each entry's (``where``, parsed values), ``needed`` the
    entries that are merged (the base of a task-vector method may give none). mergekit reads
    these from the top level (and the slices) only and ignores them per model, silently; meldkit
    takes one when every merged model gives the same value (as ``top_where``'s, with a warning),
    and refuses it otherwise (ConfigError naming the models), or when ``top`` (the top-level
    values) gives another."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for _, g in given for k in g):
        havers = [(w, g[key]) for w, g in given if key in g]
        first_where, value = havers[0]
        lacking = [w for w in needed if w not in {hw for hw, _ in havers}]
        other = next(((w, v) for w, v in havers if v != value), None)
        ignored = (
            f"{key} is a top-level parameter of {method.name} (mergekit ignores it in a "
            f"model's parameters, and merges with the top-level {key} or its default)"
        )
        if not any(w in needed for w, _ in havers):
            # Only an entry that is not merged (the base of a task-vector method) gives it:
            # ignored, as mergekit ignores it.
            warnings.warn(
                f"{first_where}.{key}: {ignored}; only entries that are not merged give it, so "
                f"it is ignored, as mergekit ignores it",
                stacklevel=2,
            )
            continue
        if lacking or other is not None:
            why = (
                f"{lacking[0]} gives none"
                if lacking
                else f"{other[0]} gives {other[1]!r}, {first_where} {value!r}"
            )
            raise ConfigError(
                f"{first_where}.{key}: {ignored}; meldkit takes it from the models only when "
                f"every model gives the same value, but {why}: give it once, in "
                f"{top_where}.{key}"
            )
        if key in top and top[key] != value:
            raise ConfigError(
                f"{first_where}.{key}: {value!r}, but {top_where}.{key} is {top[key]!r}: "
                f"{ignored}; give it once, in {top_where}.{key}"
            )
        out[key] = value
        warnings.warn(
            f"{key}: {value!r} given by every model ({', '.join(w for w, _ in havers)}), taken "
            f"as {top_where}.{key}. Note: mergekit ignores a per-model {key} (it would merge "
            f"with {'the top-level value' if key in top else 'its default'}); give it in "
            f"{top_where} to be read the same way by both",
            UserWarning,
            stacklevel=4,
        )
    return out


def _tokenizer_source(
    raw: Mapping[str, Any], base: Path | None, listed: list[Any], resolve
) -> Path | None:
    """The folder named by ``tokenizer_source`` or ``tokenizer: {source: ...}`` (None if neither):
    ``base`` or one of the merged models (``listed``: the config's model entries as written, the
    base included when it is listed there), by its path or ID, or with older mergekit's
    ``model:`` prefix (``model:path/to/finetune``)."""
    if "tokenizer_source" in raw and "tokenizer" in raw:
        raise ConfigError("give tokenizer_source or tokenizer, not both")
    if "tokenizer" in raw:
        spec = raw["tokenizer"]
        if not isinstance(spec, Mapping):
            raise ConfigError(f"tokenizer: expected a mapping {{source: ...}}, got {spec!r}")
        extra = [k for k in spec if k != "source"]
        if extra:
            raise ConfigError(
                f"tokenizer: keys not supported: {', '.join(map(str, extra))} (per-token "
                "overrides rebuild embeddings, which meldkit does not do; only source is read)"
            )
        if "source" not in spec:
            return None
        where, source = "tokenizer.source", spec["source"]
    elif "tokenizer_source" in raw:
        where, source = "tokenizer_source", raw["tokenizer_source"]
    else:
        return None
    if source is None:
        return None
    if source == "base":
        if base is None:
            raise ConfigError(f"{where}: base needs base_model")
        return base
    if source == "union":
        raise ConfigError(
            f"{where}: union is not supported (a merged vocabulary needs the embeddings rebuilt "
            "over it); use base or the path of one of the merged models"
        )
    if isinstance(source, str) and source.startswith("model:"):
        source = source.removeprefix("model:")
    path = resolve(source, where)
    candidates = ([base] if base is not None else []) + [resolve(p, where) for p in listed]
    if not any(path.resolve() == c.resolve() for c in candidates):
        raise ConfigError(
            f"{where}: {source} is not a model of this merge; meldkit takes the tokenizer only "
            "from the base or a merged model (another vocabulary needs embedding surgery)"
        )
    return path
