"""Native kernels give the same bits whatever the FPU's denormal modes. Loading a library built
with -ffast-math turns on flush-to-zero and denormals-are-zero for the whole process (torch 2.4's
torch.compile CPU kernels do): a float16 -> float32 conversion that passes through a float32
subnormal would then read subnormal halves as 0, where torch reads them exactly. The ops run in
child processes with and without those modes, on float16 inputs half of which are subnormal."""

from __future__ import annotations

import platform

import pytest

from tests.helpers import run_child


def _run(flush: bool) -> dict:
    return run_child("tests.denormal_child", MELDKIT_TEST_FLUSH_DENORMAL=str(int(flush)))


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="FTZ/DAZ modes of x86 SSE"
)
def test_float16_results_do_not_depend_on_flush_to_zero():
    plain, flushed = _run(False), _run(True)
    assert not plain.pop("flushing") and flushed.pop("flushing")
    assert plain.pop("subnormal_share") > 0.3 and flushed.pop("subnormal_share") > 0.3
    assert len(plain) == 8
    differ = sorted(k for k in plain if plain[k] != flushed.get(k))
    assert not differ, f"outputs that change under flush-to-zero: {differ}"
