"""``meldkit demo``: runs each op on random data, checks it against its reference, and times it.

Each method adds a short section: the pilot op ``weighted_sum``, TIES merging through the
streaming engine, a GOAT training run with its adapter round trip, Twin-Merging, ExDe and DLF.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from meldkit import _native


def _demo_weighted_sum(device: torch.device) -> bool:
    from meldkit.ops import weighted_sum, weighted_sum_ref

    gen = torch.Generator(device="cpu").manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensors = [torch.randn(1000, 1003, generator=gen).to(device, dtype) for _ in range(4)]
        weights = [0.5, -0.25, 1.0, 0.3]
        got = weighted_sum(tensors, weights)
        ref = weighted_sum_ref([t.double() for t in tensors], weights)
        err = ((got.double() - ref).norm() / ref.norm()).item()
        # Relative error of one rounding to the output dtype, with room for a few ulps.
        bound = 4 * torch.finfo(dtype).eps
        status = "ok" if err <= bound else "FAILED"
        ok &= err <= bound
        print(f"  weighted_sum {dtype!s:<15} 4 x [1000, 1003]  rel. error {err:.2e}  {status}")
    return ok


def _demo_merge(device: torch.device) -> bool:
    """Write a tiny base model and three sparse fine-tunes as safetensors, merge them with TIES
    through the streaming engine, and check the result against the reference tensor by tensor."""
    import tempfile
    from pathlib import Path

    from meldkit.merging import Checkpoint, merge
    from meldkit.merging.synthetic import write_checkpoint
    from meldkit.ops import merge_ref

    gen = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (512, 64), "layer.0.mlp.weight": (256, 64), "norm.weight": (64,)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    tunes = [
        {
            k: v
            + 0.02
            * torch.randn(v.shape, generator=gen)
            * (torch.rand(v.shape, generator=gen) < 0.3)
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        states = [("base", base)] + [(f"ft{i}", t) for i, t in enumerate(tunes)]
        paths = [str(write_checkpoint(root / name, state)) for name, state in states]
        config = {
            "merge_method": "ties",
            "base_model": paths[0],
            "models": [
                {"model": p, "parameters": {"weight": 1.0, "density": 0.5}} for p in paths[1:]
            ],
            "parameters": {"normalize": True},
        }
        out = merge(config, root / "merged", device=device, progress=False)
        merged = Checkpoint(out)
        ok = True
        for name in shapes:
            expected = merge_ref.generalized_merge_ref(
                base[name],
                [t[name] for t in tunes],
                weights=[1.0] * 3,
                densities=[0.5] * 3,
                sparsify="magnitude",
                consensus="sum",
                normalize=True,
            )
            same = torch.equal(merged.get(name), expected)
            ok &= same
            print(
                f"  merge ties  {name:<20} {list(shapes[name])!s:<12} "
                f"{'equals the reference' if same else 'DIFFERS from the reference'}"
            )
    return ok


def _demo_goat(device: torch.device) -> bool:
    """Wrap a small MLP with GOAT, train it for 20 steps (aux loss included) to follow a copy of
    itself whose first layer got a low-rank change, then check that the adapter saved, loaded into
    a fresh base and unwrapped gives back the same model bit for bit."""
    import copy
    import tempfile
    from pathlib import Path

    from torch import nn

    import meldkit.goat as goat

    d, steps = 64, 20
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)).to(device)
    teacher = copy.deepcopy(base)
    with torch.no_grad():  # the task: a rank-4 change of the first layer, ~30% of its norm
        change = torch.randn(d, 4, device=device) @ torch.randn(4, d, device=device)
        teacher[0].weight += 0.3 * change * (base[0].weight.norm() / change.norm())
        x = torch.randn(1024, d, device=device)
        target = teacher(x)

    config = goat.GoatConfig(num_experts=4, top_k=2, rank=16)  # every nn.Linear
    model = goat.wrap(copy.deepcopy(base), config, progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    print(
        f"  goat  wrap   MLP {d}-{d}-{d}, E={config.num_experts} k={config.top_k} "
        f"r={config.rank}: {n_train:,} of {n_all:,} parameters trainable"
    )

    def task_loss() -> float:
        model.eval()
        with torch.no_grad():
            return nn.functional.mse_loss(model(x), target).item()

    before = task_loss()
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), target) + goat.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task_loss()
    # Training must remove most of the error the change made (the base alone starts at `before`).
    learned = after < 0.5 * before
    print(
        f"  goat  train  {steps} steps, AdamW + aux loss: task loss {before:.3e} -> {after:.3e}  "
        f"{'ok' if learned else 'FAILED (did not halve)'}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = goat.save_adapter(model, Path(tmp) / "adapter.safetensors")
        fresh = goat.load_adapter(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        same_out = torch.equal(fresh(x), model(x))
    state, loaded = model.state_dict(), fresh.state_dict()
    same_state = state.keys() == loaded.keys() and all(
        torch.equal(state[k], loaded[k]) for k in state
    )
    print(
        f"  goat  save_adapter -> load_adapter into a fresh base: weights and outputs "
        f"{'equal bit for bit  ok' if same_out and same_state else 'DIFFER  FAILED'}"
    )
    goat.unwrap(fresh)
    original = base.state_dict()
    restored = fresh.state_dict().keys() == original.keys() and all(
        torch.equal(v, original[k]) for k, v in fresh.state_dict().items()
    )
    verdict = "come back bit for bit  ok" if restored else "DIFFER  FAILED"
    print(f"  goat  unwrap: the original weights {verdict}")
    return learned and same_out and same_state and restored


def _demo_twin(device: torch.device) -> bool:
    """Twin-Merging on a small MLP: three experts (copies of a base moved along different
    directions), the shared expert and rank-25 % exclusive factors, a router trained on held-out
    inputs of each task, routed inference against the experts and against the reference's
    per-sample dense rebuild, and a save/load round trip."""
    import copy
    import tempfile
    from pathlib import Path

    from torch import nn

    from meldkit import twin

    torch.manual_seed(0)
    d, n_tasks = 32, 3
    base = nn.Sequential(nn.Linear(d, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4)).to(device)
    experts = []
    for t in range(n_tasks):
        e = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for p in e.parameters():  # a low-rank move per matrix, like a fine-tune
                if p.dim() == 2:
                    u = torch.randn(p.shape[0], 2, generator=gen)
                    v = torch.randn(2, p.shape[1], generator=gen)
                    p += (0.1 * u @ v / p.shape[1] ** 0.5).to(device)
                else:
                    p += (0.05 * torch.randn(p.shape, generator=gen)).to(device)
        experts.append(e)
    # the last layer is each task's own head (the paper keeps heads per task)
    ex = twin.build(base, experts, rank_ratio=0.25, exclude=[r"^3\."], progress=False)
    storage = ex.storage()

    def features(model, x):
        return model[1](model[0](x))

    model = twin.TwinModel(base, ex, router=twin.TwinRouter(64, n_tasks), features=features).eval()
    centres = 2.0 * torch.randn(n_tasks, d, generator=torch.Generator().manual_seed(9))

    def inputs(n, seed):
        gen = torch.Generator().manual_seed(seed)
        return {
            t: (centres[t] + torch.randn(n, d, generator=gen)).to(device) for t in range(n_tasks)
        }

    train, val, test = inputs(256, 1), inputs(64, 2), inputs(64, 3)
    fit = twin.train_router(
        model,
        {model.tasks[t]: model.features(v) for t, v in train.items()},  # router features
        {model.tasks[t]: model.features(v) for t, v in val.items()},
        epochs=20,
        batch_size=64,
        progress=False,
    )
    print(
        f"  twin  build  3 experts, rank 25 %: {storage['twin']:,} bytes vs {storage['experts']:,} "
        f"for 3 dense experts; router: held-out accuracy {fit.best_val_accuracy:.3f} "
        f"(epoch {fit.best_epoch + 1})"
    )
    x = torch.cat(list(test.values()))
    truth = torch.arange(n_tasks, device=device).repeat_interleave(64)
    with torch.no_grad():
        w = model.route(x)
        routed = float((w.argmax(-1) == truth).float().mean())
        y = model(x, weights=w)
        rebuilt = model(x, weights=w, materialize=True)
        expert_out = torch.cat([experts[t](test[t]) for t in range(n_tasks)])
        err = float((y - expert_out).norm() / expert_out.norm())
    same = torch.allclose(y, rebuilt, rtol=1e-4, atol=1e-5)
    print(
        f"  twin  route  test inputs to their task: {routed:.3f}; activation path vs per-sample "
        f"rebuild: {'equal' if same else 'DIFFER'}; vs the experts: relative error {err:.2e}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        loaded = twin.load(twin.save(model, Path(tmp)), base, features=features)
        with torch.no_grad():
            same_loaded = torch.equal(loaded(x), model(x))
    print(f"  twin  save -> load: outputs {'equal bit for bit  ok' if same_loaded else 'DIFFER'}")
    ok = routed > 0.9 and same and err < 0.1 and same_loaded
    print(f"  twin  {'ok' if ok else 'FAILED'}")
    return ok


class _DropMessages(logging.Filter):
    """Drops the log records whose message contains one of ``parts``."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


