"""meldkit.twin.build: the shared expert, exact factors at full rank, the rank rule, exclusion,
checkpoint folders, and its errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from meldkit import twin
from meldkit.twin.build import tensor_rank
from tests.twin.models import (
    bart_classifier,
    gpt2,
    llama_classifier_experts,
    one_hot,
    perturbed,
    roberta_experts,
    roberta_layers,
)

pytest.importorskip("transformers")


def params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def test_shared_is_task_arithmetic_and_full_rank_is_exact():
    base, experts = roberta_experts()
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    assert ex.tasks == list(experts)
    b = params(base)
    e = [params(m) for m in experts.values()]
    for name in ex.factors:
        shared = b[name] + 0.29 * sum(p[name] - b[name] for p in e)  # θ_0 + λ Σ τ_t
        torch.testing.assert_close(ex.shared[name], shared, rtol=1e-5, atol=1e-6)
        for t in range(len(e)):
            torch.testing.assert_close(
                ex.exclusive(name, t), e[t][name] - ex.shared[name], rtol=1e-4, atol=2e-6
            )
        assert max(ex.errors[name]) < 1e-5
    for name, parts in ex.dense.items():  # 1-D: LayerNorm weights, kept dense
        assert parts.shape == (3, *b[name].shape)
        for t in range(3):
            torch.testing.assert_close(parts[t], e[t][name] - ex.shared[name])


def test_default_exclusion_keeps_heads_and_biases_per_task():
    base, experts = roberta_experts()
    ex = twin.build(base, experts, progress=False)
    names = set(params(base))
    assert {n for n in names if "classifier" in n or "bias" in n} == set(ex.specific)
    e = [params(m) for m in experts.values()]
    for name, values in ex.specific.items():
        for t, v in enumerate(values):
            assert torch.equal(v, e[t][name])
        assert torch.equal(ex.shared[name], params(base)[name])  # the shared model: the base's
    everything = twin.build(base, experts, exclude=None, progress=False)
    assert not everything.specific


def test_rank_rule_and_compression_error():
    assert tensor_rank((768, 3072), 0.1, None) == 76
    assert tensor_rank((1, 768), 0.1, None) == 1  # the reference rounds to 0 and zeroes it
    assert tensor_rank((10, 20), 0.1, 50) == 10
    base, experts = roberta_experts()
    ex = twin.build(base, experts, rank_ratio=0.1, progress=False)
    e = [params(m) for m in experts.values()]
    for name, (a, b) in ex.factors.items():
        m, n = ex.shared[name].shape
        r = max(1, int(0.1 * min(m, n)))
        assert a.shape == (3, m, r) and b.shape == (3, n, r)
        for t in range(3):
            v = e[t][name] - ex.shared[name]
            err = float((v - a[t] @ b[t].T).norm() / v.norm())
            assert math.isclose(err, ex.errors[name][t], rel_tol=1e-3, abs_tol=1e-6)
            # the best rank-r approximation: the tail of the singular values
            s = torch.linalg.svdvals(v)
            best = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
            assert math.isclose(err, best, rel_tol=1e-3, abs_tol=1e-6)
    fixed = twin.build(base, experts, rank=2, progress=False)
    assert all(fixed.rank(n) == min(2, *fixed.shared[n].shape) for n in fixed.factors)


def test_storage_counts_factors_not_dense_experts():
    base, experts = roberta_experts()
    ex = twin.build(base, experts, rank_ratio=0.1, progress=False)
    s = ex.storage()
    assert s["twin"] == s["shared"] + s["exclusive"] + s["specific"]
    dense = sum(ex.shared[n].numel() * 4 for n in list(ex.factors) + list(ex.dense))
    assert s["experts"] == 3 * dense + s["specific"]
    assert s["exclusive"] < 3 * dense * 0.5


def test_other_shared_methods_and_state_dicts():
    base, experts = roberta_experts()
    sds = {k: m.state_dict() for k, m in experts.items()}
    ex = twin.build(
        base.state_dict(),
        sds,
        shared="ties",
        shared_params={"density": 0.5, "lambda": 1.0},
        rank_ratio=1.0,
        progress=False,
    )
    assert ex.config["shared"] == "ties"
    name = next(iter(ex.factors))
    e = [sd[name] for sd in sds.values()]
    torch.testing.assert_close(ex.exclusive(name, 1), e[1] - ex.shared[name], rtol=1e-4, atol=2e-6)


def test_checkpoint_folders_equal_in_memory(tmp_path):
    from safetensors.torch import save_file

    base, experts = roberta_experts()

    def save(model, name):
        folder = tmp_path / name
        folder.mkdir()
        save_file(
            {k: v.contiguous() for k, v in params(model).items()}, folder / "model.safetensors"
        )
        return folder

    paths = {k: save(m, k) for k, m in experts.items()}
    a = twin.build(save(base, "base"), paths, progress=False)
    b = twin.build(base, experts, progress=False)
    assert a.factors.keys() == b.factors.keys()
    for name in b.factors:
        assert torch.equal(a.shared[name], b.shared[name])
        assert torch.equal(a.factors[name][0], b.factors[name][0])


def test_errors_name_the_problem():
    base, experts = roberta_experts()
    with pytest.raises(twin.TwinError, match="'experts' is empty"):
        twin.build(base, [], progress=False)
    with pytest.raises(twin.TwinError, match="rank_ratio"):
        twin.build(base, experts, rank_ratio=0.0, progress=False)
    with pytest.raises(
        twin.TwinError, match=r"'rank_ratio' must be a number in \(0, 1\], got '0\.1'"
    ):
        twin.build(base, experts, rank_ratio="0.1", progress=False)
    with pytest.raises(twin.TwinError, match="'rank'"):
        twin.build(base, experts, rank=0, progress=False)
    sd = dict(experts["task1"].state_dict())
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    sd[name] = sd[name][:, :10]
    with pytest.raises(twin.TwinError, match=r"query\.weight.*shape"):
        twin.build(base, [experts["task0"].state_dict(), sd], progress=False)
    del sd[name]
    with pytest.raises(twin.TwinError, match=r"has no tensor.*query\.weight"):
        twin.build(base, [experts["task0"].state_dict(), sd], progress=False)
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        twin.build(base, [42], progress=False)
    # two keys that name one task; a factor dtype that is not floating (int truncated to 0)
    with pytest.raises(twin.TwinError, match="two experts are named '1'"):
        twin.build(base, {1: experts["task0"], "1": experts["task1"]}, progress=False)
    for bad in (torch.int32, "float16"):
        with pytest.raises(twin.TwinError, match="'factor_dtype' must be a floating"):
            twin.build(base, experts, factor_dtype=bad, progress=False)
    broken = {k: v.clone() for k, v in experts["task1"].state_dict().items()}
    broken[name][0, 0] = float("nan")
    with pytest.raises(twin.TwinError, match=rf"{name!r} of expert 'task1' holds NaN or inf"):
        twin.build(base, {"task0": experts["task0"], "task1": broken}, progress=False)


def test_rank_takes_any_integer_scalar():
    np = pytest.importorskip("numpy")
    base, experts = roberta_experts()
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    for rank in (np.int64(4), torch.tensor(4)):
        ex = twin.build(base, experts, rank=rank, progress=False)
        assert ex.rank(name) == 4 and type(ex.config["rank"]) is int
    with pytest.raises(twin.TwinError, match=r"'rank' must be an int ≥ 1, got 4\.0"):
        twin.build(base, experts, rank=4.0, progress=False)


def test_every_expert_must_hold_the_same_tensors():
    """Tensors the base lacks (heads over a bare base) must be in every expert: an expert with
    a layer more, first or later, is refused, naming it and the tensors."""
    base, experts = roberta_experts()
    deeper = roberta_layers(3, seed=1)
    with pytest.raises(
        twin.TwinError,
        match=r"expert 'task1' has 16 tensor\(s\) that the base and expert 'task0' lack: "
        r"'roberta\.encoder\.layer\.2\.",
    ):
        twin.build(base, {"task0": experts["task0"], "task1": deeper}, progress=False)
    with pytest.raises(
        twin.TwinError,
        match=r"expert 'task1' lacks 16 tensor\(s\) that expert 'task0' has \(and the base "
        r"lacks\): 'roberta\.encoder\.layer\.2\.",
    ):
        twin.build(base, {"task0": deeper, "task1": experts["task0"]}, progress=False)


@pytest.mark.filterwarnings("ignore:.*rebuilt densely per sample")
def test_tied_weights_in_state_dicts_are_one_tensor():
    """A tied model's state dict lists the tied weight under each name (views of one storage):
    it is one tensor, as from the modules, and the model built over it gives each expert. An
    expert that holds the names as separate copies must hold one value in them."""
    base = gpt2()
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    a = twin.build(base.state_dict(), [e.state_dict() for e in experts], progress=False)
    b = twin.build(base, experts, progress=False)
    assert a.factors.keys() == b.factors.keys() and a.specific.keys() == b.specific.keys()
    assert "lm_head.weight" not in a.factors and "lm_head.weight" not in a.specific
    for name in b.factors:
        assert torch.equal(a.factors[name][0], b.factors[name][0])
    full = twin.build(
        base.state_dict(), [e.state_dict() for e in experts], rank_ratio=1.0, progress=False
    )
    model = twin.TwinModel(base, full).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids, weights=one_hot(2, 1, 2)).logits
        torch.testing.assert_close(got, experts[1](input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    copies = {k: v.clone() for k, v in experts[0].state_dict().items()}  # no shared storage
    c = twin.build(base, [copies, experts[1]], progress=False)
    assert c.factors.keys() == b.factors.keys()
    copies["lm_head.weight"] += 1.0
    with pytest.raises(
        twin.TwinError,
        match=r"'lm_head\.weight' and 'transformer\.wte\.weight' are one \(tied\) tensor in "
        r"the base but differ in expert 'task0'",
    ):
        twin.build(base, [copies, experts[1]], progress=False)


def test_default_exclusion_finds_heads_named_score_and_classification_head():
    """Llama/Qwen/Mistral/GPT-2 classifiers call their head ``score``, BART and T5
    ``classification_head``: by default they stay per task (not merged and compressed), with
    one label count or several; a causal LM's ``lm_head`` is still merged."""
    base, experts = llama_classifier_experts(labels=(3, 3, 3))
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    assert "score.weight" in ex.specific and "score.weight" not in ex.factors
    for t, e in enumerate(experts.values()):
        assert torch.equal(ex.specific["score.weight"][t], e.score.weight)
    base, experts = llama_classifier_experts(labels=(3, 5, 7))
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    assert [v.shape[0] for v in ex.specific["score.weight"]] == [3, 5, 7]
    bart = bart_classifier()
    bart_experts = [perturbed(bart, seed=s) for s in (1, 2)]
    ex = twin.build(bart, bart_experts, rank_ratio=0.5, progress=False)
    heads = {n for n in params(bart) if n.startswith("classification_head.")}
    assert heads and heads <= set(ex.specific) and not heads & set(ex.factors)
    lm = gpt2()
    ex = twin.build(lm, [perturbed(lm, seed=s) for s in (1, 2)], progress=False)
    assert "transformer.wte.weight" in ex.factors and not ex.specific.keys() - {
        n for n in params(lm) if "bias" in n
    }


