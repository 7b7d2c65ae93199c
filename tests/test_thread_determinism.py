"""The native CPU kernels give the same bits whatever the thread count: their reductions run
in fixed chunks added in a fixed order, never in the order threads finish. Each op runs in a
child process under OMP_NUM_THREADS=1 and =2 (the OpenMP team is fixed at start-up); every
output's hash must agree."""

from __future__ import annotations

from tests.helpers import run_child


def _run(threads: int) -> dict:
    return run_child("tests.determinism_child", OMP_NUM_THREADS=str(threads))


def test_cpu_ops_give_the_same_bits_on_one_and_two_threads():
    one, two = _run(1), _run(2)
    assert one.pop("threads") == 1 and two.pop("threads") == 2
    assert len(one) > 40
    differ = sorted(k for k in one if one[k] != two.get(k))
    assert not differ, f"outputs that depend on the thread count: {differ}"
