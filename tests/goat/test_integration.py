"""GOAT inside the training stacks it must work with: the Hugging Face Trainer (aux loss added),
torch.compile, bf16 autocast, activation checkpointing, DDP and FSDP on two gloo ranks, and,
with one expert, PEFT's own LoRA layer."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import meldkit.goat as goat
from meldkit.goat import layer as goat_layer
from meldkit.ops import routed_lora
from tests.goat.tiny_models import mlp, tiny_llama
from tests.helpers import tolerance

ROOT = Path(__file__).resolve().parents[2]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def llama_config(**kw) -> goat.GoatConfig:
    return goat.GoatConfig(
        **{"num_experts": 4, "top_k": 2, "rank": 8, "target_modules": LLAMA_TARGETS, **kw}
    )


def token_batch(vocab: int, rows: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, 12), generator=torch.Generator().manual_seed(seed))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainable(model).items()}


def child_env() -> dict[str, str]:
    """Child processes import this checkout and use one thread each (the CPU may be shared)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


# ---- Hugging Face Trainer ------------------------------------------------------------------


def test_hf_trainer_with_aux_loss(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from meldkit.goat import trainer as goat_trainer

    aux_losses: list[float] = []

    def spy(model):
        aux = goat.aux_loss(model)
        aux_losses.append(aux.item())
        return aux

    monkeypatch.setattr(goat_trainer, "aux_loss", spy)

    model = goat.wrap(tiny_llama(), llama_config())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    routers = {n: p.detach().clone() for n, p in trainable(model).items() if "router" in n}
    ids = token_batch(model.config.vocab_size, rows=8)
    data = [{"input_ids": row, "labels": row} for row in ids]
    with torch.no_grad():
        before = model(ids, labels=ids).loss.item()

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = goat.GoatTrainer(model=model, args=args, train_dataset=data)
    result = trainer.train()

    assert result.global_step == 12
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 12 and all(torch.isfinite(torch.tensor(logged)))
    assert len(aux_losses) == 12 and all(0 < a < 1 for a in aux_losses)
    model.eval()
    with torch.no_grad():
        after = model(ids, labels=ids).loss.item()
    assert after < before - 0.1, (before, after)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())  # only GOAT trained
    assert all(not torch.equal(params[n], p) for n, p in routers.items())


def trainer_args(tmp_path, **kw):
    """Trainer arguments for a short CPU run; ``gradient_checkpointing*`` are renamed
    ``activation_checkpointing*`` where transformers has those (5.x)."""
    import dataclasses

    import transformers

    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    if "activation_checkpointing" in fields:
        kw = {
            k.replace("gradient_", "activation_", 1) if "checkpointing" in k else k: v
            for k, v in kw.items()
        }
    return transformers.TrainingArguments(
        **{
            "output_dir": str(tmp_path / "trainer"),
            "use_cpu": True,
            "report_to": [],
            "save_strategy": "no",
            "per_device_train_batch_size": 2,
            "max_steps": 2,
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            **kw,
        }
    )


def test_trainer_divides_the_aux_loss_outside_the_training_loop(tmp_path, monkeypatch):
    """Without the training loop's ``current_gradient_accumulation_steps`` (compute_loss called
    on its own, or a Trainer that does not set it), the aux loss is divided by the configured
    ``gradient_accumulation_steps``, not by 1."""
    pytest.importorskip("transformers")
    import transformers

    from meldkit.goat import trainer as goat_trainer

    monkeypatch.setattr(goat_trainer, "aux_loss", lambda model: torch.tensor(8.0))
    model = goat.wrap(tiny_llama(), llama_config(dropout=0.0)).train()
    trainer = goat.GoatTrainer(
        model=model, args=trainer_args(tmp_path, gradient_accumulation_steps=4)
    )
    trainer.__dict__.pop("current_gradient_accumulation_steps", None)
    monkeypatch.setattr(trainer, "_loss_scaled_for_accumulation", lambda n: True)
    ids = token_batch(model.config.vocab_size)
    inputs = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        task = transformers.Trainer.compute_loss(trainer, model, inputs)
        total = trainer.compute_loss(model, inputs)
    torch.testing.assert_close(total - task, torch.tensor(2.0))


