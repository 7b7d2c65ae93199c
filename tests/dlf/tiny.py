"""Tiny random Llama models sharing one word-level tokenizer, built offline (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

# Zero-padded words: no word is a substring of another, so a stop string matches whole words.
WORDS = [f"w{i:02d}" for i in range(60)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = len(SPECIAL) + len(WORDS)  # 64
PAD, BOS, EOS = 0, 1, 2


def tokenizer():
    """A word-level fast tokenizer: ``<s>`` prepended, whitespace-split words, left padding."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
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
    )


def llama(seed: int, *, hidden: int = 32, vocab: int = VOCAB, dtype=torch.float64):
    """A 2-layer LlamaForCausalLM with peaked random logits (initializer_range 0.3), in eval mode.

    float64 by default, so that paths which differ only in rounding (padding, batching, merged vs
    unmerged LoRA) give the same argmax and the same α.
    """
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def perturbed(model, seed: int, scale: float = 0.3):
    """A copy of ``model`` with every weight moved by ``scale``·N(0, σ_w²) noise: an "expert"."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.add_(scale * p.detach().std().clamp_min(1e-3) * noise)
    return out
