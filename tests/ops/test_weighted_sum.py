"""weighted_sum against its float64 reference: every device and dtype, odd sizes, strided inputs,
out=, in-place, mixed output dtypes, exact dtype conversions, gradients, opcheck, torch.compile,
and the fallback machinery."""

from __future__ import annotations

import warnings

import pytest
import torch

import meldkit
from meldkit import _native
from meldkit.ops import weighted_sum, weighted_sum_ref
from tests.helpers import (
    DEVICES,
    DTYPES,
    ODD_SIZES,
    assert_close_to_ref,
    assert_written,
    noncontiguous,
    poison,
    randn,
)

SHAPES = [(n,) for n in ODD_SIZES] + [(3, 5, 7), ()]
# 40 inputs exceed what one CUDA launch takes (32): the chunked path with its fp32 workspace.
NUM_INPUTS = [1, 3, 40]


def make_inputs(n, shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = [randn(shape, dtype, device, gen) for _ in range(n)]
    weights = (torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2).tolist()
    return tensors, weights


def check_against_ref(got, tensors, weights):
    ref64 = weighted_sum_ref([t.double() for t in tensors], weights)
    magnitude = weighted_sum_ref([t.double().abs() for t in tensors], [abs(w) for w in weights])
    assert_close_to_ref(got, ref64, n_terms=len(tensors), magnitude=magnitude)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", NUM_INPUTS)
def test_matches_reference(device, dtype, shape, n):
    tensors, weights = make_inputs(n, shape, dtype, device, seed=n * 7 + len(shape))
    got = weighted_sum(tensors, weights)
    assert got.dtype == dtype and got.shape == tensors[0].shape and got.device.type == device
    check_against_ref(got, tensors, weights)
    # Same arithmetic as the reference in the storage dtype (no FMA, fp32 accumulation): the
    # native kernels reproduce it bit for bit.
    assert torch.equal(got, weighted_sum_ref(tensors, weights))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 40])
def test_out_is_fully_written(device, dtype, n):
    tensors, weights = make_inputs(n, (4099,), dtype, device, seed=3)
    out = poison(torch.empty(4099, dtype=dtype, device=device))
    res = weighted_sum(tensors, weights, out=out)
    assert res is out
    assert_written(out)
    check_against_ref(out, tensors, weights)


def test_float64_on_cpu():
    tensors, weights = make_inputs(5, (111,), torch.float64, "cpu", seed=11)
    got = weighted_sum(tensors, weights)
    check_against_ref(got, tensors, weights)
    assert torch.equal(got, weighted_sum_ref(tensors, weights))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_output_dtype_differs_from_inputs(device, in_dtype, out_dtype):
    tensors, weights = make_inputs(3, (7, 111), in_dtype, device, seed=5)
    got = weighted_sum(tensors, weights, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    check_against_ref(got, tensors, weights)
    out = poison(torch.empty(7, 111, dtype=out_dtype, device=device))
    weighted_sum(tensors, weights, out=out)
    assert torch.equal(out, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_and_out(device, dtype):
    tensors, weights = make_inputs(4, (5, 111), dtype, device, seed=9)
    strided = [noncontiguous(t) for t in tensors]
    strided.append(tensors[0].t().contiguous().t())  # a transposed layout too
    weights = [*weights, 0.75]
    expected = weighted_sum([t.contiguous() for t in strided], weights)
    assert torch.equal(weighted_sum(strided, weights), expected)
    out = noncontiguous(torch.empty(5, 111, dtype=dtype, device=device))
    poison(out)
    weighted_sum(strided, weights, out=out)
    assert_written(out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [3, 40])
def test_out_may_be_an_input(device, n):
    tensors, weights = make_inputs(n, (4099,), torch.float32, device, seed=13)
    expected = weighted_sum(tensors, weights)
    for idx in (0, n - 1):  # first and last input: both chunks of the CUDA path
        ts = [t.clone() for t in tensors]
        weighted_sum(ts, weights, out=ts[idx])
        assert torch.equal(ts[idx], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_views(device):
    # Views starting one element in: the CUDA kernel must take its scalar path.
    tensors, weights = make_inputs(3, (4100,), torch.bfloat16, device, seed=17)
    views = [t[1:] for t in tensors]
    out = poison(torch.empty(4100, dtype=torch.bfloat16, device=device))[1:]
    weighted_sum(views, weights, out=out)
    assert torch.equal(out, weighted_sum_ref(views, weights))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (3, 0)], ids=str)
def test_empty_tensors_give_empty_result(device, shape):
    tensors = [torch.empty(shape, device=device) for _ in range(3)]
    got = weighted_sum(tensors, [1.0, 2.0, 3.0])
    assert got.shape == shape


# ---- exact conversions: the kernels' bf16/fp16 code against torch's casts --------------------


def all_16bit(dtype):
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def same_bits_or_both_nan(a, b):
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(a[~nan], b[~nan])
    assert torch.equal(torch.signbit(a[~nan]), torch.signbit(b[~nan]))  # -0 stays -0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_widening_every_16bit_pattern_is_exact(device, dtype):
    x = all_16bit(dtype).to(device)
    same_bits_or_both_nan(weighted_sum([x], [1.0], out_dtype=torch.float32), x.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrowing_rounds_like_torch(device, dtype):
    gen = torch.Generator().manual_seed(21)
    bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=gen, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    finfo = torch.finfo(dtype)
    specials = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            finfo.max,
            -finfo.max,
            finfo.tiny,
            finfo.tiny / 2,
            finfo.tiny / 3,
            65519.0,
            65520.0,
            65536.0,
            1e-8,
            5.96e-8,
            2.98e-8,
            2.9802322387695312e-08,
            1 + 2**-11,
            1 + 3 * 2**-11,
            1 + 2**-8,
            1 + 3 * 2**-8,
        ],
        dtype=torch.float32,
    )
    x = torch.cat([x, specials, -specials]).to(device)
    same_bits_or_both_nan(weighted_sum([x], [1.0], out_dtype=dtype), x.to(dtype))


