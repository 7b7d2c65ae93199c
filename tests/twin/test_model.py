"""TwinModel: a one-hot router gives each expert's own outputs (exactly at full rank, within the
measured compression error below it), the activation path equals the reference's per-sample
rebuild (``materialize=True``), heads and biases follow each sample's task, routing, router
training with held-out selection, and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meldkit import twin
from tests.twin.models import (
    bart_classifier,
    batch,
    cache_of,
    cache_positions,
    gpt2,
    llama_classifier_experts,
    one_hot,
    perturbed,
    roberta_experts,
    run_in_threads,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def full_rank():
    base, experts = roberta_experts()
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    return base, experts, twin.TwinModel(base, ex).eval()


@pytest.fixture(scope="module")
def compressed():
    base, experts = roberta_experts()
    ex = twin.build(base, experts, rank_ratio=0.1, progress=False)
    return base, experts, twin.TwinModel(base, ex).eval()


def test_one_hot_router_gives_each_expert_at_full_rank(full_rank):
    _, experts, model = full_rank
    x = batch()
    assert model.per_sample_modules == []  # every routed module has a batched twin layer
    for t, expert in enumerate(experts.values()):
        got = model(**x, weights=one_hot(4, t, 3)).logits
        torch.testing.assert_close(got, expert(**x).logits, rtol=1e-5, atol=1e-5)


def test_one_hot_router_below_full_rank_is_within_the_compression_error(compressed):
    _, experts, model = compressed
    x = batch()
    errors = []
    for t, expert in enumerate(experts.values()):
        got = model(**x, weights=one_hot(4, t, 3)).logits
        want = expert(**x).logits
        errors.append(float((got - want).detach().norm() / want.detach().norm()))
        # the same merged weights, rebuilt densely: the activation path's only error is rounding
        mat = model(**x, weights=one_hot(4, t, 3), materialize=True).logits
        torch.testing.assert_close(got, mat, rtol=1e-5, atol=1e-5)
    # rank 10 % of a model whose experts differ by random (full-rank) noise: a large error, and
    # not zero; reported, not hidden
    assert all(0.0 < e < 1.0 for e in errors)


@pytest.mark.parametrize("rank_ratio", [1.0, 0.25])
@pytest.mark.parametrize("routing", ["dense", "sparse"])
def test_activation_path_equals_materialize(rank_ratio, routing):
    """Dense weights run the gate-mode op; weights with zeros (top-k) run each expert on its own
    samples only (an expert used by every sample, by some, by none)."""
    base, experts = roberta_experts()
    ex = twin.build(base, experts, rank_ratio=rank_ratio, progress=False)
    model = twin.TwinModel(base, ex).eval()
    x = batch(b=5, seed=3)
    w = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), -1)
    if routing == "sparse":
        w = w * torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 0], [1, 0, 1], [1, 0, 1.0]])
    task = torch.tensor([0, 2, 1, 1, 0])
    got = model(**x, weights=w, task=task).logits
    want = model(**x, weights=w, task=task, materialize=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_heads_follow_the_task_and_pad_with_minus_inf():
    base, experts = roberta_experts(labels=(3, 5, 2))
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    model = twin.TwinModel(base, ex).eval()
    x = batch()
    w = torch.full((4, 3), 1 / 3)
    logits = model(**x, weights=w, task=["task1", "task2", "task0", "task1"]).logits
    assert logits.shape == (4, 5)
    assert torch.isinf(logits[1, 2:]).all() and torch.isfinite(logits[1, :2]).all()
    assert torch.isinf(logits[2, 3:]).all() and torch.isfinite(logits[0]).all()
    mat = model(**x, weights=w, task=[1, 2, 0, 1], materialize=True).logits
    torch.testing.assert_close(logits, mat, rtol=1e-5, atol=1e-5)
    # one-hot on task 1 with its own head: expert 1 exactly
    got = model(**x, weights=one_hot(4, 1, 3)).logits
    torch.testing.assert_close(got, experts["task1"](**x).logits, rtol=1e-5, atol=1e-5)


def test_labels_give_the_routed_tasks_loss(full_rank):
    """``labels`` never reach the routing pass (the shared head need not fit them); with heads
    of one size the model's own loss runs on each sample's head."""
    _, experts, model = full_rank
    x, labels = batch(), torch.tensor([2, 0, 1, 2])
    seen = []
    features = model.features_fn
    model.features_fn = lambda m, *a, **kw: seen.append(set(kw)) or features(m, *a, **kw)
    try:
        out = model(**x, labels=labels)  # routed by the router
    finally:
        model.features_fn = features
    assert seen and all("labels" not in keys for keys in seen)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    for t, expert in enumerate(experts.values()):
        got = model(**x, labels=labels, weights=one_hot(4, t, 3))
        want = expert(**x, labels=labels)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
        mat = model(**x, labels=labels, weights=one_hot(4, t, 3), materialize=True)
        torch.testing.assert_close(mat.loss, want.loss, rtol=1e-5, atol=1e-5)


def test_labels_with_heads_of_different_sizes():
    base, experts = roberta_experts(labels=(3, 5, 2))
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    model = twin.TwinModel(base, ex).eval()
    assert model.label_counts == [3, 5, 2]
    x, labels = batch(), torch.tensor([4, 1, 0, 4])
    out = model(**x, labels=labels, task=1)  # the router's weights, task 1's head
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    want = F.cross_entropy(experts["task1"](**x).logits, labels)
    got = model(**x, labels=labels, weights=one_hot(4, 1, 3))
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5)
    # mixed tasks: each label against its own task's classes (padding columns are -inf)
    w, task, mixed = torch.full((4, 3), 1 / 3), [1, 2, 0, 1], torch.tensor([4, 1, -100, 0])
    out = model(**x, labels=mixed, weights=w, task=task)
    own = [out.logits[i, : (5, 2, 3, 5)[i]] for i in range(4)]
    expected = torch.stack([-torch.log_softmax(own[i], -1)[mixed[i]] for i in (0, 1, 3)]).mean()
    torch.testing.assert_close(out.loss, expected)
    mat = model(**x, labels=mixed, weights=w, task=task, materialize=True)
    torch.testing.assert_close(mat.loss, out.loss, rtol=1e-5, atol=1e-5)
    with pytest.raises(twin.TwinError, match="label 4 of sample 2 is not a class of its task"):
        model(**x, labels=torch.tensor([4, 1, 4, 0]), weights=w, task=task)
    with pytest.raises(twin.TwinError, match="single-label classification loss only"):
        model(**x, labels=torch.rand(4, 5), weights=w, task=task)


def test_router_weights_and_top_k(full_rank):
    base, _, model = full_rank
    x = batch()
    w = model.route(**x)
    assert w.shape == (4, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    ex = model.experts
    top1 = twin.TwinModel(base, ex, router=model.router, top_k=1).eval()
    w1 = top1.route(**x)
    assert ((w1 > 0).sum(-1) == 1).all() and torch.equal(w1.argmax(-1), w.argmax(-1))
    # the default forward routes by itself and equals giving it the router's weights
    torch.testing.assert_close(model(**x).logits, model(**x, weights=w).logits)


def test_train_router_selects_on_held_out_data(full_rank):
    _, _, model = full_rank
    gen = torch.Generator().manual_seed(0)
    d = model.router.in_features
    centres = 3.0 * torch.randn(3, d, generator=gen)

    def split(n):
        return {f"task{t}": centres[t] + torch.randn(n, d, generator=gen) for t in range(3)}

    result = twin.train_router(
        model, split(64), split(32), epochs=15, batch_size=32, progress=False
    )
    assert result.best_val_accuracy == max(result.val_accuracy) > 0.9
    assert len(result.train_loss) == len(result.val_accuracy) <= 15
    assert not model.router.training
    val = split(16)
    with torch.no_grad():
        pred = model.router(torch.cat(list(val.values()))).argmax(-1)
    assert float((pred == torch.arange(3).repeat_interleave(16)).float().mean()) > 0.9
    with pytest.raises(twin.TwinError, match="no examples of task 'task2'"):
        twin.train_router(model, {"task0": val["task0"], "task1": val["task1"]}, val)
    with pytest.raises(twin.TwinError, match="pass a tokenizer"):
        twin.train_router(model, {t: ["a text"] * 4 for t in model.tasks}, val)


def test_llama_rmsnorm_runs_per_sample():
    from meldkit.dlf._tiny import tiny_llama

    base = tiny_llama(0, vocab=64, hidden=32, dtype=torch.float32)
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    model = twin.TwinModel(base, ex).eval()
    assert model.per_sample_modules and all("norm" in n for n in model.per_sample_modules)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    for t in range(2):
        got = model(input_ids=ids, weights=one_hot(3, t, 2)).logits
        torch.testing.assert_close(got, experts[t](input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    w = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5]])
    got = model(input_ids=ids, weights=w).logits
    torch.testing.assert_close(got, model(input_ids=ids, weights=w, materialize=True).logits)


def test_plain_pytorch_model_with_a_feature_function():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4))
    experts = [perturbed(base, seed=s, scale=0.2) for s in (1, 2, 3)]
    ex = twin.build(base, experts, rank_ratio=1.0, exclude=None, progress=False)

    def features(model, x):
        return model[1](model[0](x))  # the normalised hidden layer, under the shared weights

    model = twin.TwinModel(base, ex, router=twin.TwinRouter(8, 3), features=features).eval()
    x = torch.randn(5, 6)
    for t in range(3):
        torch.testing.assert_close(model(x, weights=one_hot(5, t, 3)), experts[t](x))
    assert model(x).shape == (5, 4)
    with pytest.raises(twin.TwinError, match="hidden size"):
        twin.TwinModel(base, ex)


class BatchNormNet(nn.Module):
    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.bn = nn.BatchNorm1d(16, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.bn(self.l1(x))))


@pytest.mark.parametrize("source", ["modules", "state_dicts"])
def test_batchnorm_statistics_are_per_task(source):
    """Floating buffers (BatchNorm running statistics) are exclusive parts like 1-D parameters:
    a one-hot router gives each expert's own statistics, from modules and state dicts alike."""
    torch.manual_seed(0)
    base = BatchNormNet().eval()
    experts = []
    for s in (1, 2):
        e = perturbed(base, seed=s, scale=0.1).train()
        e(torch.randn(32, 8, generator=torch.Generator().manual_seed(s)))  # its own statistics
        experts.append(e.eval())
    if source == "modules":
        ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    else:
        ex = twin.build(
            base.state_dict(), [e.state_dict() for e in experts], rank_ratio=1.0, progress=False
        )
    assert {"bn.running_mean", "bn.running_var"} <= set(ex.dense)
    model = twin.TwinModel(
        base, ex, router=twin.TwinRouter(16, 2), features=lambda m, x: m.l1(x)
    ).eval()
    assert model.per_sample_modules == ["bn"]
    x = torch.randn(3, 8)
    for t in range(2):
        torch.testing.assert_close(model(x, weights=one_hot(3, t, 2)), experts[t](x))
    w = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5]])
    torch.testing.assert_close(model(x, weights=w), model(x, weights=w, materialize=True))


