"""logit_fusion against the float64 references: random rows on odd and LLaMA-sized vocabularies,
one and several experts, default and custom grids, −inf masking, fully masked rows, ties, known
optima, the paper's multi-task objective, the log-partition reference, empty batches, strided
inputs, NaN, bad arguments and opcheck."""

from __future__ import annotations

import math
import re

import pytest
import torch

from meldkit.ops import LogitFusionResult, logit_fusion, logit_fusion_ref
from meldkit.ops.logit_fusion_ref import (
    DEFAULT_ALPHAS,
    accumulation_dtype,
    alpha_grid,
    fused_logits_ref,
    logit_fusion_cgf_ref,
    logit_fusion_loss_cgf_ref,
    logit_fusion_loss_ref,
    select_ref,
    vocab_keep_ref,
)
from tests.helpers import DEVICES, DTYPES, OpNames, assert_close_to_ref, noncontiguous

NEG_INF = float("-inf")

# (B, V, T): every B in {1, 3, 64}, V in {7, 1000, 32000} (and V = 1), T in {1, 2, 4} (and 3);
# B = 64 stays off the 32000-wide vocabulary, whose float64 reference is slow.
CASES = [
    (1, 1, 1),
    (3, 1, 3),
    (3, 7, 3),
    (64, 7, 4),
    (1, 1000, 2),
    (64, 1000, 1),
    (3, 1000, 4),
    (3, 32000, 1),
    (1, 32000, 4),
]
GRIDS = {
    "unsorted": [1.5, 0.0, 0.7, 2.0, 0.2],
    "negative": [-1.0, 0.4, -0.3],
    "single": [0.6],
    "duplicates": [0.5, 1.0, 0.5],
}


def make_logits(n_rows, vocab, n_experts, dtype, device, seed, *, mask_prob=0.0):
    """Random ``(large [B, V], small_base [B, V], experts [T, B, V])`` like real models'.

    The large model and the experts are the small base plus noise (so KLs are O(1) and the
    optimum is usually inside the grid); with ``mask_prob`` each input is −inf at random
    positions. Generated in float64 on the CPU, so every device and dtype sees the same values.
    """
    gen = torch.Generator().manual_seed(seed)
    small = 3 * torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64)
    large = small + torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64)
    experts = small + torch.randn(n_experts, n_rows, vocab, generator=gen, dtype=torch.float64)
    out = []
    for t in (large, small, experts):
        if mask_prob:
            t = t.masked_fill(torch.rand(t.shape, generator=gen) < mask_prob, NEG_INF)
        out.append(t.to(device=device, dtype=dtype))
    return tuple(out)


# ---- the one tolerance rule --------------------------------------------------------------------


def sqrt_loss_tolerance(large, small_base, experts, alphas, loss64):
    """Bound on ``|√loss − √loss_ref|`` ``[B, T, n]`` for a kernel accumulating in acc.

    With eps that of the accumulation dtype, R the largest |logit| of the row (kept positions,
    every input), a = max(1, max|α|) and Z = (1 + 2a)·R the largest |exponent|: each
    log-sum-exp, and each expectation relative to the spread of what it averages, is within
    eps·(√V + Z): a random walk of V rounding errors in the reduction, plus the rounding of each
    exponent's argument. Each KL value and target is taken within δ = 8·eps·(√V + Z); the slack
    8 also covers the expectations' factor α and was checked against the CPU kernel and plain
    PyTorch float32 (at most 1.3·eps·(√V + Z), V up to 128k, logit scales 1 to 10, |α| ≤ 5).
    The loss's two residuals are then within 2δ each, √loss (their Euclidean norm) within
    2√2·δ, and storing the loss adds 2·eps·√loss.
    """
    eps = torch.finfo(accumulation_dtype(large.dtype)).eps
    keep = vocab_keep_ref(large, small_base, experts)
    mags = [large, small_base, *experts]
    r = torch.stack([torch.where(keep, z.double().abs(), 0.0).amax(-1) for z in mags]).amax(0)
    a = max(1.0, *(abs(x) for x in alphas))
    delta = 8 * eps * (math.sqrt(large.shape[-1]) + (1 + 2 * a) * r)  # [B]
    return 2 * eps * loss64.sqrt() + 2 * math.sqrt(2) * delta[:, None, None]


