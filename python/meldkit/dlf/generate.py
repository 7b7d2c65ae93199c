"""The DLF decoding loop: :func:`generate` and its fixed-α form :func:`proxy_tuning`."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from meldkit.dlf.fusion import check_mode, check_ranges, fuse_logits, fusion_diagnostics
from meldkit.dlf.streams import (
    BASE_ADAPTER,
    Ensemble,
    Member,
    check_materialized,
    check_tokenizer,
    check_tokenizers,
    common_vocab_size,
    is_peft_model,
    pad_token_id,
    tokenize,
)
from meldkit.ops.logit_fusion import MAX_EXPERTS

# An expert: a full model, or the name of an adapter of a PeftModel small base.
Expert = nn.Module | str
# A per-expert prompt prefix, or a function from the prompt to the expert's prompt (chat template).
ExpertPrompt = str | Callable[[str], str] | None


@dataclass
class DLFOutput:
    """What :func:`generate` returns. B = number of prompts, S = decoding steps run.

    Attributes
    ----------
    texts : list[str]
        Per prompt, the generated continuation (special tokens skipped), cut before the first stop
        string when one ended the row (a stop string that is, or holds, a special token's text
        cuts the text before that token).
    token_ids : list[list[int]]
        Per prompt, the generated token ids, including the EOS token or the token that completed a
        stop string.
    sequences : torch.Tensor
        ``[B, S]`` int64 generated ids, padded with the tokenizer's pad id after a row ended.
    alphas : torch.Tensor
        ``[B, S]`` float32 α used at every step; NaN after a row ended.
    experts : torch.Tensor
        ``[B, S]`` int64 expert chosen at every step (dynamic mode; static mode: 0 when T = 1, −1
        = all experts when T > 1); −1 after a row ended.
    finish_reasons : list[str]
        Per prompt: ``"eos"``, ``"stop"`` (a stop string) or ``"length"`` (max_new_tokens).
    logits : torch.Tensor or None
        ``[B, S, V]`` fused logits of every step (float32; float64 when every model's are),
        NaN after a row ended, when ``return_logits=True``.
    diagnostics : torch.Tensor or None
        ``[B, S, 4]`` float32 per step, when ``return_diagnostics=True``:
        ``KL(P̃‖P), KL(P‖P̃)`` (how far the fusion moved the large model) and the targets
        ``mean_t KL(Q_t‖Q), mean_t KL(Q‖Q_t)`` that the dynamic solver matches them to
        (:func:`meldkit.dlf.fusion_diagnostics`); NaN after a row ended.
    """

    texts: list[str]
    token_ids: list[list[int]]
    sequences: torch.Tensor
    alphas: torch.Tensor
    experts: torch.Tensor
    finish_reasons: list[str]
    logits: torch.Tensor | None = None
    diagnostics: torch.Tensor | None = None


def _as_list(x, kind) -> list:
    if isinstance(x, kind):
        return [x]
    return list(x)


def prompt_list(prompts, name: str = "prompts") -> list[str]:
    """``prompts`` (a text or a sequence of texts) as a list of texts; TypeError naming the
    first entry that is not a ``str`` (token ids, None, a tensor)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Iterable):
        raise TypeError(
            f"dlf: {name} must be a text or a list of texts, got {type(prompts).__name__} "
            "(token ids: decode them with the tokenizer first)"
        )
    texts = list(prompts)
    for i, p in enumerate(texts):
        if not isinstance(p, str):
            raise TypeError(
                f"dlf: {name}[{i}] must be a str (a prompt's text), got {type(p).__name__}"
                + (
                    " (token ids: decode them with the tokenizer first)"
                    if isinstance(p, (list, tuple, torch.Tensor))
                    else ""
                )
            )
    return texts