def test_unchanged_buffers_are_not_routed():
    torch.manual_seed(0)
    base = BatchNormNet(affine=False).eval()
    base.bn.running_mean.normal_()
    experts = [perturbed(base, seed=s, scale=0.1).eval() for s in (1, 2)]
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    model = twin.TwinModel(base, ex, router=twin.TwinRouter(16, 2), features=lambda m, x: m.l1(x))
    assert model.per_sample_modules == []  # the statistics are the base's in every expert
    assert torch.equal(model.model.bn.running_mean, base.bn.running_mean)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model.eval()(x, weights=one_hot(3, 1, 2)), experts[1](x))


def test_errors(full_rank):
    base, _, model = full_rank
    x = batch()
    with pytest.raises(twin.TwinError, match="'weights' has shape"):
        model(**x, weights=torch.ones(3, 3))
    with pytest.raises(twin.TwinError, match="NaN"):
        model(**x, weights=torch.full((4, 3), float("nan")))
    with pytest.raises(twin.TwinError, match="unknown task 'nope'"):
        model(**x, weights=torch.ones(4, 3) / 3, task="nope")
    with pytest.raises(twin.TwinError, match="'task'"):
        model(**x, weights=torch.ones(4, 3) / 3, task=[0, 1])
    with pytest.raises(twin.TwinError, match="'top_k'"):
        twin.TwinModel(base, model.experts, top_k=4)
    for bad in (2.7, True, "2"):  # checked when built, not at the first forward
        with pytest.raises(twin.TwinError, match="'top_k' must be an int or None"):
            twin.TwinModel(base, model.experts, top_k=bad)
    other = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    )
    with pytest.raises(twin.TwinError, match="has no parameter"):
        twin.TwinModel(other, model.experts)
    # routing state is cleared after a failing forward
    with pytest.raises(IndexError):  # token ids past the vocabulary
        model(input_ids=torch.full((4, 7), 10_000), weights=torch.ones(4, 3) / 3)
    assert model.routing.mode == "plain" and model.routing.weights is None


