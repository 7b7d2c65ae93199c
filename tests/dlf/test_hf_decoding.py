"""meldkit.dlf.generate next to transformers' generate: logits processors, top-k, stop strings on
long rows, the EOS set, and arguments refused before any model runs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from meldkit import dlf, ops  # noqa: E402
from meldkit.dlf.generate import _eos_ids, next_tokens, stop_cut, stop_in_tail  # noqa: E402
from tests.dlf.tiny import PAD, WORDS  # noqa: E402

PROMPTS = ["w01 w02 w03 w04 w05", "w10", "w20 w21 w22"]


def test_logits_processors_act_on_the_fused_logits(models, tok):
    """With α = 0 the fused logits are the large model's: transformers' repetition penalty and
    no-repeat-n-gram processors given as logits_processor= then reproduce large.generate with
    the same settings token for token, padded batch included."""
    large, small, experts = models
    procs = [
        transformers.RepetitionPenaltyLogitsProcessor(1.3),
        transformers.NoRepeatNGramLogitsProcessor(2),
    ]
    res = dlf.generate(
        large,
        small,
        experts[:1],
        tok,
        PROMPTS,
        max_new_tokens=10,
        mode="static",
        alpha=0.0,
        logits_processor=procs,
        eos_token_id=[],
    )
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    ref = large.generate(
        **enc,
        max_new_tokens=10,
        do_sample=False,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        pad_token_id=PAD,
        eos_token_id=None,
    )[:, enc["input_ids"].shape[1] :]
    assert torch.equal(res.sequences, ref)
    plain = dlf.generate(
        large, small, experts[:1], tok, PROMPTS, max_new_tokens=10, mode="static", alpha=0.0
    )
    assert not torch.equal(plain.sequences, res.sequences)  # the processors did something


def test_logits_processor_sees_the_large_models_ids(models, tok):
    large, small, experts = models
    seen = []

    def record(input_ids, scores):
        seen.append(input_ids.clone())
        return scores

    res = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=4, logits_processor=record
    )
    prompt = tok(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    assert len(seen) == res.sequences.shape[1]
    for step, ids in enumerate(seen):
        assert torch.equal(ids, torch.cat([prompt, res.sequences[:, :step]], dim=1))


def test_generation_config_processors_are_named_in_a_warning(models, tok):
    large, small, experts = models
    large = copy.deepcopy(large)
    large.generation_config.repetition_penalty = 1.05
    with pytest.warns(UserWarning, match=r"repetition_penalty=1\.05.*logits_processor="):
        dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dlf.generate(
            large,
            small,
            experts,
            tok,
            PROMPTS,
            max_new_tokens=1,
            logits_processor=[transformers.RepetitionPenaltyLogitsProcessor(1.05)],
        )


def test_top_k_one_is_greedy(models, tok):
    large, small, experts = models
    greedy = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=6)
    sampled = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=6, do_sample=True, top_k=1, seed=3
    )
    assert torch.equal(sampled.sequences, greedy.sequences)
    a = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=6, do_sample=True, top_k=3, seed=4
    )
    b = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=6, do_sample=True, top_k=3, seed=4
    )
    assert torch.equal(a.sequences, b.sequences)


def test_next_tokens_top_k_keeps_only_the_best():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 4.5]])
    gen = torch.Generator().manual_seed(0)
    picks = {
        int(next_tokens(logits, do_sample=True, temperature=1.0, top_p=1.0, top_k=2, generator=gen))
        for _ in range(200)
    }
    assert picks == {1, 4}


class _CountingTokenizer:
    """The tiny tokenizer, counting how many token ids every decode call reads."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


def test_stop_check_reads_a_tail_not_the_whole_row(tok):
    """stop_in_tail agrees with the whole-text search on every prefix of a row (a stop found
    exactly when the full decode first holds one), and reads O(1) tokens per step: checking a
    2,000-token row step by step decodes a few tokens per step, not the whole prefix."""
    gen = torch.Generator().manual_seed(0)
    word_ids = tok.convert_tokens_to_ids(WORDS)
    row = [word_ids[int(i)] for i in torch.randint(0, 12, (2000,), generator=gen)]
    stops = ["w03 w07 w01", "w11 w11"]
    counting = _CountingTokenizer(tok)
    first = None
    for n in range(1, 300):
        if stop_in_tail(counting, row[:n], stops):
            first = n
            break
    expected = next(n for n in range(1, 300) if stop_cut(tok, row[:n], stops) is not None)
    assert first == expected
    counting.decoded = 0
    clean = [word_ids[0], word_ids[1]] * 1000  # "w00 w01 ..." holds no stop
    for n in range(1, len(clean) + 1):
        assert not stop_in_tail(counting, clean[:n], stops)
    assert counting.decoded < 60 * len(clean)  # whole-row decoding would read ~2e6 ids


