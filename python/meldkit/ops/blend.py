"""``blend``: ExDe's per-step parameter blend over every tensor of a model in one call.

``out = θ₀ + τ·(a + b·m₁ + c·m₂)`` per element, the two DARE masks regenerated from the seed
inside the kernel (never stored), 1-D tensors dense; semantics in :mod:`meldkit.ops.blend_ref`.

Two entry points:

* :class:`BlendPlan`: the tensors are validated and laid out once (their addresses, sizes and
  mask streams in a small ``[N, 8]`` table on their device); each call then blends with new
  coefficients, keep probabilities and seed in one native call (one kernel launch on CUDA),
  with no per-tensor work on the host. ExDe re-blends a denoiser's thousands of tensors at
  every schedule change: this is the form it uses.
* :func:`blend_tensors`: one blend, a plan made and used once.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch.autograd.graph import increment_version

from meldkit import _native
from meldkit.ops._checks import FLOAT_DTYPES
from meldkit.ops.blend_ref import blend_coefficients, blend_ref
from meldkit.ops.merge_ref import stream_of

_OP = "blend"
_ROLES = ("outs", "bases", "taus")
# increment_version takes a list of tensors from torch 2.5 on, a single tensor before.
_BUMP_TAKES_A_LIST = torch.__version__ >= "2.5"


def _error(kind: type[Exception], arg: str, message: str) -> Exception:
    return kind(f"meldkit.blend_tensors: argument '{arg}': {message}")


def _real(name: str, value: object, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _error(TypeError, name, f"expected a float, got {type(value).__name__}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise _error(ValueError, name, f"must be finite, got {v}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise _error(ValueError, name, f"{v} is not in [{low}, {high}]")
    return v


def _call_args(
    coeffs: tuple[float, float, float], keep: tuple[float, float], seed: object
) -> tuple[tuple[float, float, float], tuple[float, float], int, list[float], float]:
    """A blend's ``(a, b, c)`` and ``(keep1, keep2)`` as floats, ``seed`` (any integral
    number, bool excluded) as an int, and the kernels' coefficient table and dense ``g``
    (:func:`blend_coefficients`), checked finite."""
    for name, value, size, what in (
        ("coeffs", coeffs, 3, "(a, b, c)"),
        ("keep", keep, 2, "(k1, k2)"),
    ):
        if not isinstance(value, (tuple, list)) or len(value) != size:
            raise _error(ValueError, name, f"expected {what}, got {value!r}")
    abc = tuple(_real(f"coeffs[{i}]", v) for i, v in enumerate(coeffs))
    keeps = tuple(_real(f"keep[{i}]", v, 0.0, 1.0) for i, v in enumerate(keep))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise _error(TypeError, "seed", f"expected an int, got {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise _error(ValueError, "seed", f"must be an int in [0, 2**64), got {seed!r}")
    table, dense = blend_coefficients(*abc, *keeps)
    if not all(math.isfinite(g) for g in (*table, dense)):
        raise _error(
            ValueError, "coeffs", f"{coeffs!r}: a + b + c overflows float32, where the blend runs"
        )
    return abc, keeps, int(seed), table, dense


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_tensors(
    outs: list[torch.Tensor],
    bases: list[torch.Tensor],
    taus: list[torch.Tensor],
    overlaps: bool = True,
) -> None:
    """The checks of the native ``blend_plan`` (bindings/blend.cpp), with its messages, made
    here for every path (the reference fallback included): one float dtype and device for all,
    each output and task vector like its base, no output whose elements share memory, and no
    output overlapping memory another tensor of the plan uses (``overlaps``: the native
    ``blend_plan`` sweeps them itself, with the same messages)."""
    for name, ts in (("bases", bases), ("taus", taus), ("outs", outs)):
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor):
                raise _error(TypeError, f"{name}[{i}]", f"expected a tensor, got {type(t)}")
            if t.layout != torch.strided:
                raise _error(
                    TypeError,
                    f"{name}[{i}]",
                    f"layout {t.layout} is not supported (dense tensors only: call .to_dense())",
                )
    first = bases[0]
    for i, (o, b, t) in enumerate(zip(outs, bases, taus, strict=True)):
        if b.device != first.device:
            raise _error(
                TypeError, f"bases[{i}]", f"is on {b.device} but 'bases[0]' is on {first.device}"
            )
        if b.dtype not in FLOAT_DTYPES:
            raise _error(
                TypeError,
                f"bases[{i}]",
                f"dtype {_dtype_name(b.dtype)} is not supported "
                "(float32, bfloat16, float16 or float64)",
            )
        if b.dtype != first.dtype:
            raise _error(
                TypeError,
                f"bases[{i}]",
                f"dtype {_dtype_name(b.dtype)} differs from 'bases[0]' {_dtype_name(first.dtype)}",
            )
        for name, x in (("taus", t), ("outs", o)):
            if x.device != b.device:
                raise _error(
                    TypeError, f"{name}[{i}]", f"is on {x.device} but 'bases[{i}]' is on {b.device}"
                )
            if x.shape != b.shape:
                raise _error(
                    ValueError,
                    f"{name}[{i}]",
                    f"shape {list(x.shape)} does not match 'bases[{i}]' {list(b.shape)}",
                )
            if x.dtype != b.dtype:
                raise _error(
                    TypeError,
                    f"{name}[{i}]",
                    f"dtype {_dtype_name(x.dtype)} differs from 'bases[{i}]' "
                    f"{_dtype_name(b.dtype)}",
                )
        if any(st == 0 and n > 1 for st, n in zip(o.stride(), o.shape, strict=True)):
            raise _error(
                ValueError,
                f"outs[{i}]",
                "several of its elements share memory (an expanded view, stride 0)",
            )
    if overlaps and first.device.type != "meta":  # meta tensors have no memory
        _check_overlaps(outs, bases, taus)


def _check_overlaps(
    outs: list[torch.Tensor], bases: list[torch.Tensor], taus: list[torch.Tensor]
) -> None:
    """Refuses an output that overlaps memory any other tensor of the plan uses: another
    output, any task vector, or a base other than exactly its own (an output may be its own
    base: in place). Bases and task vectors may overlap each other (tied weights are read
    twice). Non-contiguous tensors are blended through a contiguous copy, so only contiguous
    ones are compared: a sweep over their byte ranges sorted by address, as in
    bindings/blend.cpp."""
    spans = []
    for role, ts in enumerate((outs, bases, taus)):
        for i, t in enumerate(ts):
            if t.numel() and t.is_contiguous():
                begin = t.data_ptr()
                spans.append((begin, begin + t.numel() * t.element_size(), i, role))
    spans.sort()
    open_spans: list[tuple[int, int, int, int]] = []
    for span in spans:
        open_spans = [s for s in open_spans if s[1] > span[0]]
        for s in open_spans:
            if s[3] != 0 and span[3] != 0:
                continue
            out, other = (s, span) if s[3] == 0 else (span, s)
            if other[3] == 1 and other[2] == out[2] and other[:2] == out[:2]:
                continue  # in place: an output that is exactly its own base
            if other[3] == 2 and other[2] == out[2]:
                raise _error(
                    ValueError,
                    f"outs[{out[2]}]",
                    f"may not be the task vector 'taus[{out[2]}]' (nor overlap it)",
                )
            raise _error(
                ValueError,
                f"outs[{out[2]}]",
                f"overlaps '{_ROLES[other[3]]}[{other[2]}]'; an out may be exactly its own base "
                "(in place) or separate memory",
            )
        open_spans.append(span)


_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


def _layout(tensors: list[torch.Tensor]) -> tuple[list, list, list, list]:
    """What a plan's table assumes of the tensors it reads and writes: their addresses, shapes,
    contiguity and dtypes, one list each (a map per attribute: the cheapest way to read 4
    attributes of a thousand tensors). Devices need no check: a plan holds the storage of each
    tensor it reads or writes through an address (:class:`BlendPlan`), so a tensor at the same
    address is on the same device; non-contiguous outputs are written with ``copy_``."""
    return (
        list(map(_DATA_PTR, tensors)),
        list(map(_SHAPE, tensors)),
        list(map(_IS_CONTIGUOUS, tensors)),
        list(map(_DTYPE, tensors)),
    )


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    """Tells autograd that ``tensors`` were written in place (the kernel writes through their
    addresses, which autograd does not see): a graph that saved one of them then raises its
    "modified by an inplace operation" error in backward instead of using the new values."""
    if _BUMP_TAKES_A_LIST:
        increment_version(tensors)
    else:
        for t in tensors:
            increment_version(t)


class BlendPlan:
    """A blend over a fixed set of tensors, prepared once and run many times.

    Each call writes ``bases[i] + taus[i]·g`` into ``outs[i]`` for every tensor, with
    ``g = a + b·m₁ + c·m₂`` and the two DARE keep masks regenerated from the seed.

    Parameters
    ----------
    outs : sequence of Tensor
        Written in place at each call (e.g. a model's parameters; ones that require grad are
        written through ``.detach()``, and their autograd version counters are bumped as by any
        in-place op); each like its base (shape, dtype, device).
    bases, taus : sequence of Tensor
        θ₀ and τ = θ_ft − θ₀ of each tensor; one float dtype (float32, bfloat16, float16;
        float64 through the reference) and device for all. The plan reads them at every call
        (it keeps references: in-place changes are seen); non-contiguous ones are copied once,
        here.
    tensor_keys : sequence of int
        Each tensor's key (``meldkit.merging.engine.tensor_key(name)``: the CRC-32 of its name), so
        the masks do not depend on the order of the tensors.
    dense : sequence of bool, optional
        Tensors that are never masked (g = a + b·k₁ + c·k₂); default: the 1-D ones.

    Raises
    ------
    TypeError, ValueError
        Mismatched lists, shapes, dtypes or devices, an output that overlaps another tensor
        (other than exactly its own base); at a call, non-finite coefficients, a keep outside
        [0, 1], a bad seed, or an output, base or task vector whose storage moved or whose
        shape, strides or dtype changed since the plan was made (``param.data = …``,
        ``model.to(…)``, ``resize_``): make a new plan then.

    Notes
    -----
    The plan keeps the addresses of the tensors it reads and writes. Each call first compares
    the address, shape, contiguity and dtype of every output, and of every base and task
    vector it reads in place, with their values when the plan was made (a few attribute reads
    per tensor, no device work), so a moved or resized tensor is refused, never read or
    written where it was.
    """

    def __init__(
        self,
        outs: Sequence[torch.Tensor],
        bases: Sequence[torch.Tensor],
        taus: Sequence[torch.Tensor],
        *,
        tensor_keys: Sequence[int],
        dense: Sequence[bool] | None = None,
    ) -> None:
        outs, bases, taus = list(outs), list(bases), list(taus)
        if not bases:
            raise _error(ValueError, "bases", "is empty")
        if not len(outs) == len(bases) == len(taus):
            raise _error(ValueError, "outs", "outs, bases and taus must have the same length")
        if isinstance(tensor_keys, torch.Tensor) or not isinstance(tensor_keys, Sequence):
            raise _error(TypeError, "tensor_keys", f"expected a list of ints, got {tensor_keys!r}")
        if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in tensor_keys):
            raise _error(TypeError, "tensor_keys", f"expected ints, got {list(tensor_keys)!r}")
        keys = [int(k) for k in tensor_keys]
        if len(keys) != len(bases) or any(not 0 <= k < 2**32 for k in keys):
            raise _error(ValueError, "tensor_keys", "needs one key in [0, 2**32) per tensor")
        first = bases[0]
        native = isinstance(first, torch.Tensor) and not _native.unavailable(
            _OP, first.device, (first.dtype,)
        )
        _check_tensors(outs, bases, taus, overlaps=not native)
        flags = [t.dim() <= 1 for t in bases] if dense is None else [bool(d) for d in dense]
        if len(flags) != len(bases):
            raise _error(ValueError, "dense", "needs one flag per tensor")
        self.device, self.dtype = bases[0].device, bases[0].dtype
        self.num_tensors = len(bases)
        self._outs, self._keys, self._flags = outs, keys, flags
        # What each call checks (see _check_layout): every output, and the bases and task
        # vectors read in place (the others are read through the copies made here, which
        # nothing else can reach). An output that is its own base is checked once.
        watched = [(f"outs[{i}]", o) for i, o in enumerate(outs)]
        for name, ts in (("bases", bases), ("taus", taus)):
            watched += [
                (f"{name}[{i}]", t)
                for i, t in enumerate(ts)
                if t.is_contiguous() and t is not outs[i]
            ]
        self._watched_names = [name for name, _ in watched]
        self._watched = [t for _, t in watched]
        self._layout = _layout(self._watched)
        self._versioned = [o for o in outs if not o.is_inference()]
        # Contiguous ones are aliases (.detach() shares their storage): the plan holds that
        # storage, so the memory at a checked address cannot be handed to another tensor.
        self._bases = [t.detach().contiguous() for t in bases]
        self._taus = [t.detach().contiguous() for t in taus]
        reasons = _native.unavailable(_OP, self.device, (self.dtype,))
        self._native = not reasons
        if reasons:
            _native.warn_fallback(_OP, self.device, (self.dtype,), reasons)
            self._targets = [o.detach() for o in outs]  # held, as on the native path
            return
        # Non-contiguous outputs are blended into a contiguous temporary, then copied.
        self._targets = [
            o.detach()
            if o.is_contiguous()
            else torch.empty_like(o, memory_format=torch.contiguous_format)
            for o in outs
        ]
        rows, self._num_chunks = _native._C.blend_plan(
            self._targets,
            self._bases,
            self._taus,
            flags,
            [stream_of(k, 2, 0) for k in keys],
            [stream_of(k, 2, 1) for k in keys],
        )
        table = torch.tensor(rows, dtype=torch.int64).view(len(bases), 8)
        self._table = table.to(self.device)
        # Every tensor the kernel reads or writes: a run on a stream other than the one the
        # plan was made on marks them used there (record_stream, once per stream), so that
        # dropping the plan (its table, contiguous copies and temporaries) right after such a
        # run cannot hand their memory to the caching allocator before the kernel is done.
        self._used = [self._table, *self._targets, *self._bases, *self._taus]
        self._streams = {_stream_key(self.device)}
        self._copies = [
            (t, o) for t, o in zip(self._targets, outs, strict=True) if not o.is_contiguous()
        ]
        # The table and the contiguous copies are written on the stream current now: the first
        # run on another stream waits for them there (ordering; record_stream only guards the
        # memory's reuse).
        self._ready = None
        if self.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(self.device))

    def _check_layout(self) -> None:
        """Refuses a call when a tensor the plan reads or writes moved or changed shape,
        contiguity or dtype since the plan was made (its table would point at freed or
        too-small memory): one comparison of four lists when nothing changed."""
        now = _layout(self._watched)
        if now == self._layout:
            return
        was = list(zip(*self._layout, strict=True))
        i = next(i for i, w in enumerate(zip(*now, strict=True)) if w != was[i])
        name = self._watched_names[i]
        (ptr, shape, contiguous, dtype), (ptr2, shape2, _, dtype2) = was[i], [x[i] for x in now]
        if ptr != ptr2:
            what = "its storage moved"
        elif shape != shape2:
            what = f"its shape changed from {list(shape)} to {list(shape2)}"
        elif dtype != dtype2:
            what = f"its dtype changed from {_dtype_name(dtype)} to {_dtype_name(dtype2)}"
        else:
            what = "it is no longer contiguous" if contiguous else "it became contiguous"
        raise _error(
            ValueError,
            name,
            f"{what} since the BlendPlan was made (param.data = …, model.to(…), resize_?): "
            "make a new plan",
        )

    def __call__(
        self,
        coeffs: tuple[float, float, float],
        *,
        keep: tuple[float, float] = (1.0, 1.0),
        seed: int = 0,
    ) -> None:
        """Blend with ``coeffs = (a, b, c)``, keep probabilities ``keep = (k₁, k₂)`` (DARE's
        1 − p, in [0, 1]) and the masks' ``seed`` (an integer, 0 ≤ seed < 2⁶⁴)."""
        (a, b, c), (k1, k2), seed, table, g_dense = _call_args(coeffs, keep, seed)
        self._check_layout()
        if not self._native:
            for i, (o, bt, tt) in enumerate(zip(self._outs, self._bases, self._taus, strict=True)):
                with torch.no_grad():
                    o.copy_(
                        blend_ref(
                            bt,
                            tt,
                            (a, b, c),
                            keep=(k1, k2),
                            seed=seed,
                            tensor_key=self._keys[i],
                            dense=self._flags[i],
                        )
                    )
            return
        if self.device.type == "cuda":
            key = _stream_key(self.device)
            if key not in self._streams:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(self._ready)
                for t in self._used:
                    t.record_stream(stream)
                self._streams.add(key)
        _native._C.blend_run(
            self._table,
            self._num_chunks,
            self._bases[0],
            table,
            g_dense,
            k1,
            k2,
            _differ(table[1], table[0]) or _differ(table[3], table[2]),  # mask 1 matters
            _differ(table[2], table[0]) or _differ(table[3], table[1]),  # mask 2 matters
            seed,
            _native.stream_of(self.device),
        )
        for t, o in self._copies:
            with torch.no_grad():
                o.copy_(t)
        _bump_versions(self._versioned)


