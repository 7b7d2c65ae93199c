"""blend_tensors and BlendPlan against their reference (meldkit/ops/blend_ref.py): bit for bit on
every device and dtype, masks that are the merge family's DARE masks, independent of tensor
order, unbiased, a plan reused across calls, and clear errors."""

from __future__ import annotations

import platform
import warnings
import zlib

import numpy as np
import pytest
import torch

from meldkit.ops import BlendPlan, blend_ref, blend_tensors
from meldkit.ops.merge_ref import stream_of
from meldkit.ops.random_ref import bernoulli_mask_ref
from tests.helpers import DEVICES, DTYPES, draw_boundary_keeps, run_child

# Empty tensors first, inside and last; one tensor of several 2^14-element chunks.
SHAPES = [(0, 5), (7,), (1,), (33, 65), (4, 0), (2, 3, 5), (4099, 3), (129, 300), (0,)]
COEFFS = [(0.0, -0.625, 0.0), (1.0, 0.0, 0.8333), (0.25, -0.3, 0.7), (1.0, 0.0, 0.0)]


def tensors(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(s, generator=g).to(device, dtype) for s in SHAPES]
    taus = [(0.05 * torch.randn(s, generator=g)).to(device, dtype) for s in SHAPES]
    keys = [zlib.crc32(f"layer.{i}.weight".encode()) for i in range(len(SHAPES))]
    return bases, taus, keys


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coeffs", COEFFS, ids=str)
def test_equals_reference_bit_for_bit(device, dtype, coeffs):
    bases, taus, keys = tensors(dtype, device)
    outs = [torch.full_like(b, float("nan")) for b in bases]
    blend_tensors(outs, bases, taus, coeffs, keep=(0.3, 0.45), seed=11, tensor_keys=keys)
    for o, b, t, k in zip(outs, bases, taus, keys, strict=True):
        want = blend_ref(b.cpu(), t.cpu(), coeffs, keep=(0.3, 0.45), seed=11, tensor_key=k)
        assert torch.equal(o.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (1.0, 1.0), (0.0, 0.45)])
def test_masks_that_keep_nothing_or_everything(device, keep):
    """keep 0 (never kept: the CUDA kernel drops that draw) and keep 1 (always kept: the largest
    integer threshold) give the reference's bits, alone and next to a drawn mask."""
    bases, taus, keys = tensors(torch.bfloat16, device, seed=5)
    outs = [torch.full_like(b, float("nan")) for b in bases]
    coeffs = (0.25, -0.3, 0.7)
    blend_tensors(outs, bases, taus, coeffs, keep=keep, seed=3, tensor_keys=keys)
    for o, b, t, k in zip(outs, bases, taus, keys, strict=True):
        want = blend_ref(b.cpu(), t.cpu(), coeffs, keep=keep, seed=3, tensor_key=k)
        assert torch.equal(o.cpu(), want), keep


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coeffs", [(-0.0, 0.0, 0.0), (-0.0, 0.0, -0.0), (0.0, -0.0, 0.0)])
def test_signed_zero_coefficients_keep_their_masks(device, coeffs):
    """a = -0.0, b = +0.0: g is -0.0 where mask 1 drops and +0.0 where it keeps, which decides
    the sign of a zero output (base ±0); the masks are drawn although the coefficients compare
    equal, as the reference draws them."""
    base = torch.tensor([0.0, -0.0] * 2000, device=device).view(40, 100)  # 2-D: masked
    tau = torch.tensor([1.0, -1.0, 2.0, -3.0] * 1000, device=device).view(40, 100)
    out = torch.empty_like(base)
    blend_tensors([out], [base], [tau], coeffs, keep=(0.5, 0.5), seed=9, tensor_keys=[7])
    want = blend_ref(base.cpu(), tau.cpu(), coeffs, keep=(0.5, 0.5), seed=9, tensor_key=7)
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_masks_at_the_draw_boundaries(device):
    # keeps exactly at, one float32 step above and one below draws that occur (kept when u < keep)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(50, 41, generator=g).to(device)
    tau = (0.05 * torch.randn(50, 41, generator=g)).to(device)
    key = 12345
    keeps1 = draw_boundary_keeps(base.numel(), 2, stream_of(key, 2, 0))
    keeps2 = draw_boundary_keeps(base.numel(), 2, stream_of(key, 2, 1))
    for k1, k2 in zip(keeps1, reversed(keeps2), strict=True):
        out = torch.empty_like(base)
        coeffs = (0.5, -0.7, 0.9)
        blend_tensors([out], [base], [tau], coeffs, keep=(k1, k2), seed=2, tensor_keys=[key])
        want = blend_ref(base.cpu(), tau.cpu(), coeffs, keep=(k1, k2), seed=2, tensor_key=key)
        assert torch.equal(out.cpu(), want), (k1, k2)