def test_default_exclusion_keeps_tensors_of_different_shapes_per_task():
    """With the default ``exclude``, a tensor whose first dimension differs between the experts
    (a head under a name no pattern knows) is task specific, with a warning that names it; an
    explicit ``exclude`` is taken as given, and such a tensor is an error. (Other differences
    are always errors: ``test_errors_name_the_problem``.)"""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    experts = []
    for s, n in zip((1, 2), (3, 4), strict=True):
        e = perturbed(base, seed=s)
        e[2] = torch.nn.Linear(8, n)
        experts.append(e)
    with pytest.warns(UserWarning, match=r"kept per task, not merged: '2\.weight'"):
        ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    assert {"2.weight", "2.bias"} <= set(ex.specific) and "0.weight" in ex.factors
    assert [v.shape[0] for v in ex.specific["2.weight"]] == [3, 4]
    with pytest.raises(twin.TwinError, match=r"'2\.weight': shape \[4, 8\] in expert 'task1'"):
        twin.build(base, experts, exclude=("bias",), progress=False)


def test_a_nan_in_the_base_names_the_tensor():
    base, experts = roberta_experts()
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    broken = {k: v.clone() for k, v in base.state_dict().items()}
    broken[name][0, 0] = float("nan")
    with pytest.raises(twin.TwinError, match=rf"{name!r} of the base holds NaN or inf"):
        twin.build(broken, experts, progress=False)