def test_per_sample_terms_go_in_place_only_where_that_is_safe():
    """TwinLinear and TwinLayerNorm add per-sample biases (and scale) into their fresh outputs in
    place at inference; while autograd records, for an expanded output, or when broadcasting
    would grow the output, they make a new tensor."""
    from meldkit.twin.layers import _fresh_op

    y, v = torch.ones(2, 3, 4), torch.full((2, 1, 4), 2.0)
    with torch.no_grad():
        out = _fresh_op(y, v, "add")
    assert out is y and torch.equal(y, torch.full((2, 3, 4), 3.0))
    assert _fresh_op(y, v, "mul") is y and torch.equal(y, torch.full((2, 3, 4), 6.0))
    leaf = torch.ones(2, 3, 4, requires_grad=True)
    grown = leaf * 1.0
    added = _fresh_op(grown, v, "add")
    assert added is not grown and added.requires_grad
    added.sum().backward()
    assert torch.equal(leaf.grad, torch.ones(2, 3, 4))
    expanded = torch.ones(1, 3, 4).expand(2, 3, 4)
    assert _fresh_op(expanded, v, "add") is not expanded
    small = torch.ones(1, 3, 4)
    assert _fresh_op(small, v, "add").shape == (2, 3, 4)


def test_one_expert_batches_run_ordered_by_expert_and_task(monkeypatch):
    """Top-1 (one-hot) batches run ordered by (expert, task): each linear layer works on
    contiguous runs. The outputs come back in the caller's order and equal the unordered path
    and the per-sample rebuild, with given tasks, weights other than 1, hidden states and the
    model's own loss."""
    from meldkit.twin.layers import TwinLinear

    base, experts = roberta_experts()
    ex = twin.build(base, experts, rank_ratio=0.25, progress=False)
    model = twin.TwinModel(base, ex).eval()
    x = batch(b=6, seed=3)
    w = torch.zeros(6, 3)
    w[torch.arange(6), torch.tensor([2, 0, 2, 1, 0, 2])] = torch.tensor([1, 1, 0.5, 1, 1, 1.0])
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    calls = []
    runs_forward = TwinLinear._forward_runs

    def counted(self, *a):
        y = runs_forward(self, *a)
        if self.lora_a is not None:
            calls.append((self.name, y is not None))
        return y

    monkeypatch.setattr(TwinLinear, "_forward_runs", counted)
    for task in (None, torch.tensor([0, 2, 1, 1, 0, 2])):
        calls.clear()
        got = model(**x, weights=w, task=task, labels=labels, output_hidden_states=True)
        assert calls and all(ran for _, ran in calls), calls  # every linear with factors
        model._order_batches = False
        calls.clear()
        want = model(**x, weights=w, task=task, labels=labels, output_hidden_states=True)
        model._order_batches = True
        assert not calls
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
        for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        mat = model(**x, weights=w, task=task, materialize=True).logits
        torch.testing.assert_close(got.logits, mat, rtol=1e-5, atol=1e-5)


def test_batch_order_only_when_it_is_safe():
    from meldkit.twin.model import _batch_order

    w = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    task = w.argmax(-1)
    ids = torch.zeros(3, 4, dtype=torch.long)
    perm, inv, runs = _batch_order(w, task, (ids,), {"attention_mask": torch.ones(3, 4)})
    assert perm.tolist() == [1, 0, 2] and inv.tolist() == [1, 0, 2]
    assert runs == [(0, 0, 0, 1, True), (1, 1, 1, 3, True)]
    in_order = _batch_order(w[[1, 0, 2]], task[[1, 0, 2]], (ids,), {})
    assert in_order[0] is None and in_order[2] == runs
    # two experts for a sample, a tensor keyword that may not be batch-first, a container of
    # tensors, one sample: left as given
    assert _batch_order(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), task[:2], (ids[:2],), {}) is None
    assert _batch_order(w, task, (ids,), {"head_mask": torch.ones(3, 2)}) is None
    assert _batch_order(w, task, (ids,), {"past": [torch.ones(3, 2)]}) is None
    assert _batch_order(w, task, ([ids],), {}) is None
    assert _batch_order(w[:1], task[:1], (ids[:1],), {}) is None


class _Box:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class _BoxedNet(nn.Module):
    """Returns its output in an object the batch ordering cannot see into."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> _Box:
        return _Box(self.l2(torch.relu(self.l1(x))))


def test_outputs_it_cannot_reorder_run_the_batch_as_given():
    torch.manual_seed(0)
    base = _BoxedNet()
    experts = [perturbed(base, seed=s, scale=0.2) for s in (1, 2)]
    ex = twin.build(base, experts, rank_ratio=1.0, exclude=None, progress=False)
    model = twin.TwinModel(base, ex, router=twin.TwinRouter(8, 2), features=lambda m, x: x).eval()
    x = torch.randn(4, 6)
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got = model(x, weights=w).value
    assert not model._order_batches  # seen once: batches now run as given
    for i in range(4):
        want = experts[int(w[i].argmax())](x[i : i + 1]).value
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-5, atol=1e-5)


def test_bert_embeddings_with_shared_position_ids():
    """BERT's position ids are [1, L] for the whole batch: the embeddings' exclusive parts are
    added to a broadcast lookup, equal to the per-sample rebuild."""
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    ex = twin.build(base, experts, rank_ratio=0.5, progress=False)
    model = twin.TwinModel(base, ex).eval()
    x = batch(b=3, length=6)
    x["input_ids"] = x["input_ids"] % 64
    for w in (torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5]]), one_hot(3, 1, 2)):
        got = model(**x, weights=w).logits
        want = model(**x, weights=w, materialize=True).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_expert_batches_keep_the_gradient_of_the_weights():
    """Weights that require grad (a router trained through the merged model) take the path
    that multiplies by them, so their gradient is the unordered path's, not zero. (A plain
    model: in a transformer the embeddings already make the activations require grad.)"""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    experts = [perturbed(base, seed=s, scale=0.2) for s in (1, 2, 3)]
    ex = twin.build(base, experts, rank_ratio=0.5, exclude=None, progress=False)
    model = twin.TwinModel(base, ex, router=twin.TwinRouter(6, 3), features=lambda m, x: x)
    x = torch.randn(4, 6)
    grads = []
    for order in (True, False):
        model._order_batches = order
        w = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], requires_grad=True)
        model(x, weights=w).square().sum().backward()
        grads.append(w.grad)
    model._order_batches = True
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_tied_output_head_is_routed_with_its_embeddings():
    """GPT-2's output head is its token embeddings (one tied parameter): the routed head is a
    TwinLinear over that same parameter and adds the embeddings' exclusive part, so a one-hot
    router gives each expert's logits and mixed weights equal the per-sample rebuild."""
    base = gpt2()
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    assert "transformer.wte.weight" in ex.factors and "lm_head.weight" not in ex.factors
    model = twin.TwinModel(base, ex).eval()
    head = model.model.lm_head
    assert isinstance(head, twin.TwinLinear)
    assert head.weight is model.model.transformer.wte.weight  # still tied
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    _routes_like_the_experts(model, experts, ids)