def test_eos_set_includes_every_models_generation_config(models, tok):
    large, _, experts = models
    expert = copy.deepcopy(experts[0])
    expert.generation_config.eos_token_id = [7, 9]
    ids = _eos_ids(tok, {"large": large, "expert 0": expert}, None)
    assert {7, 9} <= ids and tok.eos_token_id in ids
    assert _eos_ids(tok, {"large": large, "expert 0": expert}, 5) == {5}


class _CountingModel(torch.nn.Module):
    """Wraps a model and counts its forwards: arguments must be refused before the first."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, 0
        self.config = model.config

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(alphas=[]), ValueError, "alphas is empty"),
        (dict(alphas=[0.0, float("nan")]), ValueError, "alphas must be finite"),
        (dict(alphas=["a"]), TypeError, "alphas must be floats"),
        (dict(logits_processor=[3]), TypeError, r"logits_processor\[0\]"),
        (dict(do_sample=True, top_k=0), ValueError, "top_k"),
    ],
)
def test_bad_arguments_refused_before_any_forward(models, tok, kwargs, error, match):
    large, small, experts = models
    counted = _CountingModel(large)
    with pytest.raises(error, match=match):
        dlf.generate(counted, small, experts, tok, PROMPTS, max_new_tokens=2, **kwargs)
    assert counted.calls == 0


def test_more_than_16_experts_refused_before_any_forward(models, tok):
    large, small, experts = models
    counted = _CountingModel(large)
    with pytest.raises(ValueError, match="at most 16 experts"):
        dlf.generate(counted, small, experts * 9, tok, PROMPTS, max_new_tokens=2)
    assert counted.calls == 0


def test_small_base_as_expert_needs_an_expert_prompt(models, tok):
    large, small, _ = models
    with pytest.raises(ValueError, match="expert 0 is small_base itself"):
        dlf.generate(large, small, [small], tok, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match="expert 0 is small_base itself"):
        dlf.DynamicLogitFusionProcessor(small, [small], tok)
    res = dlf.generate(
        large, small, [small], tok, PROMPTS, max_new_tokens=2, expert_prompts=["w40 w41 "]
    )
    assert res.sequences.shape == (3, 2)


def test_two_peft_models_over_one_base_are_refused(models, tok):
    peft = pytest.importorskip("peft")
    large, small, _ = models
    base = copy.deepcopy(small)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    first = peft.get_peft_model(base, cfg)
    second = peft.get_peft_model(base, cfg)
    with pytest.raises(ValueError, match="experts 0 and 1 are PeftModels over one base"):
        dlf.generate(large, small, [first, second], tok, PROMPTS, max_new_tokens=2)


def test_prompt_past_the_position_limit_warns(models, tok):
    large, small, experts = models
    short = copy.deepcopy(experts[0])
    short.config.max_position_embeddings = 6
    with pytest.warns(UserWarning, match=r"expert 0 reads prompts of up to 6 tokens.*= 6"):
        dlf.generate(large, small, [short], tok, PROMPTS, max_new_tokens=2)


class _LegacyCacheModel(torch.nn.Module):
    """A model whose forward ignores the cache it is given (as old remote code returning
    tuple caches does)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, **kwargs):  # fmt: skip
        out = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        out.past_key_values = ((torch.zeros(1),),)
        return out


def test_a_model_that_leaves_the_cache_empty_is_refused(models, tok):
    large, small, experts = models
    legacy = _LegacyCacheModel(experts[0])
    with pytest.raises(RuntimeError, match=r"did not fill the KV cache.*use_cache=False"):
        dlf.generate(large, small, [legacy], tok, PROMPTS, max_new_tokens=2)
    res = dlf.generate(large, small, [legacy], tok, PROMPTS, max_new_tokens=3, use_cache=False)
    ref = dlf.generate(large, small, experts[:1], tok, PROMPTS, max_new_tokens=3)
    assert torch.equal(res.sequences, ref.sequences)


def test_op_takes_a_numpy_alpha_grid():
    gen = torch.Generator().manual_seed(0)
    large, small = torch.randn(2, 3, 50, generator=gen)
    experts = torch.randn(2, 3, 50, generator=gen)
    grid = np.linspace(0.0, 2.0, 21)
    got = ops.logit_fusion(large, small, experts, grid)
    ref = ops.logit_fusion(large, small, experts, grid.tolist())
    assert torch.equal(got.alpha, ref.alpha) and torch.equal(got.loss, ref.loss)
    with pytest.raises(ValueError, match=r"alphas.*1-D array"):
        ops.logit_fusion(large, small, experts, grid.reshape(3, 7))


def test_stop_across_skipped_special_tokens_is_found_on_the_tail(tok):
    """Skipped special tokens between the words of a stop string make the text shorter than the
    decode that keeps them: the tail grows until both are long enough."""
    w = tok.convert_tokens_to_ids(["w01", "w02", "w03"])
    row = [w[0], w[1], *([PAD] * 5), w[2]]
    assert stop_cut(tok, row, ["w01 w02 w03"]) is not None
    assert stop_in_tail(tok, row, ["w01 w02 w03"])
