"""meldkit._memory.prefault: faults pages in without touching the contents."""

import torch

from meldkit import _memory
from meldkit.ops import weighted_sum, weighted_sum_ref


def test_prefault_keeps_contents_and_returns_the_tensor():
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB, above MIN_BYTES
    view = big[5:]  # an offset into the storage: the whole storage is faulted in
    expected = view.clone()
    assert _memory.prefault(view) is view
    assert torch.equal(view, expected)
    small = torch.ones(4)
    assert _memory.prefault(small) is small and torch.equal(small, torch.ones(4))


def test_fresh_large_outputs_are_exact():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(1 << 21, generator=gen) for _ in range(3)]  # 8 MiB outputs
    got = weighted_sum(ts, [0.5, -1.25, 2.0])
    assert torch.equal(got, weighted_sum_ref(ts, [0.5, -1.25, 2.0]))
