"""Argument checks shared by the public ops: clear exceptions that name the op and the argument,
raised before any dispatch so the reference and the native kernels fail the same way."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tensor_list(
    op: str,
    name: str,
    tensors: object,
    *,
    same_shape: bool = True,
    labels: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """``tensors`` as a non-empty list of floating tensors of one dtype and device (and one shape
    unless ``same_shape`` is False). Errors name element i ``name[i]``, or ``labels[i]`` when
    given (a list the caller assembled, such as ``[base, *models]``)."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(
            f"meldkit.{op}: argument '{name}': expected a list of tensors, "
            f"got {type(tensors).__name__}"
        )
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"meldkit.{op}: argument '{name}': is empty")
    first = tensors[0]

    def label(i: int) -> str:
        return labels[i] if labels is not None else f"{name}[{i}]"

    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"meldkit.{op}: argument '{label(i)}': expected a tensor, got {type(t).__name__}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"meldkit.{op}: argument '{label(i)}': dtype {t.dtype} is not supported "
                "(float32, bfloat16, float16 or float64)"
            )
        if t.layout != torch.strided:
            raise TypeError(
                f"meldkit.{op}: argument '{label(i)}': layout {t.layout} is not supported "
                "(dense tensors only: call .to_dense())"
            )
        if t.device != first.device:
            raise TypeError(
                f"meldkit.{op}: argument '{label(i)}': is on {t.device} but "
                f"'{label(0)}' is on {first.device}"
            )
        if same_shape and t.shape != first.shape:
            raise ValueError(
                f"meldkit.{op}: argument '{label(i)}': shape {list(t.shape)} does not match "
                f"'{label(0)}' {list(first.shape)}"
            )
        if t.dtype != first.dtype:
            raise TypeError(
                f"meldkit.{op}: argument '{label(i)}': dtype {t.dtype} differs from "
                f"'{label(0)}' {first.dtype}"
            )
    return tensors


def float_tensor(op: str, name: str, t: object, dim: int = -1) -> torch.Tensor:
    """``t`` as a floating tensor (float32, bfloat16, float16, float64) of ``dim`` dimensions
    (any when -1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"meldkit.{op}: argument '{name}': expected a tensor, got {type(t).__name__}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"meldkit.{op}: argument '{name}': dtype {t.dtype} is not supported "
            "(float32, bfloat16, float16 or float64)"
        )
    if t.layout != torch.strided:
        raise TypeError(
            f"meldkit.{op}: argument '{name}': layout {t.layout} is not supported "
            "(dense tensors only: call .to_dense())"
        )
    if dim >= 0 and t.dim() != dim:
        raise ValueError(
            f"meldkit.{op}: argument '{name}': expected {dim} dimensions, got shape {list(t.shape)}"
        )
    return t


def float_list(
    op: str, name: str, values: object, expected: int, of: str = "tensors"
) -> list[float]:
    """``values`` (a sequence of numbers or a 1-D tensor) as ``expected`` finite floats, one per
    ``of`` (named in the error)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(
                f"meldkit.{op}: argument '{name}': expected a 1-D tensor, got shape "
                f"{list(values.shape)}"
            )
        values = values.detach().cpu().tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(
            f"meldkit.{op}: argument '{name}': expected a sequence of floats, "
            f"got {type(values).__name__}"
        )
    if len(values) != expected:
        raise ValueError(
            f"meldkit.{op}: argument '{name}': has {len(values)} entries for {expected} {of}"
        )
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(
                f"meldkit.{op}: argument '{name}[{i}]': expected a float, got {type(v).__name__}"
            ) from None
        if not math.isfinite(f) or abs(f) > torch.finfo(torch.float32).max:
            raise ValueError(f"meldkit.{op}: argument '{name}[{i}]': must be finite, got {f}")
        out.append(f)
    return out


def out_tensor(op: str, out: object, like: torch.Tensor) -> torch.Tensor:
    """``out`` checked against the tensor whose shape and device it must have."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"meldkit.{op}: argument 'out': expected a tensor, got {type(out).__name__}"
        )
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"meldkit.{op}: argument 'out': dtype {out.dtype} is not supported")
    if out.device != like.device:
        raise TypeError(
            f"meldkit.{op}: argument 'out': is on {out.device} but the inputs are on {like.device}"
        )
    if out.shape != like.shape:
        raise ValueError(
            f"meldkit.{op}: argument 'out': shape {list(out.shape)} does not match the inputs' "
            f"{list(like.shape)}"
        )
    if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape, strict=True)):
        raise ValueError(
            f"meldkit.{op}: argument 'out': several of its elements share memory (an expanded "
            "view, stride 0); write into a tensor of its own"
        )
    return out
