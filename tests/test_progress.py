"""Progress bars in logs: whole lines, no carriage returns; tqdm's bar on a terminal."""

from __future__ import annotations

import io
import subprocess
import sys

from meldkit._progress import LogLines, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_and_the_final_count(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()
    bar = progress_bar(file=log, total=1000, desc="merge", unit="tensor")
    assert isinstance(bar, LogLines) and bar.mininterval == 30
    assert bar.maxinterval == 30  # tqdm's monitor would refresh an idle bar every 10 s
    for _ in range(1000):
        bar.update(1)  # within 30 s of the first line: no line of its own
    bar.close()
    bar.close()  # twice is harmless
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 1 and text.endswith("\n")  # no 0 % line for work done in seconds
    assert lines[0].startswith("merge: 100%") and "1000/1000" in lines[0]


def test_every_refresh_is_a_line_when_the_interval_allows(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0.5")  # tqdm's setting, honoured when set late
    quiet = progress_bar(file=io.StringIO(), total=1)
    assert quiet.mininterval == 0.5
    quiet.close()
    log = io.StringIO()
    bar = progress_bar(file=log, total=3, desc="goat wrap", unit="layer", mininterval=0, miniters=1)
    bar.set_postfix(layer="a")  # not a line of its own
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split("|")[0] for line in lines] == [
        f"goat wrap: {p:>3}%" for p in (0, 33, 67, 100)
    ]


def test_a_terminal_gets_tqdms_bar():
    term = _Terminal()
    bar = progress_bar(file=term, total=2, desc="x")
    bar.update(2)
    bar.close()
    assert not isinstance(bar, LogLines) and "\r" in term.getvalue()


def test_meldkit_merge_logs_lines(tmp_path):
    # The CLI's progress to a file (a batch job's log): lines only.
    import torch

    from meldkit.merging.synthetic import write_checkpoint

    base = {"w": torch.zeros(4, 4), "v": torch.zeros(4)}
    ft = {"w": torch.ones(4, 4), "v": torch.ones(4)}
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "ft", ft)
    cfg = tmp_path / "m.yml"
    cfg.write_text(
        "merge_method: task_arithmetic\nbase_model: base\n"
        "models:\n  - model: ft\n    parameters: {weight: 0.5}\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "meldkit", "merge", str(cfg), str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "\r" not in run.stderr
    assert any(line.startswith("merge: 100%") for line in run.stderr.splitlines())


def test_a_notebook_kernel_gets_tqdms_bar(monkeypatch):
    # Jupyter without ipywidgets: stderr is no terminal, but the notebook redraws the bar.
    import types

    shell = types.SimpleNamespace(config={"IPKernelApp": {}})
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", fake)
    bar = progress_bar(file=io.StringIO(), total=1)
    assert not isinstance(bar, LogLines)
    bar.close()