def fusion_members(
    small_base: nn.Module,
    experts: Sequence[Expert],
    expert_prompts: Sequence[ExpertPrompt] | None = None,
) -> list[Member]:
    """The small base and expert members (in that order) for the given expert specs.

    A ``PeftModel`` small base stands for its base model (adapters disabled); a string expert names
    one of its adapters; an expert that *is* the small base object is the small base again, which
    needs an expert prompt (the paper's in-context-learning expert): without one it equals the
    small base, every shift M_t − M_S is 0 and the fusion could only pick α = 0.
    """
    peft = is_peft_model(small_base)
    base = Member(small_base, BASE_ADAPTER if peft else None)
    members = [base]
    prompted = list(expert_prompts) if expert_prompts is not None else []
    shared_bases: dict[int, int] = {}
    for t, e in enumerate(experts):
        if isinstance(e, nn.Module) and e is small_base:
            if t >= len(prompted) or prompted[t] is None:
                hint = (
                    "; for the adapters of a PeftModel small_base pass their names as experts"
                    if peft
                    else ""
                )
                raise ValueError(
                    f"dlf: expert {t} is small_base itself and has no expert prompt, so it "
                    "equals the small base (every shift M_t - M_S is 0): give it an "
                    f"expert_prompts entry (the in-context-learning expert){hint}"
                )
        if isinstance(e, nn.Module) and is_peft_model(e) and e is not small_base:
            inner = id(e.get_base_model())
            if inner in shared_bases:
                raise ValueError(
                    f"dlf: experts {shared_bases[inner]} and {t} are PeftModels over one base "
                    "model object; PEFT injects LoRA layers into it in place, so both would run "
                    "the same adapter: load the adapters into one PeftModel and pass it as "
                    "small_base with the adapter names as experts"
                )
            shared_bases[inner] = t
        if isinstance(e, str):
            if not peft:
                raise ValueError(
                    f"dlf: expert {t} is the adapter name {e!r}, which needs small_base to be a "
                    f"peft.PeftModel holding it (got {type(small_base).__name__})"
                )
            members.append(Member(small_base, e))
        elif e is small_base:
            members.append(base)
        elif isinstance(e, nn.Module):
            inner = e.get_base_model() if is_peft_model(e) else None
            if inner is small_base or (peft and e is small_base.get_base_model()):
                # PEFT injects LoRA layers into the wrapped model in place, so the "base" would
                # silently run with an adapter.
                raise ValueError(
                    f"dlf: expert {t} and small_base share one model object with LoRA layers in "
                    "it; pass the PeftModel as small_base and its adapter names as experts"
                )
            members.append(Member(e, None))
        else:
            raise TypeError(f"dlf: expert {t} must be a model or an adapter name, got {type(e)}")
    return members


def expert_texts(prompts: list[str], expert_prompts, n_experts: int) -> list[list[str] | None]:
    """Per expert, its prompt texts (``None``: the plain prompts)."""
    if expert_prompts is None:
        return [None] * n_experts
    expert_prompts = list(expert_prompts)
    if len(expert_prompts) != n_experts:
        raise ValueError(f"dlf: {len(expert_prompts)} expert_prompts for {n_experts} experts")
    out: list[list[str] | None] = []
    for p in expert_prompts:
        if p is None:
            out.append(None)
        elif isinstance(p, str):
            out.append([p + x for x in prompts])
        elif callable(p):
            texts = [p(x) for x in prompts]
            bad = next((i for i, x in enumerate(texts) if not isinstance(x, str)), None)
            if bad is not None:
                raise TypeError(
                    f"dlf: expert_prompts[{len(out)}] returned {type(texts[bad]).__name__} for "
                    f"prompts[{bad}], not a str"
                )
            out.append(texts)
        else:
            raise TypeError(f"dlf: an expert prompt must be a str, callable or None, not {type(p)}")
    return out


def alpha_list(alphas) -> list[float] | None:
    """The α grid as host floats (a device tensor would cost a synchronisation every step)."""
    if alphas is None:
        return None
    if hasattr(alphas, "tolist"):  # torch.Tensor, numpy.ndarray
        if isinstance(alphas, torch.Tensor):
            alphas = alphas.detach().cpu()
        values = alphas.tolist()
        values = values if isinstance(values, list) else [values]
    elif isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable):
        raise TypeError(f"dlf: alphas must be a sequence of floats, got {alphas!r}")
    else:
        values = list(alphas)
    out = []
    for a in values:
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise TypeError(f"dlf: alphas must be floats, got {a!r}")
        if not math.isfinite(a):
            raise ValueError(f"dlf: alphas must be finite, got {a!r}")
        out.append(float(a))
    if not out:
        raise ValueError("dlf: alphas is empty (the grid needs at least one point)")
    return out


def token_id_set(value, name: str) -> set[int]:
    """Token ids given as an int, a sequence of ints, or an integer tensor or NumPy array (or
    scalar), as a set of Python ints: tensors hash by identity, so a tensor id in the set would
    never match a generated id, and a 0-d tensor or NumPy scalar is not iterable."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy.ndarray, numpy integer scalar
        value = value.tolist()
    values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"dlf: {name} must be token ids (ints), got {v!r} in {value!r}")
    return set(values)


def _eos_ids(tokenizer, models: dict[str, nn.Module], eos_token_id) -> set[int]:
    """The ids that end a row: ``eos_token_id`` when given, else the tokenizer's EOS and every
    model's ``generation_config.eos_token_id`` (an instruct expert's end-of-turn token, such as
    Llama 3's ``<|eot_id|>``, ends a row that the fusion steered into it)."""
    if eos_token_id is not None:
        return token_id_set(eos_token_id, "eos_token_id")
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids |= token_id_set(tokenizer.eos_token_id, "the tokenizer's eos_token_id")
    for name, model in models.items():
        gen = getattr(model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        if extra is not None:
            ids |= token_id_set(extra, f"{name}'s generation_config.eos_token_id")
    return ids


# generation_config fields whose logits processors transformers' generate() would run and this
# loop does not (they are not known to the fusion): a model that ships one gets a warning.
_UNAPPLIED = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "min_new_tokens": None,
}


