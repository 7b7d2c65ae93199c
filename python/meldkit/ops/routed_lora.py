"""``routed_lora``: a mixture of LoRA experts behind a top-k router (GOAT), forward and backward.

Two torch.library custom ops, joined by ``register_autograd`` (each twice: calls with dropout go
through ``meldkit::routed_lora_dropout`` and ``meldkit::routed_lora_dropout_backward``, the same
functions tagged ``cudagraph_unsafe``; the plain ops get ``seed=None``):

* ``meldkit::routed_lora(x, lora_a, lora_b, scaling, router_weight, gates, top_k, dropout, seed,
  base_weight=None, base_bias=None) -> (y, probs, weights, h)``
* ``meldkit::routed_lora_backward(dy, x, lora_a, lora_b, scaling, router_weight, weights, probs,
  dprobs, h, top_k, dropout, seed, needs, gates_dtype, base_weight=None)
  -> (dx, da, db, drouter, dgates)``

Their default implementation (any device) is the dense reference of :mod:`routed_lora_ref`; the
CPU and CUDA implementations call ``meldkit._C.routed_lora_forward`` / ``routed_lora_backward``
and fall back to the reference, with a warning naming the reason, when the native kernel cannot
run (see :mod:`meldkit._native`). From 64 tokens, both run as a few GEMMs over the concatenated
experts and router instead (see ``_GEMM_TOKENS``; with dropout on CUDA only, one GEMM per expert
over its masked input), and so do calls the per-token kernels cannot take at any token count
(more than 64 experts, float64 mixed with other dtypes), and, on the CPU, gate-mode calls
without dropout whose experts have enough work (``_GATE_GEMM_WORK``). The forward saves the
routing weights and the expert activations ``h`` (``[N, E·r]``, small) for the backward; dropout
masks are regenerated from the seed, never stored. ``seed`` reaches the ops as a one-element
int64 CPU tensor (read on the host, so no device synchronisation), so that a seed drawn per
step with ``torch.randint`` stays inside a ``torch.compile`` graph. A CUDA graph would freeze
that read, hence the tag: torch.compile's CUDA-graph modes run the dropout ops outside their
graphs, and keep the plain ops, which have no CPU input, inside them. Fake kernels make both ops
traceable by ``torch.compile``.

With a base linear (``base_weight``, ``base_bias``: the caller's frozen ``nn.Linear``), ``y`` is
its output plus the adapter's and ``dx`` includes ``dy·W₀``. On the GEMM path the adapter's
expand accumulates into the base's output and its ``dx`` GEMM into ``dy·W₀``, in place: the
two elementwise additions (and their fresh ``[N, m]`` and ``[N, n]`` tensors) that
``linear(x) + routed_lora(x)`` costs are gone. ``dW₀`` and ``db``, when asked for, are plain
PyTorch in the autograd formula.

Custom ops cannot return None: ``probs`` is an empty ``[0]`` tensor in gate mode, and each
gradient the backward was not asked for (``needs`` = which of dx, dA, dB, dW_z, dgates) is an
empty ``[0]`` tensor. ``scaling`` reaches the ops as an ``[E]`` tensor; ``probs``, ``weights``,
``h`` and ``dprobs`` are in the compute dtype (float32, or float64 when x, the LoRA weights and
the router weights or gates are all float64), and so is the ``scaling`` handed to ``_C``.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from meldkit import _native
from meldkit.ops import _checks
from meldkit.ops._library import custom_op
from meldkit.ops.routed_lora_ref import (
    coefficient_product_ref,
    compute_dtype,
    routed_lora_backward_ref,
    routed_lora_forward_ref,
    top_k_ref,
)

_OP = "routed_lora"


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype, ...]:
    """The distinct dtypes of the given tensors, in order: what the native kernel must accept."""
    return tuple(dict.fromkeys(t.dtype for t in tensors if t is not None))


def _use_reference(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> bool:
    """True when the native kernel cannot run (after warning why, once)."""
    reasons = _native.unavailable(_OP, device, dtypes)
    if reasons:
        _native.warn_fallback(_OP, device, dtypes, reasons)
    return bool(reasons)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().contiguous()


def _seed_value(seed: torch.Tensor | None, dropout: float) -> int:
    """The ops' ``seed`` (a one-element int64 CPU tensor, so that ``torch.compile`` can trace a
    seed drawn per step without reading it; None without dropout) as the int the kernels take.
    A CPU read: no device synchronisation."""
    if seed is None:
        if dropout > 0.0:
            raise _error(ValueError, "seed", "is required when dropout > 0")
        return 0
    value = int(seed.reshape(()))
    if value < 0:
        raise _error(ValueError, "seed", f"{value} is not in [0, 2**63)")
    return value


# Two ops of each pass, the same functions: ``meldkit::routed_lora`` (and ``_backward``) for
# calls without dropout, which take no seed, and ``meldkit::routed_lora_dropout`` (and
# ``_backward``) for calls with dropout, whose seed is a CPU tensor read on the host. Those are
# tagged ``cudagraph_unsafe``, so that torch.compile's CUDA-graph modes run them outside their
# graphs (a captured call would replay its capture's seed); the ops without dropout stay inside.
_CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _without_autocast(fn):
    """``fn`` run with autocast off: the op's arithmetic is float32 whatever the region (under
    an autocast region the matrix products of the GEMM path and of the reference would run in
    bf16/fp16 from 64 tokens on, and the router softmax with them)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return run


def _custom_ops(plain: str, with_dropout: str, fn, schema: str):
    """``fn`` as the two custom ops ``meldkit::PLAIN`` and ``meldkit::WITH_DROPOUT`` (tagged)."""
    fn = _without_autocast(fn)
    return (
        custom_op(f"meldkit::{plain}", fn, schema=schema),
        custom_op(f"meldkit::{with_dropout}", fn, schema=schema, tags=_CUDAGRAPH_UNSAFE),
    )


# ---- forward op ----------------------------------------------------------------------------


