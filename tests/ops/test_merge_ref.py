"""The merge family's reference against the formulas of ../shared/spec/merging.md §2, on small
hand-checked examples and on random inputs (properties)."""

from __future__ import annotations

import pytest
import torch

from meldkit.merging import METHODS, get_method
from meldkit.ops import merge_ref as mr
from meldkit.ops.random_ref import bernoulli_mask_ref, stream_key, uniform_ref

# ---- counter-based random numbers ------------------------------------------------------------


def test_uniform_is_a_pure_function_of_seed_tensor_and_element():
    a = uniform_ref(1000, seed=42, tensor_index=3)
    assert torch.equal(a, uniform_ref(1000, seed=42, tensor_index=3))
    assert torch.equal(a[500:], uniform_ref(1000, 42, 3)[500:])  # no state: a suffix is a suffix
    assert not torch.equal(a, uniform_ref(1000, seed=43, tensor_index=3))
    assert not torch.equal(a, uniform_ref(1000, seed=42, tensor_index=4))
    assert a.dtype == torch.float32 and bool(((a >= 0) & (a < 1)).all())
    assert torch.equal(a * 2**24, (a * 2**24).round())  # multiples of 2^-24


def test_uniform_pinned_values():
    # Native kernels must reproduce these bits exactly (same seed -> same mask everywhere).
    assert stream_key(0, 0) == 1445982368
    got = (uniform_ref(4, seed=1234, tensor_index=7) * 2**24).to(torch.int64).tolist()
    assert got == [7263025, 14040694, 16564596, 2115529]
    big = uniform_ref(1, seed=2**64 - 1, tensor_index=2**32 - 1)
    assert 0 <= big.item() < 1


def test_uniform_statistics():
    u = uniform_ref(1 << 20, seed=7, tensor_index=0).double()
    assert abs(u.mean().item() - 0.5) < 2e-3
    assert abs(u.var().item() - 1 / 12) < 2e-3
    v = uniform_ref(1 << 20, seed=7, tensor_index=1).double()
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 5e-3
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 5e-3


def test_bernoulli_keep_fraction():
    m = bernoulli_mask_ref((1000, 1000), 0.3, seed=1, tensor_index=0)
    assert abs(m.float().mean().item() - 0.3) < 2e-3


def test_bad_seed_and_index():
    with pytest.raises(ValueError, match="seed"):
        uniform_ref(3, seed=-1, tensor_index=0)
    with pytest.raises(ValueError, match="tensor_index"):
        uniform_ref(3, seed=0, tensor_index=2**32)


# ---- sparsifiers -----------------------------------------------------------------------------


def test_magnitude_threshold_is_kthvalue_and_keeps_ties():
    tau = torch.tensor([0.5, -3.0, 2.0, -1.5, 0.1, 1.0])
    # density 0.5 -> k = int(6*0.5) = 3: the 3rd largest |tau| = kthvalue(|tau|, 6-3+1) = 1.5
    thr = mr.magnitude_threshold_ref(tau.abs(), 0.5)
    assert thr.item() == 1.5 == tau.abs().kthvalue(4).values.item()
    assert mr.magnitude_mask_ref(tau, 0.5).tolist() == [False, True, True, True, False, False]
    tied = torch.tensor([1.0, -1.0, 1.0, 0.5])
    assert mr.magnitude_mask_ref(tied, 0.5).sum().item() == 3  # k = 2, but all three 1.0s tie
    assert mr.magnitude_mask_ref(tied, 0.5, tie="exact_k").tolist() == [True, True, False, False]


def test_magnitude_extremes():
    tau = torch.randn(10, 7)
    assert bool(mr.magnitude_mask_ref(tau, 1.0).all())
    assert int(mr.magnitude_mask_ref(tau, 0.0).sum()) == 0
    assert int(mr.magnitude_mask_ref(tau, 0.0, tie="exact_k").sum()) == 0
    # k = int(70 * 0.01) = 0: keep_ties keeps nothing, exact_k keeps one (mergekit's magnitude
    # keeps at least one entry of a non-empty tensor)
    assert int(mr.magnitude_mask_ref(tau, 0.01).sum()) == 0
    kept = mr.magnitude_mask_ref(tau, 0.01, tie="exact_k")
    assert int(kept.sum()) == 1 and tau.abs()[kept].item() == tau.abs().max().item()
    assert int(mr.magnitude_mask_ref(tau, 1 / 70).sum()) == 1  # k = 1: only the max
    assert mr.magnitude_threshold_ref(torch.empty(0), 0.5).item() == float("inf")


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_magnitude_keeps_the_largest(density):
    tau = torch.randn(4099, dtype=torch.float64)
    mask = mr.magnitude_mask_ref(tau, density)
    assert mask.sum().item() == int(4099 * density)  # no ties among random doubles
    assert tau.abs()[mask].min() >= tau.abs()[~mask].max()
    assert torch.equal(mask, mr.magnitude_mask_ref(tau, density, tie="exact_k"))