@pytest.mark.parametrize("device", DEVICES)
def test_masks_are_dare_masks_and_order_free(device):
    bases, taus, keys = tensors(torch.float32, device, seed=1)
    keep = 0.3
    outs = [torch.empty_like(b) for b in bases]
    # out = τ·m₁/keep (a = c = 0, base 0): DARE(τ) with the merge engine's stream of model 0
    zeros = [torch.zeros_like(b) for b in bases]
    blend_tensors(
        outs, zeros, taus, (0.0, 1 / keep, 0.0), keep=(keep, 1.0), seed=5, tensor_keys=keys
    )
    for o, t, k in zip(outs, taus, keys, strict=True):
        if t.dim() <= 1:  # dense: τ·(1/keep)·keep
            torch.testing.assert_close(o, t * ((1 / keep) * keep))
            continue
        mask = bernoulli_mask_ref(t.shape, keep, 5, stream_of(k, 2, 0), device=t.device)
        assert torch.equal(o != 0, mask & (t != 0))
    # any order of the tensors: the same outputs (masks keyed by name, not position)
    order = list(reversed(range(len(bases))))
    again = [torch.empty_like(bases[i]) for i in order]
    blend_tensors(
        again,
        [zeros[i] for i in order],
        [taus[i] for i in order],
        (0.0, 1 / keep, 0.0),
        keep=(keep, 1.0),
        seed=5,
        tensor_keys=[keys[i] for i in order],
    )
    for j, i in enumerate(order):
        assert torch.equal(again[j], outs[i])