def _warn_unapplied(large: nn.Module, repetition_penalty: float | None = None) -> None:
    gen = getattr(large, "generation_config", None)
    if gen is None:
        return
    found = []
    for key, default in _UNAPPLIED.items():
        if key == "repetition_penalty" and repetition_penalty is not None:
            continue  # the caller chose its own
        value = getattr(gen, key, default)
        if value is not None and value != default and value != [] and value != {}:
            found.append(f"{key}={value!r}")
    if found:
        warnings.warn(
            "dlf: the large model's generation_config sets "
            + ", ".join(found)
            + ", which meldkit.dlf.generate does not apply (it runs its own decoding loop): "
            "pass repetition_penalty= for a repetition penalty, the matching transformers logits "
            "processors as logits_processor= for the others (they then act on the fused "
            "logits), or clear these settings to silence this warning",
            stacklevel=3,
        )


# generation_config sampling fields and the values that leave transformers' generate() decoding
# as with none set (top_k=50 is its default; 0 turns top-k off, as dlf's default None does).
_SAMPLING_DEFAULTS = {"temperature": (1.0,), "top_p": (1.0,), "top_k": (50, 0)}


def _warn_unused_sampling(
    large: nn.Module,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int | None,
) -> None:
    """Warn when the large model's ``generation_config`` asks for sampling settings
    (``do_sample``, ``temperature``, ``top_p``, ``top_k``) that this call will not decode
    with: ``generate``'s own arguments decide, so a model that ships sampling defaults (as
    Llama-3-Instruct's ``do_sample=True, temperature=0.6, top_p=0.9``) would otherwise be
    decoded greedily without a word. Only fields ``large.generate()`` would use are named: the
    warpers when the config or this call samples, and then only values that differ from this
    call's."""
    gen = getattr(large, "generation_config", None)
    if gen is None:
        return
    sampling = getattr(gen, "do_sample", None) is True
    found = ["do_sample=True"] if sampling and not do_sample else []
    if sampling or do_sample:
        used = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
        for key, defaults in _SAMPLING_DEFAULTS.items():
            value = getattr(gen, key, None)
            if value is None or value in defaults:
                continue
            if key in used and used[key] == value:
                continue
            found.append(f"{key}={value!r}")
    if found:
        now = (
            f"do_sample=True, temperature={temperature}, top_p={top_p}, top_k={top_k}"
            if do_sample
            else "do_sample=False: greedy"
        )
        warnings.warn(
            "dlf: the large model's generation_config sets "
            + ", ".join(found)
            + ", which meldkit.dlf.generate does not use: its own do_sample=, temperature=, "
            f"top_p= and top_k= arguments decide how it decodes (this call: {now}); pass them "
            "to decode as large.generate() would",
            stacklevel=3,
        )


def _check_positions(models: dict[str, nn.Module], lengths: list[int], new_tokens: int) -> None:
    """Warn when a prompt plus the new tokens runs past a model's position limit (as
    transformers does): absolute position embeddings fail there, rotary ones degrade."""
    for (name, model), length in zip(models.items(), lengths, strict=True):
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and length + new_tokens > limit:
            warnings.warn(
                f"dlf: {name} reads prompts of up to {length} tokens and generates up to "
                f"{new_tokens} more, past its max_position_embeddings = {limit}: its outputs "
                "may degrade, or it may fail",
                stacklevel=3,
            )


def stop_cut(tokenizer, ids: list[int], stops: Sequence[str]) -> int | None:
    """Where the text of ``ids`` ends for the first stop string in it; None when there is none.

    The text is ``decode(ids, skip_special_tokens=True)``. A stop string is looked for in it and
    in the decode that keeps special tokens, so that a special token's text ("<|im_end|>",
    "<pad>") stops a row as well. A stop string found in the text cuts it before its first
    occurrence; one found only with special tokens kept cuts it before the token where that
    occurrence starts (within the token, when the token is shown in the text).

    Returns
    -------
    int or None
        The length of the text to keep.
    """
    if not stops:
        return None
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    full = tokenizer.decode(ids, skip_special_tokens=False)
    starts = [full.find(s) for s in stops if s not in text and s in full]
    if starts:
        cuts.append(_shown_before(tokenizer, ids, min(starts)))
    return min(cuts) if cuts else None


