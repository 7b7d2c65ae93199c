"""How the bindings take tensors in: torch tensors through DLPack 1.3's C exchange table
(``__dlpack_c_exchange_api__``, no Python call per tensor), everything else, and any call whose
stream is not the producer's current one, through ``__dlpack__``. Both routes must give the same
view of the same memory."""

import numpy as np
import pytest
import torch

from meldkit import _native

_C = _native._C

HAS_TABLE = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")


def _calls_per_export() -> int:
    """``__dlpack__`` calls per tensor on the dunder route: the bindings ask for a versioned
    capsule (``max_version``) first and, from a producer that predates DLPack 1.0 (torch 2.4),
    take the legacy one on a second call."""
    try:
        torch.empty(1).__dlpack__(max_version=(1, 0))
    except TypeError:
        return 2
    return 1


PER_EXPORT = _calls_per_export()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _C.has_cuda() else [])


class CountingTensor(torch.Tensor):
    """A torch tensor that counts its ``__dlpack__`` calls (it keeps torch's exchange table)."""

    calls = 0

    def __dlpack__(self, *args, **kwargs):
        CountingTensor.calls += 1
        return super().__dlpack__(*args, **kwargs)


class NoTableTensor(CountingTensor):
    """A producer without the exchange table: only ``__dlpack__`` is left."""

    __dlpack_c_exchange_api__ = None


def _as(cls, t):
    return t.as_subclass(cls)


@pytest.fixture(autouse=True)
def _reset_counter():
    CountingTensor.calls = 0


def _weighted_sum(tensors, weights, out, stream=0):
    _C.weighted_sum(tensors, weights, out, None, stream)
    return out


@pytest.mark.skipif(not HAS_TABLE, reason="this torch has no DLPack C exchange table")
@pytest.mark.parametrize("device", DEVICES)
def test_torch_tensors_skip_dunder_dlpack(device):
    a, b = torch.randn(2, 5, 7, device=device).unbind(0)
    out = torch.empty(5, 7, device=device)
    stream = _native.stream_of(torch.device(device))
    _weighted_sum([_as(CountingTensor, a), _as(CountingTensor, b)], [2.0, -1.0], out, stream)
    assert CountingTensor.calls == 0
    torch.testing.assert_close(out, 2 * a - b, rtol=0, atol=1e-6)


def test_the_exchange_table_can_be_switched_off():
    # _C.set_dlpack_exchange(False) sends torch tensors through __dlpack__ (A/B timing, debugging).
    a = _as(CountingTensor, torch.randn(5))
    out = torch.empty(5)
    previous = _C.set_dlpack_exchange(False)
    try:
        _weighted_sum([a, a], [1.0, 1.0], out)
        assert CountingTensor.calls == 2 * PER_EXPORT
    finally:
        assert _C.set_dlpack_exchange(previous) is False
    CountingTensor.calls = 0
    _weighted_sum([a, a], [1.0, 1.0], out)
    assert CountingTensor.calls == (0 if HAS_TABLE else 2 * PER_EXPORT)
    torch.testing.assert_close(out, 2 * a.as_subclass(torch.Tensor))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_both_routes_see_the_same_memory(device, dtype):
    # Views with a storage offset, and an output that is a view too: the exchange table and
    # __dlpack__ must give the same data pointer, shape and strides.
    big = torch.randn(4, 9, 11, device=device).to(dtype)
    inputs = [big[1, 2:7], big[3, 4:9]]
    stream = _native.stream_of(torch.device(device))
    fast = _weighted_sum(inputs, [0.5, 1.5], torch.zeros(2, 5, 11, device=device, dtype=dtype)[1])
    slow_out = torch.zeros(2, 5, 11, device=device, dtype=dtype)
    slow = _weighted_sum(
        [_as(NoTableTensor, t) for t in inputs],
        [0.5, 1.5],
        _as(NoTableTensor, slow_out[1]),
        stream,
    )
    assert CountingTensor.calls == 3 * PER_EXPORT
    torch.testing.assert_close(slow.as_subclass(torch.Tensor), fast, rtol=0, atol=0)
    assert slow_out[0].abs().sum() == 0  # the neighbouring rows are untouched