def test_statistics_and_in_place():
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(400, 1000)
    tau = torch.ones(400, 1000)
    out = torch.empty_like(base)
    blend_tensors([out], [base], [tau], (0.0, 1.0, 0.0), keep=(0.3, 1.0), seed=3, tensor_keys=[9])
    assert abs(float(out.mean()) - 0.3) < 0.003  # keep rate
    blend_tensors(
        [out], [base], [tau], (0.0, 1 / 0.3, 0.0), keep=(0.3, 1.0), seed=3, tensor_keys=[9]
    )
    assert abs(float(out.mean()) - 1.0) < 0.01  # DARE is unbiased
    # out may be the base itself (read, then written, per element)
    x = torch.randn(50, 20, generator=g)
    t = torch.randn(50, 20, generator=g)
    want = blend_ref(x, t, (0.5, -0.2, 0.1), keep=(0.4, 0.6), seed=1, tensor_key=2)
    blend_tensors([x], [x], [t], (0.5, -0.2, 0.1), keep=(0.4, 0.6), seed=1, tensor_keys=[2])
    assert torch.equal(x, want)
    # a non-contiguous output (a parameter view) is written through
    big = torch.zeros(50, 20)
    view = big.t()  # [20, 50], strides (1, 20)
    blend_tensors(
        [view], [x.t().contiguous()], [t.t().contiguous()], (1.0, 0.0, 0.0), tensor_keys=[0]
    )
    torch.testing.assert_close(big, x + t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_views_and_in_place(device, dtype, offset):
    """Tensors that start off a 16-byte boundary (views into a larger buffer, as parameters of
    a flattened model can be) take the scalar path of the vectorised kernels; outputs that are
    the bases themselves are read, then written, element by element. Bit for bit the reference,
    with sizes across several 2^14-element chunks."""
    g = torch.Generator().manual_seed(offset)
    sizes = [(129, 300), (33, 65), (7,)]
    total = sum(torch.Size(shape).numel() + offset for shape in sizes) + offset
    flat_b = torch.randn(total, generator=g)
    flat_t = 0.05 * torch.randn(flat_b.numel(), generator=g)
    flat_b, flat_t = flat_b.to(device, dtype), flat_t.to(device, dtype)
    bases, taus, start = [], [], offset
    for shape in sizes:
        n = torch.Size(shape).numel()
        bases.append(flat_b[start : start + n].view(shape))
        taus.append(flat_t[start : start + n].view(shape))
        start += n + offset
    assert any(b.data_ptr() % 16 for b in bases)
    keys = [zlib.crc32(f"view.{i}".encode()) for i in range(len(sizes))]
    coeffs, keep = (0.25, -0.3, 0.7), (0.3, 0.45)
    wants = [
        blend_ref(b.cpu(), t.cpu(), coeffs, keep=keep, seed=4, tensor_key=k)
        for b, t, k in zip(bases, taus, keys, strict=True)
    ]
    outs = [torch.full_like(b, float("nan")) for b in bases]
    blend_tensors(outs, bases, taus, coeffs, keep=keep, seed=4, tensor_keys=keys)
    for o, want in zip(outs, wants, strict=True):
        assert torch.equal(o.cpu(), want)
    plan = BlendPlan(bases, bases, taus, tensor_keys=keys)  # in place, through a plan
    plan(coeffs, keep=keep, seed=4)
    for b, want in zip(bases, wants, strict=True):
        assert torch.equal(b.cpu(), want)


def test_errors():
    b = [torch.randn(3, 4)]
    t = [torch.randn(3, 4)]
    o = [torch.empty(3, 4)]
    with pytest.raises(ValueError, match="'bases': is empty"):
        blend_tensors([], [], [], (1, 0, 0), tensor_keys=[])
    with pytest.raises(ValueError, match="'tensor_keys'"):
        blend_tensors(o, b, t, (1, 0, 0), tensor_keys=[])
    with pytest.raises(ValueError, match=r"'keep\[1\]'"):
        blend_tensors(o, b, t, (1, 0, 0), keep=(0.5, 1.5), tensor_keys=[0])
    with pytest.raises(ValueError, match=r"'coeffs\[1\]'.*finite"):
        blend_tensors(o, b, t, (1, float("nan"), 0), tensor_keys=[0])
    with pytest.raises(ValueError, match="'seed'"):
        blend_tensors(o, b, t, (1, 0, 0), seed=-1, tensor_keys=[0])
    with pytest.raises(ValueError, match="may not be the task vector"):
        blend_tensors(t, b, t, (1, 0, 0), tensor_keys=[0])
    with pytest.raises((TypeError, ValueError), match="taus"):
        blend_tensors(o, b, [torch.randn(4, 3)], (1, 0, 0), tensor_keys=[0])
    with pytest.raises(ValueError, match=r"'coeffs'.*overflows float32"):
        blend_tensors(o, b, t, (1e300, 0, 0), tensor_keys=[0])
    with pytest.raises(ValueError, match=r"'coeffs'.*overflows float32"):
        blend_tensors(o, b, t, (3e38, 3e38, 0), tensor_keys=[0])  # each finite, a + b not
    with pytest.raises(ValueError, match="'keep': expected"):
        blend_tensors(o, b, t, (1, 0, 0), keep=0.5, tensor_keys=[0])
    with pytest.raises(TypeError, match="'tensor_keys': expected ints"):
        blend_tensors(o, b, t, (1, 0, 0), tensor_keys=[7.9])
    with pytest.raises(ValueError, match=r"'outs\[0\]': several of its elements share memory"):
        blend_tensors([torch.zeros(4).expand(3, 4)], b, t, (1, 0, 0), tensor_keys=[0])


def test_outs_that_overlap_other_tensors_are_refused():
    """An out may be exactly its own base (in place) or separate memory: any other overlap
    (a shifted view of a base, another position's base or out, a task vector) would read
    values the blend has already written. Bases and task vectors may overlap each other."""
    buf = torch.randn(80)
    base, tau, other = buf[0:12].view(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    coeffs, keys = (1.0, 0.5, 0.25), [0, 1]
    cases = [
        ([buf[1:13].view(3, 4)], [base], [tau], r"'outs\[0\]': overlaps 'bases\[0\]'"),
        ([buf[4:16].view(3, 4)], [base], [tau], r"'outs\[0\]': overlaps 'bases\[0\]'"),
        ([base, torch.empty(3, 4)], [other, base], [tau, tau], r"'outs\[0\]': overlaps 'bases\[1"),
        ([base, base], [base, base], [tau, tau], r"'outs\[\d\]': overlaps 'outs\[\d\]'"),
        ([buf[20:32].view(3, 4)], [base], [buf[26:38].view(3, 4)], r"may not be the task vector"),
    ]
    for outs, bases, taus, message in cases:
        with pytest.raises(ValueError, match=message):
            blend_tensors(outs, bases, taus, coeffs, tensor_keys=keys[: len(outs)])
    # allowed: in place, and a base that is also a task vector (memory read twice)
    want = blend_ref(base.clone(), base, coeffs, keep=(1.0, 1.0), seed=0, tensor_key=0)
    in_place, out = base.clone(), torch.empty(3, 4)
    blend_tensors([in_place, out], [in_place, base], [base, base], coeffs, tensor_keys=keys)
    torch.testing.assert_close(in_place, want, rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_reused(device, dtype):
    """One plan, many calls (ExDe's per-step re-blend): each call equals the reference for its
    own coefficients, keeps and seed; in-place changes of a base are seen; parameters (which
    require grad) are written through."""
    bases, taus, keys = tensors(dtype, device, seed=3)
    outs = [torch.nn.Parameter(torch.full_like(b, float("nan"))) for b in bases]
    plan = BlendPlan(outs, bases, taus, tensor_keys=keys)
    assert plan.num_tensors == len(SHAPES)
    calls = [(c, (0.3 + 0.1 * i, 0.9 - 0.2 * i), 7 * i + 1) for i, c in enumerate(COEFFS)]
    calls.append((COEFFS[2], (0.3, 0.45), 2**64 - 1))
    for step, (coeffs, keep, seed) in enumerate(calls):
        if step == 2:
            with torch.no_grad():
                bases[3].mul_(-2)  # seen by the next call: the plan reads the bases each time
        plan(coeffs, keep=keep, seed=seed)
        for o, b, t, k in zip(outs, bases, taus, keys, strict=True):
            want = blend_ref(b.cpu(), t.cpu(), coeffs, keep=keep, seed=seed, tensor_key=k)
            assert torch.equal(o.detach().cpu(), want), (step, o.shape)


def test_plan_refuses_moved_outputs():
    bases, taus, keys = tensors(torch.float32, "cpu")
    outs = [torch.nn.Parameter(torch.empty_like(b)) for b in bases]
    plan = BlendPlan(outs, bases, taus, tensor_keys=keys)
    plan((1.0, 0.0, 0.0))
    outs[3].data = torch.empty_like(bases[3])  # what model.to(...) does to every parameter
    with pytest.raises(ValueError, match=r"'outs\[3\]'.*new plan"):
        plan((1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"'keep\[0\]'"):
        plan((1.0, 0.0, 0.0), keep=(-0.1, 1.0))


@pytest.mark.cuda
def test_plan_run_on_another_stream_then_dropped():
    """A plan made on the default stream and run on a side stream marks its tensors used there:
    dropping the plan right after the run, then allocating and writing on the default stream,
    does not corrupt the blend (the table and contiguous copies are not reused too early)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bases, taus, keys = tensors(torch.float32, "cuda", seed=5)
    outs = [torch.empty_like(b) for b in bases]
    side = torch.cuda.Stream()
    # Non-contiguous taus of the same shapes and values: the plan copies them.
    strided = [
        t.new_empty(t.shape[::-1]).t().copy_(t) if t.dim() == 2 and t.numel() > 1 else t
        for t in taus
    ]
    assert not all(t.is_contiguous() for t in strided)
    want = [
        blend_ref(b.cpu(), t.cpu(), COEFFS[2], keep=(0.4, 0.6), seed=9, tensor_key=k)
        for b, t, k in zip(bases, taus, keys, strict=True)
    ]
    plan = BlendPlan(outs, bases, strided, tensor_keys=keys)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        plan(COEFFS[2], keep=(0.4, 0.6), seed=9)
    del plan
    for _ in range(4):  # reuse freed blocks on the default stream while the side stream runs
        torch.empty(1 << 20, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()
    for o, w in zip(outs, want, strict=True):
        assert torch.equal(o.cpu(), w)


@pytest.mark.cuda
def test_a_plan_made_on_a_busy_stream_runs_on_another():
    """The plan's table and contiguous copies are queued on the stream it is made on: a run on
    another stream, with no synchronisation by the caller, waits for them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bases, taus, keys = tensors(torch.float32, "cuda", seed=6)
    outs = [torch.empty_like(b) for b in bases]
    strided = [
        t.new_empty(t.shape[::-1]).t().copy_(t) if t.dim() == 2 and t.numel() > 1 else t
        for t in taus
    ]
    want = [
        blend_ref(b.cpu(), t.cpu(), COEFFS[2], keep=(0.4, 0.6), seed=3, tensor_key=k)
        for b, t, k in zip(bases, taus, keys, strict=True)
    ]
    made_on, run_on = torch.cuda.Stream(), torch.cuda.Stream()
    made_on.wait_stream(torch.cuda.current_stream())
    run_on.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(made_on):
        torch.cuda._sleep(50_000_000)  # the plan's copies queue behind this
        plan = BlendPlan(outs, bases, strided, tensor_keys=keys)
    with torch.cuda.stream(run_on):
        plan(COEFFS[2], keep=(0.4, 0.6), seed=3)
    torch.cuda.synchronize()
    for o, w in zip(outs, want, strict=True):
        assert torch.equal(o.cpu(), w)


def _shrink(t: torch.Tensor) -> None:
    t.resize_(2)  # same storage, fewer elements


def _grow(t: torch.Tensor) -> None:
    t.resize_(64, 64)  # a new, larger storage; the old one is freed (or held by the plan)


def _replace(t: torch.Tensor) -> None:
    t.data = torch.randn(t.shape, dtype=t.dtype)  # what model.to(...) does


def _transpose(t: torch.Tensor) -> None:
    t.as_strided_(t.shape, (1, t.shape[0]))  # same memory, no longer contiguous


def _reinterpret(t: torch.Tensor) -> None:
    t.data = t.data.view(torch.int32)  # same memory and size, another dtype


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "role, change, message",
    [
        ("taus", _grow, "its storage moved"),
        ("bases", _replace, "its storage moved"),
        ("outs", _replace, "its storage moved"),
        ("outs", _shrink, r"its shape changed from \[4, 4\] to \[2\]"),
        ("bases", _shrink, r"its shape changed from \[4, 4\] to \[2\]"),
        ("outs", _transpose, "it is no longer contiguous"),
        ("taus", _reinterpret, "its dtype changed from float32 to int32"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else ("" if " " in v else v),
)
def test_plan_refuses_tensors_that_changed(backend, role, change, message, monkeypatch):
    """The plan keeps the addresses and sizes of what it reads and writes: a call after a
    tensor moved, was resized, became non-contiguous or changed dtype is refused, naming it,
    before anything is read or written (the old addresses may be freed memory)."""
    monkeypatch.setenv("MELDKIT_BACKEND", backend)
    g = torch.Generator().manual_seed(6)
    tensors = {
        name: [torch.randn(4, 4, generator=g), torch.randn(5, generator=g)]
        for name in ("outs", "bases", "taus")
    }
    plan = BlendPlan(tensors["outs"], tensors["bases"], tensors["taus"], tensor_keys=[3, 4])
    plan((1.0, 0.5, 0.0), keep=(0.5, 1.0))
    change(tensors[role][0])
    written = [o.clone() for o in tensors["outs"]]
    with pytest.raises(ValueError, match=rf"'{role}\[0\]': {message} .*make a new plan"):
        plan((1.0, 0.5, 0.0), keep=(0.5, 1.0))
    for o, w in zip(tensors["outs"], written, strict=True):
        assert torch.equal(o, w)  # nothing written


def test_plan_reads_its_copy_of_non_contiguous_inputs():
    """A non-contiguous base or task vector is copied when the plan is made: the plan reads
    the copy, so what happens to the original later does not matter to it."""
    base, tau = torch.randn(6, 4).t(), torch.randn(6, 4).t()
    want = blend_ref(base, tau, (1.0, 0.5, 0.0), keep=(0.5, 1.0), seed=0, tensor_key=8)
    out = torch.empty(4, 6)
    plan = BlendPlan([out], [base], [tau], tensor_keys=[8])
    tau.resize_(64, 64)
    base.data = torch.zeros(3)
    plan((1.0, 0.5, 0.0), keep=(0.5, 1.0))
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # native, reference fallback
def test_plan_bumps_the_outputs_version_counters(dtype):
    """The kernel writes the outputs through their addresses: the plan tells autograd, so a
    graph that saved an output's old value raises in backward instead of using the new one."""
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=dtype))
    strided = torch.nn.Parameter(torch.ones(4, 4, dtype=dtype).t())  # written through a copy
    bases = [torch.ones(4, 4, dtype=dtype), torch.ones(4, 4, dtype=dtype)]
    taus = [torch.ones(4, 4, dtype=dtype), torch.ones(4, 4, dtype=dtype)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float64 fallback's warning
        plan = BlendPlan([p, strided], bases, taus, tensor_keys=[1, 2])
    for out in (p, strided):
        x = torch.ones(4, 4, dtype=dtype, requires_grad=True)
        y = (out * x).sum()  # saves the output's current value for dL/dx
        version = out._version
        plan((2.0, 0.0, 0.0))
        assert out._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
    if dtype == torch.float32:
        # Tensors made in inference mode keep no version counter: the kernel writes them all
        # the same (the fallback writes with copy_, which PyTorch refuses outside the mode).
        with torch.inference_mode():
            out = torch.zeros(4, 4)
        BlendPlan([out], bases[:1], taus[:1], tensor_keys=[1])((2.0, 0.0, 0.0))
        assert torch.equal(out, torch.full((4, 4), 3.0))


def _bad_plans(dtype):
    """(outs, bases, taus, error, message) that every path refuses, in ``dtype``."""
    g = torch.Generator().manual_seed(7)
    b, t, o = (torch.randn(3, 4, generator=g).to(dtype) for _ in range(3))
    b2, t2, o2 = (torch.randn(5, generator=g).to(torch.float16) for _ in range(3))
    buf = torch.randn(40, generator=g).to(dtype)
    f, h = str(dtype).removeprefix("torch."), torch.float16
    return [
        (
            [o, o2],
            [b, b2],
            [t, t2],
            TypeError,
            rf"'bases\[1\]': dtype float16 differs from 'bases\[0\]' {f}",
        ),
        (
            [o],
            [b],
            [t.to(h)],
            TypeError,
            rf"'taus\[0\]': dtype float16 differs from 'bases\[0\]' {f}",
        ),
        (
            [o.to(h)],
            [b],
            [t],
            TypeError,
            rf"'outs\[0\]': dtype float16 differs from 'bases\[0\]' {f}",
        ),
        ([o.int()], [b.int()], [t.int()], TypeError, r"'bases\[0\]': dtype int32 is not supp"),
        ([o.cfloat()], [b.cfloat()], [t.cfloat()], TypeError, r"'bases\[0\]': dtype complex64"),
        ([o.to("meta")], [b], [t], TypeError, r"'outs\[0\]': is on meta but 'bases\[0\]' is on"),
        ([o], [b.to_sparse()], [t], TypeError, r"'bases\[0\]': layout torch.sparse_coo"),
        ([o], [b], [t.t()], ValueError, r"'taus\[0\]': shape \[4, 3\] does not match 'bases\[0"),
        ([t], [b], [t], ValueError, r"'outs\[0\]': may not be the task vector 'taus\[0\]'"),
        ([b, o], [t.clone(), b], [t, t.clone()], ValueError, r"'outs\[0\]': overlaps 'bases\[1"),
        ([buf[1:13].view(3, 4)], [buf[:12].view(3, 4)], [t], ValueError, r"overlaps 'bases\[0"),
    ]


# float32 natively or through the reference; float64 (no native kernel) through the reference.
PATHS = [("auto", torch.float32), ("reference", torch.float32), ("auto", torch.float64)]


@pytest.mark.parametrize("case", range(len(_bad_plans(torch.float32))))
@pytest.mark.parametrize("backend, dtype", PATHS, ids=str)
def test_every_path_checks_the_tensors_alike(case, backend, dtype, monkeypatch):
    """The reference fallback (float64, MELDKIT_BACKEND=reference, devices without a kernel)
    refuses what the native path refuses, with the same message: mixed or non-float dtypes,
    mismatched devices or shapes, outputs overlapping other tensors."""
    outs, bases, taus, error, message = _bad_plans(dtype)[case]
    monkeypatch.setenv("MELDKIT_BACKEND", backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float64 fallback's warning
        with pytest.raises(error, match=message):
            blend_tensors(outs, bases, taus, (1.0, 0.0, 0.0), tensor_keys=list(range(len(outs))))


def test_seed_may_be_any_integral_number():
    base, tau = torch.randn(30, 20), torch.randn(30, 20)
    want, got = torch.empty(30, 20), torch.empty(30, 20)
    blend_tensors([want], [base], [tau], (0.0, 1.0, 0.0), keep=(0.5, 1.0), seed=3, tensor_keys=[1])
    for seed in (np.int64(3), np.uint64(3), torch.tensor(3).item()):
        got.fill_(float("nan"))
        blend_tensors(
            [got], [base], [tau], (0.0, 1.0, 0.0), keep=(0.5, 1.0), seed=seed, tensor_keys=[1]
        )
        assert torch.equal(got, want)
    for seed, error in ((True, TypeError), (3.0, TypeError), ("3", TypeError), (2**64, ValueError)):
        with pytest.raises(error, match="'seed'"):
            blend_tensors([got], [base], [tau], (1, 0, 0), seed=seed, tensor_keys=[1])


@pytest.mark.parametrize("daz_only", [False, True], ids=["default_fpu", "daz_only"])
def test_the_portable_path_agrees_with_the_avx512_one(daz_only):
    """On a CPU with AVX-512 the blend runs intrinsics code (csrc/blend/blend_cpu.cpp), which
    MELDKIT_CPU_AVX512=0 (read once per process) turns off. Both must write the same bytes
    (float32-subnormal results included; NaNs compared as NaNs) and equal the reference, also
    with the FPU's denormals-are-zero mode on alone (it hides subnormals from VFPCLASSPS)."""
    env = {"MELDKIT_TEST_DAZ_ONLY": "1"} if daz_only else {}
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if daz_only and not (x86 and platform.libc_ver()[0] == "glibc"):
        pytest.skip("MXCSR's denormals-are-zero mode, set through glibc's fenv_t (x86-64)")
    portable = run_child("tests.blend_paths_child", MELDKIT_CPU_AVX512="0", **env)
    fast = run_child("tests.blend_paths_child", **env)
    assert portable.pop("daz_only") == fast.pop("daz_only") == daz_only
    assert portable.pop("bad") == [] and fast.pop("bad") == []
    assert len(portable) > 70
    differ = sorted(k for k in portable if portable[k] != fast.get(k))
    assert not differ, f"outputs that differ between the two paths: {differ}"