def stop_in_tail(tokenizer, ids: list[int], stops: Sequence[str]) -> bool:
    """Whether a stop string ends within the text of the last tokens of ``ids``.

    Called once per row and step after the newest token: a stop string completed by it ends in
    the last ``len(longest stop)`` characters, so decoding a tail of tokens whose text is a
    little longer than that suffices (transformers' ``StopStringCriteria`` looks at a tail
    too); decoding the whole continuation every step would cost time quadratic in its length.
    The tail grows by doubling until its text (special tokens kept) is long enough. The exact
    cut is then found on the whole text by :func:`stop_cut`, once per row.
    """
    if not stops:
        return False
    need = max(len(x) for x in stops) + 8  # a margin for text a tail decode may render apart
    n = 4
    while True:
        # Both renderings must be long enough: skipped special tokens shorten the text one.
        tail = ids[-n:]
        full = tokenizer.decode(tail, skip_special_tokens=False)
        text = tokenizer.decode(tail, skip_special_tokens=True)
        if (len(full) >= need and len(text) >= need) or n >= len(ids):
            break
        n *= 2
    return any(x in full or x in text for x in stops)


def _shown_before(tokenizer, ids: list[int], start: int) -> int:
    """Length of the text (special tokens skipped) of ``ids`` before character ``start`` of the
    decode that keeps special tokens."""
    for j in range(len(ids)):
        upto = tokenizer.decode(ids[: j + 1], skip_special_tokens=False)
        if len(upto) > start:  # token j holds character ``start``
            break
    shown = tokenizer.decode(ids[: j + 1], skip_special_tokens=True)
    if tokenizer.decode(ids[j : j + 1], skip_special_tokens=True) == "":
        return len(tokenizer.decode(ids[:j], skip_special_tokens=True))  # a skipped token
    # Token j is shown and ends ``shown`` as it ends ``upto``: drop its part from ``start`` on.
    return max(0, len(shown) - (len(upto) - start))


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (as transformers' ``TopPLogitsWarper``): keep the smallest set of top
    tokens whose probability reaches ``top_p``; set the rest to −inf."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def next_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    top_k: int | None = None,
) -> torch.Tensor:
    """Pick the next token of every row from fused logits ``[B, V]``: argmax, or a sample from
    softmax(logits / temperature) restricted to the ``top_k`` best tokens and then to the top-p
    nucleus (transformers' order of warpers; ``top_k`` None or 0: no top-k filter). Returns
    ``[B]`` int64."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        scores = _top_p_filter(scores, top_p)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_sampling(do_sample, temperature, top_p, generator, seed, top_k=None) -> None:
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0
    ):
        raise ValueError(
            f"dlf: top_k must be an int >= 0 or None (0 or None: no top-k filter), got {top_k!r}"
        )
    # As transformers' generate: temperature and top_p are only read (and checked) when
    # sampling; greedy decoding ignores them.
    if do_sample:
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"dlf: {name} must be a number, got {value!r}")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
    ):
        raise ValueError(f"dlf: seed must be an int >= 0, got {seed!r}")
    if do_sample and not 0.0 < top_p <= 1.0:
        raise ValueError(f"dlf: top_p must be in (0, 1] when sampling, got {top_p}")
    if do_sample and not temperature > 0.0:
        raise ValueError(f"dlf: temperature must be > 0 when sampling, got {temperature}")
    if generator is not None and seed is not None:
        raise ValueError("dlf: give a generator or a seed, not both")


def _check_repetition_penalty(penalty) -> float | None:
    """``repetition_penalty`` as a float (None: no penalty); TypeError or ValueError naming it."""
    if penalty is None:
        return None
    if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real):
        raise TypeError(f"dlf: repetition_penalty must be a number or None, got {penalty!r}")
    if not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(
            f"dlf: repetition_penalty must be a finite number > 0 (1.0: no penalty), got "
            f"{penalty!r}"
        )
    return float(penalty)


def _real_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Left-padded ``ids`` with every pad position holding its row's last token instead: a
    token the row really has, so that a repetition penalty over them sees the row's own tokens
    only (each distinct token is penalised once however often it appears)."""
    return torch.where(mask.bool(), ids, ids[:, -1:])


