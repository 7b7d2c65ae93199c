"""ExDe stages 2-3: extrapolation, decoupling (seeded DARE), schedules, the timestep → step
mapping, and the per-step hook on a tiny Stable Video Diffusion pipeline against a reference that
swaps whole weight sets."""

from __future__ import annotations

import contextlib
import copy
import re
import warnings

import numpy as np
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
    again, _ = exde.decouple(base, ft, seed=np.int64(3))  # NumPy integers, as the blend op
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
    for seed in (-1, 2**64, 1.0, True):
        with pytest.raises(exde.ExDeError, match=r"'seed' must be an int in \[0, 2\*\*64\)"):
            exde.decouple(base, ft, seed=seed)
    with pytest.raises(exde.ExDeError, match="'alpha'"):
        exde.extrapolate(base, ft, alpha=float("nan"))
    with pytest.raises(exde.ExDeError, match="'alpha' is 1e\\+39, beyond float32's range"):
        exde.extrapolate(base, ft, alpha=1e39)
    with pytest.raises(exde.ExDeError, match="'include': '\\[' is not a regular expression"):
        exde.extrapolate(base, ft, include="[")
    with pytest.raises(exde.ExDeError, match="'exclude' must be a regex or a list"):
        exde.extrapolate(base, ft, exclude=3)
    ints = {k: v.to(torch.int32) if v.dim() == 2 else v for k, v in ft.state_dict().items()}
    with pytest.raises(exde.ExDeError, match=r"dtype torch\.int32 in the fine-tuned model"):
        exde.extrapolate(base, ints)
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


# ---- denoisers and pipelines beyond Stable Video Diffusion ---------------------------------------