def test_breadcrumbs_counts_and_order():
    tau = torch.arange(1, 101, dtype=torch.float64)  # |tau| ascending = index order
    mask = mr.breadcrumbs_mask_ref(tau, density=0.9, gamma=0.01)
    # n_top = 1, n_bot = 100 - 90 - 1 = 9: keep ranks [9, 99)
    assert mask.nonzero().flatten().tolist() == list(range(9, 99))
    # gamma*N < 1: n_top = 0 keeps ranks [n_bot, N) (mergekit's slice would drop everything)
    mask = mr.breadcrumbs_mask_ref(tau[:50], density=0.5, gamma=0.01)
    assert mask.nonzero().flatten().tolist() == list(range(25, 50))
    # n_bot < 0: n_top absorbs it
    mask = mr.breadcrumbs_mask_ref(tau, density=0.995, gamma=0.02)
    assert mask.sum().item() == 99


def test_della_keep_probabilities():
    tau = torch.tensor([[3.0, -1.0, 2.0], [0.5, 0.25, -4.0]])
    p = mr.della_keep_prob_ref(tau, density=0.5, epsilon=0.1)
    # ranks per row: [2, 0, 1] and [1, 0, 2] -> p = 0.4 + 0.2 * rank / 2
    assert torch.allclose(p, torch.tensor([[0.6, 0.4, 0.5], [0.5, 0.4, 0.6]]))
    with pytest.raises(ValueError, match="della needs"):
        mr.della_keep_prob_ref(tau, density=0.1, epsilon=0.15)


def test_rescale_modes():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([True, False, True, False])
    kept = tau * mask
    assert torch.equal(mr.rescale_ref(tau, kept, mask, "inverse_density", 0.5), kept * 2)
    l1 = mr.rescale_ref(tau, kept, mask, "l1")
    assert torch.isclose(l1.abs().sum(), tau.abs().sum())
    assert torch.equal(mr.rescale_ref(tau, torch.zeros(4), mask, "l1"), torch.zeros(4))


