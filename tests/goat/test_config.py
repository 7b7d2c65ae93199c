"""GoatConfig: validation of every field, the scaling presets, JSON round-trip."""

from __future__ import annotations

import math
import warnings

import pytest

from meldkit.goat import GoatConfig


def test_defaults():
    c = GoatConfig()
    assert (c.num_experts, c.top_k, c.rank, c.expert_rank) == (8, 2, 32, 4)
    assert (c.rho, c.scaling, c.eta, c.init) == (10.0, "paper", 1.0, "goat")
    assert (c.target_modules, c.dropout, c.aux_loss_coef) == ("all-linear", 0.05, 1e-3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts", 0),
        ("num_experts", 2.0),
        ("num_experts", True),
        ("top_k", 0),
        ("top_k", 9),
        ("rank", 30),
        ("rank", 4),
        ("rank", 0),
        ("alpha", 0.0),
        ("alpha", float("inf")),
        ("rho", -1.0),
        ("rho", float("nan")),
        ("scaling", "pape"),
        ("scaling", 0.0),
        ("scaling", -2.0),
        ("scaling", True),
        ("eta", 0.0),
        ("init", "svd"),
        ("target_modules", "q_proj"),
        ("target_modules", []),
        ("target_modules", ["q_proj", ""]),
        ("target_modules", [3]),
        ("target_modules", None),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("aux_loss_coef", -1e-3),
        ("dropout_mode", "per-expert"),
        ("per_expert_scaling", "yes"),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"GoatConfig.{field}"):
        GoatConfig(**{field: value})


@pytest.mark.parametrize(("n", "eta", "experts", "rank"), [(1024, 1.0, 8, 32), (4096, 0.1, 8, 32)])
def test_paper_scaling(n, eta, experts, rank):
    # s = √(3·n·η / r_e): the spec's table gives 27.7 (RoBERTa-large) and 17.5 (LLaMA CR).
    c = GoatConfig(num_experts=experts, rank=rank, eta=eta, scaling="paper")
    assert c.scaling_for(n) == pytest.approx(math.sqrt(3 * n * eta / (rank // experts)))
    assert c.scaling_for(n) == pytest.approx({1024: 27.71, 4096: 17.53}[n], abs=0.01)


def test_official_scaling():
    # s = α / r_e, α defaulting to the scripts' 2·rank: 16 for E = 8, whatever the layer.
    assert GoatConfig(scaling="official").scaling_for(1024) == 16.0
    assert GoatConfig(rank=8, scaling="official").scaling_for(4096) == 16.0
    assert GoatConfig(rank=32, alpha=32, scaling="official").scaling_for(7) == 8.0


def test_fixed_scaling():
    assert GoatConfig(scaling=2.5).scaling_for(1024) == 2.5


def test_alpha_without_official_scaling_warns():
    with pytest.warns(UserWarning, match=r"alpha=16 is used only by scaling='official'"):
        c = GoatConfig(num_experts=1, top_k=1, rank=8, alpha=16, init="lora")
    assert c.scaling_for(64) == pytest.approx((3 * 64 / 8) ** 0.5)  # the paper's s, not 16 / 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GoatConfig(rank=8, alpha=16, scaling="official").scaling_for(64) == 16.0


def test_json_round_trip():
    c = GoatConfig(
        num_experts=4,
        top_k=1,
        rank=8,
        alpha=16,
        scaling="official",
        target_modules=["q_proj", "v_proj"],
    )
    assert c.target_modules == ("q_proj", "v_proj")
    assert GoatConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="unknown fields"):
        GoatConfig.from_dict({**c.to_dict(), "lora_alpha": 3})
