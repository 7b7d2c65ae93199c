"""Expert initialisation and weight alignment against the spec's formulas (spec §3.3–3.5)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import meldkit.goat as goat
from meldkit.goat.init import segment_starts
from tests.goat.tiny_models import mlp
from tests.helpers import assert_close_to_ref

E, RANK, D, RHO = 4, 8, 2, 10.0


def config(**kw) -> goat.GoatConfig:
    return goat.GoatConfig(**{"num_experts": E, "top_k": 2, "rank": RANK, "dropout": 0.0, **kw})


def test_segment_starts():
    # h = 24, E = 4, d = 2: chunk width 6.
    assert segment_starts("goat", 24, E, D) == [0, 6, 12, 18]
    assert segment_starts("pissa", 24, E, D) == [0, 2, 4, 6]
    assert segment_starts("milora", 24, E, D) == [16, 18, 20, 22]
    # ⌊h/E⌋ when E does not divide h: the official code's Vlen = h // E.
    assert segment_starts("goat", 27, E, D) == [0, 6, 12, 18]
    with pytest.raises(ValueError, match="rank = 8"):
        segment_starts("goat", 7, E, D)


def _dense(layer: goat.GoatLinear) -> torch.Tensor:
    """[E, m, n] float64: B_j A_j for every expert."""
    return torch.einsum("emd,edn->emn", layer.lora_b.double(), layer.lora_a.double())


@pytest.mark.parametrize("init", ["goat", "pissa", "milora"])
@pytest.mark.parametrize("scaling", ["paper", "official", 3.0])
def test_svd_init_matches_the_formulas(init, scaling):
    model = mlp()
    w0 = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    goat.wrap(model, config(init=init, scaling=scaling, rho=RHO))
    for (_, layer), w in zip(goat.goat_layers(model), w0, strict=True):
        m, n = w.shape
        s = layer.scaling
        assert s == config(scaling=scaling).scaling_for(n)
        assert (
            layer.lora_a.dtype == layer.lora_b.dtype == layer.router.weight.dtype == torch.float32
        )
        # Eq. 19: s·B_j A_j = (1/ρ) U_j Σ_j V_jᵀ on the segments of the fp32 SVD.
        u, sv, vh = (t.double() for t in torch.linalg.svd(w.float(), full_matrices=False))
        sbA = _dense(layer) * s
        for j, k in enumerate(segment_starts(init, min(m, n), E, D)):
            seg = slice(k, k + D)
            expected = u[:, seg] @ torch.diag(sv[seg]) @ vh[seg] / RHO
            magnitude = (u[:, seg].abs() * sv[seg]) @ vh[seg].abs() / RHO
            assert_close_to_ref(sbA[j].float(), expected, n_terms=D + 4, magnitude=magnitude)
        # Theorem 3.4: W̃0 = W0 − (s/E) Σ_j B_j A_j, up to fp32 rounding.
        delta = sbA.sum(0) / E
        magnitude = w.double().abs() + (s / E) * torch.einsum(
            "emd,edn->mn", layer.lora_b.double().abs(), layer.lora_a.double().abs()
        )
        assert_close_to_ref(
            layer.base_layer.weight, w.double() - delta, n_terms=RANK + 2, magnitude=magnitude
        )
        # The stored alignment factors are the initial experts times s/E.
        delta_a, delta_b = layer.alignment
        assert torch.equal(delta_a, layer.lora_a.detach().reshape(RANK, n))
        assert torch.equal(
            delta_b, layer.lora_b.detach().permute(1, 0, 2).reshape(m, RANK) * (s / E)
        )


def _base_output64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return copy.deepcopy(model).double()(x.double())


def test_uniform_routing_reproduces_the_base_model():
    """With every gate at 1/E (router zeroed, k = E) the GOAT model equals the original model."""
    base = mlp()
    x = torch.randn(9, 40)
    expected = _base_output64(base, x)
    model = goat.wrap(copy.deepcopy(base), config(top_k=E)).eval()
    for _, layer in goat.goat_layers(model):
        nn.init.zeros_(layer.router.weight)
    with torch.no_grad():
        y = model(x)
    # Rounding bound: the base GEMVs (≤ 40 terms) plus the adjustment and the experts (2·rank).
    assert_close_to_ref(y, expected, n_terms=40 + 2 * RANK, magnitude=_magnitude(base, model, x))


def _magnitude(base: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bound of the absolute terms summed by the two-layer model (layer 1 exact in fp64)."""
    w1, w2 = base[0].weight.double().abs(), base[2].weight.double().abs()
    h = base[1](base[0].double()(x.double())).abs()
    layers = [layer for _, layer in goat.goat_layers(model)]
    lr = [2 * layer.scaling * _dense_abs(layer) for layer in layers]
    first = (w1 + lr[0]) @ x.double().abs().T
    return ((w2 + lr[1]) @ (h.T + first.abs())).T + base[2].bias.double().abs()


