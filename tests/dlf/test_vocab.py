"""Vocabulary policy: padded embedding rows are sliced off; a smaller vocabulary is refused."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meldkit import dlf  # noqa: E402
from meldkit.dlf.streams import padding_limit  # noqa: E402
from tests.dlf.tiny import PAD, VOCAB, llama, perturbed, tokenizer  # noqa: E402

PROMPTS = ["w01 w02 w03", "w10"]


def padded(model, extra: int, seed: int):
    """``model`` with ``extra`` rows appended to its embeddings; the new lm_head rows are large,
    so that any padded logit left in the fusion would win the argmax."""
    out = llama(seed, hidden=model.config.hidden_size, vocab=VOCAB + extra)
    state = model.state_dict()
    with torch.no_grad():
        for name, p in out.state_dict().items():
            if p.shape == state[name].shape:
                p.copy_(state[name])
            else:
                p[:VOCAB].copy_(state[name])
                p[VOCAB:].mul_(30.0)
    return out


@pytest.fixture(scope="module")
def setup():
    tok = tokenizer()
    large = llama(0, hidden=48)
    small = llama(1)
    return tok, large, small, perturbed(small, 2)


def test_padded_rows_are_sliced(setup):
    tok, large, small, expert = setup
    ref = dlf.generate(large, small, expert, tok, PROMPTS, max_new_tokens=6, return_logits=True)
    got = dlf.generate(
        padded(large, 8, 10),
        padded(small, 64, 11),
        padded(expert, 3, 12),
        tok,
        PROMPTS,
        max_new_tokens=6,
        return_logits=True,
    )
    assert got.logits.shape[-1] == len(tok) == VOCAB
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.alphas, ref.alphas)


def test_padded_rows_in_the_processor(setup):
    tok, large, small, expert = setup
    big = padded(large, 8, 10)
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(
        padded(small, 5, 11), expert, tok, attention_mask=enc["attention_mask"]
    )
    out = big.generate(
        **enc,
        logits_processor=transformers.LogitsProcessorList([proc]),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=PAD,
        output_scores=True,
        return_dict_in_generate=True,
    )
    ref = dlf.generate(large, small, expert, tok, PROMPTS, max_new_tokens=6)
    assert torch.equal(out.sequences[:, enc["input_ids"].shape[1] :], ref.sequences)
    for scores in out.scores:
        assert scores.shape[-1] == VOCAB + 8
        assert scores[:, VOCAB:].isneginf().all()


def _generate_with_processor(large, small, expert, tok):
    """``large.generate`` on PROMPTS with a DLF processor over ``small`` and ``expert``."""
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(small, expert, tok, attention_mask=enc.attention_mask)
    return large.generate(
        **enc,
        logits_processor=transformers.LogitsProcessorList([proc]),
        max_new_tokens=2,
        pad_token_id=PAD,
    )


def test_smaller_vocabulary_is_refused(setup):
    tok, large, small, expert = setup
    short = llama(4, vocab=VOCAB - 4)
    with pytest.raises(ValueError, match=rf"expert 0 has vocabulary size {VOCAB - 4}.*{VOCAB}"):
        dlf.generate(large, small, short, tok, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"large has vocabulary size {VOCAB - 4}.*{VOCAB}"):
        dlf.generate(short, small, expert, tok, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"small_base has vocabulary size {VOCAB - 4}"):
        dlf.DynamicLogitFusionProcessor(short, expert, tok)
    # The large model of a processor is only seen through its scores.
    with pytest.raises(ValueError, match=rf"vocabulary size {VOCAB - 4}.*{VOCAB}"):
        _generate_with_processor(short, small, expert, tok)


def test_a_larger_trained_vocabulary_is_refused(setup):
    """5000 logits for 64 tokens is another vocabulary, not padding (at most 128 + 64 // 32)."""
    tok, large, small, expert = setup
    other = llama(5, hidden=48, vocab=5000)
    with pytest.raises(ValueError, match=r"large has vocabulary size 5000.*tokenizer has 64.*130"):
        dlf.generate(other, small, expert, tok, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"expert 0 has vocabulary size 5000"):
        dlf.DynamicLogitFusionProcessor(small, other, tok)
    # the large model of a processor, seen through its scores
    with pytest.raises(ValueError, match=r"large model has vocabulary size 5000.*64"):
        _generate_with_processor(other, small, expert, tok)
    # a config that claims another vocabulary, and special tokens outside the tokenizer
    claims = llama(6)
    claims.config.vocab_size = 5000
    with pytest.raises(ValueError, match=r"small_base's config has vocabulary size 5000"):
        dlf.generate(large, claims, expert, tok, PROMPTS, max_new_tokens=2)
    eos = llama(7)
    eos.config.eos_token_id = [2, 4999]
    with pytest.raises(ValueError, match=r"expert 0's config has eos_token_id 4999.*64 tokens"):
        dlf.generate(large, small, eos, tok, PROMPTS, max_new_tokens=2)


def test_padding_limit():
    # padded families: CodeLlama, Phi-3, Qwen2.5 (0.5B and 72B), Phi-2, DeepSeek-LLM
    for tokens, rows in [
        (32000, 32016),
        (32011, 32064),
        (151665, 151936),
        (151665, 152064),
        (50295, 51200),
        (100015, 102400),
    ]:
        assert tokens <= rows <= padding_limit(tokens)
    assert padding_limit(64) == 130


def test_tiny_tokenizer_gives_what_llama_takes():
    """The tiny word tokenizer returns only ``input_ids`` and ``attention_mask`` (transformers
    4.x would add ``token_type_ids``, which Llama's forward rejects), ``<s>`` first, left
    padding, and decodes back to the words."""
    tok = tokenizer()
    batch = tok(["w01 w02 w03", "w04"], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"][1].tolist()[:2] == [PAD, PAD]
    assert batch["attention_mask"][1].tolist() == [0, 0, 1, 1]
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "w01 w02 w03"


def _word_tokenizer(words, pre_tokenizer=None):
    from meldkit.dlf._tiny import word_tokenizer

    tok = word_tokenizer(words)
    if pre_tokenizer is not None:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizer
    return tok


def test_the_models_tokenizers_are_checked(setup):
    """tokenizers=: the models' own tokenizers must equal the one decoding runs with; an equal
    copy passes (and changes nothing), one with two tokens swapped, an extra token, or another
    pre-tokenizer is refused before any model runs, naming it."""
    import tokenizers

    from tests.dlf.tiny import WORDS

    tok, large, small, expert = setup
    kw = dict(max_new_tokens=4)
    plain = dlf.generate(large, small, expert, tok, PROMPTS, **kw)
    same = _word_tokenizer(WORDS)
    checked = dlf.generate(large, small, expert, tok, PROMPTS, tokenizers=[same, None, tok], **kw)
    assert torch.equal(checked.sequences, plain.sequences)
    swapped = list(WORDS)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    cases = [
        ([same, _word_tokenizer(swapped)], rf"tokenizers\[1\] maps token '{WORDS[3]}' to"),
        ([_word_tokenizer([*WORDS, "extra"])], r"tokenizers\[0\] has \d+ tokens, the tokenizer"),
        (
            [_word_tokenizer(WORDS, tokenizers.pre_tokenizers.Whitespace())],
            r"tokenizers\[0\] splits text differently",
        ),
    ]
    for others, match in cases:
        with pytest.raises(ValueError, match=match):
            dlf.generate(large, small, expert, tok, PROMPTS, tokenizers=others, **kw)
        with pytest.raises(ValueError, match=match):
            dlf.DynamicLogitFusionProcessor(small, expert, tok, tokenizers=others)
    with pytest.raises(TypeError, match="tokenizers must be a list"):
        dlf.generate(large, small, expert, tok, PROMPTS, tokenizers=same, **kw)
