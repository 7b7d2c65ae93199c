"""pytest-benchmark microbenchmarks of ``weighted_sum`` against the code users write today.

Reuses the quick cases of :mod:`meldkit.bench.weighted_sum`, so the inputs, baselines and names are
the ones ``meldkit bench`` times. Each benchmark also checks its result against a float64 sum, so a
fast but wrong implementation fails instead of winning. Not part of the test suite (``testpaths``
is ``tests``); run it explicitly::

    pytest bench/bench_weighted_sum.py
    pytest bench/bench_weighted_sum.py --benchmark-group-by=param:case --benchmark-json=out.json

pytest-benchmark times wall-clock calls with warm caches; the harness (``meldkit bench``) is the one
to quote, with its cache flush, CUDA events and bandwidth ceiling.
"""

from __future__ import annotations

import pytest
import torch

from meldkit.bench import OURS, Case, dtype_name
from meldkit.bench import weighted_sum as cases_module

IMPLS = (OURS, "stack_mul_sum", "add_loop")
CASES = [case for device in ("cpu", "cuda") for case in cases_module.cases(device, quick=True)]


def _case_id(case: Case) -> str:
    return f"{case.device}-{case.name}-{dtype_name(case.dtype)}"


def assert_within_summation_bound(
    result: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]
) -> None:
    """Check ``result ≈ Σ_i w_i · t_i`` against the float64 sum, elementwise.

    The bound is the classic one for a sum of N terms rounded in the result's dtype:
    ``(N + 1) · eps · Σ_i |w_i · t_i|``. It holds for every implementation timed here, including
    the baselines that round each product and partial sum in bf16/fp16. The tests' rule
    (``tests/helpers.py``) is tighter because it describes fp32 accumulation rounded once, which the
    baselines do not do; ours is held to that rule by ``tests/ops/test_weighted_sum.py``.
    """
    exact = torch.zeros(result.shape, dtype=torch.float64, device=result.device)
    magnitude = torch.zeros_like(exact)
    for tensor, weight in zip(tensors, weights, strict=True):
        term = tensor.double() * weight
        exact += term
        magnitude += term.abs()
    bound = (len(tensors) + 1) * torch.finfo(result.dtype).eps * magnitude
    excess = (result.double() - exact).abs() - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"element {worst}: got {result.flatten()[worst].item()}, "
        f"float64 sum {exact.flatten()[worst].item()}, bound {bound.flatten()[worst].item()}"
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_weighted_sum(benchmark, case: Case, impl: str) -> None:
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fn = case.build()[impl]
    if case.device == "cuda":
        # Wall-clock timing of an asynchronous launch measures nothing: wait for the kernel.
        def call() -> torch.Tensor:
            result = fn()
            torch.cuda.synchronize()
            return result
    else:
        call = fn

    # pytest-benchmark does not warm up by default; the first call pays one-off costs (the
    # OpenMP thread pool, torch.library dispatch caches) that would skew its calibration.
    call()
    benchmark.group = _case_id(case)
    benchmark.extra_info.update(op=case.op, bytes_moved=case.bytes_moved)
    result = benchmark(call)

    # The same (default) seed as `build`: the very inputs the implementation summed.
    tensors, weights = cases_module.make_inputs(case.n_inputs, case.shape, case.dtype, case.device)
    assert result.dtype == case.dtype and result.shape == case.shape
    assert_within_summation_bound(result, tensors, weights)
