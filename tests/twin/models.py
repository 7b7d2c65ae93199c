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


def llama_classifier(num_labels: int = 3, seed: int = 0):
    """A 2-layer LlamaForSequenceClassification, hidden 32: its head is ``score``, without a
    bias."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(config).eval()


def llama_classifier_experts(labels=(3, 5, 7)):
    """A Llama classifier base and one expert per entry of ``labels``, each with a bias-less
    ``score`` head of that many classes."""
    base = llama_classifier(labels[0])
    experts = {}
    for t, n in enumerate(labels):
        e = perturbed(base, seed=t + 1)
        e.score = nn.Linear(32, n, bias=False)
        with torch.no_grad():
            e.score.weight.normal_(generator=torch.Generator().manual_seed(50 + t))
        e.config.num_labels = n
        experts[f"task{t}"] = e.eval()
    return base, experts


def run_in_threads(call, wants, calls: int = 20) -> tuple[int, list[str]]:
    """Run ``call(t)`` ``calls`` times in each of ``len(wants)`` threads at once: (how many
    outputs differ from ``wants[t]``, the errors raised)."""
    import threading

    wrong, errors = [], []
    start = threading.Barrier(len(wants))

    def worker(t):
        start.wait()
        for _ in range(calls):
            try:
                with torch.no_grad():
                    got = call(t)
                if not torch.allclose(got, wants[t], rtol=1e-5, atol=1e-5):
                    wrong.append(t)
            except Exception as e:  # reported by the caller
                errors.append(repr(e)[:200])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(wants))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(wrong), errors


def bart_classifier(seed: int = 0):
    """A 1+1-layer BartForSequenceClassification, d_model 32: its head is
    ``classification_head``, its output has no ``hidden_states`` (an encoder-decoder's)."""
    import transformers

    config = transformers.BartConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return transformers.BartForSequenceClassification(config).eval()
