"""The reference of ``routed_lora``: a mixture of LoRA experts behind a top-k router (GOAT), in
plain PyTorch.

Notation: x ∈ R^{N×n} (tokens flattened), E experts, each a rank-r LoRA with A_e ∈ R^{r×n} and
B_e ∈ R^{m×r}, per-expert scaling s_e, router W_z ∈ R^{E×n}, top-k k, dropout probability q.

Router mode::

    z = x W_zᵀ                                         logits          [N, E]
    p = softmax(z)                                     probabilities   [N, E] (returned: probs)
    Ω = the k largest p_e, ties to the lower index     selected set    [N, k]
    g_e = p_e / Σ_{j∈Ω} p_j  (e ∈ Ω),  0 otherwise     routing weights [N, E]

Gate mode: the caller's gates are g (no softmax, no selection, no probs).

Output (the adapter contribution; with a base linear W₀, b given, its output too)::

    x̃_e = dropout_e(x) = x ⊙ M_e · c                   M_e ∈ {0,1}^{N×n}, c = 1/(1−q)
    h_e = x̃_e A_eᵀ                                     [N, r]
    y   = Σ_e g_e s_e h_e B_eᵀ                         [N, m]
    y  += base(x) = x W₀ᵀ + b                          (optional; in x.dtype, as torch's linear)

With a base, ``y`` is the base layer's output (computed in ``x.dtype``, the caller's frozen
``nn.Linear``) plus the adapter's, summed in the compute dtype and rounded once to ``x.dtype``;
its gradients are ``dx += dy W₀`` (the same single rounding), ``dW₀ = dyᵀ x`` and ``db = Σ_t dy``.

Dropout masks are independent per expert and a pure function of the seed (the counter-based
generator of :mod:`meldkit.ops.random_ref`): element (t, j) of expert e is kept when
``uniform_ref(seed, tensor_index=e, element=t·n + j) < float32(1 − q)``, and kept values are
multiplied by ``c = float32(1/(1 − q))`` (1/(1−q) computed in double, rounded once). A dropped
element is multiplied by 0, so NaN and ±inf in x still propagate, as with ``torch.nn.Dropout``.

Backward, with dy = ∂L/∂y, U_e = dy B_e ([N, r]) and dprobs = ∂L/∂probs::

    dB_e = s_e Σ_t g_e(t) dy(t) h_e(t)ᵀ
    dh_e = s_e g_e U_e
    dA_e = Σ_t dh_e(t) x̃_e(t)ᵀ
    dg_e = s_e ⟨h_e, U_e⟩                              (every e; in gate mode this is dgates)
    dp_i = (dg_i − Σ_{j∈Ω} g_j dg_j) / S  (i ∈ Ω),  0 otherwise;  S = Σ_{j∈Ω} p_j;  dp += dprobs
    dz   = p ⊙ (dp − ⟨p, dp⟩)
    dW_z = dzᵀ x                                       (raw x: the router sees no dropout)
    dx   = Σ_e c M_e ⊙ (dh_e A_e) + dz W_z

Zero coefficients: a product with a coefficient c = g_e s_e that is exactly 0 is not formed
(the native kernels skip it): expert e then adds exactly 0 to token t's y and nothing to dx,
dA_e or dB_e, even where x (so h) holds inf or NaN, where 0·inf would give NaN; dg_e is still
s_e ⟨h_e, U_e⟩. See :func:`coefficient_product_ref` and :func:`idle_rows_zeroed_ref`.

Precision: storage in float32, bfloat16, float16 or float64 (x may differ from the weights);
arithmetic in float32, or float64 when every floating input (x, the LoRA weights and the router
weights or gates) is float64. ``scaling`` is a constant used in that compute dtype.

Three entry points:

* :func:`routed_lora_ref`: the readable spec. The official per-expert loop (GOAT's
  ``TopKGOATLayer.forward`` without its wasted expert-0 pass); differentiable, so autograd through
  it gives the reference gradients.
* :func:`routed_lora_forward_ref` and :func:`routed_lora_backward_ref`: the dense formulation the
  native kernels implement, with their calling convention (the forward also returns the routing
  weights and the expert activations h that the backward needs; the backward evaluates the
  formulas above). The op ``meldkit.ops.routed_lora`` runs them when no native kernel can.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meldkit.ops.random_ref import bernoulli_mask_ref


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when every given floating tensor is float64, else float32."""
    given = [t for t in tensors if t is not None]
    return torch.float64 if all(t.dtype == torch.float64 for t in given) else torch.float32


