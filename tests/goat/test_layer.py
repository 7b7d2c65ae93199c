"""GoatLinear behaviour (dropout seeds, dtypes, the balance loss) and adapter files, unwrap and
DDP on a plain PyTorch model."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import meldkit.goat as goat
from meldkit.goat import layer as goat_layer
from meldkit.ops import routed_lora
from tests.goat.tiny_models import mlp
from tests.helpers import DEVICES

E, RANK = 4, 8


def config(**kw) -> goat.GoatConfig:
    return goat.GoatConfig(**{"num_experts": E, "top_k": 2, "rank": RANK, **kw})


def train(model: nn.Module, steps: int = 3, seed: int = 5) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, 40), torch.randn(16, 36)
    model.train()
    for _ in range(steps):
        out = model(x.to(model[0].base_layer.weight.dtype))
        loss = (out.float() - target).pow(2).mean() + goat.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---- the layer -----------------------------------------------------------------------------


def test_dropout_seed_per_call_from_the_default_generator(monkeypatch):
    seeds = []

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return routed_lora(*args, **kwargs)

    monkeypatch.setattr(goat_layer, "routed_lora", spy)
    model = goat.wrap(mlp(), config(dropout=0.3)).train()
    x = torch.randn(6, 40)
    torch.manual_seed(1)
    y1 = model(x)
    torch.manual_seed(1)
    y2 = model(x)
    y3 = model(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert seeds[:2] == seeds[2:4] and len(set(seeds[:2] + seeds[4:])) == 4
    assert all(0 <= s < 2**62 for s in seeds)

    seeds.clear()
    model.eval()
    state = torch.get_rng_state()
    y_eval = model(x)
    assert seeds == [None, None]  # no dropout and no draw in eval mode
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(y_eval, y1)


def test_reduced_precision_base():
    base = mlp(dtype=torch.bfloat16)
    model = goat.wrap(copy.deepcopy(base), config())
    layer = model[0]
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    x = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    model.eval()
    h = layer(x)
    delta, _ = routed_lora(
        x.float(),
        layer.lora_a,
        layer.lora_b,
        layer.scaling,
        router_weight=layer.router.weight,
        top_k=2,
    )
    assert h.dtype == torch.bfloat16
    assert torch.equal(h, (layer.base_layer(x) + delta).to(torch.bfloat16))
    model(x).float().sum().backward()
    assert x.grad is not None and layer.lora_a.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n_tokens, dropout", [(5, 0.0), (100, 0.0), (100, 0.1)], ids=["kernel", "gemm", "dropout"]
)
def test_base_in_the_op_equals_calling_it(monkeypatch, dtype, n_tokens, dropout):
    """A plain nn.Linear base runs inside routed_lora (base_weight, base_bias); a hooked base is
    called as a module and added. Both give the same outputs and gradients (bit for bit in
    float32; bf16 rounds dx once instead of twice), on the per-token kernels and the GEMMs."""
    calls = []

    def spy(*args, **kwargs):
        calls.append("base_weight" in kwargs)
        return routed_lora(*args, **kwargs)

    monkeypatch.setattr(goat_layer, "routed_lora", spy)
    model = goat.wrap(mlp(dtype=dtype), config(dropout=dropout)).train()
    x = torch.randn(n_tokens, 40, dtype=dtype, generator=torch.Generator().manual_seed(3))

    def run():
        xg = x.clone().requires_grad_()
        torch.manual_seed(4)
        out = model(xg)
        loss = out.float().pow(2).sum() + goat.aux_loss(model)
        grads = torch.autograd.grad(loss, [xg, *(p for p in model.parameters() if p.requires_grad)])
        return out, grads

    fused = run()
    assert calls == [True, True]
    for layer in (model[0], model[2]):
        layer.base_layer.register_forward_hook(lambda *args: None)
    called = run()
    assert calls[2:] == [False, False]
    # A forward replaced on the instance (as accelerate's offloading hooks do) is called too.
    for layer in (model[0], model[2]):
        layer.base_layer._forward_hooks.clear()
        layer.base_layer.forward = layer.base_layer.forward
    assert torch.equal(run()[0], called[0]) and calls[4:] == [False, False]
    exact = dtype == torch.float32
    torch.testing.assert_close(fused[0], called[0], rtol=0 if exact else 1e-2, atol=0)
    for g, g2 in zip(fused[1], called[1], strict=True):
        torch.testing.assert_close(
            g, g2, rtol=1e-5 if exact else 2e-2, atol=1e-6 if exact else 1e-2
        )


def test_balance_loss_formula():
    model = goat.wrap(mlp(), config(aux_loss_coef=0.5, dropout=0.0))
    with pytest.raises(RuntimeError, match="no forward"):
        goat.aux_loss(model)
    x = torch.randn(3, 7, 40)
    model(x)
    layer = model[0]
    probs = torch.softmax(x.reshape(-1, 40) @ layer.router.weight.T, dim=-1)
    counts = torch.zeros(E).index_add_(0, probs.topk(2).indices.flatten(), torch.ones(42))
    expected = E * (counts / 21 * probs.sum(0) / 21).sum()  # official: k × the paper's f·P
    torch.testing.assert_close(layer.balance_loss(), expected)
    total = model[0].balance_loss() + model[2].balance_loss()
    loss = goat.aux_loss(model)
    torch.testing.assert_close(loss, 0.5 * total)
    assert loss > 0
    loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0  # flows through p only
    last = model[2].lora_a.grad  # the last layer's experts do not feed any router
    assert last is None or not last.any()
    with pytest.raises(ValueError, match="no GOAT layers"):
        goat.aux_loss(mlp())


class Branchy(nn.Module):
    """mlp() with its second layer skipped (``skip``) or run twice (``twice``) on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.extra = nn.Linear(36, 36)
        self.skip = self.twice = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        if self.skip:
            return x
        x = self.extra(x)
        return self.extra(x) if self.twice else x


