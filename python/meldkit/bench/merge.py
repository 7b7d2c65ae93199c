"""Benchmark cases for the merge family: one tensor position of N fine-tuned models merged with
TIES, DARE-TIES and task arithmetic (``meldkit.ops.merge_tensors``).

Baselines timed in the same run:

``torch_sort``
    What mergekit does per tensor, in plain PyTorch: magnitude trimming by a full ``argsort`` of
    ``|τ|`` (mergekit's ``sparsify.magnitude``), or DARE by ``torch.bernoulli``, then the sign
    election and disjoint merge of its ``GeneralizedTaskArithmeticMerge``, all on stacked fp32
    deltas. (mergekit itself is not a dependency; a benchmark against the installed package is the
    next step of the merge issue.)
``meldkit_ref``
    ``meldkit.ops.merge_ref.generalized_merge_ref``: kthvalue selection, the executable spec.

``bytes_moved`` counts one read of the base and of every model and one write of the output: the
floor of a single fused pass. TIES reads each model and the base twice more to select its
threshold, so its fraction of the ceiling is at most about a third of a one-pass op's.
"""

from __future__ import annotations

import functools
import math

import torch

from meldkit.bench import OURS, REFERENCE, Case, Impl

OP = "merge"

QUICK = (((1024, 1024), 3, torch.float32),)
FULL_SHAPES = {"cuda": ((4096, 14336),), "cpu": ((4096, 4096),)}
FULL_N = (2, 4, 8)
# bf16 only on CUDA: the fp32 cases took the GPU session's whole bench budget (>150 s).
FULL_DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.float32, torch.bfloat16)}
METHODS = {
    "ties": dict(densities=0.2),
    "dare_ties": dict(densities=0.3, seed=1),
    "task_arithmetic": dict(lam=0.5),
}


def cases(device: str, quick: bool) -> list[Case]:
    """TIES, DARE-TIES and task arithmetic over the quick set (one small config) or the full
    set (N ∈ {2, 4, 8} of a 4096×14336 MLP matrix on CUDA, 4096×4096 on the CPU)."""
    if quick:
        configs = [(s, n, dt, m) for s, n, dt in QUICK for m in ("ties", "dare_ties")]
    else:
        kind = torch.device(device).type
        configs = [
            (s, n, dt, m)
            for s in FULL_SHAPES[kind]
            for n in FULL_N
            for dt in FULL_DTYPES[kind]
            for m in METHODS
        ]
    return [make_case(s, n, dt, m, device) for s, n, dt, m in configs]


def make_case(shape, n: int, dtype: torch.dtype, method: str, device: str) -> Case:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(
        op=OP,
        name=f"{method}_n{n}_{'x'.join(map(str, shape))}",
        shape=tuple(shape),
        n_inputs=n,
        dtype=dtype,
        device=device,
        bytes_moved=(n + 2) * math.prod(shape) * itemsize,
        build=functools.partial(build, tuple(shape), n, dtype, method, device),
    )


def torch_sort_merge(base, models, method: str, densities: float, lam: float = 1.0, seed=0):
    """The plain-PyTorch way (mergekit's algorithm): argsort trimming or torch.bernoulli, then
    sign election and disjoint merge on stacked fp32 deltas."""
    deltas = torch.stack([m.float() - base.float() for m in models])
    if method == "ties":
        flat = deltas.flatten(1)
        k = int(flat.shape[1] * densities)
        order = torch.argsort(flat.abs(), dim=1, descending=True)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, :k], True)
        deltas = deltas * mask.view_as(deltas)
    elif method == "dare_ties":
        gen = torch.Generator(device=base.device).manual_seed(seed)
        keep = torch.bernoulli(torch.full_like(deltas, densities), generator=gen)
        kept = deltas * keep
        scale = deltas.abs().flatten(1).sum(1) / kept.abs().flatten(1).sum(1).clamp_min(1e-12)
        deltas = kept * scale.view(-1, *[1] * base.dim())
    if method == "task_arithmetic":
        merged = deltas.sum(0)
    else:
        sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = deltas.sign() == sign
        merged = (deltas * agree).sum(0)
        if method == "ties":
            merged = merged / agree.sum(0).clamp_min(1)
    return (base.float() + lam * merged).to(base.dtype)


def build(shape, n: int, dtype: torch.dtype, method: str, device: str) -> dict[str, Impl]:
    from meldkit.merging import get_method
    from meldkit.ops import merge_ref, merge_tensors

    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    models = [
        base + 0.01 * torch.randn(shape, generator=gen, device=device, dtype=dtype)
        for _ in range(n)
    ]
    kw = METHODS[method]
    m = get_method(method)
    d = kw.get("densities", 1.0)

    def reference():
        return merge_ref.generalized_merge_ref(
            base,
            models,
            weights=[1.0] * n,
            densities=[d] * n,
            sparsify=m.sparsify,
            consensus=m.consensus,
            normalize=m.normalize,
            rescale=m.rescale,
            lam=kw.get("lam", 1.0),
            seed=kw.get("seed", 0),
        )

    return {
        OURS: lambda: merge_tensors(base, models, method, **kw),
        "torch_sort": lambda: torch_sort_merge(base, models, method, d, kw.get("lam", 1.0)),
        REFERENCE: reference,
    }
