"""Small Llama-shaped checkpoints written to disk: for the demo, the tests and the benchmarks
(nothing is downloaded). Real safetensors files, sharded on request, with a ``config.json``
that Hugging Face tools (and mergekit) recognise."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple]:
    """Tensor names and shapes of a ``LlamaForCausalLM`` (untied head, full-width k/v)."""
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, heads: int) -> dict:
    """The matching ``config.json``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Standard-normal float32 tensors of ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def sparse_finetune(
    base: dict[str, torch.Tensor], seed: int, fraction: float = 0.3, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    """A fine-tune made by perturbing a random ``fraction`` of each floating tensor's entries."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        mask = torch.rand(v.shape, generator=g) < fraction
        out[k] = (v.float() + mask * scale * torch.randn(v.shape, generator=g)).to(v.dtype)
    return out


def write_checkpoint(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    config: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``state`` as a Hugging Face model folder: ``model.safetensors``, or ``shards`` files
    with ``model.safetensors.index.json``; plus ``config.json`` and an empty tokenizer config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    (folder / "config.json").write_text(json.dumps(config or {}))
    (folder / "tokenizer_config.json").write_text("{}")
    names = list(state)
    if shards <= 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder
