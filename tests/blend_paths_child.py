"""Child process of tests/ops/test_blend.py: runs the native CPU blend on inputs made to reach
every branch of its AVX-512 path (both masks, one, none; masks that keep everything or nothing;
tails of a 32-element step, tensors of several 2^18-element spans, misaligned views, outputs
that are their bases; NaNs with payloads, infinities, and float32-subnormal results, which the
bfloat16 hardware conversion would flush) and prints one JSON object: a digest of each output's
bytes, and the cases whose values differ from the reference (meldkit.ops.blend_ref; NaNs
compared as NaNs). The test runs it with MELDKIT_CPU_AVX512=0 (the portable loops) and without,
and needs the same bytes from both."""

from __future__ import annotations

import json
import zlib

import torch

from meldkit.ops import BlendPlan, blend_ref
from tests.determinism_child import digest

SIZES = [(0,), (7,), (31, 1), (32, 1), (33, 1), (1000, 3), (129, 300), (4099, 3), (5000,)]
LARGE = [(300_001, 1), (16384 * 17 + 5, 1)]  # several spans of 16 chunks, with a tail
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
        shapes = SIZES + LARGE
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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
