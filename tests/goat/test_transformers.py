"""GOAT on tiny Hugging Face models built from configs: Llama (causal LM, chosen targets) and
RoBERTa (sequence classification, "all-linear")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meldkit.goat as goat
from tests.goat.tiny_models import tiny_llama, tiny_roberta

pytest.importorskip("transformers")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def llama_config(**kw) -> goat.GoatConfig:
    return goat.GoatConfig(
        **{"num_experts": 4, "top_k": 2, "rank": 8, "target_modules": LLAMA_TARGETS, **kw}
    )


def batch(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 12), generator=g)


def test_llama_trains():
    model = goat.wrap(tiny_llama(), llama_config())
    names = [name for name, _ in goat.goat_layers(model)]
    assert len(names) == 2 * len(LLAMA_TARGETS)
    assert all(name.rsplit(".", 1)[1] in LLAMA_TARGETS for name in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * len(names)
    assert all(n.endswith(("lora_a", "lora_b", "router.weight")) for n in trainable)

    ids = batch(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids, labels=ids).loss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for step in range(6):
        out = model(ids, labels=ids)
        aux = goat.aux_loss(model)
        if step == 0:
            assert aux > 0 and aux.requires_grad
        opt.zero_grad()
        (out.loss + aux).backward()
        if step == 0:
            assert all(
                p.grad is not None and p.grad.abs().sum() > 0
                for n, p in model.named_parameters()
                if p.requires_grad
            )
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(ids, labels=ids).loss
    assert after < before - 0.1


def test_llama_adapter_round_trip(tmp_path):
    model = goat.wrap(tiny_llama(), llama_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(model.config.vocab_size)
    model.train()
    for _ in range(2):
        loss = model(ids, labels=ids).loss + goat.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = goat.save_adapter(model, tmp_path / "llama.safetensors")

    fresh = goat.load_adapter(tiny_llama(), path).eval()  # the base, loaded anew
    sa, sb = model.state_dict(), fresh.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)

    base = tiny_llama()
    goat.unwrap(fresh)
    assert not list(goat.goat_layers(fresh))
    sa, sb = base.state_dict(), fresh.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    with pytest.raises(goat.AdapterError, match="not found in the model"):
        goat.load_adapter(tiny_roberta(), path)


def test_roberta_all_linear():
    model = tiny_roberta()
    model = goat.wrap(model, goat.GoatConfig(num_experts=4, top_k=2, rank=8))
    names = [name for name, _ in goat.goat_layers(model)]
    # q, k, v, attention output, intermediate, output per layer; the classifier head is left out.
    assert len(names) == 12
    assert not any(name.startswith("classifier") for name in names)
    assert isinstance(model.classifier.dense, nn.Linear)
    ids = batch(model.config.vocab_size)
    labels = torch.tensor([0, 2])
    model.train()
    out = model(ids, labels=labels)
    (out.loss + goat.aux_loss(model)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    # 12 layers × (A, B, router) and, by modules_to_save="auto", the classifier head's 4.
    assert len(grads) == 40 and all(g is not None for g in grads)
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_classifier_head_trains_and_travels_with_the_adapter(tmp_path):
    """modules_to_save="auto" trains a sequence-classification head in full and saves it: the
    adapter loaded into a fresh base reproduces the trained classifier, and unwrap gives the
    original head back."""
    base = tiny_roberta()
    model = goat.wrap(tiny_roberta(), goat.GoatConfig(num_experts=4, top_k=2, rank=8, dropout=0.0))
    head = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = batch(model.config.vocab_size), torch.tensor([0, 2])
    model.train()
    for _ in range(2):
        loss = model(ids, labels=labels).loss + goat.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert not torch.equal(model.classifier.out_proj.weight, head["out_proj.weight"])
    path = goat.save_adapter(model, tmp_path)
    assert "modules_to_save.classifier.out_proj.weight" in goat.read_adapter(path)[2]
    fresh = goat.load_adapter(tiny_roberta(), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert all(p.requires_grad for p in fresh.classifier.parameters())
    goat.unwrap(model)
    for n, p in model.classifier.named_parameters():
        assert torch.equal(p, head[n]), n
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    # () keeps the head frozen and out of the file; a head the model lacks is refused.
    none = goat.wrap(tiny_roberta(), goat.GoatConfig(num_experts=4, rank=8, modules_to_save=()))
    assert not any(p.requires_grad for p in none.classifier.parameters())
    with pytest.raises(ValueError, match="modules_to_save entry 'score' matches no module"):
        goat.wrap(tiny_roberta(), goat.GoatConfig(num_experts=4, rank=8, modules_to_save=["score"]))
    with pytest.raises(ValueError, match="overlaps the GOAT targets"):
        goat.wrap(
            tiny_roberta(),
            goat.GoatConfig(
                num_experts=4, rank=8, target_modules=["dense"], modules_to_save=["classifier"]
            ),
        )


def test_t5_all_linear_trains():
    """T5's feed-forward reads ``self.wo.weight.dtype``: a GOAT layer offers its base layer's
    ``weight`` and ``bias``, so "all-linear" T5 runs forward and backward."""
    import transformers

    config = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = goat.wrap(
        transformers.T5ForConditionalGeneration(config),
        goat.GoatConfig(num_experts=4, top_k=2, rank=8, target_modules="all-linear"),
    ).train()
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, goat.GoatLinear)
    assert wo.weight is wo.base_layer.weight and wo.bias is None
    ids = batch(config.vocab_size)
    loss = model(input_ids=ids, labels=ids).loss + goat.aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert wo.lora_a.grad is not None and wo.lora_a.grad.abs().sum() > 0
    assert "weight" not in dict(wo.named_parameters())  # the base's, not a second parameter


def test_gpt2_all_linear_names_conv1d():
    """GPT-2's projections are transformers' Conv1D, not nn.Linear: "all-linear" matches none
    of them (its only nn.Linear is the output head), and the error says why."""
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match=r"matches no nn.Linear.*c_attn.*Conv1D.*nn.Linear"):
        goat.wrap(model, goat.GoatConfig(num_experts=4, top_k=2, rank=8))


def test_adapter_refuses_a_base_with_another_config(tmp_path):
    """A base with the same weights and shapes but another config (8 heads of 4 instead of 4
    of 8) computes something else: refused, naming the fields, unless check_base=False; files
    saved before the config was recorded load as before."""
    import json

    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = goat.save_adapter(goat.wrap(tiny_llama(), llama_config()), tmp_path / "a.safetensors")
    config = tiny_llama().config
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 4, 4
    other = transformers.LlamaForCausalLM(config).eval()
    other.load_state_dict(tiny_llama().state_dict())  # same weights: the fingerprints pass
    with pytest.raises(goat.AdapterError, match=r"in num_attention_heads=8 \(saved: 4\)"):
        goat.load_adapter(other, path)
    assert not list(goat.goat_layers(other))  # left untouched
    goat.load_adapter(other, path, check_base=False)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(metadata.pop("architecture"))["model_type"] == "llama"
    save_file(tensors, str(path), metadata)
    goat.load_adapter(tiny_llama(), path)
    fresh = transformers.LlamaForCausalLM(config).eval()
    fresh.load_state_dict(tiny_llama().state_dict())
    goat.load_adapter(fresh, path)  # an older file: nothing to compare


def test_rope_settings_agree_across_transformers_versions():
    """transformers 4 configs hold ``rope_theta`` + ``rope_scaling`` (GPT-NeoX:
    ``rotary_emb_base`` + ``rotary_pct``), transformers 5 configs one ``rope_parameters`` dict:
    the record puts both in one form, so the same settings agree (10000 and 10000.0 too) and
    other ones differ (one-sided fields were skipped: a RoPE base of 500000 passed for
    10000)."""
    from meldkit.goat.io import _agree, rope_settings

    llama3 = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    v4 = rope_settings({"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **llama3}})
    v5 = rope_settings(
        {
            "rope_parameters": {
                "type": "llama3",
                "rope_type": "llama3",
                "rope_theta": 500000,
                **llama3,
            }
        }
    )
    assert v4 == {"rope_type": "llama3", "rope_theta": 500000.0, **llama3}
    assert _agree(v5, v4)
    assert not _agree(v5, {**v4, "rope_theta": 10000.0})
    assert not _agree(v5, {**v4, "factor": 4.0})
    assert not _agree(v5, {**v4, "rope_type": "default"})
    neox4 = rope_settings({"rotary_emb_base": 10000, "rotary_pct": 0.25, "rope_scaling": None})
    neox5 = rope_settings(
        {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25}}
    )
    assert _agree(neox5, neox4) and not _agree(neox5, {**neox4, "partial_rotary_factor": 0.5})
    # a version that writes a default the other leaves out still agrees
    yarn4 = rope_settings({"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    yarn5 = {**yarn4, "original_max_position_embeddings": 32768}
    assert _agree(yarn5, yarn4)
    assert rope_settings({"rope_scaling": None}) is None  # no RoPE (GPT-2)


def test_adapter_refuses_another_rope_whatever_version_saved_it(tmp_path):
    """The installed transformers' Llama against records in either version's form, and in
    the form of files saved before the ``"rope"`` record (transformers 4: ``rope_theta`` only):
    the same RoPE loads, another base or scaling is refused, naming the check that failed and
    the way round it."""
    import json

    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = goat.save_adapter(goat.wrap(tiny_llama(), llama_config()), tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(metadata["architecture"])
    assert saved["rope"]["rope_theta"] == pytest.approx(10000.0)
    del saved["rope"]
    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    for rope, fits in (
        ({"rope_theta": 10000}, True),  # an earlier file of transformers 4
        ({"rope_theta": 500000.0}, False),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, True),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, False),
        ({"rope": {"rope_type": "default", "rope_theta": 10000.0}}, True),
        ({"rope": linear}, False),
    ):
        metadata["architecture"] = json.dumps({**saved, **rope})
        save_file(tensors, str(path), metadata)
        if fits:
            goat.load_adapter(tiny_llama(), path)
            continue
        with pytest.raises(
            goat.AdapterError, match=r"base config check: .* in rope=.*check_base=False"
        ):
            goat.load_adapter(tiny_llama(), path)
    config = tiny_llama().config
    if hasattr(config, "rope_parameters"):  # transformers 5
        config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    else:
        config.rope_scaling = {"type": "linear", "factor": 4.0}
    scaled = transformers.LlamaForCausalLM(config).eval()
    scaled.load_state_dict(tiny_llama().state_dict())
    goat.load_adapter(scaled, path)  # the last record: linear scaling, factor 4


@pytest.mark.parametrize("where", ["layers", "others", "saved"])
@pytest.mark.parametrize("check_base", [True, False])
def test_load_adapter_refuses_weights_on_the_meta_device(tmp_path, where, check_base):
    path = tmp_path / "adapter.safetensors"
    saved = ["lm_head"] if where == "saved" else []
    model = goat.wrap(tiny_llama(), llama_config(modules_to_save=saved), progress=False)
    goat.save_adapter(model, path)
    fresh = tiny_llama()
    if where == "layers":
        fresh.to("meta")
    elif where == "others":
        fresh.model.norm.to("meta")
    else:
        fresh.lm_head.to("meta")
    if where == "others" and not check_base:
        goat.load_adapter(fresh, path, check_base=False)  # the norm is not the adapter's
        assert len(list(goat.goat_layers(fresh))) == 2 * len(LLAMA_TARGETS)
        return
    with pytest.raises(goat.AdapterError, match="meta device"):
        goat.load_adapter(fresh, path, check_base=check_base, keep_original=False)
    assert not list(goat.goat_layers(fresh))
    assert not [k for k in vars(fresh) if k.startswith("_meldkit")]  # left untouched


def test_base_check_compares_a_bf16_base_held_in_fp32_exactly(tmp_path):
    # A bf16 checkpoint loaded in fp32 (every value bf16-exact): the same base in fp32 or in
    # bf16 loads; one whose other parameters a fine-tune moved by ~0.5 % is refused (a bf16
    # rounding tolerance of 8e-3 let it pass: the file records the narrowest dtype holding the
    # values, and the model's own dtype was compared with it).
    def rounded():
        model = tiny_llama()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        return model

    path = tmp_path / "adapter.safetensors"
    targets = ["q_proj", "v_proj"]
    goat.save_adapter(goat.wrap(rounded(), llama_config(target_modules=targets)), path)
    goat.load_adapter(rounded(), path)
    goat.load_adapter(rounded().to(torch.bfloat16), path)
    moved = rounded()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        moved.lm_head.weight.mul_(1 + 0.005 * torch.randn(moved.lm_head.weight.shape, generator=g))
    with pytest.raises(goat.AdapterError, match=r"lm_head\.weight"):
        goat.load_adapter(moved, path)


def test_a_saved_head_tied_to_the_embeddings_loads_into_its_base(tmp_path):
    # The trained head is the tied embeddings too: the base fingerprint left it out by the
    # head's name but took it under the embeddings' (trained) name, so the adapter refused the
    # base it was trained on. Wrapping warns that the tie trains the embeddings.
    transformers = pytest.importorskip("transformers")

    def tied():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval()

    config = llama_config(init="lora", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.warns(UserWarning, match=r"lm_head.weight is model.embed_tokens.weight"):
        model = goat.wrap(tied(), config, progress=False)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # a training step on the head (and the embeddings)
    ids = batch(96)
    with torch.no_grad():
        want = model(ids).logits
    goat.save_adapter(model, tmp_path / "a.safetensors")
    loaded = goat.load_adapter(tied(), tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_a_target_that_matches_nothing_is_named():
    with pytest.warns(UserWarning, match=r"entries \['v_prj'\] match no layer"):
        model = goat.wrap(tiny_llama(), llama_config(target_modules=["q_proj", "v_prj"]))
    assert len(list(goat.goat_layers(model))) == 2
