"""meldkit.twin.save / load: a round trip gives the same outputs; broken or foreign files fail
with a clear error; nothing temporary is left behind."""

from __future__ import annotations

import json

import pytest
import torch

from meldkit import twin
from tests.twin.models import batch, roberta, roberta_experts, roberta_layers

pytest.importorskip("transformers")


def test_round_trip(tmp_path):
    base, experts = roberta_experts(labels=(3, 4, 3))
    ex = twin.build(base, experts, rank_ratio=0.25, progress=False)
    model = twin.TwinModel(base, ex, top_k=2).eval()
    with torch.no_grad():
        for p in model.router.parameters():
            p.normal_()
    folder = twin.save(model, tmp_path / "twin")
    assert sorted(p.name for p in folder.iterdir()) == ["twin.json", "twin.safetensors"]
    loaded = twin.load(folder, roberta(5).eval())  # any weights: only the architecture is used
    assert loaded.tasks == model.tasks and loaded.top_k == 2
    assert not any(m.training for m in loaded.model.modules())  # replaced layers: eval too
    x = batch()
    torch.testing.assert_close(loaded(**x).logits, model(**x).logits, rtol=0, atol=0)
    assert loaded.experts.errors.keys() == ex.errors.keys()
    for name, errs in ex.errors.items():
        assert loaded.experts.errors[name] == pytest.approx(errs)


def test_load_errors(tmp_path):
    base, experts = roberta_experts()
    model = twin.TwinModel(base, twin.build(base, experts, progress=False))
    with pytest.raises(twin.TwinError, match=r"has no twin\.json"):
        twin.load(tmp_path, base)
    folder = twin.save(model, tmp_path / "t")
    meta = json.loads((folder / "twin.json").read_text())
    meta["format"] = "something else"
    (folder / "twin.json").write_text(json.dumps(meta))
    with pytest.raises(twin.TwinError, match=r"not a meldkit\.twin/1 file"):
        twin.load(folder, base)
    with pytest.raises(TypeError, match="expected a TwinModel"):
        twin.save(base, tmp_path / "x")


def test_damaged_files_raise_twin_error(tmp_path):
    """A truncated weights file or JSON, a JSON without its task list, or a router whose
    tensors do not fit its settings: TwinError naming the file, not a parser's own error."""
    base, experts = roberta_experts()
    model = twin.TwinModel(base, twin.build(base, experts, progress=False))
    folder = twin.save(model, tmp_path / "t")
    weights, settings = (folder / "twin.safetensors").read_bytes(), (folder / "twin.json")
    meta = json.loads(settings.read_text())
    (folder / "twin.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(twin.TwinError, match=r"twin\.safetensors is not a readable safetensors"):
        twin.load(folder, base)
    (folder / "twin.safetensors").write_bytes(weights)
    settings.write_text(json.dumps(meta)[:40])
    with pytest.raises(twin.TwinError, match=r"twin\.json is not readable JSON"):
        twin.load(folder, base)
    settings.write_text(json.dumps({k: v for k, v in meta.items() if k != "tasks"}))
    with pytest.raises(twin.TwinError, match="lacks its task list"):
        twin.load(folder, base)
    settings.write_text(json.dumps({**meta, "tasks": [*meta["tasks"], "extra"]}))
    with pytest.raises(twin.TwinError, match="the router's tensors do not match"):
        twin.load(folder, base)


def test_files_of_two_saves_are_refused(tmp_path):
    """The weights of one save beside the settings of another (a save stopped between its
    two renames, or one file copied over another) are refused, not read together."""
    base, experts = roberta_experts()
    model = twin.TwinModel(base, twin.build(base, experts, progress=False))
    first, second = twin.save(model, tmp_path / "a"), twin.save(model, tmp_path / "b")
    twin.load(first, base)
    (first / "twin.json").write_bytes((second / "twin.json").read_bytes())
    with pytest.raises(twin.TwinError, match="come from different saves"):
        twin.load(first, base)


def test_load_refuses_a_model_the_experts_do_not_cover(tmp_path):
    """A base with a layer more than the experts' would run that layer with its own weights:
    every floating parameter and buffer of the model must be one of the experts'."""
    base, experts = roberta_experts()
    folder = twin.save(twin.TwinModel(base, twin.build(base, experts, progress=False)), tmp_path)
    with pytest.raises(
        twin.TwinError,
        match=r"the experts have no tensor for the model's "
        r"'roberta\.encoder\.layer\.2\.attention\.self\.query\.weight'.*\(16 uncovered\)",
    ):
        twin.load(folder, roberta_layers(3))


def test_load_into_a_base_whose_head_has_another_size(tmp_path):
    """The head is task specific (each task's own is used), so a base architecture with another
    label count loads: its head takes the saved shared one's shape, the outputs and the loss
    are the saved twin's."""
    base, experts = roberta_experts()
    model = twin.TwinModel(base, twin.build(base, experts, rank_ratio=1.0, progress=False))
    model.eval()
    folder = twin.save(model, tmp_path / "twin")
    x, labels = batch(), torch.tensor([2, 0, 1, 2])
    for other in (roberta(5, num_labels=2), roberta(5, num_labels=4)):
        loaded = twin.load(folder, other.eval())
        assert loaded.model.classifier.out_proj.weight.shape == (3, 48)
        with torch.no_grad():
            for w in (None, torch.eye(3)[[0, 2, 1, 1]]):
                want = model(**x, weights=w, labels=labels)
                got = loaded(**x, weights=w, labels=labels)
                torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
                torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
            got = loaded(**x, weights=torch.eye(3)[[1] * 4], materialize=True).logits
            torch.testing.assert_close(got, experts["task1"](**x).logits, rtol=1e-5, atol=1e-5)


def test_round_trip_of_a_cast_twin(tmp_path):
    """A twin cast with ``.to(torch.bfloat16)`` computes with bf16 copies of its experts (its
    layers' buffers) and a bf16 router; the file keeps the experts as built. Loaded into a bf16
    base it computes as it did (it got fp32 experts: up to 1e-3 off); into an fp32 base, as
    the fp32 twin."""
    import copy

    base, experts = roberta_experts()
    model = twin.TwinModel(base, twin.build(base, experts, progress=False)).eval()
    with torch.no_grad():
        for p in model.router.parameters():
            p.normal_()
    cast = copy.deepcopy(model).to(torch.bfloat16)
    folder = twin.save(cast, tmp_path / "twin")
    x = batch()
    w = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), -1)
    loaded = twin.load(folder, roberta(0).to(torch.bfloat16))
    with torch.no_grad():
        assert torch.equal(loaded(**x, weights=w).logits, cast(**x, weights=w).logits)
        assert torch.equal(loaded.route(**x), cast.route(**x))
        assert torch.equal(loaded(**x).logits, cast(**x).logits)
    wide = twin.load(folder, roberta(0))
    with torch.no_grad():
        assert torch.equal(wide(**x, weights=w).logits, model(**x, weights=w).logits)