def test_trainer_checkpoints_without_reentrance(tmp_path):
    """GoatTrainer with activation checkpointing and no ``use_reentrant`` chosen uses
    ``use_reentrant=False`` (the aux loss reaches the routers); a choice of the user stays, and
    reentrant checkpointing trains with ``aux_loss_coef=0``, whose aux loss is 0."""
    pytest.importorskip("transformers")

    def kwargs_of(trainer):
        args = trainer.args
        return getattr(args, "activation_checkpointing_kwargs", None) or (
            args.gradient_checkpointing_kwargs
        )

    model = goat.wrap(tiny_llama(), llama_config())
    chosen = goat.GoatTrainer(model=model, args=trainer_args(tmp_path, gradient_checkpointing=True))
    assert kwargs_of(chosen) == {"use_reentrant": False}
    off = goat.GoatTrainer(model=model, args=trainer_args(tmp_path))
    assert not kwargs_of(off)

    ids = token_batch(96, rows=8)
    data = [{"input_ids": row, "labels": row} for row in ids]
    model = goat.wrap(tiny_llama(), llama_config(aux_loss_coef=0.0)).train()
    args = trainer_args(
        tmp_path,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
        gradient_accumulation_steps=2,
    )
    trainer = goat.GoatTrainer(model=model, args=args, train_dataset=data)
    assert kwargs_of(trainer) == {"use_reentrant": True}
    routers = {n: p.detach().clone() for n, p in trainable(model).items() if "router" in n}
    assert trainer.train().global_step == 2
    assert all(not torch.equal(trainable(model)[n], p) for n, p in routers.items())


def test_aux_loss_with_zero_coefficient_under_reentrant_checkpointing():
    """With ``aux_loss_coef=0`` the aux loss is a zero tensor even after reentrant
    checkpointing's forward without autograd (no RuntimeError); with a coefficient it raises."""
    for coef in (0.0, 1e-3):
        model = goat.wrap(tiny_llama(), llama_config(aux_loss_coef=coef)).train()
        enable_checkpointing(model, use_reentrant=True)
        ids = token_batch(model.config.vocab_size)
        loss = model(ids, labels=ids, use_cache=False).loss
        if coef:
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                goat.aux_loss(model)
        else:
            aux = goat.aux_loss(model)
            assert aux.dtype == torch.float32 and aux.shape == () and aux.item() == 0.0
            (loss + aux).backward()


def test_trainer_refuses_data_parallel_on_several_devices(tmp_path):
    """The Trainer wraps the model in nn.DataParallel with several GPUs in one process: the aux
    loss would be one replica's, so GoatTrainer refuses (checked before any forward)."""
    pytest.importorskip("transformers")
    model = goat.wrap(tiny_llama(), llama_config())
    trainer = goat.GoatTrainer(model=model, args=trainer_args(tmp_path))
    parallel = nn.DataParallel(model.train())
    parallel.device_ids = [0, 1]  # as on two GPUs (nothing runs)
    ids = token_batch(model.config.vocab_size)
    with pytest.raises(RuntimeError, match=r"DataParallel on 2 devices.*torchrun"):
        trainer.compute_loss(parallel, {"input_ids": ids, "labels": ids})


# ---- torch.compile -------------------------------------------------------------------------


def require_inductor_compiler() -> None:
    from torch._inductor import exc

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: let torch.compile itself say what is missing
        return
    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler as err:
        pytest.skip(f"torch.compile unusable on this CPU: inductor finds no C++ compiler ({err})")