class Denoiser(nn.Module):
    """Records which weights each call sees: ``w`` is θ_base + c·τ with τ = 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 4))
        self.seen = []

    def forward(self, hidden_states, timestep):
        self.seen.append(float(self.w.detach()[0, 0]))
        return hidden_states


def one_pair():
    return {"w": torch.zeros(4, 4)}, {"w": torch.ones(4, 4)}


def test_attach_finds_the_step_from_per_token_timesteps():
    """LTX image-to-video sends ``t·(1 − conditioning_mask)`` per token, Wan with
    ``expand_timesteps`` likewise: 0 on the first frame's tokens, the step's t elsewhere."""
    from types import SimpleNamespace

    module = Denoiser()
    timesteps = torch.tensor([999.0, 799.0, 599.0, 399.0, 199.0, 0.0])
    pipe = SimpleNamespace(unet=module, scheduler=SimpleNamespace(timesteps=timesteps))
    mask = torch.zeros(2, 10)
    mask[:, :3] = 1  # the conditioning frame's tokens come first
    base, ft = one_pair()
    with exde.attach(pipe, base, ft, schedule=exde.linear(), drop=0.0) as blender:
        for t in timesteps:
            module(torch.zeros(2, 10), timestep=t.expand(2).unsqueeze(-1) * (1 - mask))
        assert blender.blends == len(timesteps)
    # linear: θ_dyn = θ_base − 0.25·0.75·τ at step 0 to θ_con = θ_ft + 0.25·τ at the last step
    want = [(1 - w) * -0.1875 + w * 1.25 for w in torch.linspace(0, 1, 6).tolist()]
    assert module.seen == pytest.approx(want, abs=1e-6)


def test_attach_prefers_the_pipelines_current_timestep():
    """Flux-style pipelines hand the denoiser t / 1000 and keep t in ``_current_timestep``."""
    from types import SimpleNamespace

    module = Denoiser()
    timesteps = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    pipe = SimpleNamespace(
        transformer=module, scheduler=SimpleNamespace(timesteps=timesteps), _current_timestep=None
    )
    base, ft = one_pair()
    with exde.attach(pipe, base, ft, drop=0.0):
        for t in timesteps:
            pipe._current_timestep = t
            module(torch.zeros(1), timestep=(t / 1000).expand(2))
    assert module.seen == pytest.approx([-0.1875, -0.1875, 1.25, 1.25])


def test_attach_on_two_denoisers_asks_which():
    from types import SimpleNamespace

    high, low = Denoiser(), Denoiser()
    timesteps = torch.tensor([900.0, 600.0, 300.0, 100.0])
    pipe = SimpleNamespace(
        transformer=high, transformer_2=low, scheduler=SimpleNamespace(timesteps=timesteps)
    )
    base, ft = one_pair()
    with pytest.raises(exde.ExDeError, match=r"two denoisers.*denoiser='transformer_2'"):
        with exde.attach(pipe, base, ft):
            pass
    with pytest.raises(exde.ExDeError, match="no module 'transformer_3'"):
        with exde.attach(pipe, base, ft, denoiser="transformer_3"):
            pass
    with (
        exde.attach(pipe, base, ft, denoiser="transformer", drop=0.0),
        exde.attach(pipe, base, ft, denoiser="transformer_2", drop=0.0, alpha=1.0),
    ):
        for t in timesteps:  # Wan 2.2: the high-noise expert first, then the low-noise one
            (high if t >= 500 else low)(torch.zeros(1), timestep=t)
    assert high.seen == pytest.approx([-0.1875, -0.1875]) and low.seen == [1.25, 1.25]
    assert float(high.w.detach().abs().max()) == 0.0 and float(low.w.detach().abs().max()) == 0.0


def bn_pair():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.1)
        ft[1].running_mean.fill_(1.0)
        ft[1].running_var.fill_(2.0)
    return base, ft


def test_state_dicts_blend_parameters_never_buffers():
    base, ft = bn_pair()
    sd_b, sd_f = base.state_dict(), ft.state_dict()
    for out in (exde.extrapolate(sd_b, sd_f), *exde.decouple(sd_b, sd_f)):
        for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            assert torch.equal(out[name], sd_b[name]), name
        assert not torch.equal(out["0.weight"], sd_b["0.weight"])
    # a module beside a state dict says which entries are buffers
    out = exde.extrapolate(base, sd_f)
    assert torch.equal(out[1].running_var, base[1].running_var)
    # attach with state dicts: the live denoiser's buffers are skipped, not "missing parameters"
    from types import SimpleNamespace

    live = copy.deepcopy(base)
    pipe = SimpleNamespace(unet=live, scheduler=SimpleNamespace(timesteps=torch.arange(10, 0, -1)))
    with exde.attach(pipe, sd_b, sd_f) as blender:
        assert sorted(blender.names) == sorted(n for n, _ in base.named_parameters())
    assert torch.equal(live[1].running_mean, base[1].running_mean)


def test_mixed_dtype_denoiser():
    """diffusers keeps some modules in float32 in a float16 model (``_keep_in_fp32_modules``)."""
    base, ft = pair()
    for m in (base, ft):
        m[0].half()
        m[2].half()
    out = exde.extrapolate(base, ft)
    assert out[0].weight.dtype == torch.float16 and out[1].weight.dtype == torch.float32
    want = base[1].weight - 0.25 * (ft[1].weight - base[1].weight)
    torch.testing.assert_close(out[1].weight, want)
    # float32 arithmetic, one rounding to float16
    want16 = base[0].weight.float() - 0.25 * (ft[0].weight.float() - base[0].weight.float())
    assert torch.equal(out[0].weight, want16.half())
    dyn, con = exde.decouple(base.state_dict(), ft.state_dict(), seed=1)
    assert dyn["0.weight"].dtype == torch.float16 and con["1.bias"].dtype == torch.float32
    from types import SimpleNamespace

    live = copy.deepcopy(base)
    pipe = SimpleNamespace(unet=live, scheduler=SimpleNamespace(timesteps=torch.arange(4, 0, -1)))
    dyn_module = exde.decouple(base, ft, seed=1)[0]
    with exde.attach(pipe, None, ft, seed=1) as blender:
        blender.apply(exde.DYN)
        keep = 1 - 0.7
        for name, p, b, tau in zip(
            blender.names, blender.live, blender.base, blender.tau, strict=True
        ):
            if p.dtype == torch.float32:  # decouple's model exactly
                assert torch.equal(p, params(dyn_module)[name]), name
                continue
            # float16: τ rounded once from float32, then the blend op's float32 sum, rounded
            f, b0 = params(ft)[name].detach(), params(base)[name].detach()
            assert torch.equal(tau, (f.float() - b0.float()).half()), name
            want = blend_ref(
                b,
                tau,
                (0.0, -0.25 * 0.75 / keep, 0.0),
                keep=(keep, keep),
                seed=1,
                tensor_key=tensor_key(name),
            )
            assert torch.equal(p, want), name
    for name, p in live.named_parameters():
        assert torch.equal(p, params(base)[name])


def test_blend_errors_name_the_parameter():
    base = {"a.weight": torch.zeros(3, 3), "b.weight": torch.zeros(3, 3)}
    outs = {"a.weight": torch.zeros(3, 3), "b.weight": torch.zeros(2, 2)}
    with pytest.raises((ValueError, TypeError), match=r"'b\.weight'"):
        exde.blending._Plans(
            [outs["a.weight"], outs["b.weight"]],
            list(base.values()),
            [torch.ones(3, 3), torch.ones(3, 3)],
            ["a.weight", "b.weight"],
        )


def test_attach_on_a_compiled_denoiser():
    from types import SimpleNamespace

    module = Denoiser()
    compiled = torch.compile(module, backend="eager")
    timesteps = torch.tensor([3.0, 2.0, 1.0, 0.0])
    pipe = SimpleNamespace(unet=compiled, scheduler=SimpleNamespace(timesteps=timesteps))
    base, ft = one_pair()
    sd_b = {"_orig_mod." + k: v for k, v in base.items()}
    with exde.attach(pipe, sd_b, ft, drop=0.0) as blender:
        assert blender.names == ["w"]
        for t in timesteps:
            compiled(torch.zeros(1), timestep=t)
    assert module.seen == pytest.approx([-0.1875, -0.1875, 1.25, 1.25])
    assert float(module.w.detach().abs().max()) == 0.0
    out = exde.extrapolate(compiled, ft)
    assert torch.equal(out._orig_mod.w, torch.full((4, 4), -0.25))


def tiny_ltx_image_to_video():
    """A tiny random LTX-Video image-to-video pipeline (no text encoder: prompt embeddings are
    given). Its transformer gets one timestep per token, 0 on the conditioning frame's."""
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "LTXImageToVideoPipeline"):
        pytest.skip(f"diffusers {diffusers.__version__} has no LTX-Video (added in 0.32)")
    torch.manual_seed(0)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    ).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    pipe = diffusers.LTXImageToVideoPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_attach_on_ltx_image_to_video():
    pipe = tiny_ltx_image_to_video()
    from meldkit.exde import _tiny

    base = copy.deepcopy(pipe.transformer)
    ft = _tiny.finetuned(base)
    dyn, con = exde.decouple(base, ft, seed=5)
    steps = 4
    gen = torch.Generator().manual_seed(0)
    image, embeds = torch.rand(1, 3, 32, 32, generator=gen), torch.randn(1, 8, 32, generator=gen)

    def call(**kwargs):
        return pipe(
            image=image,
            prompt_embeds=embeds,
            prompt_attention_mask=torch.ones(1, 8),
            height=32,
            width=32,
            num_frames=9,
            num_inference_steps=steps,
            guidance_scale=1.0,
            max_sequence_length=8,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            **kwargs,
        ).frames

    def swap(p, i, t, kwargs):  # after step i: the weights of step i + 1
        if i + 1 == steps // 2:
            p.transformer.load_state_dict(con.state_dict())
        return kwargs

    pipe.transformer.load_state_dict(dyn.state_dict())
    want = call(callback_on_step_end=swap)
    pipe.transformer.load_state_dict(base.state_dict())
    with exde.attach(pipe, base, ft, seed=5) as blender:
        got = call()
        assert blender.blends == 2
    assert (got - want).abs().max() <= 1e-5
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p, params(base)[name])


