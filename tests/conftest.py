import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _flushing_denormals() -> bool:
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0


@pytest.fixture(autouse=True)
def _ieee_subnormals():
    """Give every test IEEE subnormals, whatever an earlier test left behind. torch 2.4's
    torch.compile CPU kernels are built with -ffast-math, whose loading turns on
    flush-to-zero/denormals-are-zero for the process; the ops' own results do not depend on
    that (tests/ops/test_denormal_modes.py), but torch's reference arithmetic and hypothesis's
    subnormal floats do. (This resets the main thread, where the references run.)"""
    yield
    if _flushing_denormals():
        torch.set_flush_denormal(False)
