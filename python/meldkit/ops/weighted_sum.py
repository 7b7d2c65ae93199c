"""``weighted_sum``: the pilot op, through every layer.

``meldkit::weighted_sum`` and ``meldkit::weighted_sum_out`` are torch.library custom ops. Their
default implementation (any device) is the reference in :mod:`weighted_sum_ref`; the CPU and
CUDA implementations call ``meldkit._C`` and fall back to the reference, with a warning naming the
reason, when the native kernel cannot run (see :mod:`meldkit._native`). A fake kernel makes both
ops traceable by ``torch.compile``; autograd is registered on the functional op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meldkit import _native
from meldkit._memory import prefault
from meldkit.ops import _checks
from meldkit.ops._library import custom_op
from meldkit.ops.weighted_sum_ref import weighted_sum_ref

_OP = "weighted_sum"


def _use_reference(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> bool:
    """True when the native kernel cannot run (after warning why, once)."""
    reasons = _native.unavailable(_OP, device, dtypes)
    if reasons:
        _native.warn_fallback(_OP, device, dtypes, reasons)
    return bool(reasons)


def _launch(tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor) -> None:
    """Writes ``Σ w_i t_i`` into ``out`` with the native kernel."""
    target = (
        out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    )
    inputs = [t.detach().contiguous() for t in tensors]
    ws_numel = _native._C.weighted_sum_workspace_numel(len(inputs), out.numel(), out.device.type)
    workspace = torch.empty(ws_numel, dtype=torch.float32, device=out.device) if ws_numel else None
    _native._C.weighted_sum(
        inputs, weights, target.detach(), workspace, _native.stream_of(out.device)
    )
    if target is not out:
        out.copy_(target)


# ---- functional op -------------------------------------------------------------------------


@custom_op(
    "meldkit::weighted_sum",
    schema="(Tensor[] tensors, float[] weights, ScalarType? out_dtype) -> Tensor",
)
def _weighted_sum(
    tensors: list[torch.Tensor], weights: list[float], out_dtype: torch.dtype | None
) -> torch.Tensor:
    return weighted_sum_ref(tensors, weights, out_dtype)


@_weighted_sum.register_kernel(["cpu", "cuda"])
def _weighted_sum_native(
    tensors: list[torch.Tensor], weights: list[float], out_dtype: torch.dtype | None
) -> torch.Tensor:
    out_dtype = out_dtype or tensors[0].dtype
    if _use_reference(tensors[0].device, (tensors[0].dtype, out_dtype)):
        return weighted_sum_ref(tensors, weights, out_dtype)
    out = prefault(torch.empty(tensors[0].shape, dtype=out_dtype, device=tensors[0].device))
    _launch(tensors, weights, out)
    return out


@_weighted_sum.register_fake
def _weighted_sum_fake(
    tensors: list[torch.Tensor], weights: list[float], out_dtype: torch.dtype | None
) -> torch.Tensor:
    torch._check(len(tensors) > 0, lambda: "meldkit.weighted_sum: argument 'tensors': is empty")
    return tensors[0].new_empty(tensors[0].shape, dtype=out_dtype or tensors[0].dtype)


def _setup_context(ctx, inputs, output) -> None:
    tensors, weights, _ = inputs
    ctx.weights = weights
    ctx.dtypes = [t.dtype for t in tensors]


def _backward(ctx, grad: torch.Tensor):
    # d out / d t_i = w_i: the gradient of each input is the output gradient scaled by its weight.
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return [grad.mul(w).to(dt) for w, dt in zip(ctx.weights, ctx.dtypes, strict=True)], None, None


_weighted_sum.register_autograd(_backward, setup_context=_setup_context)


# ---- out= op -------------------------------------------------------------------------------


@custom_op(
    "meldkit::weighted_sum_out",
    schema="(Tensor[] tensors, float[] weights, Tensor(a2!) out) -> ()",
    mutates_args=("out",),
)
def _weighted_sum_out(tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor) -> None:
    out.copy_(weighted_sum_ref(tensors, weights, out.dtype))


@_weighted_sum_out.register_kernel(["cpu", "cuda"])
def _weighted_sum_out_native(
    tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor
) -> None:
    if _use_reference(out.device, (tensors[0].dtype, out.dtype)):
        out.copy_(weighted_sum_ref(tensors, weights, out.dtype))
    else:
        _launch(tensors, weights, out)


@_weighted_sum_out.register_fake
def _weighted_sum_out_fake(
    tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor
) -> None:
    return None


# ---- public API ----------------------------------------------------------------------------


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted sum of N same-shape tensors: ``out = Σ_i weights[i] · tensors[i]``.

    The core of linear merging and task arithmetic. One pass over memory: every input is read
    once and the output written once, with float32 accumulation whatever the storage dtype
    (float64 for float64 inputs).

    Parameters
    ----------
    tensors : sequence of Tensor
        N ≥ 1 tensors, all of one shape ``[...]``, one dtype (float32, bfloat16, float16; float64
        runs natively on the CPU) and one device. Strided inputs are accepted (copied to
        contiguous memory first).
    weights : sequence of float or 1-D Tensor
        N finite weights, used in float32. A CUDA tensor here costs a device synchronisation.
        A tensor that requires grad receives its gradient (learned merge coefficients).
    out : Tensor, optional
        Where to write the result: shape ``[...]``, same device, any supported dtype. It may be
        one of ``tensors`` (in-place update). ``out=`` does not record autograd history.
    out_dtype : torch.dtype, optional
        Dtype of the returned tensor when ``out`` is not given; defaults to the inputs' dtype.

    Returns
    -------
    Tensor
        ``out`` if given, else a new contiguous tensor of shape ``[...]``.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, naming it (empty list, mismatched shapes/dtypes/devices, a
        non-finite weight, wrong number of weights).

    Notes
    -----
    Gradients flow to every input: ``∂out/∂tensors[i] = weights[i]``, and to ``weights`` when it
    is a tensor that requires grad: ``∂L/∂weights[i] = Σ ∂L/∂out · tensors[i]``. That case runs
    in PyTorch ops with the kernels' arithmetic (same values; autograd then keeps a float32 copy
    of 16-bit inputs for the backward). The CUDA kernel reads up to 32 inputs per launch; more
    inputs carry the running sum in a float32 workspace, so the result is rounded to the output
    dtype once.
    """
    tensors = _checks.tensor_list(_OP, "tensors", tensors)
    trainable = (
        isinstance(weights, torch.Tensor) and weights.requires_grad and torch.is_grad_enabled()
    )
    values = _checks.float_list(_OP, "weights", weights, len(tensors))
    if out is None:
        if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"meldkit.{_OP}: argument 'out_dtype': {out_dtype} is not supported")
        if trainable:
            # the reference's arithmetic is the kernels' (same values), and differentiable
            return weighted_sum_ref(tensors, weights, out_dtype)
        return _weighted_sum(tensors, values, out_dtype)
    _checks.out_tensor(_OP, out, tensors[0])
    if out_dtype is not None and out_dtype != out.dtype:
        raise ValueError(
            f"meldkit.{_OP}: argument 'out_dtype': {out_dtype} conflicts with out.dtype {out.dtype}"
        )
    if trainable or (torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, out))):
        raise RuntimeError(
            f"meldkit.{_OP}: out= does not support autograd; call without out= "
            "or under torch.no_grad()"
        )
    _weighted_sum_out(tensors, values, out)
    return out
