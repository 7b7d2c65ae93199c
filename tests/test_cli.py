"""`meldkit info`, `meldkit bench` and `meldkit demo` from the command line, as a user runs them."""

from __future__ import annotations

import json
import os
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


def _merge_inputs(tmp_path):
    """A tiny base, two fine-tunes and a dare_ties config over them (random masks: the seed
    matters)."""
    import yaml

    from meldkit.merging.synthetic import (
        llama_config,
        llama_shapes,
        random_state,
        sparse_finetune,
        write_checkpoint,
    )

    config = llama_config(2, 16, 48, 64, 2)
    base = random_state(llama_shapes(2, 16, 48, 64), seed=0)
    paths = [write_checkpoint(tmp_path / "base", base, config=config)]
    for i in range(2):
        tune = sparse_finetune(base, seed=1 + i, fraction=0.4)
        paths.append(write_checkpoint(tmp_path / f"ft{i}", tune, config=config))
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(paths[0]),
        "models": [
            {"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths[1:]
        ],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_accepts_mergekit_yaml_flags(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    cfg = _merge_inputs(tmp_path)
    quiet = ["--no-progress"]

    def weights(out):
        return load_file(str(out / "model.safetensors"))

    # --random-seed is mergekit's --seed
    assert main(["merge", str(cfg), str(tmp_path / "s7"), "--seed", "7", *quiet]) == 0
    assert main(["merge", str(cfg), str(tmp_path / "r7"), "--random-seed", "7", *quiet]) == 0
    assert main(["merge", str(cfg), str(tmp_path / "s0"), *quiet]) == 0
    s7, r7, s0 = (weights(tmp_path / n) for n in ("s7", "r7", "s0"))
    assert all(s7[k].equal(r7[k]) for k in s7)
    assert not all(s7[k].equal(s0[k]) for k in s7)  # the seed reached the masks
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "x"), "--seed", "1", "--random-seed", "2"]) == 2
    assert "--seed 1 and --random-seed 2 disagree" in capsys.readouterr().err
    # flags that change nothing in meldkit: accepted, each with a note saying why
    args = ["--allow-crimes", "--lazy-unpickle", "--copy-tokenizer", *quiet]
    assert main(["merge", str(cfg), str(tmp_path / "noop"), *args]) == 0
    err = capsys.readouterr().err
    assert "note: --allow-crimes changes nothing: meldkit does not compare architectures" in err
    assert "note: --lazy-unpickle changes nothing" in err and "need --allow-pickle" in err
    assert "note: --copy-tokenizer changes nothing: meldkit always copies the tokenizer" in err
    assert all(weights(tmp_path / "noop")[k].equal(s0[k]) for k in s0)
    # --cuda is --device cuda
    seen = {}

    def fake_merge(config, out_dir, **options):
        seen.update(options)
        return out_dir

    monkeypatch.setattr("meldkit.merging.merge", fake_merge)
    assert main(["merge", str(cfg), str(tmp_path / "gpu"), "--cuda"]) == 0
    assert seen["device"] == "cuda" and seen["seed"] == 0
    assert main(["merge", str(cfg), str(tmp_path / "gpu"), "--cuda", "--device", "cuda:0"]) == 0
    assert seen["device"] == "cuda:0"
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "gpu"), "--cuda", "--device", "cpu"]) == 2
    assert "--cuda and --device cpu disagree" in capsys.readouterr().err


def test_merge_help_lists_mergekit_flags_apart():
    res = run_cli("merge", "--help")
    assert res.returncode == 0
    text = res.stdout
    group = text[text.index("mergekit-yaml's flags:") :]
    for flag in (
        "--cuda",
        "--random-seed N",
        "--allow-crimes",
        "--lazy-unpickle",
        "--copy-tokenizer",
    ):
        assert flag in group
    assert "--read-ahead" not in group  # meldkit's own options come first, in their own list


