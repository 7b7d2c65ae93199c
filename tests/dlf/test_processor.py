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


def test_processor_with_prompts_that_hold_their_special_tokens(setup):
    """``add_special_tokens=False``: the experts' prompt texts, which already start with
    ``<s>``, are tokenized as given, like the caller's inputs; the same run as the plain one."""
    tok, large, small, experts = setup
    held = ["<s> " + p for p in PROMPTS]
    enc = tok(held, padding=True, return_tensors="pt", add_special_tokens=False)
    assert torch.equal(
        enc["input_ids"], tok(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    )
    proc = dlf.DynamicLogitFusionProcessor(
        small,
        experts,
        tok,
        attention_mask=enc["attention_mask"],
        prompts=held,
        expert_prompts=[None, lambda p: "<s> w50 w51 " + p[len("<s> ") :]],
        add_special_tokens=False,
    )
    got = _run(large, proc, enc, do_sample=False)
    ref = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=7, expert_prompts=[None, "w50 w51 "]
    )
    assert torch.equal(got, ref.sequences)
    with pytest.raises(TypeError, match="add_special_tokens"):
        dlf.DynamicLogitFusionProcessor(small, experts, tok, add_special_tokens=0)


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


@pytest.mark.parametrize(
    ("beams", "extra"),
    [
        (2, {}),
        (3, {}),
        # Processors that run before this one and change beam search's log-probabilities (their
        # rows' log-sum-exp is no longer 0), before the first fused logits reach the beam scores.
        (2, {"repetition_penalty": 1.3}),
        (2, {"min_new_tokens": 3}),
    ],
)
def test_processor_refuses_beam_search_without_mask(setup, beams, extra):
    """Without the attention mask the row count cannot tell, and beam search's scores are not
    recognisable either once another processor changed them: the first call reads num_beams
    from generate's settings and refuses before any fused logits reach the beam scores (three
    new tokens: beam reordering alone need not be seen)."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok)
    with pytest.raises(ValueError, match=rf"beam search \(num_beams={beams}\).*num_beams=1"):
        large.generate(
            input_ids=enc["input_ids"],
            logits_processor=transformers.LogitsProcessorList([proc]),
            max_new_tokens=3,
            num_beams=beams,
            do_sample=False,
            pad_token_id=PAD,
            **extra,
        )
    assert proc.alphas.numel() == 0


class _LogSoftmax(transformers.LogitsProcessor):
    """Normalises the scores: every row's log-sum-exp becomes 0, as beam search's are."""

    def __call__(self, input_ids, scores):
        return scores.log_softmax(-1)


def test_processor_takes_normalised_scores_in_greedy_search(setup):
    """Scores normalised by an earlier processor are not beam search: softmax(M_L + α·d) does
    not change when M_L is shifted per row, so the fusion picks the same tokens."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=enc.attention_mask)
    out = large.generate(
        **enc,
        logits_processor=transformers.LogitsProcessorList([_LogSoftmax(), proc]),
        max_new_tokens=7,
        do_sample=False,
        pad_token_id=PAD,
    )
    ref = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=7)
    assert torch.equal(out[:, enc["input_ids"].shape[1] :], ref.sequences)