@pytest.mark.parametrize(
    ("dropout", "goat_s"), [(0.0, False), (0.3, False), (0.0, True)], ids=["p0", "p0.3", "goat-s"]
)
def test_torch_compile_matches_eager(dropout, goat_s):
    """Forward + backward (aux loss included) of the compiled model equal eager's. With dropout,
    inductor's own random numbers would draw other seeds than eager's; ``fallback_random`` makes
    it draw from torch's generator, so the masks, and hence the results, are the same."""
    require_inductor_compiler()
    import torch._inductor.config as inductor_config

    cfg = goat.GoatConfig(
        num_experts=4, top_k=2, rank=8, dropout=dropout, per_expert_scaling=goat_s
    )
    eager = goat.wrap(mlp(), cfg)
    eager.train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    gen = torch.Generator().manual_seed(3)
    x, target = torch.randn(6, 40, generator=gen), torch.randn(6, 36, generator=gen)

    def step(run, model):
        torch.manual_seed(11)
        loss = (run(x) - target).pow(2).mean() + goat.aux_loss(model)
        loss.backward()
        return loss.detach()

    try:
        with inductor_config.patch(fallback_random=True):
            got = step(compiled, compiled_model)
        expected = step(eager, eager)
        torch.testing.assert_close(got, expected)
        g_eager, g_compiled = grads(eager), grads(compiled_model)
        for name, g in g_eager.items():
            torch.testing.assert_close(g_compiled[name], g, msg=name)
    finally:
        torch._dynamo.reset()


# ---- bf16 autocast -------------------------------------------------------------------------


def test_bf16_autocast():
    """Under CPU bf16 autocast the experts stay fp32 parameters with fp32 gradients; the loss,
    logits and every gradient are within bf16's rounding (2·eps, the one rule's relative term,
    norm-wise) of the fp32 run."""
    model = goat.wrap(tiny_llama(), llama_config(dropout=0.0)).train()
    ids = token_batch(model.config.vocab_size)

    def run(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids)
            loss = out.loss + goat.aux_loss(model)
        loss.backward()
        return loss.detach(), out.logits.detach().float(), grads(model)

    loss32, logits32, grads32 = run(False)
    loss16, logits16, grads16 = run(True)
    rtol = tolerance(torch.bfloat16)[0]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert torch.isfinite(loss16) and rel(loss16, loss32) <= rtol
    assert rel(logits16, logits32) <= rtol
    for name, g in grads16.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert rel(g, grads32[name]) <= rtol, (name, rel(g, grads32[name]))


# ---- activation checkpointing --------------------------------------------------------------


def enable_checkpointing(model, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)  # the newer name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Reentrant checkpointing only backpropagates into a block whose input requires grad:
    # transformers 5 hooks the embeddings for that itself, 4.x only for PEFT models, so under
    # 4.x goat.wrap does (nothing is done here).


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(monkeypatch, use_reentrant):
    """With dropout, the recomputed forward must draw the same seeds as the first: the layers
    draw them from torch's CPU generator, which ``torch.utils.checkpoint`` restores before
    recomputing (``preserve_rng_state=True``). The gradients then equal those of a run without
    checkpointing. Reentrant checkpointing runs the first forward without autograd, so the aux
    loss cannot reach the routers: ``aux_loss`` says so instead of dropping their gradient."""
    calls: list[tuple[int, int | None]] = []  # (id of the layer's lora_a, seed)

    def spy(*args, **kwargs):
        calls.append((id(args[1]), kwargs["seed"]))
        return routed_lora(*args, **kwargs)

    monkeypatch.setattr(goat_layer, "routed_lora", spy)

    def run(checkpointing: bool, with_aux: bool):
        model = goat.wrap(tiny_llama(), llama_config(dropout=0.3)).train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant)
        ids = token_batch(model.config.vocab_size)
        calls.clear()
        torch.manual_seed(3)
        loss = model(ids, labels=ids, use_cache=False).loss
        if with_aux:
            loss = loss + goat.aux_loss(model)
        loss.backward()
        names = {id(layer.lora_a): name for name, layer in goat.goat_layers(model)}
        seeds: dict[str, list[int | None]] = {}
        for key, seed in calls:
            seeds.setdefault(names[key], []).append(seed)
        return loss.detach(), grads(model), seeds

    with_aux = not use_reentrant
    loss0, grads0, seeds0 = run(False, with_aux)
    loss1, grads1, seeds1 = run(True, with_aux)
    n_layers = 2 * len(LLAMA_TARGETS)
    assert len(seeds0) == n_layers and len({s for (s,) in seeds0.values()}) == n_layers
    # Every layer ran again in the backward, with the seed of its first run.
    assert seeds1 == {name: [s, s] for name, (s,) in seeds0.items()}
    assert torch.equal(loss1, loss0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=name)

    if use_reentrant:
        model = goat.wrap(tiny_llama(), llama_config(dropout=0.3)).train()
        enable_checkpointing(model, use_reentrant)
        ids = token_batch(model.config.vocab_size)
        model(ids, labels=ids, use_cache=False)
        with pytest.raises(RuntimeError, match="use_reentrant=False"):
            goat.aux_loss(model)
        with torch.no_grad():  # for logging, no gradient wanted: fine
            assert goat.aux_loss(model) > 0


