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
