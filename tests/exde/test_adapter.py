"""ExDe stage 1 (the temporal text adapter on a tiny SVD UNet) and the motion measure."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from meldkit import exde


def unet_inputs(b=2, f=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, f, 8, 16, 16, generator=g),
        torch.tensor([0.5, -0.3][:b]),
        {
            "encoder_hidden_states": torch.randn(b, 1, 32, generator=g),
            "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * b),
            "return_dict": False,
        },
    )


@pytest.fixture
def unet():
    pytest.importorskip("diffusers")
    from meldkit.exde import _tiny as tiny_svd

    return tiny_svd.unet()


def test_adapter_starts_as_the_identity(unet):
    base = copy.deepcopy(unet)
    adapter = exde.add_text_adapter(unet, text_dim=16, num_frames=4, num_heads=4)
    assert len(adapter.projections) == 6  # every temporal transformer block of the tiny UNet
    x, t, kw = unet_inputs()
    with torch.no_grad():
        want = base(x, t, **kw)[0]
        with adapter.text(torch.randn(2, 5, 16)):
            got = unet(x, t, **kw)[0]
        plain = unet(x, t, **kw)[0]  # outside `text`: no adapter at all
    assert torch.equal(got, want) and torch.equal(plain, want)


def test_float32_text_conditions_a_bfloat16_unet(unet):
    # The text is cast to the adapter's dtype (was: the queries to the text's, then a raw
    # "mat1 and mat2 must have the same dtype" in the cross-attention).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers: casting with .to() instead of torch_dtype
        unet = unet.to(torch.bfloat16)
    base = copy.deepcopy(unet)
    adapter = exde.add_text_adapter(unet, text_dim=16, num_frames=4, num_heads=4)
    assert adapter.queries.dtype == torch.bfloat16
    x, t, kw = unet_inputs()
    x, t = x.to(torch.bfloat16), t.to(torch.bfloat16)
    kw = {**kw, "encoder_hidden_states": kw["encoder_hidden_states"].to(torch.bfloat16)}
    kw["added_time_ids"] = kw["added_time_ids"].to(torch.bfloat16)
    text = torch.randn(2, 5, 16)  # float32
    assert adapter.frame_tokens(text).dtype == torch.bfloat16
    with torch.no_grad():
        want = base(x, t, **kw)[0]
        with adapter.text(text):
            got = unet(x, t, **kw)[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_an_adapted_unet_pickles(unet, tmp_path):
    # The hooks were closures local to add_text_adapter: torch.save(unet) could not pickle them.
    adapter = exde.add_text_adapter(unet, text_dim=16, num_frames=4, num_heads=4)
    with torch.no_grad():  # a text-dependent adapter, so that the round trip has work to show
        for proj in adapter.projections:
            proj.weight[:, -16:].normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    x, t, kw = unet_inputs()
    text = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = unet(x, t, **kw)[0]
        with adapter.text(text):
            want = unet(x, t, **kw)[0]
    assert not torch.equal(want, plain)
    torch.save(unet, tmp_path / "unet.pt")
    torch.save({"unet": unet, "adapter": adapter}, tmp_path / "pair.pt")
    alone = torch.load(tmp_path / "unet.pt", weights_only=False)
    pair = torch.load(tmp_path / "pair.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(alone(x, t, **kw)[0], plain)
        with pair["adapter"].text(text):
            assert torch.equal(pair["unet"](x, t, **kw)[0], want)
        assert torch.equal(pair["unet"](x, t, **kw)[0], plain)
    exde.remove_text_adapter(pair["adapter"])  # the loaded adapter's hooks are the loaded UNet's
    hooks = sum(len(m._forward_pre_hooks) for m in pair["unet"].modules())
    assert hooks == 0


def test_training_step_trains_every_adapter_parameter(unet):
    adapter = exde.add_text_adapter(unet, text_dim=16, num_frames=4, num_heads=4)
    params = exde.adapter_parameters(unet, adapter)
    names = {id(p) for p in adapter.parameters()}
    assert names <= {id(p) for p in params}  # queries and cross-attention included
    assert len(params) > len(names)  # and the UNet's temporal layers
    before = {k: v.detach().clone() for k, v in adapter.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, t, kw = unet_inputs()
    text = torch.randn(2, 5, 16)
    batch = {
        "latents": torch.randn(2, 2, 4, 16, 16),
        "image_latents": torch.randn(2, 4, 16, 16),
        "image_embeddings": kw["encoder_hidden_states"],
        "added_time_ids": kw["added_time_ids"],
        "text": text,
    }
    g = torch.Generator().manual_seed(0)
    losses = [exde.training_step(unet, adapter, opt, batch, generator=g) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, p in adapter.named_parameters():
        assert not torch.equal(p, before[name]), name
    with torch.no_grad():
        with adapter.text(text):
            a = unet(x, t, **kw)[0]
        with adapter.text(torch.randn(2, 5, 16)):
            b = unet(x, t, **kw)[0]
    assert (a - b).abs().max() > 0  # the text now steers the temporal layers
    # only what the optimizer trains gets gradients; the rest keeps requires_grad
    trained = {id(p) for p in params}
    for name, p in unet.named_parameters():
        if id(p) not in trained:
            assert p.grad is None and p.requires_grad, name
    exde.remove_text_adapter(adapter)
    with torch.no_grad(), adapter.text(text):
        assert torch.equal(unet(x, t, **kw)[0], unet(x, t, **kw)[0])


def test_adapter_errors(unet):
    adapter = exde.add_text_adapter(unet, text_dim=16, num_frames=1, num_heads=4)
    with pytest.raises(exde.ExDeError, match=r"\[B, L, 16\]"):
        with adapter.text(torch.randn(2, 5, 8)):
            pass
    x, t, kw = unet_inputs()
    with pytest.raises(
        exde.ExDeError,
        match=r"2 frames but 1 queries \(make the adapter with .*num_frames=2\) or more",
    ):
        with adapter.text(torch.randn(2, 5, 16)):
            unet(x, t, **kw)
    with pytest.raises(exde.ExDeError, match="not a multiple"):
        exde.add_text_adapter(unet, text_dim=10, num_heads=4)


def test_the_frame_count_defaults_to_the_unets(unet):
    # SVD-XT's UNet (and its pipeline's default) has 25 frames: the adapter gets 25 queries.
    assert unet.config.num_frames > 14
    adapter = exde.add_text_adapter(unet, text_dim=16, num_heads=4)
    assert adapter.num_frames == adapter.queries.shape[0] == unet.config.num_frames
    exde.remove_text_adapter(adapter)
    with pytest.raises(exde.ExDeError, match="'num_frames' must be an int ≥ 1, got 0"):
        exde.add_text_adapter(unet, text_dim=16, num_frames=0, num_heads=4)


def test_motion_degree():
    still = torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1)
    assert exde.motion_degree(still, method="frame_difference").value == 0.0
    moving = torch.zeros(4, 3, 32, 32)
    for f in range(4):
        moving[f, :, 8:16, 4 + 5 * f : 12 + 5 * f] = 1.0
    faster = torch.zeros(4, 3, 32, 32)
    for f in range(4):
        faster[f, :, 8:16, 8 * f : 8 * f + 8] = 1.0
    slow, fast = exde.motion_degree(moving), exde.motion_degree(faster)
    assert slow.method in ("farneback", "frame_difference")
    assert fast.value > slow.value > 0
    # diffusers' PIL output and [1, F, C, H, W] tensors
    pil = pytest.importorskip("PIL.Image")
    frames = [pil.fromarray((m.permute(1, 2, 0).numpy() * 255).astype("uint8")) for m in moving]
    assert exde.motion_degree(frames).value == pytest.approx(slow.value, rel=1e-2)
    assert exde.motion_degree(moving[None]).value == slow.value
    with pytest.raises(ValueError, match="at least 2 frames"):
        exde.motion_degree(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("container", ["tensor", "array", "list"])
def test_motion_degree_scales_uint8_in_every_container(container):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    still = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    frames = np.stack([np.roll(still, 2 * i, axis=1) for i in range(4)])[..., None].repeat(3, -1)
    want = exde.motion_degree(frames.astype(np.float32) / 255, method="frame_difference")
    given = {"tensor": torch.from_numpy(frames), "array": frames, "list": list(frames)}[container]
    got = exde.motion_degree(given, method="frame_difference")
    assert got.value == pytest.approx(want.value, rel=1e-6)


def test_motion_degree_refuses_0_255_floats_and_batches():
    frames = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"'frames' are floats up to 25\d.*must be in \[0, 1\]"):
        exde.motion_degree(frames * 255)
    with pytest.raises(ValueError, match="must be in"):
        exde.motion_degree((frames * 255).numpy(), method="frame_difference")
    # a decoder's small overshoot past 1 is still [0, 1] frames
    assert exde.motion_degree(frames * 1.2, method="frame_difference").value > 0
    batch = torch.rand(2, 4, 3, 32, 32)  # pipe(...).frames of two videos
    with pytest.raises(ValueError, match=r"batch of 2 videos.*pass one video \(frames\[i\]\)"):
        exde.motion_degree(batch)
    assert exde.motion_degree(batch[1]).method in ("farneback", "frame_difference")


def test_motion_degree_refuses_a_single_image():
    # One image without a frame axis was read as a video: [H, W, 3] uint8 as H frames of rows,
    # [3, H, W] float as 3 frames of channels; a bare PIL image was a raw RuntimeError.
    np = pytest.importorskip("numpy")
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    for one in (image, torch.from_numpy(image), chw, chw.numpy()):
        with pytest.raises(
            ValueError,
            match=r"at least 2 frames .*got a single image of shape \[(24, 32, 3|3, 24, 32)\]",
        ):
            exde.motion_degree(one)
    pil = pytest.importorskip("PIL.Image")
    with pytest.raises(ValueError, match=r"at least 2 frames, got a single PIL image of size"):
        exde.motion_degree(pil.fromarray(image))
    # videos still work: [F, H, W, 3] uint8, [F, 3, H, W] float, lists of RGB and grey images
    video = np.stack([np.roll(image, 2 * i, axis=1) for i in range(3)])
    want = exde.motion_degree(video, method="frame_difference").value
    assert want > 0
    chw_video = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    got = exde.motion_degree(chw_video, method="frame_difference").value
    assert got == pytest.approx(want, rel=1e-6)
    rgb = [pil.fromarray(f) for f in video]
    assert exde.motion_degree(rgb, method="frame_difference").value == pytest.approx(want)
    grey = [f.convert("L") for f in rgb]
    assert exde.motion_degree(grey, method="frame_difference").value > 0