@pytest.mark.parametrize("route", ["table", "dunder"])
def test_errors_name_the_argument_on_both_routes(route):
    wrap = (lambda t: t) if route == "table" else (lambda t: _as(NoTableTensor, t))
    a = wrap(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"weighted_sum: argument 'tensors\[1\]': must be contig"):
        _weighted_sum([a, wrap(torch.randn(4, 3).t())], [1.0, 1.0], torch.empty(3, 4))
    with pytest.raises(TypeError, match=r"argument 'tensors\[0\]': dtype int32 is not supported"):
        _weighted_sum([wrap(torch.ones(3, 4, dtype=torch.int32)), a], [1.0, 1.0], torch.empty(3, 4))


def test_a_tensor_the_table_cannot_view_falls_back_to_dunder():
    # Sparse tensors have no strided view: the table's call fails, __dlpack__ names the problem.
    sparse = torch.randn(3, 4).to_sparse()
    with pytest.raises(TypeError, match=r"weighted_sum: argument 'tensors\[0\]'"):
        _weighted_sum([sparse, torch.randn(3, 4)], [1.0, 1.0], torch.empty(3, 4))


def test_numpy_still_goes_through_dunder():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.empty((3, 4), dtype=np.float32)
    _weighted_sum([a, torch.ones(3, 4)], [2.0, 1.0], out)
    np.testing.assert_array_equal(out, 2 * a + 1)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")
def test_another_stream_than_the_current_one_goes_through_dunder():
    # On a side stream __dlpack__(stream) orders it after torch's current stream; the table would
    # not, so it is taken only when the call's stream is the current one.
    a, b = (_as(CountingTensor, torch.randn(1 << 20, device="cuda")) for _ in range(2))
    out = torch.empty(1 << 20, device="cuda")
    side = torch.cuda.Stream()
    _weighted_sum([a, b], [1.0, 1.0], _as(CountingTensor, out), side.cuda_stream)
    assert CountingTensor.calls == 3 * PER_EXPORT
    side.synchronize()
    torch.testing.assert_close(out, (a + b).as_subclass(torch.Tensor))
    CountingTensor.calls = 0
    with torch.cuda.stream(side):
        _weighted_sum([a, b], [1.0, 1.0], _as(CountingTensor, out), side.cuda_stream)
    assert CountingTensor.calls == (0 if HAS_TABLE else 3 * PER_EXPORT)
    side.synchronize()


class _FakeCudaTensor:
    """A CPU tensor that says, through ``__dlpack__``, that it lives on CUDA device 0 (the device
    field of torch's capsule is rewritten): what a CPU-only build must refuse, not read."""

    def __init__(self, t):
        self.t = t

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA

    def __dlpack__(self, stream=None, max_version=None):
        import ctypes

        cap = self.t.__dlpack__(max_version=(1, 0))
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        try:  # DLManagedTensorVersioned: version, manager_ctx, deleter, flags, then the DLTensor
            ptr, offset = get(cap, b"dltensor_versioned"), 32
        except ValueError:  # legacy DLManagedTensor: the DLTensor first
            ptr, offset = get(cap, b"dltensor"), 0
        ctypes.c_int32.from_address(ptr + offset + 8).value = 2  # dl_tensor.device.device_type
        return cap


@pytest.mark.skipif(_native.cuda_usable()[0], reason="needs a machine where CUDA cannot run")
def test_a_cuda_tensor_where_cuda_cannot_run_is_refused():
    """A CUDA tensor is refused with an exception where meldkit's CUDA kernels cannot run: a
    TypeError naming the argument on a build without CUDA, CUDA's own error on a build with
    CUDA but no GPU; never a silent return (the dropout-mask binding used to write nothing)."""
    src = _FakeCudaTensor(torch.ones(4, 8))
    out = _FakeCudaTensor(torch.zeros(4, 8))
    if _C.has_cuda():
        expected = (RuntimeError, "CUDA|cuda")
    else:
        expected = (TypeError, r"argument '(src|tensors)'.*without CUDA")
    with pytest.raises(expected[0], match=expected[1]):
        _C.routed_lora_dropout(src, out, 0.5, 0, 0, 0)
    assert torch.equal(out.t, torch.zeros(4, 8))
    with pytest.raises(expected[0], match=expected[1]):
        _C.weighted_sum([src], [1.0], out, None, 0)
    assert torch.equal(out.t, torch.zeros(4, 8))
