"""The generative variant: Twin-Merging over PEFT LoRA adapters of a causal LM."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from meldkit import twin
from tests.twin.models import cache_of, cache_positions, one_hot, run_in_threads

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from meldkit.dlf._tiny import tiny_llama

    base = tiny_llama(0, vocab=64, hidden=32, dtype=torch.float32)
    folders = {}
    for t in range(3):
        torch.manual_seed(10 + t)
        config = peft.LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,  # random B as well: a trained adapter's shape
        )
        model = peft.get_peft_model(copy.deepcopy(base), config)
        folder = tmp_path_factory.mktemp(f"adapter{t}")
        model.save_pretrained(folder)
        folders[f"task{t}"] = folder
    return base, folders


def peft_model(base, folder):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def inputs():
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def test_shared_factors_and_full_rank(adapters):
    _, folders = adapters
    ex = twin.build_lora(folders, lam=0.3, rank=8)
    read = [twin.read_adapter(f) for f in folders.values()]
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(ex.shared_a[name], 0.3 * sum(r.a[name] for r in read))
    torch.testing.assert_close(ex.shared_b[name], 0.3 * sum(r.b[name] for r in read))
    assert ex.scaling[name] == 2.0  # lora_alpha / r
    assert max(max(e) for e in ex.errors.values()) < 1e-5  # rank 8 of 8: exact
    s = ex.storage()
    assert s["experts"] == 3 * s["shared"]


def test_one_hot_weights_give_each_adapter(adapters):
    base, folders = adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=8)).eval()
    x = inputs()
    for t, folder in enumerate(folders.values()):
        with torch.no_grad():
            got = model(**x, weights=one_hot(3, t, 3)).logits
            want = peft_model(base, folder)(**x).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generate_follows_the_routed_adapter(adapters):
    base, folders = adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=8)).eval()
    x = inputs()
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    for t, folder in enumerate(folders.values()):
        got = model.generate(**x, weights=one_hot(3, t, 3), **kw)
        with torch.no_grad():
            want = peft_model(base, folder).generate(**x, **kw)
        assert torch.equal(got, want)
    with pytest.raises(twin.TwinError, match="num_beams"):
        model.generate(**x, num_beams=2, **kw)


def test_low_rank_mix_and_router(adapters):
    base, folders = adapters
    ex = twin.build_lora(folders, rank=2)
    assert all(0 < e < 1 for errs in ex.errors.values() for e in errs)
    model = twin.TwinLoraModel(base, ex, top_k=2).eval()
    x = inputs()
    w = model.route(**x)
    assert w.shape == (3, 3) and ((w > 0).sum(-1) <= 2).all()
    with torch.no_grad():
        y = model(**x).logits
    assert torch.isfinite(y).all()
    # router features: the last real token's state, whatever the padding side
    feats = model.features(**x)
    right = {"input_ids": x["input_ids"][1:], "attention_mask": x["attention_mask"][1:]}
    torch.testing.assert_close(model.features(**right), feats[1:])


def test_errors(adapters, tmp_path):
    _, folders = adapters
    with pytest.raises(twin.TwinError, match="not a PEFT adapter folder"):
        twin.build_lora([tmp_path])
    with pytest.raises(twin.TwinError, match="'rank'"):
        twin.build_lora(folders, rank=0)
    with pytest.raises(twin.TwinError, match="'adapters' is empty"):
        twin.build_lora([])
    from meldkit.dlf._tiny import tiny_llama

    other = tiny_llama(0, vocab=64, hidden=48, dtype=torch.float32)
    with pytest.raises(twin.TwinError, match="do not fit"):
        twin.TwinLoraModel(other, twin.build_lora(folders))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save="),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern="),
        ({"init_lora_weights": "pissa"}, "modifies the base weights"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_adapters_it_cannot_represent_are_refused(adapters, tmp_path, setting, message):
    """DoRA, LoRA biases, saved modules, …: the adapter's math is not W·x + s·B·A·x."""
    base, folders = adapters
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path)
    cfg_file = tmp_path / "adapter_config.json"
    import json

    cfg = json.loads(cfg_file.read_text())
    cfg.update(setting)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(twin.TwinError, match=re.escape(message)):
        twin.read_adapter(tmp_path)
    with pytest.raises(twin.TwinError, match="only plain LoRA"):
        twin.build_lora({**folders, "odd": tmp_path})