def test_rescale_of_non_finite_values():
    """Only kept entries are scaled by 1/density, even when it overflows float32 (dropped ones
    used to become 0·inf = NaN); an L1 factor that is not finite (an inf in τ, kept or not) is
    NaN, for every element."""
    tau = torch.tensor([1.0, -2.0, 0.0, -4.0])
    mask = torch.tensor([False, False, True, False])
    kept = tau * mask
    tiny = mr.rescale_ref(tau, kept, mask, "inverse_density", 1e-39)
    assert tiny.isnan().tolist() == [False, False, True, False]  # the kept zero: 0·inf
    assert tiny[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    inf = torch.tensor([1.0, float("inf"), 3.0, -4.0])
    mask = torch.tensor([True, False, True, False])
    assert mr.rescale_ref(inf, inf * mask, mask, "l1").isnan().all()  # the inf dropped
    mask = torch.tensor([True, True, True, False])
    kept = torch.where(mask, inf, 0.0)
    assert mr.rescale_ref(inf, kept, mask, "l1").isnan().all()  # the inf kept


def test_rescale_is_inert_without_a_mask():
    """task_arithmetic (sparsify "none") ignores ``rescale``, as the kernels do: with a NaN in
    τ, L1 rescaling used to make the whole result NaN on the reference only."""
    base, models = _models(n=2, shape=(6,), seed=2)
    models[0][3] = float("nan")
    kw = {"weights": [1.0, 0.5], "sparsify": "none"}
    plain = mr.generalized_merge_ref(base, models, **kw)
    for rescale in ("l1", "inverse_density"):
        got = mr.generalized_merge_ref(base, models, rescale=rescale, densities=[0.5] * 2, **kw)
        torch.testing.assert_close(got, plain, rtol=0, atol=0, equal_nan=True)
    assert plain.isnan().tolist() == [False, False, False, True, False, False]


def test_thresholds_apply_at_density_one():
    """Given magnitude thresholds keep ``|τ| ≥ threshold`` at the default density 1 too (they
    used to be ignored there); -inf keeps everything, NaN included."""
    base = torch.zeros(4)
    tau = torch.tensor([0.1, -0.01, 0.2, float("nan")])
    kw = {"weights": [1.0], "sparsify": "magnitude"}
    got = mr.generalized_merge_ref(base, [tau], thresholds=[0.05], **kw)
    assert torch.equal(got[:3], torch.tensor([0.1, 0.0, 0.2]))
    assert got[3] == 0  # a NaN below every threshold is dropped
    keep_all = mr.generalized_merge_ref(base, [tau], thresholds=[float("-inf")], **kw)
    torch.testing.assert_close(keep_all, tau, rtol=0, atol=0, equal_nan=True)


def test_sign_election():
    w = torch.tensor([[1.0, -1.0, 2.0, 0.0], [-3.0, -1.0, -1.0, 0.0], [1.0, 3.0, -0.5, 0.0]])
    assert mr.elect_sign_ref(w, "sum").tolist() == [-1.0, 1.0, 1.0, 1.0]  # vote 0 -> +1
    assert mr.elect_sign_ref(w, "count").tolist() == [1.0, -1.0, -1.0, 1.0]


# ---- methods --------------------------------------------------------------------------------


def _models(n=3, shape=(5, 7), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def test_task_arithmetic():
    base, models = _models()
    got = mr.generalized_merge_ref(base, models, weights=[0.5, 1.0, 2.0], lam=0.7)
    pairs = zip([0.5, 1.0, 2.0], models, strict=True)
    expected = base + 0.7 * sum(w * (m - base) for w, m in pairs)
    torch.testing.assert_close(got, expected)


def test_ties_with_unit_weights_is_the_papers_disjoint_mean():
    base, models = _models(n=4, seed=1)
    got = mr.generalized_merge_ref(
        base,
        models,
        weights=[1.0] * 4,
        densities=[0.4] * 4,
        sparsify="magnitude",
        consensus="sum",
        normalize=True,
    )
    # The paper's steps, written out: trim each tau to its top 40 %, elect by mass, mean of the
    # entries that agree with the elected sign.
    taus = torch.stack([m - base for m in models])
    trimmed = torch.stack([t * mr.magnitude_mask_ref(t, 0.4) for t in taus])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).double()
    agree = (trimmed.sign() == sign) & (trimmed != 0)
    mean = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    torch.testing.assert_close(got, base + mean)


def test_ties_weights_sway_the_vote_and_normalize():
    base = torch.zeros(1, dtype=torch.float64)
    models = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([-0.5], dtype=torch.float64)]
    # Without weights, +1 wins the vote; with weight 3 on the second model, -1.5 outweighs +1.
    got = mr.generalized_merge_ref(
        base, models, weights=[1.0, 3.0], sparsify="none", consensus="sum", normalize=True
    )
    assert got.item() == pytest.approx(-1.5 / 3.0)
    got = mr.generalized_merge_ref(base, models, weights=[1.0, 3.0], consensus="sum")
    assert got.item() == pytest.approx(-1.5)


def test_dare_is_reproducible_and_keeps_density():
    base, models = _models(n=2, shape=(300, 300), seed=2)
    kw = dict(
        weights=[1.0, 1.0], densities=[0.3, 0.3], sparsify="random", rescale="inverse_density"
    )
    a = mr.generalized_merge_ref(base, models, seed=5, tensor_index=1, **kw)
    assert torch.equal(a, mr.generalized_merge_ref(base, models, seed=5, tensor_index=1, **kw))
    assert not torch.equal(a, mr.generalized_merge_ref(base, models, seed=6, tensor_index=1, **kw))
    # One model with a positive task vector: 30 % kept, and 1/density rescaling preserves its sum
    # in expectation.
    positive = base + (models[0] - base).abs()
    one = mr.generalized_merge_ref(
        base, [positive], seed=5, **{**kw, "weights": [1.0], "densities": [0.3]}
    )
    assert abs((one != base).double().mean().item() - 0.3) < 0.01
    assert abs(((one - base).sum() / (positive - base).sum()).item() - 1) < 0.03


def test_dare_l1_rescale_matches_norm():
    base, models = _models(n=1, shape=(200, 50), seed=3)
    got = mr.generalized_merge_ref(
        base, models, weights=[1.0], densities=[0.2], sparsify="random", rescale="l1", seed=1
    )
    torch.testing.assert_close((got - base).abs().sum(), (models[0] - base).abs().sum())