def test_shared_ties_trims_over_the_whole_model():
    """``shared_params={"trim_scope": "model"}``: each expert's task vector keeps its top
    ``density`` over all merged tensors at once (the k-th largest magnitude of their
    concatenation, ties kept), not per tensor; here the second layer moves 10x more, so it
    keeps most of the entries."""
    from meldkit.merging import merge_state_dicts
    from meldkit.ops.merge_ref import magnitude_threshold_ref

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    experts = [perturbed(base, seed=s) for s in (1, 2, 3)]
    for e in experts:
        with torch.no_grad():
            e[2].weight.copy_(base[2].weight + 10 * (e[2].weight - base[2].weight))
    shared_params = {"density": 0.3, "lambda": 1.0, "trim_scope": "model"}
    ex = twin.build(
        base, experts, shared="ties", shared_params=shared_params, exclude=None, progress=False
    )
    b = params(base)
    names = list(b)
    thresholds = [
        float(
            magnitude_threshold_ref(
                torch.cat([(params(e)[n] - b[n]).flatten() for n in names]).abs(), 0.3
            )
        )
        for e in experts
    ]
    want = merge_state_dicts(
        b,
        [params(e) for e in experts],
        "ties",
        densities=[0.3] * 3,
        lam=1.0,
        thresholds=thresholds,
        tie="keep_ties",
    )
    for n in names:
        torch.testing.assert_close(ex.shared[n], want[n], rtol=0, atol=0)
    per_tensor = twin.build(
        base,
        experts,
        shared="ties",
        shared_params={"density": 0.3, "lambda": 1.0},
        exclude=None,
        progress=False,
    )
    assert not torch.equal(per_tensor.shared["0.weight"], ex.shared["0.weight"])
    assert ex.config["shared_params"]["trim_scope"] == "model"


