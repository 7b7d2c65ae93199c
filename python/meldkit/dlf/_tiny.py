"""Tiny random Llama models and a word-level tokenizer, built offline from configs.

Shared by ``meldkit demo`` (when no real model is installed), the DLF tests and
``bench/bench_logit_fusion.py``: nothing is downloaded. Needs ``transformers`` (and its
``tokenizers``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS = 0, 1, 2


def word_tokenizer(words: Sequence[str]):
    """A fast tokenizer over ``SPECIAL + words``: ``<s>`` prepended, whitespace-split words,
    decoded joined by spaces, left padding (for batched generation)."""
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate((*SPECIAL, *words))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        # transformers 4.x adds token_type_ids by default, which Llama's forward rejects.
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,  # 5.x's default; 4.x warns when it is not given
    )


def tiny_llama(
    seed: int,
    *,
    vocab: int,
    hidden: int,
    layers: int = 2,
    intermediate: int | None = None,
    max_positions: int = 128,
    initializer_range: float = 0.3,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    fork_rng: bool = True,
):
    """A random ``LlamaForCausalLM`` (4 heads, 2 KV heads, untied embeddings) in eval mode.

    The default ``initializer_range`` 0.3 gives peaked logits (distinct argmaxes); float64 by
    default, so that paths which differ only in rounding give the same tokens. Weights come from
    ``torch.manual_seed(seed)``; with ``fork_rng`` the caller's random state is left alone.
    ``intermediate`` defaults to ``2 * hidden``.
    """
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[], enabled=fork_rng):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