def test_aux_loss_counts_this_forward_only():
    torch.manual_seed(0)
    model = goat.wrap(Branchy(), config(dropout=0.0)).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(6, 40)
    for skip in (False, True, True):  # a layer skipped after it ran adds nothing (no stale graph)
        model.skip = skip
        loss = model(x).pow(2).mean() + goat.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert model.extra.has_run != skip
        if skip:
            assert (
                model.extra.router.weight.grad is None or not model.extra.router.weight.grad.any()
            )
            with pytest.raises(RuntimeError, match="no forward"):
                model.extra.balance_loss()

    # A layer run twice adds one term per call.
    model.skip, model.twice = False, True
    layer = model.extra
    with torch.no_grad():
        h1 = model.body(x)
        h2 = layer(h1)
    model(x)
    expected = 0.0
    for h in (h1, h2):
        probs = torch.softmax(h @ layer.router.weight.T, dim=-1)
        counts = torch.zeros(E).index_add_(0, probs.topk(2).indices.flatten(), torch.ones(12))
        expected = expected + E * (counts / 6 * probs.sum(0) / 6).sum()
    torch.testing.assert_close(layer.balance_loss(), expected)
    body = model.body[0].balance_loss() + model.body[2].balance_loss()
    torch.testing.assert_close(goat.aux_loss(model), 1e-3 * (body + expected))


def test_checkpoint_recomputation_is_not_a_new_forward():
    """Non-reentrant activation checkpointing reruns the model in the backward: the aux loss of
    the forward stays what it was (no call added, none cleared)."""
    from torch.utils.checkpoint import checkpoint

    model = goat.wrap(mlp(), config()).train()
    out = checkpoint(model, torch.randn(5, 40), use_reentrant=False)
    aux = goat.aux_loss(model)
    (out.sum() + aux).backward()
    assert [len(layer._probs) for _, layer in goat.goat_layers(model)] == [1, 1]
    torch.testing.assert_close(goat.aux_loss(model), aux, rtol=0, atol=0)


class Backbone(nn.Module):
    """A body and a head, as a Hugging Face model with ``model.model``: the body is also called
    on its own (a custom head, CLIP's get_image_features)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.head = nn.Linear(36, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_forwards_of_a_submodule_start_a_new_forward():
    """Calls through a submodule above the layers, not the wrapped root, begin a forward too:
    the aux loss is this step's, training steps do not backward through an earlier step's
    graph, and no calls pile up in evaluation."""
    torch.manual_seed(0)
    model = goat.wrap(Backbone(), config(target_modules=["body.0", "body.2"])).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    layer = model.body[0]
    for _ in range(3):
        x = torch.randn(5, 40)
        out = model.body(x)
        aux = goat.aux_loss(model)
        probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
        counts = torch.zeros(E).index_add_(0, probs.topk(2).indices.flatten(), torch.ones(10))
        torch.testing.assert_close(layer.balance_loss(), E * (counts / 5 * probs.sum(0) / 5).sum())
        opt.zero_grad()
        (out.pow(2).mean() + aux).backward()  # raised "backward through the graph a second time"
        opt.step()
    model.eval()
    with torch.no_grad():
        for _ in range(20):
            model.body(torch.randn(2, 40))
    assert [len(layer._probs) for _, layer in goat.goat_layers(model)] == [1, 1]
    # A layer called on its own keeps its last call; a forward of the root then starts afresh.
    with torch.no_grad():
        layer(torch.randn(3, 40))
        layer(torch.randn(4, 40))
    assert [p.shape[0] for p in layer._probs] == [4]
    model(torch.randn(6, 40))
    assert [p.shape[0] for p in layer._probs] == [6]
    # A forward that raises still ends: the next one starts a new forward.
    with pytest.raises(ValueError, match="argument 'x'"):
        model.body(torch.randn(2, 41))
    model.body(torch.randn(7, 40))
    assert [p.shape[0] for p in layer._probs] == [7]
    goat.unwrap(model)
    hooks = [m._forward_pre_hooks or m._forward_hooks for m in model.modules()]
    assert not any(hooks)


class Towers(nn.Module):
    """Two towers and a joint forward, as CLIP with get_text_features / get_image_features."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.vision = mlp(seed=1), mlp(seed=2)

    def forward(self, a, b):
        return self.text(a), self.vision(b)


