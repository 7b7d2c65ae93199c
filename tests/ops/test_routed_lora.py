"""routed_lora against the float64 per-expert loop reference: forward and every gradient on odd
sizes, router and gate modes, skewed routing, ties, leading dims, mixed dtypes, dropout masks,
empty input, NaN, bad arguments, opcheck and gradcheck."""

from __future__ import annotations

import pytest
import torch

from meldkit import _native
from meldkit.ops import routed_lora, routed_lora_ref
from meldkit.ops.random_ref import bernoulli_mask_ref
from meldkit.ops.routed_lora_ref import (
    compute_dtype,
    dropout_factor_ref,
    dropout_keep_scale,
    dropout_ref,
    route_ref,
    routed_lora_backward_ref,
    routed_lora_forward_ref,
)
from tests.helpers import DEVICES, DTYPES, OpNames, randn

# (N, n, m, E, r, top_k, dropout): every N in {1, 7, 37}, E in {1, 2, 3, 8}, per-expert rank
# r in {1, 4, 16}, top_k in {1, 2, E}, odd n and m.
CASES = [
    (1, 5, 3, 1, 1, 1, 0.0),
    (7, 13, 9, 3, 4, 1, 0.25),
    (37, 7, 11, 3, 1, 2, 0.0),
    (7, 9, 5, 3, 4, 3, 0.1),
    (37, 17, 13, 8, 4, 2, 0.25),
    (1, 11, 7, 8, 1, 8, 0.5),
    (37, 5, 3, 8, 1, 1, 0.1),
    (7, 3, 17, 8, 4, 8, 0.0),
    (7, 13, 9, 2, 16, 1, 0.25),
    (37, 19, 7, 2, 16, 2, 0.0),
]
SCALINGS = [0.75, 2.0]  # dyadic: the same value in every dtype


# ---- the one tolerance rule --------------------------------------------------------------------


def assert_close(actual, expected64, magnitude64, n_terms, compute, stored64=None):
    """``|actual − ref| ≤ 2·eps(actual.dtype)·(|ref| + stored) + 2·n_terms·eps(compute)·magnitude``.

    The op rounds each result once to its storage dtype (first term) after float32 (float64)
    arithmetic along chains of at most ``n_terms`` operations, each exact to eps relative to
    the magnitude of what it combines: ``magnitude64`` is the same computation on absolute
    values (:func:`magnitudes`), the forward error bound of summation with a factor 2 of slack.
    ``stored64``: a part of the result that was itself rounded to the storage dtype before the
    sum (a base layer's output, computed in x's dtype as its ``nn.Linear`` computes it).
    """
    assert actual.shape == expected64.shape, (actual.shape, expected64.shape)
    a = actual.detach().to("cpu", torch.float64)
    e = expected64.detach().to("cpu", torch.float64)
    rounded = e.abs() if stored64 is None else e.abs() + stored64.detach().cpu().abs()
    bound = 2 * torch.finfo(actual.dtype).eps * rounded
    bound += 2 * n_terms * torch.finfo(compute).eps * magnitude64.detach().cpu()
    bad = ~((a - e).abs() <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())} of {a.numel()} elements off (dtype {actual.dtype}); first at flat "
            f"index {i}: got {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}, "
            f"bound {bound.flatten()[i].item():.3g}"
        )


def magnitudes(
    x, lora_a, lora_b, s, router_weight, gates, top_k, dropout, seed, dy, dprobs, shared=False
):
    """Float64 bounds of |every term| behind each output: the formulas on absolute values.

    Routing error: an error δz in the logits moves each probability and routing weight by at
    most ``2·max|δz|`` relative, and ``|δz| ≤ n·eps·Σ|x||W_z|``; so router-mode weights enter
    as ``|g|·(1 + 2·zabs)`` with ``zabs = max_e Σ_j |x_j||W_z[e, j]|`` per token.
    """
    n_tokens, d_in = x.shape
    n_experts = lora_a.shape[0]
    factors = [
        dropout_factor_ref(
            (n_tokens, d_in), dropout, seed, 0 if shared else e, device="cpu", dtype=x.dtype
        )
        for e in range(n_experts)
    ]
    xt = torch.stack([x.abs() if f is None else x.abs() * f for f in factors], 1)  # [N, E, n]
    a, b, s = lora_a.abs(), lora_b.abs(), s.abs()
    if router_weight is not None:
        probs, selected, g_sel = route_ref(x, router_weight, top_k)
        zabs = (x.abs() @ router_weight.abs().T).amax(-1, keepdim=True)
        grow = 1 + 2 * zabs
        g = torch.zeros_like(probs).scatter(1, selected, g_sel) * grow
        sel = torch.zeros_like(probs, dtype=torch.bool).scatter(1, selected, True)
        p = probs * grow
        p_sum = torch.where(sel, probs, 0).sum(-1, keepdim=True)
    else:
        g = gates.abs()
    h = torch.einsum("nej,erj->ner", xt, a)
    u = torch.einsum("nm,emr->ner", dy.abs(), b)
    dh = (s * g)[:, :, None] * u
    dg = s * (h * u).sum(-1)
    dx = sum((dh[:, e] @ a[e]) * (1 if f is None else f) for e, f in enumerate(factors))  # [N, n]
    mags = {
        "y": torch.einsum("ner,emr->nm", h * (g * s)[:, :, None], b),
        "lora_a": torch.einsum("ner,nej->erj", dh, xt),
        "lora_b": torch.einsum("ne,nm,ner->emr", g * s, dy.abs(), h),
        "x": dx,
    }
    if router_weight is not None:
        dp = torch.where(sel, (dg + (g * dg).sum(-1, keepdim=True)) / p_sum, 0) * grow
        dp += dprobs.abs()
        dz = p * (dp + (p * dp).sum(-1, keepdim=True))
        mags["router_weight"] = dz.T @ x.abs()
        mags["x"] += dz @ router_weight.abs()
        mags["probs"] = p
    else:
        mags["gates"] = dg
    return mags


# ---- one check of forward and every gradient ---------------------------------------------------


def check_against_loop_reference(x, lora_a, lora_b, scaling, seed_gen=0, **kw):
    """Runs the op and the float64 loop reference on the same values; compares y, probs and the
    gradients of every input that requires grad, with :func:`assert_close`. With a base linear
    in ``kw`` (``base_weight``, ``base_bias``), its output and gradients are part of each."""
    gen = torch.Generator().manual_seed(seed_gen)
    router_weight, gates = kw.get("router_weight"), kw.get("gates")
    base_weight, base_bias = kw.get("base_weight"), kw.get("base_bias")
    named = {"x": x, "lora_a": lora_a, "lora_b": lora_b, "router_weight": router_weight}
    named.update(gates=gates, base_weight=base_weight, base_bias=base_bias)
    named = {k: v for k, v in named.items() if v is not None and v.requires_grad}

    y, probs = routed_lora(x, lora_a, lora_b, scaling, **kw)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], lora_b.shape[1])
    compute = compute_dtype(x, lora_a, lora_b, router_weight if gates is None else gates)
    n_tokens = x[..., 0].numel()
    if router_weight is None:
        assert probs is None
    else:
        assert probs.dtype == compute and probs.shape == (n_tokens, lora_a.shape[0])
    dy = randn(y.shape, y.dtype, x.device, gen)
    dprobs = None if probs is None else randn(probs.shape, probs.dtype, x.device, gen)
    outs = [y] if probs is None else [y, probs]
    grads = torch.autograd.grad(outs, list(named.values()), [dy, dprobs][: len(outs)])

    def to64(t):
        return None if t is None else t.detach().cpu().double().requires_grad_(t.requires_grad)

    x64, a64, b64 = to64(x), to64(lora_a), to64(lora_b)
    w64, g64 = to64(router_weight), to64(gates)
    w0_64, b0_64 = to64(base_weight), to64(base_bias)
    s64 = scaling.double().cpu() if isinstance(scaling, torch.Tensor) else scaling
    kw64 = {**kw, "router_weight": w64, "gates": g64}
    if base_weight is not None:
        kw64.update(base_weight=w0_64, base_bias=b0_64)
    y64, p64 = routed_lora_ref(x64, a64, b64, s64, **kw64)
    named64 = {"x": x64, "lora_a": a64, "lora_b": b64, "router_weight": w64, "gates": g64}
    named64.update(base_weight=w0_64, base_bias=b0_64)
    dy64 = dy.double().cpu()
    dprobs64 = None if dprobs is None else dprobs.double().cpu()
    outs64 = [y64] if p64 is None else [y64, p64]
    grads64 = torch.autograd.grad(
        outs64, [named64[k] for k in named], [dy64, dprobs64][: len(outs64)]
    )

    n_experts, rank, d_in = lora_a.shape
    s_vec = torch.as_tensor(s64, dtype=torch.float64).expand(n_experts)
    mags = magnitudes(
        x64.detach().reshape(-1, d_in),
        a64.detach(),
        b64.detach(),
        s_vec,
        None if w64 is None else w64.detach(),
        None if g64 is None else g64.detach().reshape(-1, n_experts),
        kw.get("top_k"),
        kw.get("dropout", 0.0),
        kw.get("seed") or 0,
        dy64.reshape(n_tokens, -1),
        dprobs64,
        shared=kw.get("shared_dropout", False),
    )
    stored = {}
    if base_weight is not None:  # the base layer's terms, its output and dx rounded in x's dtype
        x64a, w0a, dya = x64.detach().reshape(-1, d_in).abs(), w0_64.detach().abs(), dy64.abs()
        dya = dya.reshape(n_tokens, -1)
        mags["y"] = mags["y"] + x64a @ w0a.T + (0 if b0_64 is None else b0_64.detach().abs())
        mags["x"] = mags["x"] + dya @ w0a
        mags["base_weight"] = dya.T @ x64a
        mags["base_bias"] = dya.sum(0)
        x2_64 = x64.detach().reshape(-1, d_in)
        b0 = None if b0_64 is None else b0_64.detach()
        stored["y"] = torch.nn.functional.linear(x2_64, w0_64.detach(), b0).reshape(y64.shape)
        stored["x"] = (dy64.reshape(n_tokens, -1) @ w0_64.detach()).reshape(x.shape)
    # Longest chain of float32 operations behind any output, forward and backward.
    n_terms = d_in + lora_b.shape[1] + n_experts * rank + n_tokens + n_experts
    assert_close(y, y64, mags["y"].reshape(y64.shape), n_terms, compute, stored.get("y"))
    if probs is not None:
        assert_close(probs, p64, mags["probs"], n_terms, compute)
    for (name, t), grad, grad64 in zip(named.items(), grads, grads64, strict=True):
        assert grad.dtype == t.dtype and grad.device == t.device, name
        mag = mags[name].reshape(grad64.shape)
        assert_close(grad, grad64, mag, n_terms, compute, stored.get(name))
    return y, probs