@pytest.mark.parametrize("exclude", [twin.DEFAULT_EXCLUDE, ()], ids=["default", "biases_too"])
def test_gpt2_conv1d_layers_are_batched_twin_layers(exclude):
    """GPT-2's Conv1D projections (``weight [in, out]``, ``y = x·W + b``) become TwinLinear layers
    over the same parameter (no per-sample rebuild, no warning): at full rank a one-hot router
    gives each expert's logits and input gradients, and mixed weights equal
    ``materialize=True``."""
    import warnings

    base = gpt2()
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    ex = twin.build(base, experts, exclude=exclude, rank_ratio=1.0, progress=False)
    name = "transformer.h.0.attn.c_attn"
    assert f"{name}.weight" in ex.factors
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-sample fallback warns
        model = twin.TwinModel(base, ex).eval()
    assert model.per_sample_modules == []
    layer = model.model.get_submodule(name)
    assert isinstance(layer, twin.TwinLinear) and layer.transposed
    assert layer.weight.shape == (32, 96)  # Conv1D's own [in, out] parameter, kept
    assert (layer.in_features, layer.out_features) == (32, 96)
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    _routes_like_the_experts(model, experts, ids)
    embeds = [base.transformer.wte(ids).detach().requires_grad_() for _ in range(2)]
    outs = [
        model(inputs_embeds=embeds[0], weights=one_hot(3, 1, 2)).logits,
        experts[1](inputs_embeds=embeds[1]).logits,
    ]
    for out in outs:
        out.square().sum().backward()
    torch.testing.assert_close(embeds[0].grad, embeds[1].grad, rtol=1e-4, atol=1e-5)


def test_experts_held_apart_for_a_tied_model_are_refused():
    base = gpt2()
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    ex = twin.build(base, experts, rank_ratio=0.5, progress=False)
    name = "transformer.wte.weight"
    ex.factors["lm_head.weight"] = ex.factors[name]  # as if built from an untied base
    ex.shared["lm_head.weight"] = ex.shared[name]
    with pytest.raises(twin.TwinError, match=r"'transformer\.wte\.weight' and 'lm_head\.weight'"):
        twin.TwinModel(base, ex)


def test_cached_steps_keep_the_sequences_routing():
    """A decoding step with the KV cache the model returned: the routing pass leaves the cache
    alone, the step keeps the weights the prompt ran with (here one expert per sample, out of
    order: the cache also keeps the batch from being reordered), and equals the full
    sequence's last position. A non-empty cache from elsewhere needs the weights."""
    base = gpt2()
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    ex = twin.build(base, experts, rank_ratio=0.5, progress=False)
    model = twin.TwinModel(base, ex).eval()
    key = _cache_kwarg(model.model)
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        first = model(input_ids=ids, weights=w, use_cache=True)
        cache = cache_of(first)
        assert cache_positions(cache) == 5
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, use_cache=True, **{key: cache})  # no weights: the prompt's
        assert cache_positions(cache_of(step)) == 6
        full = model(input_ids=torch.cat([ids, nxt], 1), weights=w).logits[:, -1]
        torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)
        other = cache_of(base(input_ids=ids, use_cache=True))
        with pytest.raises(twin.TwinError, match="KV cache passed holds positions"):
            model(input_ids=nxt, use_cache=True, **{key: other})
        assert cache_positions(other) == 5  # untouched


def test_router_ignores_the_callers_output_arguments(full_rank):
    """``return_dict=False`` and ``output_hidden_states=True`` shape the caller's output only:
    the routing pass sets its own."""
    _, _, model = full_rank
    x = batch()
    with torch.no_grad():
        want = model(**x).logits
        out = model(**x, return_dict=False)
        assert isinstance(out, tuple)
        torch.testing.assert_close(out[0], want)
        out = model(**x, output_hidden_states=True)
        assert len(out.hidden_states) == 3  # embeddings and 2 layers
        torch.testing.assert_close(out.logits, want)
        torch.testing.assert_close(
            twin.mean_pooled_last_hidden(model.model, **x, return_dict=False),
            twin.mean_pooled_last_hidden(model.model, **x),
        )


def test_router_reads_a_positional_attention_mask(full_rank):
    _, _, model = full_rank
    x = batch()
    ids, mask = x["input_ids"], x["attention_mask"]
    with torch.no_grad():
        by_name = model.features(**x)
        torch.testing.assert_close(model.features(ids, mask), by_name)
        assert not torch.allclose(model.features(ids), by_name)  # the padding matters
        torch.testing.assert_close(model(ids, mask).logits, model(**x).logits)


def test_a_positional_forward_reads_the_signature_once_and_binds_once(full_rank, monkeypatch):
    """``model(ids, mask)``: the signature of the wrapped model's forward is read once per
    class, and the call is bound once (the routing pass reuses that binding, less the keywords
    it leaves out)."""
    from meldkit.twin import model as twin_model

    _, _, model = full_rank
    x = batch()
    ids, mask, labels = x["input_ids"], x["attention_mask"], torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        want = model(**x)
        model(ids, mask)  # the signature is cached from here on
        reads, binds = [], []
        read, bind = twin_model._Signature, twin_model.bind_arguments
        monkeypatch.setattr(twin_model, "_Signature", lambda f: reads.append(f) or read(f))
        monkeypatch.setattr(twin_model, "bind_arguments", lambda *a: binds.append(a[1]) or bind(*a))
        out = model(ids, mask)
        assert (reads, len(binds)) == ([], 1)
        torch.testing.assert_close(out.logits, want.logits)
        # labels by keyword: the routing pass leaves them out, and reuses the binding
        seen = []
        features = model.features_fn
        model.features_fn = lambda m, *a, **kw: seen.append(set(kw)) or features(m, *a, **kw)
        try:
            out = model(ids, mask, labels=labels)
        finally:
            model.features_fn = features
        assert seen == [set()] and len(binds) == 2
        torch.testing.assert_close(out.logits, want.logits)
        torch.testing.assert_close(out.loss, F.cross_entropy(want.logits, labels))
    # outside a routed forward, nothing is reused
    assert twin_model._ROUTED_CALL.get() is None
    assert twin_model._bound(model.model, (ids, mask), {}) is None