# ---- nesting, external writes, tied parameters, precision ----------------------------------------


class TwoWeights(nn.Module):
    """Records ``w[0, 0]`` and ``v[0]`` at each call: θ_base + c·τ with τ = 1 (``v`` is 1-D)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 4))
        self.v = nn.Parameter(torch.zeros(4))
        self.seen = []

    def forward(self, hidden_states, timestep):
        self.seen.append((float(self.w.detach()[0, 0]), float(self.v.detach()[0])))
        return hidden_states


def two_weights_pipe():
    from types import SimpleNamespace

    module = TwoWeights()
    timesteps = torch.tensor([900.0, 600.0, 300.0, 100.0])
    pipe = SimpleNamespace(unet=module, scheduler=SimpleNamespace(timesteps=timesteps))
    base = {"w": torch.zeros(4, 4), "v": torch.zeros(4)}
    ft = {"w": torch.ones(4, 4), "v": torch.ones(4)}
    return pipe, module, base, ft


def test_nested_attach_refuses_overlapping_parameters():
    pipe, module, base, ft = two_weights_pipe()
    con = lambda *args: exde.CON  # noqa: E731
    with exde.attach(pipe, base, ft, schedule=con, drop=0.0) as outer:
        module(None, timestep=900.0)
        for kwargs in ({}, {"include": "w"}, {"exclude": "v"}):
            with pytest.raises(exde.ExDeError, match=r"'w' is already blended.*'include'"):
                with exde.attach(pipe, None, ft, schedule=lambda *a: (0.0, 0.0, 0.0), **kwargs):
                    pass
        module(None, timestep=100.0)  # the refused blocks left the outer one's weights alone
        assert outer.blends == 1
    assert module.seen == [(1.25, 1.25), (1.25, 1.25)]
    assert float(module.w.detach().abs().max()) == 0.0
    # the parameters are free again after the block, also after an exception in it
    with pytest.raises(RuntimeError, match="inside"):
        with exde.attach(pipe, base, ft, drop=0.0):
            raise RuntimeError("inside")
    with exde.attach(pipe, base, ft, drop=0.0) as again:
        again.apply(exde.DYN)
    # disjoint nesting: each block blends its own parameters
    module.seen.clear()
    with (
        exde.attach(pipe, base, ft, schedule=con, include="w", drop=0.0),
        exde.attach(pipe, base, ft, exclude="w", drop=0.0) as inner,
    ):
        module(None, timestep=900.0)
        assert inner.names == ["v"]
    assert module.seen == [(1.25, -0.1875)]
    assert float(module.w.detach().abs().max()) == 0.0 == float(module.v.detach().abs().max())


def test_attach_reblends_after_an_external_write():
    pipe, module, base, ft = two_weights_pipe()
    with exde.attach(pipe, base, ft, schedule=lambda *a: exde.CON, drop=0.0) as blender:
        module(None, timestep=900.0)
        module(None, timestep=600.0)  # same coefficients, untouched weights: no re-blend
        assert blender.blends == 1
        module.load_state_dict(base)
        module(None, timestep=300.0)
        with torch.no_grad():
            module.v.mul_(3.0)
        module(None, timestep=100.0)
        assert blender.blends == 3
        module.v.data.mul_(3.0)  # through .data: no version counter moves, so apply(force=True)
        blender.apply(exde.CON)
        assert blender.blends == 3
        blender.apply(exde.CON, force=True)
        assert blender.blends == 4
        module(None, timestep=50.0)
    assert module.seen == [(1.25, 1.25)] * 5


class Tied(nn.Module):
    """An embedding tied to the output head, as in language-model-like denoisers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, timestep=None):
        return self.head(self.mid(self.emb(ids)))


def fine_tuned(base: nn.Module, scale: float) -> nn.Module:
    """A copy of ``base`` with seeded noise of ``scale`` added to every parameter."""
    ft = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return ft


def tied_pair():
    torch.manual_seed(0)
    base = Tied()
    return base, fine_tuned(base, 0.1)