def make_case(n, d_in, d_out, n_experts, rank, dtype, device, gen, weight_dtype=None):
    """Random x ``[n, d_in]``, A, B and W_z (in ``weight_dtype``, default ``dtype``)."""
    wd = weight_dtype or dtype
    x = randn((n, d_in), dtype, device, gen).requires_grad_()
    a = (randn((n_experts, rank, d_in), wd, device, gen) / d_in**0.5).requires_grad_()
    b = randn((n_experts, d_out, rank), wd, device, gen).requires_grad_()
    w = randn((n_experts, d_in), wd, device, gen).requires_grad_()
    return x, a, b, w


def well_separated(x, router_weight, top_k):
    """No near-tie at the top-k boundary (a float32 rounding could not flip the selection)."""
    if top_k == router_weight.shape[0]:
        return True
    probs = torch.softmax(x.detach().double().cpu() @ router_weight.detach().double().cpu().T, -1)
    top = probs.sort(-1, descending=True).values
    return bool((top[:, top_k - 1] - top[:, top_k] > 1e-3 * top[:, top_k - 1]).all())


def router_case(case, dtype, device, seed, weight_dtype=None):
    n, d_in, d_out, n_experts, rank, top_k, _ = case
    for attempt in range(20):
        gen = torch.Generator().manual_seed(seed * 100 + attempt)
        x, a, b, w = make_case(n, d_in, d_out, n_experts, rank, dtype, device, gen, weight_dtype)
        if well_separated(x, w, top_k):
            return x, a, b, w
    raise AssertionError("no well-separated inputs")


# ---- router mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_router_mode_matches_loop_reference(device, dtype, case):
    i = CASES.index(case)
    x, a, b, w = router_case(case, dtype, device, seed=i)
    n_experts, top_k, dropout = case[3], case[5], case[6]
    # Alternate a float scaling and a per-expert tensor (GOAT-s).
    scaling = SCALINGS[i % 2] if i % 3 else torch.arange(1, n_experts + 1, device=device) * 0.5
    check_against_loop_reference(
        x, a, b, scaling, router_weight=w, top_k=top_k, dropout=dropout, seed=1000 + i
    )


