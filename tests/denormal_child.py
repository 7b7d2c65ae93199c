"""Child process of tests/ops/test_denormal_modes.py: runs the native CPU ops on float16 inputs
full of subnormal halves, with the FPU's flush-to-zero and denormals-are-zero modes set first
when MELDKIT_TEST_FLUSH_DENORMAL=1 (as a library built with -ffast-math sets them when it is
loaded, e.g. a torch.compile CPU kernel on torch 2.4), before any worker thread starts. Prints
one JSON object: name -> SHA-256 of the outputs' bytes, the share of subnormal inputs, and
whether the mode took effect."""

from __future__ import annotations

import json
import os
import sys

import torch

if os.environ.get("MELDKIT_TEST_FLUSH_DENORMAL") == "1":
    assert torch.set_flush_denormal(True), "this CPU cannot flush denormals"

# imported after the FPU mode is set, before any thread starts
from meldkit.ops import (
    blend_tensors,
    logit_fusion,
    merge_tensors,
    routed_lora,
    weighted_sum,
)
from tests.determinism_child import digest

MERGES = ("task_arithmetic", "ties", "dare_linear", "linear")


def main() -> None:
    tiny = torch.tensor([1e-39])
    out: dict[str, object] = {"flushing": bool((tiny * 1.0).item() == 0.0)}
    g = torch.Generator().manual_seed(0)
    dt = torch.float16
    base = (1e-4 * torch.randn(129, 515, generator=g)).to(dt)
    models = [(base.float() + 3e-5 * torch.randn(base.shape, generator=g)).to(dt) for _ in (0, 1)]
    out["subnormal_share"] = float((base.float().abs() < 2.0**-14).float().mean())
    for method in MERGES:
        kw = {"weights": [0.6, 0.4]}
        if method != "linear" and method != "task_arithmetic":
            kw["densities"] = 0.5
        merged = merge_tensors(None if method == "linear" else base, models, method, seed=3, **kw)
        out[f"merge-{method}"] = digest(merged)
    out["weighted_sum"] = digest(weighted_sum(models, [0.3, 0.7]))
    blended = [base.clone()]
    tau = models[0] - base
    blend_tensors(blended, [base], [tau], (0.5, 0.3, 0.2), keep=(0.7, 0.4), seed=9, tensor_keys=[4])
    out["blend"] = digest(*blended)
    logits = [(1e-4 * torch.randn(3, 4000, generator=g)).to(dt) for _ in (0, 1)]
    experts = (1e-4 * torch.randn(2, 3, 4000, generator=g)).to(dt)
    r = logit_fusion(*logits, experts)
    out["logit_fusion"] = digest(r.alpha, r.expert, r.logits, r.loss)
    x = (1e-4 * torch.randn(37, 64, generator=g)).to(dt).requires_grad_()
    a = (0.1 * torch.randn(4, 4, 64, generator=g)).to(dt).requires_grad_()
    b = (0.1 * torch.randn(4, 64, 4, generator=g)).to(dt).requires_grad_()
    w = (0.1 * torch.randn(4, 64, generator=g)).to(dt).requires_grad_()
    y, p = routed_lora(x, a, b, 2.0, router_weight=w, top_k=2)
    (y.float().sum() + p.float().sum()).backward()
    out["routed_lora"] = digest(y, p, x.grad, a.grad, b.grad, w.grad)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
