"""Which tensors are one tensor: the key tied weights share in a state dict."""

from __future__ import annotations

import torch


def storage_key(t: torch.Tensor) -> tuple | None:
    """What identifies the memory ``t`` views: the names of a tied parameter, and their
    state-dict entries (detached views of it), give equal keys. None where no memory tells
    (a tensor without elements or on the meta device)."""
    if t.numel() == 0 or t.device.type == "meta" or t.data_ptr() == 0:
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