def dropout_keep_scale(dropout: float) -> tuple[float, float]:
    """``(keep, c)``: the keep probability float32(1 − q) and the scale float32(1/(1 − q))."""
    keep = torch.tensor(1.0 - dropout, dtype=torch.float64).to(torch.float32).item()
    scale = torch.tensor(1.0 / (1.0 - dropout), dtype=torch.float64).to(torch.float32).item()
    return keep, scale


def dropout_factor_ref(
    shape: tuple[int, int], dropout: float, seed: int, expert: int, *, device, dtype
) -> torch.Tensor | None:
    """``M_e · c`` of expert ``expert``: ``[N, n]`` in ``dtype``, None when ``dropout == 0``.

    Element (t, j) is ``c`` when ``uniform_ref(seed, expert, t·n + j) < keep``, else 0.
    """
    if dropout == 0.0:
        return None
    keep, scale = dropout_keep_scale(dropout)
    mask = bernoulli_mask_ref(shape, keep, seed, expert, device=device)
    return mask.to(dtype) * scale


def dropout_ref(x: torch.Tensor, dropout: float, seed: int, expert: int) -> torch.Tensor:
    """x̃_e = x ⊙ M_e · c for ``x`` ``[N, n]`` (``x`` itself when ``dropout == 0``)."""
    factor = dropout_factor_ref(
        tuple(x.shape), dropout, seed, expert, device=x.device, dtype=x.dtype
    )
    return x if factor is None else x * factor