def test_extra_adapter_tensors_are_refused(adapters):
    """A PeftModel with DoRA: its magnitude vectors are refused (config and tensors both)."""
    base, _ = adapters
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], use_dora=True)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with pytest.raises(twin.TwinError, match="use_dora"):
        twin.read_adapter(model)
    model.peft_config["default"].use_dora = False  # hide the flag: the tensors still tell
    with pytest.raises(twin.TwinError, match="lora_magnitude_vector"):
        twin.read_adapter(model)


def test_save_load_round_trip(adapters, tmp_path):
    base, folders = adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=4), top_k=2).eval()
    with torch.no_grad():
        for p in model.router.parameters():
            p.normal_()
    loaded = twin.load(twin.save(model, tmp_path / "t"), base)
    assert isinstance(loaded, twin.TwinLoraModel) and loaded.top_k == 2
    # the replaced layers keep the base's eval mode
    assert not base.training and not any(m.training for m in loaded.model.modules())
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


def test_load_refuses_another_base(adapters, tmp_path):
    """A LoRA twin adds to its base's weights: loading it over another base (another
    vocabulary, an extra layer, other weights) is refused, naming the difference, unless
    check_base=False. The same base in bf16 passes."""
    from meldkit.dlf._tiny import tiny_llama

    base, folders = adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=4), top_k=2).eval()
    folder = twin.save(model, tmp_path / "t")
    others = [
        (
            tiny_llama(0, vocab=72, hidden=32, dtype=torch.float32),
            r"it has parameter 'model\.embed_tokens\.weight' of shape \[72, 32\], the saved "
            r"base \[64, 32\]",
        ),
        (
            tiny_llama(0, vocab=64, hidden=32, layers=3, dtype=torch.float32),
            r"it has a parameter 'model\.layers\.2\.",
        ),
        (tiny_llama(1, vocab=64, hidden=32, dtype=torch.float32), r"fingerprint differs"),
    ]
    nudged = copy.deepcopy(base)
    with torch.no_grad():  # a base 0.2 % away in one adapted layer
        weight = nudged.get_submodule("model.layers.1.self_attn.v_proj").weight
        weight.mul_(1.002)
    others.append((nudged, r"layer 'model\.layers\.1\.self_attn\.v_proj'.*check_base=False"))
    # A base that differs only outside the adapted layers' weights (the LoRA twin adds to the
    # whole model): a layer not adapted, the embeddings, the final norm.
    for name, edit in (
        ("model.layers.0.self_attn.k_proj.weight", lambda w: w.mul_(1.5)),
        ("model.embed_tokens.weight", lambda w: w.add_(0.1)),
        ("model.norm.weight", lambda w: w.mul_(2.0)),
    ):
        changed = copy.deepcopy(base)
        with torch.no_grad():
            edit(changed.get_parameter(name))
        others.append((changed, rf"other values in parameter '{re.escape(name)}' than the saved"))
    for other, message in others:
        with pytest.raises(twin.TwinError, match=message):
            twin.load(folder, other)
    loaded = twin.load(folder, nudged, check_base=False)  # the caller's choice
    assert isinstance(loaded, twin.TwinLoraModel)
    twin.load(folder, copy.deepcopy(base).to(torch.bfloat16))  # same weights, rounded


def test_files_without_a_base_fingerprint_still_load(adapters, tmp_path):
    """Twins saved before the fingerprint (no base_sketch tensors, no "base" entry) load
    without the check, as before."""
    import json

    from safetensors.torch import load_file, save_file

    base, folders = adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=4), top_k=2).eval()
    folder = twin.save(model, tmp_path / "t")
    tensors = load_file(str(folder / "twin.safetensors"))
    assert any(k.startswith("base_sketch/") for k in tensors)
    old = {k: v for k, v in tensors.items() if not k.startswith("base_sketch/")}
    save_file(old, str(folder / "twin.safetensors"), {"format": "meldkit.twin/1"})
    meta = json.loads((folder / "twin.json").read_text())
    del meta["base"], meta["save_id"]
    (folder / "twin.json").write_text(json.dumps(meta))
    loaded = twin.load(folder, base)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


