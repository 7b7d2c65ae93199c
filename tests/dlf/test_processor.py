"""DynamicLogitFusionProcessor inside large.generate(): same tokens as meldkit.dlf.generate."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meldkit import dlf  # noqa: E402
from tests.dlf.tiny import PAD, llama, perturbed, tokenizer  # noqa: E402

PROMPTS = ["w01 w02 w03 w04 w05", "w10", "w20 w21 w22"]


@pytest.fixture(scope="module")
def setup():
    tok = tokenizer()
    large = llama(0, hidden=48)
    small = llama(1)
    return tok, large, small, [perturbed(small, 2), perturbed(small, 3)]


def _run(large, proc, enc, **kw):
    out = large.generate(
        **enc,
        logits_processor=transformers.LogitsProcessorList([proc]),
        max_new_tokens=7,
        pad_token_id=PAD,
        **kw,
    )
    return out[:, enc["input_ids"].shape[1] :]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_processor_equals_generate_greedy(setup, mode):
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(
        small, experts, tok, attention_mask=enc["attention_mask"], mode=mode, alpha=0.8
    )
    got = _run(large, proc, enc, do_sample=False)
    kw = {"alpha": 0.8} if mode == "static" else {}
    ref = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=7, mode=mode, **kw)
    assert torch.equal(got, ref.sequences)
    steps = ref.sequences.shape[1]
    assert proc.alphas.shape == (len(PROMPTS), steps)
    live = ~ref.alphas.isnan()
    assert torch.equal(proc.alphas[live], ref.alphas[live])
    assert torch.equal(proc.experts[live], ref.experts[live])


def test_processor_with_expert_prompts(setup):
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    prompts = [None, "w50 w51 "]
    proc = dlf.DynamicLogitFusionProcessor(
        small,
        experts,
        tok,
        attention_mask=enc["attention_mask"],
        prompts=PROMPTS,
        expert_prompts=prompts,
    )
    got = _run(large, proc, enc, do_sample=False)
    ref = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=7, expert_prompts=prompts
    )
    assert torch.equal(got, ref.sequences)


def test_processor_sampling_fuses_before_warpers(setup):
    """Temperature → 0 applied by generate's warper after the processor gives greedy DLF."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=enc.attention_mask)
    torch.manual_seed(0)
    got = _run(large, proc, enc, do_sample=True, temperature=1e-4, top_k=0)
    ref = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=7)
    assert torch.equal(got, ref.sequences)


def test_processor_refuses_beam_search(setup):
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=enc.attention_mask)
    with pytest.raises(ValueError, match=r"beam search.*num_beams=1"):
        _run(large, proc, enc, num_beams=2, do_sample=False)


@pytest.mark.parametrize("beams", [2, 3])
def test_processor_refuses_beam_search_without_mask(setup, beams):
    """Without the attention mask the row count cannot tell: beam search hands its processors
    log-probabilities, and the first call refuses them before any fused logits reach the beam
    scores (two new tokens: beam reordering alone would never be seen)."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok)
    with pytest.raises(ValueError, match=r"beam search.*num_beams=1"):
        large.generate(
            input_ids=enc["input_ids"],
            logits_processor=transformers.LogitsProcessorList([proc]),
            max_new_tokens=2,
            num_beams=beams,
            do_sample=False,
            pad_token_id=PAD,
        )
    assert proc.alphas.numel() == 0


def test_processor_refuses_assisted_decoding(setup):
    tok, large, small, experts = setup
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=enc.attention_mask)
    with pytest.raises(ValueError, match="assistant_model"):
        _run(large, proc, enc, assistant_model=small, do_sample=False)


def test_processor_reuse_needs_reset(setup):
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=enc.attention_mask)
    first = _run(large, proc, enc, do_sample=False)
    with pytest.raises(ValueError, match="reset"):
        _run(large, proc, enc, do_sample=False)
    proc.reset()
    assert torch.equal(_run(large, proc, enc, do_sample=False), first)
