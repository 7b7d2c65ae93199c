"""The streaming merge engine behind ``meldkit merge`` and :func:`merge`.

Everything is checked before any tensor is merged (the config, every model folder, every tensor's
presence, shape and dtype), so a bad merge fails in the first second. Then tensors are loaded one
at a time, merged by :func:`meldkit.ops.merge_tensors` on the chosen device, and written into
safetensors shards in a temporary folder that becomes ``out_dir`` only when complete. Inputs are
memory-mapped; each tensor is merged into one of two reused output buffers, which a writer thread
writes to its place in the shard while the next tensor merges. Peak memory stays near (N + 3) ×
the largest tensor; no shard is held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import operator
import os
import re
import shutil
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from meldkit.merging import chat_templates
from meldkit.merging.checkpoint import (
    AUX_FILES,
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointError,
    ReadAhead,
    ShardedWriter,
    aux_folder,
    parse_size,
)
from meldkit.merging.config import MODEL_DEFAULTS, ConfigError, MergeConfig, parse_config

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class MergeError(ValueError):
    """Models that cannot be merged as configured (missing tensors, shape mismatches, ...)."""


def tensor_key(name: str) -> int:
    """The ``tensor_index`` of a named tensor: CRC-32 of its name."""
    return zlib.crc32(name.encode())


# Tensors with one row per token (input embeddings, output heads, BERT's output bias, T5's
# shared embeddings): a fine-tune that added tokens has more rows there, which a merge on a base
# trims to the base's (see _validate).
_VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_out|lm_head|wte|word_embeddings|tok_embeddings)\."
    r"|^shared\.weight$|(^|\.)predictions\.(bias$|decoder\.)"
)
# Output heads that a model whose config.json sets tie_word_embeddings does not store, and the
# input embeddings it computes them with instead (the same matrix): as mergekit's architecture
# definitions give lm_head.weight the tied name model.embed_tokens.weight. (T5's tied head also
# scales its input, so its shared.weight is not an untied lm_head: not listed.)
_TIED_HEADS = {
    "lm_head.weight": (
        "model.embed_tokens.weight",
        "model.language_model.embed_tokens.weight",
        "transformer.wte.weight",
    ),
    # Multimodal models (Llava, Gemma-3) as transformers saves them: the text model under
    # language_model.
    "language_model.lm_head.weight": ("language_model.model.embed_tokens.weight",),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    # BERT's decoder bias is its prediction head's bias (the same parameter when tied).
    "cls.predictions.decoder.bias": ("cls.predictions.bias",),
}


# Buffers that transformers rebuilds when it loads a model, which older versions saved with the
# weights: Llama's rotary ``inv_freq`` (before 4.31), BERT's ``position_ids``, GPT-2's causal
# mask ``attn.bias`` and ``attn.masked_bias``. A fine-tune saved by one version may have them
# where a base saved by another has not (or the reverse): no weights, so not a mismatch.
_REBUILT_BUFFER = re.compile(
    r"(^|\.)rotary_emb\.inv_freq$|(^|\.)position_ids$|\.attn\.(bias|masked_bias)$"
)


def _is_buffer(name: str, dtype: torch.dtype) -> bool:
    """Whether tensor ``name`` (of ``dtype``) is a buffer rather than a weight to merge: one
    that transformers rebuilds at load time (``_REBUILT_BUFFER``), or any non-floating tensor
    (masks, position ids, counters: never merged)."""
    return dtype not in FLOAT_DTYPES or _REBUILT_BUFFER.search(name) is not None


def is_vocab_tensor(name: str) -> bool:
    """Whether tensor ``name`` has one row per token of the vocabulary (embeddings, heads)."""
    return _VOCAB_TENSOR.search(name) is not None


def _model_config(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's config.json (None where it has none, or none that reads as an object)."""
    try:
        config = json.loads((checkpoint.aux_folder() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


# Model types whose transformers config class defaults ``tie_word_embeddings`` to False (their
# config.json may leave the key out and still be untied), for when transformers is not
# installed: the common decoder families of transformers 4.44-5.x.
_UNTIED_BY_DEFAULT = frozenset(
    (
        "llama llama4 llama4_text mistral mixtral ministral qwen2 qwen2_moe qwen3 qwen3_moe "
        "qwen3_next phi phi3 phimoe gpt_neox gptj codegen olmo olmo2 olmo3 olmoe deepseek_v2 "
        "deepseek_v3 granite granitemoe granitemoeshared stablelm persimmon nemotron internlm3 "
        "exaone exaone4 glm glm4 glm4_moe dbrx jamba bamba helium seed_oss gpt_oss minimax "
        "llava llava_next qwen2_vl qwen2_5_vl idefics2 idefics3"
    ).split()
)


@functools.cache
def _default_tie(model_type: str | None, text_type: str | None = None) -> bool:
    """What transformers takes for ``tie_word_embeddings`` when a config.json of
    ``model_type`` (with a ``text_config`` of ``text_type``, for a multimodal model) leaves it
    out: its config class's default for the text model (transformers ties by the text
    config's value; False for Llama, Mistral, Qwen2, ...; True for GPT-2, Gemma, BERT and
    ``PretrainedConfig``). From the installed transformers where it knows the types, else
    from ``_UNTIED_BY_DEFAULT``."""
    if isinstance(model_type, str):
        try:
            with warnings.catch_warnings(), _quiet_transformers():
                warnings.simplefilter("ignore")
                from transformers import AutoConfig

                kwargs = {"text_config": {"model_type": text_type}} if text_type else {}
                config = AutoConfig.for_model(model_type, **kwargs)
                text = (
                    config.get_text_config(decoder=True)
                    if hasattr(config, "get_text_config")
                    else config
                )
                value = getattr(text, "tie_word_embeddings", None)
                if not isinstance(value, bool):
                    value = getattr(config, "tie_word_embeddings", None)
            if isinstance(value, bool):
                return value
        except Exception:  # no transformers, an unknown type, a config that needs arguments
            pass
    return (text_type or model_type) not in _UNTIED_BY_DEFAULT


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own log lines (a default config's remarks) silenced for the block."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _tie_word_embeddings(config: Mapping[str, Any] | None) -> bool | None:
    """config.json's ``tie_word_embeddings`` (a multimodal model's in its ``text_config``);
    where the config gives none, the default of its model type's config class (its text
    model's), as transformers loads it (:func:`_default_tie`: ``save_pretrained`` leaves the
    key out where it equals both defaults, as GPT-2's config.json does; a Llama config.json
    written by hand without it is untied); None without a config.json."""
    if config is None:
        return None
    for c in (config, config.get("text_config")):
        if isinstance(c, Mapping) and isinstance(c.get("tie_word_embeddings"), bool):
            return c["tie_word_embeddings"]
    text = config.get("text_config")
    text_type = text.get("model_type") if isinstance(text, Mapping) else None
    return _default_tie(config.get("model_type"), text_type if isinstance(text_type, str) else None)


def _tie_heads(checkpoints: list[Checkpoint]) -> list[str]:
    """Where some models store an output head (``_TIED_HEADS``) and others tie it to their input
    embeddings (no head tensor, the embeddings under a name ``_TIED_HEADS`` gives, and a
    config.json whose ``tie_word_embeddings`` is true, or absent where its model type's
    default is true: :func:`_tie_word_embeddings`), read each
    tied model's embeddings as its head (:meth:`Checkpoint.tie`), as mergekit reads a weight's
    tied name: the output then has the merged head, none being dropped. Returns a line per tied
    model, for the warning."""
    notes = []
    for head, embeddings in _TIED_HEADS.items():
        if not any(head in c for c in checkpoints):
            continue
        for c in checkpoints:
            source = next((e for e in embeddings if e in c), None)
            if head in c or source is None:
                continue
            if not _tie_word_embeddings(_model_config(c)):
                continue  # not tied (or no config.json), no head: the missing tensor is reported
            c.tie(head, source)
            notes.append(f"{c.path} (its {source} read as its {head})")
    return notes


def _check_scaled_heads(inputs: list[Checkpoint]) -> None:
    """Refuse T5-style models (``shared.weight``) whose configs tie the head and others whose
    configs do not, whether or not the tied ones store ``lm_head.weight``: a tied T5 head is
    the shared embeddings scaled by d_model^-0.5 (its stored copy unscaled), an untied one is
    used as it is, so the two heads are not the same quantity."""
    t5 = [c for c in inputs if "shared.weight" in c]
    if len(t5) < 2:
        return
    ties = {c.path: _tie_word_embeddings(_model_config(c)) for c in t5}
    if True in ties.values() and False in ties.values():
        tied = next(p for p, t in ties.items() if t)
        untied = next(p for p, t in ties.items() if t is False)
        raise MergeError(
            f"{tied} ties its output head to its shared embeddings (T5-style: the head is "
            f"shared.weight scaled by d_model^-0.5) and {untied} does not: the two heads are "
            "not the same quantity; merge models whose configs tie the head alike"
        )


def _untie_output(reference: Checkpoint, inputs: list[Checkpoint], names: list[str]) -> bool:
    """Whether the output's config.json must say ``tie_word_embeddings: false``: it stores a
    head (``_TIED_HEADS``) that its config, the reference's, ties, and that head is not its
    embeddings: the reference's head was read from its embeddings because other models store
    their own (:func:`_tie_heads`), or the reference stores one but some input's config is
    untied (its head, merged in, differs from the merged embeddings)."""
    if reference.tied:
        return True
    if not any(head in names for head in _TIED_HEADS):
        return False
    if not _tie_word_embeddings(_model_config(reference)):
        return False
    return any(_tie_word_embeddings(_model_config(c)) is False for c in inputs)


def _validate(
    base: Checkpoint | None, models: list[Checkpoint], tokenizer_source: Path | None = None
) -> tuple[list[str], dict[tuple[int, str], int], set[str]]:
    """Names to write, in the reference model's order, the rows to keep of the vocabulary
    tensors that must be trimmed (``{(model index, name): rows}``), and the names copied from
    the reference rather than merged; raises MergeError listing the problems.

    Every model must have the reference's tensors (the base's, or the first model's without
    one) and no others, except:

    - an output head that some models tie to their input embeddings (``tie_word_embeddings``,
      where config.json leaves it out its model type's default) and others store: the tied
      models' embeddings are read as their head (:func:`_tie_heads`), with a warning, and
      the output has an untied head;
    - buffers (:func:`_is_buffer`: those transformers rebuilds at load time, which older
      versions saved, and non-floating tensors), with a warning naming them: a model's buffer
      that the reference lacks is skipped (the output has the reference's tensors, as mergekit
      merges only its architecture's), and a reference's buffer that a model lacks is copied
      from the reference (converted to the output dtype, as merged tensors are), not merged.

    As mergekit truncated embeddings to the base's shape with a warning (mergekit
    0.1.5 does it with ``--unsafe-truncate-embeddings``), a fine-tune whose embeddings or head
    have more rows than the base's (tokens added, or rows padded) merges its first rows, the
    base's count (with a warning, once, naming the tensors and models): the output keeps the
    base's vocabulary. So the tokenizer cannot come from such a model: a ``tokenizer_source``
    whose folder is a trimmed model's (and not the base's) is a ConfigError naming the model,
    the tensor and both row counts. Without a base (linear), no model's vocabulary is the
    output's by right (the first model's would be, by the order of the list): vocabulary sizes
    must then match, and a mismatch is refused whichever model is larger. Any other shape
    mismatch, fewer rows than the base's included, is refused.
    """
    reference = base if base is not None else models[0]
    tied = _tie_heads(([base] if base is not None else []) + models)
    names = reference.names
    problems = []
    trims: dict[tuple[int, str], int] = {}
    skipped: list[str] = []  # per model: its buffers the reference lacks, for the warning
    copied: dict[str, list[Path]] = {}  # a reference's buffer: the models that lack it
    complete = []  # the models whose tensors are the reference's, buffers aside
    for i, m in enumerate(models):
        if m is reference:
            continue
        missing = [n for n in names if n not in m]
        extra = [n for n in m.names if n not in reference]
        for n in missing:
            if _is_buffer(n, reference.dtype(n)):
                copied.setdefault(n, []).append(m.path)
        extra_buffers = [n for n in extra if _is_buffer(n, m.dtype(n))]
        if extra_buffers:
            skipped.append(f"{m.path}: {_listed(extra_buffers)}, which {reference.path} lacks")
        missing = [n for n in missing if n not in copied]
        extra = [n for n in extra if n not in extra_buffers]
        for c, lacking, other in ((m, missing, reference), (reference, extra, m)):
            if lacking:
                problems.append(
                    f"{c.path}: missing {len(lacking)} tensors of {other.path} "
                    f"(first: {', '.join(lacking[:3])}){_missing_hint(c, lacking)}"
                )
        if not missing and not extra:
            complete.append(i)
    for i in complete:
        m = models[i]
        for n in names:
            if n in copied:
                continue
            shape, ref_shape = m.shape(n), reference.shape(n)
            if (
                shape != ref_shape
                and base is not None
                and is_vocab_tensor(n)
                and len(shape) == len(ref_shape) >= 1
                and shape[1:] == ref_shape[1:]
                and shape[0] > ref_shape[0]
            ):
                trims[(i, n)] = ref_shape[0]
            elif shape != ref_shape:
                hint = ""
                if is_vocab_tensor(n) and len(shape) == len(ref_shape) >= 1:
                    if shape[1:] == ref_shape[1:] and base is None:
                        hint = (
                            f" (vocabulary sizes differ: {shape[0]} rows, {reference.path} has "
                            f"{ref_shape[0]}; without base_model no model's vocabulary is the "
                            "output's, so the sizes must match: name as base_model the model "
                            "whose vocabulary the output keeps, listed among the models with its "
                            "weight, and the larger vocabularies are trimmed to it)"
                        )
                    elif shape[1:] == ref_shape[1:]:
                        hint = (
                            f" (fewer vocabulary rows than {reference.path}: only a model with "
                            "more rows than the base is trimmed to the base's, as mergekit "
                            "truncates embeddings)"
                        )
                problems.append(
                    f"{m.path}: {n} has shape {list(shape)}, "
                    f"{reference.path} has {list(ref_shape)}{hint}"
                )
                break
            # Float dtypes may differ (every input is converted to the compute dtype); a float
            # tensor against an integer one cannot be merged.
            if (m.dtype(n) in FLOAT_DTYPES) != (reference.dtype(n) in FLOAT_DTYPES):
                problems.append(
                    f"{m.path}: {n} has dtype {_dtype_name(m.dtype(n))}, "
                    f"{reference.path} has {_dtype_name(reference.dtype(n))}"
                )
                break
    if problems:
        raise MergeError("models do not match:\n  " + "\n  ".join(problems))
    if skipped or copied:
        said = [
            f"{entry}: skipped, the output has {reference.path}'s tensors (as mergekit merges "
            "only its architecture's)"
            for entry in skipped
        ]
        if copied:
            lacking = sorted({str(p) for paths in copied.values() for p in paths})
            said.append(
                f"{reference.path}: {_listed(list(copied))}, which {', '.join(lacking)} "
                "lack: copied from it, not merged"
            )
        warnings.warn(
            "buffers that transformers rebuilds when it loads a model (older versions saved "
            "them: rotary_emb.inv_freq, position_ids, attn.bias, attn.masked_bias) or that are "
            f"not floating point, in some models only. {'; '.join(said)}",
            UserWarning,
            stacklevel=3,
        )
    if tied:
        untie = (
            "; the output's config.json gets tie_word_embeddings false" if reference.tied else ""
        )
        warnings.warn(
            "output heads tied to the input embeddings (tie_word_embeddings) in "
            f"{'; '.join(tied)}, stored apart by the other models: merged as the tied models' "
            f"heads, as mergekit does; the output has its own head{untie}",
            UserWarning,
            stacklevel=3,
        )
    by_model: dict[int, list[str]] = {}
    for (i, n), rows in trims.items():
        by_model.setdefault(i, []).append(f"{n} ({models[i].shape(n)[0]} rows, not {rows})")
    if tokenizer_source is not None and by_model:
        # The tokenizer files come from the source's folder (aux_folder): refused when that is
        # the folder of a trimmed model, unless it is the base's too (then it is the base's).
        folder = aux_folder(tokenizer_source).resolve()
        if folder != reference.aux_folder().resolve():
            for i, trimmed in by_model.items():
                if models[i].aux_folder().resolve() == folder:
                    raise ConfigError(
                        f"tokenizer source {tokenizer_source}: {models[i].path} has more "
                        f"vocabulary rows than the base {reference.path} ({', '.join(trimmed)}), "
                        "which the merge trims to the base's: the output has the base's "
                        "vocabulary, and that model's tokenizer would not match its embeddings. "
                        "Take the tokenizer from the base (tokenizer_source: base, or leave it out)"
                    )
    if by_model:
        listed = "; ".join(f"{models[i].path}: {', '.join(t)}" for i, t in by_model.items())
        warnings.warn(
            f"vocabulary sizes differ from {reference.path}'s: {listed}. Merged over its rows, "
            "as mergekit truncates embeddings: the rows past its vocabulary are dropped, and the "
            "output has its vocabulary (take the tokenizer from it)",
            UserWarning,
            stacklevel=3,
        )
    return names, trims, set(copied)


def _listed(names: list[str]) -> str:
    """``names`` for a message: their count and the first three."""
    more = ", ..." if len(names) > 3 else ""
    return f"{len(names)} ({', '.join(names[:3])}{more})"


def _missing_hint(c: Checkpoint, lacking: list[str]) -> str:
    """Why checkpoint ``c`` may lack tensors ``lacking`` of another model, for the error."""
    heads = [n for n in lacking if n in _TIED_HEADS]
    if not heads:
        return (
            " (models of one architecture have the same tensors: a different model, or an "
            "incomplete checkpoint)"
        )
    config = _model_config(c)
    tie = _tie_word_embeddings(config)
    if tie and "shared.weight" in c:
        return (
            f" (a tied T5-style model stores no {heads[0]}: its head is its shared.weight "
            "scaled by d_model^-0.5, not the embeddings as they are, so meldkit cannot read one "
            "as the other; merge models whose configs tie the head alike)"
        )
    if tie:
        return (
            " (its config.json ties the head to the input embeddings: tie_word_embeddings is "
            "true, or left out, which is its model type's default; but meldkit reads the input "
            f"embeddings as {heads[0]} only where they are named "
            f"{' or '.join(_TIED_HEADS[heads[0]])})"
        )
    if tie is None:
        return (
            f" (a model that ties {heads[0]} to its input embeddings stores no head, but "
            f"{c.path} has no config.json to say so, tie_word_embeddings: the checkpoint is "
            "incomplete)"
        )
    if not any(
        isinstance(x, Mapping) and "tie_word_embeddings" in x
        for x in (config, config.get("text_config"))
    ):
        text = config.get("text_config")
        kind = (text.get("model_type") if isinstance(text, Mapping) else None) or config.get(
            "model_type"
        )
        return (
            f" (its config.json leaves tie_word_embeddings out, which for model_type "
            f"{kind!r} means false, as transformers loads it: the model "
            f"stores {heads[0]} apart from its input embeddings, and the checkpoint is "
            "incomplete; set tie_word_embeddings: true in its config.json if the head is tied)"
        )
    return (
        f" (its config.json sets tie_word_embeddings: false, so it stores {heads[0]} apart from "
        "its input embeddings: the checkpoint is incomplete)"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# A numbered layer: the list's name (Llama's ``layers``, GPT-2's ``h``, RWKV's and vision towers'
# ``blocks``, T5's ``block``, BERT's ``layer``) and the index, at the start of the name or after
# a dot. The leftmost match is the layer (T5's ``encoder.block.3.layer.1.`` is block 3).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
# config.json's count of the main stack's layers, by the names models give it (first found).
_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """The numbered layers of a model, one stack per prefix (the part of the name before the
    index: ``model.layers``, ``visual.blocks``, ``encoder.block``), as mergekit plans each module
    of a model apart.

    Attributes
    ----------
    index : dict
        Each tensor's layer index in its stack (None outside the layers).
    stack : dict
        Each tensor's stack prefix (None outside the layers).
    counts : dict
        Layers of each stack: its largest index + 1.
    problems : list of str
        Why the positions are not certain (a stack with missing layers, a count that config.json
        contradicts); gradients and slices are refused then.
    """

    index: dict[str, int | None]
    stack: dict[str, str | None]
    counts: dict[str, int]
    problems: list[str]

    def positions(self) -> dict[str, float]:
        """``t`` of every tensor for gradient parameters: ``i / (L − 1)`` for layer i of the L
        layers of its stack (1 when L = 1), 0 outside the layers, as mergekit positions them."""
        out = {}
        for n, i in self.index.items():
            count = self.counts[self.stack[n]] if i is not None else 0
            out[n] = 0.0 if i is None else (i / (count - 1) if count > 1 else 1.0)
        return out


def _config_count(config: Mapping[str, Any] | None) -> tuple[str, int] | None:
    """config.json's layer count of the model's main stack (key, value), None if it gives none."""
    if not isinstance(config, Mapping):
        return None
    for k in _COUNT_KEYS:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return k, v
    return None


def layer_layout(names: list[str], config: Mapping[str, Any] | None = None) -> LayerLayout:
    """The layer stacks of tensors ``names`` (see :class:`LayerLayout`), checked against the
    model's ``config`` (its config.json) where it gives a layer count: a model with one stack
    whose count differs from ``num_hidden_layers`` (or ``n_layer``, ``num_layers``,
    ``n_layers``), or with several stacks none of which has that count, has a problem, as has a
    stack with indices missing below its largest. Each stack is counted on its own: a
    multimodal model's vision blocks do not shift its language layers' positions."""
    index: dict[str, int | None] = {}
    stack: dict[str, str | None] = {}
    seen: dict[str, set[int]] = {}
    for n in names:
        m = _LAYER.search(n)
        if m is None:
            index[n] = stack[n] = None
            continue
        prefix = n[: m.start(1) - 1]  # the name up to the list, "model.layers"
        index[n], stack[n] = int(m.group(1)), prefix
        seen.setdefault(prefix, set()).add(int(m.group(1)))
    counts = {p: max(ix) + 1 for p, ix in seen.items()}
    problems = []
    for p, ix in seen.items():
        missing = sorted(set(range(counts[p])) - ix)
        if missing:
            problems.append(
                f"{p}: layers {', '.join(map(str, missing[:5]))} missing (indices run to "
                f"{counts[p] - 1})"
            )
    main = _config_count(config)
    if main is not None:
        key, value = main
        if not counts:
            problems.append(
                f"config.json gives {key} = {value}, but no tensor name has a layer index "
                "meldkit recognises (NAME.N. after a list named layers, h, blocks, block or layer)"
            )
        elif len(counts) == 1:
            ((p, c),) = counts.items()
            if c != value:
                problems.append(f"config.json gives {key} = {value}, but {p} has {c} layers")
        elif value not in counts.values():
            listed = ", ".join(f"{p} ({c})" for p, c in counts.items())
            problems.append(
                f"config.json gives {key} = {value}, but no stack has that many: {listed}"
            )
    return LayerLayout(index, stack, counts, problems)


def layer_positions(names: list[str], config: Mapping[str, Any] | None = None) -> dict[str, float]:
    """``t`` of every tensor for gradient parameters (:meth:`LayerLayout.positions`)."""
    return layer_layout(names, config).positions()


def _uses_layers(cfg: MergeConfig) -> bool:
    """Whether a parameter of ``cfg`` varies over the layers: a gradient (a list of numbers)
    anywhere in a per-model or top-level setting, or a slices-form config."""

    def varies(setting: Any) -> bool:
        if isinstance(setting, list):
            return True
        if isinstance(setting, dict) and "slices" in setting:
            return True
        if isinstance(setting, dict):
            return any(varies(v) for _, v in setting["filters"])
        return False

    return cfg.slice_layers is not None or any(
        varies(v) for s in (cfg.params, *(m.params for m in cfg.models)) for v in s.values()
    )


def _tensor_params(
    cfg: MergeConfig, tensor_name: str = "", t: float = 0.0, layer: int | None = None
) -> dict[str, Any]:
    """:func:`meldkit.ops.merge_tensors`' keyword arguments for one tensor: the parameters the
    method reads (none of its inert ones), gradients and filters resolved."""
    method = cfg.method

    def per_model(name: str) -> list[float]:
        return cfg.model_param(name, MODEL_DEFAULTS[name], tensor_name, t, layer)

    def shared(name: str) -> Any:
        return cfg.global_param(name, tensor_name, t, layer) if method.reads(name) else None

    kw: dict[str, Any] = {"weights": per_model("weight")}
    for name, arg in (("density", "densities"), ("gamma", "gammas"), ("epsilon", "epsilons")):
        if method.reads(name):
            kw[arg] = per_model(name)
    for name, arg, kind in (
        ("lambda", "lam", float),
        ("normalize", "normalize", bool),
        ("t", "t", float),
        ("filter_wise", "filter_wise", bool),
    ):
        value = shared(name)
        if value is not None:
            kw[arg] = kind(value)
    consensus = shared("consensus")
    if consensus is not None:
        kw["consensus"] = consensus
    rescale = shared("rescale")
    if rescale is not None:  # a bool (mergekit's) or a named rescaling
        kw["rescale"] = rescale if isinstance(rescale, str) else bool(rescale)
    return kw


def _set_config_dtype(out_dir: Path, dtype: torch.dtype) -> None:
    """Record the merged weights' dtype in ``out_dir/config.json`` (as mergekit does): the
    ``torch_dtype`` and ``dtype`` keys the base's config has (``torch_dtype`` if neither)."""

    def edit(config: dict[str, Any]) -> None:
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = _dtype_name(dtype)

    _edit_config(out_dir, edit)


def _untie_config(out_dir: Path) -> None:
    """Set ``tie_word_embeddings`` false in ``out_dir/config.json`` (and in its ``text_config``
    where that has the key): the output stores its own head, which a tied config would have
    transformers replace with the input embeddings."""

    def edit(config: dict[str, Any]) -> None:
        config["tie_word_embeddings"] = False
        text = config.get("text_config")
        if isinstance(text, dict) and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = False

    _edit_config(out_dir, edit)


def _edit_config(out_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` (a function that changes a dict in place) to ``out_dir/config.json``,
    rewritten atomically; a missing or unreadable config is left as it is."""
    path = out_dir / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except ValueError:
        return  # not meldkit's to repair: copied as the base has it
    if not isinstance(config, dict):
        return
    edit(config)
    tmp = path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class _OutputBuffers:
    """Two host buffers of the largest output, used in turn: a merge fills one while the writer
    thread drains the other, so no output is allocated per tensor (page faults and zeroing of
    fresh memory cost about as much as a merge pass)."""

    def __init__(self, nbytes: int, *, pin: bool) -> None:
        self._nbytes, self._pin = nbytes, pin
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._busy: list[Future | None] = [None, None]
        self._next = 0

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """A buffer viewed as ``dtype`` and ``shape``, once its last write is done."""
        slot, self._next = self._next, self._next ^ 1
        if self._busy[slot] is not None:
            self._busy[slot].result()
            self._busy[slot] = None
        if self._bufs[slot] is None:
            self._bufs[slot] = torch.empty(self._nbytes, dtype=torch.uint8, pin_memory=self._pin)
        numel = math.prod(shape)
        view = self._bufs[slot][: numel * dtype.itemsize].view(dtype).view(shape)
        return view, slot

    def hold(self, slot: int, future: Future) -> None:
        """Keep ``slot`` until ``future`` (its write) is done."""
        self._busy[slot] = future


_HUB_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


def _model_name(path: Path, given: Mapping[Path, str] | None = None) -> tuple[str, bool]:
    """How the model card names a model folder: its Hugging Face id when the folder is a hub
    cache snapshot (``.../models--ORG--NAME/snapshots/REV``), else the path the config gave
    (``given``: a relative path stays relative, so the card does not publish this machine's
    folders), else the folder's path. The flag says whether it is a hub id (only those go
    into the card's ``base_model`` metadata)."""
    m = _HUB_SNAPSHOT.search(path.as_posix())
    if m:
        return f"{m.group(1)}/{m.group(2)}", True
    return (given or {}).get(path, str(path)), False


def model_card(
    cfg: MergeConfig,
    config_text: str | None,
    *,
    seed: int,
    trim_scope: str,
    tie: str = "keep_ties",
    template: str | None = None,
) -> str:
    """The ``README.md`` written beside a merged model (as mergekit writes one): the method and
    its paper, the models, the settings (``template``: how the chat template was chosen), and
    the YAML that produced it (when known)."""
    from meldkit import __version__

    names = [_model_name(m.path, cfg.names) for m in cfg.models]
    base = _model_name(cfg.base, cfg.names) if cfg.base is not None else None
    hub_ids = [n for n, hub in ([base] if base else []) + names if hub]
    lines = ["---"]
    if hub_ids:
        lines += ["base_model:", *(f"- {n}" for n in hub_ids)]
    lines += ["library_name: transformers", "tags:", "- meldkit", "- merge", "---", ""]
    lines += ["# Merged model", ""]
    how = f"`{cfg.method.name}`" + (f" ({cfg.method.paper})" if cfg.method.paper else "")
    lines.append(
        f"Merged with meldkit {__version__} by {how}"
        + (f", on the base model `{base[0]}`." if base else ".")
    )
    lines += ["", "Models merged:", "", *(f"- `{n}`" for n, _ in names), ""]
    notes = [f"seed {seed} (random masks are keyed by it and by each tensor's name)"]
    if cfg.method.sparsify == "magnitude":
        rule = "exactly k kept" if tie == "exact_k" else "ties at the threshold kept"
        notes.append(
            f"magnitude trimming per {'model' if trim_scope == 'model' else 'tensor'} ({rule})"
        )
    if cfg.dtype is not None or cfg.out_dtype is not None:
        # The kernels' arithmetic is float32 whatever the storage: the config's dtype only
        # rounds the inputs (bfloat16, float16) or widens them (float32).
        out = _dtype_name(cfg.out_dtype or cfg.dtype)
        if cfg.dtype is None:
            # The merge converts every input to the inputs' widest dtype, tensor by tensor.
            notes.append(
                "inputs converted to their widest dtype of each tensor (the config sets no "
                f"dtype), merged in float32, stored in {out}"
            )
        else:
            dt = _dtype_name(cfg.dtype)
            how = "converted to" if cfg.dtype.itemsize >= 4 else "rounded to"
            notes.append(
                f"inputs {how} {dt} (the config's dtype), merged in float32, stored in {out}"
            )
    if template is not None:
        notes.append(f"chat template: {template}")
    lines += ["Settings: " + "; ".join(notes) + ".", ""]
    if config_text:
        lines += ["Configuration:", "", "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _config_text(config: Any) -> str | None:
    """The YAML a config came as (a file's text, or a mapping dumped), None for a MergeConfig."""
    if isinstance(config, MergeConfig):
        return None
    import yaml

    if isinstance(config, Mapping):
        return yaml.safe_dump(
            json.loads(json.dumps(config, default=str)), sort_keys=False, allow_unicode=True
        )
    return Path(config).read_text()


def _check_tokenizer(source: Path | None, reference: Checkpoint) -> None:
    """Refuse a ``tokenizer_source`` whose folder has no tokenizer file (``TOKENIZER_FILES``):
    the output would have none. Where the config names no source, the reference's folder gives
    the tokenizer: a warning says when it has none."""
    folder = aux_folder(source) if source is not None else reference.aux_folder()
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        return
    if source is not None:
        raise MergeError(
            f"tokenizer_source {source}: {folder} has no tokenizer files (tokenizer.json, "
            "tokenizer_config.json, tokenizer.model, vocab.json, ...): name the model folder "
            "whose tokenizer the output should have"
        )
    warnings.warn(
        f"{folder} has no tokenizer files: the merged model has no tokenizer (set "
        "tokenizer_source to the model whose tokenizer it should have)",
        UserWarning,
        stacklevel=3,
    )


def _chat_template(
    cfg: MergeConfig, inputs: list[Checkpoint], reference: Checkpoint
) -> tuple[str | None, str | None]:
    """The chat template the output's tokenizer gets (None: its own) and how it was chosen,
    for the model card. Refuses a ``chat_template`` where the output has no tokenizer to carry
    it (before any tensor is merged); warns when ``auto`` finds no template in the inputs."""
    if cfg.chat_template is None:
        return None, None
    folder = aux_folder(cfg.tokenizer_source) if cfg.tokenizer_source else reference.aux_folder()
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise MergeError(
            f"chat_template: the output has no tokenizer to carry it ({folder} has no tokenizer "
            "files): set tokenizer_source to a model with a tokenizer, or leave chat_template out"
        )
    folders = list(dict.fromkeys(c.aux_folder() for c in inputs))
    template, how = chat_templates.resolve(cfg.chat_template, folders)
    if template is None:
        warnings.warn(
            f"chat_template auto: {how}, so the output's tokenizer keeps its own (from {folder})",
            UserWarning,
            stacklevel=3,
        )
        return None, None
    return template, how


def _promoted_dtype(inputs: list[Checkpoint], name: str) -> torch.dtype:
    """The dtype tensor ``name`` is merged from and stored in when the config sets no
    ``dtype``: the widest of the inputs' (``torch.promote_types``; bfloat16 with float16 gives
    float32), as mergekit (0.1.5) aligns each tensor group."""
    dtype = inputs[0].dtype(name)
    for c in inputs[1:]:
        dtype = torch.promote_types(dtype, c.dtype(name))
    return dtype


def _warn_wider_inputs(
    reference: Checkpoint, inputs: list[Checkpoint], names: list[str], stored: bool
) -> None:
    """Warn when a model stores floating tensors wider than the reference's (float32 fine-tunes
    of a bfloat16 base) and the config sets no ``dtype``: those tensors are merged from the
    widest dtype (as mergekit does) and, unless ``out_dtype`` is set (``stored`` False), stored
    in it, so the output is larger than the reference and its config.json's dtype (the
    reference's) is not the tensors'."""
    wider = []
    for m in inputs:
        if m is reference:
            continue
        found = [
            n
            for n in names
            if reference.dtype(n) in FLOAT_DTYPES
            and m.dtype(n) in FLOAT_DTYPES
            and _promoted_dtype([reference, m], n) != reference.dtype(n)
        ]
        if found:
            n = found[0]
            wider.append(
                f"{m.path} ({len(found)} tensors, e.g. {n} in {_dtype_name(m.dtype(n))}, "
                f"{_dtype_name(reference.dtype(n))} in {reference.path})"
            )
    if wider:
        store = (
            "and stored in it (set out_dtype to store the reference's dtype)"
            if stored
            else "and stored in out_dtype"
        )
        warnings.warn(
            f"models store tensors in a wider dtype than {reference.path}: {'; '.join(wider)}. "
            f"Without a dtype in the config those tensors are merged from the widest dtype, "
            f"as mergekit does, {store}",
            UserWarning,
            stacklevel=3,
        )


def _check_free_space(out_dir: Path, needed: int) -> None:
    """A MergeError, before any tensor is merged, when the file system that will hold the
    output (its temporary folder, beside ``out_dir``) has less free space than ``needed``
    bytes (a full disk would otherwise stop the merge at the tensor that does not fit)."""
    folder = next((f for f in out_dir.parents if f.exists()), Path.cwd())
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # no answer from the file system: the writes report a full disk
        return
    if free < needed:
        raise MergeError(
            f"out_dir {out_dir}: the merged model needs {_size(needed)}, but {folder} has "
            f"{_size(free)} free: free some space or write the output elsewhere"
        )


def _size(nbytes: int) -> str:
    """A byte count for people: ``512 B``, ``3.4 MB``, ``14.5 GB`` (powers of 1000)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _merge_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device where a merge can run (``cpu``, ``cuda``, ``cuda:N``); a
    MergeError naming the option otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise MergeError(f"device must be cpu, cuda or cuda:N, got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeError(f"device {dev} requested but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeError(f"device {dev}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def merge(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    out_shard_size: str | int = "5GB",
    seed: int = 0,
    allow_pickle: bool = False,
    progress: bool = True,
    trim_scope: str = "tensor",
    tie: str | None = None,
    background_write: bool | None = None,
    read_ahead: str | int | None = "32MB",
    fsync: bool = False,
) -> Path:
    """Merge the models of a mergekit-style ``config`` into ``out_dir``.

    Parameters
    ----------
    config : MergeConfig, mapping or path
        See :mod:`meldkit.merging.config`.
    out_dir : path-like
        Destination folder (must not exist, or be empty, and not be the current folder;
        symlinks and ``..`` name the folder they resolve to, up front). Written atomically: a
        temporary folder beside it is renamed into place at the end (replacing an empty
        folder: hence not the current one), and removed if the merge fails. It receives
        the safetensors shards (and their index), the base's ``config.json`` (its
        ``torch_dtype`` set to ``out_dtype`` or ``dtype`` when the config gives one, as mergekit
        does), the tokenizer files, and a ``README.md`` model card (method, models, settings,
        the YAML).
    device : str
        Where the arithmetic runs (``cpu``, ``cuda`` or ``cuda:N``); tensors stream from disk
        either way.
    out_shard_size : str or int
        Largest output shard, in bytes (``5GB``, ``500MB``, ``500M``; a bare ``B`` means
        billions, as in mergekit: ``1B`` is 10⁹ bytes). See
        :func:`~meldkit.merging.checkpoint.parse_size`.
    seed : int
        Seed of the random masks (DARE, DELLA), in [0, 2⁶³): the same seed gives the same merge
        on every device. Masks are keyed by each tensor's name (:func:`tensor_key`), so they do not
        depend on file order or sharding.
    allow_pickle : bool
        Accept pickle (``.bin``) checkpoints.
    progress : bool
        Show a progress bar (tensors and bytes) on stderr.
    trim_scope : {"tensor", "model"}
        Scope of magnitude trimming (ties, dare is unaffected): per tensor as mergekit does, or
        over the whole model as the original TIES paper does. ``"model"`` costs two extra
        streaming passes over the checkpoints (:mod:`meldkit.merging.global_trim`).
    tie : {"exact_k", "keep_ties"}, optional
        Magnitude trimming's rule for magnitudes equal to a threshold: ``"exact_k"`` keeps
        exactly the top k, equal magnitudes ranked by index (mergekit's count; the default with
        ``trim_scope="tensor"``), ``"keep_ties"`` keeps every magnitude at or above the k-th
        largest (the TIES paper's kthvalue rule; the default, and the only rule, with
        ``trim_scope="model"``). bf16 checkpoints have many equal magnitudes: at density 0.2,
        keeping the ties kept 5.7 % more entries than k on a bf16 task vector.
    background_write : bool, optional
        Write each merged tensor on a writer thread while the next one merges. Default: when
        the machine has more cores than torch's thread count, or the merge runs on CUDA. Else,
        on the CPU, the writes are queued for the merge kernels, whose next parallel pass runs
        each on one of its threads while the others merge (a writer thread would compete with
        the merge's threads for the cores).
    read_ahead : str, int or None
        How far beyond the next tensor the inputs are read into the page cache while a tensor
        merges (:class:`~meldkit.merging.checkpoint.ReadAhead`; the next tensor is always read
        ahead): ``0`` reads only the next tensor ahead, ``None`` nothing. Sizes as for
        ``out_shard_size``. Inputs not yet in the page cache then arrive from every file at once
        while the merge computes, not one page fault at a time. On the CPU the merge kernels'
        threads submit the reads, on CUDA a thread. Default 32 MB: reading further ahead made
        the tensor being merged wait behind later reads.
    fsync : bool
        Flush the output to the disk before moving it into place (and its parent folder
        after), so that a power loss or system crash after the merge returns cannot leave a
        complete-looking folder with empty shards. Off by default: the move into place already
        guards against an interrupted merge, and flushing waits for the disk to write the
        whole model (seconds per GB on a slow disk).

    Returns
    -------
    Path
        ``out_dir``, resolved: an absolute path, symlinks followed (a link to an empty folder
        is that folder).

    Raises
    ------
    ConfigError, MergeError, CheckpointError
        (all ValueErrors) Before any tensor is merged, naming the key, option, model or tensor:
        a config that cannot run, an option out of range (``seed``, ``device``, an ``out_dir``
        that is a file, a folder that is not empty or the current folder, ...), models that do
        not match, a tokenizer source whose embeddings the merge trims to the base's
        vocabulary, a model folder that does not exist (naming the folders and the Hugging Face
        cache looked in), a gradient or slices on models whose layer positions are not certain
        (:func:`layer_layout`), an ``out_dir`` on a file system with less free space than the
        merged tensors take, a model with tensors the reference lacks (other than an output head
        that tied models read from their embeddings, :func:`_tie_heads`, and buffers,
        :func:`_is_buffer`), a sharded checkpoint whose index names tensors its shards lack,
        one shard of one given as a model, a PEFT adapter given as a model, a
        ``tokenizer_source`` without tokenizer files.

    Warns when the reference's folder has no config.json or no tokenizer files, when a model
    stores tensors in a wider dtype than the reference's and the config sets no ``dtype``
    (every input is converted to the reference's dtype first), when models tie their head to
    their embeddings and others do not, and when buffers are in some models only (skipped
    where the reference lacks them, copied from it where a model does: :func:`_validate`).

    Notes
    -----
    The temporary folders that merges killed without cleaning up (SIGKILL, the OOM killer)
    left beside ``out_dir`` are removed first, with a warning naming them.
    """
    cfg = config if isinstance(config, MergeConfig) else parse_config(config)
    config_text = _config_text(config)  # for the model card, as read now
    # The options, before any file is opened (the ops would refuse them only at the first tensor).
    try:
        seed_ok = not isinstance(seed, bool) and 0 <= operator.index(seed) < 2**63
    except TypeError:  # not an integer (1.5, "1", None)
        seed_ok = False
    if not seed_ok:
        raise MergeError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    seed = operator.index(seed)
    device = _merge_device(device)
    # The folder out_dir names ('.', a symlink, a path through '..'), up front: the output
    # replaces that folder, and its temporary folder goes beside it.
    target = Path(out_dir).resolve()
    out_dir = Path(out_dir)
    for folder in (target, *target.parents):
        if folder.exists():
            if not folder.is_dir():
                raise MergeError(
                    f"out_dir {out_dir}: {folder} is a file, not a folder"
                    if folder != target
                    else f"out_dir {out_dir}: is a file, not a folder"
                )
            break
    try:
        cwd = os.getcwd()
    except OSError:  # this process's folder was removed: it cannot be out_dir
        cwd = None
    if cwd is not None and target.is_dir() and os.path.samefile(target, cwd):
        # The output replaces out_dir (the finished temporary folder is renamed into its
        # place): the folder this process, and the shell that started it, are in would be
        # removed under them, and a shell would show it empty until it cds again.
        raise MergeError(
            f"out_dir {out_dir}: is the current folder, which the output would replace (the "
            "merge writes a folder beside it and renames it into its place), leaving this "
            "process and the shell it was started from in a removed folder: name a new folder, "
            "e.g. merged"
        )
    if target.is_dir() and os.path.ismount(target):
        raise MergeError(
            f"out_dir {out_dir}: is a mount point, which the output cannot replace (the merge "
            "writes a folder beside out_dir and renames it into its place): write into a new "
            f"folder inside it, e.g. {out_dir / 'merged'}"
        )
    parent = next((f for f in target.parents if f.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(
            f"out_dir {out_dir}: its parent folder {parent} is not writable, and the merge "
            "writes a folder beside out_dir and renames it into its place (an interrupted merge "
            "leaves no half-written output): choose an out_dir in a folder you can write"
        )
    if trim_scope not in ("tensor", "model"):
        raise MergeError(f"trim_scope must be 'tensor' or 'model', got {trim_scope!r}")
    if tie is None:
        tie = "exact_k" if trim_scope == "tensor" else "keep_ties"
    if tie not in ("exact_k", "keep_ties"):
        raise MergeError(f"tie must be 'exact_k' or 'keep_ties', got {tie!r}")
    if trim_scope == "model" and tie != "keep_ties":
        raise MergeError(
            "trim_scope='model' keeps every magnitude at or above the whole-model threshold "
            "(tie='keep_ties'): exactly k over a whole model is not computed"
        )
    if trim_scope == "model" and cfg.method.sparsify != "magnitude":
        raise MergeError(
            f"trim_scope='model' applies to magnitude trimming (ties); {cfg.method.name} has none"
        )
    try:
        shard_size = parse_size(out_shard_size)
    except ValueError as exc:
        raise MergeError(f"out_shard_size: {exc}") from None
    try:
        ahead = (
            None if read_ahead is None else 0 if read_ahead in (0, "0") else parse_size(read_ahead)
        )
    except ValueError as exc:
        raise MergeError(f"read_ahead: {exc}") from None

    def open_model(path: Path) -> Checkpoint:
        if path in cfg.missing and not path.exists():  # how the config's name was looked for
            raise MergeError(cfg.missing[path])
        return Checkpoint(path, allow_pickle=allow_pickle)

    try:
        base = open_model(cfg.base) if cfg.base is not None else None
        models = [open_model(m.path) for m in cfg.models]
    except CheckpointError as exc:
        raise MergeError(str(exc)) from None
    names, trims, copied = _validate(base, models, cfg.tokenizer_source)

    def load(i: int, name: str) -> torch.Tensor:
        """Model ``i``'s tensor ``name`` (its vocabulary rows trimmed to the base's)."""
        x = models[i].get(name)
        rows = trims.get((i, name))
        return x if rows is None else x[:rows]

    reference = base if base is not None else models[0]
    model_config = _model_config(reference)
    inputs = ([base] if base is not None else []) + models  # base first
    template, template_note = _chat_template(cfg, inputs, reference)
    _check_scaled_heads(inputs)
    untie = _untie_output(reference, inputs, names)
    if untie and not reference.tied:  # (a tied reference read as a head already warned)
        warnings.warn(
            f"{reference.path}'s config.json ties its output head to its input embeddings, but "
            "some models store a head of their own: the output stores the merged head and its "
            "config.json gets tie_word_embeddings: false (tied, transformers would replace the "
            "merged head with the merged embeddings)",
            UserWarning,
            stacklevel=2,
        )
    _check_tokenizer(cfg.tokenizer_source, reference)
    if not (reference.aux_folder() / "config.json").is_file():
        warnings.warn(
            f"{reference.aux_folder()} has no config.json: the merged model will have none "
            "either (transformers cannot load it without one; copy the model's config.json "
            "into the output)",
            UserWarning,
            stacklevel=2,
        )
    if cfg.dtype is None:
        _warn_wider_inputs(
            reference, inputs, [n for n in names if n not in copied], cfg.out_dtype is None
        )

    def work_dtype(n: str) -> torch.dtype:
        """The dtype tensor ``n``'s inputs are converted to before merging."""
        return cfg.dtype or _promoted_dtype(inputs, n)

    layout = layer_layout(names, model_config)
    if _uses_layers(cfg):
        # A gradient's value depends on each tensor's place in its stack: refused where that
        # place is not certain, rather than merged with positions that may be wrong.
        what = "the slices" if cfg.slice_layers is not None else "a gradient parameter"
        if layout.problems:
            raise MergeError(
                f"{what} needs each tensor's layer position, which is not certain for "
                f"{reference.path}: " + "; ".join(layout.problems)
            )
        if cfg.slice_layers is not None and len(layout.counts) != 1:
            stacks = ", ".join(f"{p} ({c} layers)" for p, c in layout.counts.items()) or "none"
            raise MergeError(
                f"the slices number the layers of one stack, but {reference.path} has "
                f"{len(layout.counts)}: {stacks} (as mergekit, which needs its modules syntax "
                "there): use the models form"
            )
    layers = layout.index
    if cfg.slice_layers is not None:
        (count,) = layout.counts.values()
        if count != cfg.slice_layers:
            raise MergeError(
                f"the slices cover layers 0-{cfg.slice_layers - 1}, but the models have "
                f"{count} layers: meldkit merges whole models, so the slices must cover every "
                "layer"
            )
    positions = layout.positions()
    for n in names:  # every tensor's resolved parameters, before any tensor is merged
        if reference.dtype(n) in FLOAT_DTYPES and n not in copied:
            cfg.check_tensor(n, positions[n], layers[n])

    def stored_dtype(n: str) -> torch.dtype:
        """The dtype tensor ``n`` is written in: integer tensors keep the reference's."""
        if reference.dtype(n) not in FLOAT_DTYPES:
            return reference.dtype(n)
        if n in copied:
            return cfg.out_dtype or cfg.dtype or reference.dtype(n)
        return cfg.out_dtype or work_dtype(n)

    out_dtype_of = {n: stored_dtype(n) for n in names}
    plan = [(n, out_dtype_of[n], reference.shape(n)) for n in names]
    # The tensors, plus their shards' headers and the copied files (config, tokenizer, ...).
    aux = reference.aux_folder()
    extra = sum((aux / n).stat().st_size for n in AUX_FILES if (aux / n).is_file())
    tensors = sum(math.prod(shape) * dt.itemsize for _, dt, shape in plan)
    _check_free_space(target, tensors + extra + 256 * len(plan) + (1 << 20))
    if background_write is None:
        # A writer thread overlaps the writes with the merge when a core is free for it; on a
        # machine whose every core runs the merge it only slows the merge (measured on 2
        # cores): there the merge kernels run the writes on one of their own threads instead.
        background_write = device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()
    writer = ShardedWriter(
        target,
        plan,
        shard_size,
        background=bool(background_write),
        kernel_writes=device.type == "cpu",
    )
    nbytes = {n: reference.numel(n) * out_dtype_of[n].itemsize for n in names}

    from meldkit.ops import merge_tensors

    bar = None
    # The tensors merged (the others are copied from the reference).
    float_names = [n for n in names if reference.dtype(n) in FLOAT_DTYPES and n not in copied]
    buffers = _OutputBuffers(
        max((nbytes[n] for n in float_names), default=0), pin=device.type == "cuda"
    )
    float_set = set(float_names)

    def steps_of(step_names: list[str]) -> list[list[tuple[Path, int, int]]]:
        if ahead is None:
            return []
        # What the merge reads: every input's tensor where it merges, else the reference's.
        return [
            [r for c in (inputs if n in float_set else [reference]) if (r := c.byte_range(n))]
            for n in step_names
        ]

    reading: list[ReadAhead] = []
    try:
        thresholds = None
        if trim_scope == "model":
            from meldkit.merging.global_trim import global_thresholds

            if any(isinstance(m.params.get("density"), (list, dict)) for m in cfg.models):
                raise MergeError(
                    "trim_scope='model' needs one density per model, not a gradient, filter or "
                    "per-slice value"
                )
            trim_bar = None
            if progress:  # two streaming passes over every model before the first tensor merges
                from meldkit._progress import progress_bar

                trim_bar = progress_bar(
                    total=2 * len(float_names),
                    unit="tensor",
                    desc="whole-model thresholds",
                )
            # Both passes read every model in name order: one read-ahead over the two.
            reading.append(ReadAhead(steps_of(float_names) * 2, ahead or 0))
            started = iter(range(2 * len(float_names)))

            def load_base(n: str) -> torch.Tensor:  # each step of each pass loads the base first
                reading[0].at(next(started))
                return reference.get(n).to(work_dtype(n))

            try:
                thresholds = global_thresholds(
                    float_names,
                    # Converted as the merge converts them, so the magnitudes are the same.
                    load_base,
                    lambda n: [load(i, n).to(work_dtype(n)) for i in range(len(models))],
                    cfg.model_param("density", 1.0),
                    progress=trim_bar.update if trim_bar is not None else None,
                )
            finally:
                reading.pop().close()
                if trim_bar is not None:
                    trim_bar.close()
        if progress:  # created here, so its rate starts with the merge, not the trimming passes
            from meldkit._progress import progress_bar

            bar = progress_bar(total=writer.total_size, unit="B", unit_scale=True, desc="merge")
        # On the CPU the merge kernels submit the reads, as they run the writes.
        reading.append(ReadAhead(steps_of(names), ahead or 0, kernels=device.type == "cpu"))
        for i, name in enumerate(names):
            reading[0].at(i)
            if name not in float_set:
                # Integer buffers, and buffers some models lack: the reference's.
                writer.add(name, reference.get(name).to(out_dtype_of[name]))
            else:
                dt = work_dtype(name)
                b = reference.get(name).to(device, dt) if base is not None else None
                ms = [load(i, name).to(device, dt) for i in range(len(models))]
                params = _tensor_params(cfg, name, positions[name], layers[name])
                if thresholds is not None:
                    params["thresholds"] = thresholds
                # Merged straight into a reused host buffer (CPU) or copied there (CUDA); the
                # writer thread writes it to the shard while the next tensor merges.
                host, slot = buffers.take(out_dtype_of[name], reference.shape(name))
                kwargs = dict(seed=seed, tensor_index=tensor_key(name), **params)
                if cfg.method.sparsify == "magnitude" and thresholds is None:
                    kwargs["tie"] = tie
                try:
                    if device.type == "cpu":
                        merge_tensors(b, ms, cfg.method.name, out=host, **kwargs)
                    else:
                        merged = merge_tensors(
                            b, ms, cfg.method.name, out_dtype=out_dtype_of[name], **kwargs
                        )
                        host.copy_(merged)
                except ValueError as exc:  # e.g. a NaN in a task vector: name the tensor
                    raise MergeError(f"{name}: {exc}") from None
                buffers.hold(slot, writer.add(name, host))
            if bar is not None:
                bar.update(nbytes[name])
                bar.set_postfix_str(f"{i + 1}/{len(names)} tensors", refresh=False)
        card = model_card(
            cfg, config_text, seed=seed, trim_scope=trim_scope, tie=tie, template=template_note
        )

        def finish(folder: Path) -> None:
            # Edits of the copied files, made before the output folder moves into place.
            if cfg.out_dtype is not None or cfg.dtype is not None:
                _set_config_dtype(folder, cfg.out_dtype or cfg.dtype)
            if untie:  # the output stores a head its (reference's) config ties
                _untie_config(folder)
            if template is not None:
                chat_templates.write(folder, template)

        # A model given as its .safetensors file brings the files of its folder.
        out = writer.commit(
            aux_from=reference.aux_folder(),
            tokenizer_from=(
                aux_folder(cfg.tokenizer_source) if cfg.tokenizer_source is not None else None
            ),
            card=card,
            finish=finish,
            fsync=fsync,
        )
    except BaseException:
        writer.abort()
        raise
    finally:
        for r in reading:
            r.close()
        if bar is not None:
            bar.close()
    return out


def merge_state_dicts(
    base: Mapping[str, torch.Tensor] | None,
    models: list[Mapping[str, torch.Tensor]],
    method: str,
    *,
    seed: int = 0,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with :func:`meldkit.ops.merge_tensor_list`.

    ``params`` are :func:`~meldkit.ops.merge_tensors`'s keyword arguments (``weights``,
    ``densities``, ``lam``, ``tie``, ...); magnitude trimming defaults to ``tie="exact_k"``
    (mergekit's rule), as :func:`merge` does. Non-floating tensors are taken from the base (or
    first model); a model's tensors the reference lacks are refused (buffers aside: see
    :func:`_is_buffer`), as :func:`merge` refuses them.
    The floating tensors of one dtype and device are merged in one call. Random masks are keyed
    by tensor name, as in :func:`merge`, so both give the same result.
    """
    from meldkit.merging.methods import get_method
    from meldkit.ops import merge_tensor_list

    if isinstance(models, Mapping) or not isinstance(models, Sequence) or not models:
        raise MergeError(
            "meldkit.merge_state_dicts: argument 'models': expected a non-empty list of state "
            f"dicts, got {type(models).__name__}{'' if models else ' (empty)'}"
        )
    n = len(models)
    for key in ("weights", "densities", "gammas", "epsilons"):
        # One value per model (the ops count tensors, which would say "for 3 tensors").
        value = params.get(key)
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) != n:
            raise MergeError(
                f"meldkit.merge_state_dicts: argument '{key}': {len(value)} values for {n} "
                "models (one per model, or one number for all)"
            )
    epsilons = params.get("epsilons")
    for j, e in enumerate(epsilons if isinstance(epsilons, Sequence) else [epsilons]):
        if isinstance(e, (int, float)) and not 0 <= e <= 1:
            raise MergeError(
                f"meldkit.merge_state_dicts: argument 'epsilons': {e} (model {j}) is not in "
                "[0, 1]: DELLA keeps entries with probabilities density ± epsilon"
            )
    if get_method(method).sparsify == "magnitude" and params.get("thresholds") is None:
        params.setdefault("tie", "exact_k")
    reference = base if base is not None else models[0]
    for j, m in enumerate(models):
        # As merge refuses them: a fine-tune's tensors the reference lacks would be dropped.
        extra = [n for n, t in m.items() if n not in reference and not _is_buffer(n, t.dtype)]
        if extra:
            raise MergeError(
                f"model {j} has {_listed(extra)} tensors the "
                f"{'base' if base is not None else 'first model'} lacks: they would not be in "
                "the merge (a different architecture, or adapter weights not merged into the "
                "model?); remove them from the state dict to merge the rest"
            )
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = {}
    for name, ref_t in reference.items():
        missing = [j for j, m in enumerate(models) if name not in m]
        if missing:
            raise MergeError(f"{name}: missing from models {missing}")
        bad = [j for j, m in enumerate(models) if m[name].shape != ref_t.shape]
        if bad:
            raise MergeError(
                f"{name}: shape {list(models[bad[0]][name].shape)} in model {bad[0]} does not "
                f"match {list(ref_t.shape)}"
            )
        if not ref_t.is_floating_point():
            out[name] = ref_t.clone()
            continue
        for j, m in enumerate(models):
            t = m[name]
            if t.dtype != ref_t.dtype or t.device != ref_t.device:
                raise MergeError(
                    f"{name}: {t.dtype} on {t.device} in model {j}, but {ref_t.dtype} on "
                    f"{ref_t.device} in the {'base' if base is not None else 'first model'} "
                    "(cast the state dicts to one dtype and device first)"
                )
        groups.setdefault((ref_t.dtype, ref_t.device), []).append(name)
    for names in groups.values():
        merged = merge_tensor_list(
            [base[n] for n in names] if base is not None else None,
            [[m[n] for n in names] for m in models],
            method,
            seed=seed,
            tensor_indices=[tensor_key(n) for n in names],
            **params,
        )
        out.update(zip(names, merged, strict=True))
    return {name: out[name] for name in reference}


__all__ = ["ConfigError", "MergeError", "merge", "merge_state_dicts"]
