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
from collections.abc import Sequence

import torch

from meldkit import _native
from meldkit.ops.blend_ref import blend_coefficients, blend_ref
from meldkit.ops.merge_ref import stream_of

_OP = "blend"


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
) -> tuple[tuple[float, float, float], tuple[float, float], list[float], float]:
    """A blend's ``(a, b, c)`` and ``(keep1, keep2)`` as floats, checked with ``seed``, and
    the kernels' coefficient table and dense ``g`` (:func:`blend_coefficients`), checked finite."""
    for name, value, size, what in (
        ("coeffs", coeffs, 3, "(a, b, c)"),
        ("keep", keep, 2, "(k1, k2)"),
    ):
        if not isinstance(value, (tuple, list)) or len(value) != size:
            raise _error(ValueError, name, f"expected {what}, got {value!r}")
    abc = tuple(_real(f"coeffs[{i}]", v) for i, v in enumerate(coeffs))
    keeps = tuple(_real(f"keep[{i}]", v, 0.0, 1.0) for i, v in enumerate(keep))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise _error(ValueError, "seed", f"must be an int in [0, 2**64), got {seed!r}")
    table, dense = blend_coefficients(*abc, *keeps)
    if not all(math.isfinite(g) for g in (*table, dense)):
        raise _error(
            ValueError, "coeffs", f"{coeffs!r}: a + b + c overflows float32, where the blend runs"
        )
    return abc, keeps, table, dense


class BlendPlan:
    """A blend over a fixed set of tensors, prepared once and run many times.

    Each call writes ``bases[i] + taus[i]·g`` into ``outs[i]`` for every tensor, with
    ``g = a + b·m₁ + c·m₂`` and the two DARE keep masks regenerated from the seed.

    Parameters
    ----------
    outs : sequence of Tensor
        Written in place at each call (e.g. a model's parameters; ones that require grad are
        written through ``.detach()``); each like its base (shape, dtype, device).
    bases, taus : sequence of Tensor
        θ₀ and τ = θ_ft − θ₀ of each tensor; one float dtype (float32, bfloat16, float16) and
        device for all. The plan reads them at every call (it keeps references: in-place
        changes are seen); non-contiguous ones are copied once, here.
    tensor_keys : sequence of int
        Each tensor's key (``meldkit.merging.engine.tensor_key(name)``: the CRC-32 of its name), so
        the masks do not depend on the order of the tensors.
    dense : sequence of bool, optional
        Tensors that are never masked (g = a + b·k₁ + c·k₂); default: the 1-D ones.

    Raises
    ------
    TypeError, ValueError
        Mismatched lists, shapes, dtypes or devices, an output that is one of the task vectors;
        at a call, non-finite coefficients, a keep outside [0, 1], a bad seed, or an output
        whose storage moved since the plan was made (``param.data = …``, ``model.to(…)``):
        make a new plan then.
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
        for name, ts in (("bases", bases), ("taus", taus), ("outs", outs)):
            for i, t in enumerate(ts):
                if not isinstance(t, torch.Tensor):
                    raise _error(TypeError, f"{name}[{i}]", f"expected a tensor, got {type(t)}")
        for i, o in enumerate(outs):
            if any(st == 0 and n > 1 for st, n in zip(o.stride(), o.shape, strict=True)):
                raise _error(
                    ValueError,
                    f"outs[{i}]",
                    "several of its elements share memory (an expanded view, stride 0)",
                )
        flags = [t.dim() <= 1 for t in bases] if dense is None else [bool(d) for d in dense]
        if len(flags) != len(bases):
            raise _error(ValueError, "dense", "needs one flag per tensor")
        self.device, self.dtype = bases[0].device, bases[0].dtype
        self.num_tensors = len(bases)
        self._outs, self._keys, self._flags = outs, keys, flags
        self._out_ptrs = [o.data_ptr() for o in outs]
        reasons = _native.unavailable(_OP, self.device, (self.dtype,))
        self._native = not reasons
        if reasons:
            _native.warn_fallback(_OP, self.device, (self.dtype,), reasons)
            for i, (o, bt, tt) in enumerate(zip(outs, bases, taus, strict=True)):
                if bt.shape != tt.shape or bt.shape != o.shape:
                    raise _error(ValueError, f"taus[{i}]", "shape differs from its base or output")
            self._bases, self._taus = bases, taus
            return
        # Non-contiguous outputs are blended into a contiguous temporary, then copied.
        self._targets = [
            o.detach()
            if o.is_contiguous()
            else torch.empty_like(o, memory_format=torch.contiguous_format)
            for o in outs
        ]
        self._bases = [t.detach().contiguous() for t in bases]
        self._taus = [t.detach().contiguous() for t in taus]
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

    def _check_outs(self) -> None:
        ptrs = [o.data_ptr() for o in self._outs]
        if ptrs != self._out_ptrs:
            i = next(i for i, (a, b) in enumerate(zip(ptrs, self._out_ptrs, strict=True)) if a != b)
            raise _error(
                ValueError,
                f"outs[{i}]",
                "its storage moved since the BlendPlan was made (param.data = …, model.to(…)?): "
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
        1 − p, in [0, 1]) and the masks' ``seed`` (0 ≤ seed < 2⁶⁴)."""
        (a, b, c), (k1, k2), table, g_dense = _call_args(coeffs, keep, seed)
        self._check_outs()
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
            table[1] != table[0] or table[3] != table[2],
            table[2] != table[0] or table[3] != table[1],
            seed,
            _native.stream_of(self.device),
        )
        for t, o in self._copies:
            with torch.no_grad():
                o.copy_(t)


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
        θ₀ and τ = θ_ft − θ₀ of each tensor; one float dtype (float32, bfloat16, float16) and
        device for all.
    coeffs : (float, float, float)
        ``(a, b, c)``: g = a + b·m₁ + c·m₂.
    keep : (float, float)
        Keep probabilities of the masks m₁, m₂ (DARE's 1 − p), in [0, 1].
    seed : int
        Seed of the masks, 0 ≤ seed < 2⁶⁴.
    tensor_keys : sequence of int
        Each tensor's key (``meldkit.merging.engine.tensor_key(name)``: the CRC-32 of its name), so
        the masks do not depend on the order of the tensors.
    dense : sequence of bool, optional
        Tensors that are never masked (g = a + b·k₁ + c·k₂); default: the 1-D ones.

    Raises
    ------
    TypeError, ValueError
        Mismatched lists, shapes, dtypes or devices, non-finite coefficients, a keep outside
        [0, 1], an output that is one of the task vectors.
    """
    _call_args(coeffs, keep, seed)  # the call's own arguments first: fail before tensor work
    BlendPlan(outs, bases, taus, tensor_keys=tensor_keys, dense=dense)(coeffs, keep=keep, seed=seed)


__all__ = ["BlendPlan", "blend_tensors"]
