"""The counter-based random numbers of stochastic ops (DARE, DELLA), in plain PyTorch.

A value is a pure function of ``(seed, tensor_index, element_index)``: no generator state, so the
same seed gives the same mask whatever the thread layout, the device or the order in which tensors
are processed. Native kernels implement the same arithmetic (a native header,
``csrc/include/meldkit/random.h`` when it lands, must match :func:`uniform_ref` bit for bit; the
tests pin a few values).

Algorithm (all arithmetic on unsigned 32-bit words)::

    mix(x)  = x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15
    key     = mix(seed_lo ^ mix(seed_hi ^ mix(tensor_index ^ 0x9e3779b9)))
    h       = mix(key ^ mix(element_lo ^ mix(element_hi ^ 0x85ebca6b)))
    uniform = (h >> 8) · 2⁻²⁴              # exactly representable in float32, in [0, 1)

``mix`` is Chris Wellons' ``lowbias32`` integer hash (public-domain constants). Every product of
a 32-bit word and a constant below 2³¹ fits in int64, so the reference computes it exactly with
torch's integer ops.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding unsigned 32-bit words."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _scalar_mix32(x: int) -> int:
    return int(_mix32(torch.tensor([x & _MASK32], dtype=torch.int64))[0])


def stream_key(seed: int, tensor_index: int) -> int:
    """The 32-bit key of one tensor's random stream."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= tensor_index < 2**32:
        raise ValueError(f"tensor_index must be in [0, 2**32), got {tensor_index}")
    inner = _scalar_mix32(tensor_index ^ 0x9E3779B9)
    inner = _scalar_mix32((seed >> 32) ^ inner)
    return _scalar_mix32((seed & _MASK32) ^ inner)


def uniform_ref(
    numel: int, seed: int, tensor_index: int, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``numel`` float32 uniforms in [0, 1) for elements ``0 .. numel-1`` of one tensor.

    Parameters
    ----------
    numel : int
        Elements of the tensor (flattened, row-major).
    seed : int
        The user's seed, 0 ≤ seed < 2⁶⁴.
    tensor_index : int
        Which tensor of the merge (its position in the model's tensor list), 0 ≤ index < 2³².

    Returns
    -------
    Tensor
        ``[numel]`` float32 on ``device``; multiples of 2⁻²⁴.
    """
    key = stream_key(seed, tensor_index)
    e = torch.arange(numel, dtype=torch.int64, device=device)
    h = _mix32((e >> 32) ^ 0x85EBCA6B)
    h = _mix32((e & _MASK32) ^ h)
    h = _mix32(key ^ h)
    return (h >> 8).to(torch.float32) * (2.0**-24)


def bernoulli_mask_ref(
    shape: torch.Size | tuple[int, ...],
    keep_prob: float | torch.Tensor,
    seed: int,
    tensor_index: int,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Keep mask: element e is kept when ``uniform(seed, tensor_index, e) < keep_prob``.

    ``keep_prob`` is a float, or a tensor of ``shape`` (per-element probabilities, as DELLA uses);
    it is compared in float32.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    u = uniform_ref(numel, seed, tensor_index, device=device).view(shape)
    if not isinstance(keep_prob, torch.Tensor):
        # A Python float is rounded to float32 by the comparison, like a float32 tensor would
        # be, without copying a tensor to the device (a host synchronisation on CUDA).
        return u < float(keep_prob)
    return u < keep_prob.to(device=device, dtype=torch.float32)