def top_k_ref(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of the k largest probabilities per row; ties go to the lower index.

    A stable sort of −p keeps equal values in index order (``torch.topk`` does not promise that).
    NaN sorts last, so a row of NaN selects experts 0 … k−1.
    """
    return torch.sort(-probs, dim=-1, stable=True).indices[:, :top_k]


def router_logits_ref(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """``z = x W_zᵀ`` ``[N, E]``, one column at a time with the same reduction: equal router
    rows give bitwise equal logits, so exact ties stay ties for :func:`top_k_ref` (``x @ W_zᵀ``
    may round equal columns differently, depending on where they fall in the GEMM's tiles)."""
    return torch.stack([(x * w).sum(-1) for w in router_weight.unbind(0)], dim=-1)


def coefficient_product_ref(v: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``v ⊙ (coef ⊗ 1_r)`` for ``v`` ``[N, E, r]`` and coefficients ``coef = g·s`` ``[N, E]``,
    a fresh tensor that is exactly 0 where ``coef`` is exactly 0, whatever ``v`` holds there:
    a zero coefficient's product is not formed (the module docstring's "Zero coefficients")."""
    c = coef.unsqueeze(-1)
    return (v * c).masked_fill_(c == 0, 0.0)


def idle_rows_zeroed_ref(v: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``v`` ``[N, n]`` with 0 in each row t whose ``grad[t]`` ``[N, k]`` is all 0, so that
    ``gradᵀ·v`` leaves those tokens out even when their row of ``v`` holds inf or NaN (the
    kernels skip zero coefficients rather than multiply by them)."""
    return v.masked_fill((grad == 0).all(-1, keepdim=True), 0.0)


class _NotFormed(torch.autograd.Function):
    """``c ⊙ v`` for coefficients ``c`` ``[N]`` that are all exactly 0 and ``v`` ``[N, m]``:
    the value is exactly 0 (the product is not formed, so inf or NaN in ``v`` stays out), the
    gradient of ``c`` is still ``⟨dy, v⟩`` (a zero gate's gradient) and ``v`` receives none."""

    @staticmethod
    def forward(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (v,) = ctx.saved_tensors
        return (dy * v).sum(-1), None


def route_ref(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax → top-k → renormalise. Returns ``(probs, selected, g)``.

    ``probs = softmax(x W_zᵀ)`` ``[N, E]``; ``selected`` ``[N, k]`` the indices Ω (see
    :func:`top_k_ref`); ``g = p_Ω / Σ_{j∈Ω} p_j`` ``[N, k]``, their weights. ``x`` ``[N, n]`` and
    ``router_weight`` ``[E, n]`` in the compute dtype. Differentiable.
    """
    probs = torch.softmax(router_logits_ref(x, router_weight), dim=-1)
    selected = top_k_ref(probs, top_k)
    p_sel = probs.gather(1, selected)
    return probs, selected, p_sel / p_sel.sum(-1, keepdim=True)


def _scaling_vector(scaling, n_experts: int, dtype, device) -> torch.Tensor:
    if isinstance(scaling, torch.Tensor):
        return scaling.detach().to(device=device, dtype=dtype)
    return torch.full((n_experts,), float(scaling), dtype=dtype, device=device)


# ---- the readable spec: the official per-expert loop --------------------------------------------


def routed_lora_ref(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float | torch.Tensor,
    *,
    router_weight: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    top_k: int | None = None,
    dropout: float = 0.0,
    seed: int | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    shared_dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mixture of LoRA experts, the per-expert loop of the official GOAT code (the spec).

    ``y = Σ_e g_e · s_e · B_e A_e dropout_e(x)`` with g from the router (softmax → top-k →
    renormalise) or from the caller (see the module docstring for every formula). Router mode
    visits, for each expert, the tokens routed to it (a gather, two small matmuls, an
    index-add), as ``TopKGOATLayer.forward`` does; gate mode runs every expert on every token,
    so a zero gate still receives its gradient ``s_e ⟨h_e, U_e⟩``. Differentiable with respect
    to every tensor but ``scaling``. Arguments are assumed valid (the op checks them).

    Parameters
    ----------
    x : Tensor
        ``[..., n]``, any floating dtype.
    lora_a : Tensor
        ``[E, r, n]``.
    lora_b : Tensor
        ``[E, m, r]``.
    scaling : float or Tensor
        s, one float for every expert or ``[E]``; a constant.
    router_weight : Tensor, optional
        W_z ``[E, n]`` (router mode, with ``top_k``).
    gates : Tensor, optional
        g ``[..., E]`` (gate mode).
    top_k : int, optional
        k in 1 … E (router mode).
    dropout : float
        q in [0, 1).
    seed : int, optional
        Key of the dropout masks (needed when ``dropout > 0``).
    base_weight, base_bias : Tensor, optional
        A base linear W₀ ``[m, n]`` (``x.dtype``) and b ``[m]`` whose output is added
        (:func:`base_linear_ref`).
    shared_dropout : bool
        One dropout mask (expert 0's) for every expert instead of one per expert.

    Returns
    -------
    y : Tensor
        ``[..., m]`` in ``x.dtype``.
    probs : Tensor or None
        ``[N, E]`` (N = tokens, flattened) softmax probabilities in the compute dtype (float32,
        or float64 when every input is float64); None in gate mode.
    """
    acc = compute_dtype(x, lora_a, lora_b, router_weight if gates is None else gates)
    n_experts, _, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in).to(acc)
    a, b = lora_a.to(acc), lora_b.to(acc)
    s = _scaling_vector(scaling, n_experts, acc, x.device)
    n_tokens = x2.shape[0]

    probs = None
    if router_weight is not None:
        probs, selected, g_sel = route_ref(x2, router_weight.to(acc), top_k)  # [N,E] [N,k] [N,k]
    else:
        g_all = gates.reshape(-1, n_experts).to(acc)

    y = torch.zeros(n_tokens, d_out, dtype=acc, device=x.device)
    for e in range(n_experts):
        if router_weight is not None:
            token, slot = torch.where(selected == e)
            g = g_sel[token, slot]
        else:
            token = torch.arange(n_tokens, device=x.device)
            g = g_all[:, e]
        c = g * s[e]
        live = c != 0
        x_e = dropout_ref(x2, dropout, seed or 0, 0 if shared_dropout else e)
        out = (x_e[token[live]] @ a[e].T) @ b[e].T
        y = y.index_add(0, token[live], out * c[live, None])
        if not live.all():  # zero coefficients: no product, but the gates' gradient s_e⟨h_e, U_e⟩
            dead = token[~live]
            out = ((x_e[dead] @ a[e].T) @ b[e].T).detach()
            y = y.index_add(0, dead, _NotFormed.apply(c[~live], out))
    if base_weight is not None:
        y = y + base_linear_ref(x.reshape(-1, d_in), base_weight, base_bias).to(acc)
    return y.to(x.dtype).reshape(*lead, d_out), probs


def base_linear_ref(
    x: torch.Tensor, base_weight: torch.Tensor, base_bias: torch.Tensor | None
) -> torch.Tensor:
    """The base layer's output ``x W₀ᵀ + b`` in ``x.dtype``, as the caller's ``nn.Linear``
    computes it (the op adds it to the adapter's output in the compute dtype)."""
    return F.linear(x, base_weight, base_bias)


# ---- the dense formulation, with the native kernels' calling convention ----------------------


def routed_lora_forward_ref(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    router_weight: torch.Tensor | None,
    gates: torch.Tensor | None,
    top_k: int,
    dropout: float,
    seed: int,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    shared_dropout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of ``routed_lora`` as the native kernel computes it (all experts, dense).

    Parameters
    ----------
    x : Tensor
        ``[N, n]``.
    lora_a, lora_b : Tensor
        ``[E, r, n]``, ``[E, m, r]``.
    scaling : Tensor
        s ``[E]``.
    router_weight, gates : Tensor or None
        Exactly one: W_z ``[E, n]`` or g ``[N, E]``.
    top_k : int
        k (router mode; ignored in gate mode, where the op passes 0).
    dropout : float
        q in [0, 1).
    seed : int
        Key of the dropout masks (ignored when ``dropout == 0``).
    base_weight, base_bias : Tensor or None
        An optional base linear whose output :func:`base_linear_ref` adds.
    shared_dropout : bool
        Every expert takes expert 0's mask (one mask for the layer) instead of its own.

    Returns
    -------
    y : Tensor
        ``[N, m]`` in ``x.dtype``: ``Σ_e g_e s_e h_e B_eᵀ`` (+ the base's output).
    probs : Tensor
        ``[N, E]`` softmax probabilities (router mode); an empty ``[0]`` tensor in gate mode.
    weights : Tensor
        ``[N, E]``: the routing weights applied (g on the selected experts, zeros elsewhere; in
        gate mode the gates converted).
    h : Tensor
        ``[N, E·r]``: ``h[:, e·r:(e+1)·r] = x̃_e A_eᵀ`` for every expert, unscaled and ungated.
        In router mode the backward reads h only where g ≠ 0 or e ∈ Ω (dB_e is weighted by g_e,
        and dg_e matters only on Ω), so a kernel may skip the unselected experts' columns.

    ``probs``, ``weights`` and ``h`` are in the compute dtype (float32; float64 when x, the
    weights and the router weights or gates are all float64).
    """
    acc = compute_dtype(x, lora_a, lora_b, router_weight if gates is None else gates)
    n_tokens = x.shape[0]
    n_experts, rank, _ = lora_a.shape
    xc, a, b = x.to(acc), lora_a.to(acc), lora_b.to(acc)
    s = scaling.to(acc)
    if router_weight is not None:
        probs, selected, g_sel = route_ref(xc, router_weight.to(acc), top_k)
        weights = torch.zeros_like(probs).scatter(1, selected, g_sel)
    else:
        probs = xc.new_empty(0)
        weights = gates.to(acc, memory_format=torch.contiguous_format, copy=True)
    h = torch.stack(
        [
            dropout_ref(xc, dropout, seed, 0 if shared_dropout else e) @ a[e].T
            for e in range(n_experts)
        ],
        dim=1,
    )  # [N, E, r]
    y = torch.einsum("ner,emr->nm", coefficient_product_ref(h, weights * s), b)
    if base_weight is not None:
        y = y + base_linear_ref(x, base_weight, base_bias).to(acc)
    # Contiguous, like the native kernels' outputs (einsum picks its own strides on CUDA).
    return y.to(x.dtype).contiguous(), probs, weights, h.reshape(n_tokens, n_experts * rank)


def routed_lora_backward_ref(
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
    seed: int,
    needs: tuple[bool, bool, bool, bool, bool],
    gates_dtype: torch.dtype | None,
    base_weight: torch.Tensor | None = None,
    shared_dropout: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Backward of ``routed_lora`` from the saved routing weights and activations.

    Parameters
    ----------
    dy : Tensor
        ∂L/∂y ``[N, m]``.
    x, lora_a, lora_b, scaling, router_weight, top_k, dropout, seed
        As given to :func:`routed_lora_forward_ref` (``router_weight`` None in gate mode).
    weights, h : Tensor
        ``[N, E]`` and ``[N, E·r]`` as returned by the forward (compute dtype).
    probs : Tensor or None
        ``[N, E]`` from the forward in router mode; None in gate mode.
    dprobs : Tensor or None
        ∂L/∂probs ``[N, E]`` (compute dtype), or None when no gradient reaches probs.
    needs : tuple of 5 bool
        Which of (dx, dA, dB, dW_z, dgates) to compute.
    gates_dtype : torch.dtype or None
        The gates' dtype (gate mode), the dtype of dgates.
    base_weight : Tensor or None
        The forward's base linear W₀: dx gains ``dy W₀`` (computed in ``x.dtype``) before its
        one rounding. Its own gradients (``dyᵀ x``, ``Σ_t dy``) are plain PyTorch, left to the
        caller.

    Returns
    -------
    tuple
        ``(dx, dA, dB, dW_z, dgates)``: ``[N, n]`` in ``x.dtype``, like ``lora_a``, like
        ``lora_b``, like ``router_weight``, ``[N, E]`` in ``gates_dtype``; None where not
        needed. The formulas are in the module docstring; the selected set Ω is recomputed
        from ``probs`` with the forward's rule.
    """
    need_dx, need_da, need_db, need_dw, need_dg = needs
    acc = h.dtype
    n_tokens, d_in = x.shape
    n_experts, rank, _ = lora_a.shape
    dyc, xc, a, b = dy.to(acc), x.to(acc), lora_a.to(acc), lora_b.to(acc)
    s = scaling.to(acc)
    g = weights
    h3 = h.reshape(n_tokens, n_experts, rank)
    u = torch.einsum("nm,emr->ner", dyc, b)  # U_e = dy B_e
    dh = coefficient_product_ref(u, g * s)  # s_e g_e U_e
    dx = da = db = dw = dgates = None
    if need_db:
        gh = coefficient_product_ref(h3, g * s)  # s_e g_e h_e
        db = torch.einsum("nm,ner->emr", dyc, gh).to(lora_b.dtype).contiguous()
    if need_dx or need_da:
        dxc = torch.zeros(n_tokens, d_in, dtype=acc, device=x.device)
        da_acc = torch.empty(n_experts, rank, d_in, dtype=acc, device=x.device)
        for e in range(n_experts):
            factor = dropout_factor_ref(
                (n_tokens, d_in),
                dropout,
                seed,
                0 if shared_dropout else e,
                device=x.device,
                dtype=acc,
            )
            x_e = xc if factor is None else xc * factor
            da_acc[e] = dh[:, e].T @ idle_rows_zeroed_ref(x_e, dh[:, e])
            dx_e = dh[:, e] @ a[e]
            dxc += dx_e if factor is None else dx_e * factor
        if need_da:
            da = da_acc.to(lora_a.dtype)
    dg = s * (h3 * u).sum(-1)  # [N, E]
    if router_weight is not None and (need_dx or need_dw):
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(
            1, top_k_ref(probs, top_k), True
        )
        p_sum = torch.where(selected, probs, 0).sum(-1, keepdim=True)
        gdg = torch.where(selected, g * dg, 0).sum(-1, keepdim=True)  # Σ_{j∈Ω} g_j dg_j
        dp = torch.where(selected, (dg - gdg) / p_sum, 0)
        if dprobs is not None:
            dp = dp + dprobs.to(acc)
        dz = probs * (dp - (probs * dp).sum(-1, keepdim=True))
        if need_dw:
            dw = (dz.T @ xc).to(router_weight.dtype)
        if need_dx:
            dxc += dz @ router_weight.to(acc)
    if need_dx:
        if base_weight is not None:
            dxc += (dy.to(x.dtype) @ base_weight).to(acc)
        dx = dxc.to(x.dtype)
    if need_dg and router_weight is None:
        dgates = dg.to(gates_dtype)
    return dx, da, db, dw, dgates
