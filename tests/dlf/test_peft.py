"""LoRA experts as adapters of one PeftModel small base: equal to separate merged models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from meldkit import dlf  # noqa: E402
from tests.dlf.tiny import llama, tokenizer  # noqa: E402

PROMPTS = ["w01 w02 w03 w04 w05", "w10", "w20 w21 w22"]
ADAPTERS = ["gsm8k", "trivia"]


@pytest.fixture(scope="module")
def setup():
    """(tokenizer, large, PeftModel with two random LoRA adapters, plain small base, merged
    experts)."""
    tok = tokenizer()
    large = llama(0, hidden=48)
    small = llama(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT / transformers deprecation notices
        torch.manual_seed(5)
        targets = ["q_proj", "v_proj", "up_proj"]
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(small), config, adapter_name=ADAPTERS[0])
        pm.add_adapter(ADAPTERS[1], config)
        pm.eval()
        merged = [copy.deepcopy(pm).merge_and_unload(adapter_names=[a]).eval() for a in ADAPTERS]
    return tok, large, pm, small, merged


def _state(pm):
    return pm.active_adapters, [(n, p.requires_grad) for n, p in pm.named_parameters()]


@pytest.mark.parametrize("adapter_batching", [True, False])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_lora_adapters_equal_merged_models(setup, adapter_batching, mode):
    tok, large, pm, small, merged = setup
    before = _state(pm)
    kw = dict(max_new_tokens=6, eos_token_id=[], mode=mode, alpha=0.7)
    if mode == "dynamic":
        kw.pop("alpha")
    got = dlf.generate(large, pm, ADAPTERS, tok, PROMPTS, adapter_batching=adapter_batching, **kw)
    ref = dlf.generate(large, small, merged, tok, PROMPTS, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.alphas, ref.alphas)
    assert torch.equal(got.experts, ref.experts)
    if mode == "dynamic":
        assert (got.alphas > 0).any()
    assert _state(pm) == before  # active adapter and requires_grad flags restored


def test_mixed_batch_logits_match_separate_forwards(setup):
    tok, large, pm, _, _ = setup
    kw = dict(max_new_tokens=4, eos_token_id=[], return_logits=True)
    mixed = dlf.generate(large, pm, ADAPTERS, tok, PROMPTS, **kw)
    separate = dlf.generate(large, pm, ADAPTERS, tok, PROMPTS, adapter_batching=False, **kw)
    torch.testing.assert_close(mixed.logits, separate.logits, rtol=1e-6, atol=1e-6)


def test_adapter_expert_with_its_own_prompt(setup):
    """An adapter expert with an expert prompt joins the mixed batch with its own rows."""
    tok, large, pm, small, merged = setup
    kw = dict(max_new_tokens=5, eos_token_id=[], expert_prompts=[None, "w40 w41 "])
    got = dlf.generate(large, pm, ADAPTERS, tok, PROMPTS, **kw)
    ref = dlf.generate(large, small, merged, tok, PROMPTS, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.alphas, ref.alphas)


def test_unknown_adapter_and_shared_base_refused(setup):
    tok, large, pm, _, _ = setup
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        dlf.generate(large, pm, ["nope"], tok, PROMPTS, max_new_tokens=2)
    # The PeftModel wraps (and has modified in place) its base model: that base with LoRA layers
    # in it cannot stand for the small base.
    with pytest.raises(ValueError, match="share one model object"):
        dlf.generate(large, pm.get_base_model(), [pm], tok, PROMPTS, max_new_tokens=2)


def test_small_base_and_adapters_share_one_forward(setup):
    from meldkit.dlf.generate import fusion_members
    from meldkit.dlf.streams import Ensemble

    _, _, pm, _, _ = setup
    members = fusion_members(pm, ADAPTERS)
    assert len(Ensemble(members, vocab_size=64).streams) == 1
    assert len(Ensemble(members, vocab_size=64, adapter_batching=False).streams) == 3


def test_processor_with_lora_adapters(setup):
    transformers = pytest.importorskip("transformers")
    tok, large, pm, small, merged = setup
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    proc = dlf.DynamicLogitFusionProcessor(pm, ADAPTERS, tok, attention_mask=enc.attention_mask)
    out = large.generate(
        **enc,
        logits_processor=transformers.LogitsProcessorList([proc]),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    ref = dlf.generate(large, small, merged, tok, PROMPTS, max_new_tokens=5)
    assert torch.equal(out[:, enc.input_ids.shape[1] :], ref.sequences)


def _two_adapters(small, config):
    """A PeftModel around a copy of ``small`` with two adapters of ``config()``: random weights,
    moved away from identity (IA3 starts at 1), in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT / transformers deprecation notices
        torch.manual_seed(7)
        pm = peft.get_peft_model(copy.deepcopy(small), config(), adapter_name=ADAPTERS[0])
        pm.add_adapter(ADAPTERS[1], config())
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(a in name for a in ADAPTERS):
                noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.add_(0.3 * p.detach().std().clamp_min(0.1) * noise)
    return pm.eval()