def test_the_routing_pass_reuses_a_binding_only_for_the_same_call():
    """The routing pass's binding is the routed call's only for the same model and positional
    arguments and a subset of its keywords, and not where a required argument was left out."""
    from meldkit.twin import model as twin_model

    class Net(nn.Module):
        def forward(self, a, b, labels, c=None, **extra):
            return a

    class Other(Net):
        def forward(self, a, b, labels=None, c=None, **extra):
            return a

    net, other = Net(), Other()
    a, b, lab, c = (torch.zeros(1) for _ in range(4))
    routed = (net, (a, b), {"labels": lab, "c": c, "d": 1}, {})
    routed = (*routed[:3], twin_model.bind_arguments(net, routed[1], routed[2])[1])
    assert routed[3] == {"a": a, "b": b, "labels": lab, "c": c, "d": 1}
    token = twin_model._ROUTED_CALL.set(routed)
    try:
        assert twin_model._bound(net, (a, b), {"labels": lab, "c": c, "d": 1}) == (
            (),
            routed[3],
        )
        assert twin_model._bound(net, (a, b), {"labels": lab}) == (
            (),
            {"a": a, "b": b, "labels": lab},
        )
        assert twin_model._bound(net, (a, b), {"c": c}) is None  # 'labels' is required
        assert twin_model._bound(net, (a, torch.zeros(1)), {"labels": lab}) is None
        assert twin_model._bound(net, (a,), {"labels": lab}) is None
        assert twin_model._bound(net, (a, b), {"labels": torch.zeros(1)}) is None
        assert twin_model._bound(net, (a, b), {"labels": lab, "e": 2}) is None
        assert twin_model._bound(other, (a, b), {"labels": lab}) is None
    finally:
        twin_model._ROUTED_CALL.reset(token)