def _dense_abs(layer: goat.GoatLinear) -> torch.Tensor:
    return torch.einsum("emd,edn->mn", layer.lora_b.double().abs(), layer.lora_a.double().abs())


def test_routing_error_at_init_matches_the_spec():
    """Spec §3.4: per token, y − W0 x = (1/ρ) Σ_i (w_i − 1/E) U_i Σ_i V_iᵀ x."""
    linear = mlp()[0]
    x = torch.randn(11, 40)
    model = goat.wrap(nn.Sequential(copy.deepcopy(linear)), config()).eval()
    layer = model[0]
    with torch.no_grad():
        y = model(x)
    x64 = x.double()
    probs = torch.softmax(x64 @ layer.router.weight.double().T, dim=-1)
    top = probs.topk(2, dim=-1)
    w = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, True))
    sBA = layer.scaling * _dense(layer)  # = (1/ρ) U_i Σ_i V_iᵀ
    expected = x64 @ linear.weight.double().T + linear.bias.double()
    expected += torch.einsum("te,emn,tn->tm", w - 1 / E, sBA, x64)
    mag = (linear.weight.double().abs() + 2 * layer.scaling * _dense_abs(layer)) @ x64.abs().T
    assert_close_to_ref(y, expected, n_terms=40 + 2 * RANK, magnitude=mag.T + 1)
    assert (y - (x @ linear.weight.T + linear.bias)).abs().max() > 1e-4  # routing does matter


def test_lora_init():
    base = mlp()
    x = torch.randn(5, 40)
    model = goat.wrap(copy.deepcopy(base), config(init="lora")).eval()
    for (_, layer), orig in zip(goat.goat_layers(model), (base[0], base[2]), strict=True):
        assert torch.equal(layer.base_layer.weight, orig.weight)  # base untouched
        assert layer.alignment is None
        assert not layer.lora_b.any()
        bound = 1 / layer.in_features**0.5  # Kaiming-uniform(a = √5) = U(−1/√n, 1/√n)
        assert layer.lora_a.abs().max() <= bound and layer.lora_a.std() > bound / 3
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_init_is_reproducible_under_manual_seed():
    a = goat.wrap(mlp(), config(init="lora"))
    b = goat.wrap(mlp(), config(init="lora"))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_layer_too_small_for_the_rank():
    with pytest.raises(ValueError, match=r"'0'.*rank = 32"):
        goat.wrap(mlp(), goat.GoatConfig(rank=32))
    goat.wrap(mlp(), goat.GoatConfig(rank=32, init="lora"))  # plain LoRA has no such limit


def test_targets():
    model = mlp()
    with pytest.raises(ValueError, match=r"matches no nn\.Linear"):
        goat.wrap(model, config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"is a torch\.nn\.modules\.activation\.GELU"):
        goat.wrap(model, config(target_modules=["1"]))
    goat.wrap(model, config(target_modules=["2"]))
    assert [name for name, _ in goat.goat_layers(model)] == ["2"]
    assert isinstance(model[0], nn.Linear)
    with pytest.raises(ValueError, match="already has GOAT layers"):
        goat.wrap(model, config())
    shared = nn.Linear(16, 16)
    tied = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="shared"):
        goat.wrap(tied, config())


# ---- GOAT-s (per-expert scaling, the paper's App. E) ------------------------------------------


