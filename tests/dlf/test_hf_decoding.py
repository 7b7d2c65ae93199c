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
from tests.dlf.tiny import EOS, PAD, WORDS  # noqa: E402

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


def _eos_padded(tok):
    """The tiny tokenizer with the EOS token as its pad token (as GPT-2, SmolLM2 and Llama-3
    setups pad)."""
    out = copy.deepcopy(tok)
    out.pad_token = out.eos_token
    assert out.pad_token_id == EOS
    return out


def test_repetition_penalty_ignores_left_padding(models, tok):
    """repetition_penalty= penalises each row's own tokens only: with the pad token = EOS, a
    short prompt batched with longer ones decodes (ids and fused logits) as it does alone,
    where a RepetitionPenaltyLogitsProcessor sees the padding and penalises EOS."""
    large, small, experts = models
    eos_pad = _eos_padded(tok)
    prompts = ["w10", "w01 w02 w03 w04 w05 w06 w07 w08 w09 w11 w12", "w20 w21 w22"]
    kw = dict(max_new_tokens=8, eos_token_id=[], repetition_penalty=2.0, return_logits=True)
    batch = dlf.generate(large, small, experts, eos_pad, prompts, **kw)
    for r, prompt in enumerate(prompts):
        one = dlf.generate(large, small, experts, eos_pad, prompt, **kw)
        assert batch.token_ids[r] == one.token_ids[0]
        torch.testing.assert_close(batch.logits[r], one.logits[0], rtol=1e-9, atol=1e-9)
    plain = dlf.generate(large, small, experts, eos_pad, prompts, max_new_tokens=8, eos_token_id=[])
    assert batch.token_ids != plain.token_ids  # the penalty did something


def test_repetition_penalty_is_transformers(models, tok):
    """With α = 0 the fused logits are the large model's: repetition_penalty= then gives what
    large.generate(repetition_penalty=...) gives on the same left-padded batch (pad = EOS),
    and is applied before the logits processors, as there."""
    large, small, experts = models
    eos_pad = _eos_padded(tok)
    prompts = ["w10", "w01 w02 w03 w04 w05 w06 w07", "w20 w21 w22 w20"]
    kw = dict(max_new_tokens=10, mode="static", alpha=0.0, eos_token_id=[])
    res = dlf.generate(large, small, experts[:1], eos_pad, prompts, repetition_penalty=1.5, **kw)
    enc = eos_pad(prompts, padding=True, return_tensors="pt")
    hf = dict(max_new_tokens=10, do_sample=False, pad_token_id=EOS, eos_token_id=None)
    ref = large.generate(**enc, repetition_penalty=1.5, **hf)[:, enc["input_ids"].shape[1] :]
    assert torch.equal(res.sequences, ref)
    ngram = transformers.NoRepeatNGramLogitsProcessor(2)
    both = dlf.generate(
        large,
        small,
        experts[:1],
        eos_pad,
        prompts,
        repetition_penalty=1.5,
        logits_processor=[ngram],
        **kw,
    )
    ref = large.generate(**enc, repetition_penalty=1.5, logits_processor=[ngram], **hf)
    assert torch.equal(both.sequences, ref[:, enc["input_ids"].shape[1] :])


def test_penalise_repetitions_formula():
    from meldkit.dlf.generate import penalise_repetitions

    scores = torch.tensor([[2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]])
    ids = torch.tensor([[0, 1, 1, 0], [3, 3, 3, 3]])
    out = penalise_repetitions(scores, ids, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0], [2.0, -2.0, 1.0, -2.0]]


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


def test_generation_config_sampling_settings_are_named_in_a_warning(models, tok):
    """A large model that ships sampling defaults (as Llama-3-Instruct: do_sample, temperature
    0.6, top_p 0.9) is decoded as generate's own arguments say: a warning names the settings
    this call does not decode with, and none is left when the arguments match them."""
    large, small, experts = models
    large = copy.deepcopy(large)
    gen = large.generation_config
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 0.6, 0.9, 20
    with pytest.warns(UserWarning, match=r"do_sample=True, temperature=0\.6, top_p=0\.9, top_k=20"):
        greedy = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=3)
    plain = dlf.generate(*models[:2], experts, tok, PROMPTS, max_new_tokens=3)
    assert torch.equal(greedy.sequences, plain.sequences)  # decoding is unchanged
    kw = dict(max_new_tokens=3, do_sample=True, seed=0)
    with pytest.warns(UserWarning, match=r"sets temperature=0\.6, top_k=20, which .* does not use"):
        dlf.generate(large, small, experts, tok, PROMPTS, top_p=0.9, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dlf.generate(
            large, small, experts, tok, PROMPTS, temperature=0.6, top_p=0.9, top_k=20, **kw
        )
        gen.do_sample = False  # large.generate() would not sample either: nothing unused
        dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=3)


