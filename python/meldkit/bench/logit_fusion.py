"""Benchmark cases for ``logit_fusion``: one decoding step of Dynamic Logit Fusion (the per-row
search over T experts × 21 values of α, then the fused logits).

Baselines timed in the same run:

``torch_grid``
    The straightforward PyTorch solver: materialise the ``[T·n, B, V]`` fused logits of every
    candidate, take log-softmaxes and the two KLs per candidate, the targets from the small
    models, then the argmin and the fused row: what a DLF implementation without a kernel does
    (spec logit_fusion.md §2.2, "Why a kernel").
``meldkit_ref``
    ``meldkit.ops.logit_fusion_ref``: the float64 reference, candidate by candidate.

The compared output is the fused logits (float32). ``bytes_moved`` counts the T + 2 input rows read
once and the fused logits written once.
"""

from __future__ import annotations

import functools

import torch

from meldkit.bench import OURS, REFERENCE, Case, Impl

OP = "logit_fusion"

# (rows B, vocabulary V, experts T): decode batches, LLaMA-2 (32k) and Llama-3 (128k) vocabularies.
QUICK = ((4, 32000, 1),)
FULL = {
    "cuda": ((1, 128256, 1), (16, 32000, 1), (64, 32000, 4), (256, 32000, 1)),
    "cpu": ((1, 32000, 1), (8, 32000, 1), (4, 128256, 2)),
}
DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.float32,)}


def cases(device: str, quick: bool) -> list[Case]:
    kind = torch.device(device).type
    configs = (
        [(c, torch.float32) for c in QUICK]
        if quick
        else [(c, dt) for c in FULL[kind] for dt in DTYPES[kind]]
    )
    return [make_case(c, dt, device) for c, dt in configs]


def make_case(config, dtype: torch.dtype, device: str) -> Case:
    b, v, t = config
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(
        op=OP,
        name=f"step_b{b}_v{v}_t{t}",
        shape=(b, v),
        n_inputs=t + 2,
        dtype=dtype,
        device=device,
        bytes_moved=(t + 2) * b * v * itemsize + b * v * 4,
        build=functools.partial(build, config, dtype, device),
    )


def torch_grid(large, small, experts, alphas):
    """DLF's search written directly in PyTorch over a materialised candidate tensor."""
    zl, zs, zt = large.float(), small.float(), experts.float()
    grid = torch.tensor(alphas, device=large.device)
    d = zt - zs  # [T, B, V]
    cand = zl + grid.view(-1, 1, 1, 1) * d  # [n, T, B, V]
    log_p, log_q, log_qt = zl.log_softmax(-1), zs.log_softmax(-1), zt.log_softmax(-1)
    log_pt = cand.log_softmax(-1)
    f1 = (log_pt.exp() * (log_pt - log_p)).sum(-1)  # KL(P~||P)  [n, T, B]
    f2 = (log_p.exp() * (log_p - log_pt)).sum(-1)  # KL(P||P~)
    a = (log_qt.exp() * (log_qt - log_q)).sum(-1).mean(0)  # mean_t KL(Q_t||Q)  [B]
    b = (log_q.exp() * (log_q - log_qt)).sum(-1).mean(0)  # mean_t KL(Q||Q_t)
    loss = (f1 - a) ** 2 + (f2 - b) ** 2  # [n, T, B]
    best = loss.flatten(0, 1).argmin(0)  # first minimum: smallest alpha, then expert
    j, t = best // zt.shape[0], best % zt.shape[0]
    rows = torch.arange(zl.shape[0], device=zl.device)
    return zl + grid[j, None] * d[t, rows]


def build(config, dtype: torch.dtype, device: str) -> dict[str, Impl]:
    from meldkit.ops import logit_fusion
    from meldkit.ops.logit_fusion_ref import DEFAULT_ALPHAS, logit_fusion_ref

    b, v, t = config
    gen = torch.Generator(device=device).manual_seed(0)
    small = 3 * torch.randn(b, v, generator=gen, device=device)
    large = (small + torch.randn(b, v, generator=gen, device=device)).to(dtype)
    experts = (small + 0.5 * torch.randn(t, b, v, generator=gen, device=device)).to(dtype)
    small = small.to(dtype)
    alphas = list(DEFAULT_ALPHAS)
    return {
        OURS: lambda: logit_fusion(large, small, experts).logits,
        "torch_grid": lambda: torch_grid(large, small, experts, alphas),
        REFERENCE: lambda: logit_fusion_ref(large, small, experts).logits.float(),
    }