def test_router_trains_on_texts(adapters):
    """train_router on a TwinLoraModel from texts: the router reads the last token's state, and
    each task's prompts close with words of their own (a tiny random model's states are not
    separable beyond that)."""
    from meldkit.dlf._tiny import word_tokenizer

    base, folders = adapters
    words = [f"w{i:02d}" for i in range(60)]
    tok = word_tokenizer(words)
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=4)).eval()
    gen = torch.Generator().manual_seed(0)

    def texts(t, n):  # a shared start, then one of the task's own two closing words
        ends = torch.randint(0, 2, (n,), generator=gen).tolist()
        return [f"w10 w11 w12 {words[2 * t + e]}" for e in ends]

    train = {name: texts(t, 48) for t, name in enumerate(model.tasks)}
    val = {name: texts(t, 16) for t, name in enumerate(model.tasks)}
    fit = twin.train_router(
        model, train, val, tokenizer=tok, epochs=40, lr=5e-3, batch_size=24, progress=False
    )
    assert fit.best_val_accuracy >= 0.9
    enc = tok(texts(1, 4), return_tensors="pt", padding=True)
    assert (model.route(**enc).argmax(-1) == 1).all()


def _random_router(model):
    with torch.no_grad():
        for p in model.router.parameters():
            p.normal_()
    return model


def test_cached_decoding_keeps_the_prompts_routing(adapters):
    """A decoding step through forward with the KV cache the model returned: the routing pass
    leaves the cache alone (one position more per step), the step keeps the prompt's weights
    and equals the full sequence's last position under them. The router input of a step whose
    mask also covers the cached positions is the new token's state."""
    import inspect

    base, folders = adapters
    model = _random_router(twin.TwinLoraModel(base, twin.build_lora(folders, rank=4)).eval())
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    x = inputs()
    with torch.no_grad():
        w = model.route(**x)
        first = model(**x, use_cache=True)
        assert cache_positions(cache_of(first)) == 6
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([x["attention_mask"], torch.ones_like(nxt)], 1)
        step = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{key: cache_of(first)})
        assert cache_positions(cache_of(step)) == 7
        ids = torch.cat([x["input_ids"], nxt], 1)
        full = model(input_ids=ids, attention_mask=mask, weights=w).logits[:, -1]
        torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-4)
        feats = model.features(input_ids=nxt, attention_mask=mask)
        torch.testing.assert_close(feats, model.features(input_ids=nxt))


def test_generate_from_embeddings_routes_them(adapters):
    """``generate(inputs_embeds=...)`` routes the embeddings (the same weights as their ids);
    the caller's output arguments do not reach the routing pass."""
    base, folders = adapters
    model = _random_router(twin.TwinLoraModel(base, twin.build_lora(folders, rank=4)).eval())
    x = inputs()
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(x["input_ids"])
        w = model.route(**x)
        torch.testing.assert_close(
            model.route(inputs_embeds=embeds, attention_mask=x["attention_mask"]), w
        )
        got = model.generate(inputs_embeds=embeds, attention_mask=x["attention_mask"], **kw)
        want = model.generate(
            inputs_embeds=embeds, attention_mask=x["attention_mask"], weights=w, **kw
        )
        assert got.shape == (3, 4) and torch.equal(got, want)
        logits = model(**x).logits
        assert torch.equal(model(**x, return_dict=False)[0], logits)
        out = model(**x, output_hidden_states=True)
        assert len(out.hidden_states) == 3 and torch.equal(out.logits, logits)