# ---- DDP and FSDP: two gloo ranks on the CPU -----------------------------------------------


DATA_PARALLEL = """
import contextlib, datetime, sys
import torch
import torch.distributed as dist
import meldkit.goat as goat
from tests.goat.tiny_models import mlp

mode, rank, world, store, adapter = sys.argv[1], int(sys.argv[2]), 2, sys.argv[3], sys.argv[4]
if mode == "fsdp":
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # public from torch 2.6
        print("skip: this torch has no torch.distributed.fsdp.fully_shard")
        sys.exit(0)
dist.init_process_group(
    "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
    timeout=datetime.timedelta(seconds=60),
)
config = goat.GoatConfig(num_experts=4, top_k=2, rank=8, dropout=0.1)
gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
x, target = torch.randn(8, 40, generator=gen), torch.randn(8, 36, generator=gen)


def loss_of(model):
    torch.manual_seed(7)  # the same dropout seeds in the reference and the parallel run
    return (model(x) - target).pow(2).mean() + goat.aux_loss(model)


def trainable(model):  # by the names of the model before FSDP1 wrapped its modules
    return {
        n.replace("_fsdp_wrapped_module.", ""): p
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def gather(t):
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def full(t):  # FSDP holds shards (DTensors)
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# Reference: this rank's own gradient, averaged over the ranks (what data parallel computes).
ref = goat.wrap(mlp(), config).train()  # mlp() seeds itself: the same model on every rank
loss_of(ref).backward()
for name, p in trainable(ref).items():
    mine = gather(p.grad)
    assert not torch.equal(mine[0], mine[1]), name  # the batches differ
    p.grad = sum(mine) / world

model = goat.wrap(mlp(), config).train()
if mode == "ddp":
    from torch.nn.parallel import DistributedDataParallel

    parallel = DistributedDataParallel(model)
elif mode == "fsdp":
    for layer in (model[0], model[2]):
        fully_shard(layer)
    parallel = fully_shard(model)
else:  # FSDP1, nested units: names gain "_fsdp_wrapped_module.", parameters are flat shards
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for i in (0, 2):
        model[i] = FSDP(model[i], device_id=torch.device("cpu"), use_orig_params=True)
    parallel = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)


def whole(with_grads=False):  # FSDP1 shows whole parameters inside summon_full_params only
    if mode != "fsdp1":
        return contextlib.nullcontext()
    return FSDP.summon_full_params(parallel, writeback=False, with_grads=with_grads)


loss_of(parallel).backward()
with whole(with_grads=True):
    ours, theirs = trainable(model), trainable(ref)
    assert list(ours) == list(theirs)
    for name, p in ours.items():
        g = full(p.grad)
        copies = gather(g)
        assert torch.equal(copies[0], copies[1]), name  # reduced: the same on every rank
        torch.testing.assert_close(g, theirs[name].grad, msg=name)
    for name, p in model.named_parameters():  # FSDP1 shows frozen parameters zero gradients
        assert (p.grad is not None) == p.requires_grad or mode == "fsdp1", name

# One step keeps the replicas identical (and equal to the reference's step).
for m in (model, ref):
    torch.optim.SGD(list(trainable(m).values()), lr=0.5).step()
trained = {}
with whole():
    for name, p in trainable(model).items():
        w = trained[name] = full(p.detach()).clone()
        copies = gather(w)
        assert torch.equal(copies[0], copies[1]), name
        torch.testing.assert_close(w, trainable(ref)[name].detach(), msg=name)

# save_adapter on every rank (the sharded weights are gathered, rank 0 writes); a fresh base
# loads the trained weights exactly, on every rank.
written = goat.save_adapter(parallel, adapter)
assert str(written) == adapter
loaded = goat.load_adapter(mlp(), written)
assert list(trainable(loaded)) == list(trained)
for name, p in trainable(loaded).items():
    assert torch.equal(p, trained[name]), name
reference = goat.load_adapter(mlp(), goat.save_adapter(ref, f"{adapter}.{rank}.ref"))
x_check = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
torch.testing.assert_close(loaded.eval()(x_check), reference.eval()(x_check))
if mode != "ddp":
    try:
        goat.load_adapter(parallel, written)
    except goat.AdapterError as exc:
        assert "sharded by FSDP" in str(exc), exc
    else:
        raise AssertionError("load_adapter accepted a sharded model")
dist.barrier()  # both ranks are done with their collectives before either tears down
dist.destroy_process_group()
print("ok", flush=True)
# Skip the interpreter's teardown: a rank aborted now and then in it ("terminate called without
# an active exception", SIGABRT), after every check above had passed.
import os
os._exit(0)
"""


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "fsdp1"])
def test_data_parallel_two_ranks(tmp_path, wrapper):
    """Two gloo processes, each with its own batch (and GOAT dropout): the reduced expert and
    router gradients equal the mean of the ranks' own gradients on every rank, and an optimizer
    step leaves the replicas identical. ``save_adapter`` called on every rank writes the whole
    trained weights (FSDP: gathered from the shards, under the unwrapped names), which a fresh
    base loads exactly; ``load_adapter`` refuses a sharded model. FSDP2 (``fully_shard``) and
    FSDP1 (nested ``FullyShardedDataParallel`` units, ``use_orig_params=True``). Child
    processes with a deadline, so that a stuck collective fails the test instead of stalling
    it."""
    store = tmp_path / "store"  # a FileStore: rendezvous without picking a free port
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                DATA_PARALLEL,
                wrapper,
                str(rank),
                str(store),
                str(tmp_path / "adapter.safetensors"),
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + 180
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{wrapper}: the two ranks did not finish within 180 s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if all(out.startswith("skip: ") for out, _ in outputs):
        pytest.skip(outputs[0][0].strip().removeprefix("skip: "))
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 and out.strip() == "ok", (
            f"rank {rank}: stdout {out[-500:]!r}\n{err[-3000:]}"
        )


