"""Child process of tests/test_thread_determinism.py: runs every native CPU op on fixed inputs
large enough for their threaded paths and prints one JSON object, name → SHA-256 of the outputs'
bytes (and the OpenMP thread count it ran with)."""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from meldkit import _native
from meldkit.ops import (
    blend_tensors,
    logit_fusion,
    magnitude_threshold,
    merge_tensor_list,
    merge_tensors,
    routed_lora,
    weighted_sum,
)

# model_stock and slerp sum their norms and inner products in a fixed order (merge_ref._fixed_sum),
# not with torch's thread-dependent x.sum(), so they are checked too.
MERGES = {
    "ties": {"densities": 0.3, "weights": [1.0, 0.7, 0.5]},
    "ties_exact_k": {"densities": 0.3, "weights": [1.0, 0.7, 0.5], "tie": "exact_k"},
    "ties_l1": {"densities": 0.3, "weights": [1.0, 0.7, 0.5], "rescale": "l1"},
    "dare_ties": {"densities": 0.3, "weights": [1.0, 0.7, 0.5]},
    "dare_linear": {"densities": 0.3, "weights": [1.0, 0.7, 0.5]},
    "task_arithmetic": {"weights": [1.0, 0.7, 0.5]},
    "breadcrumbs_ties": {"densities": 0.3, "gammas": 0.01, "weights": [1.0, 0.7, 0.5]},
    "della": {"densities": 0.3, "epsilons": 0.1, "weights": [1.0, 0.7, 0.5]},
    "linear": {"weights": [0.2, 0.3, 0.5]},
    "model_stock": {},
    "model_stock_filter_wise": {"filter_wise": True},
    "slerp": {"t": 0.3},
}


def digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            t = t.detach().contiguous()
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out: dict[str, str | int] = {"threads": dict(_native._C.build_info())["openmp_max_threads"]}
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        base = torch.randn(257, 1031, generator=g).to(dt)
        models = [
            (base.float() + 0.01 * torch.randn(base.shape, generator=g)).to(dt) for _ in range(3)
        ]
        for name, kw in MERGES.items():
            method = name.removesuffix("_exact_k").removesuffix("_l1")
            method = method.removesuffix("_filter_wise")
            merged = merge_tensors(
                None if method == "linear" else base,
                models[:1] if method == "slerp" else models,
                method,
                seed=3,
                **kw,
            )
            out[f"{name}-{dt}"] = digest(merged)
        tvs = [m - base for m in models]
        out[f"threshold-{dt}"] = repr(magnitude_threshold(tvs, 0.3))
        listed = merge_tensor_list(
            [base, base[:100]], [[m, m[:100]] for m in models], "ties", densities=0.3
        )
        out[f"list-{dt}"] = digest(*listed)
        out[f"weighted_sum-{dt}"] = digest(weighted_sum(models, [0.3, 0.3, 0.4]))
        blended = [base.clone()]
        blend_tensors(
            blended, [base], [tvs[0]], (0.5, 0.3, 0.2), keep=(0.7, 0.4), seed=9, tensor_keys=[4]
        )
        out[f"blend-{dt}"] = digest(*blended)
        logits = [torch.randn(shape, generator=g).to(dt) for shape in ((7, 32000),) * 2]
        experts = torch.randn(2, 7, 32000, generator=g).to(dt)
        r = logit_fusion(*logits, experts)
        out[f"logit_fusion-{dt}"] = digest(r.alpha, r.expert, r.logits, r.loss)
        for dropout in (0.0, 0.1):
            for n in (37, 600):
                x = torch.randn(n, 384, generator=g).to(dt).requires_grad_()
                a = (0.05 * torch.randn(8, 4, 384, generator=g)).to(dt).requires_grad_()
                b = (0.05 * torch.randn(8, 384, 4, generator=g)).to(dt).requires_grad_()
                w = (0.05 * torch.randn(8, 384, generator=g)).to(dt).requires_grad_()
                y, p = routed_lora(x, a, b, 2.0, router_weight=w, top_k=2, dropout=dropout, seed=11)
                (y.float().pow(2).sum() + p.float().pow(2).sum()).backward()
                key = f"routed_lora-router-{dropout}-{n}-{dt}"
                out[key] = digest(y, p, x.grad, a.grad, b.grad, w.grad)
                gates = torch.rand(n, 8, generator=g).to(dt).requires_grad_()
                for t in (x, a, b):
                    t.grad = None
                y, _ = routed_lora(x, a, b, 2.0, gates=gates, dropout=dropout, seed=11)
                y.float().pow(2).sum().backward()
                key = f"routed_lora-gates-{dropout}-{n}-{dt}"
                out[key] = digest(y, x.grad, a.grad, b.grad, gates.grad)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