@contextlib.contextmanager
def _without_torchvision_notice():
    """Silence transformers' "`CLIPImageProcessor` requires torchvision (not installed);
    falling back to `CLIPImageProcessorPil`" notice while the tiny pipeline loads: the PIL
    image processor is what the demo needs, and the notice asks the user for nothing."""
    logger = logging.getLogger("transformers.utils.import_utils")
    drop = _DropMessages("requires torchvision")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _demo_exde(device: torch.device) -> bool:
    """ExDe on a tiny random Stable Video Diffusion pipeline (needs diffusers): extrapolation and
    decoupling of a stand-in fine-tune, then a 6-step generation with the switch schedule blended
    per step, checked against swapping the two decoupled weight sets, with the schedule printed."""
    import copy
    import importlib.util
    import time

    if (
        importlib.util.find_spec("diffusers") is None
        or importlib.util.find_spec("transformers") is None
    ):
        print("  exde  skipped: pip install diffusers transformers to run it")
        return True
    from meldkit import exde
    from meldkit.exde import _tiny

    t0 = time.perf_counter()
    with _without_torchvision_notice():
        pipe = _tiny.pipeline()
    pipe.to(device)
    base = copy.deepcopy(pipe.unet)
    ft = _tiny.finetuned(base)
    dyn, con = exde.decouple(base, ft, seed=0)
    steps = 6
    seen = []

    def schedule(step, num_steps, timestep, sigma):
        coeffs = exde.switch(0.5)(step, num_steps, timestep, sigma)
        if not seen or seen[-1][0] != step:
            seen.append((step, timestep, sigma, coeffs))
        return coeffs

    def swap(p, i, t, kwargs):
        if i + 1 == steps // 2:
            p.unet.load_state_dict(con.state_dict())
        return kwargs

    pipe.unet.load_state_dict(dyn.state_dict())
    want = _tiny.call(pipe, steps=steps, callback_on_step_end=swap)
    pipe.unet.load_state_dict(base.state_dict())
    with exde.attach(pipe, base, ft, schedule=schedule, seed=0) as blender:
        got = _tiny.call(pipe, steps=steps)
    plain = _tiny.call(pipe, steps=steps)
    restored = all(
        torch.equal(p, q) for p, q in zip(pipe.unet.parameters(), base.parameters(), strict=True)
    )
    for step, t, sigma, c in seen:
        phase = "θ_dyn (degree)" if c == exde.DYN else "θ_con (control)" if c == exde.CON else c
        print(f"  exde  step {step}: timestep {t:+.3f}, sigma {sigma:8.3f} -> {phase}")
    err = float((got - want).abs().max())
    moved = float((got - plain).abs().max())
    motion = exde.motion_degree(got[0]), exde.motion_degree(plain[0])
    ok = err <= 1e-5 and restored and moved > 0
    print(
        f"  exde  per-step blend vs swapping weight sets: max |diff| {err:.1e}; {blender.blends} "
        f"blends for {steps} steps; base restored: {restored}; frames vs unblended differ by "
        f"{moved:.3f}; motion ({motion[0].method}) {motion[0].value:.4f} vs {motion[1].value:.4f}"
        f"  {'ok' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)"
    )
    return ok