def test_goat_s_scaling_formula():
    """s_j = s·√(σ_1/σ_j), σ_j the sum of expert j's segment; a segment of zeros keeps s."""
    from meldkit.goat.init import goat_s_scaling

    sv = torch.tensor([[9.0, 7.0], [4.0, 4.0], [2.0, 2.0], [0.0, 0.0]])
    got = goat_s_scaling(sv, 2.0, 4)
    want = torch.tensor([2.0, 2.0 * 2**0.5, 2.0 * 2.0, 2.0])
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32
    assert torch.equal(goat_s_scaling(torch.zeros(2, 3), 1.5, 2), torch.full((2,), 1.5))


@pytest.mark.parametrize("init", ["goat", "pissa", "milora"])
def test_goat_s_init_matches_the_formulas(init):
    """Each expert starts at s_j·B_j A_j = (1/ρ) U_j Σ_j V_jᵀ with GOAT-s's own s_j, and the base
    is W̃0 = W0 − (1/E) Σ_j s_j B_j A_j."""
    model = mlp()
    w0 = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    cfg = config(init=init, rho=RHO, per_expert_scaling=True)
    goat.wrap(model, cfg)
    for (_, layer), w in zip(goat.goat_layers(model), w0, strict=True):
        m, n = w.shape
        s = cfg.scaling_for(n)
        u, sv, vh = (t.double() for t in torch.linalg.svd(w.float(), full_matrices=False))
        starts = segment_starts(init, min(m, n), E, D)
        sigma = torch.stack([sv[k : k + D].sum() for k in starts])
        assert isinstance(layer.scaling, torch.Tensor) and layer.scaling.dtype == torch.float32
        torch.testing.assert_close(layer.scaling.double(), s * (sigma[0] / sigma).sqrt())
        assert layer.scaling[0].item() == pytest.approx(s)
        assert (layer.scaling[1:] > s).all()  # later segments hold smaller singular values
        sbA = _dense(layer) * layer.scaling.double()[:, None, None]
        for j, k in enumerate(starts):
            seg = slice(k, k + D)
            expected = u[:, seg] @ torch.diag(sv[seg]) @ vh[seg] / RHO
            magnitude = (u[:, seg].abs() * sv[seg]) @ vh[seg].abs() / RHO
            assert_close_to_ref(sbA[j].float(), expected, n_terms=D + 4, magnitude=magnitude)
        delta = sbA.sum(0) / E
        magnitude = w.double().abs() + (layer.scaling.double().max() / E) * torch.einsum(
            "emd,edn->mn", layer.lora_b.double().abs(), layer.lora_a.double().abs()
        )
        assert_close_to_ref(
            layer.base_layer.weight, w.double() - delta, n_terms=RANK + 2, magnitude=magnitude
        )
        assert "scaling=[" in repr(layer)
        assert "scaling" not in layer.state_dict()


def test_goat_s_uniform_routing_reproduces_the_base_model():
    base = mlp()
    x = torch.randn(9, 40)
    expected = _base_output64(base, x)
    model = goat.wrap(copy.deepcopy(base), config(top_k=E, per_expert_scaling=True)).eval()
    for _, layer in goat.goat_layers(model):
        nn.init.zeros_(layer.router.weight)
    with torch.no_grad():
        y = model(x)
    layers = [layer for _, layer in goat.goat_layers(model)]
    w1, w2 = base[0].weight.double().abs(), base[2].weight.double().abs()
    h = base[1](base[0].double()(x.double())).abs()
    lr = [2 * float(layer.scaling.max()) * _dense_abs(layer) for layer in layers]
    first = (w1 + lr[0]) @ x.double().abs().T
    mag = ((w2 + lr[1]) @ (h.T + first.abs())).T + base[2].bias.double().abs()
    assert_close_to_ref(y, expected, n_terms=40 + 2 * RANK, magnitude=mag)


def test_goat_s_needs_an_svd_init():
    with pytest.raises(ValueError, match=r"per_expert_scaling.*needs an SVD init"):
        config(init="lora", per_expert_scaling=True)
    with pytest.raises(ValueError, match="per_expert_scaling: must be True or False"):
        config(per_expert_scaling=1)