def test_an_invalid_backend_is_a_fact_for_info_and_one_line_for_the_other_commands(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("MELDKIT_BACKEND", "bogus")
    facts = meldkit.info()
    printed = capsys.readouterr().out
    assert facts["backend"] == "bogus" and "auto, reference, native" in facts["backend_error"]
    assert "MELDKIT_BACKEND: 'bogus' is INVALID (accepted: auto, reference, native" in printed
    assert main(["info"]) == 0
    assert "is INVALID" in capsys.readouterr().out
    cfg = _merge_inputs(tmp_path)
    for args in (
        ["demo"],
        ["bench", "--op", "weighted_sum", "--quick"],
        ["merge", str(cfg), str(tmp_path / "out")],
    ):
        assert main(args) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert err == (
            f"meldkit {args[0]}: MELDKIT_BACKEND='bogus' is not one of auto, reference, native\n"
        )
    assert not (tmp_path / "out").exists()


def test_info_says_no_gpu_rather_than_reference_only(monkeypatch, capsys):
    """Without a GPU torch can use, nothing runs on CUDA: not even the reference."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    meldkit.info()
    printed = capsys.readouterr().out
    cuda_rows = [line for line in printed.splitlines() if line.split()[1:2] == ["cuda"]]
    assert cuda_rows and all(line.endswith("n/a (no usable GPU)") for line in cuda_rows)


def test_demo_checks_its_device_as_merge_does(monkeypatch, capsys):
    import pytest

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        assert main(["demo", "--device", device]) == 2
        out, err = capsys.readouterr()
        assert out == ""  # refused before the info table and the first section
        assert err == f"meldkit demo: device {device} requested but torch sees no CUDA device\n"
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--device", "tpu"])
    assert exit_.value.code == 2
    assert "argument --device: invalid choice: 'tpu' (choose from cpu, cuda, cuda:N)" in (
        capsys.readouterr().err
    )


def test_demo_sections_all_have_headers(monkeypatch, capsys):
    import meldkit.demo as demo

    for name in ("weighted_sum", "merge", "goat", "twin", "exde"):
        monkeypatch.setattr(demo, f"_demo_{name}", lambda device: True)
    monkeypatch.setattr("meldkit.dlf.demo.run_demo", lambda print_fn: True)
    monkeypatch.setattr("meldkit.bench.run_op", lambda *args, **kwargs: [])
    monkeypatch.setattr("meldkit.bench.format_table", lambda rows: "")
    assert demo.run_demo("cpu") == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.endswith(":")]
    assert any(line.startswith("DLF (") and line.endswith(" on cpu:") for line in headers)
    assert len(headers) >= 7  # info's "ops" line, the six sections and the benchmark


def test_demo_silences_the_torchvision_notice_only():
    import logging

    from meldkit.demo import _without_torchvision_notice

    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        notice = "`CLIPImageProcessor` requires torchvision (not installed); falling back"
        with _without_torchvision_notice():
            logger.warning(notice)
            logger.warning("something else")
        logger.warning(notice)
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else", notice]


def test_cli_warnings_are_one_line_named_for_the_command(tmp_path, capsys, monkeypatch):
    import warnings

    cfg = _merge_inputs(tmp_path)

    def fake_merge(config, out_dir, **options):
        warnings.warn("models differ in something harmless", stacklevel=2)
        return out_dir

    monkeypatch.setattr("meldkit.merging.merge", fake_merge)
    shown = warnings.showwarning
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err == "meldkit merge: warning: models differ in something harmless\n"
    assert warnings.showwarning is shown  # only while the command runs


def test_out_shard_size_without_a_unit_warns_that_it_counts_bytes(tmp_path, capsys, monkeypatch):
    cfg = _merge_inputs(tmp_path)
    seen = {}

    def fake_merge(config, out_dir, **options):
        seen.update(options)
        return out_dir

    monkeypatch.setattr("meldkit.merging.merge", fake_merge)
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--out-shard-size", "5"]) == 0
    err = capsys.readouterr().err
    assert "warning: --out-shard-size 5 means 5 bytes" in err and "did you mean 5GB" in err
    assert seen["out_shard_size"] == "5"  # a warning, as mergekit reads it: bytes
    for size in ("5GB", "1B", "500MB", "1000000000", "4KB"):
        assert main(["merge", str(cfg), str(tmp_path / "out"), "--out-shard-size", size]) == 0
        assert capsys.readouterr().err == ""


def test_fallback_warning_names_the_callers_line(monkeypatch):
    """Whether the op runs its implementation directly or through torch.library (autograd),
    the warning points at the line that called it, not into meldkit or torch."""
    import pytest
    import torch

    from meldkit import _native
    from meldkit.ops import weighted_sum

    monkeypatch.setenv("MELDKIT_BACKEND", "auto")
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "IMPORT_ERROR", "ImportError: simulated")
    for requires_grad in (False, True):
        monkeypatch.setattr(_native, "_warned", set())
        x = torch.randn(5, requires_grad=requires_grad)
        with pytest.warns(meldkit.MeldkitFallbackWarning) as record:
            weighted_sum([x, x], [1.0, 2.0])
        assert [w.filename for w in record] == [__file__], requires_grad


def test_yaml_errors_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "ties.yaml"
    bad.write_text("merge_method: ties\nmodels:\n  - model: [a\n")
    assert main(["merge", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meldkit merge: {bad}, line 4, column 1: not valid YAML: expected")
    assert "<unicode string>" not in err and err.count("\n") == 1, err


def test_a_config_that_is_a_folder_or_not_utf8_is_named(tmp_path, capsys):
    assert main(["merge", str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"config file {tmp_path} is a folder, not a YAML file" in capsys.readouterr().err
    latin = tmp_path / "ties.yaml"
    latin.write_bytes("merge_method: ties\n# caf\xe9\n".encode("latin-1"))
    assert main(["merge", str(latin), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meldkit merge: {latin}: not a UTF-8 text file (byte 24: 0xe9)"), err


def test_bench_names_the_script_that_measures_blend(capsys):
    assert main(["bench", "--op", "blend", "--quick"]) == 2
    assert "blend is measured by bench/bench_exde.py" in capsys.readouterr().err


def test_bench_lists_the_cases_before_measuring_when_none_matches(capsys):
    args = ["bench", "--op", "merge", "--device", "cpu", "--quick", "--case", "tie_*"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "copy ceiling" not in err  # nothing measured
    assert "no case matches" in err
    assert "ties_n3_1024x1024 (fp32), dare_ties_n3_1024x1024 (fp32)" in err


def test_out_shard_sizes_that_are_no_sizes_are_one_line(tmp_path, capsys):
    cfg = _merge_inputs(tmp_path)
    for size, message in (
        ("inf", "not a size: 'inf'"),
        ("1e400", "not a size: '1e400'"),  # was an OverflowError traceback
        ("0.5", "a size must be at least 1 byte, got '0.5'"),
    ):
        assert main(["merge", str(cfg), str(tmp_path / "out"), "--out-shard-size", size]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--out-shard-size", "1e30"]) == 0


def test_a_merge_whose_stdout_is_closed_still_succeeds(tmp_path):
    cfg = _merge_inputs(tmp_path)
    code = "import sys; from meldkit.cli import main; sys.exit(main(sys.argv[1:]))"
    read, write = os.pipe()
    os.close(read)  # `| head -0`: the reader is gone before the merge prints
    proc = subprocess.run(
        [sys.executable, "-c", code, "merge", str(cfg), str(tmp_path / "out"), "--no-progress"],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "out" / "config.json").is_file()