TARGETS = ["q_proj", "v_proj"]
UNMIXABLE = {
    "IA3": lambda: peft.IA3Config(
        target_modules=TARGETS, feedforward_modules=[], init_ia3_weights=False
    ),
    "LOHA": lambda: peft.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False),
    "LOKR": lambda: peft.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False),
    "VERA": lambda: peft.VeraConfig(r=4, target_modules=TARGETS, init_weights=False),
    "DoRA": lambda: peft.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights=False, use_dora=True
    ),
}


@pytest.mark.parametrize("kind", sorted(UNMIXABLE))
def test_adapters_peft_cannot_mix_run_one_by_one(setup, kind):
    """PEFT ignores adapter_names for IA3, LoHa, LoKr and VeRA (every row gets the active
    adapter) and refuses it for DoRA: the default adapter_batching=True runs them one by one,
    with a warning that says why, and gives what adapter_batching=False gives."""
    tok, large, _, small, _ = setup
    pm = _two_adapters(small, UNMIXABLE[kind])
    kw = dict(max_new_tokens=4, eos_token_id=[], return_logits=True)
    with pytest.warns(UserWarning, match=f"one by one.*adapter 'trivia' is {kind}"):
        got = dlf.generate(large, pm, ADAPTERS, tok, PROMPTS, **kw)
    ref = dlf.generate(large, pm, ADAPTERS, tok, PROMPTS, adapter_batching=False, **kw)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.sequences, ref.sequences)


def test_failed_mixed_batch_leaves_peft_model_usable(setup):
    """A forward PEFT refuses (here DoRA in a mixed batch, which Ensemble never sends) leaves
    its adapter_names pre-forward hooks behind; the stream removes them."""
    from meldkit.dlf.streams import BASE_ADAPTER, ModelStream, tokenize

    tok, _, _, small, _ = setup
    pm = _two_adapters(small, UNMIXABLE["DoRA"])
    ids, mask = tokenize(tok, PROMPTS)
    with torch.no_grad():
        before = pm(input_ids=ids, attention_mask=mask).logits
        stream = ModelStream(pm, [BASE_ADAPTER, *ADAPTERS], vocab_size=64)
        with pytest.raises(ValueError, match=r"DoRA.*adapter_batching=False"):
            stream.prefill([(ids, mask)] * 3)
        after = pm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("role", ["large", "small_base", "one layer"])
def test_model_in_training_mode_refused(setup, role):
    """A model left in training mode would decode with dropout on (and PEFT refuses mixed
    adapter batches in training mode): refused for every adapter_batching, naming .eval()."""
    tok, large, pm, _, _ = setup
    models = {"large": copy.deepcopy(large), "small_base": copy.deepcopy(pm)}
    if role == "one layer":
        models["large"].model.layers[1].train()
        match = r"training mode \(its model\.layers\.1\).*\.eval\(\)"
    else:
        models[role].train()
        match = r"training mode, .*\.eval\(\)"
    for adapter_batching in (True, False):
        with pytest.raises(ValueError, match=match):
            dlf.generate(
                models["large"],
                models["small_base"],
                ADAPTERS,
                tok,
                PROMPTS,
                max_new_tokens=2,
                adapter_batching=adapter_batching,
            )


@pytest.mark.parametrize("adapter_batching", [True, False])
def test_prompt_learning_adapters_refused(setup, adapter_batching):
    tok, large, _, small, _ = setup
    pm = _two_adapters(
        small, lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    with pytest.raises(ValueError, match="prompt-learning adapter"):
        dlf.generate(
            large, pm, ADAPTERS, tok, PROMPTS, max_new_tokens=2, adapter_batching=adapter_batching
        )
