"""meldkit.dlf.generate: greedy DLF, proxy-tuning, caches, padding, stopping, sampling."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from meldkit import dlf, ops
from meldkit.ops.logit_fusion_ref import DEFAULT_ALPHAS
from tests.dlf.tiny import EOS, PAD, llama

PROMPTS = ["w01 w02 w03 w04 w05", "w10", "w20 w21 w22"]


def hand_loop(large, small, experts, tok, prompt, steps, alpha, expert_prefixes=None):
    """Proxy-tuning written out: no cache, full sequences every step, one prompt, float64:
    argmax of M_L + alpha·Σ_t (M_t − M_S)."""
    prefixes = expert_prefixes or [""] * len(experts)
    ids = {"large": tok(prompt)["input_ids"]}
    ids["small"] = list(ids["large"])
    for t, p in enumerate(prefixes):
        ids[t] = tok(p + prompt)["input_ids"]
    out = []

    def last(model, seq):
        return model(torch.tensor([seq])).logits[0, -1, : len(tok)]

    with torch.no_grad():
        for _ in range(steps):
            fused = last(large, ids["large"])
            base = last(small, ids["small"])
            for t, e in enumerate(experts):
                fused = fused + alpha * (last(e, ids[t]) - base)
            nxt = int(fused.argmax())
            out.append(nxt)
            for seq in ids.values():
                seq.append(nxt)
    return out


def test_greedy_dynamic_shapes_and_trace(models, tok):
    large, small, experts = models
    res = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=6, eos_token_id=[])
    b = len(PROMPTS)
    assert res.sequences.shape == (b, 6) and res.sequences.dtype == torch.long
    assert res.alphas.shape == (b, 6) and res.alphas.dtype == torch.float32
    assert res.experts.shape == (b, 6) and res.experts.dtype == torch.long
    assert res.finish_reasons == ["length"] * b
    assert [len(t) for t in res.token_ids] == [6] * b
    assert res.sequences.tolist() == res.token_ids
    assert res.texts == [tok.decode(t, skip_special_tokens=True) for t in res.token_ids]
    grid = torch.tensor(DEFAULT_ALPHAS, dtype=torch.float32)
    assert torch.isin(res.alphas, grid).all()
    assert set(res.experts.unique().tolist()) <= {0, 1}
    # The experts really differ from the small base: DLF moves away from α = 0 somewhere.
    assert (res.alphas > 0).any()
    assert res.logits is None


def test_static_alpha0_is_large_model_greedy(models, tok):
    large, small, experts = models
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    ref = large.generate(**enc, do_sample=False, max_new_tokens=10, pad_token_id=PAD)
    ref = ref[:, enc["input_ids"].shape[1] :]
    res = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=10, mode="static", alpha=0.0
    )
    assert torch.equal(res.sequences, ref)


def test_static_alpha1_is_proxy_tuning(models, tok):
    large, small, experts = models
    res = dlf.proxy_tuning(large, small, experts[0], tok, PROMPTS[:2], max_new_tokens=6)
    for r, prompt in enumerate(PROMPTS[:2]):
        assert res.token_ids[r] == hand_loop(large, small, experts[:1], tok, prompt, 6, 1.0)
    assert (res.alphas == 1.0).all() and (res.experts == 0).all()


def test_static_several_experts_sum_their_shifts(models, tok):
    large, small, experts = models
    res = dlf.generate(
        large, small, experts, tok, PROMPTS[1], max_new_tokens=5, mode="static", alpha=0.5
    )
    assert res.token_ids[0] == hand_loop(large, small, experts, tok, PROMPTS[1], 5, 0.5)
    assert (res.experts == -1).all()


def test_expert_prompts_give_the_expert_its_own_prompt(models, tok):
    """In-context-learning expert: the small base itself, with a task prefix, as the expert."""
    large, small, _ = models
    prefix = "w30 w31 w32 "
    res = dlf.proxy_tuning(
        large, small, small, tok, PROMPTS[:2], max_new_tokens=5, expert_prompts=[prefix]
    )
    for r, prompt in enumerate(PROMPTS[:2]):
        ref = hand_loop(large, small, [small], tok, prompt, 5, 1.0, expert_prefixes=[prefix])
        assert res.token_ids[r] == ref
    # A callable expert prompt (a chat template) is the same thing.
    res2 = dlf.proxy_tuning(
        large, small, small, tok, PROMPTS[:2], max_new_tokens=5, expert_prompts=[prefix.__add__]
    )
    assert res2.token_ids == res.token_ids


def test_prompts_that_hold_their_special_tokens(models, tok):
    """``add_special_tokens=False`` tokenizes prompts (the experts' too) as given: prompts that
    already start with ``<s>``, as chat-template texts hold theirs, decode as the plain prompts
    do with the tokenizer adding it; with the default, ``<s>`` would be there twice."""
    large, small, experts = models
    kw = {"max_new_tokens": 5, "expert_prompts": ["w30 w31 ", None]}
    want = dlf.generate(large, small, experts, tok, PROMPTS[:2], **kw)
    held = ["<s> " + p for p in PROMPTS[:2]]
    held_kw = {**kw, "expert_prompts": [lambda p: "<s> w30 w31 " + p[len("<s> ") :], None]}
    got = dlf.generate(large, small, experts, tok, held, add_special_tokens=False, **held_kw)
    assert got.token_ids == want.token_ids
    assert torch.equal(got.alphas, want.alphas) and torch.equal(got.experts, want.experts)
    # With the default, a text that starts with <s> keeps one: the same again.
    default = dlf.generate(large, small, experts, tok, held, **held_kw)
    assert default.token_ids == want.token_ids
    assert torch.equal(default.alphas, want.alphas)
    # Plain prompts next to a chat-template-like expert prompt that holds its <s>: one BOS each.
    mixed_kw = {**kw, "expert_prompts": [lambda p: "<s> w30 w31 " + p, None]}
    mixed = dlf.generate(large, small, experts, tok, PROMPTS[:2], **mixed_kw)
    assert mixed.token_ids == want.token_ids
    assert torch.equal(mixed.alphas, want.alphas)


def test_tokenize_keeps_one_bos(tok):
    from meldkit.dlf.streams import tokenize

    ids, mask = tokenize(tok, ["<s> w01 w02", "w01 w02", "<s> <s> w01"])
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
    bos = tok.bos_token_id
    assert rows[0] == rows[1] and rows[0][0] == bos and rows[0][1] != bos
    assert rows[2][:3] == [bos, bos, tok.convert_tokens_to_ids("w01")]  # only the added one goes


def test_cache_equals_recompute(models, tok):
    large, small, experts = models
    kw = dict(max_new_tokens=5, eos_token_id=[], return_logits=True)
    cached = dlf.generate(large, small, experts, tok, PROMPTS, **kw)
    full = dlf.generate(large, small, experts, tok, PROMPTS, use_cache=False, **kw)
    assert cached.logits.shape == (len(PROMPTS), 5, len(tok))
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.sequences, full.sequences)
    assert torch.equal(cached.alphas, full.alphas)


def test_left_padded_batch_equals_prompts_alone(models, tok):
    large, small, experts = models
    batch = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=6, eos_token_id=[])
    for r, prompt in enumerate(PROMPTS):
        alone = dlf.generate(large, small, experts, tok, prompt, max_new_tokens=6, eos_token_id=[])
        assert alone.token_ids[0] == batch.token_ids[r]
        assert torch.equal(alone.alphas[0], batch.alphas[r])
        assert torch.equal(alone.experts[0], batch.experts[r])


def test_stops_per_row_on_eos(models, tok):
    large, small, experts = models
    free = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=8, eos_token_id=[])
    eos = free.token_ids[0][2]  # make a token that row 0 produces at step 2 the "EOS"
    res = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=8, eos_token_id=eos)
    for r, seq in enumerate(free.token_ids):
        end = seq.index(eos) + 1 if eos in seq else len(seq)
        assert res.token_ids[r] == seq[:end]
        assert res.finish_reasons[r] == ("eos" if eos in seq else "length")
        assert (res.sequences[r, end:] == PAD).all()
        assert res.alphas[r, end:].isnan().all() and (res.experts[r, end:] == -1).all()
        assert not res.alphas[r, :end].isnan().any()
    assert res.sequences.shape[1] == max(len(t) for t in res.token_ids)
    assert res.finish_reasons[0] == "eos" and len(res.token_ids[0]) <= 3


def test_default_eos_is_tokenizer_and_generation_config(models, tok):
    large, small, experts = models
    res = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=12)
    for r, seq in enumerate(res.token_ids):
        assert EOS not in seq[:-1]
        assert res.finish_reasons[r] == ("eos" if seq[-1] == EOS else "length")


def test_stops_per_row_on_stop_strings(models, tok):
    large, small, experts = models
    free = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=8, eos_token_id=[])
    word = tok.decode([free.token_ids[1][3]])
    res = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=8, eos_token_id=[], stop=[word, "w99"]
    )
    for r, seq in enumerate(free.token_ids):
        words = [tok.decode([t]) for t in seq]
        end = words.index(word) + 1 if word in words else len(seq)
        assert res.token_ids[r] == seq[:end]
        if word in words:
            assert res.finish_reasons[r] == "stop"
            text = tok.decode(seq[:end], skip_special_tokens=True)
            assert res.texts[r] == text[: text.index(word)]  # cut before the stop string
        else:
            assert res.finish_reasons[r] == "length"
    assert res.finish_reasons[1] == "stop"


def test_stop_string_that_is_a_special_token(models, tok):
    """Texts skip special tokens, but a stop string naming one ("<pad>" here; "<|im_end|>" in
    chat models) still ends the row, and the text ends before it as it ends before any stop
    string; one that spans a special token and a shown one cuts inside the shown one."""
    large, small, experts = models
    prompt = "w01 w02 w03"  # greedy DLF generates <pad> (id PAD) third on this prompt
    free = dlf.generate(large, small, experts, tok, prompt, max_new_tokens=6, eos_token_id=[])
    seq = free.token_ids[0]
    assert PAD in seq[:-1]  # the premise: a special token followed by more tokens
    end = seq.index(PAD) + 1
    res = dlf.generate(
        large, small, experts, tok, prompt, max_new_tokens=6, eos_token_id=[], stop=["<pad>"]
    )
    assert res.finish_reasons == ["stop"] and res.token_ids == [seq[:end]]
    assert res.texts == [tok.decode(seq[: end - 1], skip_special_tokens=True)]
    assert res.texts[0] != ""
    before = tok.decode([seq[end - 2]])  # the word before <pad>: "w31 <pad>" spans both
    res = dlf.generate(
        large,
        small,
        experts,
        tok,
        prompt,
        max_new_tokens=6,
        eos_token_id=[],
        stop=[before[1:] + " <pad>"],
    )
    assert res.finish_reasons == ["stop"] and res.token_ids == [seq[:end]]
    text = tok.decode(seq[:end], skip_special_tokens=True)
    assert res.texts == [text[: text.rindex(before) + 1]]  # cut after the word's first letter


@pytest.mark.parametrize(
    "as_type", [torch.tensor, lambda i: torch.tensor([i, 99]), np.int64, lambda i: np.array([i])]
)
def test_eos_ids_as_tensor_or_numpy(models, tok, as_type):
    large, small, experts = models
    kw = dict(max_new_tokens=8)
    free = dlf.generate(large, small, experts, tok, PROMPTS, eos_token_id=[], **kw)
    eos = free.token_ids[0][2]
    want = dlf.generate(large, small, experts, tok, PROMPTS, eos_token_id=eos, **kw)
    got = dlf.generate(large, small, experts, tok, PROMPTS, eos_token_id=as_type(eos), **kw)
    assert got.finish_reasons[0] == "eos" and got.token_ids == want.token_ids
    assert got.finish_reasons == want.finish_reasons


def test_greedy_ignores_sampling_arguments(models, tok):
    """As transformers' generate: temperature and top_p are neither used nor checked when
    do_sample is False."""
    large, small, experts = models
    kw = dict(max_new_tokens=4, eos_token_id=[])
    greedy = dlf.generate(large, small, experts, tok, PROMPTS, **kw)
    odd = dlf.generate(large, small, experts, tok, PROMPTS, top_p=0.0, temperature=0.0, **kw)
    assert torch.equal(odd.sequences, greedy.sequences)


def test_sampling_is_reproducible_and_fused_first(models, tok):
    large, small, experts = models
    kw = dict(max_new_tokens=6, eos_token_id=[], do_sample=True)
    a = dlf.generate(large, small, experts, tok, PROMPTS, seed=7, **kw)
    b = dlf.generate(
        large, small, experts, tok, PROMPTS, generator=torch.Generator().manual_seed(7), **kw
    )
    assert torch.equal(a.sequences, b.sequences)
    # Temperature → 0, or a tiny nucleus, on the *fused* logits is greedy DLF.
    greedy = dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=6, eos_token_id=[])
    cold = dlf.generate(large, small, experts, tok, PROMPTS, seed=1, temperature=1e-4, **kw)
    nucleus = dlf.generate(large, small, experts, tok, PROMPTS, seed=1, top_p=1e-6, **kw)
    assert torch.equal(cold.sequences, greedy.sequences)
    assert torch.equal(nucleus.sequences, greedy.sequences)


def test_custom_alpha_grid(models, tok):
    large, small, experts = models
    res = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=4, alphas=[0.0, 0.5], eos_token_id=[]
    )
    assert set(res.alphas.unique().tolist()) <= {0.0, 0.5}
    only_zero = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=4, alphas=[0.0], eos_token_id=[]
    )
    kw = dict(max_new_tokens=4, mode="static", alpha=0.0, eos_token_id=[])
    large_alone = dlf.generate(large, small, experts, tok, PROMPTS, **kw)
    assert torch.equal(only_zero.sequences, large_alone.sequences)


def test_per_expert_ranges(models, tok):
    """Each expert's α stays in its range in the trace; a one-point range at α = 1 with one
    expert is proxy-tuning; ranges covering the grid change nothing."""
    large, small, experts = models
    kw = dict(max_new_tokens=5, eos_token_id=[])
    res = dlf.generate(large, small, experts, tok, PROMPTS, ranges=[(0.0, 0.3), (1.2, 2.0)], **kw)
    live = ~res.alphas.isnan()
    a, e = res.alphas[live], res.experts[live]
    assert ((e == 0) & (a <= 0.3 + 1e-6) | (e == 1) & (a >= 1.2 - 1e-6)).all()
    whole = dlf.generate(large, small, experts, tok, PROMPTS, ranges=(0.0, 2.0), **kw)
    plain = dlf.generate(large, small, experts, tok, PROMPTS, **kw)
    assert torch.equal(whole.sequences, plain.sequences)
    assert torch.equal(whole.alphas.nan_to_num(), plain.alphas.nan_to_num())
    one = dlf.generate(large, small, experts[:1], tok, PROMPTS, ranges=[(1.0, 1.0)], **kw)
    proxy = dlf.proxy_tuning(large, small, experts[0], tok, PROMPTS, **kw)
    assert torch.equal(one.sequences, proxy.sequences)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="joint"), "mode"),
        (dict(mode="static", ranges=[(0, 1), (0, 1)]), "ranges"),
        (dict(ranges=[(0.0, 1.0)]), "'ranges': has 1 ranges for T = 2"),
        (dict(ranges=[(0.0, 1.0), (2.5, 3.0)]), r"'ranges\[1\]'.*holds no point"),
        (dict(mode="static", alphas=[0.5]), "alphas"),
        (dict(alpha=math.nan, mode="static"), "alpha"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(expert_prompts=["x", "y", "z"]), "expert_prompts"),
        (dict(alpha=True, mode="static"), "alpha"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(seed=1, generator=torch.Generator()), "seed"),
        (dict(stop=""), "stop"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(seed="x"), "seed"),
        (dict(alpha=1e39, mode="static"), "alpha"),
    ],
)
def test_bad_arguments(models, tok, kwargs, match):
    large, small, experts = models
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        dlf.generate(large, small, experts, tok, PROMPTS, **kwargs)


@pytest.mark.parametrize(
    ("prompts", "tokenizer", "kwargs", "match"),
    [
        ([[1, 5, 6]], None, {}, r"prompts\[0\] must be a str .*got list \(token ids: decode"),
        (torch.tensor([[1, 5]]), None, {}, r"prompts must be a text or a list of texts, got Ten"),
        (["a", None], None, {}, r"prompts\[1\] must be a str .*got NoneType"),
        (None, "none", {}, r"tokenizer must be a Hugging Face tokenizer .*got NoneType"),
        (None, "gpt2", {}, r"tokenizer must be a loaded tokenizer, got the name 'gpt2'"),
        (None, None, dict(expert_prompts=[lambda x: None] * 2), r"expert_prompts\[0\] returned"),
    ],
)
def test_prompts_and_tokenizer_are_checked_by_name(models, tok, prompts, tokenizer, kwargs, match):
    large, small, experts = models
    tokenizer = {None: tok, "none": None}.get(tokenizer, tokenizer)
    with pytest.raises(TypeError, match=match):
        dlf.generate(
            large,
            small,
            experts,
            tokenizer,
            PROMPTS if prompts is None else prompts,
            max_new_tokens=2,
            **kwargs,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(do_sample=True, temperature="1"), "temperature"),
        (dict(stop=3), "stop"),
        (dict(stop=["ok", 3]), "stop"),
        (dict(add_special_tokens="no"), "add_special_tokens"),
    ],
)
def test_arguments_of_the_wrong_type(models, tok, kwargs, match):
    large, small, experts = models
    with pytest.raises(TypeError, match=match):
        dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=2, **kwargs)


def test_adapter_name_needs_a_peft_small_base(models, tok):
    large, small, _ = models
    with pytest.raises(ValueError, match="PeftModel"):
        dlf.generate(large, small, "gsm8k", tok, PROMPTS, max_new_tokens=2)


def test_fuse_logits_static_and_dynamic():
    gen = torch.Generator().manual_seed(0)
    large, small = torch.randn(3, 11, generator=gen), torch.randn(3, 11, generator=gen)
    experts = torch.randn(2, 3, 11, generator=gen)
    large[0, 4] = small[1, 5] = experts[1, 2, 6] = -math.inf
    fused, alpha, expert = dlf.fuse_logits(large, small, experts, mode="static", alpha=0.5)
    want = large + 0.5 * (experts - small).sum(0)
    masked = torch.zeros(3, 11, dtype=torch.bool)
    masked[0, 4] = masked[1, 5] = masked[2, 6] = True
    assert fused[masked].isneginf().all()
    torch.testing.assert_close(fused[~masked], want[~masked])
    assert (alpha == 0.5).all() and (expert == -1).all()
    fused, alpha, expert = dlf.fuse_logits(large, small, experts, alphas=[0.0, 0.3, 1.0])
    ref = ops.logit_fusion(large, small, experts, [0.0, 0.3, 1.0])
    assert torch.equal(fused, ref.logits) and torch.equal(alpha, ref.alpha)
    assert torch.equal(expert, ref.expert)
    # NaN or +inf logits are refused in both modes, naming the input (static mode used to
    # decode NaN as token 0)
    for mode in ("static", "dynamic"):
        bad = experts.clone()
        bad[1, 0, 3] = math.nan
        with pytest.raises(ValueError, match=r"'experts\[1\]': contains NaN"):
            dlf.fuse_logits(large, small, bad, mode=mode)
        with pytest.raises(ValueError, match=r"'small_base': contains \+inf"):
            dlf.fuse_logits(large, small.clone().fill_(math.inf), experts, mode=mode)


def test_models_in_different_dtypes(models, tok):
    """A float32 large model with float64 small models: logits are fused in float32."""
    large, small, experts = models
    large32 = copy.deepcopy(large).float()
    res = dlf.generate(large32, small, experts, tok, PROMPTS, max_new_tokens=4, return_logits=True)
    assert res.logits.dtype == torch.float32
    assert res.sequences.shape[0] == len(PROMPTS)


# ---- contrastive decoding ----------------------------------------------------------------------


def test_contrastive_logits_formula():
    """log p_EXP − log p_AMA(τ) on V_head = {p_EXP ≥ α·max p_EXP}, −inf elsewhere and where
    either model masks the token; straight from the paper's definition in float64."""
    gen = torch.Generator().manual_seed(5)
    expert = 3 * torch.randn(4, 50, generator=gen, dtype=torch.float64)
    amateur = 3 * torch.randn(4, 50, generator=gen, dtype=torch.float64)
    expert[0, 3] = amateur[1, 7] = -math.inf
    for alpha, tau in ((0.1, 1.0), (0.5, 0.5), (1.0, 2.0)):
        got = dlf.contrastive_logits(expert, amateur, alpha, tau)
        for b in range(4):
            keep = (expert[b] > -math.inf) & (amateur[b] > -math.inf)
            p_exp = torch.where(keep, expert[b], -math.inf).softmax(-1)
            p_ama = torch.where(keep, amateur[b] / tau, -math.inf).softmax(-1)
            head = keep & (p_exp >= alpha * p_exp.max())
            want = torch.where(head, p_exp.log() - p_ama.log(), -math.inf)
            assert torch.equal(got[b] == -math.inf, want == -math.inf)
            torch.testing.assert_close(got[b][head].double(), want[head], rtol=1e-5, atol=1e-5)
        assert (got.isfinite().sum(-1) >= 1).all()  # the expert's top token is always plausible
    # α = 1: only the expert's top token survives, so CD's greedy token is the expert's.
    top = dlf.contrastive_logits(expert, amateur, 1.0, 1.0)
    assert torch.equal(top.argmax(-1), torch.where(expert.isinf(), -math.inf, expert).argmax(-1))


def _cd_hand_loop(large, small, tok, prompt, steps, alpha, tau):
    """Contrastive decoding written out: no cache, full sequences, float64, greedy."""
    ids = tok(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            zl = large(torch.tensor([ids])).logits[0, -1, : len(tok)].double()
            zs = small(torch.tensor([ids])).logits[0, -1, : len(tok)].double()
            lp, la = zl.log_softmax(-1), (zs / tau).log_softmax(-1)
            head = lp >= lp.max() + math.log(alpha)
            nxt = int(torch.where(head, lp - la, -math.inf).argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def test_contrastive_decoding_equals_the_hand_loop(models, tok):
    large, small, _ = models
    kw = dict(max_new_tokens=5, eos_token_id=[])
    res = dlf.contrastive_decoding(
        large, small, tok, PROMPTS, plausibility=0.2, amateur_temperature=0.5, **kw
    )
    for r, prompt in enumerate(PROMPTS):
        assert res.token_ids[r] == _cd_hand_loop(large, small, tok, prompt, 5, 0.2, 0.5)
    same = dlf.generate(
        large,
        small,
        [],
        tok,
        PROMPTS,
        mode="contrastive",
        plausibility=0.2,
        amateur_temperature=0.5,
        **kw,
    )
    assert torch.equal(same.sequences, res.sequences)
    assert (res.alphas == 1.0).all() and (res.experts == -1).all()
    default = dlf.contrastive_decoding(large, small, tok, PROMPTS, **kw)
    for r, prompt in enumerate(PROMPTS):
        assert default.token_ids[r] == _cd_hand_loop(large, small, tok, prompt, 5, 0.1, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="contrastive"), "takes no experts"),
        (dict(plausibility=0.1), "for mode='contrastive'"),
        (dict(mode="static", amateur_temperature=0.5), "for mode='contrastive'"),
        (dict(mode="contrastive", alphas=[0.5]), "alphas"),
    ],
)
def test_contrastive_arguments(models, tok, kwargs, match):
    large, small, experts = models
    with pytest.raises(ValueError, match=match):
        dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=2, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(plausibility=0.0), "plausibility must be in"),
        (dict(plausibility=1.5), "plausibility must be in"),
        (dict(amateur_temperature=0.0), "amateur_temperature must be"),
        (dict(amateur_temperature=math.inf), "amateur_temperature must be"),
    ],
)
def test_contrastive_bad_values(models, tok, kwargs, match):
    large, small, _ = models
    with pytest.raises(ValueError, match=match):
        dlf.contrastive_decoding(large, small, tok, PROMPTS, max_new_tokens=2, **kwargs)
    with pytest.raises(TypeError, match="contrastive_decoding takes"):
        dlf.contrastive_decoding(large, small, tok, PROMPTS, max_new_tokens=2, alpha=1.0)


