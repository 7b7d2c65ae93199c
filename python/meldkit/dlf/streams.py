"""Cached incremental forwards of the models that take part in a logit fusion.

A *member* is one role in the fusion (the large model, the small base, one expert): a model, the
adapter it runs with, and the prompt rows it reads. Members that share one model object are run as
one *stream* (one forward and one KV cache over the rows of all of them), so that a small base
and its LoRA experts cost one batched forward per step (PEFT's mixed adapter batches,
``adapter_names=``) instead of T + 1. Every stream prefills its prompt once and then feeds only
the newest token.

Everything here talks to Hugging Face models through ``forward`` alone, with explicit attention
masks, position ids and cache objects, so that nothing depends on ``generate``'s private helpers
(whose cache arguments changed name between transformers 4.x and 5.x).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# PEFT's name for "no adapter" inside a mixed adapter batch.
BASE_ADAPTER = "__base__"


def is_peft_model(model: object) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (False when PEFT is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under ``model``: itself, or the base model of a ``PeftModel``."""
    return model.get_base_model() if is_peft_model(model) else model


def logits_width(model: nn.Module) -> int:
    """Width of ``model``'s logits: the rows of its output embedding, else ``config.vocab_size``."""
    inner = hf_model(model)
    get_out = getattr(inner, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    weight = getattr(out, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    config = getattr(inner, "config", None)
    if getattr(config, "vocab_size", None) is None:
        raise ValueError(f"cannot tell the vocabulary size of {type(model).__name__}")
    return int(config.vocab_size)


def padding_limit(vocab: int) -> int:
    """The most logits a model sharing a tokenizer of ``vocab`` tokens may have.

    Embedding rows past the tokenizer count as padding up to the next multiple of 128 plus a
    1/32 share of the vocabulary: enough for the padded families we know (CodeLlama's 32016 rows
    for Llama-2's 32000 tokens, Phi-3's 32064 for 32011, Qwen2.5's 151936 and 152064 for
    151665, Phi-2's 51200 for 50295, DeepSeek-LLM's 102400 for 100015), and far below what a
    model trained on another, larger vocabulary has.
    """
    return -(-vocab // 128) * 128 + vocab // 32


def check_vocab_width(name: str, width: int, vocab: int, config_size: int | None = None) -> None:
    """Raise ``ValueError`` unless ``width`` logits fit a tokenizer of ``vocab`` tokens: at least
    ``vocab``, and the rows past it padding (:func:`padding_limit`)."""
    if vocab <= width <= padding_limit(vocab):
        return
    config = f" (config.vocab_size {config_size})" if config_size is not None else ""
    if width < vocab:
        why = "fewer logits than the tokenizer has tokens"
    else:
        why = (
            f"more than the {padding_limit(vocab)} that padding of the embedding could explain: "
            "it was trained with another vocabulary"
        )
    raise ValueError(
        f"dlf: {name} has vocabulary size {width}{config} but the tokenizer has {vocab} tokens "
        f"({why}); logit fusion needs models that share one tokenizer (only extra padded rows "
        "at the end of an embedding are tolerated)"
    )


def _special_ids(config) -> dict[str, list[int]]:
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        ids = [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if ids:
            out[key] = ids
    return out


def common_vocab_size(tokenizer, models: dict[str, nn.Module]) -> int:
    """The vocabulary every model is fused over: ``len(tokenizer)``.

    Models may have more logits than the tokenizer has tokens (embedding rows padded to a multiple
    of 64 or 128, as CodeLlama's 32016 vs Llama-2's 32000): those trailing rows are sliced off.
    Anything else means another tokenizer: a model with fewer logits than the tokenizer has
    tokens, or more than padding explains (:func:`padding_limit`), in its logits or its
    ``config.vocab_size``, or whose config names a special token (BOS, EOS, pad) that the
    tokenizer does not have. (Special ids that differ between models are allowed: a base model
    and its chat variant share the vocabulary but not always the EOS, as Llama-3's 128001 and
    128009, and proxy-tuning pairs exactly those.)

    Parameters
    ----------
    tokenizer
        The one tokenizer all models share.
    models : dict[str, torch.nn.Module]
        The models by role name (used in the error message).

    Returns
    -------
    int
        ``len(tokenizer)``.

    Raises
    ------
    ValueError
        Naming the model, its vocabulary size and the tokenizer's, when a model cannot share
        this tokenizer.
    """
    vocab = len(tokenizer)
    for name, model in models.items():
        config = getattr(hf_model(model), "config", None)
        config_size = getattr(config, "vocab_size", None)
        config_size = int(config_size) if isinstance(config_size, int) else None
        width = logits_width(model)
        check_vocab_width(name, width, vocab, config_size)
        if config_size is not None and config_size != width:
            check_vocab_width(f"{name}'s config", config_size, vocab, config_size)
        for key, ids in _special_ids(config).items():
            outside = [i for i in ids if not 0 <= i < vocab]
            if outside:
                raise ValueError(
                    f"dlf: {name}'s config has {key} {outside[0]} but the tokenizer has {vocab} "
                    f"tokens (the model has vocabulary size {width}); logit fusion needs models "
                    "that share one tokenizer"
                )
    return vocab


def check_materialized(models: dict[str, nn.Module]) -> None:
    """Raise ``ValueError`` naming the first model with parameters or buffers on the ``meta``
    device (built under ``torch.device("meta")`` or ``init_empty_weights()`` and never loaded):
    its forward would fail deep inside with a raw torch error, after the other models ran.

    A model that accelerate dispatches (``device_map`` with offloading to "cpu" or "disk": an
    ``hf_device_map`` or ``_hf_hook``s) keeps offloaded weights on ``meta`` and loads them for
    every forward; it is let through.

    Parameters
    ----------
    models : dict[str, torch.nn.Module]
        The models by role name ("large", "small_base", "expert 0", ...).
    """
    for name, model in models.items():
        inner = hf_model(model)
        if getattr(inner, "hf_device_map", None) or any(
            hasattr(m, "_hf_hook") for m in model.modules()
        ):
            continue
        tensors = [*model.named_parameters(), *model.named_buffers()]
        on_meta = next((key for key, t in tensors if t.device.type == "meta"), None)
        if on_meta is not None:
            raise ValueError(
                f"dlf: {name} has parameters on the meta device ({on_meta!r}, ...): its weights "
                "were never loaded (a model built under torch.device('meta') or "
                "init_empty_weights()); load them (from_pretrained, load_state_dict(..., "
                "assign=True)) before decoding"
            )


# Text the tokenizers compared by check_tokenizers must split alike: punctuation, digits, accents,
# runs of spaces, tabs and newlines (where normalizers and pre-tokenizers differ).
_PROBE = "Hello, world! It's 2026-11-29: 3.14 ünïcödé café  two  spaces\n\tand a tab."


def check_tokenizer(tokenizer) -> None:
    """Raise TypeError unless ``tokenizer`` looks like a loaded Hugging Face tokenizer
    (callable on texts, with ``len``, ``decode`` and ``get_vocab``): a name or a path is
    refused with a hint to load it."""
    needs = ("__len__", "__call__", "decode", "get_vocab")
    if isinstance(tokenizer, (str, bytes, os.PathLike)):
        raise TypeError(
            f"dlf: tokenizer must be a loaded tokenizer, got the name {str(tokenizer)!r}: load it "
            "with transformers.AutoTokenizer.from_pretrained first"
        )
    missing = [a for a in needs if not hasattr(tokenizer, a)]
    if tokenizer is None or missing:
        raise TypeError(
            f"dlf: tokenizer must be a Hugging Face tokenizer (with {', '.join(needs)}), got "
            f"{type(tokenizer).__name__}"
        )


def check_tokenizers(tokenizer, others) -> None:
    """Raise ValueError unless every tokenizer of ``others`` is ``tokenizer`` for fusion's
    purposes: the same number of tokens, the same token → id map (added tokens included), and
    the same ids for a probe text (normalisation and pre-tokenisation). Special-token roles may
    differ (a chat tokenizer's EOS is not its base's, over one vocabulary).

    Parameters
    ----------
    tokenizer
        The tokenizer decoding runs with.
    others : sequence of tokenizers
        The models' own tokenizers (None entries are skipped); named ``tokenizers[i]`` in errors.
    """
    if others is None:
        return
    if isinstance(others, (str, bytes)) or not isinstance(others, Sequence):
        raise TypeError(
            f"dlf: tokenizers must be a list of the models' tokenizers, got {type(others).__name__}"
        )
    ref_vocab = tokenizer.get_vocab()
    ref_probe = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for i, other in enumerate(others):
        if other is None or other is tokenizer:
            continue
        name = f"tokenizers[{i}]"
        if len(other) != len(tokenizer):
            raise ValueError(
                f"dlf: {name} has {len(other)} tokens, the tokenizer {len(tokenizer)}; logit "
                "fusion needs models that share one tokenizer"
            )
        vocab = other.get_vocab()
        if vocab != ref_vocab:
            token = next(
                t for t in sorted(set(vocab) | set(ref_vocab)) if vocab.get(t) != ref_vocab.get(t)
            )
            raise ValueError(
                f"dlf: {name} maps token {token!r} to {vocab.get(token)}, the tokenizer to "
                f"{ref_vocab.get(token)}; logit fusion needs models that share one tokenizer"
            )
        probe = other(_PROBE, add_special_tokens=False)["input_ids"]
        if probe != ref_probe:
            raise ValueError(
                f"dlf: {name} splits text differently from the tokenizer (same vocabulary, "
                f"other normalisation or pre-tokenisation: {probe[:8]}... vs {ref_probe[:8]}...); "
                "logit fusion needs models that share one tokenizer"
            )


def _hook_device(hook) -> torch.device | None:
    """The execution device of an accelerate hook (``AlignDevicesHook``, or a ``SequentialHook``
    holding one), or None."""
    for h in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def _mapped_device(model: nn.Module, module: nn.Module) -> torch.device | None:
    """Where ``hf_device_map`` runs ``module``: its device, or, when it is offloaded ("cpu",
    "disk"), accelerate's main device (the first accelerator in the map, else the CPU)."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict) or not device_map:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    name = names.get(id(module))
    if name is None:
        return None
    # The entry of the module or of its closest mapped parent ("" maps the whole model).
    entry = max(
        (k for k in device_map if k == "" or name == k or name.startswith(k + ".")),
        key=len,
        default=None,
    )
    if entry is None:
        return None

    def as_device(value) -> torch.device:
        return torch.device(f"cuda:{value}" if isinstance(value, int) else value)

    value = device_map[entry]
    if value not in ("cpu", "disk"):
        return as_device(value)
    main = next((v for v in device_map.values() if v not in ("cpu", "disk")), "cpu")
    return as_device(main)


def input_device(model: nn.Module) -> torch.device:
    """The device ``model``'s input ids must be on: where its input embedding runs.

    Under accelerate (``device_map``, offloading to "cpu" or "disk") the embedding weight may sit
    on ``meta`` and move in only for the forward: its hook's execution device, else the device
    ``hf_device_map`` gives it, comes first; then the weight's device; then the first parameter
    that is not on ``meta``.
    """
    inner = hf_model(model)
    get_in = getattr(inner, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(emb, nn.Module):
        device = _hook_device(getattr(emb, "_hf_hook", None)) or _mapped_device(inner, emb)
        if device is not None:
            return device
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    device = _hook_device(getattr(inner, "_hf_hook", None))
    if device is not None:
        return device
    return next(
        (p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu")
    )


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids [R, L] int64, attention_mask [R, L] int64)``."""
    if any(len(r) == 0 for r in rows):
        raise ValueError("dlf: a prompt tokenized to zero tokens; give every prompt some text")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, length - len(r) :] = 1
    return ids, mask


def tokenize(
    tokenizer, texts: Sequence[str], add_special_tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``texts`` (with ``add_special_tokens``, special tokens such as BOS added as the
    tokenizer does) and left-pad them.

    A text that already starts with the BOS token (a chat template's output, next to plain
    prompts that need the tokenizer's BOS) does not get a second one: a row that would start
    with two BOS tokens, the first added by the tokenizer, keeps one.
    """
    texts = list(texts)
    rows = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    bos_text = getattr(tokenizer, "bos_token", None)
    if add_special_tokens and bos is not None and isinstance(bos_text, str) and bos_text:
        rows = [
            list(r)[1:]
            if len(r) >= 2 and r[0] == bos and r[1] == bos and text.lstrip().startswith(bos_text)
            else r
            for r, text in zip(rows, texts, strict=True)
        ]
    return left_pad(rows, pad_token_id(tokenizer))


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the pad token, else EOS, else 0 (masked out either way)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Inverse of :func:`left_pad`: the masked-in ids of every row."""
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]


def cache_is_empty(cache) -> bool:
    """Whether ``cache`` holds nothing after a forward that was given it (a model that returns
    legacy tuple caches leaves it so).

    Attention layers tell it by their sequence length. A cache with recurrent layers only (a
    pure state-space model such as Mamba: transformers' ``LinearAttentionLayer``) has none, and
    its ``get_seq_length`` raises ``ValueError``: such a cache is empty when no layer holds a
    convolution or recurrent state. A cache that tells neither is taken as filled.

    Parameters
    ----------
    cache
        A transformers ``Cache`` (or None).

    Returns
    -------
    bool
        True only when the cache is known to be empty.
    """
    length = getattr(cache, "get_seq_length", None)
    if not callable(length):
        return False
    try:
        return length() == 0
    except ValueError:  # "can only be called on Attention layers": recurrent layers only
        pass
    known = False
    for layer in getattr(cache, "layers", None) or []:
        for key in ("is_conv_states_initialized", "is_recurrent_states_initialized"):
            flags = getattr(layer, key, None)
            if isinstance(flags, dict):
                known = True
                if any(flags.values()):
                    return False
    return known


@dataclass(frozen=True)
class Member:
    """One role in the fusion.

    Attributes
    ----------
    model : torch.nn.Module
        A Hugging Face causal LM, or a ``peft.PeftModel`` around one.
    adapter : str or None
        ``None``: run ``model`` as it is. For a ``PeftModel`` only: :data:`BASE_ADAPTER` runs it
        with its adapters disabled; any other string runs that adapter.
    """

    model: nn.Module
    adapter: str | None = None


def _in_training_mode(model: nn.Module) -> str | None:
    """The name of a submodule of ``model`` whose output training mode changes (a dropout with
    p > 0, or any Hugging Face or PEFT module: attention dropout, LoRA dropout), left in training
    mode ("" for ``model`` itself); else None. A plain wrapper module in training mode around an
    eval-mode model is fine."""
    for name, module in model.named_modules():
        if not module.training:
            continue
        dropout = isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
        if dropout or type(module).__module__.startswith(("transformers.", "peft.")):
            return name
    return None


def _check_runnable(member: Member) -> None:
    """Raise ValueError when ``member`` cannot decode correctly here: a model with modules in
    training mode (dropout on: random logits, and PEFT refuses mixed adapter batches), or a
    prompt-learning adapter (virtual tokens, which the explicit positions and KV cache of
    :class:`ModelStream` do not account for)."""
    training = _in_training_mode(member.model)
    if training is not None:
        where = f" (its {training})" if training else ""
        raise ValueError(
            f"dlf: {type(member.model).__name__} is in training mode{where}, so dropout would "
            "make the decoding random; call .eval() on it before decoding"
        )
    if not is_peft_model(member.model) or member.adapter == BASE_ADAPTER:
        return
    names = list(member.model.active_adapters) if member.adapter is None else [member.adapter]
    for name in names:
        config = member.model.peft_config[name]
        if getattr(config, "is_prompt_learning", False):
            kind = getattr(config.peft_type, "value", config.peft_type)
            raise ValueError(
                f"dlf: adapter {name!r} is a prompt-learning adapter ({kind}), which logit "
                "fusion does not support: its virtual tokens do not fit the explicit positions "
                "and KV cache fusion decodes with"
            )


def _mixed_batch_refusal(model: nn.Module, adapter: str) -> str | None:
    """The adapter type that keeps ``adapter`` of the PeftModel ``model`` out of a mixed adapter
    batch (``adapter_names=``), or None when PEFT can run it in one.

    PEFT (0.21) mixes only LoRA adapters without DoRA: it refuses DoRA, and silently runs the
    active adapter on every row for other adapter types (IA3, LoHa, LoKr, VeRA, ...).
    """
    if adapter == BASE_ADAPTER:
        return None
    config = model.peft_config[adapter]
    kind = getattr(config.peft_type, "value", config.peft_type)
    if kind != "LORA":
        return str(kind)
    return "DoRA" if getattr(config, "use_dora", False) else None


def _drop_adapter_name_hooks(model: nn.Module) -> None:
    """Remove the ``adapter_names`` pre-forward hooks PEFT leaves on its layers when a forward
    raises (its ``_enable_peft_forward_hooks`` removes them only after a forward that returns);
    left in place, they pass the failed call's adapter names to every later forward."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            func = getattr(hook, "func", None)
            if getattr(func, "__name__", None) == "_adapter_names_pre_forward_hook":
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


@contextlib.contextmanager
def _adapter_active(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run the body with ``adapter`` of a PeftModel active; restore the previous state after.

    ``set_adapter`` also marks the adapter trainable, so every ``requires_grad`` flag is restored.
    """
    if adapter is None:
        yield
        return
    if adapter == BASE_ADAPTER:
        with model.disable_adapter():
            yield
        return
    previous = list(model.active_adapters)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.set_adapter(adapter)
        yield
    finally:
        if len(previous) == 1:
            model.set_adapter(previous[0])
        else:
            model.base_model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


class ModelStream:
    """One model's decoding state over one or more row blocks: KV cache, attention mask, positions.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face causal LM or a ``peft.PeftModel``.
    adapters : list[str or None]
        One entry per block of B rows (see :class:`Member`). Several blocks of a ``PeftModel`` run
        as one mixed adapter batch (``adapter_names=``); a single block with an adapter runs with
        ``disable_adapter()`` / ``set_adapter()``.
    vocab_size : int
        Logit columns kept (trailing padded rows are sliced off).
    out_device : torch.device, optional
        Where the logits go (the large model's logits device, where fusion happens); ``None``
        leaves them where the model puts them.
    use_cache : bool
        ``False`` recomputes the full sequences every step (for tests and debugging).
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: list[str | None],
        *,
        vocab_size: int,
        out_device: torch.device | None = None,
        use_cache: bool = True,
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.vocab_size = vocab_size
        self.out_device = out_device
        self.use_cache = use_cache
        self.device = input_device(model)
        inner = hf_model(model)
        params = inspect.signature(inner.forward).parameters
        # transformers 5.x renamed past_key_values to cache; 4.x Llama called logits_to_keep
        # num_logits_to_keep.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )
        self._config = getattr(inner, "config", None)
        mixed = len(adapters) > 1 and any(a is not None for a in adapters)
        if mixed and not all(a is not None for a in adapters):
            raise ValueError("dlf: a mixed adapter batch cannot include the model as-is")
        self._row_adapters = adapters if mixed else None
        self._context_adapter = adapters[0] if (len(adapters) == 1) else None
        self._cache = None
        self._ids: torch.Tensor | None = None  # full sequences, only without a cache
        self._mask: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._rows_per_block = 0

    def _new_cache(self):
        try:
            from transformers import DynamicCache
        except ImportError:  # pragma: no cover - transformers is needed to have a model at all
            return None
        try:
            return DynamicCache(config=self._config)
        except TypeError:  # transformers 4.x: DynamicCache() takes no config
            return DynamicCache()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        kwargs["use_cache"] = self.use_cache
        if self.use_cache:
            kwargs[self._cache_kw] = self._cache
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        if self._row_adapters is not None:
            b = self._rows_per_block
            kwargs["adapter_names"] = [a for a in self._row_adapters for _ in range(b)]
        with _adapter_active(self.model, self._context_adapter):
            out = self._run(kwargs)
        if self.use_cache:
            for key in ("cache", "past_key_values"):
                returned = out.get(key) if hasattr(out, "get") else None
                if returned is not None and not isinstance(returned, tuple):
                    self._cache = returned
                    break
            if cache_is_empty(self._cache):
                # A model that returns a legacy tuple cache (old remote code) and leaves the
                # cache it was given empty: the next steps would run without the prompt.
                raise RuntimeError(
                    f"dlf: {type(hf_model(self.model)).__name__} did not fill the KV cache it "
                    f"was given ({self._cache_kw}=); it may return legacy tuple caches: "
                    "pass use_cache=False (full recompute every step)"
                )
        logits = out.logits[:, -1, : self.vocab_size]
        return logits if self.out_device is None else logits.to(self.out_device)

    def _run(self, kwargs: dict):
        try:
            return self.model(**kwargs)
        except Exception as err:
            if "adapter_names" not in kwargs:
                raise
            _drop_adapter_name_hooks(self.model)  # so that the PeftModel stays usable
            # Ensemble sends only LoRA adapters without DoRA here; if PEFT still refuses, say so.
            if isinstance(err, ValueError) and "adapter_names" in str(err):
                raise ValueError(
                    f"dlf: {err} -- these adapters cannot run as one mixed batch: pass "
                    "adapter_batching=False (the base and every adapter then run one by one)"
                ) from err
            raise

    def _split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return list(logits.view(len(self.adapters), self._rows_per_block, logits.shape[-1]))

    def prefill(self, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Run the prompts; return the next-token logits of every block.

        Parameters
        ----------
        blocks : list[tuple[torch.Tensor, torch.Tensor]]
            Per block, ``(input_ids [B, L_k] int64, attention_mask [B, L_k])``, left-padded. Blocks
            of different lengths are left-padded to a common length.

        Returns
        -------
        list[torch.Tensor]
            Per block, logits ``[B, vocab_size]`` on ``out_device``, in the model's dtype.
        """
        if len(blocks) != len(self.adapters):
            raise ValueError(f"dlf: {len(blocks)} prompt blocks for {len(self.adapters)} adapters")
        self._rows_per_block = blocks[0][0].shape[0]
        length = max(ids.shape[1] for ids, _ in blocks)
        ids = torch.cat([nn.functional.pad(i, (length - i.shape[1], 0)) for i, _ in blocks])
        mask = torch.cat([nn.functional.pad(m, (length - m.shape[1], 0)) for _, m in blocks])
        ids, mask = ids.to(self.device), mask.to(self.device).long()
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        self._mask, self._pos = mask, pos
        self._cache = self._new_cache() if self.use_cache else None
        if not self.use_cache:
            self._ids = ids
        return self._split(self._forward(ids, mask, pos))

    def step(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Append ``tokens`` ([B] int64, the same token to every block's row) and run one step.

        Returns
        -------
        list[torch.Tensor]
            Per block, the logits ``[B, vocab_size]`` for the position after ``tokens``.
        """
        if self._mask is None:
            raise RuntimeError("dlf: step() before prefill()")
        new = tokens.to(self.device).view(1, -1, 1).expand(len(self.adapters), -1, 1)
        new = new.reshape(-1, 1)
        ones = torch.ones_like(new)
        self._mask = torch.cat([self._mask, ones], dim=1)
        self._pos = torch.cat([self._pos, self._pos[:, -1:] + 1], dim=1)
        if self.use_cache:
            return self._split(self._forward(new, self._mask, self._pos[:, -1:]))
        self._ids = torch.cat([self._ids, new], dim=1)
        return self._split(self._forward(self._ids, self._mask, self._pos))


def _mixed_batch_refusals(members: list[Member]) -> dict[int, list[str]]:
    """Per PeftModel (by ``id``) whose members would share one mixed adapter batch, why PEFT
    cannot run it as one: ``"adapter 'name' is TYPE"`` for every such adapter
    (:func:`_mixed_batch_refusal`). Models whose adapters all mix are left out."""
    blocks: dict[int, list[Member]] = {}
    for m in members:
        if m.adapter is not None and is_peft_model(m.model):
            blocks.setdefault(id(m.model), []).append(m)
    refusals = {}
    for key, ms in blocks.items():
        if len(ms) < 2:  # one block runs with set_adapter() / disable_adapter(), never mixed
            continue
        kinds = {m.adapter: _mixed_batch_refusal(m.model, m.adapter) for m in ms}
        reasons = [f"adapter {a!r} is {kind}" for a, kind in kinds.items() if kind is not None]
        if reasons:
            refusals[key] = reasons
    return refusals


class Ensemble:
    """All members of a fusion, grouped into streams (one per model object where possible).

    Parameters
    ----------
    members : list[Member]
        The roles, in the order their logits are returned.
    vocab_size : int
        Common vocabulary (logit columns kept).
    out_device : torch.device, optional
        Where all logits are gathered (see :class:`ModelStream`).
    adapter_batching : bool
        Run members that share one model in one forward: a ``PeftModel``'s base and adapters as a
        mixed adapter batch, or a plain model's several prompts as one batch. ``False`` runs every
        member separately (``disable_adapter()`` / ``set_adapter()`` for PEFT adapters). A
        ``PeftModel`` with an adapter PEFT cannot mix in one batch (anything but LoRA without
        DoRA) runs separately anyway, with a warning that names the adapters.
    use_cache : bool
        See :class:`ModelStream`.

    Raises
    ------
    ValueError
        For an adapter the model does not have, a model in training mode, or a
        prompt-learning adapter.
    """

    def __init__(
        self,
        members: list[Member],
        *,
        vocab_size: int,
        out_device: torch.device | None = None,
        adapter_batching: bool = True,
        use_cache: bool = True,
    ) -> None:
        for m in members:
            peft = is_peft_model(m.model)
            if m.adapter is not None and not peft:
                raise ValueError(
                    f"dlf: adapter {m.adapter!r} given for a {type(m.model).__name__}, which is "
                    "not a peft.PeftModel"
                )
            named = m.adapter not in (None, BASE_ADAPTER)
            if peft and named and m.adapter not in m.model.peft_config:
                raise ValueError(
                    f"dlf: the PeftModel has no adapter {m.adapter!r} "
                    f"(it has {sorted(m.model.peft_config)})"
                )
            _check_runnable(m)
        refusals = _mixed_batch_refusals(members) if adapter_batching else {}
        groups: dict[object, list[int]] = {}
        for i, m in enumerate(members):
            # A PeftModel "as is" (its active adapter) cannot join a mixed batch.
            batchable = adapter_batching and (is_peft_model(m.model) == (m.adapter is not None))
            batchable = batchable and id(m.model) not in refusals
            key = id(m.model) if batchable else ("alone", i)
            groups.setdefault(key, []).append(i)
        if refusals:
            reasons = ", ".join(r for rs in refusals.values() for r in rs)
            warnings.warn(
                "dlf: running the PEFT base and adapters one by one (as adapter_batching=False "
                "does), not as one mixed batch: PEFT mixes only LoRA adapters without DoRA, and "
                f"{reasons}",
                stacklevel=2,
            )
        self.members = members
        self.streams: list[ModelStream] = []
        self._where: list[tuple[int, int]] = [(0, 0)] * len(members)
        for idx in groups.values():
            for block, i in enumerate(idx):
                self._where[i] = (len(self.streams), block)
            self.streams.append(
                ModelStream(
                    members[idx[0]].model,
                    [members[i].adapter for i in idx],
                    vocab_size=vocab_size,
                    out_device=out_device,
                    use_cache=use_cache,
                )
            )
        self._groups = list(groups.values())

    def send_to(self, device: torch.device | None) -> None:
        """Gather every member's logits on ``device`` from now on."""
        for stream in self.streams:
            stream.out_device = device

    def prefill(self, prompts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Prefill every stream; ``prompts[i]`` is member i's ``(input_ids, attention_mask)``.

        Returns member i's logits ``[B, V]`` at index i.
        """
        pairs = zip(self.streams, self._groups, strict=True)
        outs = [s.prefill([prompts[i] for i in idx]) for s, idx in pairs]
        return [outs[s][b] for s, b in self._where]

    def step(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Feed ``tokens`` [B] to every stream; return member i's logits ``[B, V]`` at index i."""
        outs = [s.step(tokens) for s in self.streams]
        return [outs[s][b] for s, b in self._where]