def run_demo(device: str | None = None) -> int:
    """Run the demo on ``device`` (default: CUDA when usable, else CPU); return an exit code.

    Raises
    ------
    meldkit.merging.MergeError
        (a ValueError) ``device`` is not cpu, cuda or cuda:N, or torch sees no such CUDA device.
    """
    from meldkit import bench
    from meldkit.info import info
    from meldkit.merging.engine import _merge_device

    if device is None:
        device = "cuda" if _native.cuda_usable()[0] and torch.cuda.is_available() else "cpu"
    dev = _merge_device(device)  # checked as merge checks it, before anything runs
    info()
    print(f"\ncorrectness against the float64 reference on {dev}:")
    ok = _demo_weighted_sum(dev)
    print(f"\nmerging checkpoints (TIES, streaming engine) on {dev}:")
    ok &= _demo_merge(dev)
    print(f"\nGOAT fine-tuning (routed LoRA experts, adapter files) on {dev}:")
    ok &= _demo_goat(dev)
    print(f"\nTwin-Merging (shared expert, SVD factors, routed inference) on {dev}:")
    ok &= _demo_twin(dev)
    print(f"\nExDe (decoupled image-to-video weights blended per denoising step) on {dev}:")
    ok &= _demo_exde(dev)
    from meldkit.dlf.demo import run_demo as dlf_demo

    print("\nDLF (dynamic logit fusion: a large model steered by small experts per token) on cpu:")
    ok &= dlf_demo(print_fn=print)
    print(f"\nbenchmark (quick) on {dev}:")
    rows = bench.run_op("weighted_sum", device=dev.type, quick=True)
    rows += bench.run_op("merge", device=dev.type, quick=True)
    print(bench.format_table(rows))
    return 0 if ok else 1
