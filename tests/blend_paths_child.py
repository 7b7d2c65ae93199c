"""Child process of tests/ops/test_blend.py: runs the native CPU blend on inputs made to reach
every branch of its AVX-512 path (both masks, one, none; masks that keep everything or nothing;
tails of a 32-element step, tensors of several 2^18-element spans, misaligned views, outputs
that are their bases; NaNs with payloads, infinities, and float32-subnormal results, which the
bfloat16 hardware conversion would flush) and prints one JSON object: a digest of each output's
bytes (NaNs written as one NaN: which input's NaN a sum of two NaNs keeps is the compiler's
choice, as the README says), and the cases whose values differ from the reference
(meldkit.ops.blend_ref; NaNs compared as NaNs). The test runs it with MELDKIT_CPU_AVX512=0 (the
portable loops) and without, and needs the same bytes from both.

MELDKIT_TEST_DAZ_ONLY=1 first turns on the FPU's denormals-are-zero mode alone (no flush to
zero), before any worker thread starts (glibc's fesetenv on x86-64): the state in which
VFPCLASSPS stops seeing float32 subnormals.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import zlib

import torch


def _daz_only() -> bool:
    """Sets MXCSR's denormals-are-zero bit (0x40) through glibc's x86-64 fenv_t, whose MXCSR
    word follows the 28-byte x87 environment; True when that mode, and only it, took effect."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    env = (ctypes.c_uint32 * 8)()
    if libm.fegetenv(env) != 0:
        return False
    env[7] |= 0x40
    if libm.fesetenv(env) != 0:
        return False
    # read as bits: a float32 subnormal read as a float (.item()) is 0 in this mode
    reads_zero = (torch.tensor([1e-39]) * 1.0).view(torch.int32).item() == 0  # input as 0
    keeps = (torch.tensor([1e-30]) * 1e-9).view(torch.int32).item() != 0  # result not flushed
    return reads_zero and keeps


DAZ_ONLY = os.environ.get("MELDKIT_TEST_DAZ_ONLY") == "1" and _daz_only()

# imported after the FPU mode is set, before any thread starts
from meldkit.ops import BlendPlan, blend_ref  # noqa: E402
from tests.determinism_child import digest as _digest  # noqa: E402


def digest(*tensors: torch.Tensor) -> str:
    """The digest of the outputs' bytes with every NaN written as the dtype's default NaN."""
    return _digest(*(torch.where(t.isnan(), float("nan"), t) for t in tensors))


SIZES = [(0,), (7,), (31, 1), (32, 1), (33, 1), (1000, 3), (129, 300), (4099, 3), (5000,)]
LARGE = [(300_001, 1), (16384 * 17 + 5, 1)]  # several spans of 16 chunks, with a tail
NEAR_MIN = (64, 2)  # normal inputs whose blends are float32 subnormals
COEFFS = [(0.25, -0.3, 0.7), (1.0, 0.0, 0.8333), (0.5, -0.625, 0.0), (0.75, 0.0, 0.0)]
KEEPS = [(0.3, 0.45), (1.0, 0.45), (0.3, 0.0), (1.0, 1.0), (0.0, 0.0), (2.0**-24, 1 - 2.0**-24)]
# NaNs with a payload, negative, signalling: bit patterns per dtype
NAN_BITS = {
    torch.float32: (0x7FC12345, -0x3FFFFF, 0x7F800001),  # -0x3fffff: 0xffc00001 as int32
    torch.bfloat16: (0x7FC5, -0x3F, 0x7F81),  # -0x3f: 0xffc1 as int16
    torch.float16: (0x7E05, -0x1FF, 0x7C01),  # -0x1ff: 0xfe01 as int16
}


def specials(t: torch.Tensor, g: torch.Generator) -> None:
    """Puts NaNs (payloads, signs), infinities and tiny values at random places of ``t``."""
    flat = t.view(-1)
    n = flat.numel()
    raw = flat.view(torch.int32 if t.dtype == torch.float32 else torch.int16)
    for bits in NAN_BITS[t.dtype]:
        raw[torch.randint(n, (max(1, n // 500),), generator=g)] = bits
    for v in (float("inf"), -float("inf")):
        flat[torch.randint(n, (max(1, n // 500),), generator=g)] = v
    # results below float32's smallest normal (1.2e-38; bfloat16 has float32's exponent
    # range), and float16 subnormals
    tiny = 6e-8 if t.dtype == torch.float16 else 3e-39
    flat[torch.randint(n, (max(1, n // 50),), generator=g)] = tiny


def equal_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]))


def main() -> None:
    out: dict[str, object] = {}
    bad: list[str] = []
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        shapes = [*SIZES, *LARGE, NEAR_MIN]
        total = sum(torch.Size(s).numel() + 1 for s in shapes) + 1
        flat_b = torch.randn(total, generator=g).to(dtype)
        flat_t = (0.05 * torch.randn(total, generator=g)).to(dtype)
        specials(flat_b, g)
        specials(flat_t, g)
        bases, taus, start = [], [], 1  # views that start one element off: misaligned
        for s in shapes:
            n = torch.Size(s).numel()
            bases.append(flat_b[start : start + n].view(s))
            taus.append(flat_t[start : start + n].view(s))
            start += n + 1
        if dtype != torch.float16:  # float32's exponent range: 1.5e-38 + g·(-1.4e-38) < 2^-126
            bases[-1].fill_(1.5e-38)
            taus[-1].fill_(-1.4e-38)
        keys = [zlib.crc32(f"blend.{i}".encode()) for i in range(len(shapes))]
        for ci, coeffs in enumerate(COEFFS):
            for ki, keep in enumerate(KEEPS):
                name = f"{dtype}/{ci}/{ki}"
                outs = [torch.full_like(b, float("nan")) for b in bases]
                BlendPlan(outs, bases, taus, tensor_keys=keys)(coeffs, keep=keep, seed=7)
                out[name] = digest(*outs)
                for i, (o, b, t) in enumerate(zip(outs, bases, taus, strict=True)):
                    want = blend_ref(b, t, coeffs, keep=keep, seed=7, tensor_key=keys[i])
                    if not equal_or_both_nan(o, want):
                        bad.append(f"{name}/{i}")
        # in place: the outputs are the bases themselves
        copies = [b.clone() for b in bases]
        BlendPlan(copies, copies, taus, tensor_keys=keys)(COEFFS[0], keep=KEEPS[0], seed=8)
        out[f"{dtype}/in_place"] = digest(*copies)
    out["bad"] = bad
    out["daz_only"] = DAZ_ONLY
    print(json.dumps(out))


if __name__ == "__main__":
    main()