def test_tied_parameters_stay_tied():
    from types import SimpleNamespace

    base, ft = tied_pair()
    sd_b, sd_f = base.state_dict(), ft.state_dict()
    assert "head.weight" in sd_b and "emb.weight" in sd_b
    dyn, con = exde.decouple(base, ft, seed=2)
    for out in exde.decouple(sd_b, sd_f, seed=2):  # one tensor, one mask (emb.weight's)
        assert out["head.weight"] is out["emb.weight"]
    assert torch.equal(out["emb.weight"], con.emb.weight)
    out = exde.extrapolate(sd_b, sd_f)
    assert out["head.weight"] is out["emb.weight"]
    assert exde.paired(sd_b, sd_f) == ["emb.weight", "mid.weight", "mid.bias"]
    assert exde.paired(sd_b, sd_f, include="head") == ["emb.weight"]  # selected by any name
    # attach with state dicts: the aliases map to the one live tensor, blended once
    live = copy.deepcopy(base)
    pipe = SimpleNamespace(unet=live, scheduler=SimpleNamespace(timesteps=torch.arange(4, 0, -1)))
    deduplicated = {k: v for k, v in sd_f.items() if k != "emb.weight"}  # as safetensors saves
    for fine in (sd_f, deduplicated):
        with exde.attach(pipe, sd_b, fine, seed=2) as blender:
            assert blender.names == ["emb.weight", "mid.weight", "mid.bias"]
            blender.apply(exde.DYN)
            assert live.head.weight is live.emb.weight
            for name, p in live.named_parameters():
                assert torch.equal(p, params(dyn)[name]), name
        assert torch.equal(live.emb.weight, base.emb.weight)
    # a fine-tune whose two names disagree cannot keep the tie
    untied = {**sd_f, "head.weight": sd_f["head.weight"] + 1.0}
    with pytest.raises(exde.ExDeError, match=r"'emb\.weight' and 'head\.weight'.*differ"):
        exde.extrapolate(sd_b, untied)
    separate = {**sd_b, "head.weight": sd_b["head.weight"].clone()}  # equal, not shared
    with exde.attach(pipe, separate, sd_f) as blender:
        assert blender.names == ["emb.weight", "mid.weight", "mid.bias"]
    with pytest.raises(exde.ExDeError, match=r"'emb\.weight' and 'head\.weight'.*differ"):
        with exde.attach(pipe, {**separate, "head.weight": separate["head.weight"] + 1}, sd_f):
            pass


def bf16_pair():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    return base, fine_tuned(base, 0.01)


def test_extrapolate_and_decouple_round_once():
    """τ and θ in float32, one rounding to bfloat16 (DESIGN: accumulate in fp32); a float32
    fine-tune beside a bfloat16 base is not rounded before τ is taken."""
    base32, ft32 = bf16_pair()
    base = copy.deepcopy(base32).bfloat16()
    keep = 1 - 0.7
    for ft in (copy.deepcopy(ft32).bfloat16(), ft32):
        out = exde.extrapolate(base, ft)
        dyn, con = exde.decouple(base, ft, seed=4)
        for name, b in params(base).items():
            b, f = b.detach().float(), params(ft)[name].detach().float()
            assert params(out)[name].dtype == torch.bfloat16
            assert torch.equal(params(out)[name], (b - 0.25 * (f - b)).bfloat16()), name
            for model, coeffs in (
                (dyn, (0.0, -0.25 * 0.75 / keep, 0.0)),
                (con, (1.0, 0.0, 0.25 / keep)),
            ):
                want = blend_ref(
                    b, f - b, coeffs, keep=(keep, keep), seed=4, tensor_key=tensor_key(name)
                )
                assert torch.equal(params(model)[name], want.bfloat16()), name


