"""DLF as a ``transformers`` ``LogitsProcessor``, for callers of ``large.generate(...)``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from meldkit.dlf.fusion import check_mode, check_ranges, fuse_logits
from meldkit.dlf.generate import (
    Expert,
    ExpertPrompt,
    alpha_list,
    expert_texts,
    fusion_members,
    prompt_list,
)
from meldkit.dlf.streams import (
    Ensemble,
    check_materialized,
    check_tokenizer,
    check_tokenizers,
    check_vocab_width,
    common_vocab_size,
    tokenize,
)
from meldkit.ops.logit_fusion import MAX_EXPERTS

try:
    from transformers import LogitsProcessor as _LogitsProcessor
except ImportError:  # the processor is only useful with transformers; keep meldkit.dlf importable
    _LogitsProcessor = object

_DECODING_HINT = (
    "DynamicLogitFusionProcessor keeps KV caches of the small models that follow the rows of "
    "one greedy or sampled generation: use it with num_beams=1, no assistant_model / "
    "prompt_lookup_num_tokens, and a fresh processor (or reset()) per generate() call when it "
    "was given prompts= or attention_mask= (those belong to one prompt batch)"
)


class DynamicLogitFusionProcessor(_LogitsProcessor):
    """Replace the large model's next-token scores with DLF (or fixed-α) fused logits.

    Tier-1 integration: ``large.generate(**inputs, logits_processor=LogitsProcessorList([proc]))``.
    The processor owns the small base and expert models and one KV cache per model (a PEFT small
    base and its adapters share one mixed-batch forward). On its first call it prefills them with
    the prompt; on every later call it feeds only the newest token, reads their logits and returns
    M_L + α·(M_t − M_S), with M_L the incoming scores (after any processors that ran before it;
    temperature and top-p warpers run after it, so they act on the fused logits, as DLF requires).
    The per-step (α, expert) trace is kept in :attr:`alphas` and :attr:`experts`.

    Parameters
    ----------
    small_base, experts, tokenizer
        As in :func:`meldkit.dlf.generate`.
    attention_mask : torch.Tensor, optional
        ``[B, L]`` attention mask of the prompt batch passed to ``generate`` (left padding).
        Inside ``generate`` it may be left out: the processor then reads the mask ``generate``
        works with (the caller's, or the one ``generate`` made from the pad token). A mask
        given here follows ``num_return_sequences`` (each row repeated, as ``generate`` does).
        Needed, or ``prompts``, when the processor is called outside ``generate`` (see Notes);
        with neither, rows that start with the pad token are refused.
    mode, alpha, alphas, ranges, plausibility, amateur_temperature, adapter_batching, tokenizers
        As in :func:`meldkit.dlf.generate` (``mode="contrastive"`` with ``experts=[]``: the
        generating model is contrastive decoding's expert, ``small_base`` its amateur).
    prompts : sequence of str, optional
        The B prompt texts; needed only with ``expert_prompts``.
    expert_prompts : sequence of (str, callable or None), optional
        Per-expert prompts, as in :func:`meldkit.dlf.generate`.
    add_special_tokens : bool
        How the experts' prompt texts are tokenized, as in :func:`meldkit.dlf.generate`
        (``False`` for chat-template texts; tokenize the caller's own inputs the same way).

    Notes
    -----
    Only greedy search and sampling with ``num_beams=1`` work: beam search reorders rows and
    ranks them by summed scores that fused logits are not (they are not log-probabilities), and
    assisted decoding verifies several tokens and rolls back; the processor's caches cannot
    follow either. The first call refuses beam search and assisted decoding (``ValueError``)
    from the settings of the ``generate`` call that runs it: its ``GenerationConfig``, read
    from the caller's frames (``generation_config``, as ``generate`` and its decoding loops
    name it), whatever processors ran before this one. With ``attention_mask`` or ``prompts``
    given it also refuses a batch of another size than theirs (beam search expands the batch;
    ``num_return_sequences`` is followed). When no ``GenerationConfig`` is found (the
    processor called from an own loop, or a ``generate`` that names it otherwise), the batch
    size is the only check left, so ``attention_mask`` or ``prompts`` must then be given
    (``ValueError`` otherwise). Every later call checks that the rows are the previous call's
    rows plus one token (assisted decoding and prompt lookup add several, or roll back) and
    raises ``ValueError`` otherwise. Use one processor per ``generate`` call, or call
    :meth:`reset`.
    ``generate(inputs_embeds=...)`` is refused (``ValueError``): it passes the processors no
    prompt ids, and the small models need them.

    The processors ``generate`` builds from its settings (``repetition_penalty``,
    ``no_repeat_ngram_size``, ...) run before this one when they are not warpers: they shape
    M_L only, the expert shift α·(M_t − M_S) is added unpenalised, and the solver's P is the
    penalised distribution. To apply such processors to the fused logits instead (as
    proxy-tuning does), use :func:`meldkit.dlf.generate` with ``repetition_penalty=`` or
    ``logits_processor=``.
    For speed (the large and small forwards batched and fused with sampling), prefer
    :func:`meldkit.dlf.generate`.
    """

    def __init__(
        self,
        small_base: nn.Module,
        experts: Expert | Sequence[Expert],
        tokenizer,
        *,
        attention_mask: torch.Tensor | None = None,
        mode: str = "dynamic",
        alpha: float = 1.0,
        alphas: torch.Tensor | Sequence[float] | None = None,
        ranges: Sequence[tuple[float, float]] | tuple[float, float] | None = None,
        plausibility: float | None = None,
        amateur_temperature: float | None = None,
        prompts: Sequence[str] | None = None,
        expert_prompts: Sequence[ExpertPrompt] | None = None,
        add_special_tokens: bool = True,
        adapter_batching: bool = True,
        tokenizers=None,
    ) -> None:
        check_mode(mode, alpha, alphas, ranges, plausibility, amateur_temperature)
        experts = [experts] if isinstance(experts, (nn.Module, str)) else list(experts)
        if mode == "contrastive" and experts:
            raise ValueError(
                "dlf: contrastive decoding contrasts the generating model (the expert) with "
                "small_base (the amateur) and takes no experts: pass experts=[]"
            )
        if not experts and mode != "contrastive":
            raise ValueError("dlf: at least one expert is needed")
        self.plausibility, self.amateur_temperature = plausibility, amateur_temperature
        check_tokenizer(tokenizer)
        self._members = fusion_members(small_base, experts, expert_prompts)
        models = {"small_base": small_base}
        models.update({f"expert {t}": m.model for t, m in enumerate(self._members[1:])})
        check_materialized(models)
        self.vocab_size = common_vocab_size(tokenizer, models)
        if expert_prompts is not None and prompts is None:
            raise ValueError("dlf: expert_prompts needs prompts= (the texts of the prompt batch)")
        self._prompts = prompt_list(prompts) if prompts is not None else None
        self._expert_texts = (
            expert_texts(self._prompts, expert_prompts, len(experts))
            if self._prompts is not None
            else [None] * len(experts)
        )
        self.tokenizer = tokenizer
        if not isinstance(add_special_tokens, bool):
            raise TypeError(f"dlf: add_special_tokens must be a bool, got {add_special_tokens!r}")
        self.add_special_tokens = add_special_tokens
        self.attention_mask = attention_mask
        self.mode, self.alpha = mode, alpha
        self._alphas_grid = alpha_list(alphas)
        self._ranges = check_ranges(ranges, len(experts), self._alphas_grid)
        if mode == "dynamic" and len(experts) > MAX_EXPERTS:
            raise ValueError(
                f"dlf: dynamic mode searches at most {MAX_EXPERTS} experts per step, got "
                f"{len(experts)}"
            )
        check_tokenizers(tokenizer, tokenizers)
        self.adapter_batching = adapter_batching
        self.reset()

    def _continues(self, input_ids: torch.Tensor) -> bool:
        """Whether ``input_ids`` are the previous call's rows plus one token."""
        prev = self._prev
        return input_ids.shape == (prev.shape[0], prev.shape[1] + 1) and torch.equal(
            input_ids[:, :-1], prev
        )

    def reset(self) -> None:
        """Forget the caches and the trace, to serve another ``generate`` call (done by itself
        when a new ``generate`` call starts, unless the processor was given ``prompts`` or
        ``attention_mask``, which belong to one prompt batch, or the new call's prompt is the
        previous call's output: that continues the caches and the trace, as one generation
        would; call it to count such a call's steps on their own)."""
        self._ensemble: Ensemble | None = None
        self._prev: torch.Tensor | None = None
        self._config: object | None = None  # the GenerationConfig of the generate() call served
        self._trace_alpha: list[torch.Tensor] = []
        self._trace_expert: list[torch.Tensor] = []

    @property
    def alphas(self) -> torch.Tensor:
        """``[B, steps]`` float32: α chosen at every call so far (rows past EOS included)."""
        return _stack(self._trace_alpha, torch.float32)

    @property
    def experts(self) -> torch.Tensor:
        """``[B, steps]`` int64: expert chosen at every call so far (see ``DLFOutput.experts``)."""
        return _stack(self._trace_expert, torch.long)

    def _refuse_beam_search(self, context: _GenerateContext) -> None:
        """Raise ``ValueError`` when the calling ``generate`` runs beam search or assisted
        decoding, or when it cannot be told and the batch size is not known either (see the
        class Notes)."""
        config = context.config
        if config is not None:
            beams = getattr(config, "num_beams", None) or 1
            if beams > 1:
                raise ValueError(
                    f"dlf: generate() is running beam search (num_beams={beams}): {_DECODING_HINT}"
                )
            lookup = getattr(config, "prompt_lookup_num_tokens", None)
            if context.assistant or lookup:
                what = "assistant_model" if context.assistant else "prompt_lookup_num_tokens"
                raise ValueError(
                    f"dlf: generate() is running assisted decoding ({what}): {_DECODING_HINT}"
                )
        elif self.attention_mask is None and self._prompts is None:
            raise ValueError(
                "dlf: DynamicLogitFusionProcessor is called outside transformers' generate() "
                "(no generation_config found in its callers), so it cannot tell beam search or "
                "an expanded batch from a plain one: pass attention_mask= (the prompt batch's "
                "mask; torch.ones_like(input_ids) for unpadded prompts) or prompts= when "
                "constructing it"
            )

    def _start(
        self, input_ids: torch.Tensor, device: torch.device, context: _GenerateContext
    ) -> list[torch.Tensor]:
        rows, length = input_ids.shape
        # generate(num_return_sequences=k) repeats every prompt row k times (repeat_interleave):
        # the prompt batch given at construction follows it.
        copies = max(int(getattr(context.config, "num_return_sequences", None) or 1), 1)
        mask = self.attention_mask
        if mask is None:
            mask = context.attention_mask
            if mask is None:
                self._check_unpadded(input_ids)
                mask = torch.ones_like(input_ids)
        else:
            if copies > 1 and mask.shape[0] * copies == rows:
                mask = mask.repeat_interleave(copies, 0)
            if mask.shape[0] != rows:
                raise ValueError(
                    f"dlf: generate() runs {rows} rows but attention_mask has {mask.shape[0]}: "
                    f"{_DECODING_HINT}"
                )
            if mask.shape[1] != length:
                raise ValueError(
                    f"dlf: attention_mask has length {mask.shape[1]} but the prompt has {length} "
                    "tokens; pass the attention mask of the inputs given to generate()"
                )
        expert_texts = self._expert_texts
        if self._prompts is not None:
            given = len(self._prompts)
            if copies > 1 and given * copies == rows:
                expert_texts = [
                    None if t is None else [x for x in t for _ in range(copies)]
                    for t in expert_texts
                ]
            elif given != rows:
                raise ValueError(
                    f"dlf: generate() runs {rows} rows but {given} prompts were given: "
                    f"{_DECODING_HINT}"
                )
        plain = (input_ids, mask.to(input_ids.device))
        prompts = [plain]
        for texts in expert_texts:
            prompts.append(
                plain if texts is None else tokenize(self.tokenizer, texts, self.add_special_tokens)
            )
        self._ensemble = Ensemble(
            self._members,
            vocab_size=self.vocab_size,
            out_device=device,
            adapter_batching=self.adapter_batching,
        )
        return self._ensemble.prefill(prompts)

    def _check_unpadded(self, input_ids: torch.Tensor) -> None:
        """With no attention mask anywhere, the prompt is taken as unpadded: refuse rows that
        start with the pad token (left padding), which the small models would read as text."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None or pad in (
            getattr(self.tokenizer, "bos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),  # GPT-2 style: EOS may start a row
        ):
            return
        if input_ids.shape[1] and bool((input_ids[:, 0] == pad).any()):
            raise ValueError(
                f"dlf: the prompt rows start with the pad token ({pad}) but no attention mask "
                "was found: pass attention_mask= (the mask of the inputs given to generate()) "
                "when constructing DynamicLogitFusionProcessor, or call generate() with it"
            )

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """Fuse one step.

        Parameters
        ----------
        input_ids : torch.LongTensor
            ``[B, L]`` the prompt and the tokens generated so far.
        scores : torch.Tensor
            ``[B, V_large]`` the large model's next-token scores (V_large ≥ ``len(tokenizer)``).

        Returns
        -------
        torch.Tensor
            ``[B, V_large]`` fused logits in ``scores``' dtype; columns past ``len(tokenizer)``
            (padded embedding rows) are −inf.
        """
        # One comparison of the rows per step (a synchronisation on CUDA).
        continues = self._prev is not None and self._continues(input_ids)
        if self._prev is not None and not continues:
            # Another generate() call (generate copies its GenerationConfig per call): start
            # over, as a fresh processor would, unless the processor holds one batch's prompts.
            context = _generate_context(input_ids)
            fresh = context.config is not None and context.config is not self._config
            if fresh and self._prompts is None and self.attention_mask is None:
                self.reset()
        if self._prev is None and input_ids.shape[1] == 0:
            # generate(inputs_embeds=...) of a decoder-only model passes the processors the
            # generated ids only: there is no prompt for the small models to read.
            raise ValueError(
                f"dlf: DynamicLogitFusionProcessor got no prompt ids (input_ids of shape "
                f"{tuple(input_ids.shape)}): generate() was called with inputs_embeds=, which "
                "is not supported (the small models read the prompt's token ids): call "
                "generate() with input_ids= instead"
            )
        if self._prev is None:
            # The large model is seen only through its scores: its vocabulary is checked here.
            check_vocab_width("the large model", scores.shape[-1], self.vocab_size)
            context = _generate_context(input_ids)
            self._refuse_beam_search(context)
            small = self._start(input_ids, scores.device, context)
            self._config = context.config
        else:
            prev = self._prev
            if not continues:
                raise ValueError(
                    f"dlf: the rows are not the previous call's rows plus one token (shape "
                    f"{tuple(prev.shape)} then {tuple(input_ids.shape)}): {_DECODING_HINT}"
                )
            small = self._ensemble.step(input_ids[:, -1])
        self._prev = input_ids.clone()
        fused, a, e = fuse_logits(
            scores[:, : self.vocab_size],
            small[0],
            torch.stack(small[1:]) if len(small) > 1 else None,
            mode=self.mode,
            alpha=self.alpha,
            alphas=self._alphas_grid,
            ranges=self._ranges,
            plausibility=self.plausibility,
            amateur_temperature=self.amateur_temperature,
        )
        self._trace_alpha.append(a)
        self._trace_expert.append(e)
        out = torch.full_like(scores, float("-inf"))
        out[:, : self.vocab_size] = fused.to(scores.dtype)
        return out


class _GenerateContext(NamedTuple):
    config: object | None  # the GenerationConfig of the calling generate(), or None
    attention_mask: torch.Tensor | None  # the prompt rows' mask generate() works with
    assistant: bool  # generate() was given an assistant_model


def _generate_context(input_ids: torch.Tensor) -> _GenerateContext:
    """What the ``generate`` call running this processor was asked to do.

    ``generate`` and its decoding loops (``_sample``, ``_beam_search``, ``_assisted_decoding``;
    checked on transformers 4.44-5.24) hold their settings in a local named
    ``generation_config``, with the caller's keyword arguments (``num_beams=...``) applied, and
    the model inputs in ``model_kwargs`` (its ``attention_mask`` already expanded for
    ``num_return_sequences``, and one column longer than the prompt at the first call, since
    the decoding loop extends it before running the processors). ``generate`` itself has the
    ``assistant_model`` argument. These are the only places the decoding mode and the padding
    can be read from: ``LogitsProcessorList`` passes a processor nothing but the ids and the
    scores. Every field is None (False) when no frame of the stack holds it (an own loop).
    """
    try:
        from transformers import GenerationConfig
    except ImportError:
        return _GenerateContext(None, None, False)
    config = mask = None
    assistant = False
    rows, length = input_ids.shape
    frame = inspect.currentframe()
    try:
        # The whole stack (once per generate call): wrappers may add any number of frames.
        while frame is not None:
            local = frame.f_locals
            found = local.get("generation_config")
            if config is None and isinstance(found, GenerationConfig):
                config = found
            kwargs = local.get("model_kwargs")
            owner = getattr(local.get("self"), "config", None)
            if getattr(owner, "is_encoder_decoder", False):
                kwargs = None  # its attention_mask is the encoder's, not the decoder rows'
            if config is not None and mask is None and isinstance(kwargs, dict):
                m = kwargs.get("attention_mask")
                if isinstance(m, torch.Tensor) and m.dim() == 2 and m.shape[0] == rows:
                    if m.shape[1] >= length:
                        mask = m[:, :length]
            if local.get("assistant_model") is not None and "generation_config" in local:
                assistant = True
            frame = frame.f_back
        return _GenerateContext(config, mask, assistant)
    finally:
        del frame  # a frame reference kept alive would keep every local of the stack alive


def _stack(steps: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if not steps:
        return torch.empty((0, 0), dtype=dtype)
    return torch.stack([s.cpu() for s in steps], dim=1).to(dtype)
