"""Every script in ``bench/`` runs at a tiny size on the CPU and writes its JSON rows.

The scripts are run as users (and ``scripts/gpu_check.sh``) run them, in a child process, so a
script broken by a change fails here rather than on a GPU machine whose minutes are scarce.
Nothing is timed: the rows only have to hold every implementation the script compares, with a
positive time. The numbers themselves come from full-size runs (bench/RESULTS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# script: (tiny arguments, the "bench" field of its rows, the implementations it compares)
SCRIPTS = {
    "bench_merge.py": (
        ["--models", "2", "--layers", "1", "--hidden", "64", "--rounds", "1"],
        None,
        None,
    ),
    "bench_twin.py": (
        ["--batch", "4", "--length", "8", "--repeats", "1", "--profile"],
        "twin",
        {"shared", "twin", "twin+router", "twin_top1", "rebuild"},
    ),
    "bench_exde.py": (
        ["--scale", "0.002", "--steps", "2", "--repeats", "1"],
        "exde_blend",
        {"meldkit", "meldkit_oneshot", "torch_loop"},
    ),
    "bench_routed_lora.py": (
        [
            "--tokens",
            "16",
            "--dim",
            "32",
            "--experts",
            "2",
            "--top-k",
            "1",
            "--rank",
            "4",
            "--repeats",
            "1",
            "--dropout",
            "0.1",
        ],
        "routed_lora_layer",
        {
            "base_linear",
            "meldkit_goat",
            "meldkit_goat_added",
            "official_loop",
            "peft_lora",
            "meldkit_goat_shared_dropout",
        },
    ),
    "bench_goat_compile.py": (
        [
            "--layers",
            "1",
            "--dim",
            "32",
            "--tokens",
            "8",
            "--experts",
            "2",
            "--rank",
            "4",
            "--repeats",
            "1",
        ],
        "goat_compile",
        {"base", "goat_eager", "goat_compiled"},
    ),
    "bench_logit_fusion.py": (
        ["--rows", "4", "--vocab", "64", "--experts", "2", "--tiny", "--repeats", "1"],
        None,
        {"meldkit", "meldkit_op", "torch_grid", "dlf_1", "dlf_N", "proxy_1", "proxy_N"},
    ),
    "bench_call_overhead.py": (["--repeats", "1", "--calls", "5"], "call_overhead", None),
}


def test_every_script_is_covered():
    scripts = {p.name for p in (ROOT / "bench").glob("bench_*.py")}
    scripts.discard("bench_weighted_sum.py")  # pytest-benchmark's file, collected by pytest
    assert scripts == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_runs_and_writes_rows(script, tmp_path):
    if script in ("bench_routed_lora.py", "bench_logit_fusion.py", "bench_twin.py"):
        pytest.importorskip("transformers")
    if script == "bench_routed_lora.py":
        pytest.importorskip("peft")
    args, bench, impls = SCRIPTS[script]
    if script == "bench_merge.py":
        args = [*args, "--workdir", str(tmp_path / "work")]
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows, f"{script} wrote no rows"
    if bench is not None:
        assert {r["bench"] for r in rows} == {bench}
    if impls is not None:
        assert {r["impl"] for r in rows} == impls
    if script == "bench_merge.py":
        (row,) = rows
        assert row["op"] == "merge_e2e" and row["meldkit_s"] > 0 and row["io_floor_s"] > 0
        assert row["ratio_to_io_floor"] == pytest.approx(row["meldkit_s"] / row["io_floor_s"])
    elif script == "bench_call_overhead.py":
        assert all(r["exchange_table_us"] > 0 and r["dunder_dlpack_us"] > 0 for r in rows)
    else:
        assert all(r["median_s"] > 0 for r in rows)


def test_gpu_profile_script_runs_every_case_on_the_cpu():
    """``bench/gpu_profile.py`` (the GPU check's Nsight Compute step) builds and calls every
    case; on the CPU, unprofiled, at 1 % of each dimension."""
    script = str(ROOT / "bench" / "gpu_profile.py")
    res = subprocess.run(
        [sys.executable, script, "--device", "cpu", "--scale", "0.01"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    listed = subprocess.run(
        [sys.executable, script, "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert len(listed) >= 6
    assert res.stdout.split("\n")[:-1] == [f"gpu_profile: {name} done" for name in listed]