@pytest.mark.parametrize(
    ("shared", "extra", "match"),
    [
        ("ties", {"trim_scope": "layer"}, "'trim_scope' must be 'tensor' or 'model'"),
        ("task_arithmetic", {"trim_scope": "model"}, "shared='task_arithmetic' has none"),
        ("ties", {"trim_scope": "model", "tie": "exact_k"}, "tie='exact_k'"),
    ],
)
def test_shared_trim_scope_errors(shared, extra, match):
    base = torch.nn.Linear(4, 4)
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    with pytest.raises(twin.TwinError, match=match):
        twin.build(
            base,
            experts,
            shared=shared,
            shared_params={"density": 0.5, **extra},
            exclude=None,
            progress=False,
        )


@pytest.mark.parametrize("source", ["memory", "folders"])
def test_experts_in_another_dtype_than_the_base(tmp_path, source):
    # bfloat16 fine-tunes of a float32 base merge at their precision (bf16 -> fp32 is exact):
    # the same twin as from the experts cast to float32. It was a MergeError naming "model 0".
    base, experts = roberta_experts(2)
    half = {k: copy.deepcopy(e).to(torch.bfloat16) for k, e in experts.items()}
    want = twin.build(base, {k: copy.deepcopy(e).float() for k, e in half.items()}, progress=False)
    for params in (
        {},
        {"shared": "ties", "shared_params": {"density": 0.5, "trim_scope": "model"}},
    ):
        if params:
            want = twin.build(
                base,
                {k: copy.deepcopy(e).float() for k, e in half.items()},
                progress=False,
                **params,
            )
        if source == "folders":
            base.save_pretrained(tmp_path / "base")
            for k, e in half.items():
                e.save_pretrained(tmp_path / k)
            got = twin.build(
                tmp_path / "base", {k: tmp_path / k for k in half}, progress=False, **params
            )
        else:
            got = twin.build(base, half, progress=False, **params)
        assert got.shared.keys() == want.shared.keys()
        for k in want.shared:
            assert got.shared[k].dtype == want.shared[k].dtype, k
            assert torch.equal(got.shared[k], want.shared[k]), k
        for k in want.factors:
            for g, w in zip(got.factors[k], want.factors[k], strict=True):
                assert torch.equal(g, w), k


def test_pickle_checkpoints_need_allow_pickle(tmp_path):
    from meldkit.merging.checkpoint import CheckpointError

    base, experts = roberta_experts(2)
    (tmp_path / "e0").mkdir()
    torch.save(experts["task0"].state_dict(), tmp_path / "e0" / "pytorch_model.bin")
    given = [tmp_path / "e0", experts["task1"]]
    with pytest.raises(CheckpointError, match=r"expert 'task0'.*pass allow_pickle=True$"):
        twin.build(base, given, progress=False)
    got = twin.build(base, given, progress=False, allow_pickle=True)
    want = twin.build(base, list(experts.values()), progress=False)
    assert all(torch.equal(got.shared[k], want.shared[k]) for k in want.shared)


def test_errors_are_those_of_the_factors_as_stored():
    # bfloat16 factors rebuild v_t only up to their rounding: the reported error is theirs (it
    # was the float32 SVD's, 0 at full rank).
    base, experts = roberta_experts(2)
    base = copy.deepcopy(base).to(torch.bfloat16)
    experts = {k: copy.deepcopy(e).to(torch.bfloat16) for k, e in experts.items()}
    built = twin.build(base, experts, rank_ratio=1.0, progress=False)
    thetas = [dict(e.named_parameters()) for e in experts.values()]
    worst = 0.0
    for name, (a, b) in built.factors.items():
        for t, theta in enumerate(thetas):
            v = theta[name].float() - built.shared[name].float()
            real = float((v - a[t].float() @ b[t].float().T).norm() / v.norm())
            assert built.errors[name][t] == pytest.approx(real, rel=1e-3, abs=1e-7), name
            worst = max(worst, real)
    assert worst > 1e-4  # bfloat16 rounding, not 0
