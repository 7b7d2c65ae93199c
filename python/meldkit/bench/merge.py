"""Benchmark cases for the merge family: one tensor position of N fine-tuned models merged with
TIES, DARE-TIES and task arithmetic (``meldkit.ops.merge_tensors``).

Baselines timed in the same run:

``torch_sort``
    What mergekit does per tensor, in plain PyTorch: magnitude trimming by a full ``argsort`` of
    ``|τ|`` (mergekit's ``sparsify.magnitude``), or DARE by ``torch.bernoulli``, then the sign
    election and disjoint merge of its ``GeneralizedTaskArithmeticMerge``, all on stacked fp32
    deltas. (mergekit itself is not a dependency here; ``bench/bench_merge.py`` times the
    installed ``mergekit-yaml`` end to end on the same checkpoints.)
``meldkit_ref``
    ``meldkit.ops.merge_ref.generalized_merge_ref``: kthvalue selection, the executable spec.

``ours`` writes into one output buffer reused from call to call (``out=``), as the streaming
engine does; the baselines allocate their results.

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
# The shape (a 7B model's MLP matrix), bf16 as checkpoints store it; on the CPU also a
# 4096×4096 fp32 one. The CPU's argsort baseline takes about a minute per call at N = 8: run the
# full CPU set with ``--warmup 1 --repeats 3``.
FULL = {
    "cuda": [((4096, 14336), torch.bfloat16)],
    "cpu": [((4096, 14336), torch.bfloat16), ((4096, 4096), torch.float32)],
}
# N per device: the GPU check runs this set inside a fixed time budget.
FULL_N = {"cuda": (2, 8), "cpu": (2, 4, 8)}
# name -> (registered method, merge_tensors keywords)
METHODS = {
    "ties": ("ties", dict(densities=0.2)),
    "ties_exact_k": ("ties", dict(densities=0.2, tie="exact_k")),  # mergekit's exactly-k rule
    "dare_ties": ("dare_ties", dict(densities=0.3, seed=1)),
    "task_arithmetic": ("task_arithmetic", dict(lam=0.5)),
}
# One decoder layer of Llama-7B (hidden 4096, MLP 11008): q, k, v, o, gate, up, down and the two
# norms, merged as one tensor list (`merge_tensor_list`: one native call for the whole list).
LLAMA7B_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)] + [(4096,)] * 2


def cases(device: str, quick: bool) -> list[Case]:
    """TIES (both tie rules), DARE-TIES and task arithmetic over the quick set (one small
    config) or the full set (N ∈ {2, 4, 8} on the CPU, {2, 8} on CUDA, of a 4096×14336 bf16
    MLP matrix, and on the CPU of a 4096×4096 fp32 one), plus, in the full set, one Llama-7B
    decoder layer's tensor list of 3 models."""
    if quick:
        return [make_case(s, n, dt, m, device) for s, n, dt in QUICK for m in ("ties", "dare_ties")]
    kind = torch.device(device).type
    out = [
        make_case(s, n, dt, m, device)
        for s, dt in FULL[kind]
        for n in FULL_N[kind]
        for m in METHODS
    ]
    out += [make_list_case(LLAMA7B_LAYER, 3, torch.bfloat16, m, device) for m in METHODS]
    return out


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


def make_list_case(shapes, n: int, dtype: torch.dtype, method: str, device: str) -> Case:
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = sum(math.prod(s) for s in shapes)
    return Case(
        op=OP,
        name=f"{method}_n{n}_llama7b_layer",
        shape=(numel,),
        n_inputs=n,
        dtype=dtype,
        device=device,
        bytes_moved=(n + 2) * numel * itemsize,
        build=functools.partial(build_list, tuple(shapes), n, dtype, method, device),
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


def _inputs(shape, n: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    models = [
        base + 0.01 * torch.randn(shape, generator=gen, device=device, dtype=dtype)
        for _ in range(n)
    ]
    return base, models


def _reference(base, models, name: str, tensor_index: int = 0):
    from meldkit.merging import get_method
    from meldkit.ops import merge_ref

    method, kw = METHODS[name]
    m = get_method(method)
    n = len(models)
    return merge_ref.generalized_merge_ref(
        base,
        models,
        weights=[1.0] * n,
        densities=[kw.get("densities", 1.0)] * n,
        sparsify=m.sparsify,
        consensus=m.consensus,
        normalize=m.normalize,
        rescale=m.rescale,
        lam=kw.get("lam", 1.0),
        seed=kw.get("seed", 0),
        tie=kw.get("tie", "keep_ties"),
        tensor_index=tensor_index,
    )


def build(shape, n: int, dtype: torch.dtype, name: str, device: str) -> dict[str, Impl]:
    from meldkit.ops import merge_tensors

    base, models = _inputs(shape, n, dtype, device, 0)
    method, kw = METHODS[name]
    d = kw.get("densities", 1.0)
    # Into one reused buffer, as `meldkit merge` merges: a fresh 117 MB result costs the CPU
    # 15-25 ms of page faults and zeroing per call, as much as the pass itself.
    out = torch.empty_like(base)
    return {
        OURS: lambda: merge_tensors(base, models, method, out=out, **kw),
        "torch_sort": lambda: torch_sort_merge(base, models, method, d, kw.get("lam", 1.0)),
        REFERENCE: lambda: _reference(base, models, name),
    }


def build_list(shapes, n: int, dtype: torch.dtype, name: str, device: str) -> dict[str, Impl]:
    from meldkit.ops import merge_tensor_list

    inputs = [_inputs(s, n, dtype, device, j) for j, s in enumerate(shapes)]
    bases = [b for b, _ in inputs]
    per_model = [[ms[t] for _, ms in inputs] for t in range(n)]
    method, kw = METHODS[name]
    d = kw.get("densities", 1.0)

    def flat(results):
        return torch.cat([r.flatten() for r in results])

    return {
        OURS: lambda: flat(merge_tensor_list(bases, per_model, method, **kw)),
        "torch_sort": lambda: flat(
            torch_sort_merge(b, ms, method, d, kw.get("lam", 1.0)) for b, ms in inputs
        ),
        REFERENCE: lambda: flat(_reference(b, ms, name, j) for j, (b, ms) in enumerate(inputs)),
    }
