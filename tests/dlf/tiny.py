"""Tiny random Llama models sharing one word-level tokenizer, built offline (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from meldkit.dlf._tiny import BOS, EOS, PAD, SPECIAL  # noqa: F401  (re-exported for the tests)

# Zero-padded words: no word is a substring of another, so a stop string matches whole words.
WORDS = [f"w{i:02d}" for i in range(60)]
VOCAB = len(SPECIAL) + len(WORDS)  # 64


def tokenizer():
    """A word-level fast tokenizer: ``<s>`` prepended, whitespace-split words, left padding."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from meldkit.dlf._tiny import word_tokenizer

    return word_tokenizer(WORDS)


def llama(seed: int, *, hidden: int = 32, vocab: int = VOCAB, dtype=torch.float64):
    """A 2-layer LlamaForCausalLM with peaked random logits (initializer_range 0.3), in eval mode.

    float64 by default, so that paths which differ only in rounding (padding, batching, merged vs
    unmerged LoRA) give the same argmax and the same α. Seeds torch's global generator.
    """
    pytest.importorskip("transformers")
    from meldkit.dlf._tiny import tiny_llama

    return tiny_llama(seed, vocab=vocab, hidden=hidden, dtype=dtype, fork_rng=False)


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