def test_load_refuses_another_config(tmp_path):
    """A base whose config changes the computation but no shape (head count, norm epsilon) is
    refused, naming the fields, unless check_base=False; files saved before the record load."""
    import transformers

    base, experts = roberta_experts()
    model = twin.TwinModel(base, twin.build(base, experts, progress=False)).eval()
    folder = twin.save(model, tmp_path / "twin")
    for field, value in (("num_attention_heads", 8), ("layer_norm_eps", 1e-2)):
        config = roberta(0).config
        setattr(config, field, value)
        other = transformers.RobertaForSequenceClassification(config).eval()
        with pytest.raises(twin.TwinError, match=rf"config differs .* in {field}=.*check_base"):
            twin.load(folder, other)
        twin.load(folder, other, check_base=False)  # the caller's choice
    meta = json.loads((folder / "twin.json").read_text())
    assert meta["architecture"]["num_attention_heads"] == 4
    del meta["architecture"]
    (folder / "twin.json").write_text(json.dumps(meta))
    assert isinstance(twin.load(folder, other), twin.TwinModel)


def test_load_compares_rope_of_records_from_either_transformers_version(tmp_path):
    """A twin's RoPE record is compared with the base's whatever transformers version wrote
    it: a record of transformers 4 (``rope_theta``, before ``"rope"``) with another base is
    refused (it was skipped: the installed version names it otherwise), the same one loads."""
    from tests.twin.models import llama_classifier, llama_classifier_experts

    base, experts = llama_classifier_experts()
    model = twin.TwinModel(base, twin.build(base, experts, progress=False)).eval()
    folder = twin.save(model, tmp_path / "twin")
    meta = json.loads((folder / "twin.json").read_text())
    assert meta["architecture"]["rope"]["rope_theta"] == pytest.approx(10000.0)
    del meta["architecture"]["rope"]
    for theta, fits in ((10000, True), (500000.0, False)):
        meta["architecture"]["rope_theta"] = theta
        (folder / "twin.json").write_text(json.dumps(meta))
        if fits:
            assert isinstance(twin.load(folder, llama_classifier()), twin.TwinModel)
            continue
        with pytest.raises(twin.TwinError, match=r"base config check: .* in rope=.*check_base"):
            twin.load(folder, llama_classifier())
        twin.load(folder, llama_classifier(), check_base=False)


def test_the_router_trained_flag_round_trips(tmp_path):
    """save/load keep whether the router was trained (an untrained one still warns after a
    reload); files written before the flag existed load as trained."""
    base, experts = roberta_experts()
    model = twin.TwinModel(base, twin.build(base, experts, progress=False))
    for trained in (False, True):
        model.router.trained = trained
        folder = twin.save(model, tmp_path / f"t{trained}")
        assert twin.load(folder, base).router.trained is trained
    meta = json.loads((folder / "twin.json").read_text())
    del meta["router"]["trained"]
    (folder / "twin.json").write_text(json.dumps(meta))
    assert twin.load(folder, base).router.trained is True