# ---- gradients, opcheck, compile ---------------------------------------------------------------


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(7, 5, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)
    ]
    weights = [0.5, -1.25, 2.0]
    assert torch.autograd.gradcheck(lambda *ts: weighted_sum(list(ts), weights), tensors)
    assert torch.autograd.gradgradcheck(lambda *ts: weighted_sum(list(ts), weights), tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients(device, dtype):
    tensors, weights = make_inputs(3, (111,), dtype, device, seed=23)
    tensors = [t.requires_grad_() for t in tensors]
    grad = randn((111,), torch.float32, device, torch.Generator().manual_seed(2))
    weighted_sum(tensors, weights, out_dtype=torch.float32).backward(grad)
    for t, w in zip(tensors, weights, strict=True):
        assert t.grad.dtype == dtype
        assert_close_to_ref(t.grad, grad.double() * w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_gradients_reach_weights_that_require_grad(device, dtype):
    """Learned merge coefficients (AdaMerging-style): a weights tensor that requires grad gets
    ∂L/∂w_i = <∂L/∂out, t_i> (plain PyTorch in float64 is the reference), the tensors get
    their usual gradient, and the values are those of float weights."""
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("float64 has no CUDA kernel: the fallback is tested on the CPU")
    tensors, weights = make_inputs(3, (111,), dtype, device, seed=37)
    weights = torch.tensor(weights, dtype=torch.float32).tolist()  # the float32 the op uses
    tensors = [t.requires_grad_() for t in tensors]
    w = torch.tensor(weights, requires_grad=True)  # on the CPU, wherever the tensors are
    grad = randn((111,), torch.float32, device, torch.Generator().manual_seed(3))
    out = weighted_sum(tensors, w, out_dtype=torch.float32)
    assert torch.equal(out, weighted_sum(tensors, weights, out_dtype=torch.float32))
    out.backward(grad)
    w64 = torch.tensor(weights, dtype=torch.float64, requires_grad=True)
    t64 = [t.detach().double().requires_grad_() for t in tensors]
    sum(wi * ti for wi, ti in zip(w64, t64, strict=True)).backward(grad.double())
    assert w.grad.dtype == torch.float32 and w.grad.device.type == "cpu"
    magnitude = torch.stack([(grad.double() * t).abs().sum() for t in t64]).cpu()
    assert_close_to_ref(w.grad, w64.grad, n_terms=111, magnitude=magnitude)
    for t, ref in zip(tensors, t64, strict=True):
        assert t.grad.dtype == dtype
        assert_close_to_ref(t.grad, ref.grad)
    # out= records no history: refused with trainable weights, as with trainable tensors
    with pytest.raises(RuntimeError, match="out= does not support autograd"):
        weighted_sum([t.detach() for t in tensors], w, out=torch.empty_like(out))
    with torch.no_grad():
        assert torch.equal(weighted_sum(tensors, w, out_dtype=torch.float32), out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    tensors, weights = make_inputs(3, (5, 7), dtype, device, seed=29)
    torch.library.opcheck(torch.ops.meldkit.weighted_sum.default, (tensors, weights, None))
    tensors = [t.requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.meldkit.weighted_sum.default, (tensors, weights, torch.float32))
    out = torch.empty(5, 7, dtype=dtype, device=device)
    torch.library.opcheck(
        torch.ops.meldkit.weighted_sum_out.default,
        ([t.detach() for t in tensors], weights, out),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    tensors, weights = make_inputs(3, (4099,), torch.float32, device, seed=31)

    def merge(a, b, c):
        return weighted_sum([a, b, c], weights) * 2

    compiled = torch.compile(merge, fullgraph=True)
    assert torch.equal(compiled(*tensors), merge(*tensors))


# ---- bad input through the public API --------------------------------------------------------


def test_bad_arguments_name_themselves():
    a = torch.randn(4)
    cases = [
        (lambda: weighted_sum([], []), ValueError, "'tensors': is empty"),
        (lambda: weighted_sum(a, [1.0]), TypeError, "'tensors': expected a list"),
        (lambda: weighted_sum([a, "x"], [1.0, 1.0]), TypeError, "'tensors[1]'"),
        (lambda: weighted_sum([a, torch.randn(5)], [1, 1]), ValueError, "'tensors[1]': shape"),
        (lambda: weighted_sum([a, a.double()], [1, 1]), TypeError, "'tensors[1]': dtype"),
        (lambda: weighted_sum([a.int()], [1]), TypeError, "'tensors[0]': dtype torch.int32"),
        (lambda: weighted_sum([a, a], [1.0]), ValueError, "'weights': has 1 entries"),
        (lambda: weighted_sum([a], [float("nan")]), ValueError, "'weights[0]': must be finite"),
        (lambda: weighted_sum([a], [1e39]), ValueError, "'weights[0]': must be finite"),
        (lambda: weighted_sum([a], ["w"]), TypeError, "'weights[0]': expected a float"),
        (lambda: weighted_sum([a], [1.0], out=torch.empty(5)), ValueError, "'out': shape"),
        (lambda: weighted_sum([a.to_sparse()], [1.0]), TypeError, "'tensors[0]': layout"),
        (
            lambda: weighted_sum([a], [1.0], out=torch.zeros(1).expand(4)),
            ValueError,
            "'out': several of its elements share memory",
        ),
        (
            lambda: weighted_sum([a], [1.0], out=torch.empty(4, dtype=torch.int64)),
            TypeError,
            "'out'",
        ),
        (
            lambda: weighted_sum([a], [1.0], out=torch.empty(4), out_dtype=torch.float16),
            ValueError,
            "'out_dtype'",
        ),
        (lambda: weighted_sum([a], [1.0], out_dtype=torch.int8), TypeError, "'out_dtype'"),
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=None) as info:
            call()
        assert text in str(info.value), (text, str(info.value))
        assert "meldkit.weighted_sum" in str(info.value)


def test_out_refuses_autograd():
    a = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="out= does not support autograd"):
        weighted_sum([a], [1.0], out=torch.empty(4))
    with torch.no_grad():
        weighted_sum([a], [1.0], out=torch.empty(4))


def test_weights_as_tensor():
    tensors, weights = make_inputs(3, (7,), torch.float32, "cpu")
    assert torch.equal(weighted_sum(tensors, torch.tensor(weights)), weighted_sum(tensors, weights))


# ---- dispatch: fallback, forced reference, forced native -------------------------------------


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setenv("MELDKIT_BACKEND", "auto")  # gpu_check.sh runs the suite with "native"
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "IMPORT_ERROR", "ImportError: simulated")
    monkeypatch.setattr(_native, "_warned", set())


def test_fallback_warns_once_with_reason(no_extension):
    tensors, weights = make_inputs(3, (111,), torch.bfloat16, "cpu")
    with pytest.warns(meldkit.MeldkitFallbackWarning) as record:
        got = weighted_sum(tensors, weights)
    assert len(record) == 1
    message = str(record[0].message)
    for part in ("weighted_sum", "cpu", "bfloat16", "ImportError: simulated"):
        assert part in message
    assert torch.equal(got, weighted_sum_ref(tensors, weights))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weighted_sum(tensors, weights)  # second call: no second warning


def test_backend_native_raises_instead_of_falling_back(no_extension, monkeypatch):
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    with pytest.raises(RuntimeError, match=r"MELDKIT_BACKEND=native but meldkit\._C could not"):
        weighted_sum([torch.randn(3)], [1.0])


def test_backend_reference_is_silent_and_equal(monkeypatch):
    tensors, weights = make_inputs(3, (111,), torch.float16, "cpu")
    native = weighted_sum(tensors, weights)
    monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(weighted_sum(tensors, weights), native)


def test_backend_value_is_validated(monkeypatch):
    monkeypatch.setenv("MELDKIT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MELDKIT_BACKEND='fastest' is not one of"):
        weighted_sum([torch.randn(3)], [1.0])


def test_native_path_is_taken_on_cpu(monkeypatch):
    # With the extension built, the CPU path must be native: MELDKIT_BACKEND=native would raise.
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    tensors, weights = make_inputs(2, (7,), torch.float32, "cpu")
    weighted_sum(tensors, weights)


@pytest.mark.cuda
def test_cuda_float64_falls_back_with_reason(monkeypatch):
    monkeypatch.setenv("MELDKIT_BACKEND", "auto")
    monkeypatch.setattr(_native, "_warned", set())
    tensors, weights = make_inputs(2, (7,), torch.float64, "cuda")
    with pytest.warns(meldkit.MeldkitFallbackWarning, match="dtype float64 has no native cuda"):
        got = weighted_sum(tensors, weights)
    assert torch.equal(got, weighted_sum_ref(tensors, weights))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpu_bit_for_bit(dtype):
    tensors, weights = make_inputs(40, (4099,), dtype, "cpu", seed=37)
    cpu = weighted_sum(tensors, weights)
    cuda = weighted_sum([t.cuda() for t in tensors], weights)
    assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.cuda
def test_cuda_runs_on_the_tensors_stream():
    tensors, weights = make_inputs(3, (1 << 20,), torch.float32, "cuda", seed=41)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = weighted_sum(tensors, weights)
    stream.synchronize()
    assert torch.equal(got, weighted_sum_ref(tensors, weights))


@pytest.mark.cuda
def test_cuda_graph_capture():
    tensors, weights = make_inputs(3, (4099,), torch.bfloat16, "cuda", seed=43)
    out = torch.empty_like(tensors[0])
    weighted_sum(tensors, weights, out=out)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weighted_sum(tensors, weights, out=out)
    poison(out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, weighted_sum_ref(tensors, weights))


@pytest.mark.cuda
def test_cuda_workspace_may_not_be_an_input_or_the_output():
    """A workspace that is one of the inputs (or the output) would be overwritten by the first of
    the chunked launches before a later one reads it: refused by name, as any overlap."""
    tensors, weights = make_inputs(40, (4099,), torch.float32, "cuda", seed=47)
    out = torch.empty_like(tensors[0])
    for ws in (tensors[35], out):
        with pytest.raises(ValueError, match=r"'workspace'.*overlaps"):
            _native._C.weighted_sum(tensors, weights, out, ws, _native.stream_of(out.device))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_float16_inputs_match_the_reference_bit_for_bit_including_specials(out_dtype):
    """float16 inputs take F16C conversions on x86-64 CPUs that have them (8 lanes at a time,
    the rest of a tile in the portable code): every bit equals the reference's (a float16
    output's NaNs included; bfloat16 NaN payloads differ from torch's, as before), over
    lengths around the 8-lane step and the 512-element tile, with subnormal, infinite, NaN,
    signed-zero and overflowing values."""
    gen = torch.Generator().manual_seed(7)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 6e-8, -6e-8, 6.1e-5, 65504.0,
         -65504.0, 1.0, 0.5, 2049.0],
        dtype=torch.float16,
    )  # fmt: skip
    for n in (1, 7, 8, 9, 15, 511, 512, 513, 1031, 40000):
        ts = []
        for _ in range(3):
            t = torch.randn(n, generator=gen).mul(100).to(torch.float16)
            pick = torch.randint(0, 4, (n,), generator=gen) == 0
            idx = torch.randint(0, len(specials), (n,), generator=gen)
            ts.append(torch.where(pick, specials[idx], t))
        for weights in ([1.0], [0.3, -1.7], [2.0, 0.5, -0.25]):
            got = weighted_sum(ts[: len(weights)], weights, out_dtype=out_dtype)
            want = weighted_sum_ref(ts[: len(weights)], weights, out_dtype)
            same_bits_or_both_nan(got, want)
            if out_dtype == torch.float16:  # NaNs too: the F16C path writes the software's NaN
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (n, weights)
