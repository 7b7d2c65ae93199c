"""Models dispatched by accelerate with offloading: the input embedding's weight is on ``meta``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from meldkit import dlf  # noqa: E402
from meldkit.dlf.streams import input_device  # noqa: E402
from tests.dlf.tiny import llama, perturbed, tokenizer  # noqa: E402

PROMPTS = ["w01 w02", "w10"]


def test_generate_with_an_offloaded_embedding(tmp_path):
    tok = tokenizer()
    large = llama(0, hidden=48, dtype=torch.float32)
    small = llama(1, dtype=torch.float32)
    expert = perturbed(small, 2)
    large.save_pretrained(tmp_path / "large")
    device_map = {
        "model.embed_tokens": "disk",
        "model.layers": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "large", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    assert input_device(offloaded) == torch.device("cpu")
    ref = dlf.generate(large, small, expert, tok, PROMPTS, max_new_tokens=4)
    got = dlf.generate(offloaded, small, expert, tok, PROMPTS, max_new_tokens=4)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(got.alphas, ref.alphas, rtol=0, atol=0, equal_nan=True)


def test_input_device_reads_the_device_map_without_a_hook():
    model = llama(3, dtype=torch.float32)
    model.model.embed_tokens.to("meta")
    model.hf_device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "lm_head": "cpu"}
    assert input_device(model) == torch.device("cpu")
    model.hf_device_map = {"model": 0, "lm_head": "cpu"}
    assert input_device(model) == torch.device("cuda:0")