def penalise_repetitions(scores: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Transformers' repetition penalty (Keskar et al. 2019, ``RepetitionPenaltyLogitsProcessor``)
    on the tokens of ``ids``: per row, the score of every distinct token in the row is
    multiplied by ``penalty`` when negative and divided by it otherwise.

    Parameters
    ----------
    scores : torch.Tensor
        ``[B, V]`` logits.
    ids : torch.Tensor
        ``[B, L]`` int64 token ids (< V) of every row; repeats count once.
    penalty : float
        > 0; above 1 penalises the tokens, below 1 favours them.

    Returns
    -------
    torch.Tensor
        ``[B, V]`` penalised scores (a new tensor).
    """
    picked = scores.gather(1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, ids, picked)


@torch.no_grad()
def generate(
    large: nn.Module,
    small_base: nn.Module,
    experts: Expert | Sequence[Expert],
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int,
    mode: str = "dynamic",
    alpha: float = 1.0,
    alphas: torch.Tensor | Sequence[float] | None = None,
    ranges: Sequence[tuple[float, float]] | tuple[float, float] | None = None,
    plausibility: float | None = None,
    amateur_temperature: float | None = None,
    do_sample: bool = False,
    temperature: float | None = 1.0,
    top_p: float | None = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    logits_processor: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    stop: str | Sequence[str] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    expert_prompts: Sequence[ExpertPrompt] | None = None,
    add_special_tokens: bool = True,
    adapter_batching: bool = True,
    use_cache: bool = True,
    return_logits: bool = False,
    return_diagnostics: bool = False,
    tokenizers: Sequence | None = None,
) -> DLFOutput:
    """Weak-to-strong decoding by dynamic logit fusion (DLF) or fixed-α proxy-tuning.

    Every step fuses the large model's raw logits M_L with the shift M_t − M_S that fine-tuning
    gave a small model: P̃ = softmax(M_L + α·(M_t − M_S)). ``mode="dynamic"`` picks, per row and
    step, the expert t and α on a grid that best match the KL shifts of the small models (Fan et
    al. 2024, solved by :func:`meldkit.ops.logit_fusion`); ``mode="static"`` uses the fixed
    ``alpha`` and sums the shifts of all experts (``alpha=1`` with one expert is proxy-tuning).
    Temperature and top-p act only after fusion, when sampling.

    Every model is prefilled once and keeps its own KV cache; each step feeds only the new token.
    Prompts are batched with left padding and per-model attention masks and position ids. The
    small base and its LoRA experts (adapters of one ``PeftModel``) run as one mixed adapter batch
    per step. Models may sit on different devices; logits are moved to the large model's logits
    device for fusion.

    Parameters
    ----------
    large : torch.nn.Module
        Large causal LM (Hugging Face ``*ForCausalLM``), the model being steered.
    small_base : torch.nn.Module
        Small base causal LM, or a ``peft.PeftModel`` whose adapters are the experts (its base
        model, adapters disabled, is then the small base).
    experts : torch.nn.Module or str, or a sequence of them
        T ≥ 1 small experts: full models, or adapter names of a ``PeftModel`` ``small_base``. The
        ``small_base`` object itself is allowed as an expert with an ``expert_prompts`` entry (the
        in-context-learning expert: the base model with a task prompt). ``[]`` in
        ``contrastive`` mode, which uses none.
    tokenizer
        The one tokenizer all models share (a ``transformers`` tokenizer). The fusion runs over
        ``len(tokenizer)`` tokens; models with more logits (padded embedding rows) are sliced.
    prompts : str or sequence of str
        B prompts (special tokens such as BOS are added by the tokenizer, unless
        ``add_special_tokens=False``).
    max_new_tokens : int
        Most tokens generated per prompt (≥ 1).
    mode : {"dynamic", "static", "contrastive"}
        DLF (per-step α and expert), fixed α, or contrastive decoding (Li et al., ACL 2023):
        ``large`` is the expert and ``small_base`` the amateur, each step's scores are
        log p_large − log p_small (the amateur at ``amateur_temperature``) over the tokens with
        p_large ≥ ``plausibility``·max p_large (see :func:`contrastive_decoding`).
    alpha : float
        α of ``static`` mode (1.0: proxy-tuning; 0.0: the large model alone).
    alphas : torch.Tensor or sequence of float, optional
        ``[n]`` α search grid of ``dynamic`` mode; default 0.0, 0.1, …, 2.0 (the paper's).
    ranges : sequence of (lo, hi), or one (lo, hi), optional
        Per-expert search ranges of ``dynamic`` mode: expert t takes only the grid points in
        ``[lo_t, hi_t]`` (the paper searches each expert "within a certain range"; see
        :func:`meldkit.ops.logit_fusion`). Default: the whole grid for every expert.
    plausibility, amateur_temperature : float, optional
        Contrastive decoding's α (default 0.1) and amateur temperature (default 1.0); for
        ``mode="contrastive"`` only.
    do_sample : bool
        Sample instead of greedy argmax (the paper decodes greedily).
    temperature, top_p : float, optional
        Sampling temperature (> 0) and nucleus mass (in (0, 1]), applied to the fused logits
        only; checked and used only when ``do_sample`` (greedy decoding ignores them, as
        transformers' ``generate`` does). None means the default, 1.0. The large model's
        ``generation_config`` sampling settings are not read: a warning names those this call
        does not decode with.
    top_k : int, optional
        When sampling, keep only the ``top_k`` best fused tokens (before top-p, as transformers
        orders its warpers). Default: no top-k filter (None or 0, as in transformers;
        transformers' ``generate`` defaults to 50: pass ``top_k=50`` to match it).
    generator : torch.Generator, optional
        Random generator on the large model's logits device, for reproducible sampling.
    seed : int, optional
        Seed of a fresh generator (instead of ``generator``).
    repetition_penalty : float, optional
        Transformers' repetition penalty (> 0; 1.0 changes nothing), applied to the fused
        logits of every step before ``logits_processor``, temperature, top-k and top-p, as
        ``large.generate(repetition_penalty=...)`` orders it: per row, every distinct token of
        that row's prompt (the large model's) and of its generated tokens has its fused logit
        multiplied by the penalty when negative and divided by it otherwise. The left padding
        of a batch is not penalised (as in transformers), so a batch decodes as its prompts
        one by one.
    logits_processor : sequence of callables, optional
        Processors ``f(input_ids, scores) -> scores`` applied in order to the fused logits of
        every step, before temperature, top-k and top-p: transformers' ``LogitsProcessor``
        objects (``RepetitionPenaltyLogitsProcessor(1.2)``, ``NoRepeatNGramLogitsProcessor(3)``,
        ...) work as they are. ``input_ids`` is ``[B, L + step]``: the large model's left-padded
        prompt ids and the tokens generated so far (the pad id after a row ended); ``scores``
        is ``[B, len(tokenizer)]``. Proxy-tuning applies such processors after the fusion, as
        here. ``input_ids`` holds the left padding as ``large.generate(logits_processor=...)``
        passes it: a ``RepetitionPenaltyLogitsProcessor`` then penalises the pad token (often
        the EOS token) in the shorter prompts of a batch; ``repetition_penalty=`` is the
        padding-aware way. The large model's ``generation_config`` processors
        (``repetition_penalty``, ...) are not applied on their own: a warning names them when no
        ``logits_processor`` is given.
    stop : str or sequence of str, optional
        Stop strings: a row ends once its decoded continuation contains one, with special tokens
        skipped or kept (a special token's text, as "<|im_end|>", stops a row too); its text is
        cut before the stop string.
    eos_token_id : int or sequence of int, optional
        Ids that end a row (ints, or an integer tensor or NumPy array); default the tokenizer's
        EOS plus every model's ``generation_config.eos_token_id`` (an instruct expert's
        end-of-turn token ends a row too).
    expert_prompts : sequence of (str, callable or None), optional
        Per expert: a prefix put before every prompt (task instructions or few-shot
        demonstrations), a function prompt → expert prompt (e.g. a chat template), or None. Each
        expert then reads its own prompt and keeps its own cache rows; generated tokens are appended
        to every model's sequence.
    add_special_tokens : bool
        Passed to the tokenizer for every prompt (the experts' too). A text that already starts
        with the BOS token, as texts from ``tokenizer.apply_chat_template(..., tokenize=False)``
        do, keeps one BOS either way (a second one the tokenizer would put in front is dropped),
        so plain prompts and chat-template expert prompts mix with the default ``True``.
        ``False`` for prompts that hold their special tokens without starting with BOS.
    adapter_batching : bool
        Run the small base and its PEFT adapters (and several prompts of one model) as one batched
        forward per step; ``False`` runs them one by one with ``disable_adapter()`` /
        ``set_adapter()``. Adapter types PEFT cannot mix in one batch (anything but LoRA without
        DoRA: IA3, LoHa, LoKr, VeRA, DoRA, ...) run one by one anyway, with a warning.
        Prompt-learning adapters and models in training mode are refused (``ValueError``).
    use_cache : bool
        ``False`` recomputes the full sequences every step (slow; for checking the cache).
    return_logits : bool
        Also return every step's fused logits.
    return_diagnostics : bool
        Also return, per row and step, the two KL shifts of the large model and the two targets
        of the DLF objective (:attr:`DLFOutput.diagnostics`); costs a few softmaxes per step.
    tokenizers : sequence of tokenizers, optional
        The models' own tokenizers (as loaded with each model; None entries skipped), checked
        against ``tokenizer`` before any model runs: the same tokens with the same ids, and the
        same split of a probe text. A model's tokenizer that differs is refused (``ValueError``
        naming it and a differing token) instead of fusing logits of unrelated tokens.

    Returns
    -------
    DLFOutput
        Texts, generated ids and the per-step (α, expert) trace.

    Raises
    ------
    ValueError
        On a model whose vocabulary is smaller than the tokenizer's, a model with parameters on
        the meta device, unknown adapters, expert prompts not matching the experts, or invalid
        sampling arguments.
    """
    check_mode(mode, alpha, alphas, ranges, plausibility, amateur_temperature)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, numbers.Integral)
        or max_new_tokens < 1
    ):
        raise ValueError(f"dlf: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    check_tokenizer(tokenizer)
    prompts = prompt_list(prompts)
    if not prompts:
        raise ValueError("dlf: no prompts")
    experts = _as_list(experts, (nn.Module, str))
    if mode == "contrastive" and experts:
        raise ValueError(
            "dlf: contrastive decoding contrasts large (the expert) with small_base (the "
            "amateur) and takes no experts: pass experts=[]"
        )
    if not experts and mode != "contrastive":
        raise ValueError("dlf: at least one expert is needed")
    if stop is not None and not isinstance(stop, (str, Sequence)):
        raise TypeError(f"dlf: stop must be a string or a list of strings, got {stop!r}")
    stops = _as_list(stop, str) if stop is not None else []
    if any(not isinstance(s, str) for s in stops):
        raise TypeError(f"dlf: stop must be a string or a list of strings, got {stop!r}")
    if any(not s for s in stops):
        raise ValueError("dlf: empty stop string")
    # As transformers' generate: None means the default, top_k=0 no top-k filter.
    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    _check_sampling(do_sample, temperature, top_p, generator, seed, top_k)
    top_k = None if top_k is None or top_k == 0 else int(top_k)
    repetition_penalty = _check_repetition_penalty(repetition_penalty)
    if not isinstance(add_special_tokens, bool):
        raise TypeError(f"dlf: add_special_tokens must be a bool, got {add_special_tokens!r}")
    processors = _check_processors(logits_processor)
    alphas = alpha_list(alphas)
    ranges = check_ranges(ranges, len(experts), alphas)
    if mode == "dynamic" and len(experts) > MAX_EXPERTS:
        raise ValueError(
            f"dlf: dynamic mode searches at most {MAX_EXPERTS} experts per step, got {len(experts)}"
        )
    check_tokenizers(tokenizer, tokenizers)

    members = [Member(large, None), *fusion_members(small_base, experts, expert_prompts)]
    models = {"large": large, "small_base": small_base}
    models.update({f"expert {t}": m.model for t, m in enumerate(members[2:])})
    check_materialized(models)
    vocab = common_vocab_size(tokenizer, models)
    texts_per_member = [prompts, prompts, *expert_texts(prompts, expert_prompts, len(experts))]
    texts_per_member = [t if t is not None else prompts for t in texts_per_member]
    eos = _eos_ids(tokenizer, models, eos_token_id)
    if processors is None:
        _warn_unapplied(large, repetition_penalty)
    _warn_unused_sampling(large, do_sample, temperature, top_p, top_k)

    encoded = [tokenize(tokenizer, texts, add_special_tokens) for texts in texts_per_member]
    _check_positions(models, [ids.shape[1] for ids, _ in encoded], max_new_tokens)
    ensemble = Ensemble(
        members,
        vocab_size=vocab,
        adapter_batching=adapter_batching,
        use_cache=use_cache,
    )
    logits = _prefill(ensemble, encoded)
    device = logits[0].device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    seen = encoded[0][0].to(device) if processors else None  # the large model's ids so far
    # The large model's real ids so far (padding replaced by a real token of the row).
    penalised = _real_ids(*encoded[0]).to(device) if repetition_penalty is not None else None

    pad = pad_token_id(tokenizer)
    rows = len(prompts)
    finished = [False] * rows
    reasons = ["length"] * rows
    generated: list[list[int]] = [[] for _ in range(rows)]
    trace_tokens, trace_alpha, trace_expert, trace_logits, trace_stats = [], [], [], [], []
    for step in range(max_new_tokens):
        expert_logits = torch.stack(logits[2:]) if experts else None
        fused, a, e = fuse_logits(
            logits[0],
            logits[1],
            expert_logits,
            mode=mode,
            alpha=alpha,
            alphas=alphas,
            ranges=ranges,
            plausibility=plausibility,
            amateur_temperature=amateur_temperature,
        )
        if penalised is not None:
            fused = penalise_repetitions(fused, penalised, repetition_penalty)
        if processors:
            for proc in processors:
                fused = proc(seen, fused)
        tokens = next_tokens(
            fused,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            generator=generator,
        ).cpu()
        done = torch.tensor(finished)
        tokens = tokens.masked_fill(done, pad)
        if processors:
            seen = torch.cat([seen, tokens.to(device)[:, None]], dim=1)
        if penalised is not None:
            last = torch.where(done.to(device), penalised[:, -1], tokens.to(device))
            penalised = torch.cat([penalised, last[:, None]], dim=1)
        trace_tokens.append(tokens)
        trace_alpha.append(a.float().cpu().masked_fill(done, float("nan")))
        trace_expert.append(e.long().cpu().masked_fill(done, -1))
        if return_logits:
            trace_logits.append(fused.cpu().masked_fill(done[:, None], float("nan")))
        if return_diagnostics:
            stats = fusion_diagnostics(logits[0], logits[1], expert_logits, fused)
            trace_stats.append(stats.cpu().masked_fill(done[:, None], float("nan")))
        for r in range(rows):
            if finished[r]:
                continue
            tok = int(tokens[r])
            generated[r].append(tok)
            if tok in eos:
                finished[r], reasons[r] = True, "eos"
            elif stop_in_tail(tokenizer, generated[r], stops) and (
                stop_cut(tokenizer, generated[r], stops) is not None
            ):
                finished[r], reasons[r] = True, "stop"
        if all(finished) or step == max_new_tokens - 1:
            break
        logits = ensemble.step(tokens)

    texts = []
    for r in range(rows):
        text = tokenizer.decode(generated[r], skip_special_tokens=True)
        if reasons[r] == "stop":
            text = text[: stop_cut(tokenizer, generated[r], stops)]
        texts.append(text)
    return DLFOutput(
        texts=texts,
        token_ids=generated,
        sequences=torch.stack(trace_tokens, dim=1),
        alphas=torch.stack(trace_alpha, dim=1),
        experts=torch.stack(trace_expert, dim=1),
        finish_reasons=reasons,
        logits=torch.stack(trace_logits, dim=1) if return_logits else None,
        diagnostics=torch.stack(trace_stats, dim=1) if return_diagnostics else None,
    )


def _check_processors(processors) -> list | None:
    if processors is None:
        return None
    if callable(processors) and not isinstance(processors, (list, tuple)):
        processors = [processors]
    if isinstance(processors, (str, bytes)) or not isinstance(processors, Iterable):
        raise TypeError(
            f"dlf: logits_processor must be a sequence of callables, got {processors!r}"
        )
    processors = list(processors)
    for i, proc in enumerate(processors):
        if not callable(proc):
            raise TypeError(f"dlf: logits_processor[{i}] is not callable: {proc!r}")
    return processors


def _prefill(
    ensemble: Ensemble, encoded: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """Prefill every member's tokenized prompts; gather logits on the large model's device.

    Fusion happens where the large model's logits come out, which is only known after its first
    forward (``device_map`` and accelerate hooks decide it); every stream sends its logits there
    from then on.
    """
    logits = ensemble.prefill(encoded)
    device = logits[0].device
    ensemble.send_to(device)
    return [x.to(device) for x in logits]


def proxy_tuning(
    large: nn.Module,
    small_base: nn.Module,
    experts: Expert | Sequence[Expert],
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int,
    alpha: float = 1.0,
    **kwargs,
) -> DLFOutput:
    """Proxy-tuning (Liu et al., COLM 2024, arXiv 2401.08565): fixed-α logit arithmetic.

    P̃ = softmax(M_L + alpha·Σ_t (M_t − M_S)); ``alpha = 1`` with one expert is the paper's
    method (and DLF's fixed-α baseline); several experts add their shifts (DExperts-style). The
    same as ``generate(..., mode="static", alpha=alpha)``; ``kwargs`` are :func:`generate`'s
    (sampling, stop strings, expert prompts, ...).
    """
    if any(k in kwargs for k in ("mode", "alphas", "ranges", "plausibility")):
        raise TypeError("dlf: proxy_tuning is static: it takes alpha, not mode, alphas or ranges")
    return generate(
        large,
        small_base,
        experts,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        mode="static",
        alpha=alpha,
        **kwargs,
    )


def contrastive_decoding(
    expert: nn.Module,
    amateur: nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int,
    plausibility: float = 0.1,
    amateur_temperature: float = 1.0,
    **kwargs,
) -> DLFOutput:
    """Contrastive decoding (Li et al., "Contrastive Decoding: Open-ended Text Generation as
    Optimization", ACL 2023): each step scores token v by ``log p_expert(v) − log p_amateur(v)``,
    the amateur's logits divided by ``amateur_temperature``, over the plausible tokens
    ``p_expert(v) ≥ plausibility·max p_expert`` only, and picks the best (greedy; sampling with
    ``do_sample``).

    The same as ``generate(expert, amateur, [], ..., mode="contrastive")``: one KV cache per
    model, left-padded batches, stop strings; ``kwargs`` are :func:`generate`'s. This is not
    transformers' "contrastive search" (``penalty_alpha``) nor DoLa (a contrast between layers
    of one model). The paper's runs pair GPT-2 XL with GPT-2 small at amateur temperature 0.5,
    and OPT-13b with OPT-125m at 1.0, with α = 0.1. Both models must share the tokenizer.
    """
    if any(k in kwargs for k in ("mode", "alpha", "alphas", "ranges")):
        raise TypeError(
            "dlf: contrastive_decoding takes plausibility and amateur_temperature, not mode, "
            "alpha, alphas or ranges"
        )
    return generate(
        expert,
        amateur,
        [],
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        mode="contrastive",
        plausibility=plausibility,
        amateur_temperature=amateur_temperature,
        **kwargs,
    )