def _routed_lora_impl(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    router_weight: torch.Tensor | None,
    gates: torch.Tensor | None,
    top_k: int,
    dropout: float,
    seed: torch.Tensor | None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    shared_dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed = _seed_value(seed, dropout)
    args = (x, lora_a, lora_b, scaling, router_weight, gates, top_k, dropout, seed)
    return routed_lora_forward_ref(*args, base_weight, base_bias, shared_dropout)


_routed_lora, _routed_lora_dropout = _custom_ops(
    "routed_lora",
    "routed_lora_dropout",
    _routed_lora_impl,
    "(Tensor x, Tensor lora_a, Tensor lora_b, Tensor scaling, Tensor? router_weight,"
    " Tensor? gates, SymInt top_k, float dropout, Tensor? seed, Tensor? base_weight=None,"
    " Tensor? base_bias=None, bool shared_dropout=False) -> (Tensor, Tensor, Tensor, Tensor)",
)


# From this many tokens, the forward and the backward are a handful of GEMMs over the
# concatenated experts (and router): the spec's recommended strategy ("one concatenated shrink
# over experts and router, routing applied as a per-token mask, one expand"), with the GEMMs left
# to the BLAS (MKL/oneDNN on the CPU, cuBLAS on CUDA); without dropout about 3x faster than the
# per-token kernels on the CPU. Dropout gives each expert its own mask, so its shrink becomes one
# GEMM per expert over x ⊙ M_e·c (the masks drawn by ``_C.routed_lora_dropout``, the kernels'
# own generator), over every expert, not only the k selected. On the CPU that pays only where
# every expert runs anyway (gate mode, or top_k = E): the per-token kernels draw the masks inline
# and touch only the selected experts (see RESULTS: T 2048, d 1024, 8 experts, top-2, rank 32,
# dropout 0.05: per-token 55 ms, GEMMs 86 ms; gate mode with 3 experts: 66 ms against 39 ms).
# CUDA, where the per-token kernels were the bottleneck, takes the GEMMs.
_GEMM_TOKENS = 64

# On the CPU, gate mode without dropout runs as GEMMs below _GEMM_TOKENS too once the experts'
# multiply-adds, N·E·r·(n + m), reach this: every expert then works for every token, which the
# GEMMs do at several times the per-token kernels' rate (Twin-Merging's layers, 3 experts of
# rank 38 at d 384 with the base inside, no grad: 8 tokens 136 µs per-token against 106 µs by
# GEMMs, 48 tokens 312 against 119 µs; 4 experts of rank 16 at d 1024, forward + backward, 4
# tokens: 1064 against 586 µs). Below it the GEMMs' fixed cost wins (2 experts of rank 4 at
# d 128, 48 tokens: 38 against 53 µs). Router mode keeps the per-token kernels, which form only
# the k selected experts.
_GATE_GEMM_WORK = 1 << 18


# The per-token kernels keep per-expert arrays on the stack: at most this many experts
# (kRoutedLoraMaxExperts in csrc/include/meldkit/routed_lora.h).
_PER_TOKEN_MAX_EXPERTS = 64


def _per_token_unsupported(n_experts: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    """True when the per-token kernels cannot run a call that the GEMM path can: more than
    ``_PER_TOKEN_MAX_EXPERTS`` experts, or float64 mixed with other dtypes (they compute in
    float64 only when every input is float64; the GEMMs cast everything to float32)."""
    mixed_f64 = torch.float64 in dtypes and len(set(dtypes)) > 1
    return n_experts > _PER_TOKEN_MAX_EXPERTS or mixed_f64


def _use_gemm(
    n_tokens: int,
    dropout: float,
    device: torch.device,
    dense: bool,
    n_experts: int,
    dtypes: tuple[torch.dtype, ...],
    shared_dropout: bool = False,
    gate_work: int = 0,
) -> bool:
    """``dense``: every expert has work for every token (gate mode, or top_k = E);
    ``gate_work``: in gate mode, the experts' multiply-adds N·E·r·(n + m) (0 in router mode).
    Calls the per-token kernels cannot take run as GEMMs at every token count: too many
    experts, mixed float64, or one dropout mask shared by the experts (the kernels draw one per
    expert); so do large gate-mode calls on the CPU (``_GATE_GEMM_WORK``)."""
    if _per_token_unsupported(n_experts, dtypes) or (shared_dropout and dropout > 0.0):
        return True
    if device.type == "cpu" and dropout == 0.0 and gate_work >= _GATE_GEMM_WORK:
        return True
    return n_tokens >= _GEMM_TOKENS and (dropout == 0.0 or device.type == "cuda" or dense)


def _gate_work(x, lora_a, lora_b, router_weight) -> int:
    """``_use_gemm``'s ``gate_work``: N·E·r·(n + m) in gate mode, 0 in router mode and for
    sizes past the kernels' int range (which they refuse, naming the argument)."""
    n_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    if router_weight is not None or max(rank, d_in, d_out) >= 2**31:
        return 0
    return x.shape[0] * n_experts * rank * (d_in + d_out)


def _dropped(src: torch.Tensor, out: torch.Tensor, dropout: float, seed: int, expert: int):
    """``out = src ⊙ M_e·c`` (expert ``expert``'s dropout mask, ``[N, n]`` in the compute dtype;
    ``out`` may be ``src``)."""
    _native._C.routed_lora_dropout(
        src.detach(), out.detach(), dropout, seed, expert, _native.stream_of(src.device)
    )
    return out


def _cat_a(lora_a: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``[A_1; …; A_E]`` ``[E·r, n]`` in ``acc``."""
    return lora_a.to(acc).reshape(-1, lora_a.shape[2])


def _cat_b(lora_b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``[B_1 … B_E]`` ``[m, E·r]`` in ``acc``."""
    n_experts, d_out, rank = lora_b.shape
    return lora_b.to(acc).permute(1, 0, 2).reshape(d_out, n_experts * rank)


# Up to this many selected experts, the GEMM path picks them by repeated argmax instead of a
# stable sort of every row (GOAT's top-2 of 8: 2 x 0.4 ms per call -> about 0.1 ms at 2048 tokens).
_ARGMAX_TOP_K = 4


def _selected_mask(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[N, E]`` bool: the top-k experts of each row, with the kernels' and the reference's
    rule (ties to the lower index, NaN last).

    For small k, k rounds of ``argmax``, which returns the first of equal maxima: probabilities
    are ≥ 0, so NaN enters as −1 (after every number, in index order, as the stable sort puts
    it) and a taken expert as −2."""
    n_experts = probs.shape[-1]
    if top_k >= n_experts:
        return torch.ones_like(probs, dtype=torch.bool)
    mask = torch.zeros_like(probs, dtype=torch.bool)
    if top_k > _ARGMAX_TOP_K:
        return mask.scatter_(1, top_k_ref(probs, top_k), True)
    key = torch.where(torch.isnan(probs), -1.0, probs)
    for _ in range(top_k):
        taken = key.argmax(-1, keepdim=True)
        mask.scatter_(1, taken, True)
        key.scatter_(1, taken, -2.0)
    return mask


def _base_dx(dy, x, base_weight, acc):
    """The base layer's part of dx, ``dy·W₀`` (in ``x.dtype``, as its ``nn.Linear``
    backward), as a fresh tensor in ``acc`` for the adapter's part to accumulate into."""
    return (dy.to(x.dtype) @ base_weight).to(acc)


def _plus_adapter(
    base: torch.Tensor, adapter: torch.Tensor | None = None, gemm=None
) -> torch.Tensor:
    """``base + adapter``, added in the adapter's (compute) dtype, for the caller to round once
    to x's dtype: ``base`` is the base layer's output (or its part of dx) in x's dtype, fresh;
    ``adapter`` the adapter's, in float32, or ``gemm = (left, right)`` for ``left·right``.

    Where the two dtypes agree (an fp32 layer), and on the CPU, the base is converted to the
    compute dtype and the adapter accumulates into it (the GEMM's C operand: no separate pass).
    On CUDA with a bf16 or fp16 base, :func:`_add_rounded` instead: the adapter on its own, then
    one pass that reads the base and writes the rounded sum, 384 MB for a [8192, 4096] bf16 layer
    against 640 MB for the float32 copy, the accumulating GEMM's read-modify-write of it and the
    rounding pass. On the CPU that mixed-dtype add runs unvectorised in torch (a bf16 GOAT layer,
    T 2048, d 1024: forward + backward 22.6 ms against 20.8 ms)."""
    acc = (gemm[0] if gemm is not None else adapter).dtype
    if base.dtype == acc or not _split_add(base):
        base = base.to(acc)
        return base.addmm_(*gemm) if gemm is not None else adapter.add_(base)
    return _add_rounded(base, gemm[0] @ gemm[1] if gemm is not None else adapter)


def _split_add(base: torch.Tensor) -> bool:
    """Whether :func:`_plus_adapter` adds a low-precision base on its own (CUDA), not by
    accumulating into a float32 copy of it (CPU)."""
    return base.device.type != "cpu"


def _add_rounded(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``low + high`` in ``high``'s (wider) dtype, rounded once to ``low``'s: the same bits as
    ``(low.to(high.dtype) + high).to(low.dtype)``, without the two intermediate tensors."""
    return torch.add(low, high, out=torch.empty_like(low))


def _idle_rows_zeroed_(v: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """:func:`idle_rows_zeroed_ref` in place on ``v``, a scratch masked copy of x (per expert
    with dropout: an out-of-place fill wrote one more ``[N, n]`` float32 tensor per expert)."""
    return v.masked_fill_((grad == 0).all(-1, keepdim=True), 0.0)


def _coefficient_product(v: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """:func:`coefficient_product_ref`: ``v ⊙ (coef ⊗ 1_r)``, exactly 0 where ``coef`` is 0.
    On the CPU, where reading a flag is no device synchronisation, the zeros are written only
    when the product holds inf or NaN (else a zero coefficient already gave ±0)."""
    if v.device.type == "cpu":
        product = v * coef.unsqueeze(-1)
        if bool(product.sum().isfinite()):
            return product
    return coefficient_product_ref(v, coef)


def _idle_tokens_out(xa: torch.Tensor, dh: torch.Tensor, fresh: bool) -> torch.Tensor:
    """``xa`` ``[N, n]`` with 0 in the rows of the tokens whose ``dh`` row is all 0 (every
    gate 0, gate mode), so that ``dhᵀ·xa`` leaves them out even with inf or NaN in x, as the
    per-token kernels do (:func:`idle_rows_zeroed_ref`); in place when ``xa`` is ``fresh`` (a
    converted copy of x). On the CPU, where reading a flag is no device synchronisation, only
    when such a row holds inf or NaN (a copy of x costs about as much as the dA GEMM; reading
    the idle rows, usually none, does not); on CUDA always (no synchronisation)."""
    idle = dh.abs().amax(-1, keepdim=True) == 0  # [N, 1]; a NaN row is not idle
    if xa.device.type == "cpu":
        rows = idle.squeeze(1).nonzero().squeeze(1)
        if rows.numel() == 0 or bool(xa.index_select(0, rows).isfinite().all()):
            return xa
    return xa.masked_fill_(idle, 0.0) if fresh else xa.masked_fill(idle, 0.0)


def _gemm_forward(
    x,
    lora_a,
    lora_b,
    scaling,
    router_weight,
    gates,
    top_k,
    dropout,
    seed,
    base_weight=None,
    base_bias=None,
    *,
    acc,
    shared=False,
):
    """``(y, probs, weights, h)`` as the native forward returns them, in ``acc``, by GEMMs:
    ``[h | z] = x·[A_1; …; A_E; W_z]ᵀ`` (one pass over x), softmax → top-k → renormalise on
    the small ``[N, E]`` logits (gate mode: the caller's gates), then
    ``y = (h ⊙ (g·s ⊗ 1_r))·[B_1 … B_E]ᵀ``, accumulated into the base layer's output when one
    is given. With dropout, ``h_e = (x ⊙ M_e·c)·A_eᵀ``, one GEMM per expert, and the router
    sees the raw x; with one mask for every expert (``shared``), ``h = (x ⊙ M_0·c)·[A]ᵀ``, one
    GEMM. The same arithmetic as the kernels up to summation order."""
    n_tokens = x.shape[0]
    n_experts, rank, _ = lora_a.shape
    er = n_experts * rank
    xa = x.to(acc).contiguous()
    z = None
    if dropout > 0.0 and shared:
        h = _dropped(xa, torch.empty_like(xa), dropout, seed, 0) @ _cat_a(lora_a, acc).T
        if router_weight is not None:
            z = xa @ router_weight.to(acc).T
    elif dropout > 0.0:
        buf = torch.empty_like(xa)
        h = torch.cat(
            [_dropped(xa, buf, dropout, seed, e) @ lora_a[e].to(acc).T for e in range(n_experts)],
            dim=1,
        )
        if router_weight is not None:
            z = xa @ router_weight.to(acc).T
    elif router_weight is None:
        h = xa @ _cat_a(lora_a, acc).T
    else:
        zh = xa @ torch.cat([_cat_a(lora_a, acc), router_weight.to(acc)]).T
        h, z = zh[:, :er].contiguous(), zh[:, er:]
    if router_weight is None:
        weights = gates.to(acc, copy=True)  # an output: never an alias of the input
        probs = h.new_empty(0)
    else:
        probs = torch.softmax(z, dim=-1)
        p_sel = torch.where(_selected_mask(probs, top_k), probs, 0.0)
        weights = p_sel / p_sel.sum(-1, keepdim=True)
    u = _coefficient_product(h.view(n_tokens, n_experts, rank), weights * scaling.to(acc))
    u = u.view(n_tokens, er)
    if base_weight is None:
        y = u @ _cat_b(lora_b, acc).T
    else:
        base = torch.nn.functional.linear(x, base_weight, base_bias)
        y = _plus_adapter(base, None, gemm=(u, _cat_b(lora_b, acc).T))
    return y.to(x.dtype), probs, weights, h


def _gemm_backward(
    dy,
    x,
    lora_a,
    lora_b,
    scaling,
    router_weight,
    weights,
    probs,
    dprobs,
    h,
    top_k,
    needs,
    gates_dtype,
    dropout,
    seed,
    base_weight=None,
    shared=False,
):
    """The five gradients of :func:`routed_lora_backward_ref` by GEMMs over the concatenated
    experts: ``U = dy·[B_1 … B_E]``, ``dB = dyᵀ·(h ⊙ g·s)``, and, with ``dH = U ⊙ g·s`` and the
    router's ``dz``, ``dx = [dH | dz]·[A; W_z]`` and ``[dA; dW_z] = [dH | dz]ᵀ·x``. With dropout
    the experts' parts are one GEMM pair per expert, through its regenerated mask:
    ``dx = Σ_e (dH_e·A_e) ⊙ M_e·c + dz·W_z`` and ``dA_e = dH_eᵀ·(x ⊙ M_e·c)``; with one mask
    for every expert (``shared``), ``dx = (dH·A) ⊙ M_0·c + dz·W_z`` and ``dA = dHᵀ·(x ⊙ M_0·c)``,
    one GEMM each. With a base
    linear, dx starts from ``dy·W₀`` and the experts' GEMMs accumulate into it. Unneeded
    gradients are empty ``[0]`` tensors."""
    need_dx, need_da, need_db, need_dw, need_dg = needs
    acc = h.dtype
    n_tokens = x.shape[0]
    n_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    er = n_experts * rank
    s = scaling.to(acc)
    dyc = dy.to(acc)
    gs = weights * s  # [N, E], the coefficients g·s
    h3 = h.view(n_tokens, n_experts, rank)
    u3 = (dyc @ _cat_b(lora_b, acc)).view(n_tokens, n_experts, rank)
    dx = da = db = dw = dgates = None
    if need_db:
        db = dyc.T @ _coefficient_product(h3, gs).view(n_tokens, er)  # [m, E·r]
        db = db.view(d_out, n_experts, rank).permute(1, 0, 2).to(lora_b.dtype).contiguous()
    need_dz = router_weight is not None and (need_dx or need_dw)
    dz = None
    if need_dg or need_dz:
        dg = s * (h3 * u3).sum(-1)  # [N, E]
        if need_dg:
            dgates = dg.to(gates_dtype)
        if need_dz:
            selected = _selected_mask(probs, top_k)
            p_sum = torch.where(selected, probs, 0).sum(-1, keepdim=True)
            # Σ_{j∈Ω} g_j dg_j over the selected experts only: h (and so dg) is formed for
            # every expert here, and an unselected one's may be inf (the kernels leave it 0).
            gdg = torch.where(selected, weights * dg, 0).sum(-1, keepdim=True)
            dp = torch.where(selected, (dg - gdg) / p_sum, 0)
            if dprobs is not None:
                dp = dp + dprobs.to(acc)
            dz = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    if dropout > 0.0 and shared and (need_dx or need_da or need_dw):
        dh = _coefficient_product(u3, gs).view(n_tokens, er)
        xa = x.to(acc).contiguous()
        if need_da:
            xd = _idle_rows_zeroed_(_dropped(xa, torch.empty_like(xa), dropout, seed, 0), dh)
            da = (dh.T @ xd).reshape(n_experts, rank, d_in).to(lora_a.dtype).contiguous()
        if need_dx:
            part = dh @ _cat_a(lora_a, acc)
            part = _dropped(part, part, dropout, seed, 0)
            dxc = part if base_weight is None else _base_dx(dy, x, base_weight, acc).add_(part)
            if dz is not None:  # the router sees the raw x
                dxc.addmm_(dz, router_weight.to(acc))
            dx = dxc.to(x.dtype)
        if need_dw and dz is not None:
            dw = (dz.T @ xa).to(router_weight.dtype).contiguous()
    elif dropout > 0.0 and (need_dx or need_da or need_dw):
        dh = _coefficient_product(u3, gs).view(n_tokens, er)
        xa = x.to(acc).contiguous()
        dxc = None
        if need_dx:
            dxc = (
                torch.zeros(n_tokens, d_in, dtype=acc, device=x.device)
                if base_weight is None
                else _base_dx(dy, x, base_weight, acc)
            )
        da_acc = torch.empty(n_experts, rank, d_in, dtype=acc, device=x.device) if need_da else None
        buf = torch.empty_like(xa) if need_da else None
        if need_dx or need_da:
            for e in range(n_experts):
                dh_e = dh[:, e * rank : (e + 1) * rank]
                if need_da:
                    xd = _idle_rows_zeroed_(_dropped(xa, buf, dropout, seed, e), dh_e)
                    da_acc[e] = dh_e.T @ xd
                if need_dx:
                    part = dh_e @ lora_a[e].to(acc)
                    dxc += _dropped(part, part, dropout, seed, e)
        if dz is not None:  # the router sees the raw x
            if need_dw:
                dw = (dz.T @ xa).to(router_weight.dtype).contiguous()
            if need_dx:
                dxc += dz @ router_weight.to(acc)
        if need_dx:
            dx = dxc.to(x.dtype)
        if need_da:
            da = da_acc.to(lora_a.dtype).contiguous()
    elif need_dx or need_da or need_dw:
        dh = _coefficient_product(u3, gs).view(n_tokens, er)
        left = dh if dz is None else torch.cat([dh, dz], dim=1)  # [N, E·r (+ E)]
        if need_dx:
            right = _cat_a(lora_a, acc)
            if dz is not None:
                right = torch.cat([right, router_weight.to(acc)])
            if base_weight is None:
                dx = (left @ right).to(x.dtype)
            else:
                base = dy.to(x.dtype) @ base_weight
                dx = _plus_adapter(base, None, gemm=(left, right)).to(x.dtype)
        if need_da or need_dw:
            xa = x.to(acc)
            # Gate mode only: in router mode, inf or NaN in a token's x makes its logits, hence
            # its dz, NaN anyway.
            if router_weight is None:
                xa = _idle_tokens_out(xa, dh, fresh=xa is not x)
            if need_da and need_dw:
                both = left.T @ xa
                da, dw = both[:er], both[er:].clone()  # outputs must not share storage
            elif need_da:
                da = dh.T @ xa
            else:
                dw = dz.T @ xa
            if da is not None:
                da = da.reshape(n_experts, rank, d_in).to(lora_a.dtype).contiguous()
            if dw is not None:
                dw = dw.to(router_weight.dtype).contiguous()
    return tuple(h.new_empty(0) if g is None else g for g in (dx, da, db, dw, dgates))


def _routed_lora_native(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    router_weight: torch.Tensor | None,
    gates: torch.Tensor | None,
    top_k: int,
    dropout: float,
    seed: torch.Tensor | None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    shared_dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    route = router_weight if gates is None else gates
    dtypes = _dtypes(x, lora_a, lora_b, route)
    seed = _seed_value(seed, dropout)
    args = (x, lora_a, lora_b, scaling, router_weight, gates, top_k, dropout, seed)
    if _use_reference(x.device, dtypes):
        return routed_lora_forward_ref(*args, base_weight, base_bias, shared_dropout)
    acc = compute_dtype(x, lora_a, lora_b, route)
    n_tokens, n_experts, rank = x.shape[0], lora_a.shape[0], lora_a.shape[1]
    device = x.device
    dense = router_weight is None or top_k == n_experts
    work = _gate_work(x, lora_a, lora_b, router_weight)
    if _use_gemm(n_tokens, dropout, device, dense, n_experts, dtypes, shared_dropout, work):
        return _gemm_forward(*args, base_weight, base_bias, acc=acc, shared=shared_dropout)
    x_in = x
    if base_weight is not None:
        # The kernel's y in the compute dtype, so that base + adapter rounds once to x.dtype.
        x = x.to(acc)
    y = torch.empty(n_tokens, lora_b.shape[1], dtype=x.dtype, device=device)
    probs = None
    if router_weight is not None:
        probs = torch.empty(n_tokens, n_experts, dtype=acc, device=device)
    weights = torch.empty(n_tokens, n_experts, dtype=acc, device=device)
    h = torch.empty(n_tokens, n_experts * rank, dtype=acc, device=device)
    _native._C.routed_lora_forward(
        _contiguous(x),
        _contiguous(lora_a),
        _contiguous(lora_b),
        scaling.detach().to(acc).contiguous(),
        _contiguous(router_weight),
        _contiguous(gates),
        top_k,
        dropout,
        seed,
        y,
        probs,
        weights,
        h,
        _native.stream_of(device),
    )
    if base_weight is not None:
        base = torch.nn.functional.linear(x_in, base_weight, base_bias)
        y = _plus_adapter(base, y).to(x_in.dtype)
    return y, (h.new_empty(0) if probs is None else probs), weights, h


def _routed_lora_fake(
    x,
    lora_a,
    lora_b,
    scaling,
    router_weight,
    gates,
    top_k,
    dropout,
    seed,
    base_weight=None,
    base_bias=None,
    shared_dropout=False,
):
    acc = compute_dtype(x, lora_a, lora_b, router_weight if gates is None else gates)
    n_tokens, n_experts, rank = x.shape[0], lora_a.shape[0], lora_a.shape[1]
    y = x.new_empty(n_tokens, lora_b.shape[1])
    probs_shape = (n_tokens, n_experts) if router_weight is not None else (0,)
    probs = x.new_empty(probs_shape, dtype=acc)
    weights = x.new_empty(n_tokens, n_experts, dtype=acc)
    h = x.new_empty(n_tokens, n_experts * rank, dtype=acc)
    return y, probs, weights, h


# ---- backward op ---------------------------------------------------------------------------


def _backward_reference(*args) -> tuple[torch.Tensor, ...]:
    """:func:`routed_lora_backward_ref`, with an empty ``[0]`` tensor for each unneeded gradient."""
    grads = routed_lora_backward_ref(*args)
    h = args[9]
    return tuple(h.new_empty(0) if g is None else g for g in grads)


def _routed_lora_backward_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    router_weight: torch.Tensor | None,
    weights: torch.Tensor,
    probs: torch.Tensor | None,
    dprobs: torch.Tensor | None,
    h: torch.Tensor,
    top_k: int,
    dropout: float,
    seed: torch.Tensor | None,
    needs: list[bool],
    gates_dtype: torch.dtype | None,
    base_weight: torch.Tensor | None = None,
    shared_dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed = _seed_value(seed, dropout)
    return _backward_reference(
        dy,
        x,
        lora_a,
        lora_b,
        scaling,
        router_weight,
        weights,
        probs,
        dprobs,
        h,
        top_k,
        dropout,
        seed,
        tuple(needs),
        gates_dtype,
        base_weight,
        shared_dropout,
    )


def _grad_buffers(x, lora_a, lora_b, router_weight, needs, gates_dtype, new):
    """The five gradients' tensors (``new(shape, dtype)``), or None where not needed."""
    n_tokens, n_experts = x.shape[0], lora_a.shape[0]
    specs = [
        (x.shape, x.dtype),
        (lora_a.shape, lora_a.dtype),
        (lora_b.shape, lora_b.dtype),
        None if router_weight is None else (router_weight.shape, router_weight.dtype),
        None if gates_dtype is None else ((n_tokens, n_experts), gates_dtype),
    ]
    return [
        new(spec[0], spec[1]) if need and spec is not None else None
        for need, spec in zip(needs, specs, strict=True)
    ]


def _routed_lora_backward_native(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    router_weight: torch.Tensor | None,
    weights: torch.Tensor,
    probs: torch.Tensor | None,
    dprobs: torch.Tensor | None,
    h: torch.Tensor,
    top_k: int,
    dropout: float,
    seed: torch.Tensor | None,
    needs: list[bool],
    gates_dtype: torch.dtype | None,
    base_weight: torch.Tensor | None = None,
    shared_dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seed = _seed_value(seed, dropout)
    route_dtype = router_weight.dtype if router_weight is not None else gates_dtype
    dtypes = tuple(dict.fromkeys(d for d in (x.dtype, lora_a.dtype, lora_b.dtype, route_dtype)))
    if _use_reference(x.device, dtypes):
        return _backward_reference(
            dy,
            x,
            lora_a,
            lora_b,
            scaling,
            router_weight,
            weights,
            probs,
            dprobs,
            h,
            top_k,
            dropout,
            seed,
            tuple(needs),
            gates_dtype,
            base_weight,
            shared_dropout,
        )
    dense = router_weight is None or top_k == lora_a.shape[0]
    work = _gate_work(x, lora_a, lora_b, router_weight)
    n_experts = lora_a.shape[0]
    if _use_gemm(x.shape[0], dropout, x.device, dense, n_experts, dtypes, shared_dropout, work):
        return _gemm_backward(
            dy,
            x,
            lora_a,
            lora_b,
            scaling,
            router_weight,
            weights,
            probs,
            dprobs,
            h,
            top_k,
            tuple(needs),
            gates_dtype,
            dropout,
            seed,
            base_weight,
            shared_dropout,
        )
    x_in = x
    if base_weight is not None and needs[0]:
        # The kernel's dx in the compute dtype, so that dy·W₀ + its part rounds once.
        x = x.to(h.dtype)
    grads = _grad_buffers(
        x,
        lora_a,
        lora_b,
        router_weight,
        needs,
        gates_dtype,
        lambda shape, dtype: torch.empty(shape, dtype=dtype, device=x.device),
    )
    _native._C.routed_lora_backward(
        _contiguous(dy.to(x.dtype)),
        _contiguous(x),
        _contiguous(lora_a),
        _contiguous(lora_b),
        scaling.detach().to(h.dtype).contiguous(),
        _contiguous(router_weight),
        _contiguous(weights),
        _contiguous(probs),
        None if dprobs is None else dprobs.detach().to(h.dtype).contiguous(),
        _contiguous(h),
        top_k,
        dropout,
        seed,
        *grads,
        _native.stream_of(x.device),
    )
    if base_weight is not None and needs[0]:
        grads[0] = _plus_adapter(dy.to(x_in.dtype) @ base_weight, grads[0]).to(x_in.dtype)
    return tuple(h.new_empty(0) if g is None else g for g in grads)


def _routed_lora_backward_fake(
    dy,
    x,
    lora_a,
    lora_b,
    scaling,
    router_weight,
    weights,
    probs,
    dprobs,
    h,
    top_k,
    dropout,
    seed,
    needs,
    gates_dtype,
    base_weight=None,
    shared_dropout=False,
):
    grads = _grad_buffers(
        x,
        lora_a,
        lora_b,
        router_weight,
        needs,
        gates_dtype,
        lambda shape, dtype: x.new_empty(shape, dtype=dtype),
    )
    return tuple(h.new_empty(0) if g is None else g for g in grads)


# ---- autograd ------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, lora_a, lora_b, scaling, router_weight, gates, top_k, dropout, seed = inputs[:9]
    base_weight = inputs[9] if len(inputs) > 9 else None
    _, probs, weights, h = output
    ctx.mark_non_differentiable(weights, h)  # internal: saved for the backward only
    ctx.save_for_backward(
        x,
        lora_a,
        lora_b,
        scaling,
        router_weight,
        weights,
        probs if router_weight is not None else None,
        h,
        base_weight,
        seed,
    )
    ctx.top_k, ctx.dropout = top_k, dropout
    ctx.shared_dropout = bool(inputs[11]) if len(inputs) > 11 else False
    ctx.gates_dtype = None if gates is None else gates.dtype


def _backward(ctx, dy, dprobs, _dweights, _dh):
    saved = ctx.saved_tensors
    x, lora_a, lora_b, scaling, router_weight, weights, probs, h, base_weight, seed = saved
    need = ctx.needs_input_grad
    # (dx, dA, dB, dW_z, dgates); scaling is a constant. The base linear's own gradients
    # (inputs 9 and 10) are plain PyTorch.
    needs = [need[0], need[1], need[2], need[4], need[5]]
    base_needs = need[9:]
    base_grads = [None] * len(base_needs)
    if dy is not None and any(base_needs):
        dyx = dy.to(x.dtype)
        if base_needs[0]:
            base_grads[0] = dyx.T @ x
        if len(base_needs) > 1 and base_needs[1]:
            base_grads[1] = dyx.sum(0)
    base_grads = tuple(base_grads)
    if not any(needs):
        return (None,) * 9 + base_grads
    if dy is None:  # only probs reached the loss
        dy = x.new_zeros(x.shape[0], lora_b.shape[1])
    if probs is None:
        dprobs = None
    backward_op = _routed_lora_dropout_backward if ctx.dropout > 0.0 else _routed_lora_backward
    grads = backward_op(
        dy,
        x,
        lora_a,
        lora_b,
        scaling,
        router_weight,
        weights,
        probs,
        dprobs,
        h,
        ctx.top_k,
        ctx.dropout,
        seed,
        needs,
        ctx.gates_dtype,
        base_weight,
        ctx.shared_dropout,
    )
    dx, da, db, dw, dgates = (g if n else None for g, n in zip(grads, needs, strict=True))
    return (dx, da, db, None, dw, dgates, None, None, None, *base_grads)


# The kernels, also called directly in plain eager calls (_native.call), run without autocast.
_routed_lora_native = _without_autocast(_routed_lora_native)
_routed_lora_backward_native = _without_autocast(_routed_lora_backward_native)

_routed_lora_backward, _routed_lora_dropout_backward = _custom_ops(
    "routed_lora_backward",
    "routed_lora_dropout_backward",
    _routed_lora_backward_impl,
    "(Tensor dy, Tensor x, Tensor lora_a, Tensor lora_b, Tensor scaling, Tensor? router_weight,"
    " Tensor weights, Tensor? probs, Tensor? dprobs, Tensor h, SymInt top_k, float dropout,"
    " Tensor? seed, bool[] needs, ScalarType? gates_dtype, Tensor? base_weight=None,"
    " bool shared_dropout=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
for _op in (_routed_lora_backward, _routed_lora_dropout_backward):
    _op.register_kernel(["cpu", "cuda"], _routed_lora_backward_native)
    _op.register_fake(_routed_lora_backward_fake)
for _op in (_routed_lora, _routed_lora_dropout):
    _op.register_kernel(["cpu", "cuda"], _routed_lora_native)
    _op.register_fake(_routed_lora_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)
del _op


# ---- public API ----------------------------------------------------------------------------


def _error(exc: type[Exception], name: str, message: str) -> Exception:
    return exc(f"meldkit.{_OP}: argument '{name}': {message}")


def _check_tensor(name: str, t: object, dim: int, device: torch.device | None) -> torch.Tensor:
    """``t`` as a floating tensor of ``dim`` dimensions (any when -1) on ``device``."""
    _checks.float_tensor(_OP, name, t, dim)
    if device is not None and t.device != device:
        raise _error(TypeError, name, f"is on {t.device} but 'x' is on {device}")
    return t


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != expected:
        raise _error(
            ValueError, name, f"shape {list(t.shape)} does not match {list(expected)} ({meaning})"
        )


def _scaling_tensor(scaling: object, n_experts: int, dtype, device) -> torch.Tensor:
    """``scaling`` as a constant ``[E]`` tensor of ``dtype`` on ``device`` (no host sync)."""
    if isinstance(scaling, torch.Tensor):
        _check_tensor("scaling", scaling, 1, None)
        if scaling.device not in (device, torch.device("cpu")):
            raise _error(TypeError, "scaling", f"is on {scaling.device} but 'x' is on {device}")
        if scaling.requires_grad:
            raise _error(
                ValueError, "scaling", "is a constant and must not require grad (detach it)"
            )
        _check_shape("scaling", scaling, (n_experts,), "[E]")
        return scaling.to(device=device, dtype=dtype, copy=True)
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise _error(
            TypeError, "scaling", f"expected a float or a tensor, got {type(scaling).__name__}"
        )
    if not math.isfinite(float(scaling)) or abs(float(scaling)) > torch.finfo(torch.float32).max:
        raise _error(ValueError, "scaling", f"must be finite in float32, got {scaling}")
    return torch.full((n_experts,), float(scaling), dtype=dtype, device=device)


def _seed_tensor(seed: object) -> torch.Tensor:
    """``seed`` (an int, or a one-element int64 CPU tensor) as the ops' one-element tensor.
    A tensor's value is checked where the op reads it, never here (under ``torch.compile`` a
    read here would break the graph)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise _error(
                TypeError,
                "seed",
                f"a tensor seed must hold one int64, got {seed.dtype} of shape {list(seed.shape)}",
            )
        if seed.device.type != "cpu":
            raise _error(
                TypeError,
                "seed",
                f"a tensor seed must be on the CPU (reading it from {seed.device} would "
                "synchronise with the device)",
            )
        return seed.detach()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise _error(TypeError, "seed", f"an int is required when dropout > 0, got {seed!r}")
    if not 0 <= int(seed) < 2**63:
        raise _error(ValueError, "seed", f"{seed} is not in [0, 2**63)")
    return torch.tensor(int(seed), dtype=torch.int64)


def routed_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float | torch.Tensor,
    *,
    router_weight: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    top_k: int | None = None,
    dropout: float = 0.0,
    seed: int | torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    shared_dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mixture of LoRA experts (GOAT's layer, optionally with its base): routed, scaled, summed.

    With x flattened to N tokens, E experts of rank r, A_e = ``lora_a[e]``, B_e = ``lora_b[e]``,
    s_e the scaling and q the dropout probability::

        y = Σ_e g_e · s_e · (dropout_e(x) A_eᵀ) B_eᵀ

    Router mode (``router_weight`` W_z and ``top_k`` k): ``p = softmax(x W_zᵀ)`` in float32,
    the k largest p_e are kept (ties go to the lower expert index) and renormalised,
    ``g_e = p_e / Σ_{j∈Ω} p_j``, and ``probs = p`` is returned for the load-balancing loss.
    Gate mode (``gates``): g is the caller's, dense or sparse, and ``probs`` is None.
    Dropout masks are independent per expert and reproducible from ``seed`` (see
    :mod:`meldkit.ops.routed_lora_ref`, which spells out every formula, forward and backward).

    Parameters
    ----------
    x : Tensor
        ``[..., n]``: float32, bfloat16, float16 or float64; its dtype may differ from the
        weights' (bf16 activations with fp32 LoRA weights). NaN and inf propagate, except
        through a zero coefficient (see Notes).
    lora_a : Tensor
        A ``[E, r, n]``, E ≥ 1 (any number: above 64 experts, or with float64 mixed with other
        dtypes, every token count runs the GEMM path), r ≥ 1; same device as ``x``.
    lora_b : Tensor
        B ``[E, m, r]``, same dtype as ``lora_a``.
    scaling : float or Tensor
        s: one float for every expert, or ``[E]`` (GOAT-s). A constant: a tensor must not
        require grad. Used in the compute dtype (float32 unless everything is float64). A float
        must be finite; a tensor's values are not checked (that would synchronise with the
        device): NaN or inf in it propagates to ``y`` and the gradients like NaN in ``x``.
    router_weight : Tensor, optional
        W_z ``[E, n]``, same dtype as ``lora_a``. Exactly one of ``router_weight`` and
        ``gates``.
    gates : Tensor, optional
        g ``[..., E]`` with the leading dims of ``x``, any floating dtype; receives a gradient
        ``s_e ⟨h_e, U_e⟩`` in every entry (zeros included) when it requires grad.
    top_k : int, optional
        k in 1 … E; required with ``router_weight``, not allowed with ``gates``.
    dropout : float
        q in [0, 1), applied to x independently per expert (0: no dropout).
    seed : int or Tensor, optional
        Key of the dropout masks, 0 ≤ seed < 2⁶³; required when ``dropout > 0``, ignored
        otherwise. Same seed, same masks on every device and backend. May be a one-element
        int64 CPU tensor, e.g. ``torch.randint(0, 2**62, ())``: a seed drawn per step that way
        stays inside a ``torch.compile`` graph (an int read from a tensor breaks the graph).
        A tensor's value is checked when the op runs.
    base_weight : Tensor, optional
        W₀ ``[m, n]`` of the base layer (an ``nn.Linear``'s ``weight``), in ``x.dtype``, same
        device: ``y`` then includes its output ``x·W₀ᵀ + b``, computed in ``x.dtype`` as the
        layer computes it and added to the adapter's in the compute dtype with one rounding.
        Cheaper than adding the two outputs: from 64 tokens without dropout the adapter's
        expand accumulates into the base output, and its dx into ``dy·W₀``, in place (two
        elementwise passes and two fresh ``[N, m]``/``[N, n]`` tensors fewer per step).
        Gradients reach W₀ (``dyᵀ·x``) when it requires grad; a frozen base costs nothing.
    base_bias : Tensor, optional
        b ``[m]`` (the layer's ``bias``), in ``x.dtype``; only with ``base_weight``.
    shared_dropout : bool
        One dropout mask for every expert (expert 0's, ``x ⊙ M_0·c``) instead of one per expert
        (GOAT's official behaviour, the default). A fast path of meldkit's own (not the
        official code's): the experts' shrink and its backward are then one GEMM each over the
        concatenated experts, as without dropout, instead of one per expert; whether
        the per-expert masks matter for accuracy is an open question of the GOAT paper. Calls
        with it always run as GEMMs.

    Returns
    -------
    y : Tensor
        ``[..., m]`` in ``x.dtype``: the adapter contribution, plus the base layer's output
        when ``base_weight`` is given.
    probs : Tensor or None
        ``[N, E]`` (N = prod of the leading dims) full softmax probabilities in float32
        (float64 when every input is float64); gradients flow through it. None in gate mode.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, naming it (dtype, shape mismatch between E, r, n and m, device
        mismatch, both or neither of ``router_weight``/``gates``, ``top_k`` out of range,
        ``dropout`` outside [0, 1), missing or out-of-range ``seed``, a base weight or bias
        of the wrong shape, dtype or device, a bias without a weight).

    Notes
    -----
    Arithmetic in float32 (float64 when x, the LoRA weights and the router weights or gates
    are all float64); gradients come back in each input's own dtype. The backward regenerates
    the dropout masks from ``seed`` and recomputes the selected experts from the saved
    ``probs``: it stores only ``[N, E]`` routing weights and ``[N, E·r]`` expert activations.
    Double backward is not supported.

    *Zero coefficients.* An expert whose coefficient ``g_e·s_e`` (in the compute dtype) is
    exactly 0 for a token (a zero gate, an expert outside the top k, s_e = 0) contributes
    exactly 0 to that token's ``y`` and nothing to ``dx``, ``dA_e`` or ``dB_e``: the products
    are not formed, so inf or NaN in x (or h) there never meets the 0, on every path and token
    count. A token whose every gate is 0 (padding) thus leaves y and every weight gradient as
    if it were absent; its gates still receive ``s_e⟨h_e, U_e⟩``, inf or NaN with such an x.
    One exception, on the GEMM path without per-expert dropout (from 64 tokens, or a large
    gate-mode call on the CPU: the experts' dA is one GEMM there): a
    token with inf or NaN in x and some nonzero coefficient (so its own y is not finite)
    brings NaN into the dA of every expert, not only those with a nonzero coefficient.

    On CUDA neither pass synchronises, so both can be captured in a CUDA graph. The seed,
    though, is read on the host when the op runs: a graph captured with ``torch.cuda.graph``
    replays the masks of the seed it was captured with, and refilling a seed tensor between
    replays does not change them (``torch.randint`` on the CPU is not captured either). Capture
    training steps with ``dropout=0``, or one graph per seed. ``torch.compile`` is not
    affected: calls with dropout go through ``meldkit::routed_lora_dropout``, tagged
    ``cudagraph_unsafe``, which its CUDA-graph modes run outside their graphs; calls without
    dropout take no seed and stay inside.
    """
    x = _check_tensor("x", x, -1, None)
    if x.dim() < 1:
        raise _error(ValueError, "x", "expected at least 1 dimension [..., n], got a scalar")
    device = x.device
    lora_a = _check_tensor("lora_a", lora_a, 3, device)
    lora_b = _check_tensor("lora_b", lora_b, 3, device)
    n_experts, rank, d_in = lora_a.shape
    if n_experts < 1 or rank < 1 or d_in < 1:
        raise _error(ValueError, "lora_a", f"shape {list(lora_a.shape)} has a zero dimension")
    if x.shape[-1] != d_in:
        raise _error(
            ValueError, "x", f"last dimension {x.shape[-1]} does not match lora_a's n = {d_in}"
        )
    if lora_b.shape[0] != n_experts or lora_b.shape[2] != rank or lora_b.shape[1] < 1:
        raise _error(
            ValueError,
            "lora_b",
            f"shape {list(lora_b.shape)} does not match [E, m, r] = [{n_experts}, m, {rank}] "
            "(E and r from lora_a, m ≥ 1)",
        )
    if lora_b.dtype != lora_a.dtype:
        raise _error(TypeError, "lora_b", f"dtype {lora_b.dtype} differs from lora_a's")

    lead = tuple(x.shape[:-1])
    if (router_weight is None) == (gates is None):
        raise _error(ValueError, "router_weight", "give exactly one of router_weight and gates")
    if router_weight is not None:
        router_weight = _check_tensor("router_weight", router_weight, 2, device)
        _check_shape("router_weight", router_weight, (n_experts, d_in), "[E, n]")
        if router_weight.dtype != lora_a.dtype:
            raise _error(
                TypeError, "router_weight", f"dtype {router_weight.dtype} differs from lora_a's"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise _error(TypeError, "top_k", f"expected an int with router_weight, got {top_k!r}")
        if not 1 <= int(top_k) <= n_experts:
            raise _error(ValueError, "top_k", f"{top_k} is not in 1 … E = {n_experts}")
        top_k = int(top_k)
    else:
        gates = _check_tensor("gates", gates, -1, device)
        _check_shape("gates", gates, (*lead, n_experts), "x's leading dims and E")
        if top_k is not None:
            raise _error(ValueError, "top_k", "only goes with router_weight, not gates")
        top_k = 0

    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise _error(TypeError, "dropout", f"expected a float, got {type(dropout).__name__}")
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise _error(ValueError, "dropout", f"{dropout} is not in [0, 1)")
    seed = None if dropout == 0.0 else _seed_tensor(seed)
    if not isinstance(shared_dropout, bool):
        raise _error(TypeError, "shared_dropout", f"expected a bool, got {shared_dropout!r}")

    d_out = lora_b.shape[1]
    if base_weight is not None:
        base_weight = _check_tensor("base_weight", base_weight, 2, device)
        _check_shape("base_weight", base_weight, (d_out, d_in), "[m, n] from lora_b and x")
        if base_weight.dtype != x.dtype:
            raise _error(
                TypeError,
                "base_weight",
                f"dtype {base_weight.dtype} differs from x's {x.dtype} (the base layer runs in "
                "x's dtype, as an nn.Linear does)",
            )
    if base_bias is not None:
        if base_weight is None:
            raise _error(ValueError, "base_bias", "only goes with base_weight")
        base_bias = _check_tensor("base_bias", base_bias, 1, device)
        _check_shape("base_bias", base_bias, (d_out,), "[m] from lora_b")
        if base_bias.dtype != x.dtype:
            raise _error(TypeError, "base_bias", f"dtype {base_bias.dtype} differs from x's")

    acc = compute_dtype(x, lora_a, lora_b, router_weight if gates is None else gates)
    scale = _scaling_tensor(scaling, n_experts, acc, device)
    x2 = x.reshape(-1, d_in)
    gates2 = None if gates is None else gates.reshape(-1, n_experts)
    base = () if base_weight is None else (base_weight, base_bias)
    if shared_dropout and dropout > 0.0:
        base = (base_weight, base_bias, True)
    args = (x2, lora_a, lora_b, scale, router_weight, gates2, top_k, dropout, seed, *base)
    op, name = (
        (_routed_lora_dropout, "meldkit::routed_lora_dropout")
        if dropout > 0.0
        else (_routed_lora, "meldkit::routed_lora")
    )
    y, probs, _, _ = _native.call(op, _routed_lora_native, name, device, args)
    return y.reshape(*lead, lora_b.shape[1]), (probs if router_weight is not None else None)
