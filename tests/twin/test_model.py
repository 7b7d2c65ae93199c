"""TwinModel: a one-hot router gives each expert's own outputs (exactly at full rank, within the
measured compression error below it), the activation path equals the reference's per-sample
rebuild (``materialize=True``), heads and biases follow each sample's task, routing, router
training with held-out selection, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meldkit import twin
from tests.twin.models import (
    batch,
    cache_of,
    cache_positions,
    gpt2,
    one_hot,
    perturbed,
    roberta_experts,
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


# GPT-2's Conv1D layers run per sample (their 2-D parts rebuilt densely, with a warning).
_conv1d_warning = pytest.mark.filterwarnings("ignore:.*rebuilt densely per sample")


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@_conv1d_warning
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
    with torch.no_grad():
        for t in range(2):
            got = model(input_ids=ids, weights=one_hot(3, t, 2)).logits
            want = experts[t](input_ids=ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        w = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.5, 0.5]])
        got = model(input_ids=ids, weights=w).logits
        want = model(input_ids=ids, weights=w, materialize=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_experts_held_apart_for_a_tied_model_are_refused():
    base = gpt2()
    experts = [perturbed(base, seed=s) for s in (1, 2)]
    ex = twin.build(base, experts, rank_ratio=0.5, progress=False)
    name = "transformer.wte.weight"
    ex.factors["lm_head.weight"] = ex.factors[name]  # as if built from an untied base
    ex.shared["lm_head.weight"] = ex.shared[name]
    with pytest.raises(twin.TwinError, match=r"'transformer\.wte\.weight' and 'lm_head\.weight'"):
        twin.TwinModel(base, ex)


@_conv1d_warning
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