def test_extrapolate_in_chunks(monkeypatch):
    base, ft = bf16_pair()
    base, ft = base.bfloat16(), ft.bfloat16()
    whole = exde.decouple(base.state_dict(), ft.state_dict(), seed=3)
    monkeypatch.setattr(exde.blending, "_CHUNK", 100)  # one tensor per chunk
    chunked = exde.decouple(base.state_dict(), ft.state_dict(), seed=3)
    for a, b in zip(whole, chunked, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_attach_takes_tau_from_float32_weights():
    """A float32 base and fine-tune beside a bfloat16 pipeline: τ is taken in float32 and rounded
    once (the blend op reads it in the denoiser's dtype), not from the two rounded weights."""
    from types import SimpleNamespace

    base, ft = bf16_pair()
    live = copy.deepcopy(base).bfloat16()
    pipe = SimpleNamespace(unet=live, scheduler=SimpleNamespace(timesteps=torch.arange(4, 0, -1)))
    with exde.attach(pipe, base, ft, seed=1) as blender:
        blender.apply(exde.CON)
        keep = 1 - 0.7
        rounded_first = 0
        for name, p, b, tau in zip(
            blender.names, blender.live, blender.base, blender.tau, strict=True
        ):
            b32, f32 = params(base)[name].detach(), params(ft)[name].detach()
            assert torch.equal(b, b32.bfloat16()) and torch.equal(tau, (f32 - b32).bfloat16())
            rounded_first += int((tau != f32.bfloat16() - b32.bfloat16()).sum())
            want = blend_ref(
                b,
                tau,
                (1.0, 0.0, 0.25 / keep),
                keep=(keep, keep),
                seed=1,
                tensor_key=tensor_key(name),
            )
            assert torch.equal(p, want), name
        assert rounded_first > 0  # the two ways differ here
    for name, p in live.named_parameters():
        assert torch.equal(p, params(base)[name].bfloat16())


def test_switch_needs_a_fraction():
    for at in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(exde.ExDeError, match="'at'"):
            exde.switch(at)
    assert [exde.switch(0.0)(i, 4, 0.0, None) for i in range(4)] == [exde.CON] * 4
    assert [exde.switch(1.0)(i, 4, 0.0, None) for i in range(4)] == [exde.DYN] * 4


def test_schedules_get_sigma_from_alphas_cumprod():
    """Schedulers without sigmas (DDIM, DDPM) still give the schedules a sigma:
    √((1 − ᾱ_t)/ᾱ_t) at the step's timestep; sigma_switch then switches by noise level, the
    release's "t > 500" rule being sigma_switch(σ_500)."""
    from types import SimpleNamespace

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    timesteps = torch.arange(999, 0, -111)  # 999, 888, ..., 111: 9 steps
    scheduler = SimpleNamespace(timesteps=timesteps, alphas_cumprod=alphas.float())
    seen = []

    def record(step, num_steps, timestep, sigma):
        seen.append(sigma)
        return exde.DYN

    module = Denoiser()
    pipe = SimpleNamespace(unet=module, scheduler=scheduler)
    base, ft = one_pair()
    with exde.attach(pipe, base, ft, schedule=record, drop=0.0):
        for t in timesteps:
            module(torch.zeros(1), timestep=t)
    want = [((1 - alphas[t]) / alphas[t]).sqrt().item() for t in timesteps.tolist()]
    assert seen == pytest.approx(want, rel=1e-5)
    assert exde.sigma_of(scheduler, 0, 999.0) == pytest.approx(want[0], rel=1e-5)

    sigma_500 = ((1 - alphas[500]) / alphas[500]).sqrt().item()
    assert sigma_500 == pytest.approx(1.6183, abs=1e-3)
    module.seen.clear()
    with exde.attach(pipe, base, ft, schedule=exde.sigma_switch(sigma_500), drop=0.0):
        for t in timesteps:
            module(torch.zeros(1), timestep=t)
    dyn, con = -0.1875, 1.25  # θ_dyn and θ_con of the one-weight pair (drop 0)
    assert module.seen == pytest.approx([dyn if t > 500 else con for t in timesteps.tolist()])
    # A scheduler's own sigmas come first.
    with_sigmas = SimpleNamespace(timesteps=timesteps, sigmas=torch.linspace(9, 0, 10))
    assert exde.sigma_of(with_sigmas, 2, 777.0) == 7.0
    # Neither: the schedules get None, and sigma_switch says why it cannot run.
    assert exde.sigma_of(SimpleNamespace(timesteps=timesteps), 0, 999.0) is None
    with pytest.raises(exde.ExDeError, match="neither sigmas nor alphas_cumprod"):
        exde.sigma_switch(1.0)(0, 9, 999.0, None)
    with pytest.raises(exde.ExDeError, match="'at' must be ≥ 0"):
        exde.sigma_switch(-1.0)


# ---- what attach restores ------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits (so that -0.0 differs from 0.0 and a NaN equals itself)."""
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_attach_restores_what_the_pipeline_held():
    """A pipeline that holds the fine-tune, given as ``finetuned_unet``: the fine-tune comes
    back bit for bit (θ_base + τ rounds back to it except where a few elements are patched),
    also after an exception; a pipeline holding other weights gets those back (a copy)."""
    from types import SimpleNamespace

    base, ft = pair()
    with torch.no_grad():
        ft[0].weight[0, :3] = torch.tensor([1e-8, -0.0, 1e-30])  # θ_base + τ does not give these
        base[0].weight[0, :3] = torch.tensor([3.0, 0.0, -2.0])
    held = {n: p.detach().clone() for n, p in ft.named_parameters()}
    pipe = SimpleNamespace(unet=ft, scheduler=SimpleNamespace(timesteps=torch.arange(4, 0, -1)))
    for fail in (False, True):
        with contextlib.suppress(RuntimeError):
            with exde.attach(pipe, base, pipe.unet, seed=1) as blender:
                blender.apply(exde.DYN)
                assert not torch.equal(ft[0].weight, held["0.weight"])
                if fail:
                    raise RuntimeError("inside the block")
        for name, p in ft.named_parameters():
            assert torch.equal(bits(p), bits(held[name])), name
        # Only the three elements that θ_base + τ misses are kept, not a copy of the model.
        assert 0 < blender.snapshot_bytes <= 3 * (4 + 8)
    # the base held: nothing kept, the base back (as before)
    live = copy.deepcopy(base)
    pipe.unet = live
    with exde.attach(pipe, base, ft) as blender:
        blender.apply(exde.CON)
    assert blender.snapshot_bytes == 0
    assert all(torch.equal(bits(p), bits(params(base)[n])) for n, p in live.named_parameters())
    # other weights held: kept whole, and given back
    other = mlp(7)
    pipe.unet = other
    want = {n: p.detach().clone() for n, p in other.named_parameters()}
    with exde.attach(pipe, base, ft) as blender:
        blender.apply(exde.DYN)
    # the LayerNorm's fresh weights equal the base's: those need no copy
    copied = [n for n, t in want.items() if not torch.equal(t, params(base)[n])]
    assert len(copied) == 4
    assert blender.snapshot_bytes == sum(want[n].numel() * 4 for n in copied)
    assert all(torch.equal(p, want[n]) for n, p in other.named_parameters())


def test_attach_restores_a_bfloat16_finetune_held_by_the_pipeline():
    """τ rounded to bfloat16 does not always give the fine-tune back: those elements are
    patched, the rest come from θ_base + τ. With float32 weights given beside the bfloat16
    pipeline, most elements round differently (θ_base was rounded too): kept whole."""
    from types import SimpleNamespace

    base32, ft32 = bf16_pair()
    base = copy.deepcopy(base32).bfloat16()
    for given in ("pipeline", "float32"):
        ft = copy.deepcopy(ft32).bfloat16()
        held = {n: p.detach().clone() for n, p in ft.named_parameters()}
        pipe = SimpleNamespace(unet=ft, scheduler=SimpleNamespace(timesteps=torch.arange(4, 0, -1)))
        args = (base, pipe.unet) if given == "pipeline" else (base32, ft32)
        with exde.attach(pipe, *args, seed=3) as blender:
            blender.apply(exde.CON)
            assert not all(torch.equal(p, held[n]) for n, p in ft.named_parameters())
        assert all(torch.equal(bits(p), bits(held[n])) for n, p in ft.named_parameters())
        whole = sum(p.numel() * 2 for p in ft.parameters())
        if given == "pipeline":
            assert 0 < blender.snapshot_bytes < whole // 8
        else:
            assert blender.snapshot_bytes > whole // 2


def test_attach_refuses_a_zero_task_vector():
    from types import SimpleNamespace

    base, ft = pair()
    pipe = SimpleNamespace(unet=ft, scheduler=SimpleNamespace(timesteps=torch.arange(4, 0, -1)))
    held = {n: p.detach().clone() for n, p in ft.named_parameters()}
    with pytest.raises(exde.ExDeError, match=r"τ = 0.*pass the base model as 'base_unet'"):
        with exde.attach(pipe, None, pipe.unet):
            pass
    with pytest.raises(exde.ExDeError, match=r"'finetuned_unet' equals 'base_unet'.*τ = 0"):
        with exde.attach(pipe, base, base.state_dict()):
            pass
    assert all(torch.equal(p, held[n]) for n, p in ft.named_parameters())
    assert not exde.blending._ATTACHED  # nothing claimed


def test_attach_with_the_finetune_in_the_pipeline(svd):
    """The audit's case: the pipeline holds the fine-tune and is given as ``finetuned_unet``:
    the same frames as with the base in the pipeline, and the fine-tune kept afterwards."""
    pipe, base, ft, tiny = svd
    with exde.attach(pipe, base, ft, seed=5):
        want = tiny.call(pipe, steps=2)
    pipe.unet.load_state_dict(ft.state_dict())
    try:
        with exde.attach(pipe, base, pipe.unet, seed=5):
            got = tiny.call(pipe, steps=2)
        assert torch.equal(got, want)
        for name, p in pipe.unet.named_parameters():
            assert torch.equal(p, params(ft)[name]), name
    finally:
        pipe.unet.load_state_dict(base.state_dict())


# ---- denoising steps of multi-evaluation schedulers ----------------------------------------------


def run_scheduler(scheduler, schedule, steps=4, cfg_calls=2):
    """A denoising loop as diffusers pipelines write it, the denoiser called ``cfg_calls`` times
    per evaluation (sequential CFG) under ``attach``; the ``w`` each call saw."""
    from types import SimpleNamespace

    module = Denoiser()
    pipe = SimpleNamespace(unet=module, scheduler=scheduler)
    base, ft = one_pair()
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with exde.attach(pipe, base, ft, schedule=schedule, drop=0.0):
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            for _ in range(cfg_calls):
                out = module(model_input, timestep=t)
            x = scheduler.step(out, t, x).prev_sample
    return module.seen


@pytest.mark.parametrize(
    "name, kwargs, want",
    [
        ("EulerDiscreteScheduler", {}, [0, 1, 2, 3]),
        ("DDIMScheduler", {}, [0, 1, 2, 3]),
        ("DPMSolverMultistepScheduler", {}, [0, 1, 2, 3]),
        ("HeunDiscreteScheduler", {}, [0, 0, 1, 1, 2, 2, 3]),
        ("KDPM2DiscreteScheduler", {}, [0, 0, 1, 1, 2, 2, 3]),
        ("PNDMScheduler", {}, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]),
        ("PNDMScheduler", {"skip_prk_steps": True}, [0, 0, 1, 2, 3]),
    ],
)
def test_schedules_get_denoising_steps_not_model_evaluations(name, kwargs, want):
    """Heun and KDPM2 evaluate twice per step, PNDM four times in its Runge-Kutta warm-up (or
    twice in its first step): the schedule gets the denoising step and the number of steps,
    with the step's own timestep and sigma at each of its evaluations, so linear ends at θ_con
    and switch(0.5) splits the steps 2 and 2."""
    diffusers = pytest.importorskip("diffusers")
    make = lambda: getattr(diffusers, name)(num_train_timesteps=1000, **kwargs)  # noqa: E731
    seen = []

    def record(step, num_steps, timestep, sigma):
        seen.append((step, num_steps, timestep, sigma))
        return exde.linear()(step, num_steps, timestep, sigma)

    run_scheduler(make(), record)
    assert [s for s, *_ in seen[::2]] == want  # two calls per evaluation
    assert {n for _, n, *_ in seen} == {4}
    for step in range(4):  # every evaluation of a step: the step's timestep and sigma
        assert len({(t, sigma) for s, _, t, sigma in seen if s == step}) == 1
    dyn, con = -0.1875, 1.25
    w = run_scheduler(make(), exde.linear())
    assert w[0] == pytest.approx(dyn) and w[-1] == pytest.approx(con)
    halves = run_scheduler(make(), exde.switch(0.5))
    assert halves == [dyn if s < 2 else con for s in want for _ in range(2)]