def test_the_signature_follows_a_forward_set_on_the_instance():
    """A ``forward`` set on an instance (as accelerate's hooks do: a ``functools.partial``
    wrapping the old one, or another bound method) is read as it is, not as the class's."""
    import functools
    import types

    from meldkit.twin import model as twin_model

    class Net(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    def other(self, input_ids, attention_mask=None, return_dict=None, **kwargs):
        return input_ids

    ids, mask = torch.zeros(2, 3), torch.ones(2, 3)
    want = {"input_ids": ids, "attention_mask": mask}
    plain, hooked, rebound = Net(), Net(), Net()
    old = hooked.forward
    hooked.forward = functools.update_wrapper(
        functools.partial(lambda m, *a, **k: old(*a, **k), hooked), old
    )
    rebound.forward = types.MethodType(other, rebound)
    for _ in range(2):  # cached or not, the same answers
        assert not twin_model._accepts(plain, "return_dict")
        assert not twin_model._accepts(hooked, "return_dict")
        assert twin_model._accepts(rebound, "return_dict")
        assert twin_model._accepts(rebound, "anything")  # through **kwargs
        for net in (plain, hooked, rebound):
            assert twin_model.bind_arguments(net, (ids, mask), {}) == ((), want)
        assert twin_model.bind_arguments(plain, (ids, mask), {"return_dict": True})[0] == (
            ids,
            mask,
        )
        assert twin_model.bind_arguments(rebound, (ids, mask), {"return_dict": True}) == (
            (),
            {**want, "return_dict": True},
        )
    assert twin_model._forward_signature(plain) is twin_model._forward_signature(Net())
    assert twin_model._forward_signature(hooked) is not twin_model._forward_signature(hooked)


def test_train_router_joins_a_last_batch_of_one_and_refuses_batches_it_cannot_train(
    full_rank,
):
    """The router's BatchNorm trains on two samples or more: a last batch of one joins the one
    before; ``batch_size`` 1, or a single training example, is refused (not a silent no-op)."""
    base, experts, full = full_rank
    model = twin.TwinModel(base, full.experts)
    gen = torch.Generator().manual_seed(0)
    d = model.router.in_features
    train = {t: torch.randn(5, d, generator=gen) for t in model.tasks}  # 15 examples
    sizes = []
    model.router.register_forward_hook(
        lambda m, args, out: sizes.append(args[0].shape[0]) if m.training else None
    )
    twin.train_router(model, train, train, batch_size=7, epochs=2, patience=None, progress=False)
    assert sizes == [7, 8, 7, 8]
    with pytest.raises(twin.TwinError, match="'batch_size' must be an int ≥ 2"):
        twin.train_router(model, train, train, batch_size=1, progress=False)
    single = twin.TwinModel(base, twin.build(base, {"only": experts["task0"]}, progress=False))
    one = {"only": torch.randn(1, d, generator=gen)}
    with pytest.raises(twin.TwinError, match="'train' holds 1 example"):
        twin.train_router(single, one, one, progress=False)
    flat = {**train, "task2": torch.randn(d, generator=gen)}
    with pytest.raises(twin.TwinError, match=r"'train' features of task 'task2' have shape \[48\]"):
        twin.train_router(model, flat, train, progress=False)


@pytest.mark.filterwarnings("ignore:.*rebuilt densely per sample")
def test_bias_less_heads_of_different_sizes_pad_with_minus_inf():
    """Llama's ``score`` heads have no bias: the columns past a task's own label count are -inf
    all the same (not 0, which would beat a task whose logits are all negative), and the
    activation path and ``materialize=True`` both return every task's widest head."""
    base, experts = llama_classifier_experts(labels=(3, 5, 7))
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(0))
    expert0 = experts["task0"]
    with torch.no_grad():  # expert 0's logits all negative: a 0 in a padding column would win
        h = expert0.model(input_ids=ids).last_hidden_state[:, -1]
        expert0.score.weight.copy_(-0.5 * h.mean(0).sign().expand(3, -1))
    ex = twin.build(base, experts, exclude=("score", "bias"), rank_ratio=1.0, progress=False)
    model = twin.TwinModel(base, ex).eval()
    assert model.label_counts == [3, 5, 7]
    with torch.no_grad():
        want = expert0(input_ids=ids).logits
        assert (want < 0).all()
        got = model(input_ids=ids, weights=one_hot(3, 0, 3)).logits
        assert got.shape == (3, 7)
        assert torch.isneginf(got[:, 3:]).all()
        torch.testing.assert_close(got[:, :3], want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        mat = model(input_ids=ids, weights=one_hot(3, 0, 3), materialize=True).logits
        torch.testing.assert_close(mat, got, rtol=1e-4, atol=1e-4)
        # mixed weights, one task per sample
        w = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
        task = torch.tensor([1, 0, 2])
        got = model(input_ids=ids, weights=w, task=task).logits
        for i, n in enumerate((5, 3, 7)):
            assert torch.isfinite(got[i, :n]).all() and torch.isneginf(got[i, n:]).all()
        mat = model(input_ids=ids, weights=w, task=task, materialize=True).logits
        torch.testing.assert_close(mat, got, rtol=1e-4, atol=1e-4)
        out = model(input_ids=ids, weights=one_hot(3, 0, 3), labels=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out.loss, F.cross_entropy(want, torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_twin_model_cast_to_half_precision_routes(full_rank, dtype):
    """``TwinModel.to(bfloat16)`` / ``.half()`` casts the router as well: the float32 features
    are cast to the router's dtype, and the routed forward equals the given router weights."""
    base, _, full = full_rank
    model = twin.TwinModel(base, full.experts).eval().to(dtype)
    assert next(model.router.parameters()).dtype == dtype
    x = batch()
    with torch.no_grad():
        w = model.route(**x)
        assert w.dtype == torch.float32 and w.shape == (4, 3)
        out = model(**x).logits
        assert out.dtype == dtype
        torch.testing.assert_close(out, model(**x, weights=w).logits)


def test_forwards_from_several_threads_keep_their_own_routing(full_rank):
    """The routing of a forward is state every twin layer reads: forwards from several threads
    with different weights (and routed by the router, and materialized) each get their own
    outputs."""
    base, _, full = full_rank
    model = twin.TwinModel(base, full.experts).eval()
    x = batch(b=8, length=16)
    ws = [one_hot(8, t, 3) for t in range(3)]
    with torch.no_grad():
        wants = [model(**x, weights=w).logits for w in ws] + [model(**x).logits]
        wants.append(model(**x, weights=ws[1], materialize=True).logits)

    def call(t):
        if t < 3:
            return model(**x, weights=ws[t]).logits
        if t == 3:
            return model(**x).logits
        return model(**x, weights=ws[1], materialize=True).logits

    assert run_in_threads(call, wants) == (0, [])
    clone = copy.deepcopy(model)  # the lock is not copied: the copy gets its own
    assert clone.routing.lock is not model.routing.lock
    with torch.no_grad():
        torch.testing.assert_close(clone(**x, weights=ws[2]).logits, wants[2])


def test_generate_routes_each_prompt_once():
    """``TwinModel.generate`` routes each prompt once and keeps its weights for every new token
    (not the shared model alone): at full rank, one-hot weights give each expert's own greedy
    continuation, sample by sample; without weights, the router's on the prompt."""
    base = gpt2()
    experts = [perturbed(base, seed=s, scale=0.5) for s in (1, 2)]
    model = twin.TwinModel(base, twin.build(base, experts, rank_ratio=1.0, progress=False)).eval()
    ids = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        got = model.generate(**x, weights=torch.tensor([[0.0, 1.0], [1.0, 0.0]]), **kw)
        for i, t in enumerate((1, 0)):
            want = experts[t].generate(**{k: v[i : i + 1] for k, v in x.items()}, **kw)
            assert torch.equal(got[i : i + 1], want)
        shared = model.model.generate(**x, **kw)  # the shared model: another continuation
        assert not torch.equal(got, shared)
        routed = model.generate(**x, **kw)
        assert torch.equal(routed, model.generate(**x, weights=model.route(**x), **kw))
    assert model.routing.mode == "plain" and model.routing.weights is None
    with pytest.raises(twin.TwinError, match="num_beams = 2 is not supported"):
        model.generate(**x, num_beams=2, **kw)
    # A model whose own generation_config asks for beams (BART-CNN ships num_beams=4).
    model.model.generation_config.num_beams = 3
    with pytest.raises(twin.TwinError, match="num_beams = 3 is not supported"):
        model.generate(**x, **kw)
    assert model.generate(**x, num_beams=1, **kw).shape == got.shape
    model.model.generation_config.num_beams = 1
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 4))
    ex = twin.build(plain, [perturbed(plain, seed=1)], exclude=None, progress=False)
    net = twin.TwinModel(plain, ex, router=twin.TwinRouter(6, 1), features=lambda m, x: x)
    with pytest.raises(twin.TwinError, match=r"the wrapped model \(Sequential\) has no generate"):
        net.generate(torch.randn(2, 6))


def test_train_router_tokenizes_texts_in_batches_of_the_given_size(full_rank):
    """``feature_batch_size``: how many texts each routing pass over ``train``/``val`` texts
    reads at once (was fixed at 64)."""
    base, _, full = full_rank
    model = twin.TwinModel(base, full.experts).eval()
    sizes = []

    def tokenizer(texts, **kwargs):
        sizes.append(len(texts))
        ids = torch.tensor([[3 + len(t) % 90] * 5 for t in texts])
        return transformers.BatchEncoding(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        )

    data = {t: [f"text {t} {i}" * (i + 1) for i in range(10)] for t in model.tasks}
    twin.train_router(
        model, data, data, tokenizer=tokenizer, feature_batch_size=4, epochs=1, progress=False
    )
    assert sizes == [4, 4, 2] * 6  # per task, train then val
    with pytest.raises(twin.TwinError, match="'feature_batch_size' must be an int ≥ 1"):
        twin.train_router(model, data, data, tokenizer=tokenizer, feature_batch_size=0)


@pytest.mark.filterwarnings("ignore:.*rebuilt densely per sample")
def test_an_encoder_decoder_routes_on_its_encoders_last_state():
    """Seq2seq outputs have no ``hidden_states``: the router reads the encoder's last state
    (mean-pooled over the input's tokens); BART's ``classification_head`` stays per task."""
    base = bart_classifier()
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    model = twin.TwinModel(base, twin.build(base, experts, rank_ratio=1.0, progress=False)).eval()
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = base.config.eos_token_id
    mask = torch.ones_like(ids)
    with torch.no_grad():
        state = model.model(input_ids=ids, attention_mask=mask).encoder_last_hidden_state
        torch.testing.assert_close(
            model.features(input_ids=ids, attention_mask=mask), state.mean(1)
        )
        w = model.route(input_ids=ids, attention_mask=mask)
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, model(input_ids=ids, attention_mask=mask, weights=w).logits)
        for t in range(2):
            got = model(input_ids=ids, attention_mask=mask, weights=one_hot(3, t, 2)).logits
            want = experts[t](input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _deberta():
    config = transformers.DebertaV2Config(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.DebertaV2ForSequenceClassification(config).eval()


def test_an_input_shared_by_the_batch_that_the_model_cannot_take_per_sample():
    """DeBERTa projects its relative-position embeddings ``[1, 2k, d]`` once for the batch with
    the attention's own query/key layers, and repeats the result B times. Under per-sample
    weights that projection is per sample, ``[B, 2k, d]``, which the model cannot take: the
    forward then runs one sample at a time (exact: each sample's own merged weights), with a
    warning, and later forwards go straight that way."""
    base = _deberta()
    experts = [perturbed(base, seed=s) for s in (1, 2, 3)]
    model = twin.TwinModel(base, twin.build(base, experts, rank_ratio=1.0, progress=False)).eval()
    x = batch(b=4, length=9)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"rel_embeddings|pos_key_proj|query_proj|key_proj"):
            got = model(**x, weights=one_hot(4, 1, 3)).logits
        torch.testing.assert_close(got, experts[1](**x).logits, rtol=1e-5, atol=1e-5)
        w = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), -1)
        got = model(**x, weights=w, task=[0, 2, 1, 0]).logits
        want = model(**x, weights=w, task=[0, 2, 1, 0], materialize=True).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for i in range(4):  # sample by sample: a batch of one routes without any fallback
            one = {k: v[i : i + 1] for k, v in x.items()}
            torch.testing.assert_close(
                got[i : i + 1], model(**one, weights=w[i : i + 1], task=[[0, 2, 1, 0][i]]).logits
            )
        assert model(**x).logits.shape == (4, 3)
        labels = torch.tensor([2, 0, 1, 2])  # the batch's loss, not one per sample
        out = model(**x, weights=one_hot(4, 1, 3), labels=labels)
        torch.testing.assert_close(out.loss, experts[1](**x, labels=labels).loss)


