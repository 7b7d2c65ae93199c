"""Benchmark cases for ``routed_lora``: one GOAT layer's adapter, forward and backward (a training
step's worth of work: y, then dx, dA, dB and dW_z from a random dy).

Baselines timed in the same run:

``official_loop``
    The official GOAT code's algorithm in plain PyTorch: softmax, ``topk``, renormalise, then a
    Python loop over the experts with ``torch.where`` (one device→host sync per expert), gathered
    rows through ``A_e`` and ``B_e`` and an ``index_add_`` back (spec goat.md §7), without the
    wasted expert-0 pass.
``meldkit_ref``
    ``meldkit.ops.routed_lora_ref``: the per-expert loop reference, the executable spec.

Dropout is off in every case, so that all three compute the same function and the error column
compares them (the official code draws its masks from torch's generator, ours are counter-based).
``bytes_moved`` counts x and dy read and y and dx written once (the activations dominate; the
adapter's weights are small).
"""

from __future__ import annotations

import functools

import torch

from meldkit.bench import OURS, REFERENCE, Case, Impl

OP = "routed_lora"

# (tokens, d_in, d_out, experts, per-expert rank, top_k): LLaMA-7B q/v-projection sized layers
# with GOAT's defaults (8 experts, top-2, total rank 32) and the NLG setting (total rank 8).
QUICK = ((256, 1024, 1024, 8, 4, 2),)
FULL = {
    "cuda": (
        (4096, 4096, 4096, 8, 4, 2),
        (4096, 4096, 4096, 8, 1, 2),
        (16384, 4096, 4096, 8, 4, 2),
    ),
    "cpu": ((1024, 4096, 4096, 8, 4, 2), (2048, 2048, 2048, 8, 1, 2)),
}
DTYPES = {"cuda": (torch.bfloat16, torch.float32), "cpu": (torch.float32, torch.bfloat16)}


def cases(device: str, quick: bool) -> list[Case]:
    kind = torch.device(device).type
    if quick:
        configs = [(c, torch.float32) for c in QUICK]
    else:
        configs = [(c, dt) for c in FULL[kind] for dt in DTYPES[kind]]
    return [make_case(c, dt, device) for c, dt in configs]


def make_case(config, dtype: torch.dtype, device: str) -> Case:
    n, din, dout, e, r, k = config
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(
        op=OP,
        name=f"fwd_bwd_t{n}_{din}x{dout}_e{e}r{r}k{k}",
        shape=(n, din),
        n_inputs=1,
        dtype=dtype,
        device=device,
        bytes_moved=2 * n * (din + dout) * itemsize,
        build=functools.partial(build, config, dtype, device),
    )


def official_loop(x, lora_a, lora_b, scaling: float, router_weight, top_k: int, dropout=0.0):
    """GOAT's official MoE forward: per-expert ``torch.where`` and gathered matmuls
    (``dropout``: torch's dropout on each expert's gathered rows, its own generator)."""
    probs = torch.softmax(x.float() @ router_weight.float().t(), dim=-1)
    top, selected = torch.topk(probs, top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    y = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32, device=x.device)
    for e in range(lora_a.shape[0]):
        rows, slot = torch.where(selected == e)
        if rows.numel() == 0:
            continue
        xe = x[rows].float()
        if dropout > 0.0:
            xe = torch.nn.functional.dropout(xe, dropout)
        h = xe @ lora_a[e].float().t()
        out = (h @ lora_b[e].float().t()) * scaling * top[rows, slot, None]
        y = y.index_add(0, rows, out)
    return y.to(x.dtype), probs


def build(config, dtype: torch.dtype, device: str) -> dict[str, Impl]:
    from meldkit.ops import routed_lora
    from meldkit.ops.routed_lora_ref import routed_lora_ref

    n, din, dout, e, r, k = config
    gen = torch.Generator(device=device).manual_seed(0)

    def param(*shape, scale=1.0, dt=torch.float32):
        t = torch.randn(*shape, generator=gen, device=device, dtype=dt) * scale
        return t.requires_grad_()

    x = param(n, din, dt=dtype)
    a = param(e, r, din, scale=din**-0.5)
    b = param(e, dout, r, scale=r**-0.5)
    w = param(e, din, scale=din**-0.5)
    dy = torch.randn(n, dout, generator=gen, device=device, dtype=dtype)
    scaling = 2.0

    def step(forward):
        for t in (x, a, b, w):
            t.grad = None
        y = forward()
        y.backward(dy)
        parts = [y.detach(), x.grad, a.grad, b.grad, w.grad]
        return torch.cat([p.float().flatten() for p in parts])

    return {
        OURS: lambda: step(lambda: routed_lora(x, a, b, scaling, router_weight=w, top_k=k)[0]),
        "official_loop": lambda: step(lambda: official_loop(x, a, b, scaling, w, k)[0]),
        REFERENCE: lambda: step(
            lambda: routed_lora_ref(x, a, b, scaling, router_weight=w, top_k=k)[0]
        ),
    }