def test_static_mode_is_classifier_free_guidance(tok):
    """CFG-style guidance is static mode: the model on the unconditional prompt as large and
    small base, the same model under the condition (an expert prompt) as the expert, α the
    guidance scale: M_u + g·(M_c − M_u) has the softmax of transformers' CFG processor's
    g·(log p_c − log p_u) + log p_u. Same tokens as ``generate(guidance_scale=g)``."""
    model = llama(0, hidden=48)
    prompt, condition, g = "w01 w02 w03", "w40 w41 ", 1.5
    ours = dlf.generate(
        model,
        model,
        [model],
        tok,
        [prompt],
        max_new_tokens=6,
        mode="static",
        alpha=g,
        expert_prompts=[condition],
        eos_token_id=[],
    )
    cond = tok([condition + prompt], return_tensors="pt")
    uncond = tok([prompt], return_tensors="pt")
    theirs = model.generate(
        **cond,
        guidance_scale=g,
        negative_prompt_ids=uncond["input_ids"],
        negative_prompt_attention_mask=uncond["attention_mask"],
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    assert torch.equal(ours.sequences, theirs[:, cond["input_ids"].shape[1] :])


# ---- diagnostics -------------------------------------------------------------------------------


def test_fusion_diagnostics_give_the_solvers_loss():
    """For the candidate the solver chose, (KL(P̃‖P) − A)² + (KL(P‖P̃) − B)² from the diagnostics is
    the loss the op returned for it."""
    gen = torch.Generator().manual_seed(8)
    small = 3 * torch.randn(6, 300, generator=gen)
    large = small + torch.randn(6, 300, generator=gen)
    experts = small + 0.5 * torch.randn(3, 6, 300, generator=gen)
    large[1, 5] = experts[2, 3, 9] = -math.inf
    res = ops.logit_fusion(large, small, experts)
    stats = dlf.fusion_diagnostics(large, small, experts, res.logits)
    assert stats.shape == (6, 4) and stats.dtype == torch.float32
    loss = (stats[:, 0] - stats[:, 2]) ** 2 + (stats[:, 1] - stats[:, 3]) ** 2
    grid = torch.tensor(DEFAULT_ALPHAS, dtype=torch.float32)
    j = (grid[None, :] == res.alpha[:, None]).float().argmax(-1)
    chosen = res.loss[torch.arange(6), res.expert, j]
    torch.testing.assert_close(loss, chosen, rtol=1e-3, atol=1e-6)
    # α = 0 (the large model itself): no shift
    zero = dlf.fusion_diagnostics(large, small, experts, large)
    assert (zero[:, :2].abs() < 1e-6).all() and (zero[:, 2:] > 0).all()


def test_generate_returns_diagnostics(models, tok):
    large, small, experts = models
    res = dlf.generate(
        large, small, experts, tok, PROMPTS, max_new_tokens=4, return_diagnostics=True
    )
    steps = res.sequences.shape[1]
    assert res.diagnostics.shape == (len(PROMPTS), steps, 4)
    live = ~res.alphas.isnan()
    assert torch.equal(
        res.diagnostics[live].isnan().any(-1), torch.zeros(int(live.sum()), dtype=bool)
    )
    assert res.diagnostics[~live].isnan().all()
    assert (res.diagnostics[live] >= -1e-6).all()
    assert dlf.generate(large, small, experts, tok, PROMPTS, max_new_tokens=2).diagnostics is None
    cd = dlf.contrastive_decoding(
        large, small, tok, PROMPTS, max_new_tokens=2, return_diagnostics=True
    )
    assert cd.diagnostics[..., 2:].isnan().all()  # no experts, no targets


def test_float64_logits_are_fused_in_float64():
    # The solver's choice on float64 models is the float64 one (not rounded to float32 first).
    from meldkit.dlf.fusion import fuse_logits
    from meldkit.ops import logit_fusion

    g = torch.Generator().manual_seed(0)
    small = torch.randn(4, 50, generator=g, dtype=torch.float64)
    experts = small + 1e-4 * torch.randn(2, 4, 50, generator=g, dtype=torch.float64)
    large = small + 0.1 * torch.randn(4, 50, generator=g, dtype=torch.float64)
    fused, a, e = fuse_logits(large, small, experts)
    want = logit_fusion(large, small, experts)
    assert fused.dtype == a.dtype == torch.float64
    assert torch.equal(a, want.alpha) and torch.equal(e, want.expert)
    assert torch.equal(fused, want.logits)
    fused32, _, _ = fuse_logits(large.float(), small.float(), experts.float())
    assert fused32.dtype == torch.float32
    for mode, kw in (("static", {"alpha": 0.5}), ("contrastive", {})):
        e = None if mode == "contrastive" else experts
        fused, a, _ = fuse_logits(large, small, e, mode=mode, **kw)
        assert fused.dtype == a.dtype == torch.float64, mode
