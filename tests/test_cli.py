"""`meldkit info`, `meldkit bench` and `meldkit demo` from the command line, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import meldkit
from meldkit.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meldkit", *args], capture_output=True, text=True, timeout=300
    )


def test_info_reports_build_gpu_torch_and_ops(capsys):
    facts = meldkit.info()
    printed = capsys.readouterr().out
    assert facts["version"] == meldkit.__version__
    assert facts["torch"] in printed
    assert "weighted_sum" in printed and "cpu" in printed
    assert "GPU:" in printed
    if facts["extension"]:
        assert "float32" in facts["ops"]["weighted_sum"]["cpu"]
        assert isinstance(facts["build"]["cuda"], bool)
        vectors = facts["build"]["cpu_vectors"]
        assert vectors in printed and vectors.split(" ")[0] in (
            "AVX-512",
            "AVX2",
            "SSE2",
            "compiler",
        )


def test_python_m_meldkit_info_json():
    res = run_cli("info", "--json")
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout[res.stdout.index("{") :])
    assert facts["version"] == meldkit.__version__
    assert "weighted_sum" in facts["ops"]


def test_bench_writes_rows_with_ratio_and_bandwidth(tmp_path):
    path = tmp_path / "rows.json"
    code = main(
        [
            "bench",
            "--op",
            "weighted_sum",
            "--device",
            "cpu",
            "--quick",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--dtype",
            "fp32",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # JSON Lines
    assert rows, "no benchmark rows written"
    baselines = {r["baseline"] for r in rows}
    assert {"stack_mul_sum", "add_loop"} <= baselines
    for r in rows:
        assert r["op"] == "weighted_sum" and r["device"] == "cpu"
        assert r["median_s"] > 0 and r["baseline_median_s"] > 0
        assert abs(r["ratio"] - r["baseline_median_s"] / r["median_s"]) < 1e-6 * r["ratio"]
        assert r["gbps"] > 0 and r["fraction_of_ceiling"] > 0


def test_bench_runs_only_the_cases_asked_for(tmp_path, capsys):
    """--case keeps the cases whose name matches a shell-style pattern (repeatable or
    comma-separated; anchored: 'ties_*' is not 'dare_ties_...'); a pattern that matches
    nothing is an error."""
    args = ["bench", "--op", "merge", "--device", "cpu", "--quick", "--repeats", "1"]
    args += ["--warmup", "1"]

    def cases_run(*patterns):
        path = tmp_path / f"rows{len(list(tmp_path.iterdir()))}.json"
        assert main([*args, "--json", str(path), *patterns]) == 0
        return {json.loads(line)["case"] for line in path.read_text().splitlines()}

    assert cases_run("--case", "ties_*") == {"ties_n3_1024x1024"}
    assert cases_run("--case", "dare_ties_n3_1024x1024,no_such_case") == {"dare_ties_n3_1024x1024"}
    both = cases_run("--case", "ties_*", "--case", "*dare*")
    assert both == {"ties_n3_1024x1024", "dare_ties_n3_1024x1024"}
    capsys.readouterr()
    assert main([*args, "--case", "no_such_case*"]) == 2
    assert "no case matches" in capsys.readouterr().err


def test_bench_unknown_op_fails_clearly():
    res = run_cli("bench", "--op", "no_such_op")
    assert res.returncode != 0
    assert "no_such_op" in res.stderr and "weighted_sum" in res.stderr