def test_an_unrelated_error_does_not_switch_to_one_sample_at_a_time():
    """GPT-2's position embeddings see an input shared by the batch on every forward: a call
    that fails for another reason (labels of the wrong shape) raises its own error and leaves
    the model batched, so the next valid call with labels still works."""
    base = gpt2()
    experts = [perturbed(base, seed=s, scale=0.5) for s in (1, 2)]
    model = twin.TwinModel(base, twin.build(base, experts, rank_ratio=1.0, progress=False)).eval()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises((RuntimeError, ValueError)):
            model(input_ids=ids, labels=torch.zeros(3, 5, dtype=torch.long), weights=w)
        assert not model._sample_by_sample
        out = model(input_ids=ids, labels=ids, weights=w)
    assert torch.isfinite(out.loss)


def _routes_like_the_experts(model, experts, ids):
    """At full rank, one-hot weights give each of the two experts' logits, and mixed weights
    equal ``materialize=True``."""
    with torch.no_grad():
        for t in range(2):
            got = model(input_ids=ids, weights=one_hot(3, t, 2)).logits
            want = experts[t](input_ids=ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        w = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5]])
        got = model(input_ids=ids, weights=w).logits
        want = model(input_ids=ids, weights=w, materialize=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _gpt2_twin():
    base = gpt2()
    experts = [perturbed(base, seed=s, scale=0.5) for s in (1, 2, 3)]
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    return twin.TwinModel(base, ex).eval()


def _left_padded_prompts():
    """``(short [1, 4], ids [2, 9], mask [2, 9])``: the short prompt is row 1 of the batch,
    left-padded under a longer one."""
    gen = torch.Generator().manual_seed(0)
    short = torch.randint(1, 64, (1, 4), generator=gen)
    long = torch.randint(1, 64, (1, 9), generator=gen)
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0], ids[1, 5:] = long[0], short[0]
    mask = torch.zeros_like(ids)
    mask[0], mask[1, 5:] = 1, 1
    return short, ids, mask


def _spy_on_route(model) -> list:
    """Record every ``model.route`` call as ``(kwargs, weights)``."""
    routed = []
    route = model.route

    def spy(*args, **kwargs):
        routed.append((kwargs, route(*args, **kwargs)))
        return routed[-1][1]

    model.route = spy
    return routed


_GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def _generate_alone_and_batched(model) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Greedy ``generate`` of the short prompt alone, then left-padded in its batch
    (:func:`_left_padded_prompts`): ``(alone, batched, routed)``, ``routed`` the
    :func:`_spy_on_route` record (both calls first)."""
    short, ids, mask = _left_padded_prompts()
    routed = _spy_on_route(model)
    with torch.no_grad():
        alone = model.generate(input_ids=short, attention_mask=torch.ones_like(short), **_GREEDY)
        batched = model.generate(input_ids=ids, attention_mask=mask, **_GREEDY)
    return alone, batched, routed


def test_generate_routes_a_left_padded_prompt_as_alone():
    """GPT-2 has absolute positions: ``generate`` gives a left-padded prompt the positions
    ``cumsum(mask) - 1``, so its routing pass must too (it ran without positions: the merge a
    prompt got depended on the rest of its batch). A caller's ``position_ids`` are the ones
    routed on."""
    model = _gpt2_twin()
    alone, batched, routed = _generate_alone_and_batched(model)
    _, ids, mask = _left_padded_prompts()
    with torch.no_grad():
        (_, w_alone), (_, w_batch) = routed
        torch.testing.assert_close(w_batch[1], w_alone[0])
        assert torch.equal(batched[1, 9:], alone[0, 4:])
        # the plain forward keeps Hugging Face's semantics: positions 0 … L-1, padding or not
        assert not torch.allclose(model.route(input_ids=ids, attention_mask=mask)[1], w_alone[0])
        positions = torch.arange(9).expand(2, 9)
        model.generate(input_ids=ids, attention_mask=mask, position_ids=positions, **_GREEDY)
    assert routed[-1][0]["position_ids"] is positions


def test_text_features_pad_on_the_right():
    """``text_features`` (what ``train_router`` trains on) of a text do not depend on its
    batch, whatever side the tokenizer pads on: a left-padding tokenizer gave GPT-2's texts
    shifted positions in a batch."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(60)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model = _gpt2_twin()
    texts = ["w1 w2 w3", "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14"]
    for side in ("left", "right"):
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", padding_side=side
        )
        batched = twin.text_features(model, texts, tokenizer)
        alone = torch.cat([twin.text_features(model, [t], tokenizer) for t in texts])
        torch.testing.assert_close(batched, alone)
        assert tokenizer.padding_side == side  # the caller's tokenizer is left as it was