# ---- one expert is plain LoRA: against PEFT ------------------------------------------------


def test_one_expert_equals_peft_lora():
    """E = 1, k = 1, init "lora": the router gives every token the gate 1 and the layer is
    ``W0 x + b + s·B A x``, PEFT's LoRA with s = lora_alpha / r. Outputs and the gradients of x,
    A and B agree with PEFT's layer holding the same weights, each within the fp32 rule of the
    exact value (float64, ``tests.helpers.tolerance`` with the chain's magnitudes)."""
    peft = pytest.importorskip("peft")
    n, m, r, alpha = 24, 16, 4, 8
    holder = nn.Module()
    torch.manual_seed(0)
    holder.proj = nn.Linear(n, m)
    ours = goat.wrap(
        copy.deepcopy(holder),
        goat.GoatConfig(
            num_experts=1,
            top_k=1,
            rank=r,
            init="lora",
            dropout=0.0,
            scaling=alpha / r,
            target_modules=["proj"],
        ),
    ).proj
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    theirs = peft.get_peft_model(copy.deepcopy(holder), config).base_model.model.proj
    assert ours.scaling == theirs.scaling["default"] == alpha / r

    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(r, n, generator=gen) * n**-0.5, torch.randn(m, r, generator=gen)
    with torch.no_grad():
        ours.lora_a.copy_(a[None])
        ours.lora_b.copy_(b[None])
        theirs.lora_A["default"].weight.copy_(a)
        theirs.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 5, n, generator=gen)
    dy = torch.randn(3, 5, m, generator=gen)

    def forward_backward(layer, params):
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.backward(dy)
        return [y.detach(), xg.grad, *(p.grad for p in params)]

    got = forward_backward(ours, [ours.lora_a, ours.lora_b])
    got[2], got[3] = got[2][0], got[3][0]
    peft_a, peft_b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    expected = forward_backward(theirs, [peft_a, peft_b])
    assert ours.router.weight.grad is None or not ours.router.weight.grad.any()  # softmax of one

    # The exact values and their magnitudes: the same chain in float64, on |values| for the latter.
    w0, bias = holder.proj.weight.detach(), holder.proj.bias.detach()

    def exact(x_, w_, bias_, a_, b_, dy_):
        leaves = [t.double().requires_grad_(True) for t in (x_, a_, b_)]
        y = (
            leaves[0] @ w_.double().T
            + bias_.double()
            + alpha / r * (leaves[0] @ leaves[1].T) @ leaves[2].T
        )
        y.backward(dy_.double())
        return [y.detach(), *(t.grad for t in leaves)]

    reference = exact(x, w0, bias, a, b, dy)
    magnitude = exact(x.abs(), w0.abs(), bias.abs(), a.abs(), b.abs(), dy.abs())
    rtol, mtol = tolerance(torch.float32, n_terms=n + m + r + x.shape[0] * x.shape[1])
    names = ["y", "dx", "dA", "dB"]
    for name, ours_t, peft_t, ref, mag in zip(
        names, got, expected, reference, magnitude, strict=True
    ):
        bound = rtol * ref.abs() + mtol * mag
        for who, t in (("meldkit", ours_t), ("peft", peft_t)):
            err = (t.double() - ref).abs()
            assert (err <= bound).all(), (name, who, (err - bound).max().item())
        # So the two agree within twice the rule.
        assert ((ours_t.double() - peft_t.double()).abs() <= 2 * bound).all(), name