def check_against_reference(large, small_base, experts, alphas=None, *, return_logits=True):
    """Runs the op and checks it against the float64 direct reference:

    * dtypes, shapes, devices;
    * every loss within :func:`sqrt_loss_tolerance` of the reference's;
    * ``(alpha, expert)`` exactly the tie rule's argmin of the returned loss;
    * the chosen candidate's reference loss within tolerance of the reference's minimum (so it
      is the reference's choice unless the two are within rounding of each other);
    * logits = ``M_L + α·(M_t − M_S)`` at the returned α and expert, −inf exactly where masked.
    """
    res = logit_fusion(large, small_base, experts, alphas, return_logits=return_logits)
    assert isinstance(res, LogitFusionResult)
    grid_list = list(DEFAULT_ALPHAS if alphas is None else alphas)
    experts = experts if isinstance(experts, torch.Tensor) else torch.stack(list(experts))
    acc = accumulation_dtype(large.dtype)
    (n_rows, vocab), n_experts, n_alphas = large.shape, experts.shape[0], len(grid_list)
    assert res.alpha.shape == (n_rows,) and res.alpha.dtype == acc
    assert res.expert.shape == (n_rows,) and res.expert.dtype == torch.int64
    assert res.loss.shape == (n_rows, n_experts, n_alphas) and res.loss.dtype == acc
    for t in (res.alpha, res.expert, res.loss):
        assert t.device == large.device and not t.requires_grad

    cpu = [t.detach().cpu() for t in (large, small_base, experts)]
    loss64 = logit_fusion_loss_ref(*cpu, grid_list)
    tol = sqrt_loss_tolerance(*cpu, grid_list, loss64)
    loss = res.loss.cpu().double()
    assert not loss.isnan().any() and (loss >= 0).all()
    err = (loss.sqrt() - loss64.sqrt()).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{int(bad.sum())} of {loss.numel()} losses off (dtype {large.dtype}); first at "
            f"{i}: got {loss[i].item()!r}, expected {loss64[i].item()!r}, "
            f"√-bound {tol[i].item():.3g}"
        )

    grid = alpha_grid(grid_list, large.dtype)
    rows = vocab_keep_ref(*cpu).any(-1)
    alpha, expert = res.alpha.cpu(), res.expert.cpu()
    want_alpha, want_expert = select_ref(res.loss.cpu(), grid, rows)
    assert torch.equal(alpha, want_alpha) and torch.equal(expert, want_expert)

    sqrt_ref = loss64.sqrt().flatten(1)  # [B, T·n]
    best = sqrt_ref.argmin(-1)
    chosen = loss64.sqrt()[torch.arange(n_rows), expert]  # [B, n]
    chosen = torch.where(grid == alpha[:, None], chosen, math.inf).amin(-1)
    slack = tol.flatten(1).gather(1, best[:, None])[:, 0] + tol.flatten(1).amax(-1)
    assert (~rows | (chosen <= sqrt_ref.amin(-1) + slack)).all()

    if not return_logits:
        assert res.logits is None
        return res, loss64
    assert res.logits.shape == (n_rows, vocab) and res.logits.dtype == acc
    assert res.logits.device == large.device and not res.logits.requires_grad
    want = fused_logits_ref(*cpu, alpha, expert)
    assert torch.equal(res.logits.cpu() == NEG_INF, want == NEG_INF)
    assert not res.logits.isnan().any()
    z_large, z_small, z_experts = (t.double() for t in cpu)
    z_chosen = z_experts[expert, torch.arange(n_rows)]
    mag = z_large.abs() + alpha.double().abs()[:, None] * (z_chosen.abs() + z_small.abs())
    kept = want != NEG_INF
    assert_close_to_ref(res.logits.cpu()[kept], want[kept], magnitude=mag[kept])
    return res, loss64


# ---- random rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(device, dtype, case):
    large, small, experts = make_logits(*case, dtype, device, seed=CASES.index(case))
    check_against_reference(large, small, experts)


