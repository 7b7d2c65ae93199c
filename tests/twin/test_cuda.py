"""Twin-Merging on a GPU: SVDs on the device (and the CPU fallback when the GPU solver fails),
and TwinModel / TwinLoraModel on CUDA against the CPU."""

from __future__ import annotations

import pytest
import torch

from meldkit import twin
from tests.twin.models import batch, roberta_experts

pytestmark = pytest.mark.cuda
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def test_build_on_the_gpu_matches_the_cpu():
    base, experts = roberta_experts()
    cpu = twin.build(base, experts, rank_ratio=0.25, device="cpu", progress=False)
    gpu = twin.build(base, experts, rank_ratio=0.25, device="cuda", progress=False)
    for name in cpu.factors:
        for t in range(3):
            # The two solvers round differently: the truncations agree to float32 rounding
            # relative to the matrix, not element by element.
            g, c = gpu.exclusive(name, t), cpu.exclusive(name, t)
            assert float((g - c).norm() / c.norm().clamp_min(1e-12)) < 1e-4, name
            assert gpu.errors[name][t] == pytest.approx(cpu.errors[name][t], abs=1e-5)


def test_gpu_svd_failure_falls_back_to_the_cpu(monkeypatch):
    base, experts = roberta_experts()
    real = torch.linalg.svd

    def flaky(x, *args, **kwargs):
        if x.is_cuda:
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    ex = twin.build(base, experts, rank_ratio=1.0, device="cuda", progress=False)
    assert max(max(e) for e in ex.errors.values()) < 1e-5


def test_twin_model_on_cuda_matches_cpu():
    base, experts = roberta_experts()
    ex = twin.build(base, experts, rank_ratio=0.25, progress=False)
    cpu = twin.TwinModel(base, ex).eval()
    gpu = twin.TwinModel(base, ex).cuda().eval()
    gpu.router.load_state_dict(cpu.router.state_dict())
    x = batch()
    w = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), -1)
    with torch.no_grad():
        want = cpu(**x, weights=w).logits
        got = gpu(**{k: v.cuda() for k, v in x.items()}, weights=w.cuda()).logits
        routed = gpu(**{k: v.cuda() for k, v in x.items()}).logits
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-4)
    assert torch.isfinite(routed).all()