# ---- storage that moves inside the block ---------------------------------------------------------


class Moving(TwoWeights):
    """Moves its parameters to new storage in ``forward`` (after attach's pre-hook), as
    accelerate's ``enable_model_cpu_offload`` does with ``module.to(device)``."""

    def forward(self, hidden_states, timestep):
        out = super().forward(hidden_states, timestep)
        for p in self.parameters():
            p.data = p.data.clone()
        return out


def test_attach_follows_parameters_whose_storage_moves():
    from types import SimpleNamespace

    _, _, base, ft = two_weights_pipe()
    module = Moving()
    timesteps = torch.tensor([900.0, 600.0, 300.0, 100.0])
    pipe = SimpleNamespace(unet=module, scheduler=SimpleNamespace(timesteps=timesteps))
    with exde.attach(pipe, base, ft, drop=0.0) as blender:
        for t in timesteps:
            module(None, timestep=t)
        # re-planned and blended again after each move, the values being what was moved
        assert blender.blends == 4
    dyn, con = -0.1875, 1.25
    assert module.seen == [(dyn, dyn), (dyn, dyn), (con, con), (con, con)]
    assert float(module.w.detach().abs().max()) == 0.0 == float(module.v.detach().abs().max())
    # a dtype change inside the block cannot be followed: it says so, and the weights come back
    with pytest.raises(exde.ExDeError, match=r"'w' became torch.float64.*before attach"):
        with exde.attach(pipe, base, ft, drop=0.0):
            module(None, timestep=900.0)
            module.double()
            module(None, timestep=100.0)
    assert module.w.dtype == torch.float64 and float(module.w.detach().abs().max()) == 0.0


