"""The native CPU kernels give the same bits whatever the thread count: their reductions run
in fixed chunks added in a fixed order, never in the order threads finish. Each op runs in a
child process under OMP_NUM_THREADS=1 and =2 (the OpenMP team is fixed at start-up); every
output's hash must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MELDKIT_BACKEND="native")
    done = subprocess.run(
        [sys.executable, "-m", "tests.determinism_child"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_cpu_ops_give_the_same_bits_on_one_and_two_threads():
    one, two = _run(1), _run(2)
    assert one.pop("threads") == 1 and two.pop("threads") == 2
    assert len(one) > 40
    differ = sorted(k for k in one if one[k] != two.get(k))
    assert not differ, f"outputs that depend on the thread count: {differ}"