def _differ(x: float, y: float) -> bool:
    """Whether two coefficients give different bits: -0.0 and +0.0 differ (a product with one
    or the other can decide the sign of a zero output), which ``x != y`` would miss."""
    return x != y or math.copysign(1.0, x) != math.copysign(1.0, y)


def _stream_key(device: torch.device) -> int | None:
    """The current stream of ``device`` (CUDA) as a hashable key; None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def blend_tensors(
    outs: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    taus: Sequence[torch.Tensor],
    coeffs: tuple[float, float, float],
    *,
    keep: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
    tensor_keys: Sequence[int],
    dense: Sequence[bool] | None = None,
) -> None:
    """Write ``bases[i] + taus[i]·g`` into ``outs[i]`` for every tensor, in one native call.

    A :class:`BlendPlan` made and run once; to blend the same tensors again with other
    coefficients, make the plan yourself and call it (no per-tensor host work per call).

    Parameters
    ----------
    outs : sequence of Tensor
        Written in place (e.g. a model's parameters); each like its base (shape, dtype, device).
    bases, taus : sequence of Tensor
        θ₀ and τ = θ_ft − θ₀ of each tensor; one float dtype (float32, bfloat16, float16;
        float64 through the reference) and device for all.
    coeffs : (float, float, float)
        ``(a, b, c)``: g = a + b·m₁ + c·m₂.
    keep : (float, float)
        Keep probabilities of the masks m₁, m₂ (DARE's 1 − p), in [0, 1].
    seed : int
        Seed of the masks (any integral number, e.g. ``numpy.int64``), 0 ≤ seed < 2⁶⁴.
    tensor_keys : sequence of int
        Each tensor's key (``meldkit.merging.engine.tensor_key(name)``: the CRC-32 of its name), so
        the masks do not depend on the order of the tensors.
    dense : sequence of bool, optional
        Tensors that are never masked (g = a + b·k₁ + c·k₂); default: the 1-D ones.

    Raises
    ------
    TypeError, ValueError
        Mismatched lists, shapes, dtypes or devices, non-finite coefficients, a keep outside
        [0, 1], a bad seed, an output that overlaps another tensor (other than exactly its own
        base).
    """
    _call_args(coeffs, keep, seed)  # the call's own arguments first: fail before tensor work
    BlendPlan(outs, bases, taus, tensor_keys=tensor_keys, dense=dense)(coeffs, keep=keep, seed=seed)


__all__ = ["BlendPlan", "blend_tensors"]