def test_input_grads_hook_is_wraps_only_under_transformers_4():
    """Under transformers 4.x wrap hooks the input embeddings (so reentrant checkpointing reaches
    the experts) and unwrap removes the hook; under 5.x, which does it when checkpointing is
    enabled, wrap leaves the model alone."""
    import transformers

    from meldkit.goat.model import _live_input_grads_hook

    model = goat.wrap(tiny_llama(), llama_config())
    assert _live_input_grads_hook(model) == (int(transformers.__version__.split(".")[0]) < 5)
    goat.unwrap(model)
    assert not _live_input_grads_hook(model)
    # a hook the user put there first stays theirs
    model = tiny_llama()
    model.enable_input_require_grads()
    goat.unwrap(goat.wrap(model, llama_config()))
    assert _live_input_grads_hook(model)


def test_wrap_shows_a_progress_bar_over_the_layers_unless_asked_not_to(capsys):
    """The SVD inits factor every target weight (seconds for SmolLM2-135M "all-linear", minutes
    for a 7B model): wrap shows a bar per layer on stderr, as twin.build does per tensor, with
    the same keyword and default."""
    import inspect

    from meldkit import twin

    option = inspect.signature(goat.wrap).parameters["progress"]
    assert option.kind is inspect.Parameter.KEYWORD_ONLY
    assert option.default is inspect.signature(twin.build).parameters["progress"].default is True
    capsys.readouterr()
    goat.wrap(mlp(), goat.GoatConfig(num_experts=2, top_k=1, rank=4))
    err = capsys.readouterr().err
    assert "goat wrap" in err and "2/2" in err and "layer" in err
    goat.wrap(mlp(), goat.GoatConfig(num_experts=2, top_k=1, rank=4), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("container", ["encoder", "nested", "sequential"])
def test_pytorch_encoder_layers_keep_their_experts_in_eval_mode(container):
    # In eval mode, nn.TransformerEncoderLayer runs a fused kernel that reads linear1.weight and
    # linear2.weight directly (the base alone) unless a module inside it has hooks, and
    # nn.TransformerEncoder hands its layers nested tensors when given a padding mask.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    if container == "sequential":
        model = nn.Sequential(layer)
    else:
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=container == "nested")
    x = torch.randn(2, 10, 64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    kwargs = {} if container == "sequential" else {"src_key_padding_mask": mask}
    model.eval()
    with torch.no_grad():
        base = model(x, **kwargs)
    goat.wrap(
        model, goat.GoatConfig(rank=8, num_experts=4, dropout=0.0, init="lora"), progress=False
    )
    with torch.no_grad():
        for _, g in goat.model.goat_layers(model):
            g.lora_b.normal_()
        model.train()
        want = model(x, **kwargs)
        model.eval()
        got = model(x, **kwargs)
    keep = ~mask.unsqueeze(-1) if kwargs else torch.ones(1, dtype=torch.bool)
    assert (want - base).where(keep, 0).abs().max() > 0.1  # the experts change the output
    torch.testing.assert_close(got.where(keep, 0), want.where(keep, 0), atol=1e-5, rtol=1e-5)
    goat.unwrap(model)
    if container == "nested":
        assert model.use_nested_tensor  # put back by unwrap
    with torch.no_grad():
        torch.testing.assert_close(model(x, **kwargs).nan_to_num(), base.nan_to_num())


@pytest.mark.parametrize("targets", ["all-linear", ("base_layer",), ("q_proj",)])
def test_wrap_refuses_the_layers_of_a_peft_adapter(targets):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    config = goat.GoatConfig(rank=8, num_experts=4, init="lora", target_modules=targets)
    with pytest.raises(ValueError, match=r"PEFT|another adapter library") as err:
        goat.wrap(model, config, progress=False)
    assert "q_proj" in str(err.value)
    assert not list(goat.model.goat_layers(model))
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.weight.requires_grad  # PEFT's own adapter still trains


def test_trainer_saves_the_adapter_beside_its_checkpoints(tmp_path):
    # save_model (final and per checkpoint) writes goat_adapter.safetensors, which loads onto
    # the base; the Trainer's own model file keeps the wrapped names it resumes from.
    pytest.importorskip("transformers")
    model = goat.wrap(tiny_llama(), llama_config())
    ids = token_batch(96, rows=4)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = trainer_args(tmp_path, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    trainer = goat.GoatTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (tmp_path / "trainer" / "checkpoint-2" / "goat_adapter.safetensors").is_file()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        got = goat.load_adapter(tiny_llama(), out)(ids).logits
    assert torch.equal(got, want)


def test_peft_lora_on_goat_routers_is_refused():
    # GoatLinear reads router.weight directly: a PEFT LoRA on "router" would change nothing.
    peft = pytest.importorskip("peft")
    model = goat.wrap(tiny_llama(), llama_config())
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["router"]))
    with pytest.raises(RuntimeError, match=r"router is a peft\.tuners\..*PEFT's LoRA on 'router'"):
        model(token_batch(96, rows=2))
