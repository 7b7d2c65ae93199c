"""Benchmark cases for ``meldkit.ops.weighted_sum``: ``out = Σ_i w_i · t_i`` over N tensors.

The op is memory-bound: a perfect implementation reads each of the N inputs once and writes the
output once, so a case's ``bytes_moved`` is ``(N + 1) · numel · itemsize`` and its achieved GB/s is
compared with the device's copy bandwidth.

Implementations timed in every case
-----------------------------------
``meldkit``
    ``meldkit.ops.weighted_sum(tensors, weights)`` (native kernel, or the reference when forced by
    ``MELDKIT_BACKEND=reference`` or when the native path is missing).
``stack_mul_sum``
    ``torch.stack(ts).mul(w.view(-1, 1, ..., 1)).sum(0)``, the expression users write, with ``w`` a
    tensor of the inputs' dtype on their device. It materialises the stack and the products: about
    five passes over the inputs' bytes.
``add_loop``
    ``out = ts[0] * w0`` then ``out.add_(t, alpha=w)`` for the rest: the in-place loop of merging
    scripts, re-reading and re-writing ``out`` N - 1 times.
``meldkit_ref``
    ``meldkit.ops.weighted_sum_ref``, the pure-PyTorch reference (fp32 accumulation).
"""

from __future__ import annotations

import functools
import math

import torch

from meldkit.bench import DTYPES, OURS, REFERENCE, Case, Impl

OP = "weighted_sum"

QUICK_CONFIGS: tuple[tuple[int, tuple[int, ...]], ...] = ((4, (1024, 1024)),)
"""(N, shape) of the quick set: 1M elements, seconds on two CPU cores."""

QUICK_DTYPES = (torch.float32, torch.bfloat16)

FULL_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {
    # A square projection and a Llama-3-8B MLP matrix (hidden 4096, intermediate 14336).
    "cuda": ((4096, 4096), (4096, 14336)),
    # The square matrix alone keeps the full CPU run within a few minutes on two cores.
    "cpu": ((4096, 4096),),
}
FULL_N = (2, 8)
FULL_DTYPES = tuple(DTYPES.values())


def cases(device: str, quick: bool) -> list[Case]:
    """Cases of ``weighted_sum`` on ``device``: the quick set, or the full set.

    Parameters
    ----------
    device : str
        ``"cpu"`` or ``"cuda"``.
    quick : bool
        N=4 over 1024x1024 in fp32 and bf16 if True; else N in {2, 8}, the shapes of
        :data:`FULL_SHAPES` for the device, in fp32, bf16 and fp16, each both allocating its
        output and writing into a preallocated one (case names ending in ``_out``).
    """
    if quick:
        configs = [(n, shape, dtype, False) for n, shape in QUICK_CONFIGS for dtype in QUICK_DTYPES]
    else:
        shapes = FULL_SHAPES[torch.device(device).type]
        configs = [
            (n, shape, dtype, into_out)
            for shape in shapes
            for n in FULL_N
            for dtype in FULL_DTYPES
            for into_out in (False, True)
        ]
    return [make_case(*config, device=device) for config in configs]


def make_case(
    n: int, shape: tuple[int, ...], dtype: torch.dtype, into_out: bool = False, *, device: str
) -> Case:
    """One case: ``n`` random tensors of ``shape`` and ``dtype`` on ``device``; output ``dtype``.

    With ``into_out`` every implementation writes into one preallocated output (``out=``), as a
    merge loop that reuses its buffer does; without it each call allocates its output. On the CPU
    a fresh large output costs a page fault per 4 KB page on first touch, often more than the
    arithmetic; the ``_out`` cases show the kernels without it.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(
        op=OP,
        name=f"n{n}_{'x'.join(map(str, shape))}" + ("_out" if into_out else ""),
        shape=tuple(shape),
        n_inputs=n,
        dtype=dtype,
        device=device,
        bytes_moved=(n + 1) * math.prod(shape) * itemsize,
        build=functools.partial(build, n, tuple(shape), dtype, device, into_out),
    )


def make_inputs(
    n: int, shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[list[torch.Tensor], list[float]]:
    """Random inputs: ``n`` standard-normal tensors and ``n`` weights in [0.25, 1).

    The same seed gives the same inputs on every run, so runs are comparable.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = [
        torch.randn(shape, generator=generator, dtype=dtype, device=device) for _ in range(n)
    ]
    weights = (0.25 + 0.75 * torch.rand(n, generator=torch.Generator().manual_seed(seed))).tolist()
    return tensors, weights


def stack_mul_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Baseline ``torch.stack(ts).mul(w.view(-1, 1, ..., 1)).sum(0)``.

    Parameters
    ----------
    tensors : list of torch.Tensor
        N tensors of the same shape ``S`` and dtype.
    weights : torch.Tensor
        Shape ``(N,)``, same dtype and device as the tensors.

    Returns
    -------
    torch.Tensor
        Shape ``S``: ``Σ_i weights[i] · tensors[i]``, products rounded to the storage dtype.
    """
    ndim = tensors[0].dim()
    return torch.stack(tensors).mul(weights.view(-1, *[1] * ndim)).sum(0)


def add_loop(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Baseline loop ``out = ts[0] * w0; out.add_(t, alpha=w)`` for the remaining tensors.

    Parameters
    ----------
    tensors : list of torch.Tensor
        N >= 1 tensors of the same shape ``S`` and dtype.
    weights : list of float
        N weights.

    Returns
    -------
    torch.Tensor
        Shape ``S``: ``Σ_i weights[i] · tensors[i]``, rounded to the storage dtype after each add.
    """
    out = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=weight)
    return out


def add_loop_into(
    tensors: list[torch.Tensor], weights: list[float], out: torch.Tensor
) -> torch.Tensor:
    """:func:`add_loop` writing into a preallocated ``out``; returns ``out``."""
    torch.mul(tensors[0], weights[0], out=out)
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=weight)
    return out


def build(
    n: int, shape: tuple[int, ...], dtype: torch.dtype, device: str, into_out: bool = False
) -> dict[str, Impl]:
    """Allocate one case's inputs and return its implementations, keyed by impl name."""
    # Imported here, not at module level, so that the harness (and `--help`) works even where the
    # op cannot be imported; the failure then names this op only.
    from meldkit import ops

    tensors, weights = make_inputs(n, shape, dtype, device)
    # Users build the weight tensor once, outside the hot loop: do the same.
    weight_tensor = torch.tensor(weights, dtype=dtype, device=device)
    if into_out:
        out = torch.empty(shape, dtype=dtype, device=device)
        return {
            OURS: lambda: ops.weighted_sum(tensors, weights, out=out),
            "add_loop": lambda: add_loop_into(tensors, weights, out),
            REFERENCE: lambda: out.copy_(ops.weighted_sum_ref(tensors, weights)),
        }
    return {
        OURS: lambda: ops.weighted_sum(tensors, weights),
        "stack_mul_sum": lambda: stack_mul_sum(tensors, weight_tensor),
        "add_loop": lambda: add_loop(tensors, weights),
        REFERENCE: lambda: ops.weighted_sum_ref(tensors, weights),
    }


__all__ = [
    "OP",
    "add_loop",
    "add_loop_into",
    "build",
    "cases",
    "make_case",
    "make_inputs",
    "stack_mul_sum",
]
