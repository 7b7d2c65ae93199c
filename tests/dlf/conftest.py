import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The tiny models' matmuls are microseconds long: with several threads on a loaded 2-core
    machine, thread hand-offs made these tests 30× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """The tiny word-level tokenizer the DLF tests share (tests/dlf/tiny.py)."""
    from tests.dlf.tiny import tokenizer

    return tokenizer()


@pytest.fixture(scope="module")
def models():
    """(large, small base, two experts): the experts are perturbed copies of the small base."""
    from tests.dlf.tiny import llama, perturbed

    large = llama(0, hidden=48)
    small = llama(1)
    return large, small, [perturbed(small, 2), perturbed(small, 3)]