@pytest.mark.parametrize("case", CASES[1:6], ids=str)
def test_float64(case):
    i = CASES.index(case)
    x, a, b, w = router_case(case, torch.float64, "cpu", seed=i)
    n_experts, top_k, dropout = case[3], case[5], case[6]
    check_against_loop_reference(
        x, a, b, 0.75, router_weight=w, top_k=top_k, dropout=dropout, seed=7
    )
    gates = randn((case[0], n_experts), torch.float64, "cpu", torch.Generator().manual_seed(i))
    check_against_loop_reference(
        x, a, b, 0.75, gates=gates.requires_grad_(), dropout=dropout, seed=7
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_skewed_routing_sends_every_token_to_one_expert(device, dtype, top_k):
    gen = torch.Generator().manual_seed(5)
    n, d_in, n_experts, hot = 37, 9, 8, 5
    x, a, b, w = make_case(n, d_in, 7, n_experts, 4, dtype, device, gen)
    with torch.no_grad():
        x[:, 0] = 4.0  # a constant feature that only expert `hot` listens to
        w[:, 0] = 0.0
        w[hot, 0] = 8.0
    assert well_separated(x, w, top_k)
    _, probs = check_against_loop_reference(
        x, a, b, 2.0, router_weight=w, top_k=top_k, dropout=0.1, seed=3
    )
    assert (probs.argmax(-1) == hot).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_lower_expert_index(device, dtype):
    gen = torch.Generator().manual_seed(9)
    n, d_in, d_out, n_experts, rank = 7, 5, 3, 4, 2
    x, a, b, w = make_case(n, d_in, d_out, n_experts, rank, dtype, device, gen)
    x64, a64, b64 = (t.detach().double().cpu() for t in (x, a, b))
    h = torch.einsum("nj,erj->ner", x64, a64)
    expert_out = torch.einsum("ner,emr->nem", h, b64)  # B_e A_e x, [N, E, m]

    # All logits equal: every expert ties; top-k takes experts 0 … k−1, each with g = 1/k.
    zero_w = torch.zeros_like(w, requires_grad=True)
    for top_k in (1, 2, 3):
        y, probs = routed_lora(x, a, b, 1.0, router_weight=zero_w, top_k=top_k)
        expected = expert_out[:, :top_k].sum(1) / top_k
        assert_close(y, expected, expert_out.abs().sum(1), d_in + n_experts * rank, torch.float32)
        assert torch.equal(probs, torch.full_like(probs, 1 / n_experts))

    # Identical rows 1, 2, 3 beat row 0 for positive x: with k = 2, experts 1 and 2 win.
    with torch.no_grad():
        x.abs_()
        w[0] = -w[1].abs()
        w[1:] = w[1].abs()
    check_against_loop_reference(x, a, b, 1.0, router_weight=w, top_k=2)
    y, probs = routed_lora(x, a, b, 1.0, router_weight=w, top_k=2)
    assert torch.equal(probs[:, 1], probs[:, 2]) and torch.equal(probs[:, 2], probs[:, 3])
    h = torch.einsum("nj,erj->ner", x.detach().double().cpu(), a64)
    expert_out = torch.einsum("ner,emr->nem", h, b64)
    expected = (expert_out[:, 1] + expert_out[:, 2]) / 2
    assert_close(y, expected, expert_out.abs().sum(1), d_in + n_experts * rank, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_only_probs_reach_the_loss(device):
    # The load-balancing loss alone: no gradient arrives at y.
    x, a, b, w = router_case(CASES[4], torch.float32, device, seed=4)
    _, probs = routed_lora(x, a, b, 1.0, router_weight=w, top_k=2)
    dw, dx = torch.autograd.grad(probs.square().sum(), [w, x])
    p64 = torch.softmax(x.detach().double() @ w.detach().double().T, -1).requires_grad_()
    dz = torch.autograd.grad(p64.square().sum(), p64)[0]
    dz = p64 * (dz - (p64 * dz).sum(-1, keepdim=True))
    dz_mag = p64 * (2 * p64 + (2 * p64 * p64).sum(-1, keepdim=True))
    n_terms = 2 * x.shape[1] + x.shape[0]
    assert_close(
        dw, dz.T @ x.detach().double(), dz_mag.T @ x.detach().double().abs(), n_terms, torch.float32
    )
    assert_close(
        dx, dz @ w.detach().double(), dz_mag @ w.detach().double().abs(), n_terms, torch.float32
    )


# ---- gate mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gate_mode_matches_loop_reference(device, dtype, sparse):
    gen = torch.Generator().manual_seed(13)
    n, d_in, d_out, n_experts, rank = 37, 11, 7, 8, 4
    x, a, b, _ = make_case(n, d_in, d_out, n_experts, rank, dtype, device, gen)
    gates = randn((n, n_experts), dtype, device, gen).abs()
    if sparse:  # the caller's own top-2: zeros elsewhere, which still receive gradients
        keep = torch.zeros_like(gates, dtype=torch.bool)
        keep.scatter_(1, gates.topk(2, -1).indices, True)
        gates = torch.where(keep, gates, 0)
    gates.requires_grad_()
    check_against_loop_reference(x, a, b, 0.75, gates=gates, dropout=0.1, seed=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gate_mode_many_tokens_without_dropout(device, dtype, sparse):
    """Gate mode without dropout from 64 tokens (the GEMM path of the CPU and CUDA kernels):
    same outputs and gradients as the loop reference."""
    gen = torch.Generator().manual_seed(14)
    n, d_in, d_out, n_experts, rank = 301, 24, 17, 3, 5
    x, a, b, _ = make_case(n, d_in, d_out, n_experts, rank, dtype, device, gen)
    gates = randn((n, n_experts), dtype, device, gen).abs()
    if sparse:
        gates = torch.where(gates > gates.median(), gates, 0)
    gates.requires_grad_()
    check_against_loop_reference(x, a, b, torch.tensor([0.5, 1.0, 2.0]), gates=gates)
    mixed = torch.rand((n, n_experts), generator=gen).to(device)  # fp32 gates, any storage
    check_against_loop_reference(x, a, b, 1.5, gates=mixed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_experts, top_k", [(1, 1), (3, 2), (8, 1), (8, 2), (8, 8)])
def test_router_mode_many_tokens_without_dropout(device, dtype, n_experts, top_k):
    """Router mode without dropout from 64 tokens (the GEMM path: one shrink GEMM over the
    experts and the router, one expand; the backward's concatenated GEMMs): same outputs,
    probs and gradients as the loop reference, also when only probs reach the loss."""
    case = (203, 19, 11, n_experts, 3, top_k, 0.0)
    x, a, b, w = router_case(case, dtype, device, seed=31 + n_experts + top_k)
    check_against_loop_reference(x, a, b, 0.75, router_weight=w, top_k=top_k)
    s = torch.linspace(0.5, 2.0, n_experts, dtype=torch.float32)
    check_against_loop_reference(x, a, b, s, router_weight=w, top_k=top_k)
    _, probs = routed_lora(x, a, b, 1.0, router_weight=w, top_k=top_k)
    dw, dx = torch.autograd.grad(probs.square().sum(), [w, x])
    p64 = torch.softmax(x.detach().double().cpu() @ w.detach().double().cpu().T, -1)
    dz = p64 * (2 * p64 - (2 * p64 * p64).sum(-1, keepdim=True))
    dz_mag = p64 * (2 * p64 + (2 * p64 * p64).sum(-1, keepdim=True))
    n_terms = 2 * x.shape[1] + x.shape[0]
    x64 = x.detach().double().cpu()
    assert_close(dw, dz.T @ x64, dz_mag.T @ x64.abs(), n_terms, torch.float32)
    w64 = w.detach().double().cpu()
    assert_close(dx, dz @ w64, dz_mag @ w64.abs(), n_terms, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_experts, top_k", [(1, 1), (3, 2), (8, 2)])
def test_many_tokens_with_dropout_by_gemms(monkeypatch, device, dtype, n_experts, top_k):
    """With dropout, from 64 tokens, CUDA runs one GEMM per expert over x ⊙ M_e·c (masks drawn
    by _C.routed_lora_dropout from the seed, again in the backward). The CPU keeps its per-token
    kernels there; here the GEMM path is forced on it too, so the code CUDA runs is checked on
    every machine: outputs, probs and gradients against the loop reference, both modes."""
    import importlib

    rl = importlib.import_module("meldkit.ops.routed_lora")  # the module, not the function
    taken = []

    def use_gemm(n_tokens, dropout, dev, dense, n_experts, dtypes, shared=False, *_):
        taken.append(dropout)
        return n_tokens >= rl._GEMM_TOKENS

    monkeypatch.setattr(rl, "_use_gemm", use_gemm)
    case = (131, 13, 9, n_experts, 3, top_k, 0.2)
    x, a, b, w = router_case(case, dtype, device, seed=53 + n_experts)
    check_against_loop_reference(x, a, b, 0.75, router_weight=w, top_k=top_k, dropout=0.2, seed=9)
    gen = torch.Generator().manual_seed(8)
    gates = randn((131, n_experts), dtype, device, gen).abs().requires_grad_()
    s = torch.linspace(0.5, 2.0, n_experts, dtype=torch.float32)
    check_against_loop_reference(x, a, b, s, gates=gates, dropout=0.3, seed=2**40 + 1)
    assert taken and all(d > 0 for d in taken)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_tokens, dropout, path",
    [
        (7, 0.0, "auto"),
        (7, 0.25, "auto"),
        (131, 0.0, "auto"),
        (131, 0.25, "auto"),
        (131, 0.25, "gemm"),
    ],
    ids=["kernel", "kernel-dropout", "gemm", "dropout-auto", "gemm-dropout"],
)
@pytest.mark.parametrize("mode", ["router", "gates"])
def test_base_linear_in_the_op(monkeypatch, device, dtype, n_tokens, dropout, path, mode):
    """``base_weight``/``base_bias``: y is the base layer's output (in x's dtype) plus the
    adapter's, one rounding; dx includes dy·W₀; W₀ and b get their gradients; on the per-token
    kernels, on the GEMMs (which accumulate into the base's output and dx in place), and on the
    GEMMs with dropout (forced on the CPU, CUDA's path)."""
    import importlib

    rl = importlib.import_module("meldkit.ops.routed_lora")
    if path == "gemm":
        monkeypatch.setattr(rl, "_use_gemm", lambda n_tokens, *_: n_tokens >= rl._GEMM_TOKENS)
    case = (n_tokens, 13, 9, 3, 4, 2, dropout)
    x, a, b, w = router_case(case, dtype, device, seed=61 + n_tokens, weight_dtype=torch.float32)
    gen = torch.Generator().manual_seed(62)
    w0 = (randn((9, 13), dtype, device, gen) / 4).requires_grad_(mode == "router")
    b0 = randn((9,), dtype, device, gen).requires_grad_()
    base = {"base_weight": w0, "base_bias": b0 if mode == "router" else None}
    kw = {"dropout": dropout, "seed": 11 if dropout else None, **base}
    if mode == "router":
        check_against_loop_reference(x, a, b, 0.75, router_weight=w, top_k=2, **kw)
    else:
        gates = randn((n_tokens, 3), torch.float32, device, gen).requires_grad_()
        check_against_loop_reference(x, a, b, 0.75, gates=gates, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_tokens", [7, 131], ids=["kernel", "gemm"])
def test_base_linear_added_on_its_own(monkeypatch, dtype, n_tokens):
    """CUDA's way of adding a bf16/fp16 base layer's output (and dx part) to the adapter's
    float32 one, forced on the CPU: the adapter on its own, then one add rounded once to x's
    dtype (``_add_rounded``, the same bits as converting, adding and rounding); the op still
    matches the loop reference, forward and backward, on the kernels and on the GEMMs."""
    import importlib

    rl = importlib.import_module("meldkit.ops.routed_lora")
    gen = torch.Generator().manual_seed(64)
    low, high = randn((33, 17), dtype, "cpu", gen), randn((33, 17), torch.float32, "cpu", gen)
    assert torch.equal(rl._add_rounded(low, high), (low.float() + high).to(dtype))
    calls = []
    monkeypatch.setattr(rl, "_split_add", lambda base: calls.append(base.dtype) or True)
    case = (n_tokens, 13, 9, 3, 4, 2, 0.0)
    x, a, b, w = router_case(case, dtype, "cpu", seed=65, weight_dtype=torch.float32)
    w0 = (randn((9, 13), dtype, "cpu", gen) / 4).requires_grad_()
    b0 = randn((9,), dtype, "cpu", gen).requires_grad_()
    check_against_loop_reference(
        x, a, b, 0.75, router_weight=w, top_k=2, base_weight=w0, base_bias=b0
    )
    assert calls and set(calls) == {dtype}


def test_base_linear_with_leading_dims_equals_adding_it():
    """x ``[2, 5, n]``: the fused base equals ``F.linear(x, W₀, b) + routed_lora(x)``, bit for
    bit in float32 (one GEMM accumulating into another's output adds the same products), with
    the same gradients; no gradient flows to a frozen W₀."""
    gen = torch.Generator().manual_seed(63)
    x = randn((2, 40, 16), torch.float32, "cpu", gen).requires_grad_()
    _, a, b, w = make_case(80, 16, 6, 4, 2, torch.float32, "cpu", gen)
    w0, b0 = randn((6, 16), torch.float32, "cpu", gen), randn((6,), torch.float32, "cpu", gen)
    y, probs = routed_lora(x, a, b, 2.0, router_weight=w, top_k=2, base_weight=w0, base_bias=b0)
    y2, probs2 = routed_lora(x, a, b, 2.0, router_weight=w, top_k=2)
    y2 = torch.nn.functional.linear(x, w0, b0) + y2
    assert y.shape == (2, 40, 6)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    assert torch.equal(probs, probs2)
    dy = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad((y * dy).sum() + probs.sum(), (x, a, b, w))
    grads2 = torch.autograd.grad((y2 * dy).sum() + probs2.sum(), (x, a, b, w))
    for g, g2 in zip(grads, grads2, strict=True):
        torch.testing.assert_close(g, g2, rtol=1e-6, atol=1e-6)
    assert w0.grad is None and b0.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_selected_mask_keeps_the_tie_rule(device):
    """The GEMM path's selection (repeated argmax up to k = 4, the stable sort above) equals
    the reference's top_k_ref on ties, NaN rows, partial NaN and every k."""
    import importlib

    rl = importlib.import_module("meldkit.ops.routed_lora")
    gen = torch.Generator().manual_seed(64)
    probs = torch.softmax(torch.randn(200, 8, generator=gen), -1)
    probs[:50] = torch.softmax(torch.randint(0, 3, (50, 8), generator=gen).float(), -1)  # ties
    probs[50] = float("nan")
    probs[51, [2, 5]] = float("nan")
    probs[52] = 0.0
    probs = probs.to(device)
    for top_k in range(1, 9):
        expected = torch.zeros_like(probs, dtype=torch.bool)
        expected.scatter_(1, rl.top_k_ref(probs, top_k), True)
        assert torch.equal(rl._selected_mask(probs, top_k), expected), top_k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_binding_draws_the_reference_masks(device, dtype):
    """_C.routed_lora_dropout (the GEMM path's masks) equals the reference's x ⊙ M_e·c bit for
    bit, in place too; inf in a dropped feature gives NaN, as x * mask does."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(37, 129, generator=gen, dtype=dtype).to(device)
    x[3, 4] = float("inf")
    for seed, expert in [(0, 0), (2**63 + 5, 7), (12345, 2**32 - 1)]:
        expected = dropout_ref(x.cpu(), 0.3, seed, expert)
        out = torch.empty_like(x)
        _native._C.routed_lora_dropout(x, out, 0.3, seed, expert, _native.stream_of(x.device))
        assert torch.equal(out.cpu().nan_to_num(7.0), expected.nan_to_num(7.0))
        inplace = x.clone()
        _native._C.routed_lora_dropout(
            inplace, inplace, 0.3, seed, expert, _native.stream_of(x.device)
        )
        assert torch.equal(inplace.nan_to_num(7.0), out.nan_to_num(7.0))


def test_reference_router_logits_keep_exact_ties():
    """Identical router rows give bitwise equal logits in the reference (``x @ W_zᵀ`` in
    float32 may round equal columns differently), so its top-k keeps the lower-index rule."""
    gen = torch.Generator().manual_seed(0)
    for d_in in (33, 64, 1000):
        x = torch.randn(7, d_in, generator=gen)
        w = torch.randn(1, d_in, generator=gen).expand(6, d_in).contiguous()
        probs, selected, _ = route_ref(x, w, 3)
        assert torch.equal(probs, probs[:, :1].expand_as(probs)), d_in
        assert torch.equal(selected, torch.tensor([[0, 1, 2]]).expand(7, 3)), d_in


@pytest.mark.parametrize("device", DEVICES)
def test_router_ties_many_tokens(device):
    """The GEMM path keeps the tie rule: equal logits select experts 0 … k−1, a NaN row
    selects them too (NaN last), and NaN stays in its own row."""
    gen = torch.Generator().manual_seed(41)
    n, d_in, d_out, n_experts, rank = 97, 6, 5, 4, 2
    x, a, b, w = make_case(n, d_in, d_out, n_experts, rank, torch.float32, device, gen)
    x64, a64, b64 = (t.detach().double().cpu() for t in (x, a, b))
    expert_out = torch.einsum("ner,emr->nem", torch.einsum("nj,erj->ner", x64, a64), b64)
    zero_w = torch.zeros_like(w)
    for top_k in (1, 2, 3):
        y, probs = routed_lora(x, a, b, 1.0, router_weight=zero_w, top_k=top_k)
        expected = expert_out[:, :top_k].sum(1) / top_k
        assert_close(y, expected, expert_out.abs().sum(1), d_in + n_experts * rank, torch.float32)
        assert torch.equal(probs, torch.full_like(probs, 1 / n_experts))
    xn = x.detach().clone()
    xn[5, 0] = float("nan")
    y, probs = routed_lora(xn, a, b, 1.0, router_weight=w, top_k=2)
    assert y[5].isnan().all() and probs[5].isnan().all()
    assert not y[torch.arange(n) != 5].isnan().any()


# ---- shapes and dtypes -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_leading_dims(device, dtype):
    gen = torch.Generator().manual_seed(17)
    x, a, b, w = make_case(6, 9, 5, 3, 4, dtype, device, gen)
    x3 = x.detach().reshape(2, 3, 9).requires_grad_()
    y, probs = check_against_loop_reference(x3, a, b, 2.0, router_weight=w, top_k=2)
    assert y.shape == (2, 3, 5) and probs.shape == (6, 3)
    y2, probs2 = routed_lora(x3.detach().reshape(6, 9), a, b, 2.0, router_weight=w, top_k=2)
    assert torch.equal(y.reshape(6, 5), y2) and torch.equal(probs, probs2)
    gates = randn((2, 3, 3), dtype, device, gen).requires_grad_()
    y, probs = check_against_loop_reference(x3, a, b, 2.0, gates=gates, dropout=0.25, seed=5)
    assert y.shape == (2, 3, 5) and probs is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "x_dtype, weight_dtype, gates_dtype",
    [
        (torch.bfloat16, torch.float32, torch.float32),  # GOAT: fp32 master weights, bf16 acts
        (torch.float16, torch.float32, torch.float16),
        (torch.float32, torch.bfloat16, torch.float32),
    ],
    ids=str,
)
def test_mixed_dtypes(device, x_dtype, weight_dtype, gates_dtype):
    x, a, b, w = router_case(CASES[4], x_dtype, device, seed=21, weight_dtype=weight_dtype)
    check_against_loop_reference(x, a, b, 0.75, router_weight=w, top_k=2, dropout=0.1, seed=2)
    gen = torch.Generator().manual_seed(22)
    gates = randn((x.shape[0], a.shape[0]), gates_dtype, device, gen).requires_grad_()
    check_against_loop_reference(x, a, b, 0.75, gates=gates)


@pytest.mark.parametrize("n_tokens", [5, 100])
@pytest.mark.parametrize(
    "x_dtype, weight_dtype, gates_dtype",
    [
        (torch.float64, torch.float32, torch.float32),
        (torch.float32, torch.float64, torch.float64),
        (torch.float64, torch.float64, torch.float32),
        (torch.bfloat16, torch.float64, torch.float64),
    ],
    ids=str,
)
def test_float64_mixed_with_other_dtypes(n_tokens, x_dtype, weight_dtype, gates_dtype):
    """The per-token kernels take float64 only when every input is float64: other mixes run the
    GEMM path (float32 arithmetic) at every token count, small batches included."""
    case = (n_tokens, 9, 7, 3, 2, 2, 0.0)
    x, a, b, w = router_case(case, x_dtype, "cpu", seed=61, weight_dtype=weight_dtype)
    for dropout in (0.0, 0.2):
        check_against_loop_reference(
            x, a, b, 0.75, router_weight=w, top_k=2, dropout=dropout, seed=4
        )
    gen = torch.Generator().manual_seed(62)
    gates = randn((n_tokens, 3), gates_dtype, "cpu", gen).requires_grad_()
    check_against_loop_reference(x, a, b, 0.75, gates=gates, dropout=0.2, seed=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_tokens", [5, 100])
def test_more_experts_than_the_per_token_kernels_hold(device, n_tokens):
    """The per-token kernels hold at most 64 experts; more run the GEMM path at every token
    count."""
    n_experts = 65
    case = (n_tokens, 6, 5, n_experts, 1, 2, 0.0)
    x, a, b, w = router_case(case, torch.float32, device, seed=71)
    check_against_loop_reference(x, a, b, 1.5, router_weight=w, top_k=2, dropout=0.1, seed=6)
    gen = torch.Generator().manual_seed(72)
    gates = randn((n_tokens, n_experts), torch.float32, device, gen).requires_grad_()
    check_against_loop_reference(x, a, b, 0.75, gates=gates)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    gen = torch.Generator().manual_seed(23)
    x, a, b, w = make_case(7, 9, 5, 3, 4, torch.float32, device, gen)
    xt = x.detach().T.contiguous().T.requires_grad_()  # column-major
    bt = b.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    check_against_loop_reference(xt, a, bt, 2.0, router_weight=w, top_k=2, dropout=0.1, seed=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_no_tokens(device, lead):
    gen = torch.Generator().manual_seed(25)
    _, a, b, w = make_case(1, 9, 5, 3, 4, torch.float32, device, gen)
    x = torch.empty(*lead, 9, device=device, requires_grad=True)
    y, probs = routed_lora(x, a, b, 2.0, router_weight=w, top_k=2, dropout=0.1, seed=1)
    assert y.shape == (*lead, 5) and probs.shape == (0, 3)
    dx, da, db, dw = torch.autograd.grad((y.sum() + probs.sum()), [x, a, b, w])
    assert dx.shape == x.shape
    for g in (da, db, dw):
        assert torch.equal(g, torch.zeros_like(g))
    gates = torch.empty(*lead, 3, device=device, requires_grad=True)
    y, probs = routed_lora(x, a, b, 2.0, gates=gates)
    assert y.shape == (*lead, 5) and probs is None
    dgates, da = torch.autograd.grad(y.sum(), [gates, a])
    assert dgates.shape == gates.shape and torch.equal(da, torch.zeros_like(da))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_x_propagates_to_its_token_only(device):
    gen = torch.Generator().manual_seed(27)
    x, a, b, w = make_case(7, 9, 5, 3, 4, torch.float32, device, gen)
    x = x.detach().clone()
    x[3, 4] = float("nan")
    y, probs = routed_lora(x, a, b, 1.0, router_weight=w, top_k=2)
    assert y[3].isnan().all() and probs[3].isnan().all()
    rest = torch.cat([y[:3], y[4:]])
    assert rest.isfinite().all() and torch.cat([probs[:3], probs[4:]]).isfinite().all()
    # Dropout multiplies a dropped element by 0, so NaN survives even where it is dropped.
    gates = torch.ones(7, 3, device=device)
    y, _ = routed_lora(x, a, b, 1.0, gates=gates, dropout=0.5, seed=3)
    assert y[3].isnan().all() and torch.cat([y[:3], y[4:]]).isfinite().all()


def zero_gate_case(n_tokens, device):
    """Gate mode with x holding inf, −inf and NaN only in tokens whose every gate is 0, some
    other gates 0 too; returns ``(x, x_clean, a, b, gates, idle)``: ``x_clean`` has 0 where
    ``x`` is not finite, ``idle`` ``[N]`` marks the tokens with every gate 0."""
    gen = torch.Generator().manual_seed(61)
    x, a, b, _ = make_case(n_tokens, 9, 5, 3, 4, torch.float32, device, gen)
    gates = randn((n_tokens, 3), torch.float32, device, gen).requires_grad_()
    idle = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    idle[[0, 3, n_tokens - 1]] = True
    x = x.detach().clone()
    x[0, 2], x[3, 0], x[3, 5], x[n_tokens - 1, 8] = float("inf"), -float("inf"), 1.0, float("nan")
    with torch.no_grad():
        gates[idle] = 0.0
        gates[1, 0] = gates[4, 2] = 0.0  # one zero gate among nonzero ones, finite x
    x_clean = torch.where(x.isfinite(), x, 0.0)
    return x, x_clean, a, b, gates, idle


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["per_token", "gemm", "reference", "loop"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_zero_coefficient_forms_no_product(monkeypatch, device, path, dropout):
    """An expert whose coefficient g·s is exactly 0 contributes exactly 0 to y and nothing to
    dx, dA, dB from that token, whatever x holds there (inf, NaN): tokens with every gate 0 and
    non-finite x give bit for bit the results of the same tokens with x = 0, on the per-token
    kernels (N < 64), the GEMMs (N ≥ 64), the dense reference and the loop reference; their
    gates still get s⟨h, U⟩ (non-finite here, in the same entries on every path)."""
    import importlib

    rl = importlib.import_module("meldkit.ops.routed_lora")  # the module, not the function
    n_tokens = 40 if path == "per_token" else 100
    if path == "reference":
        monkeypatch.setattr(rl, "_use_reference", lambda *_: True)
    fn = routed_lora_ref if path == "loop" else routed_lora
    x, x_clean, a, b, gates, idle = zero_gate_case(n_tokens, device)
    s = torch.tensor([0.75, 2.0, 1.5])
    dy = randn((n_tokens, 5), torch.float32, device, torch.Generator().manual_seed(3))
    kw = {"dropout": dropout, "seed": 5} if dropout else {}
    results, dgates = [], []
    for xv in (x, x_clean):
        xv = xv.clone().requires_grad_()
        y, _ = fn(xv, a, b, s, gates=gates, **kw)
        dx, da, db, dg = torch.autograd.grad(y, [xv, a, b, gates], dy)
        results.append((y, dx, da, db, dg[~idle]))
        dgates.append(dg[idle])
    for name, dirty, clean in zip(["y", "dx", "dA", "dB", "dgates"], *results, strict=True):
        assert dirty.isfinite().all(), name
        assert torch.equal(dirty, clean), name
    if path != "loop":  # s_e⟨h_e, U_e⟩ as the kernels form it (the loop's autograd sums otherwise)
        x64, a64, b64, dy64 = (t.detach().double() for t in (x, a, b, dy[idle]))
        h64 = [dropout_ref(x64, dropout, 5, e)[idle] @ a64[e].T for e in range(3)]
        expected = torch.stack([s[e] * (h64[e] * (dy64 @ b64[e])).sum(-1) for e in range(3)], -1)
        assert not expected.isfinite().all()
        assert torch.equal(dgates[0].isfinite(), expected.isfinite())
    if path == "per_token":
        check_against_loop_reference(x_clean, a, b, s, gates=gates, **kw)


# ---- dropout -----------------------------------------------------------------------------------


def identity_experts(width, n_experts, device):
    """A_e = B_e = I: expert e's output is dropout_e(x) itself."""
    eye = torch.eye(width, device=device).expand(n_experts, width, width)
    return eye.clone(), eye.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.1, 0.5])
def test_dropout_mask_is_the_counter_based_one(device, dropout):
    n, width, seed = 256, 64, 12345
    a, b = identity_experts(width, 2, device)
    x = torch.ones(n, width, device=device)
    keep, scale = dropout_keep_scale(dropout)
    masks = []
    for e in range(2):
        gates = torch.nn.functional.one_hot(torch.full((n,), e), 2).float().to(device)
        y, _ = routed_lora(x, a, b, 1.0, gates=gates, dropout=dropout, seed=seed)
        mask = bernoulli_mask_ref((n, width), keep, seed, e, device=device)
        assert torch.equal(y, mask.float() * scale)  # kept values are exactly float32(1/(1−q))
        assert abs(mask.float().mean().item() - (1 - dropout)) < 0.01
        masks.append(mask)
    assert not torch.equal(masks[0], masks[1])  # independent per expert
    assert scale == torch.tensor(1 / (1 - dropout), dtype=torch.float32).item()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_regenerates_the_forward_mask(device):
    n, width, seed, dropout = 37, 17, 99, 0.3
    gen = torch.Generator().manual_seed(29)
    a, b = identity_experts(width, 2, device)
    x = randn((n, width), torch.float32, device, gen).requires_grad_()
    gates = torch.tensor([[0.0, 1.0]], device=device).expand(n, 2)
    y, _ = routed_lora(x, a, b, 1.0, gates=gates, dropout=dropout, seed=seed)  # x ⊙ M_1 · c
    dy = randn(y.shape, torch.float32, device, gen)
    (dx,) = torch.autograd.grad(y, x, dy)
    factor = dropout_factor_ref((n, width), dropout, seed, 1, device=device, dtype=torch.float32)
    assert torch.equal(y, x.detach() * factor)
    assert torch.equal(dx, dy * factor)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_is_reproducible_from_the_seed(device):
    x, a, b, w = router_case(CASES[4], torch.bfloat16, device, seed=31)
    kw = {"router_weight": w, "top_k": 2, "dropout": 0.25}
    y1, _ = routed_lora(x, a, b, 1.0, seed=5, **kw)
    y2, _ = routed_lora(x, a, b, 1.0, seed=5, **kw)
    y3, _ = routed_lora(x, a, b, 1.0, seed=6, **kw)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    # a one-element int64 CPU tensor is the same seed, with the same gradients
    xg, ag = x.detach().requires_grad_(), a.detach().requires_grad_()
    grads = []
    for key in (5, torch.tensor(5), torch.tensor([5])):
        y, _ = routed_lora(xg, ag, b, 1.0, seed=key, **kw)
        assert torch.equal(y, y1)
        grads.append(torch.autograd.grad(y.float().pow(2).sum(), (xg, ag)))
    for other in grads[1:]:
        assert all(torch.equal(g, h) for g, h in zip(other, grads[0], strict=True))
    # dropout = 0: the seed is ignored.
    y4, _ = routed_lora(x, a, b, 1.0, router_weight=w, top_k=2, seed=5)
    y5, _ = routed_lora(x, a, b, 1.0, router_weight=w, top_k=2)
    assert torch.equal(y4, y5)


# ---- the reference kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["router", "gates"])
def test_reference_backward_equals_autograd_through_the_loop(mode):
    """The explicit backward formulas (routed_lora_backward_ref) against torch.autograd through
    the per-expert loop, in float64, whichever kernel the op runs."""
    n, d_in, d_out, n_experts, rank, top_k = 37, 9, 7, 8, 4, 2
    x, a, b, w = router_case((n, d_in, d_out, n_experts, rank, top_k, 0), torch.float64, "cpu", 3)
    gen = torch.Generator().manual_seed(33)
    gates = randn((n, n_experts), torch.float64, "cpu", gen).requires_grad_()
    s = torch.arange(1, n_experts + 1, dtype=torch.float64) / 4
    route = {"router_weight": w, "top_k": top_k} if mode == "router" else {"gates": gates}
    y, probs = routed_lora_ref(x, a, b, s, dropout=0.2, seed=4, **route)
    dy = randn(y.shape, torch.float64, "cpu", gen)
    inputs = [x, a, b, w] if mode == "router" else [x, a, b, gates]
    if mode == "router":
        dprobs = randn(probs.shape, torch.float64, "cpu", gen)
        expected = torch.autograd.grad([y, probs], inputs, [dy, dprobs])
    else:
        dprobs = None
        expected = torch.autograd.grad(y, inputs, dy)
    with torch.no_grad():
        wr, gt = (w, None) if mode == "router" else (None, gates)
        y2, probs2, weights, h = routed_lora_forward_ref(
            x, a, b, s, wr, gt, top_k if mode == "router" else 0, 0.2, 4
        )
        got = routed_lora_backward_ref(
            dy,
            x,
            a,
            b,
            s,
            wr,
            weights,
            probs2 if mode == "router" else None,
            dprobs,
            h,
            top_k,
            0.2,
            4,
            (True, True, True, mode == "router", mode == "gates"),
            gates.dtype,
        )
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
    got = [g for g in got if g is not None]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# ---- torch.library checks and gradcheck --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x, a, b, w = router_case(CASES[3], dtype, device, seed=37)
    s = torch.full((3,), 0.75, device=device)
    gates = randn((7, 3), dtype, device, torch.Generator().manual_seed(1)).requires_grad_()
    fwd = torch.ops.meldkit.routed_lora.default

    def seed(value):  # the ops take the seed as a one-element int64 CPU tensor
        return torch.tensor(value, dtype=torch.int64)

    torch.library.opcheck(fwd, (x, a, b, s, w, None, 2, 0.25, seed(7)))
    torch.library.opcheck(fwd, (x, a, b, s, None, gates, 0, 0.0, seed(0)))
    column_major = gates.detach().T.contiguous().T.requires_grad_()
    torch.library.opcheck(fwd, (x, a, b, s, None, column_major, 0, 0.1, seed(3)))
    w0 = randn((5, 9), dtype, device, torch.Generator().manual_seed(3)).requires_grad_()
    b0 = randn((5,), dtype, device, torch.Generator().manual_seed(4)).requires_grad_()
    torch.library.opcheck(fwd, (x, a, b, s, w, None, 2, 0.25, seed(7), w0, b0))
    torch.library.opcheck(fwd, (x, a, b, s, None, gates, 0, 0.0, seed(0), w0.detach(), None))
    _, probs, weights, h = (t.detach() for t in fwd(x, a, b, s, w, None, 2, 0.25, seed(7)))
    dy = randn((7, 5), dtype, device, torch.Generator().manual_seed(2))
    dprobs = torch.randn_like(probs)
    xd, ad, bd, wd = (t.detach() for t in (x, a, b, w))
    bwd = torch.ops.meldkit.routed_lora_backward.default
    args = (dy, xd, ad, bd, s, wd, weights, probs, dprobs, h, 2, 0.25, seed(7))
    torch.library.opcheck(bwd, (*args, [True, True, True, True, False], None))
    torch.library.opcheck(bwd, (*args, [False, True, False, False, False], None))
    torch.library.opcheck(bwd, (*args, [True, True, True, True, False], None, w0.detach()))
    _, _, weights, h = (t.detach() for t in fwd(x, a, b, s, None, gates, 0, 0.0, seed(0)))
    args = (dy, xd, ad, bd, s, None, weights, None, None, h, 0, 0.0, seed(0))
    torch.library.opcheck(bwd, (*args, [True, False, True, False, True], dtype))
    # The ops without dropout take no seed; the dropout ops are the same functions.
    torch.library.opcheck(fwd, (x, a, b, s, None, gates, 0, 0.0, None))
    torch.library.opcheck(bwd, (*args[:12], None, [True, False, True, False, True], dtype))
    fwd_d = torch.ops.meldkit.routed_lora_dropout.default
    torch.library.opcheck(fwd_d, (x, a, b, s, w, None, 2, 0.25, seed(7)))
    _, probs, weights, h = (t.detach() for t in fwd_d(x, a, b, s, w, None, 2, 0.25, seed(7)))
    args = (dy, xd, ad, bd, s, wd, weights, probs, dprobs, h, 2, 0.25, seed(7))
    bwd_d = torch.ops.meldkit.routed_lora_dropout_backward.default
    torch.library.opcheck(bwd_d, (*args, [True, True, True, True, False], None))
    # one mask for every expert
    torch.library.opcheck(fwd_d, (x, a, b, s, w, None, 2, 0.25, seed(7), w0, b0, True))
    _, probs, weights, h = (
        t.detach() for t in fwd_d(x, a, b, s, w, None, 2, 0.25, seed(7), None, None, True)
    )
    args = (dy, xd, ad, bd, s, wd, weights, probs, dprobs, h, 2, 0.25, seed(7))
    torch.library.opcheck(bwd_d, (*args, [True, True, True, True, False], None, None, True))


def test_dropout_calls_take_their_own_ops_tagged_cudagraph_unsafe():
    """Calls with dropout go through ``meldkit::routed_lora_dropout`` (and its backward), tagged
    ``cudagraph_unsafe``: their seed is a CPU tensor read on the host, which a CUDA graph would
    freeze, so torch.compile's CUDA-graph modes must run them outside their graphs. Calls
    without dropout take the untagged ops with ``seed=None``: no CPU tensor among their inputs,
    so they stay inside such graphs. Both give the same numbers as before the split."""
    ops = torch.ops.meldkit
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is not None:
        assert tag in ops.routed_lora_dropout.default.tags
        assert tag in ops.routed_lora_dropout_backward.default.tags
        assert tag not in ops.routed_lora.default.tags
        assert tag not in ops.routed_lora_backward.default.tags

    x, a, b, w = router_case(CASES[3], torch.float32, "cpu", seed=51)

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "meldkit" in str(func):
                self.seen.append((str(func), args))
            return func(*args, **(kwargs or {}))

    for dropout, fwd_name, bwd_name in (
        (0.0, "meldkit.routed_lora.default", "meldkit.routed_lora_backward.default"),
        (
            0.3,
            "meldkit.routed_lora_dropout.default",
            "meldkit.routed_lora_dropout_backward.default",
        ),
    ):
        with Record() as rec:
            y, probs = routed_lora(x, a, b, 0.5, router_weight=w, top_k=2, dropout=dropout, seed=9)
            (y.sum() + probs.sum()).backward()
        assert [name for name, _ in rec.seen] == [fwd_name, bwd_name]
        fwd_seed, bwd_seed = rec.seen[0][1][8], rec.seen[1][1][12]
        if dropout == 0.0:
            assert fwd_seed is None and bwd_seed is None
        else:
            assert int(fwd_seed) == 9 and int(bwd_seed) == 9
        ref = routed_lora_ref(x, a, b, 0.5, router_weight=w, top_k=2, dropout=dropout, seed=9)
        torch.testing.assert_close(y, ref[0], rtol=1e-5, atol=1e-6)
    # An op called directly with dropout but no seed does not pick one silently.
    s = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="'seed': is required"):
        ops.routed_lora.default(
            x.detach(), a.detach(), b.detach(), s, w.detach(), None, 2, 0.3, None
        )


def test_gradcheck_float64():
    x, a, b, w = router_case((5, 4, 3, 3, 2, 2, 0), torch.float64, "cpu", seed=41)
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: routed_lora(*t[:3], s, router_weight=t[3], top_k=2, dropout=0.2, seed=3),
        (x, a, b, w),
    )
    gates = torch.rand(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(43))
    gates.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: routed_lora(*t[:3], 0.75, gates=t[3], dropout=0.2, seed=3)[0],
        (x, a, b, gates),
    )