def test_a_twin_lora_model_cast_to_bfloat16_routes(adapters):
    """``TwinLoraModel.to(bfloat16)`` casts the router too: the routed forward and ``generate``
    run (the float32 features are cast to the router's dtype)."""
    base, folders = adapters
    ex = twin.build_lora(folders, rank=8)
    model = twin.TwinLoraModel(base, ex).eval().to(torch.bfloat16)
    x = inputs()
    with torch.no_grad():
        w = model.route(**x)
        out = model(**x).logits
        # the base's own logits dtype: bf16, or float32 where transformers < 4.45 upcasts them
        assert out.dtype == model.model(**x).logits.dtype
        torch.testing.assert_close(out, model(**x, weights=w).logits)
        seq = model.generate(**x, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seq.shape == (3, 8)


def test_forwards_from_several_threads_keep_their_own_routing(adapters):
    base, folders = adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=8)).eval()
    x = inputs()
    ws = [one_hot(3, t, 3) for t in range(3)]
    with torch.no_grad():
        wants = [model(**x, weights=w).logits for w in ws] + [model(**x).logits]

    def call(t):
        return model(**x, weights=ws[t]).logits if t < 3 else model(**x).logits

    assert run_in_threads(call, wants, calls=15) == (0, [])


def test_a_feature_function_for_the_router(adapters, tmp_path):
    """``TwinLoraModel(features=...)`` replaces the last token's state as the router input, and
    ``twin.load(..., features=...)`` passes it on (as for a full twin)."""
    base, folders = adapters
    calls = []

    def mean_state(model, *args, **kwargs):
        calls.append(1)
        return twin.mean_pooled_last_hidden(model, *args, **kwargs)

    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=4), features=mean_state)
    _random_router(model).eval()
    x = inputs()
    with torch.no_grad():
        want = model.router(twin.mean_pooled_last_hidden(model.model, **x))
        torch.testing.assert_close(model.route(**x), torch.softmax(want, -1))
        assert calls == [1]
        loaded = twin.load(twin.save(model, tmp_path / "t"), base, features=mean_state)
        torch.testing.assert_close(loaded.route(**x), model.route(**x))
    assert len(calls) == 3


# Adapters the reference cannot merge: ranks 4 and 8, different lora_alpha, rsLoRA, and target
# modules that differ (task0 and task2 share none).
MIXED = {
    "task0": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "task1": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]},
    "task2": {
        "r": 8,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": ["k_proj", "up_proj"],
    },
}


@pytest.fixture(scope="module")
def mixed_adapters(tmp_path_factory):
    from meldkit.dlf._tiny import tiny_llama

    base = tiny_llama(0, vocab=64, hidden=32, dtype=torch.float32)
    folders = {}
    for t, (task, kw) in enumerate(MIXED.items()):
        torch.manual_seed(20 + t)
        config = peft.LoraConfig(init_lora_weights=False, **kw)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        folder = tmp_path_factory.mktemp(f"mixed{t}")
        model.save_pretrained(folder)
        folders[task] = folder
    return base, folders


def test_mixed_adapters_are_aligned(mixed_adapters):
    _, folders = mixed_adapters
    read = [twin.read_adapter(f) for f in folders.values()]
    assert [r.scaling["model.layers.0.self_attn.q_proj"] for r in read[:2]] == [4.0, 1.0]
    assert read[2].scaling["model.layers.0.self_attn.k_proj"] == 16 / 8**0.5
    aligned, scaling = twin.align_adapters(read)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert scaling[q] == 1.0 and scaling[k] == 16 / 8**0.5  # differing: folded; alone: kept
    for ad, r in zip(aligned, read, strict=True):
        assert ad.a[q].shape == (8, 32) and ad.b[q].shape[1] == 8
        if q in r.a:  # B·A times the scaling is the adapter's own update
            torch.testing.assert_close(
                ad.b[q] @ ad.a[q], r.scaling[q] * r.b[q] @ r.a[q], rtol=1e-6, atol=1e-6
            )
    assert not aligned[0].a[k].any() and not aligned[0].b[k].any()  # task0 leaves k_proj alone
    assert torch.equal(aligned[2].a[k], read[2].a[k])
    ex = twin.build_lora(folders, lam=0.3, rank=8)
    assert set(ex.shared_a) == set().union(*(r.a for r in read))
    torch.testing.assert_close(ex.shared_b[q], 0.3 * (aligned[0].b[q] + aligned[1].b[q]))
    assert max(max(e) for e in ex.errors.values()) < 1e-5  # rank 8 of 8: exact
    # storage against the adapters as they are (their own ranks and modules), not padded
    own = sum(t.numel() * 4 for r in read for t in (*r.a.values(), *r.b.values()))
    assert ex.storage()["experts"] == own < 3 * ex.storage()["shared"]