def test_attach_on_a_pipeline_whose_denoiser_moves(svd):
    """The tiny Stable Video Diffusion pipeline with its UNet moved to new storage at every
    call: the same frames as without moving."""
    pipe, base, ft, tiny = svd
    with exde.attach(pipe, base, ft, seed=5):
        want = tiny.call(pipe, steps=4)
    unet = pipe.unet
    forward = unet.forward

    def forward_and_move(*args, **kwargs):
        out = forward(*args, **kwargs)
        for p in unet.parameters():
            p.data = p.data.clone()
        return out

    unet.forward = forward_and_move
    try:
        with exde.attach(pipe, base, ft, seed=5) as blender:
            got = tiny.call(pipe, steps=4)
            assert blender.blends == 4  # 2 without the moves (switch: one per phase)
    finally:
        del unet.forward
    assert torch.equal(got, want)
    for name, p in unet.named_parameters():
        assert torch.equal(p, params(base)[name]), name


def test_steps_count_in_the_whole_schedule_with_strength():
    """Image-to-image with strength 0.5 runs the last half of the schedule: the schedules get
    those steps' indices in the whole schedule (noise levels), so switch(0.5) is θ_con
    throughout (documented in Schedule)."""
    from types import SimpleNamespace

    diffusers = pytest.importorskip("diffusers")
    for name in ("DDIMScheduler", "EulerDiscreteScheduler"):
        scheduler = getattr(diffusers, name)(num_train_timesteps=1000)
        scheduler.set_timesteps(8)
        timesteps = scheduler.timesteps[4:]  # as the img2img pipelines slice them
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(4)
        module = Denoiser()
        pipe = SimpleNamespace(unet=module, scheduler=scheduler)
        seen = []

        def record(step, num_steps, timestep, sigma, seen=seen):
            seen.append((step, num_steps))
            return exde.switch(0.5)(step, num_steps, timestep, sigma)

        x = torch.zeros(1, 3, 4, 4)
        base, ft = one_pair()
        with exde.attach(pipe, base, ft, schedule=record, drop=0.0):
            for t in timesteps:
                out = module(scheduler.scale_model_input(x, t), timestep=t)
                x = scheduler.step(out, t, x).prev_sample
        assert seen == [(4, 8), (5, 8), (6, 8), (7, 8)], name
        assert module.seen == [1.25] * 4, name


def _fail_at_step_two(value):
    """``attach`` over 4 steps with a schedule giving θ_con at steps 0 and 1, then ``value``:
    the ExDeError's message, the denoiser, the pipeline, base and fine-tune."""
    from types import SimpleNamespace

    def schedule(step, num_steps, timestep, sigma):
        return exde.CON if step < 2 else value

    module = Denoiser()
    timesteps = torch.tensor([999.0, 666.0, 333.0, 0.0])
    pipe = SimpleNamespace(unet=module, scheduler=SimpleNamespace(timesteps=timesteps))
    base, ft = one_pair()
    with pytest.raises(exde.ExDeError) as caught:
        with exde.attach(pipe, base, ft, schedule=schedule, drop=0.0):
            for t in timesteps:
                module(torch.zeros(1), timestep=t)
    return str(caught.value), module, pipe, base, ft