@pytest.mark.parametrize("case", CASES[2:], ids=str)
def test_float64(case):
    large, small, experts = make_logits(*case, torch.float64, "cpu", seed=10 + CASES.index(case))
    res, loss64 = check_against_reference(large, small, experts)
    assert res.alpha.dtype == res.loss.dtype == res.logits.dtype == torch.float64
    assert torch.allclose(res.loss, loss64, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_custom_grids(device, dtype, grid):
    large, small, experts = make_logits(8, 1000, 3, dtype, device, seed=20)
    res, _ = check_against_reference(large, small, experts, GRIDS[grid])
    assert set(res.alpha.tolist()) <= set(alpha_grid(GRIDS[grid], dtype).tolist())


UNIFORM_GRIDS = {
    "papers": None,
    "long": [0.05 * i for i in range(64)],  # runs cut by the run length, not the span
    "negative": [-1.0 + 0.25 * i for i in range(13)],
    "descending": [2.0 - 0.1 * i for i in range(21)],
    "piecewise": [0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 3.0, 2.9, 2.8],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", UNIFORM_GRIDS, ids=str)
def test_uniform_grids_by_product_runs(device, dtype, grid):
    # The CPU kernel computes most candidates of a uniform grid as products exp(h·d) of the
    # previous one, in runs whose length depends on max|d| per 256-position tile. Rows whose
    # experts sit 0.01 to 60 logits from the small base take every run length from the longest
    # down to none (the direct exp everywhere); one row mixes both within the row, and -inf
    # masks cut through runs.
    gen = torch.Generator().manual_seed(40)
    rows, vocab, n_experts = 6, 3000, 2
    small = 3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    large = small + torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    spread = torch.tensor([0.01, 0.3, 1.0, 4.0, 60.0, 1.0], dtype=torch.float64)[:, None]
    spread = spread.expand(rows, vocab).clone()
    spread[5, 1500:] = 40.0
    noise = torch.randn(n_experts, rows, vocab, generator=gen, dtype=torch.float64)
    experts = small + spread * noise
    masks = torch.rand(n_experts + 2, rows, vocab, generator=gen) < 0.05
    large = large.masked_fill(masks[0], NEG_INF)
    experts = experts.masked_fill(masks[2:], NEG_INF)
    inputs = [t.to(device=device, dtype=dtype) for t in (large, small, experts)]
    check_against_reference(*inputs, UNIFORM_GRIDS[grid])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_experts", "grid"),
    [
        (2, [0.01 * i for i in range(201)]),  # a finer grid: 4 native calls
        (16, [2.0 - 0.03 * i for i in range(70)]),  # descending, with the most experts
    ],
    ids=["alphas201", "experts16"],
)
def test_grids_beyond_one_native_call(device, dtype, n_experts, grid):
    # More than MAX_ALPHAS grid points run in chunks; the results are one call's: losses, the
    # tie rule over the whole grid, masks. Row 0's experts equal the base: loss 0 for
    # every α, so the tie rule must pick the smallest α, which sits in another chunk.
    large, small, experts = make_logits(5, 300, n_experts, dtype, device, seed=24, mask_prob=0.05)
    experts = experts.clone()
    experts[:, 0] = small[0]
    res, _ = check_against_reference(large, small, experts, grid)
    assert res.loss.shape == (5, n_experts, len(grid))
    assert res.alpha[0].item() == min(alpha_grid(grid, dtype).tolist())
    assert torch.equal(res.logits == NEG_INF, ~vocab_keep_ref(large, small, experts))


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_16_experts_are_refused(device):
    large, small, experts = make_logits(2, 7, 17, torch.float32, device, seed=26)
    with pytest.raises(ValueError, match=r"'experts': has T = 17 experts; at most 16"):
        logit_fusion(large, small, experts)


def test_native_limits_are_the_documented_ones():
    from meldkit import _native
    from meldkit.ops.logit_fusion import MAX_ALPHAS, MAX_EXPERTS

    if _native.unavailable("logit_fusion", torch.device("cpu"), (torch.float32,)):
        pytest.skip("no native CPU kernel")
    large, small, experts = make_logits(1, 7, MAX_EXPERTS + 1, torch.float32, "cpu", seed=25)
    out = [torch.empty(1, MAX_EXPERTS + 1, 1), torch.empty(1), torch.empty(1, dtype=torch.long)]
    with pytest.raises(ValueError, match=f"1 to {MAX_EXPERTS} experts"):
        _native._C.logit_fusion(large, small, experts, [0.0], *out, None, 0)
    out[0] = torch.empty(1, 1, MAX_ALPHAS + 1)
    with pytest.raises(ValueError, match=f"1 to {MAX_ALPHAS} values"):
        _native._C.logit_fusion(large, small, experts[:1], [0.0] * (MAX_ALPHAS + 1), *out, None, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_grid_as_tensor(device):
    large, small, experts = make_logits(3, 7, 3, torch.float32, device, seed=21)
    grid = [0.3, -0.2, 1.7]
    want = logit_fusion(large, small, experts, grid)
    for alphas in (torch.tensor(grid), torch.tensor(grid, dtype=torch.float64, device=device)):
        res = logit_fusion(large, small, experts, alphas)
        for a, b in zip(res, want, strict=True):
            assert torch.equal(a, b)


def test_default_grid_is_the_papers():
    assert DEFAULT_ALPHAS == tuple(i / 10 for i in range(21))
    f32 = alpha_grid(DEFAULT_ALPHAS, torch.bfloat16)
    assert f32.dtype == torch.float32
    assert torch.equal(f32, torch.tensor([i / 10 for i in range(21)], dtype=torch.float32))
    large, small, experts = make_logits(3, 7, 1, torch.float32, "cpu", seed=22)
    assert logit_fusion(large, small, experts).loss.shape == (3, 1, 21)


# ---- known answers -------------------------------------------------------------------------------


def quantised_logits(n_rows, vocab, n_experts, dtype, device, seed):
    """Multiples of 1/8 below 32 in magnitude: exact in every dtype, and after adding small
    integers, so a shift of the whole row is exact."""
    gen = torch.Generator().manual_seed(seed)

    def q(shape, scale):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        return (x * 8).round().clamp(-120, 120) / 8

    small = q((n_rows, vocab), 3)
    experts = (small + q((n_experts, n_rows, vocab), 1)).clamp(-20, 20)
    return small.to(device, dtype), experts.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_equal_to_small_base_gives_alpha_one(device, dtype):
    # M_L = M_S + c (a shift per row): P̃ at α = 1 is exactly Q_t, so the loss is 0 there, and
    # both KLs grow strictly with α ≥ 0, so α = 1 is the only zero on any grid holding it.
    small, experts = quantised_logits(4, 1000, 1, dtype, device, seed=30)
    shift = torch.tensor([0.0, 3.0, -2.0, 1.0], device=device, dtype=dtype)[:, None]
    large = small + shift
    for grid in (None, [2.0, 1.0, 0.0, 0.5], [-1.0, 1.0, 1.5]):
        res, loss64 = check_against_reference(large, small, experts, grid)
        assert (res.alpha == 1.0).all() and (res.expert == 0).all()
        assert loss64.amin(-1).max() < 1e-20
    # Two identical experts: each has loss 0 at α = 1; the tie goes to expert 0.
    experts2 = torch.cat([experts, experts])
    res, _ = check_against_reference(large, small, experts2)
    assert (res.alpha == 1.0).all() and (res.expert == 0).all()
    assert torch.equal(res.loss[:, 0], res.loss[:, 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_equal_to_base_give_the_smallest_alpha(device, dtype):
    # d_t = 0: every candidate has P̃ = P and both targets 0, so every loss is exactly 0 and
    # the tie rule picks the smallest α (0 on the paper's grid: plain large-model decoding).
    large, small, experts = make_logits(3, 1000, 3, dtype, device, seed=31)
    experts = experts.clone()
    experts[:, 1] = small[1]  # row 1 only
    for grid, smallest in ((None, 0.0), ([0.5, -0.5, 1.0], -0.5), ([2.0, 0.0], 0.0)):
        res, _ = check_against_reference(large, small, experts, grid)
        assert res.alpha[1].item() == smallest and res.expert[1].item() == 0
        assert (res.loss[1] == 0).all()
        assert torch.equal(res.logits[1], large[1].to(res.logits.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_experts_tie_to_the_lower_index(device, dtype):
    large, small, experts = make_logits(8, 1000, 2, dtype, device, seed=32)
    experts = torch.stack([experts[1], experts[0], experts[1]])  # experts 0 and 2 identical
    res, _ = check_against_reference(large, small, experts)
    assert torch.equal(res.loss[:, 0], res.loss[:, 2])
    assert (res.expert != 2).all()


# ---- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(3, 7, 3), (8, 1000, 1), (1, 32000, 3)], ids=str)
def test_masked_positions(device, dtype, case):
    large, small, experts = make_logits(*case, dtype, device, seed=40, mask_prob=0.1)
    res, _ = check_against_reference(large, small, experts)
    keep = vocab_keep_ref(large, small, experts)
    assert torch.equal(res.logits == NEG_INF, ~keep)


def test_masked_positions_do_not_exist_for_the_reference():
    # The loss of a row equals the loss of that row with its masked positions removed.
    large, small, experts = make_logits(4, 300, 3, torch.float64, "cpu", seed=41, mask_prob=0.1)
    keep = vocab_keep_ref(large, small, experts)
    loss = logit_fusion_loss_ref(large, small, experts, DEFAULT_ALPHAS)
    for b in range(4):
        cols = keep[b]
        sub = logit_fusion_loss_ref(
            large[b : b + 1, cols],
            small[b : b + 1, cols],
            experts[:, b : b + 1, cols],
            DEFAULT_ALPHAS,
        )
        torch.testing.assert_close(loss[b : b + 1], sub, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows(device, dtype):
    large, small, experts = make_logits(4, 1000, 3, dtype, device, seed=42)
    large, small, experts = large.clone(), small.clone(), experts.clone()
    large[1] = NEG_INF  # row 1: one input masks everything
    small[3, :400] = NEG_INF  # row 3: the inputs mask a part each
    large[3, 400:700] = NEG_INF
    experts[2, 3, 700:] = NEG_INF
    for grid in (None, [0.5, 1.5]):
        res, _ = check_against_reference(large, small, experts, grid)
        for b in (1, 3):
            assert res.alpha[b].item() == 0.0 and res.expert[b].item() == 0
            assert (res.loss[b] == 0).all() and (res.logits[b] == NEG_INF).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_position_masked_in_every_input(device, dtype):
    large, small, experts = make_logits(3, 1000, 3, dtype, device, seed=43)
    cols = [0, 17, 999]
    masked = [t.clone() for t in (large, small, experts)]
    for t in masked:
        t[..., cols] = NEG_INF
    res, _ = check_against_reference(*masked)
    assert (res.logits[:, cols] == NEG_INF).all()


# ---- the references agree with each other and with the paper -----------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [(3, 7, 3), (8, 1000, 1), (1, 32000, 3)], ids=str)
def test_cgf_reference_matches_direct(dtype, case):
    for mask_prob, grid in ((0.0, DEFAULT_ALPHAS), (0.1, [1.5, -0.7, 0.0, 3.0])):
        large, small, experts = make_logits(*case, dtype, "cpu", seed=50, mask_prob=mask_prob)
        direct = logit_fusion_loss_ref(large, small, experts, grid)
        cgf = logit_fusion_loss_cgf_ref(large, small, experts, grid)
        torch.testing.assert_close(cgf, direct, rtol=1e-9, atol=1e-12)
    for rows in (large, large.clone().fill_(NEG_INF)):  # as drawn, and every row masked
        a = logit_fusion_ref(rows, small, experts, grid)
        b = logit_fusion_cgf_ref(rows, small, experts, grid)
        assert torch.equal(a.alpha, b.alpha) and torch.equal(a.expert, b.expert)
        assert torch.equal(a.logits, b.logits)


def test_reference_is_the_papers_multi_task_objective():
    # Σ_t [(KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²] with P̃ from one active expert
    # equals T·loss + a constant per row, so both pick the same candidate.
    n_experts = 3
    large, small, experts = make_logits(4, 500, n_experts, torch.float64, "cpu", seed=51)

    def kl(p_logits, q_logits):  # KL(softmax(p)‖softmax(q)), computed independently
        log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)

    fwd_targets = torch.stack([kl(e, small) for e in experts])  # [T, B]
    rev_targets = torch.stack([kl(small, e) for e in experts])
    paper = torch.empty(4, n_experts, len(DEFAULT_ALPHAS), dtype=torch.float64)
    for t in range(n_experts):
        for j, alpha in enumerate(DEFAULT_ALPHAS):
            fused = large + alpha * (experts[t] - small)
            paper[:, t, j] = (
                (kl(fused, large) - fwd_targets) ** 2 + (kl(large, fused) - rev_targets) ** 2
            ).sum(0)
    loss = logit_fusion_loss_ref(large, small, experts, DEFAULT_ALPHAS)
    const = (fwd_targets - fwd_targets.mean(0)).square().sum(0)
    const += (rev_targets - rev_targets.mean(0)).square().sum(0)
    torch.testing.assert_close(paper, n_experts * loss + const[:, None, None], rtol=1e-10, atol=0)
    res = logit_fusion_ref(large, small, experts)
    best = paper.flatten(1).argmin(-1)
    assert torch.equal(res.expert, best // len(DEFAULT_ALPHAS))
    assert torch.equal(
        res.alpha, alpha_grid(DEFAULT_ALPHAS, torch.float64)[best % len(DEFAULT_ALPHAS)]
    )


# ---- arguments and results -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_return_logits_false(device):
    large, small, experts = make_logits(3, 1000, 3, torch.bfloat16, device, seed=60)
    res, _ = check_against_reference(large, small, experts, return_logits=False)
    full = logit_fusion(large, small, experts)
    assert torch.equal(res.alpha, full.alpha) and torch.equal(res.expert, full.expert)
    assert torch.equal(res.loss, full.loss)


@pytest.mark.parametrize("device", DEVICES)
def test_list_of_experts(device):
    large, small, experts = make_logits(3, 1000, 3, torch.float16, device, seed=61)
    res, _ = check_against_reference(large, small, list(experts.unbind(0)))
    want = logit_fusion(large, small, experts)
    for a, b in zip(res, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    large, small, experts = make_logits(3, 1000, 3, torch.float32, device, seed=62)
    want = logit_fusion(large, small, experts)
    for args in (
        (noncontiguous(large), small, experts),
        (large, noncontiguous(small), noncontiguous(experts)),
        (large.T.contiguous().T, small, experts.transpose(0, 1).contiguous().transpose(0, 1)),
    ):
        res = logit_fusion(*args)
        for a, b in zip(res, want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_logits", [True, False])
def test_empty_batch(device, return_logits):
    large, small, experts = make_logits(0, 7, 3, torch.bfloat16, device, seed=63)
    res = logit_fusion(large, small, experts, [0.0, 1.0], return_logits=return_logits)
    assert res.alpha.shape == (0,) and res.alpha.dtype == torch.float32
    assert res.expert.shape == (0,) and res.expert.dtype == torch.int64
    assert res.loss.shape == (0, 3, 2)
    assert res.logits is None if not return_logits else res.logits.shape == (0, 7)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_requiring_grad_are_detached(device):
    large, small, experts = make_logits(3, 7, 3, torch.float32, device, seed=64)
    large.requires_grad_()
    experts.requires_grad_()
    res = logit_fusion(large, small, list(experts.unbind(0)))
    assert not any(t.requires_grad for t in res)
    res = logit_fusion(large, small, experts)
    assert not any(t.requires_grad for t in res)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    large, small, experts = make_logits(3, 7, 3, dtype, device, seed=65, mask_prob=0.1)
    op = torch.ops.meldkit.logit_fusion.default
    torch.library.opcheck(op, (large, small, experts, [0.0, 0.5, 1.0], True, None))
    torch.library.opcheck(op, (large, small, experts[:1], [1.0, -0.5], False, None))
    ranges = [0.0, 0.5, 0.5, 1.0, -1.0, 0.0]
    torch.library.opcheck(op, (large, small, experts, [0.0, 0.5, 1.0], True, ranges))
    empty = make_logits(0, 7, 2, dtype, device, seed=66)
    torch.library.opcheck(op, (*empty, [0.0], True, None))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_are_refused(device):
    large, small, experts = make_logits(3, 7, 3, torch.float32, device, seed=67)
    cases = (
        ("large", "nan", (1, 4)),
        ("small_base", "inf", (1, 4)),
        ("experts[2]", "nan", (2, 1, 4)),
    )
    for name, value, where in cases:
        args = {"large": large, "small_base": small, "experts[2]": experts}
        bad = args[name].clone()
        bad[where] = float(value)
        args[name] = bad
        with pytest.raises(ValueError, match=rf"argument '{re.escape(name)}': contains"):
            logit_fusion(args["large"], args["small_base"], args["experts[2]"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernels_survive_nan_and_inf(device, dtype):
    # The public call reads its NaN/+inf check after the kernel is launched, and the custom op
    # does not check at all: the kernels must return, with in-range experts and grid values,
    # whatever the inputs hold (the wrapper then raises; the op passes the values on).
    grid = [0.0, 0.25, 0.5, 1.0, 2.0]
    large, small, experts = make_logits(6, 300, 3, dtype, device, seed=70)
    large, small, experts = large.clone(), small.clone(), experts.clone()
    large[0, 5], small[1, :], experts[1, 1, 7] = math.nan, math.inf, math.nan
    experts[:, 3] = math.nan  # every expert of row 3
    large[4, 10], small[4, 10] = math.inf, -math.inf
    large[5, :], experts[0, 5, :] = -math.inf, math.nan  # masked row with NaN experts
    op = torch.ops.meldkit.logit_fusion.default
    for return_logits in (True, False):
        alpha, expert, logits, loss = op(large, small, experts, grid, return_logits, None)
        assert ((expert >= 0) & (expert < 3)).all()
        assert all(a in grid for a in alpha.tolist())
        assert loss.shape == (6, 3, len(grid))
        # rows without NaN or +inf are untouched by the others
        ref = logit_fusion(large[2:3], small[2:3], experts[:, 2:3], grid)
        assert alpha[2] == ref.alpha[0] and expert[2] == ref.expert[0]
        if return_logits:
            assert logits.shape == large.shape
    with pytest.raises(ValueError, match="argument 'large': contains NaN"):
        logit_fusion(large, small, experts, grid)


def test_bad_arguments_name_themselves():
    large, small, experts = make_logits(3, 7, 2, torch.float32, "cpu", seed=68)

    def call(*args, **kw):
        return lambda: logit_fusion(*args, **kw)

    cases = [
        (call("x", small, experts), TypeError, "'large': expected a tensor"),
        (call(large.int(), small, experts), TypeError, "'large': dtype torch.int32"),
        (call(large[0], small, experts), ValueError, "'large': expected 2 dimensions"),
        (call(large[:, :0], small[:, :0], experts[..., :0]), ValueError, "'large': shape [3, 0]"),
        (call(large, small[:2], experts), ValueError, "'small_base': shape [2, 7]"),
        (call(large, small.double(), experts), TypeError, "'small_base': dtype torch.float64"),
        (call(large, small, experts[0]), ValueError, "'experts': expected [T, B, V]"),
        (call(large, small, experts[:0]), ValueError, "'experts': has T = 0"),
        (call(large, small, []), ValueError, "'experts': is empty"),
        (call(large, small, experts[:, :2]), ValueError, "'experts': shape [2, 2, 7]"),
        (call(large, small, experts.half()), TypeError, "'experts': dtype torch.float16"),
        (call(large, small, experts[None]), ValueError, "'experts': expected 3 dimensions"),
        (call(large, small, "e"), TypeError, "'experts': expected a [T, B, V] tensor"),
        (call(large, small, [experts[0], "e"]), TypeError, "'experts[1]': expected a tensor"),
        (call(large, small, [experts[0], small[:2]]), ValueError, "'experts[1]': shape [2, 7]"),
        (call(large, small, [experts[0].half()]), TypeError, "'experts[0]': dtype"),
        (call(large, small, experts, []), ValueError, "'alphas': is empty"),
        (call(large, small, experts, torch.ones(2, 2)), ValueError, "'alphas': expected a 1-D"),
        (call(large, small, experts, torch.ones(2).bool()), TypeError, "'alphas': dtype"),
        (call(large, small, experts, 0.5), TypeError, "'alphas': expected a sequence"),
        (call(large, small, experts, [0.5, "1"]), TypeError, "'alphas[1]': expected a float"),
        (call(large, small, experts, [True]), TypeError, "'alphas[0]': expected a float"),
        (call(large, small, experts, [0.5, math.inf]), ValueError, "'alphas[1]': must be fin"),
        (call(large, small, experts, [math.nan]), ValueError, "'alphas[0]': must be finite"),
        (call(large, small, experts, [1e39]), ValueError, "'alphas[0]': must be finite"),
        (call(large, small, experts, return_logits=1), TypeError, "'return_logits'"),
    ]
    if torch.cuda.is_available():
        cases += [
            (call(large, small.cuda(), experts), TypeError, "'small_base': is on cuda:0"),
            (call(large, small, [experts[0].cuda()]), TypeError, "'experts[0]': is on cuda"),
        ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
        assert "meldkit.logit_fusion: argument '" in str(info.value)


def test_eager_calls_skip_the_library_dispatch(monkeypatch):
    """An eager call goes straight to the op's CPU/CUDA implementation (per decoding step the
    dispatch was a large part of the fixed cost); under a dispatch mode (fake tensors, op
    counters) it goes through ``torch.ops.meldkit.logit_fusion``. Same results."""
    import importlib

    lf = importlib.import_module("meldkit.ops.logit_fusion")
    large, small, experts = make_logits(3, 50, 2, torch.float32, "cpu", seed=4)
    direct = []
    native = lf._logit_fusion_native
    monkeypatch.setattr(lf, "_logit_fusion_native", lambda *a: direct.append(1) or native(*a))
    first = logit_fusion(large, small, experts)
    assert direct == [1]

    with OpNames.mode() as mode:
        second = logit_fusion(large, small, experts)
    assert direct == [1] and "meldkit.logit_fusion.default" in mode.names
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---- per-expert ranges -------------------------------------------------------------------------


def check_ranges(large, small, experts, grid, ranges):
    """The restricted call: the unrestricted call's losses inside each expert's range (bit for
    bit: the same kernel), +inf outside, the tie rule's argmin over what is left, and logits
    fused at that candidate."""
    from meldkit.ops.logit_fusion_ref import allowed_ref

    full = logit_fusion(large, small, experts, grid)
    res = logit_fusion(large, small, experts, grid, ranges=ranges)
    grid_list = list(DEFAULT_ALPHAS if grid is None else grid)
    pairs = ranges if not isinstance(ranges[0], (int, float)) else [ranges] * experts.shape[0]
    allowed = allowed_ref(grid_list, pairs, experts.shape[0], large.dtype).to(large.device)
    inside = allowed.expand_as(res.loss)
    assert torch.equal(res.loss[inside], full.loss[inside])
    assert (res.loss[~inside] == math.inf).all()
    cpu = [t.cpu() for t in (large, small, experts)]
    rows = vocab_keep_ref(*cpu).any(-1)
    want_alpha, want_expert = select_ref(res.loss.cpu(), alpha_grid(grid_list, large.dtype), rows)
    assert torch.equal(res.alpha.cpu(), want_alpha) and torch.equal(res.expert.cpu(), want_expert)
    lo = torch.tensor([p[0] for p in pairs], dtype=res.alpha.dtype)[want_expert]
    hi = torch.tensor([p[1] for p in pairs], dtype=res.alpha.dtype)[want_expert]
    assert (~rows | ((lo <= want_alpha) & (want_alpha <= hi))).all()
    want = fused_logits_ref(*cpu, want_alpha, want_expert)
    kept = want != NEG_INF
    assert torch.equal(res.logits.cpu() == NEG_INF, ~kept)
    torch.testing.assert_close(res.logits.cpu()[kept].double(), want[kept], rtol=1e-5, atol=1e-4)
    ref = logit_fusion_ref(*cpu, grid, ranges=pairs)
    assert (ref.loss[~inside.cpu()] == math.inf).all()
    assert torch.equal(ref.loss.isfinite(), res.loss.cpu().isfinite())
    return res


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_expert_ranges(device, dtype):
    large, small, experts = make_logits(16, 1000, 3, dtype, device, seed=60, mask_prob=0.02)
    res = check_ranges(large, small, experts, None, [(0.0, 0.5), (0.3, 1.2), (1.0, 2.0)])
    # Expert 2 may only take α ≥ 1: where it is chosen, α is at least 1.
    assert (res.alpha[res.expert == 2] >= 1.0).all()
    # One pair for every expert; ±inf bounds.
    check_ranges(large, small, experts, None, (0.2, 0.6))
    check_ranges(
        large, small, experts, [0.0, 0.5, 1.0, 1.5], [(-math.inf, 0.1), (0.5, 0.5), (1.5, math.inf)]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_with_ranges(device, dtype):
    """A fully masked row keeps the ranges: loss 0 inside each expert's range and +inf outside,
    as the reference, with α = 0 and expert 0."""
    large, small, experts = make_logits(4, 300, 2, dtype, device, seed=63)
    large, experts = large.clone(), experts.clone()
    large[1] = NEG_INF
    experts[1, 2] = NEG_INF
    for ranges in ([(0.0, 1.5), (0.0, 0.5)], [(0.5, 1.5), (1.0, 1.0)]):
        res = check_ranges(large, small, experts, [0.0, 0.5, 1.0, 1.5], ranges)
        for b in (1, 2):
            assert res.alpha[b].item() == 0.0 and res.expert[b].item() == 0
            assert (res.loss[b].isinf() | (res.loss[b] == 0)).all()
            assert res.loss[b].isinf().any()


@pytest.mark.parametrize("device", DEVICES)
def test_per_expert_ranges_beyond_one_native_call(device):
    large, small, experts = make_logits(5, 300, 2, torch.float32, device, seed=61)
    grid = [0.01 * i for i in range(201)]  # 4 native calls; the ranges cut across them
    check_ranges(large, small, experts, grid, [(0.5, 0.7), (0.62, 1.9)])


@pytest.mark.parametrize("device", DEVICES)
def test_a_one_point_range_is_static_fusion(device):
    """A range holding only α = 1 is proxy-tuning: M_L + (M_t − M_S)."""
    large, small, experts = make_logits(4, 100, 1, torch.float32, device, seed=62)
    res = logit_fusion(large, small, experts, ranges=[(1.0, 1.0)])
    assert (res.alpha == 1.0).all() and (res.expert == 0).all()
    torch.testing.assert_close(res.logits, large + (experts[0] - small))


def test_ranges_compare_in_the_grids_rounding():
    """float32(0.1) > 0.1, but a range ending at 0.1 holds the grid point 0.1: both sides are
    rounded to the accumulation dtype."""
    large, small, experts = make_logits(2, 50, 1, torch.float32, "cpu", seed=63)
    res = logit_fusion(large, small, experts, ranges=[(0.1, 0.1)])
    assert torch.equal(res.alpha, torch.full((2,), 0.1, dtype=torch.float32))


def test_bad_ranges_are_refused():
    large, small, experts = make_logits(2, 7, 2, torch.float32, "cpu", seed=64)
    cases = [
        ([(0.0, 1.0)], ValueError, r"'ranges': has 1 ranges for T = 2 experts"),
        ([(0.0, 1.0), (1.5, 1.0)], ValueError, r"'ranges\[1\]': expected lo <= hi"),
        ([(0.0, 1.0), (0.0, math.nan)], ValueError, r"'ranges\[1\]': expected lo <= hi"),
        ([(0.0, 1.0), (2.05, 3.0)], ValueError, r"'ranges\[1\]'.*holds no point of the grid"),
        ([(0.0, 1.0), (0.0, "1")], TypeError, r"'ranges\[1\]': expected a pair of floats"),
        ([(0.0, 1.0), (0.0, 0.5, 1.0)], TypeError, r"'ranges\[1\]': expected a pair"),
        ("0,1", TypeError, r"'ranges': expected \(lo, hi\)"),
        (torch.zeros(2, 3), ValueError, r"'ranges': expected a \[T, 2\] tensor"),
    ]
    for ranges, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            logit_fusion(large, small, experts, ranges=ranges)
    res = logit_fusion(large, small, experts, ranges=torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    assert (res.loss[:, 1, :10] == math.inf).all()
    import numpy as np

    same = logit_fusion(large, small, experts, ranges=np.array([[0.0, 1.0], [1.0, 2.0]]))
    assert torch.equal(same.loss, res.loss)
    one = logit_fusion(large, small, experts, ranges=torch.tensor([0.0, 1.0]))
    assert torch.equal(one.loss, logit_fusion(large, small, experts, ranges=(0.0, 1.0)).loss)


def test_native_candidate_masks_are_checked():
    from meldkit import _native

    if _native.unavailable("logit_fusion", torch.device("cpu"), (torch.float32,)):
        pytest.skip("no native CPU kernel")
    large, small, experts = make_logits(1, 7, 2, torch.float32, "cpu", seed=68)
    out = [torch.empty(1, 2, 3), torch.empty(1), torch.empty(1, dtype=torch.long), None]
    call = _native._C.logit_fusion
    with pytest.raises(ValueError, match=r"'allowed': 1 masks for 2 experts"):
        call(large, small, experts, [0.0, 0.5, 1.0], *out, 0, [7])
    with pytest.raises(ValueError, match=r"'allowed': mask 1 has bits beyond the 3 grid points"):
        call(large, small, experts, [0.0, 0.5, 1.0], *out, 0, [7, 8])
    with pytest.raises(TypeError, match=r"'allowed': expected None or 2 non-negative ints"):
        call(large, small, experts, [0.0, 0.5, 1.0], *out, 0, [7, -1])
    call(large, small, experts, [0.0, 0.5, 1.0], *out, 0, [0b100, 0b001])
    assert out[0][0, 0, :2].isinf().all() and out[0][0, 1, 1:].isinf().all()
    assert out[0][0, 0, 2].isfinite() and out[0][0, 1, 0].isfinite()
    # No candidate at all (a chunk of a split grid): alpha 0, expert 0.
    call(large, small, experts, [0.0, 0.5, 1.0], *out, 0, [0, 0])
    assert out[1].item() == 0.0 and out[2].item() == 0 and out[0].isinf().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.filterwarnings("ignore::meldkit.MeldkitFallbackWarning")
def test_the_reference_backend_names_nan_and_inf_inputs(bad, monkeypatch):
    # The reference crashed on them (an IndexError) before the check that names the input.
    monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    large, small = torch.randn(2, 8), torch.randn(2, 8)
    large[0, 3] = bad
    with pytest.raises(ValueError, match=r"argument 'large': contains (NaN|\+inf)"):
        logit_fusion(large, small, torch.randn(1, 2, 8))
