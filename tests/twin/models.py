"""Tiny models for the Twin-Merging tests: a base and experts made by perturbing it (random
weights from configs, nothing downloaded)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tests.goat.tiny_models import tiny_roberta


def perturbed(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """A copy of ``model`` with every parameter moved by ``scale``·N(0, 1): an "expert"."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
    return out


def roberta(seed: int = 0, num_labels: int = 3):
    """A 2-layer RobertaForSequenceClassification, hidden 48 (embeddings, LayerNorms, heads)."""
    return tiny_roberta(seed, num_labels)


def roberta_layers(layers: int, seed: int = 0, num_labels: int = 3):
    """:func:`roberta` with another number of layers."""
    import transformers

    config = roberta(seed, num_labels).config
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    return transformers.RobertaForSequenceClassification(config).eval()


def gpt2(seed: int = 0):
    """A 2-layer GPT2LMHeadModel, hidden 32, vocabulary 64, its output head tied to the token
    embeddings (``lm_head.weight`` is ``transformer.wte.weight``)."""
    import transformers

    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def roberta_experts(n: int = 3, labels=(3, 3, 3)):
    """A base and ``n`` experts; expert t's head has ``labels[t]`` classes."""
    base = roberta(0)
    experts = {}
    for t in range(n):
        e = perturbed(base, seed=t + 1)
        if labels[t] != base.num_labels:
            e.classifier.out_proj = nn.Linear(48, labels[t])
            torch.manual_seed(100 + t)
            nn.init.normal_(e.classifier.out_proj.weight)
            e.config.num_labels = labels[t]
        experts[f"task{t}"] = e.eval()
    return base, experts


def batch(b: int = 4, length: int = 7, seed: int = 0):
    """input_ids and an attention mask with left and right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (b, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    if b > 1:
        mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def one_hot(b: int, t: int, n: int) -> torch.Tensor:
    w = torch.zeros(b, n)
    w[:, t] = 1.0
    return w


def cache_of(out):
    """The KV cache a Hugging Face output returns (``cache`` from transformers 5 on, before it
    ``past_key_values``)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def cache_positions(cache) -> int:
    """Positions a KV cache holds: a Cache object, or a legacy tuple of per-layer (keys,
    values) that GPT-2 and Llama return on transformers 4.x."""
    if hasattr(cache, "get_seq_length"):
        return cache.get_seq_length()
    return cache[0][0].shape[-2]