def test_a_schedule_returning_no_coefficients_is_named_with_its_step():
    for value, shown in [(None, "None"), ("abc", "'abc'"), ("101", "'101'"), ((1.0, 0.0), "")]:
        message, module, pipe, base, ft = _fail_at_step_two(value)
        assert "the schedule " in message and ".schedule at step 2 of 4 returned " in message
        assert shown in message and "not 3 finite numbers" in message
        assert module.seen == [1.25, 1.25]  # θ_con at steps 0 and 1, then the error
        assert torch.equal(module.w, base["w"])
    # a Schedule is named by its repr; Blender.apply checks what it is given too

    class Unfinished(exde.Schedule):
        def __repr__(self):
            return "Unfinished()"

        def __call__(self, step, num_steps, timestep, sigma):
            return None

    with pytest.raises(exde.ExDeError, match=r"the schedule Unfinished\(\) at step 0 of 4"):
        with exde.attach(pipe, base, ft, schedule=Unfinished(), drop=0.0):
            module(torch.zeros(1), timestep=pipe.scheduler.timesteps[0])
    with exde.attach(pipe, base, ft, drop=0.0) as blender:
        with pytest.raises(exde.ExDeError, match="a schedule returned None"):
            blender.apply(None)


def test_a_schedule_returning_a_dict_or_numbers_past_float32_is_named_with_its_step():
    # {0: 0.0, 1: 1.0, 2: 0.0} iterated as its keys (0, 1, 2) and was blended; 1e39 and sums
    # overflowing float32 were the blend op's ValueError, naming neither schedule nor step.
    for value, want in [
        ({0: 0.0, 1: 1.0, 2: 0.0}, r"returned \{0: 0.0, 1: 1.0, 2: 0.0\}, not 3 finite numbers"),
        ({0.0, 1.0, 2.0}, r"returned \{0.0, 1.0, 2.0\}, not 3 finite numbers"),
        ((1e39, 0.0, 0.0), r"returned \(1e\+39, 0.0, 0.0\), beyond float32's range"),
        ((-1e39, 0.0, 0.0), r"returned \(-1e\+39, 0.0, 0.0\), beyond float32's range"),
        ((3e38, 0.0, 3e38), r"returned \(3e\+38, 0.0, 3e\+38\), whose blend .* overflows"),
    ]:
        message, module, pipe, base, ft = _fail_at_step_two(value)
        assert re.search(r"\.schedule at step 2 of 4 " + want, message), message
        assert module.seen == [1.25, 1.25]  # θ_con at steps 0 and 1, then the error
        assert torch.equal(module.w, base["w"])
    with exde.attach(pipe, base, ft, drop=0.0) as blender:
        with pytest.raises(exde.ExDeError, match=r"a schedule returned \{0: 1.0\}, not 3"):
            blender.apply({0: 1.0})
        with pytest.raises(exde.ExDeError, match=r"a schedule returned .* overflows float32"):
            blender.apply((3e38, 0.0, 3e38))
        blender.apply(exde.DYN)  # a triple in range still blends
        assert blender.current == exde.DYN


def test_finetune_parameters_the_base_lacks_are_named_in_a_warning():
    base, ft = pair()
    extra = {f"adapter.{i}.weight": torch.ones(3) for i in range(7)}
    with pytest.warns(UserWarning, match="7 parameter") as caught:
        out = exde.extrapolate(base, {**ft.state_dict(), **extra})
    assert len(caught) == 1
    message = str(caught[0].message)
    assert (
        "'adapter.0.weight', 'adapter.1.weight'" in message and "'adapter.5.weight'" not in message
    )
    assert torch.equal(params(out)["0.weight"], params(exde.extrapolate(base, ft))["0.weight"])
    # no warning for a matching fine-tune, nor for a tied name the (deduplicated) base lists once
    tied_base, tied_ft = tied_pair()
    deduplicated = {k: v for k, v in tied_base.state_dict().items() if k != "head.weight"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exde.extrapolate(base, ft)
        exde.extrapolate(deduplicated, tied_ft)


def test_a_key_prefix_is_named_with_the_missing_parameter():
    base, ft = pair()
    prefixed = {"unet." + k: v for k, v in ft.state_dict().items()}
    with pytest.raises(exde.ExDeError, match=r"no parameter '0\.weight'") as caught:
        exde.extrapolate(base, prefixed)
    assert "every key of the fine-tuned model starts with 'unet.'" in str(caught.value)
    assert "k.removeprefix('unet.')" in str(caught.value)
    nested = {"model.base." + k: v for k, v in base.state_dict().items()}
    with pytest.raises(exde.ExDeError, match=r"every key of the base starts with 'model\.base\.'"):
        exde.extrapolate(nested, ft.state_dict())
    # no prefix to suggest: the plain message
    missing = {k: v for k, v in ft.state_dict().items() if k != "2.bias"}
    with pytest.raises(exde.ExDeError, match=r"no parameter '2\.bias'$"):
        exde.extrapolate(base, missing)