def test_towers_run_one_after_the_other_each_count():
    model = goat.wrap(Towers(), config(dropout=0.0)).train()
    a, b = torch.randn(4, 40), torch.randn(5, 40)
    model(a, b)
    joint = goat.aux_loss(model)
    model.text(a)
    model.vision(b)
    assert all(layer.has_run for _, layer in goat.goat_layers(model))
    torch.testing.assert_close(goat.aux_loss(model), joint, rtol=0, atol=0)
    for _ in range(2):  # each step's towers replace the last step's calls: no stale graphs
        loss = model.text(a).sum() + model.vision(b).sum() + goat.aux_loss(model)
        loss.backward()
    assert [len(layer._probs) for _, layer in goat.goat_layers(model)] == [1, 1, 1, 1]


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_compiled_training_does_not_recompile_per_step(dropout):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = goat.wrap(mlp(), config(dropout=dropout)).train()
    compiled = torch.compile(model, backend=backend)
    counts = []
    for _ in range(6):
        loss = compiled(torch.randn(5, 40)).pow(2).mean() + goat.aux_loss(model)
        loss.backward()
        counts.append(len(graphs))
    assert counts[2:] == [counts[1]] * 4, counts  # a counter per step would recompile each step
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_with_dropout_is_one_graph_and_replays_eager(device):
    """The per-step dropout seed is a tensor drawn inside the graph, never read in Python:
    no graph break per layer (an int seed broke the graph at every layer), and with eager
    kernels behind the graph (aot_eager) the draws, and so the whole run, equal eager's. On
    CUDA the seed stays a CPU tensor beside the CUDA inputs."""
    torch._dynamo.reset()
    model = goat.wrap(mlp(), config(dropout=0.3)).train().to(device)
    explained = torch._dynamo.explain(model)(torch.randn(70, 40, device=device))
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    def run(compiled):
        torch.manual_seed(0)
        model = goat.wrap(mlp(), config(dropout=0.3)).train().to(device)
        step = torch.compile(model, backend="aot_eager") if compiled else model
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trained, lr=0.5)
        losses = []
        for _ in range(3):
            loss = step(torch.randn(70, 40).to(device)).pow(2).mean() + goat.aux_loss(model)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses), [p.detach().clone() for p in trained]

    eager_losses, eager_params = run(False)
    torch._dynamo.reset()
    compiled_losses, compiled_params = run(True)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-6, atol=1e-7)
    for got, want in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_reduce_overhead_draws_new_masks_each_step_and_keeps_eval_exact():
    """Under torch.compile's CUDA graphs (``mode="reduce-overhead"``) a training forward with
    dropout draws new masks at every call: the dropout ops, tagged ``cudagraph_unsafe``, run
    outside the captured graphs (captured, they would replay the capture's host-read seed). In
    eval mode the plain ops take no CPU tensor and the compiled model equals eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = goat.wrap(mlp(), config(dropout=0.3)).to("cuda")
    x = torch.randn(70, 40, device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead")
    model.train()
    with torch.no_grad():
        outs = [compiled(x).clone() for _ in range(4)]
    assert all(o.isfinite().all() for o in outs)
    for i in range(1, 4):  # warm-up, recording, then replays: every call its own masks
        assert not torch.equal(outs[i], outs[i - 1]), i
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = [compiled(x).clone() for _ in range(3)]
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_new_layers_take_the_replaced_layers_mode(tmp_path):
    """A model in eval mode (as from_pretrained returns it) stays in eval mode after wrap and
    load_adapter: its experts' dropout off, two forwards equal. One in train mode trains."""
    model = mlp().eval()
    goat.wrap(model, config(dropout=0.3))
    assert not any(m.training for m in model.modules())
    x = torch.randn(70, 40)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    path = goat.save_adapter(model, tmp_path / "a.safetensors")
    loaded = goat.load_adapter(mlp().eval(), path)
    assert not any(m.training for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    trained = goat.wrap(mlp().train(), config(dropout=0.3))
    assert all(m.training for m in trained.modules())


def test_copy_after_a_training_forward():
    model = goat.wrap(mlp(), config()).train()
    (model(torch.randn(5, 40)).sum() + goat.aux_loss(model)).backward()
    clone = copy.deepcopy(model)
    assert_same_state(clone, model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert not other[0].has_run
        x = torch.randn(3, 40)
        torch.testing.assert_close(other.eval()(x), model.eval()(x), rtol=0, atol=0)
        assert other[0].has_run and goat.aux_loss(other) > 0  # its hook came along
    goat.unwrap(clone)
    assert not clone._forward_pre_hooks


def test_only_experts_and_routers_train():
    model = goat.wrap(mlp(), config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{p}" for i in (0, 2) for p in ("lora_a", "lora_b", "router.weight")}


def data_parallel_replica(module: nn.Module) -> nn.Module:
    """What ``torch.nn.parallel.replicate`` makes of ``module`` for one device (without the
    copy to that device): ``_replicate_for_data_parallel`` on every submodule, parameters
    shared."""
    replica = module._replicate_for_data_parallel()
    for name, p in module._parameters.items():
        replica._parameters[name] = p
    for name, child in module._modules.items():
        if child is not None:
            replica._modules[name] = data_parallel_replica(child)
    return replica


def test_data_parallel_replicas_refuse_to_train():
    """nn.DataParallel's replicas share a layer's record of router probabilities (the aux loss
    would be the last replica's only): a replica refuses to run in training mode, and runs in
    eval mode."""
    model = goat.wrap(mlp(), config(dropout=0.0))
    x = torch.randn(6, 40)
    replica = data_parallel_replica(model.train())
    with pytest.raises(RuntimeError, match=r"nn\.DataParallel.*DistributedDataParallel"):
        replica(x)
    model.eval()
    replica = data_parallel_replica(model)
    with torch.no_grad():
        assert torch.equal(replica(x), model(x))
    model.train()
    model(x)  # the layers themselves still train


def test_autocast_output_dtype_is_the_base_layers():
    """Under CPU bf16 autocast a GOAT layer returns what its base nn.Linear returns (bf16) for
    fp32 and bf16 inputs alike: the fp32 sum of the base's output and the experts' rounded
    once; the experts keep fp32 gradients."""
    model = goat.wrap(mlp(), config(dropout=0.0)).eval()
    layer = model[0]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 40, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = layer(x)
            plain = layer.base_layer(x)
            delta, _ = routed_lora(
                x.float(),
                layer.lora_a,
                layer.lora_b,
                layer.scaling,
                router_weight=layer.router.weight,
                top_k=2,
            )
        assert plain.dtype == h.dtype == torch.bfloat16, dtype
        assert torch.equal(h, (plain + delta).to(torch.bfloat16)), dtype
        h.float().sum().backward()
        assert x.grad.dtype == dtype and layer.lora_a.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert layer(torch.randn(5, 40)).dtype == torch.float32


# ---- save, load, unwrap ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init", ["goat", "lora", "goat-s"])
def test_save_load_round_trip_is_exact(tmp_path, dtype, init):
    kw = {"init": "goat", "per_expert_scaling": True} if init == "goat-s" else {"init": init}
    model = goat.wrap(mlp(dtype=dtype), config(**kw))
    train(model)
    path = goat.save_adapter(model, tmp_path / "adapter.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temp file left
    cfg, layers, tensors = goat.read_adapter(path)
    assert cfg == config(**kw) and list(layers) == ["0", "2"]
    assert ("0.scaling" in tensors) == (init == "goat-s")

    fresh = goat.load_adapter(mlp(dtype=dtype), path).eval()
    assert_same_state(fresh, model)
    if init == "goat-s":
        for (_, a), (_, b) in zip(goat.goat_layers(fresh), goat.goat_layers(model), strict=True):
            assert torch.equal(a.scaling, b.scaling)
    x = torch.randn(4, 40, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    # Loading into a model wrapped with the same config replaces its adapter, exactly.
    again = goat.load_adapter(goat.wrap(mlp(dtype=dtype), config(**kw)), path)
    assert_same_state(again, model)
    # Saving over an existing file replaces it.
    goat.save_adapter(fresh, path)
    assert_same_state(goat.load_adapter(mlp(dtype=dtype), path), model)
    # Without the kept W0 the fingerprint is of W̃0 + the alignment: the right base still loads.
    loose = goat.wrap(mlp(dtype=dtype), config(**kw), keep_original=False)
    goat.load_adapter(mlp(dtype=dtype), goat.save_adapter(loose, tmp_path / "loose.safetensors"))


def test_module_casts_keep_the_experts_fp32():
    """``model.to(torch.bfloat16)`` (or ``.half()``) casts the base, not the experts, routers and
    GOAT-s factors: they stay fp32 master weights, gradients included; devices and fp64 casts
    still apply."""
    model = goat.wrap(mlp(), config(per_expert_scaling=True))
    train(model, steps=1)
    model[0].lora_a.grad = torch.ones_like(model[0].lora_a)
    trained = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        cast(model)
        for _, layer in goat.goat_layers(model):
            assert layer.base_layer.weight.dtype != torch.float32
            for t in (layer.lora_a, layer.lora_b, layer.router.weight, layer.scaling):
                assert t.dtype == torch.float32
        assert model[0].lora_a.grad.dtype == torch.float32
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert all(torch.equal(a, b) for a, b in zip(trainable, trained, strict=True))
        train(model, steps=1)
        trained = [p.detach().clone() for p in trainable]
    model.double()
    assert model[0].lora_a.dtype == model[0].base_layer.weight.dtype == torch.float64


def test_adapter_of_a_model_cast_after_wrapping(tmp_path):
    """A model wrapped in one dtype and cast to another before training: the file records the
    dtype the base was adjusted in, so loading into the base in that dtype (or a wider one) and
    casting gives the trained model exactly, and a base in a narrower dtype loads within one
    rounding to it; a different base is still refused by its fingerprint."""
    bf16 = torch.bfloat16
    # The common recipe: load in fp32, wrap (fp32 SVD), cast to bf16, train.
    for keep in (True, False):
        model = goat.wrap(mlp(), config(per_expert_scaling=True), keep_original=keep).to(bf16)
        train(model)
        path = goat.save_adapter(model, tmp_path / f"cast{keep}.safetensors")
        assert {info["base_dtype"] for info in goat.read_adapter(path)[1].values()} == {"float32"}
        assert_same_state(goat.load_adapter(mlp(), path).to(bf16), model)
        direct = goat.load_adapter(mlp(dtype=bf16), path)
        got, want, w0 = direct.state_dict(), model.state_dict(), mlp().state_dict()
        assert list(got) == list(want)
        for key in got:
            assert got[key].dtype == want[key].dtype, key
            if key.endswith("base_layer.weight"):  # W0 rounded to bf16 first, then W̃0
                diff = (got[key].float() - want[key].float()).abs()
                w0_key = key.replace("base_layer.", "")
                bound = torch.finfo(bf16).eps * (w0[w0_key].abs() + want[key].float().abs())
                assert (diff <= bound).all(), key
                assert not torch.equal(got[key], want[key])
            else:
                assert torch.equal(got[key], want[key]), key
        with pytest.raises(goat.AdapterError, match="not the one the adapter was trained"):
            goat.load_adapter(mlp(seed=1, dtype=bf16), path)
        with pytest.raises(goat.AdapterError, match="not the one the adapter was trained"):
            goat.load_adapter(mlp(seed=1), path)
        goat.load_adapter(mlp(seed=1, dtype=bf16), path, check_base=False)
    # The other way: wrapped in bf16, cast to fp32. An fp32 base gets the adjusted weights the
    # trained model had (W̃0 rounded to bf16) exactly; its other parameters are its own.
    model = goat.wrap(mlp(dtype=bf16), config()).float()
    train(model)
    path = goat.save_adapter(model, tmp_path / "up.safetensors")
    assert_same_state(goat.load_adapter(mlp(dtype=bf16), path).float(), model)
    got, want = goat.load_adapter(mlp(), path).state_dict(), model.state_dict()
    for key in got:
        assert torch.equal(got[key], want[key]) != key.endswith("bias"), key


class WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(40, 24)
        self.classification_head = nn.Linear(24, 36)

    def forward(self, x):
        return self.classification_head(self.body(x))


def test_adapters_from_before_modules_to_save_still_load(tmp_path, monkeypatch):
    """ "all-linear" used to adapt a head named classification_head (only score and classifier
    were left out); files from then have no modules_to_save metadata and load as they were
    selected."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from meldkit.goat import model as goat_model

    with monkeypatch.context() as m:
        excluded = goat_model._excluded_heads
        m.setattr(goat_model, "_excluded_heads", lambda model, _: excluded(model, ("score",)))
        old = goat.wrap(WithHead(), config(modules_to_save=()))
    assert [n for n, _ in goat.goat_layers(old)] == ["body", "classification_head"]
    path = goat.save_adapter(old, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "modules_to_save"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = goat.load_adapter(WithHead(), tmp_path / "old.safetensors")
    assert_same_state(loaded, old)
    # Today's wrap leaves the head out and trains it in full.
    new = goat.wrap(WithHead(), config())
    assert [n for n, _ in goat.goat_layers(new)] == ["body"]
    assert new.classification_head.weight.requires_grad


def test_base_fingerprint_tells_a_slightly_different_base(tmp_path):
    """A base 0.2 % away from the trained one (another fine-tune) is refused, also when the
    adapter's model kept no copy of W0 and in bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        for keep in (True, False):
            model = goat.wrap(mlp(dtype=dtype), config(), keep_original=keep)
            path = goat.save_adapter(model, tmp_path / f"{dtype}{keep}.safetensors")
            goat.load_adapter(mlp(dtype=dtype), path)
            near = mlp(dtype=dtype)
            with torch.no_grad():
                for p in near.parameters():
                    p.mul_(1 + 0.002 * torch.randn_like(p.float()).to(dtype))
            with pytest.raises(goat.AdapterError, match="not the one the adapter was trained"):
                goat.load_adapter(near, path)


def test_save_names_inside_compile_and_ddp_wrappers(tmp_path):
    model = goat.wrap(mlp(), config())
    path = goat.save_adapter(torch.compile(model), tmp_path / "c.safetensors")
    assert list(goat.read_adapter(path)[1]) == ["0", "2"]  # no "_orig_mod." prefix
    assert_same_state(goat.load_adapter(mlp(), path), model)
    path = goat.save_adapter(nn.DataParallel(model), tmp_path / "d.safetensors")  # "module."
    assert list(goat.read_adapter(path)[1]) == ["0", "2"]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(40, 40), nn.Linear(40, 40)
        self.b.weight = self.a.weight


def test_tied_weights_are_not_adjusted():
    """The SVD inits change the base weight: a weight that another module shares would change
    under it, so it is refused; init="lora" changes no base weight and may adapt it."""
    model = Tied()
    before = model.a.weight.detach().clone()
    with pytest.raises(ValueError, match=r"target 'a' shares its weight with \['b.weight'\]"):
        goat.wrap(model, config(target_modules=["a"]))
    assert torch.equal(model.a.weight, before) and not list(goat.goat_layers(model))
    goat.wrap(model, config(target_modules=["a"], init="lora"))
    assert model.b.weight is model.a.base_layer.weight and torch.equal(model.b.weight, before)


def test_wrap_under_another_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = goat.wrap(mlp(dtype=torch.float32), config())
    finally:
        torch.set_default_dtype(default)
    layer = model[0]
    assert {layer.lora_a.dtype, layer.lora_b.dtype, layer.router.weight.dtype} == {torch.float32}
    assert model(torch.randn(3, 40)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unwrap_restores_the_original_weights(dtype):
    base = mlp(dtype=dtype)
    base[0].bias.requires_grad_(False)
    model = goat.wrap(copy.deepcopy(base), config())
    train(model)
    goat.unwrap(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert_same_state(model, base)
    flags = [p.requires_grad for p in model.parameters()]
    assert flags == [True, False, True, True]  # every parameter's, not only the adapted layers'

    # Without the kept copy, W0 comes back up to the roundings of W̃0 and of the sum.
    model = goat.wrap(copy.deepcopy(base), config(), keep_original=False)
    adjusted = [layer.base_layer.weight.detach().clone() for _, layer in goat.goat_layers(model)]
    goat.unwrap(model)
    for i, adj in zip((0, 2), adjusted, strict=True):
        got, want = model[i].weight.double(), base[i].weight.double()
        assert not torch.equal(adj.double(), want)
        bound = torch.finfo(dtype).eps * (want.abs() + adj.double().abs())
        assert ((got - want).abs() <= bound).all()
    with pytest.raises(ValueError, match="no GOAT layers"):
        goat.unwrap(model)


class Gated(nn.Module):
    """A block with a small gate (as a MoE router): nn.Linear(64, 2) next to 64×64 layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.gate, self.out = nn.Linear(64, 64), nn.Linear(64, 2), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(x) * self.gate(x).softmax(-1)[..., :1])


def test_all_linear_skips_layers_too_small_for_the_init(tmp_path):
    """ "all-linear" with an SVD init leaves out a layer with min(out, in) < rank, with a warning
    naming it, and the adapter loads back; a listed target that small is refused; init "lora"
    adapts it."""
    with pytest.warns(UserWarning, match=r"skips 1 layers.*rank = 8.*gate \(64→2\)"):
        model = goat.wrap(Gated(), config())
    assert [n for n, _ in goat.goat_layers(model)] == ["enc", "out"]
    assert type(model.gate) is nn.Linear and not model.gate.weight.requires_grad
    train_x = torch.randn(5, 64)
    path = goat.save_adapter(model, tmp_path / "g.safetensors")
    fresh = goat.load_adapter(Gated(), path)
    assert_same_state(fresh, model)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(train_x), model.eval()(train_x))
    with pytest.raises(ValueError, match=r"'gate': init 'goat' needs min\(out_features"):
        goat.wrap(Gated(), config(target_modules=["enc", "gate"]))
    lora = goat.wrap(Gated(), config(init="lora"))
    assert [n for n, _ in goat.goat_layers(lora)] == ["enc", "gate", "out"]
    with pytest.raises(
        ValueError, match=r"matches no nn.Linear.*too small.*rank = 8.*: 0 \(64→2\)"
    ):
        goat.wrap(nn.Sequential(nn.Linear(64, 2)), config())


def test_mismatched_adapters_are_refused(tmp_path):
    path = goat.save_adapter(goat.wrap(mlp(), config()), tmp_path / "a.safetensors")

    narrow = nn.Sequential(nn.Linear(40, 20), nn.GELU(), nn.Linear(20, 36))
    with pytest.raises(goat.AdapterError, match=r"'0' is nn.Linear\(40, 20\)"):
        goat.load_adapter(narrow, path)
    assert not list(goat.goat_layers(narrow))  # untouched

    with pytest.raises(goat.AdapterError, match="'2' not found"):
        goat.load_adapter(nn.Sequential(nn.Linear(40, 24)), path)

    deeper = nn.Sequential(*mlp(), nn.Linear(36, 36))
    with pytest.raises(goat.AdapterError, match="selects other layers"):
        goat.load_adapter(deeper, path)

    with pytest.raises(goat.AdapterError, match=r"GOAT config in rho=10.0 \(model: 5.0\)"):
        goat.load_adapter(goat.wrap(mlp(), config(rho=5.0)), path)

    lora = goat.save_adapter(goat.wrap(mlp(), config(init="lora")), tmp_path / "l.safetensors")
    goat.load_adapter(mlp(dtype=torch.bfloat16), lora)  # no base adjustment: any dtype

    from safetensors.torch import load_file, save_file

    # Same architecture, other weights: refused by the base fingerprint, unless asked for.
    with pytest.raises(goat.AdapterError, match=r"'0': the model's base weight is not the one"):
        goat.load_adapter(mlp(seed=1), path)
    other = mlp(seed=1)
    with pytest.raises(goat.AdapterError, match="not the one"):
        goat.load_adapter(other, path)
    assert not list(goat.goat_layers(other))  # untouched
    goat.load_adapter(other, path, check_base=False)
    # Same weights, another bias of an adapted layer: refused by the other parameters' check.
    biased = mlp()
    with torch.no_grad():
        biased[2].bias.add_(1.0)
    with pytest.raises(goat.AdapterError, match=r"other values in parameter '2.bias' than the"):
        goat.load_adapter(biased, path)
    assert not list(goat.goat_layers(biased))  # untouched
    # A file from before the fingerprints loads without the checks.
    old = {
        k: v
        for k, v in load_file(str(path)).items()
        if not k.endswith("base_sketch") and not k.startswith("base_other.")
    }
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(old, str(tmp_path / "old.safetensors"), metadata=metadata)
    goat.load_adapter(mlp(seed=1), tmp_path / "old.safetensors")

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(goat.AdapterError, match="not a GOAT adapter"):
        goat.load_adapter(mlp(), tmp_path / "other.safetensors")
    with pytest.raises(goat.AdapterError, match="not a readable"):
        goat.load_adapter(mlp(), tmp_path / "missing.safetensors")
    # tensors of the wrong dtype are refused by name, before any layer is built
    tensors = load_file(str(path))
    for key, dtype, message in [
        (
            "0.lora_a",
            torch.float16,
            r"0\.lora_b has dtype torch\.float32, 0\.lora_a torch\.float16",
        ),
        ("0.lora_a", torch.int32, r"0\.lora_a has dtype torch\.int32, not a floating"),
        ("2.base_sketch", torch.int64, r"2\.base_sketch has dtype torch\.int64"),
    ]:
        save_file({**tensors, key: tensors[key].to(dtype)}, str(tmp_path / "d"), metadata=metadata)
        with pytest.raises(goat.AdapterError, match=message):
            goat.load_adapter(mlp(), tmp_path / "d")


# ---- data parallel -----------------------------------------------------------------------


DATA_PARALLEL = """
import datetime, sys
import torch
import torch.distributed as dist
import meldkit.goat as goat
from tests.goat.tiny_models import mlp

dist.init_process_group(
    "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
)
model = goat.wrap(mlp(), goat.GoatConfig(num_experts=4, top_k=2, rank=8))
if sys.argv[1] == "ddp":
    from torch.nn.parallel import DistributedDataParallel

    parallel = DistributedDataParallel(model)
else:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # public from torch 2.6
        print("skip: this torch has no torch.distributed.fsdp.fully_shard")
        sys.exit(0)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    parallel = fully_shard(model)
loss = parallel(torch.randn(8, 40)).pow(2).mean() + goat.aux_loss(parallel)
loss.backward()
for name, p in model.named_parameters():
    assert (p.grad is not None) == p.requires_grad, name
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_data_parallel(wrapper):
    """One gloo rank on the CPU. In a child process, so that the process group (global state)
    and a stuck collective cannot affect the other tests."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL, wrapper],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if result.stdout.startswith("skip: "):
        pytest.skip(result.stdout.strip().removeprefix("skip: "))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


RANK0_SAVE = """
import datetime, sys, time
import torch
import torch.distributed as dist
import meldkit.goat as goat
from tests.goat.tiny_models import mlp

rank, store_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
store = dist.FileStore(store_path, 2)
store.add("ready", 1)  # both ranks imported: the short timeout below is for the save only
deadline = time.time() + 120
while store.add("ready", 0) < 2 and time.time() < deadline:
    time.sleep(0.05)
dist.init_process_group(
    "gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=5)
)
try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # public from torch 2.6
    print("skip: this torch has no torch.distributed.fsdp.fully_shard")
    sys.exit(0)
model = goat.wrap(mlp(), goat.GoatConfig(num_experts=4, top_k=2, rank=8))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
if rank == 0:  # the usual mistake: saving on rank 0 only
    try:
        goat.save_adapter(model, out)
    except goat.AdapterError as exc:
        print("refused:", exc)
else:
    time.sleep(12)
print("done")
"""


def test_saving_a_sharded_model_on_rank_0_only_is_named(tmp_path):
    """Under FSDP every rank takes part in save_adapter's gathers: rank 0 alone times out,
    and the error says to call it on every rank (two gloo ranks on the CPU, 5 s timeout)."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    args = [str(tmp_path / "store"), str(tmp_path / "a.safetensors")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK0_SAVE, str(rank), *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    if outs[0][0].startswith("skip: "):
        pytest.skip(outs[0][0].strip().removeprefix("skip: "))
    assert "refused: save_adapter: gathering the FSDP-sharded parameters failed" in outs[0][0], (
        outs[0][1][-3000:]
    )
    assert "call save_adapter on every rank, not on rank 0 only" in outs[0][0]
    assert not (tmp_path / "a.safetensors").exists()


def test_goat_s_adapter_with_bad_factors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = goat.wrap(mlp(), config(per_expert_scaling=True))
    path = goat.save_adapter(model, tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["0.scaling"] = -tensors["0.scaling"]
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(goat.AdapterError, match=r"0\.scaling holds factors that are not finite"):
        goat.load_adapter(mlp(), tmp_path / "bad.safetensors")
    del tensors["0.scaling"]
    save_file(tensors, tmp_path / "missing.safetensors", metadata=metadata)
    with pytest.raises(goat.AdapterError, match=r"tensor 0\.scaling missing"):
        goat.load_adapter(mlp(), tmp_path / "missing.safetensors")


def test_shared_dropout_mode(tmp_path):
    """dropout_mode="shared": in training the layer calls the op with one mask for every expert
    (shared_dropout), reproducibly from torch's seed; eval mode is unaffected; the mode
    round-trips through an adapter file."""
    import dataclasses

    x = torch.randn(70, 40)
    per_expert = goat.wrap(mlp(), config(dropout=0.2)).train()
    shared = copy.deepcopy(per_expert)
    for _, layer in goat.goat_layers(shared):
        layer.config = dataclasses.replace(layer.config, dropout_mode="shared")
    outs = []
    for model in (shared, per_expert, shared):
        torch.manual_seed(5)
        outs.append(model(x))
    assert torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], outs[1])
    layer = shared[0]
    torch.manual_seed(5)
    seed = torch.randint(0, goat_layer.SEED_BOUND, (1,))
    delta, _ = routed_lora(
        x,
        layer.lora_a,
        layer.lora_b,
        layer.scaling,
        router_weight=layer.router.weight,
        top_k=layer.top_k,
        dropout=0.2,
        seed=seed,
        shared_dropout=True,
    )
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + delta, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(shared.eval()(x), per_expert.eval()(x))
    path = goat.save_adapter(shared, tmp_path / "shared.safetensors")
    assert goat.read_adapter(path)[0].dropout_mode == "shared"


def test_a_float64_base_keeps_its_precision():
    # The op computes the base product with fp32 accumulation: a float64 base runs as a module.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48).double())
    x = torch.randn(200, 64, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    config = goat.GoatConfig(rank=8, num_experts=4, init="lora", dropout=0.0, target_modules=["0"])
    goat.wrap(model, config, progress=False)
    with torch.no_grad():
        got = model.eval()(x)  # init="lora": B = 0, the base alone
    assert got.dtype == torch.float64 and torch.equal(got, want)