def test_trainer_evaluates_and_predicts(full_rank, tmp_path):
    """``transformers.Trainer`` keeps only the dataset columns the model's forward names and
    takes those with "label" in their name as labels: ``TwinModel.forward`` names the wrapped
    model's inputs (it took ``*args, **kwargs`` only: every column was dropped)."""
    import inspect

    _, _, model = full_rank
    assert {"input_ids", "attention_mask", "labels"} <= set(
        inspect.signature(model.forward).parameters
    )
    gen = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(3, 96, (6, 7), generator=gen), torch.randint(0, 3, (6,))
    rows = [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(7, dtype=torch.long),
            "labels": labels[i],
        }
        for i in range(6)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True
    )
    trainer = transformers.Trainer(model=model, args=args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = trainer.predict(rows)
        metrics = trainer.evaluate(rows)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    torch.testing.assert_close(torch.as_tensor(got.predictions), want.logits)
    assert got.metrics["test_loss"] == pytest.approx(want.loss.item(), rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(want.loss.item(), rel=1e-5)


def test_task_must_be_integers_or_names(full_rank):
    """A float or bool ``task`` was cast to int64 silently (1.9 -> 1, True -> 1): refused."""
    _, _, model = full_rank
    x = batch(b=2)
    w = torch.full((2, 3), 1 / 3)
    with torch.no_grad():
        for task in (
            torch.tensor([1.9, 0.7]),
            [True, False],
            torch.tensor([1, 0]).bool(),
            [1, 0.5],
        ):
            with pytest.raises(twin.TwinError, match="'task' must be task indices"):
                model(**x, weights=w, task=task)
        ok = model(**x, weights=w, task=torch.tensor([1, 0], dtype=torch.int32)).logits
        torch.testing.assert_close(ok, model(**x, weights=w, task=["task1", "task0"]).logits)


def test_all_zero_weights_warn_without_a_task(full_rank):
    """A zero row of the caller's ``weights`` runs θ_s with the first task's tensors (its top
    task): a warning says so, at the caller's line; with ``task`` given, none."""
    _, _, model = full_rank
    x = batch(b=2)
    w = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    with torch.no_grad(), pytest.warns(UserWarning, match=r"sample\(s\) \[1\] are all zero") as rec:
        model(**x, weights=w)
    assert rec[0].filename == __file__
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**x, weights=w, task=[1, 2])
        model(**x)  # the router's weights are never all zero


def test_generate_routes_a_left_padded_prompt_of_a_peft_model_as_alone():
    """A twin over a PEFT model: ``PeftModel.forward`` names no ``position_ids``, but its
    ``generate`` runs the base model's, which derives them from the mask; the routing pass
    must read the prompt at those positions too (it got none: a left-padded prompt was routed
    at its batch's positions)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = peft.get_peft_model(gpt2(), config).eval()
    experts = [perturbed(base, seed=s, scale=0.5) for s in (1, 2, 3)]
    model = twin.TwinModel(base, twin.build(base, experts, rank_ratio=1.0, progress=False)).eval()
    alone, batched, routed = _generate_alone_and_batched(model)
    (_, w_alone), (kwargs, w_batch) = routed
    assert torch.equal(kwargs["position_ids"][1], torch.tensor([0] * 6 + [1, 2, 3]))
    torch.testing.assert_close(w_batch[1], w_alone[0])
    assert torch.equal(batched[1, 9:], alone[0, 4:])


def test_generate_routes_at_the_models_own_generation_positions():
    """A model that overrides transformers' ``_prepare_position_ids_for_generation`` (Qwen3-VL
    and GLM-4V give 3-D M-RoPE positions) is routed at the positions that hook gives, the
    ones ``generate`` runs the prompt at, not at ``cumsum(mask) - 1``."""
    if not hasattr(transformers.GenerationMixin, "_prepare_position_ids_for_generation"):
        pytest.skip("this transformers has no position hook (before 5)")

    class ShiftedGPT2(transformers.GPT2LMHeadModel):
        def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
            positions = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
            return positions + 3

    plain = gpt2()
    base = ShiftedGPT2(plain.config).eval()
    base.load_state_dict(plain.state_dict())
    experts = [perturbed(base, seed=s, scale=0.5) for s in (1, 2, 3)]
    model = twin.TwinModel(base, twin.build(base, experts, rank_ratio=1.0, progress=False)).eval()
    _, ids, mask = _left_padded_prompts()
    routed = _spy_on_route(model)
    kw = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, **kw)
        want = (mask.cumsum(-1) - 1).clamp_min(0) + 3
        assert torch.equal(routed[0][0]["position_ids"], want)
        torch.testing.assert_close(
            routed[0][1], model.route(input_ids=ids, attention_mask=mask, position_ids=want)
        )


def test_an_untrained_router_warns_once():
    """Routing with a router nobody trained picks tasks at random: the model says so once (the
    caller's line named), not when the caller gives the weights, and not after train_router."""
    import warnings

    from tests.twin.models import batch, roberta_experts

    base, experts = roberta_experts()
    model = twin.TwinModel(base, twin.build(base, experts, progress=False)).eval()
    x = batch()
    assert model.router.trained is False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(**x, weights=torch.full((x["input_ids"].shape[0], 3), 1 / 3))
        assert not seen
        model(**x, task=0)  # the head of task 0, the router's weights
        model(**x)
        model(**x)
        model.route(**x)
    untrained = [w for w in seen if "router has not been trained" in str(w.message)]
    assert len(untrained) == 1 and untrained[0].filename == __file__
    d = model.router.in_features
    gen = torch.Generator().manual_seed(0)
    data = {t: torch.randn(8, d, generator=gen) for t in model.tasks}
    fresh = twin.TwinModel(base, model.experts).eval()
    twin.train_router(fresh, data, data, epochs=1, batch_size=4, progress=False)
    assert fresh.router.trained is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh(**x)


def test_a_training_step_with_labels_is_refused_by_name(full_rank):
    # Trainer.train's call (train mode, grad on, labels): the routing pass gives the task loss
    # no gradient, which failed later as "element 0 of tensors does not require grad".
    _, _, model = full_rank
    x = batch()
    labels = torch.zeros(x["input_ids"].shape[0], dtype=torch.long)
    model.train()
    try:
        with pytest.raises(twin.TwinError, match=r"train it with meldkit\.twin\.train_router"):
            model(**x, labels=labels)
        with torch.no_grad():  # evaluation in train mode (gradients off) still runs
            model(**x, labels=labels)
        # with trainable parameters in the wrapped model, a training step trains them
        trainable = [p for p in model.model.parameters() if p.is_floating_point()][:1]
        for p in trainable:
            p.requires_grad_(True)
        try:
            assert model(**x, labels=labels).loss.requires_grad
        finally:
            for p in trainable:
                p.requires_grad_(False)
    finally:
        model.eval()


@pytest.mark.parametrize("exclude", [None, (r"classification_head", r"\.bias$")])
def test_t5_relative_position_tables_route_each_sample(exclude):
    # T5 looks its relative-position table up with [query, key] bucket ids, no batch dimension:
    # batched, a per-sample hook split the queries as if they were samples when L == B (wrong
    # logits, silently) and failed otherwise.
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4, num_labels=3, pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.T5ForSequenceClassification(config).eval()
    experts = {f"t{i}": perturbed(base, i + 1, 0.2).eval() for i in range(2)}
    kwargs = {} if exclude is None else {"exclude": exclude}
    built = twin.build(base, experts, rank_ratio=1.0, progress=False, **kwargs)
    with pytest.warns(UserWarning, match="relative_attention_bias"):
        model = twin.TwinModel(base, built).eval()
    for b, length in ((4, 4), (2, 5)):
        ids = torch.randint(3, 64, (b, length), generator=torch.Generator().manual_seed(b))
        ids[:, -1] = 1  # eos
        routes = torch.arange(b) % 2
        with torch.no_grad():
            got = model(input_ids=ids, weights=torch.eye(2)[routes]).logits
            want = torch.cat(
                [
                    experts[f"t{int(t)}"](input_ids=ids[i : i + 1]).logits
                    for i, t in enumerate(routes)
                ]
            )
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
