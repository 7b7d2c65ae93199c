"""ExDe stages 2-3: extrapolation, decoupling (seeded DARE), schedules, the timestep → step
mapping, and the per-step hook on a tiny Stable Video Diffusion pipeline against a reference that
swaps whole weight sets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from meldkit import exde
from meldkit.merging.engine import tensor_key
from meldkit.ops import blend_ref


def mlp(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 30), nn.LayerNorm(30), nn.Linear(30, 5))
    m.register_buffer("scale", torch.tensor(3.0))
    return m


def pair():
    base = mlp(0)
    ft = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        ft.scale.fill_(7.0)  # buffers are never blended
    return base, ft


def params(m):
    return dict(m.named_parameters())


def test_extrapolate_is_base_minus_alpha_tau():
    base, ft = pair()
    out = exde.extrapolate(base, ft, alpha=0.25)
    b, f, o = params(base), params(ft), params(out)
    for name in b:
        tau = (f[name] - b[name]).detach()
        want = (b[name].detach().float() + tau.float() * torch.tensor(-0.25)).to(b[name].dtype)
        assert torch.equal(o[name], want)
    assert float(out.scale) == 3.0 and out is not base
    # the other direction, state dicts, name filters
    sd = exde.extrapolate(base.state_dict(), ft.state_dict(), alpha=-1.0, include=r"^2\.")
    torch.testing.assert_close(sd["2.weight"], ft.state_dict()["2.weight"])
    assert torch.equal(sd["0.weight"], base.state_dict()["0.weight"])
    assert torch.equal(sd["scale"], base.state_dict()["scale"])


def test_decouple_is_seeded_dare():
    base, ft = pair()
    dyn, con = exde.decouple(base, ft, seed=3)
    b, f = params(base), params(ft)
    keep = 1 - 0.7
    for name in b:
        tau = (f[name] - b[name]).detach()
        key = tensor_key(name)
        want_dyn = blend_ref(
            b[name].detach(),
            tau,
            (0.0, -0.25 * 0.75 / keep, 0.0),
            keep=(keep, keep),
            seed=3,
            tensor_key=key,
        )
        want_con = blend_ref(
            b[name].detach(),
            tau,
            (1.0, 0.0, 0.25 / keep),
            keep=(keep, keep),
            seed=3,
            tensor_key=key,
        )
        assert torch.equal(params(dyn)[name], want_dyn)
        assert torch.equal(params(con)[name], want_con)
    # 1-D tensors are dense: θ_dyn = θ_base − α·β_dyn·τ exactly (up to rounding)
    torch.testing.assert_close(
        params(dyn)["1.weight"], b["1.weight"] - 0.1875 * (f["1.weight"] - b["1.weight"])
    )
    # the two masks are independent, and the seed reproduces them
    w = "0.weight"
    kept_dyn = params(dyn)[w] != b[w]
    kept_con = params(con)[w] != f[w]
    assert 0.2 < float(kept_dyn.float().mean()) < 0.4 and not torch.equal(kept_dyn, kept_con)
    again, _ = exde.decouple(base, ft, seed=3)
    other, _ = exde.decouple(base, ft, seed=4)
    assert torch.equal(params(again)[w], params(dyn)[w])
    assert not torch.equal(params(other)[w], params(dyn)[w])


def test_decouple_is_unbiased():
    base = {"w": torch.zeros(500, 400)}
    ft = {"w": torch.ones(500, 400)}
    dyn, con = exde.decouple(base, ft, seed=1)
    assert abs(float(dyn["w"].mean()) + 0.1875) < 0.005  # E[θ_dyn] = θ_base − α·β_dyn·τ
    assert abs(float(con["w"].mean()) - 1.25) < 0.005  # E[θ_con] = θ_base + 1.25·τ


def test_errors():
    base, ft = pair()
    other = nn.Sequential(nn.Linear(12, 31), nn.LayerNorm(31), nn.Linear(31, 5))
    with pytest.raises(exde.ExDeError, match="shape"):
        exde.extrapolate(base, other)
    with pytest.raises(exde.ExDeError, match="no parameter is selected"):
        exde.extrapolate(base, ft, include="nothing")
    with pytest.raises(exde.ExDeError, match="'drop'"):
        exde.decouple(base, ft, drop=1.0)
    with pytest.raises(exde.ExDeError, match="'alpha'"):
        exde.extrapolate(base, ft, alpha=float("nan"))
    with pytest.raises(exde.ExDeError, match="no 'unet'"):
        with exde.attach(object(), base, ft):
            pass


def test_schedules_and_step_mapping():
    sw = exde.switch(0.5)
    phases = [sw(i, 50, 0.0, None) for i in range(50)]
    assert phases[:25] == [exde.DYN] * 25 and phases[25:] == [exde.CON] * 25
    for sched in (exde.linear(), exde.cosine()):
        assert sched(0, 10, 0.0, None) == exde.DYN and sched(9, 10, 0.0, None) == exde.CON
        mid = sched(4, 9, 0.0, None)
        assert mid == pytest.approx((0.5, 0.5, 0.5))
    # DDIM, 50 trailing steps: 999, 979, ..., 19; the release's t > 500 rule = switch(0.5)
    ddim = torch.arange(999, 0, -20)
    assert len(ddim) == 50
    for t in ddim:
        step = exde.step_of(ddim, t)
        assert (sw(step, 50, float(t), None) == exde.DYN) == (int(t) > 500)
    # Stable Video Diffusion's continuous timesteps (0.25·ln σ)
    svd = torch.tensor([1.6378, 1.3165, 0.9227, 0.4137, -0.3069, -1.5537])
    assert [exde.step_of(svd, t) for t in svd] == list(range(6))
    assert exde.step_of(svd, torch.full((2,), 0.4137)) == 3  # a CFG batch


# ---- the hook on a tiny Stable Video Diffusion pipeline ----------------------------------------


@pytest.fixture(scope="module")
def svd():
    pytest.importorskip("diffusers")
    from meldkit.exde import _tiny as tiny_svd

    pipe = tiny_svd.pipeline()
    base = copy.deepcopy(pipe.unet)
    ft = tiny_svd.finetuned(base)
    return pipe, base, ft, tiny_svd


def test_attach_equals_swapping_weight_sets(svd):
    pipe, base, ft, tiny = svd
    dyn, con = exde.decouple(base, ft, seed=5)
    steps = 6

    def swap(p, i, t, kwargs):  # after step i: the weights of step i + 1
        if i + 1 == steps // 2:
            p.unet.load_state_dict(con.state_dict())
        return kwargs

    pipe.unet.load_state_dict(dyn.state_dict())
    want = tiny.call(pipe, steps=steps, callback_on_step_end=swap)
    pipe.unet.load_state_dict(base.state_dict())
    with exde.attach(pipe, base, ft, schedule=exde.switch(0.5), seed=5) as blender:
        got = tiny.call(pipe, steps=steps)
        assert blender.blends == 2  # once per phase, whatever the number of calls
    assert (got - want).abs().max() <= 1e-5
    # the base weights come back exactly, and the blend changed the frames
    for name, p in pipe.unet.named_parameters():
        assert torch.equal(p, params(base)[name])
    plain = tiny.call(pipe, steps=steps)
    assert (plain - got).abs().max() > 1e-4


def test_attach_restores_on_error_and_blends_each_step(svd):
    pipe, base, ft, tiny = svd
    with pytest.raises(RuntimeError, match="stop here"):
        with exde.attach(pipe, None, ft, schedule=exde.linear(), include="temporal") as blender:

            def stop(p, i, t, kwargs):
                if i == 2:
                    raise RuntimeError("stop here")
                return kwargs

            tiny.call(pipe, steps=6, callback_on_step_end=stop)
    assert blender.blends == 3  # steps 0, 1, 2: new coefficients every step
    assert all("temporal" in n for n in blender.names)
    for name, p in pipe.unet.named_parameters():
        assert torch.equal(p, params(base)[name])


def test_attach_with_integer_timesteps():
    """A DDIM pipeline (integer DDPM timesteps, no step callback): the hook finds the steps from
    the timesteps; the reference swaps the weight sets after the scheduler's step."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    pipe = diffusers.DDIMPipeline(
        unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000)
    )
    pipe.set_progress_bar_config(disable=True)
    base = copy.deepcopy(unet)
    ft = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    dyn, con = exde.decouple(base, ft, seed=2)
    steps = 8

    def run():
        return pipe(
            num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images

    real_step = pipe.scheduler.step
    calls = []

    def step_and_swap(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == steps // 2:  # after the high-noise half: θ_con for the rest
            pipe.unet.load_state_dict(con.state_dict())
        return out

    pipe.unet.load_state_dict(dyn.state_dict())
    pipe.scheduler.step = step_and_swap
    want = run()
    pipe.scheduler.step = real_step
    pipe.unet.load_state_dict(base.state_dict())
    with exde.attach(pipe, base, ft, seed=2) as blender:
        got = run()
        assert blender.blends == 2
    assert abs(got - want).max() <= 1e-5
    assert all(
        torch.equal(p, q) for p, q in zip(pipe.unet.parameters(), base.parameters(), strict=True)
    )
