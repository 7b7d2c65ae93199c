"""Shared test helpers: devices, the one tolerance rule, reference comparison, output poisoning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Every test that takes `device` runs on the CPU, and on CUDA where a GPU is present.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]
# Storage dtypes every op supports on every device.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Sizes that break kernels: a single element, odd sizes, one past a power of two.
ODD_SIZES = [1, 7, 111, 4099]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerance(dtype: torch.dtype, n_terms: int = 1) -> tuple[float, float]:
    """The one tolerance rule: ``(rtol, mtol)`` for a result stored in ``dtype``.

    A kernel that accumulates ``n_terms`` terms in float32 (float64 for float64 storage) and
    rounds once to ``dtype`` is within ``rtol·|ref| + mtol·magnitude`` of the exact result, where
    ``magnitude`` bounds the terms' absolute sum (the standard forward error bound of summation,
    with a factor of 2 for slack).
    """
    rtol = 2 * torch.finfo(dtype).eps
    mtol = 2 * n_terms * torch.finfo(accumulation_dtype(dtype)).eps
    return rtol, mtol


def assert_close_to_ref(
    actual: torch.Tensor,
    expected64: torch.Tensor,
    *,
    n_terms: int = 1,
    magnitude: torch.Tensor | None = None,
) -> None:
    """``actual`` (any dtype) against a float64 reference, with :func:`tolerance`."""
    assert actual.shape == expected64.shape, (actual.shape, expected64.shape)
    assert expected64.dtype == torch.float64
    rtol, mtol = tolerance(actual.dtype, n_terms)
    a = actual.detach().to("cpu", torch.float64)
    e = expected64.detach().cpu()
    mag = e.abs() if magnitude is None else magnitude.detach().cpu().to(torch.float64)
    bound = rtol * e.abs() + mtol * mag
    err = (a - e).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())} of {a.numel()} elements off (dtype {actual.dtype}); first at flat "
            f"index {i}: got {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}, "
            f"bound {bound.flatten()[i].item():.3g}"
        )


def randn(shape, dtype: torch.dtype, device, gen: torch.Generator) -> torch.Tensor:
    """Standard-normal values (never zeros), generated on the CPU so every device sees the same."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A strided view holding the same values as ``t`` (every other element of a wider buffer)."""
    wide = torch.full((*t.shape, 2), float("nan"), dtype=t.dtype, device=t.device)
    view = wide.select(-1, 0)
    view.copy_(t)
    assert t.numel() <= 1 or not view.is_contiguous()
    return view


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN, so :func:`assert_written` can tell which elements a kernel wrote."""
    return t.fill_(float("nan"))


def assert_written(t: torch.Tensor) -> None:
    """Every element of ``t`` was written (none is still the NaN of :func:`poison`)."""
    nan = torch.isnan(t)
    assert not nan.any(), f"{int(nan.sum())} of {t.numel()} elements never written"


def draw_boundary_keeps(numel: int, seed: int, tensor_index: int) -> list[float]:
    """Keep probabilities exactly at, one float32 step above and one below draws that do occur
    (element e is kept when u_e < keep): the native kernels decide u < keep on the draw's
    integer, so these are the values where an off-by-one would show."""
    from meldkit.ops.random_ref import uniform_ref

    u = uniform_ref(numel, seed, tensor_index)
    keeps = [1.0, 0.0, 2.0**-24, 1.0 - 2.0**-24]
    # Below 0.5 a float32 step is finer than the draws' 2^-24 grid, so "one step above a draw"
    # falls between two draws there: those are the cases a rounding slip would get wrong.
    near = [int((u - x).abs().argmin()) for x in (0.0, 0.01, 0.3, 0.7)]
    for i in near:
        at = float(u[i])
        up = float(torch.nextafter(u[i : i + 1], torch.ones(1))[0])
        down = float(torch.nextafter(u[i : i + 1], torch.zeros(1))[0])
        keeps += [k for k in (at, up, down) if 0.0 <= k <= 1.0]
    return keeps


class OpNames:
    """A ``TorchDispatchMode`` (made on first use) that records the name of every op
    dispatched while it is active: ``with OpNames.mode() as m: ...; m.names``."""

    @staticmethod
    def mode():
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Recorder(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.names: list[str] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.names.append(str(func))
                return func(*args, **(kwargs or {}))

        return _Recorder()


def run_child(module: str, **env: str) -> dict:
    """Run ``python -m MODULE`` from the repository root with ``env`` added to this process's
    environment and MELDKIT_BACKEND=native; return the JSON object it prints."""
    done = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, "MELDKIT_BACKEND": "native", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)