def test_linear_model_stock_slerp():
    base, models = _models(n=3, seed=4)
    torch.testing.assert_close(
        mr.linear_ref(models, [1.0, 1.0, 2.0]), (models[0] + models[1] + 2 * models[2]) / 4
    )
    # model stock: identical task vectors -> cos = 1 -> t = 1 -> the fine-tuned model
    same = [models[0]] * 3
    torch.testing.assert_close(mr.model_stock_ref(base, same), models[0])
    # orthogonal task vectors -> cos = 0 -> t = 0 -> the base
    b = torch.zeros(2, dtype=torch.float64)
    ortho = [
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
    ]
    torch.testing.assert_close(mr.model_stock_ref(b, ortho), b)
    # slerp: endpoints, and a quarter turn between orthogonal unit vectors
    e0, e1 = ortho
    torch.testing.assert_close(mr.slerp_ref(e0, e1, 0.0), e0)
    torch.testing.assert_close(mr.slerp_ref(e0, e1, 1.0), e1)
    mid = mr.slerp_ref(e0, e1, 0.5)
    torch.testing.assert_close(mid, torch.tensor([0.5**0.5, 0.5**0.5], dtype=torch.float64))
    torch.testing.assert_close(mr.slerp_ref(e0, e0 * 2, 0.5), e0 * 1.5)  # colinear: lerp


def test_model_stock_clamps_the_norm_product_as_mergekit_does():
    # mergekit's model_stock divides <τ_i, τ_j> by max(‖τ_i‖·‖τ_j‖, 1e-6): with tiny task
    # vectors (norms 1e-4, product 1e-8) the cosine is 1e-8/1e-6 = 0.01, not 1 (which clamping
    # each norm to >= 1e-6 gives: the product of two norms is then >= 1e-12 < 1e-8).
    b = torch.zeros(2, dtype=torch.float64)
    tiny = [torch.tensor([1e-4, 0.0], dtype=torch.float64)] * 2
    cos = 1e-8 / 1e-6
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(mr.model_stock_ref(b, tiny), t * tiny[0])
    # opposite task vectors: 1 + (N - 1)·cos = 0, mergekit keeps the base there
    opposite = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    opposite.append(-opposite[0])
    torch.testing.assert_close(mr.model_stock_ref(b, opposite), b)
    # filter_wise: one t per vector along the last dimension, for any rank
    base3, models3 = _models(n=3, shape=(2, 3, 4), seed=5)
    rows = mr.model_stock_ref(base3, models3, filter_wise=True)
    for i in range(2):
        for j in range(3):
            one = mr.model_stock_ref(base3[i, j], [m[i, j] for m in models3])
            torch.testing.assert_close(rows[i, j], one)


def test_della_density_one_keeps_and_zero_drops_the_task_vector():
    # mergekit's della_magprune returns τ for density >= 1 and zeros for density <= 0, without
    # checking epsilon (density ± ε need not lie in (0, 1) there).
    base, models = _models(n=2, seed=6)
    kw = dict(weights=[1.0, 1.0], sparsify="della", consensus="sum", epsilons=[0.15, 0.15])
    for rescale in ("l1", "inverse_density", "none"):
        whole = mr.generalized_merge_ref(base, models, densities=[1.0, 1.0], rescale=rescale, **kw)
        plain = mr.generalized_merge_ref(base, models, weights=[1.0, 1.0], consensus="sum")
        assert torch.equal(whole, plain), rescale
        none = mr.generalized_merge_ref(base, models, densities=[0.0, 0.0], rescale=rescale, **kw)
        assert torch.equal(none, base), rescale


def test_registry_names_papers_and_rejects_unknown():
    for name, method in METHODS.items():
        assert method.name == name and method.paper
    assert get_method("ties").consensus == "sum" and get_method("ties").normalize
    assert get_method("dare_ties").rescale == "l1" and not get_method("dare_ties").normalize
    with pytest.raises(ValueError, match="unknown merge_method 'tiez'; known: breadcrumbs"):
        get_method("tiez")


@pytest.mark.parametrize("length", [1, 4095, 4096, 4097, 3 * 4096 + 5, 4096 * 4096 + 3])
def test_fixed_order_sum(length):
    """merge_ref._fixed_sum: float64 sums by blocks in a shape-fixed order (model_stock's and
    slerp's norms and inner products), equal to the float64 sum within its rounding."""
    from meldkit.ops.merge_ref import _fixed_sum

    rows = 1 if length > 10**6 else 3
    x = torch.randn(rows, length, generator=torch.Generator().manual_seed(length))
    got = _fixed_sum(x)
    assert got.dtype == torch.float64 and got.shape == (rows,)
    want = x.double().sum(-1)
    scale = x.double().abs().sum(-1)
    assert ((got - want).abs() <= 1e-13 * scale).all()
