"""Pure-PyTorch reference of :func:`meldkit.ops.weighted_sum`: the executable spec."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_sum_ref(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``Σ_i weights[i] · tensors[i]``, accumulated left to right.

    The accumulator is float32 (float64 when the inputs are float64); each weight is rounded to
    float32 first, as the kernels receive it. Each product and each sum is rounded on its own (no
    fused multiply-add), which is exactly what the native kernels do, so for float32
    accumulation the kernels reproduce this function bit for bit.

    Parameters
    ----------
    tensors : sequence of Tensor
        N ≥ 1 tensors of one shape, dtype (float32, bfloat16, float16 or float64) and device.
    weights : sequence of float, or 1-D Tensor
        N weights. A tensor stays in the autograd graph: weights that require grad get
        ``∂L/∂w_i = <∂L/∂out, t_i>``.
    out_dtype : torch.dtype, optional
        Dtype of the result; defaults to the inputs' dtype.

    Returns
    -------
    Tensor
        Same shape and device as the inputs, dtype ``out_dtype``, contiguous.
    """
    acc_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    if isinstance(weights, torch.Tensor):
        ws = weights.to(tensors[0].device, torch.float32).to(acc_dtype).unbind(0)
    else:
        ws = [float(torch.tensor(w, dtype=torch.float32)) for w in weights]
    acc = None
    for t, w in zip(tensors, ws, strict=True):
        term = t.to(acc_dtype) * w
        acc = term if acc is None else acc + term
    return acc.to(out_dtype or tensors[0].dtype).contiguous()