def test_processor_outside_generate_needs_the_batch_size(setup):
    """Called from an own loop, no generate() settings are within reach: the processor needs
    the prompt batch (attention_mask or prompts) to refuse a batch of another size."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        scores = large(**enc).logits[:, -1].float()
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok)
    with pytest.raises(ValueError, match=r"outside transformers' generate.*attention_mask="):
        proc(ids, scores)
    assert proc.alphas.numel() == 0
    # A beam-expanded batch (every row twice) against the prompt batch's mask.
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=mask)
    with pytest.raises(ValueError, match=r"runs 6 rows but attention_mask has 3.*num_beams=1"):
        proc(ids.repeat_interleave(2, 0), scores.repeat_interleave(2, 0))
    # The prompt batch itself: the first step of dlf.generate.
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=mask)
    fused = proc(ids, scores)
    ref = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=1)
    assert torch.equal(fused.argmax(-1), ref.sequences[:, 0])
    assert torch.equal(proc.alphas, ref.alphas)


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


def test_a_processor_without_a_prompt_batch_serves_each_generate_call(setup):
    # No prompts= or attention_mask= of its own: a new generate() call starts it over (the
    # second call used to fail with "the rows are not the previous call's rows").
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok)
    first = _run(large, proc, enc, do_sample=False)
    steps = proc.alphas.shape[1]
    other = tok(PROMPTS[:1], return_tensors="pt")
    alone = _run(large, proc, other, do_sample=False)
    assert proc.alphas.shape[0] == 1  # the trace is the second call's
    assert torch.equal(_run(large, proc, enc, do_sample=False), first)
    assert proc.alphas.shape == (len(PROMPTS), steps)
    fresh = dlf.DynamicLogitFusionProcessor(small, experts, tok)
    assert torch.equal(alone, _run(large, fresh, other, do_sample=False))  # as a fresh one


def test_processor_with_ranges_equals_generate(setup):
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    ranges = [(0.0, 0.4), (1.0, 2.0)]
    proc = dlf.DynamicLogitFusionProcessor(
        small, experts, tok, attention_mask=enc["attention_mask"], ranges=ranges
    )
    got = _run(large, proc, enc, do_sample=False)
    ref = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=7, ranges=ranges)
    assert torch.equal(got, ref.sequences)
    live = ~ref.alphas.isnan()
    assert torch.equal(proc.alphas[live], ref.alphas[live])
    with pytest.raises(ValueError, match=r"'ranges\[0\]'.*holds no point"):
        dlf.DynamicLogitFusionProcessor(small, experts, tok, ranges=[(3.0, 4.0), (0.0, 1.0)])


def test_processor_contrastive_equals_generate(setup):
    tok, large, small, _ = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    kw = dict(plausibility=0.2, amateur_temperature=0.5)
    proc = dlf.DynamicLogitFusionProcessor(
        small, [], tok, attention_mask=enc["attention_mask"], mode="contrastive", **kw
    )
    got = _run(large, proc, enc, do_sample=False)
    ref = dlf.contrastive_decoding(large, small, tok, PROMPTS, max_new_tokens=7, **kw)
    assert torch.equal(got, ref.sequences)
    with pytest.raises(ValueError, match="takes no experts"):
        dlf.DynamicLogitFusionProcessor(small, [small], tok, mode="contrastive")


def test_processor_reads_the_mask_generate_uses(setup):
    """No attention_mask given: inside generate() the processor reads the mask generate works
    with, so a left-padded batch decodes as with the mask (it silently read the pads as text)."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok)
    got = _run(large, proc, enc, do_sample=False)
    ref = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=7)
    assert torch.equal(got, ref.sequences)


@pytest.mark.parametrize("given", [True, False])
def test_processor_follows_num_return_sequences(setup, given):
    """generate(num_return_sequences=2) repeats every prompt row: a mask given at construction
    is repeated the same way, and without one generate's expanded mask is read."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    mask = {"attention_mask": enc["attention_mask"]} if given else {}
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, **mask)
    got = _run(large, proc, enc, do_sample=True, temperature=1e-4, top_k=0, num_return_sequences=2)
    ref = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=7)
    assert torch.equal(got[0::2], ref.sequences) and torch.equal(got[1::2], ref.sequences)


def test_processor_refuses_prompt_lookup_before_fusing(setup):
    tok, large, small, experts = setup
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=enc.attention_mask)
    with pytest.raises(ValueError, match=r"assisted decoding \(prompt_lookup_num_tokens\)"):
        _run(large, proc, enc, prompt_lookup_num_tokens=2, do_sample=False)
    assert proc.alphas.numel() == 0


def test_processor_refuses_assistant_before_fusing(setup):
    tok, large, small, experts = setup
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, attention_mask=enc.attention_mask)
    with pytest.raises(ValueError, match=r"assisted decoding \(assistant_model\)"):
        _run(large, proc, enc, assistant_model=small, do_sample=False)
    assert proc.alphas.numel() == 0


def test_processor_refuses_left_pads_without_a_mask(setup):
    """Called from an own loop with prompts= but no mask, rows that start with the pad token
    would be read as text: refused."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = large(**enc).logits[:, -1].float()
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok, prompts=PROMPTS)
    with pytest.raises(ValueError, match=r"start with the pad token.*attention_mask="):
        proc(enc["input_ids"], scores)


def test_processor_checks_its_tokenizer_and_prompts_by_name(setup):
    tok, _, small, experts = setup
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        dlf.DynamicLogitFusionProcessor(small, experts, None)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str"):
        dlf.DynamicLogitFusionProcessor(
            small, experts, tok, prompts=["a", [3, 4]], expert_prompts=[None, "x "]
        )


def test_processor_refuses_inputs_embeds(setup):
    """generate(inputs_embeds=...) passes the processors no prompt ids: refused by name, not a
    reshape error from inside a small model."""
    tok, large, small, experts = setup
    enc = tok(PROMPTS[:1], return_tensors="pt")
    embeds = large.get_input_embeddings()(enc["input_ids"])
    proc = dlf.DynamicLogitFusionProcessor(small, experts, tok)
    with pytest.raises(ValueError, match=r"inputs_embeds=, which is not supported.*input_ids="):
        large.generate(
            inputs_embeds=embeds,
            attention_mask=enc["attention_mask"],
            logits_processor=transformers.LogitsProcessorList([proc]),
            max_new_tokens=3,
            pad_token_id=PAD,
        )