def test_gradcheck_float64_gemm_path():
    """From 64 tokens (the GEMMs): router mode without dropout, gate mode with it (fast mode:
    a random projection of the Jacobian, to keep the check cheap)."""
    x, a, b, w = router_case((64, 4, 3, 3, 2, 2, 0), torch.float64, "cpu", seed=47)
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: routed_lora(*t[:3], s, router_weight=t[3], top_k=2),
        (x, a, b, w),
        fast_mode=True,
    )
    gates = torch.rand(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(48))
    gates.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: routed_lora(*t[:3], 0.75, gates=t[3], dropout=0.2, seed=3)[0],
        (x, a, b, gates),
        fast_mode=True,
    )


def test_double_backward_is_refused():
    x, a, b, w = router_case((5, 4, 3, 3, 2, 2, 0), torch.float64, "cpu", seed=41)
    y, _ = routed_lora(x, a, b, 1.0, router_weight=w, top_k=2)
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="routed_lora_backward"):
        dx.sum().backward()


# ---- bad input ---------------------------------------------------------------------------------


def test_sizes_past_int_range_are_refused_by_name():
    """The kernels hold d_in, d_out and the rank in int: a size past 2^31 - 1 is refused naming
    the argument (it used to wrap negative: an allocator error on the CPU, zeros on CUDA). The
    tensors are never touched, so the 4 GiB ones cost no memory."""
    big = 2**31
    bf = torch.bfloat16
    gates = torch.ones(1, 1, dtype=bf)
    cases = [
        (
            torch.empty(1, big, dtype=bf),
            torch.empty(1, 1, big, dtype=bf),
            torch.zeros(1, 8, 1, dtype=bf),
            "'x'.*d_in .* exceeds",
        ),
        (
            torch.zeros(1, 8, dtype=bf),
            torch.zeros(1, 1, 8, dtype=bf),
            torch.empty(1, big, 1, dtype=bf),
            "'lora_b'.*d_out .* exceeds",
        ),
        (
            torch.zeros(1, 1, dtype=bf),
            torch.empty(1, big, 1, dtype=bf),
            torch.empty(1, 1, big, dtype=bf),
            "'lora_a'.*rank .* exceeds",
        ),
    ]
    for x, a, b, match in cases:
        with pytest.raises(ValueError, match=match):
            routed_lora(x, a, b, 1.0, gates=gates)