def test_sampling_arguments_take_transformers_defaults(models, tok):
    """As transformers' generate: temperature=None and top_p=None mean 1.0, top_k=0 no top-k
    filter."""
    large, small, experts = models
    kw = dict(max_new_tokens=6, eos_token_id=[], do_sample=True, seed=5)
    want = dlf.generate(large, small, experts, tok, PROMPTS, **kw)
    for extra in (dict(temperature=None), dict(top_p=None), dict(top_k=0)):
        got = dlf.generate(large, small, experts, tok, PROMPTS, **kw, **extra)
        assert torch.equal(got.sequences, want.sequences), extra
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 0.5, -0.5, 0.8]])
    picks = {
        int(next_tokens(logits, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, generator=gen))
        for _ in range(300)
    }
    assert picks == {0, 1, 2, 3, 4}


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
        (dict(do_sample=True, top_k=-1), ValueError, r"top_k must be an int >= 0"),
        (dict(repetition_penalty=0.0), ValueError, r"repetition_penalty must be a finite .*> 0"),
        (dict(repetition_penalty=-1.2), ValueError, r"repetition_penalty must be a finite"),
        (dict(repetition_penalty=float("nan")), ValueError, r"repetition_penalty must be a fin"),
        (dict(repetition_penalty=float("inf")), ValueError, r"repetition_penalty must be a fin"),
        (dict(repetition_penalty="1.2"), TypeError, r"repetition_penalty must be a number"),
        (dict(repetition_penalty=True), TypeError, r"repetition_penalty must be a number"),
    ],
)
def test_bad_arguments_refused_before_any_forward(models, tok, kwargs, error, match):
    large, small, experts = models
    counted = _CountingModel(large)
    with pytest.raises(error, match=match):
        dlf.generate(counted, small, experts, tok, PROMPTS, max_new_tokens=2, **kwargs)
    assert counted.calls == 0


@pytest.mark.parametrize("role", ["large", "small_base", "expert 1"])
def test_a_model_on_the_meta_device_is_named(models, tok, role):
    """A model whose weights were never loaded is refused by its role before any forward
    (its forward would raise a raw torch error on meta tensors)."""
    large, small, experts = models
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(large.config).eval()
    counted = _CountingModel(large)
    args = {"large": [empty, small, experts], "small_base": [counted, empty, experts]}
    args = args.get(role, [counted, small, [experts[0], empty]])
    with pytest.raises(ValueError, match=f"{role} has parameters on the meta device"):
        dlf.generate(*args, tok, PROMPTS, max_new_tokens=2)
    assert counted.calls == 0
    if role != "large":
        with pytest.raises(ValueError, match=f"{role} has parameters on the meta device"):
            dlf.DynamicLogitFusionProcessor(*args[1:], tok)


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


def _mamba(seed):
    """A tiny MambaForCausalLM (recurrent: its cache has no attention layer), float64."""
    if not hasattr(transformers, "MambaForCausalLM"):
        pytest.skip("this transformers has no MambaForCausalLM")
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.MambaForCausalLM(config).to(torch.float64).eval()


def test_recurrent_models_decode_with_a_cache(tok):
    """A pure state-space model's cache has no sequence length (transformers' get_seq_length
    raises on it): the empty-cache check reads its states instead, and cached decoding with
    α = 0 is the large model's own greedy decoding."""
    large, small = _mamba(1), _mamba(2)
    expert = copy.deepcopy(small)
    with torch.no_grad():
        for p in expert.parameters():
            p.mul_(1.1)
    prompts = ["w01 w02", "w05 w06 w07 w08 w09"]
    kw = dict(max_new_tokens=5, eos_token_id=[], use_cache=True)
    static = dlf.generate(large, small, [expert], tok, prompts, mode="static", alpha=0.0, **kw)
    dynamic = dlf.generate(large, small, [expert], tok, prompts, alphas=[0.0], **kw)
    for r, prompt in enumerate(prompts):
        enc = tok(prompt, return_tensors="pt")
        ref = large.generate(
            **enc, max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None
        )[0, enc["input_ids"].shape[1] :].tolist()
        assert static.token_ids[r] == ref and dynamic.token_ids[r] == ref


def test_cache_is_empty_reads_recurrent_states():
    from meldkit.dlf.streams import cache_is_empty

    model = _mamba(0)
    cache = transformers.DynamicCache(config=model.config)
    assert cache_is_empty(cache)  # nothing run yet: a model that ignores it is still caught
    model(torch.tensor([[1, 5, 6]]), cache=cache, use_cache=True)
    assert not cache_is_empty(cache)


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
