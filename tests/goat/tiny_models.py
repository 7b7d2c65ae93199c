"""Small models for the GOAT tests: a plain PyTorch MLP and tiny Hugging Face models built from
configs (random weights, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear(40 → 24) · GELU · Linear(24 → 36), seeded; odd sizes, m < n and m > n."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 36)).to(dtype)


def tiny_llama(seed: int = 0):
    """A 2-layer LlamaForCausalLM, hidden 32, vocabulary 96."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_roberta(seed: int = 0, num_labels: int = 3):
    """A 2-layer RobertaForSequenceClassification, hidden 48, ``num_labels`` labels."""
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return transformers.RobertaForSequenceClassification(config).eval()