def test_bad_arguments_name_themselves():
    x, a, b, w = (t.detach() for t in router_case(CASES[3], torch.float32, "cpu", seed=45))
    g = torch.rand(7, 3)
    w0, b0 = torch.randn(5, 9), torch.randn(5)
    ok = {"router_weight": w, "top_k": 2}

    def call(*args, **kw):
        return lambda: routed_lora(*args, **kw)

    cases = [
        (call("x", a, b, 1.0, **ok), TypeError, "'x': expected a tensor"),
        (call(x.int(), a, b, 1.0, **ok), TypeError, "'x': dtype torch.int32"),
        (call(torch.tensor(1.0), a, b, 1.0, **ok), ValueError, "'x'"),
        (call(x[:, :4], a, b, 1.0, **ok), ValueError, "'x': last dimension 4"),
        (call(x, a[0], b, 1.0, **ok), ValueError, "'lora_a': expected 3 dimensions"),
        (call(x, a, b[:2], 1.0, **ok), ValueError, "'lora_b': shape [2, 5, 4]"),
        (call(x, a, b[:, :, :3], 1.0, **ok), ValueError, "'lora_b': shape"),
        (call(x, a, b.double(), 1.0, **ok), TypeError, "'lora_b': dtype torch.float64"),
        (call(x, a, b, "s", **ok), TypeError, "'scaling': expected a float"),
        (call(x, a, b, float("inf"), **ok), ValueError, "'scaling': must be finite"),
        (call(x, a, b, 1e39, **ok), ValueError, "'scaling': must be finite in float32"),
        (call(x, a, b, torch.ones(4), **ok), ValueError, "'scaling': shape [4]"),
        (call(x, a, b, torch.ones(3, 1), **ok), ValueError, "'scaling': expected 1 dim"),
        (
            call(x, a, b, torch.ones(3, requires_grad=True), **ok),
            ValueError,
            "'scaling': is a constant",
        ),
        (call(x, a, b, 1.0), ValueError, "give exactly one of router_weight and gates"),
        (call(x, a, b, 1.0, gates=g, **ok), ValueError, "give exactly one"),
        (call(x, a, b, 1.0, router_weight=w[:2], top_k=1), ValueError, "'router_weight': shape"),
        (call(x, a, b, 1.0, router_weight=w.half(), top_k=1), TypeError, "'router_weight': dt"),
        (call(x, a, b, 1.0, router_weight=w), TypeError, "'top_k': expected an int"),
        (call(x, a, b, 1.0, router_weight=w, top_k=2.0), TypeError, "'top_k'"),
        (call(x, a, b, 1.0, router_weight=w, top_k=0), ValueError, "'top_k': 0 is not in 1"),
        (call(x, a, b, 1.0, router_weight=w, top_k=4), ValueError, "'top_k': 4 is not in 1"),
        (call(x, a, b, 1.0, gates=g, top_k=2), ValueError, "'top_k': only goes with"),
        (call(x, a, b, 1.0, gates=g[:, :2]), ValueError, "'gates': shape [7, 2]"),
        (call(x, a, b, 1.0, gates=g.long()), TypeError, "'gates': dtype torch.int64"),
        (call(x, a, b, 1.0, dropout=1.0, seed=1, **ok), ValueError, "'dropout': 1.0 is not in"),
        (call(x, a, b, 1.0, dropout=-0.1, seed=1, **ok), ValueError, "'dropout'"),
        (call(x, a, b, 1.0, dropout=float("nan"), seed=1, **ok), ValueError, "'dropout'"),
        (call(x, a, b, 1.0, dropout="0.1", seed=1, **ok), TypeError, "'dropout'"),
        (call(x, a, b, 1.0, dropout=0.1, **ok), TypeError, "'seed': an int is required"),
        (call(x, a, b, 1.0, dropout=0.1, seed=-1, **ok), ValueError, "'seed': -1 is not in"),
        (call(x, a, b, 1.0, dropout=0.1, seed=2**63, **ok), ValueError, "'seed'"),
        (call(x, a, b, 1.0, dropout=0.1, seed=torch.tensor(1.0), **ok), TypeError, "'seed': a t"),
        (call(x, a, b, 1.0, dropout=0.1, seed=torch.tensor([1, 2]), **ok), TypeError, "'seed'"),
        (
            call(x, a, b, 1.0, dropout=0.1, seed=torch.tensor(1, device="meta"), **ok),
            TypeError,
            "'seed': a tensor seed must be on the CPU",
        ),
        # a tensor's value is checked where the op reads it
        (call(x, a, b, 1.0, dropout=0.1, seed=torch.tensor(-3), **ok), ValueError, "'seed': -3"),
        (call(x, a, b, 1.0, base_weight=w0.T, **ok), ValueError, "'base_weight': shape [9, 5]"),
        (call(x, a, b, 1.0, base_weight=w0[0], **ok), ValueError, "'base_weight': expected 2"),
        (call(x, a, b, 1.0, base_weight=w0.half(), **ok), TypeError, "'base_weight': dtype"),
        (call(x, a, b, 1.0, base_bias=b0, **ok), ValueError, "'base_bias': only goes with"),
        (call(x, a, b, 1.0, base_weight=w0, base_bias=b0[:4], **ok), ValueError, "'base_bias'"),
        (call(x, a, b, 1.0, base_weight=w0, base_bias=b0.double(), **ok), TypeError, "'base_bi"),
    ]
    if torch.cuda.is_available():
        cases += [
            (call(x, a.cuda(), b, 1.0, **ok), TypeError, "'lora_a': is on cuda:0 but 'x'"),
            (call(x, a, b, 1.0, gates=g.cuda()), TypeError, "'gates': is on cuda"),
            (call(x, a, b, 1.0, base_weight=w0.cuda(), **ok), TypeError, "'base_weight': is on"),
        ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
        assert "meldkit.routed_lora: argument '" in str(info.value)


@pytest.mark.cuda
@pytest.mark.parametrize("n_tokens", [37, 301], ids=["kernel", "gemm"])
@pytest.mark.parametrize("mode", ["router", "gates"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("base", [False, True], ids=["adapter", "base"])
def test_cuda_no_host_synchronisation(n_tokens, mode, dropout, base):
    """Forward and backward never wait for the GPU (the issue: capturable in a CUDA graph), on
    the per-token kernels (few tokens) and on the GEMM path (many tokens), with and without
    dropout, with and without the base linear inside the op."""
    gen = torch.Generator().manual_seed(51)
    x, a, b, w = make_case(n_tokens, 24, 17, 8, 4, torch.bfloat16, "cuda", gen, torch.float32)
    kw = {"router_weight": w, "top_k": 2}
    if mode == "gates":
        kw = {"gates": torch.rand(n_tokens, 8, generator=gen).cuda().requires_grad_()}
    if dropout:
        kw.update(dropout=dropout, seed=3)
    if base:
        kw.update(base_weight=torch.randn(17, 24, generator=gen).cuda().bfloat16())
        kw.update(base_bias=torch.randn(17, generator=gen).cuda().bfloat16().requires_grad_())
    dy = torch.randn(n_tokens, 17, generator=gen).cuda().bfloat16()
    routed_lora(x, a, b, 0.5, **kw)[0].backward(dy)  # warm-up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, probs = routed_lora(x, a, b, 0.5, **kw)
        loss_grad = [dy] if probs is None else [dy, torch.ones_like(probs)]
        torch.autograd.backward([y] if probs is None else [y, probs], loss_grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_eager_inference_skips_the_library_dispatch(monkeypatch):
    """An eager call that needs no autograd goes straight to the op's CPU/CUDA implementation
    (the same function the op registers); a call that records gradients, or one under a
    dispatch mode (fake tensors, op counters), goes through ``torch.ops.meldkit.routed_lora``.
    Every way gives the same result."""
    import importlib

    rl = importlib.import_module("meldkit.ops.routed_lora")
    x, a, b, w = router_case(CASES[3], torch.float32, "cpu", seed=5)
    direct = []
    native = rl._routed_lora_native
    monkeypatch.setattr(rl, "_routed_lora_native", lambda *args: direct.append(1) or native(*args))

    with torch.no_grad():
        y0, p0 = routed_lora(x, a, b, 0.5, router_weight=w, top_k=2)
    assert direct == [1]
    y1, p1 = routed_lora(x.detach(), a.detach(), b.detach(), 0.5, router_weight=w.detach(), top_k=2)
    assert direct == [1, 1]  # grad mode on, but nothing requires grad
    xg = x.detach().requires_grad_()
    y2, p2 = routed_lora(xg, a, b, 0.5, router_weight=w, top_k=2)
    assert direct == [1, 1] and y2.requires_grad
    y2.sum().backward()
    assert xg.grad is not None

    with torch.no_grad(), OpNames.mode() as mode:
        y3, p3 = routed_lora(x, a, b, 0.5, router_weight=w, top_k=2)
    assert direct == [1, 1] and "meldkit.routed_lora.default" in mode.names
    # under the profiler the direct call still shows as the op
    with torch.no_grad(), torch.profiler.profile() as prof:
        routed_lora(x, a, b, 0.5, router_weight=w, top_k=2)
    assert direct == [1, 1, 1]
    assert "meldkit::routed_lora" in {e.name for e in prof.events()}
    for y, p in ((y1, p1), (y2, p2), (y3, p3)):
        assert torch.equal(y.detach(), y0) and torch.equal(p.detach(), p0)


# ---- one dropout mask for every expert (shared_dropout) -----------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens", [7, 131])
@pytest.mark.parametrize("mode", ["router", "gates"])
def test_shared_dropout_matches_loop_reference(device, dtype, n_tokens, mode):
    """shared_dropout=True: every expert reads x ⊙ M_0·c (expert 0's mask); the op (always the
    GEMM path: one shrink and one dA GEMM over the concatenated experts) equals the loop
    reference with the same rule, forward and every gradient, with and without a base."""
    case = (n_tokens, 13, 9, 4, 3, 2, 0.3)
    x, a, b, w = router_case(case, dtype, device, seed=71 + n_tokens, weight_dtype=torch.float32)
    kw = {"dropout": 0.3, "seed": 5, "shared_dropout": True}
    gen = torch.Generator().manual_seed(72)
    if mode == "router":
        check_against_loop_reference(x, a, b, 0.75, router_weight=w, top_k=2, **kw)
        w0 = (randn((9, 13), dtype, device, gen) / 4).requires_grad_()
        b0 = randn((9,), dtype, device, gen)
        check_against_loop_reference(
            x, a, b, 0.75, router_weight=w, top_k=2, base_weight=w0, base_bias=b0, **kw
        )
    else:
        gates = randn((n_tokens, 4), torch.float32, device, gen).requires_grad_()
        s = torch.tensor([0.5, 1.0, 1.5, 2.0])
        check_against_loop_reference(x, a, b, s, gates=gates, **kw)


def test_shared_dropout_is_one_mask_for_every_expert():
    """Independent of the reference: shared_dropout equals the op without dropout on
    x ⊙ M_0·c in gate mode (the experts see one masked input; the gates are given), and
    differs from the per-expert masks."""
    gen = torch.Generator().manual_seed(73)
    x, a, b, _ = make_case(100, 16, 6, 4, 2, torch.float32, "cpu", gen)
    gates = torch.rand(100, 4, generator=gen)
    shared, _ = routed_lora(x, a, b, 2.0, gates=gates, dropout=0.25, seed=3, shared_dropout=True)
    xd = dropout_ref(x.detach(), 0.25, 3, 0)
    plain, _ = routed_lora(xd, a, b, 2.0, gates=gates)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    per_expert, _ = routed_lora(x, a, b, 2.0, gates=gates, dropout=0.25, seed=3)
    assert (per_expert - shared).abs().max() > 1e-3
    # reproducible, and a no-op without dropout
    again, _ = routed_lora(x, a, b, 2.0, gates=gates, dropout=0.25, seed=3, shared_dropout=True)
    assert torch.equal(again, shared)
    off, _ = routed_lora(x, a, b, 2.0, gates=gates, shared_dropout=True)
    assert torch.equal(off, routed_lora(x, a, b, 2.0, gates=gates)[0])
    with pytest.raises(TypeError, match="argument 'shared_dropout'"):
        routed_lora(x, a, b, 2.0, gates=gates, dropout=0.25, seed=3, shared_dropout=1)


@pytest.mark.parametrize("n", [63, 64, 512])
@pytest.mark.parametrize("mode", ["router", "gates"])
def test_autocast_regions_leave_the_arithmetic_in_float32(n, mode):
    # From 64 tokens the matrix-product path ran inside the caller's bf16 autocast region: the
    # output, the router softmax (and so the routing) and the gradients came out in bf16.
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 32, generator=g, requires_grad=True)
    a = torch.randn(8, 4, 32, generator=g).mul_(0.2).requires_grad_()
    b = torch.randn(8, 24, 4, generator=g).mul_(0.2).requires_grad_()
    kw = (
        {"router_weight": torch.randn(8, 32, generator=g), "top_k": 2}
        if mode == "router"
        else {"gates": torch.rand(n, 8, generator=g)}
    )
    want, want_p = routed_lora(x, a, b, 0.5, **kw)
    grads = torch.autograd.grad(want.square().sum(), (x, a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_p = routed_lora(x, a, b, 0.5, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if mode == "router":
        assert got_p.dtype == torch.float32
        torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-6)
    for got_g, want_g in zip(
        torch.autograd.grad(got.square().sum(), (x, a, b)), grads, strict=True
    ):
        torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-4)


def test_parameters_take_the_direct_call():
    """A module's ``nn.Parameter`` weights passed as they are (GoatLinear, TwinLinear) do not
    send an inference call through ``torch.library``'s dispatch (0.05-0.2 ms a call): a
    Parameter counts as a plain tensor; one that needs a gradient, or a real tensor subclass,
    still goes through the op."""

    class Sub(torch.Tensor):
        pass

    x = torch.randn(2, 3)
    w = torch.nn.Parameter(torch.randn(3, 3))
    with torch.no_grad():
        assert _native.plain_eager_call(x.device, (x, w))
        assert not _native.plain_eager_call(x.device, (x.as_subclass(Sub), w))
    assert not _native.plain_eager_call(x.device, (x, w))
    assert _native.plain_eager_call(x.device, (x, w.detach()))
    a, b = torch.randn(2, 2, 3), torch.randn(2, 3, 2)
    with torch.no_grad():
        y, _ = routed_lora(x, a, b, 1.0, gates=torch.ones(2, 2), base_weight=w)
    ref, _ = routed_lora(x, a, b, 1.0, gates=torch.ones(2, 2), base_weight=w.detach())
    assert torch.equal(y, ref)


@pytest.mark.parametrize(("d", "expected"), [(48, "kernels"), (160, "gemm")])
def test_large_gate_mode_calls_take_the_gemms_on_the_cpu(monkeypatch, d, expected):
    """Gate mode without dropout, 8 tokens (below ``_GEMM_TOKENS``): on the CPU the GEMMs run
    it once the experts' multiply-adds N·E·r·(n + m) reach ``_GATE_GEMM_WORK`` (8·4·32·320 =
    327 680 at d 160; 98 304 at d 48 stays on the per-token kernels), forward and backward,
    and the results match the loop reference either way."""
    import importlib

    rl = importlib.import_module("meldkit.ops.routed_lora")
    taken = []
    for name in ("_gemm_forward", "_gemm_backward"):
        real = getattr(rl, name)
        monkeypatch.setattr(
            rl, name, lambda *a, _real=real, _name=name, **k: taken.append(_name) or _real(*a, **k)
        )
    gen = torch.Generator().manual_seed(66)
    x = randn((8, d), torch.float32, "cpu", gen).requires_grad_()
    a = (randn((4, 32, d), torch.float32, "cpu", gen) / d**0.5).requires_grad_()
    b = (randn((4, d, 32), torch.float32, "cpu", gen) / 32**0.5).requires_grad_()
    gates = randn((8, 4), torch.float32, "cpu", gen).requires_grad_()
    check_against_loop_reference(x, a, b, 0.5, gates=gates)
    if expected == "gemm":
        assert taken == ["_gemm_forward", "_gemm_backward"]
    else:
        assert taken == []