def test_mixed_adapters_one_hot_give_each_adapter(mixed_adapters):
    base, folders = mixed_adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=8)).eval()
    x = inputs()
    for t, folder in enumerate(folders.values()):
        with torch.no_grad():
            got = model(**x, weights=one_hot(3, t, 3)).logits
            want = peft_model(base, folder)(**x).logits
            plain = base(**x).logits
        assert not torch.allclose(want, plain, rtol=1e-3, atol=1e-3)  # the adapter matters
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mismatched_layer_shapes_are_refused(mixed_adapters):
    _, folders = mixed_adapters
    read = twin.read_adapter(folders["task0"])
    q = "model.layers.0.self_attn.q_proj"
    bad = twin.LoraAdapter({q: torch.zeros(4, 16)}, {q: torch.zeros(32, 4)}, {q: 1.0})
    with pytest.raises(twin.TwinError, match="do not fit one layer"):
        twin.build_lora([read, bad])


def test_load_refuses_another_config_and_keeps_a_cast(adapters, tmp_path):
    """A LoRA twin over a base with the same weights but another config (RMSNorm epsilon) is
    refused unless check_base=False; one saved after ``.to(torch.bfloat16)`` and loaded into
    the bf16 base computes as it did."""
    import transformers

    base, folders = adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=4)).eval()
    with torch.no_grad():
        for p in model.router.parameters():
            p.normal_()
    folder = twin.save(model, tmp_path / "t")
    config = copy.deepcopy(base.config)
    config.rms_norm_eps = 1e-2
    other = transformers.LlamaForCausalLM(config).eval()
    other.load_state_dict(base.state_dict())
    with pytest.raises(twin.TwinError, match=r"config differs .* in rms_norm_eps=0\.01"):
        twin.load(folder, other)
    twin.load(folder, other, check_base=False)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    loaded = twin.load(twin.save(cast, tmp_path / "bf16"), copy.deepcopy(base).to(torch.bfloat16))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, cast(**x).logits)


def test_a_training_step_with_labels_and_nothing_to_train_is_refused(adapters):
    # Trainer.train's call on a LoRA twin whose base is frozen: a TwinError naming the way
    # out, not "element 0 of tensors does not require grad" from backward.
    base, folders = adapters
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=4), top_k=2)
    model.router.trained = True
    x = inputs()
    model.train()
    if any(p.requires_grad for p in model.model.parameters()):
        pytest.skip("this base trains: nothing to refuse")
    with pytest.raises(twin.TwinError, match=r"TwinLoraModel: a training step with labels"):
        model(**x, labels=x["input_ids"])


def test_gpt2_conv1d_adapters_give_each_adapter(tmp_path):
    # GPT-2's projections are transformers' Conv1D (weight [in, out]); PEFT's LoRA on them is
    # the same x·Aᵀ·Bᵀ. TwinLoraModel refused them after build_lora had taken the adapters.
    from tests.twin.models import gpt2

    base = gpt2(0)
    folders = {}
    for t in range(2):
        torch.manual_seed(20 + t)
        config = peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
        folders[f"task{t}"] = tmp_path / f"a{t}"
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(folders[f"task{t}"])
    model = twin.TwinLoraModel(base, twin.build_lora(folders, rank=4)).eval()
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    for t, folder in enumerate(folders.values()):
        with torch.no_grad():
            got = model(input_ids=ids, weights=one_hot(3, t, 2)).logits
            want = peft_model(base, folder)(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
