"""The native merge family against its reference (meldkit/ops/merge_ref.py): exact magnitude
thresholds, counter-based masks bit for bit, and merges that equal the reference exactly (the
kernels round every product and sum as the reference does)."""

from __future__ import annotations

import warnings

import pytest
import torch

import meldkit
from meldkit import _native
from meldkit.merging import get_method
from meldkit.ops import magnitude_threshold, merge_tensor_list, merge_tensors
from meldkit.ops import merge_ref as mr
from meldkit.ops.random_ref import uniform_ref
from tests.helpers import DEVICES, DTYPES, ODD_SIZES, draw_boundary_keeps, poison

SHAPES = [(n,) for n in ODD_SIZES] + [(300, 301)]


def models_like(shape, dtype, device, n=3, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = [base + scale * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return base.to(device, dtype), [m.to(device, dtype) for m in models]


# ---- magnitude selection ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.99])
def test_threshold_is_exactly_the_kth_largest(device, dtype, shape, density):
    base, models = models_like(shape, dtype, device, n=1, seed=len(shape))
    tau = (models[0].float() - base.float()).abs().cpu()
    expected = mr.magnitude_threshold_ref(tau, density).item()
    assert magnitude_threshold(models, density, base) == expected
    assert magnitude_threshold([tau.to(device)], density) == expected
    assert magnitude_threshold(tau.to(device), density) == expected  # one tensor alone


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_with_many_ties(device):
    # bf16 has 8 mantissa bits: 100k values collapse onto a few hundred, so ties are everywhere.
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for density in (0.1, 0.37, 0.9):
        expected = mr.magnitude_threshold_ref(x.float().abs(), density).item()
        assert magnitude_threshold([x.to(device)], density) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_global_threshold_over_a_list(device):
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(s, generator=g) for s in [(7,), (33, 65), (1,), (4099,)]]
    bases = [torch.randn(t.shape, generator=g) for t in tensors]
    flat = torch.cat([(t - b).abs().flatten() for t, b in zip(tensors, bases, strict=True)])
    expected = mr.magnitude_threshold_ref(flat, 0.3).item()
    got = magnitude_threshold([t.to(device) for t in tensors], 0.3, [b.to(device) for b in bases])
    assert got == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: few values, many ties
@pytest.mark.parametrize("numel", [1, 2, 16383, 16384, 16385, 40_000])
def test_threshold_on_both_sides_of_the_small_input_path(numel, dtype):
    # Up to 2^14 elements the CPU selects from one buffer of bits, above by radix histograms:
    # both give the k-th largest, ties, zeros and infinities included, for k = 1 … numel.
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g).to(dtype)
    x[torch.rand(numel, generator=g) < 0.3] = 0.0
    if numel > 2:
        x[numel // 2] = float("-inf")
    pieces = list(x.split(max(1, numel // 3)))  # a list of tensors: one selection over all
    for density in sorted({min(1.0, d) for d in (1.5 / numel, 2.5 / numel, 0.1, 0.5, 0.97, 1.0)}):
        expected = mr.magnitude_threshold_ref(x.float().abs(), density).item()
        assert magnitude_threshold([x], density) == expected
        assert magnitude_threshold(pieces, density) == expected


def _large_cases():
    """Inputs of ≥ 2^20 elements, where the CPU kernel selects within a sampled bracket:
    (name, tensors, bases) covering each of its exits."""
    g = torch.Generator().manual_seed(5)
    n = 1 << 20
    base = torch.randn(n + 17, generator=g)
    fine = base + 0.01 * torch.randn(n + 17, generator=g)
    yield "fp32, kept values", [fine], [base]
    # bf16 differences collapse onto few values: large tie groups at the bracket's ends.
    yield "bf16 ties", [fine.bfloat16()], [base.bfloat16()]
    # A tie group of 20 % at 1.0, 0.3 % each at the next two floats, the rest uniform in [0, 3):
    # at density 0.534 the k-th largest is 1.0 + 1 ulp, just above the tie group.
    m = 1 << 21
    up = torch.tensor(2.0)
    ties = [torch.tensor(1.0)]
    for _ in range(2):
        ties.append(torch.nextafter(ties[-1], up))
    z = 3.0 * torch.rand(m, generator=g)
    z[: m // 5] = ties[0]
    step = 3 * m // 1000
    z[m // 5 : m // 5 + step] = ties[1]
    z[m // 5 + step : m // 5 + 2 * step] = ties[2]
    yield "tie group", [z[torch.randperm(m, generator=g)]], None
    # A list with an empty tensor and a tiny one: the sample walks across tensors.
    parts = [torch.randn(s, generator=g) for s in [(0,), (3,), (700, 1000), (1, 400_001)]]
    yield "list", parts, None
    # Every sampled position holds 0, all the others are large: the bracket misses and the
    # radix path answers. (The kernel samples m = clamp(numel / 1024, 4096, 65536) elements, at
    # (j + 0.5)·numel/m: here every 1024th, from 512.)
    x = torch.randn(1 << 22, generator=g).abs() + 1.0
    x[512::1024] = 0.0
    yield "sample misses", [x], None
    # The sampled positions hold 5 (53.4 % of them) or 0, the others are uniform in [1, 2): at
    # density 0.534 the bracket [0, 5] holds nearly everything, more than the kept buffer, and
    # the radix path answers.
    w = torch.rand(1 << 22, generator=g) + 1.0
    sampled = torch.arange(512, 1 << 22, 1024)
    w[sampled] = torch.where(torch.arange(len(sampled)) % 1000 < 534, 5.0, 0.0)
    yield "sample straddles", [w], None
    # +-inf and zeros mixed in.
    y = torch.randn(1 << 20, generator=g)
    y[::97] = float("inf")
    y[1::89] = -float("inf")
    y[2::3] = 0.0
    yield "inf and zeros", [y], None


_PORTABLE_PATHS = """
import hashlib, itertools, json, torch
from meldkit import _native
from meldkit.ops import magnitude_threshold, merge_tensors
from tests.ops.test_merge import _large_cases

def digest(t):
    t = t.contiguous()
    raw = t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]

out = []
for name, tensors, bases in _large_cases():  # the bracket pass
    out += [magnitude_threshold(tensors, d, bases) for d in (1e-6, 0.1, 0.534, 0.999999)]
g = torch.Generator().manual_seed(9)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    base = torch.randn((1 << 20) + 13, generator=g).to(dtype)
    noise = [0.01 * torch.randn(base.shape, generator=g) for _ in range(5)]
    noise[0][::7] = 0.0  # zero task-vector entries: no sign, never agree
    models = [(base.float() + z).to(dtype) for z in noise]
    for method, extra in [("ties", {}), ("dare_ties", {}), ("task_arithmetic", {}),
                          ("ties", {"normalize": False}), ("dare_linear", {"rescale": "l1"}),
                          ("ties", {"tie": "exact_k"})]:
        kw = {} if method == "task_arithmetic" else {"densities": [0.2, 0.5, 0.9, 0.3, 0.6]}
        out.append(digest(merge_tensors(base, models, method, seed=3, **kw, **extra)))
    # the fused pass itself: every mask and consensus kind, 1 to 5 models, tails of a tile
    for sparsify, consensus, normalize, n in itertools.product(
        ["none", "magnitude", "random"], ["none", "sum", "count"], [False, True], [1, 2, 4, 5]
    ):
        numel = 4096 + 13
        o = torch.empty(numel, dtype=dtype)
        _native._C.task_merge(
            base[:numel], [m[:numel] for m in models[:n]], o, [0.7, 1.3, 0.4, 1.0, 0.9][:n],
            [1.0, 2.0, 0.5, 1.0, 1.5][:n], [0.004, 0.01, 0.0, 0.02, 0.008][:n],
            [0.5, 0.3, 0.9, 0.6, 0.2][:n], 11, list(range(n)), sparsify, consensus, normalize, 0.8,
        )
        out.append(digest(o))
print(json.dumps(out))
"""


def test_the_portable_paths_agree_with_the_avx512_ones():
    # On a CPU with AVX-512, the merge pass (sums in registers) and the bracket pass (vector
    # compress) run intrinsics code; MELDKIT_CPU_AVX512=0 (read once per process) takes the
    # portable loops. Both must give the same thresholds and the same merged bits.
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runs = []
    for flag in ("0", "1"):
        env = {**os.environ, "MELDKIT_CPU_AVX512": flag}
        res = subprocess.run(
            [sys.executable, "-c", _PORTABLE_PATHS],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert len(runs[0]) == len(runs[1]) > 200
    assert runs[0] == runs[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [1e-6, 0.003, 0.1, 0.5, 0.534, 0.9, 0.999999])
def test_threshold_large_inputs(device, density):
    for name, tensors, bases in _large_cases():
        flat = torch.cat(
            [
                (t.float() - (b.float() if bases else 0.0)).abs().flatten()
                for t, b in zip(tensors, bases or tensors, strict=True)
            ]
        )
        expected = mr.magnitude_threshold_ref(flat, density).item()
        got = magnitude_threshold(
            [t.to(device) for t in tensors],
            density,
            [b.to(device) for b in bases] if bases else None,
        )
        assert got == expected, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_selection_of_several_models_in_one_pass(dtype):
    # merge_tensors selects every model's threshold against the shared base in one fused pass
    # on the CPU; models whose bracket misses, or whose sample is unusable, take the single
    # path. Each must equal the threshold magnitude_threshold gives alone (tested against the
    # reference above), whatever the others do: here the cases of _large_cases side by side.
    g = torch.Generator().manual_seed(8)
    n = 1 << 22
    base = torch.randn(n, generator=g).to(dtype)
    fine = (base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
    misses = torch.randn(n, generator=g).abs() + 1.0
    misses[128::256] = 0.0
    straddles = torch.rand(n, generator=g) + 1.0
    straddles[128::512] = 0.0
    straddles[384::512] = 5.0
    models = [fine, (base.float() + misses).to(dtype), (base.float() + straddles).to(dtype), base]
    for densities in ([0.3, 0.3, 0.3, 0.3], [0.05, 0.9, 0.0, 1.0], [0.534, 1e-6, 0.5, 0.2]):
        thresholds = [
            magnitude_threshold([m], d, [base]) for m, d in zip(models, densities, strict=True)
        ]
        for t, d in enumerate(densities):  # density 0 keeps nothing, 1 everything
            if d == 0.0:
                thresholds[t] = float("inf")
            elif d == 1.0:
                thresholds[t] = -float("inf")
        fused = merge_tensors(base, models, "ties", densities=densities)
        given = merge_tensors(base, models, "ties", densities=densities, thresholds=thresholds)
        assert torch.equal(fused, given), densities
    bad = fine.clone()
    bad[12345] = float("nan")  # not a sampled position: the fused pass finds it
    with pytest.raises(ValueError, match="NaN"):
        merge_tensors(base, [fine, bad], "ties", densities=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_histogram_counts_digits(dtype):
    # _C.magnitude_histogram (whole-model TIES's streamed selection) against bincount: the high
    # digit of every |theta - base|, then the low digit within one high digit; exact zeros and
    # NaN (counted, never scattered) included, and the counts add up over calls.
    g = torch.Generator().manual_seed(9)
    n = 50_003
    base = torch.randn(n, generator=g).to(dtype)
    theta = (base.float() + (torch.rand(n, generator=g) < 0.3) * torch.randn(n)).to(dtype)
    theta[17] = float("nan")
    bits = (theta.float() - base.float()).abs().view(torch.int32).to(torch.int64)
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    assert _native._C.magnitude_histogram(theta, base, hist, -1) == 1
    assert torch.equal(hist, torch.bincount(bits >> 16, minlength=1 << 16))
    assert _native._C.magnitude_histogram(theta, base, hist, -1) == 1
    assert torch.equal(hist, 2 * torch.bincount(bits >> 16, minlength=1 << 16))
    for prefix in (0, int(bits[100] >> 16)):
        hist.zero_()
        _native._C.magnitude_histogram(theta, base, hist, prefix)
        low = bits[(bits >> 16) == prefix] & 0xFFFF
        assert torch.equal(hist, torch.bincount(low, minlength=1 << 16)), prefix


def test_threshold_large_input_with_nan_off_the_sample():
    x = torch.randn((1 << 20) + 5, generator=torch.Generator().manual_seed(6))
    x[12345] = float("nan")  # not a sampled position
    with pytest.raises(ValueError, match="NaN"):
        magnitude_threshold([x], 0.3)


def test_threshold_of_nan_names_the_argument():
    # The kernels' error knows no argument; magnitude_threshold finds the first that puts NaN
    # among the magnitudes (a tensor, a base, or a tensor and its base both infinite).
    x = torch.tensor([1.0, float("nan"), 3.0])
    z = torch.zeros(3)
    cases = [
        (([z, x], 0.5), r"'tensors\[1\]' holds NaN"),
        ((x, 0.5, z), r"'tensors\[0\]' holds NaN"),
        (([z + 1, z + 1], 0.5, [z, x]), r"'base\[1\]' holds NaN"),
        (
            ([torch.tensor([1.0, float("inf")])], 0.5, torch.tensor([0.0, float("inf")])),
            r"'tensors\[0\]' − 'base' holds NaN \(both are infinite",
        ),
    ]
    big = torch.randn((1 << 20) + 5, generator=torch.Generator().manual_seed(6))
    big[12345] = float("nan")  # the bracket pass finds it
    cases.append((([big.clone().fill_(1.0), big], 0.3), r"'tensors\[1\]' holds NaN"))
    for args, match in cases:
        with pytest.raises(ValueError, match=r"^meldkit\.magnitude_threshold: " + match):
            magnitude_threshold(*args)


def test_threshold_edges_and_errors():
    x = torch.randn(10)
    assert magnitude_threshold([x], 0.0) == float("inf")
    assert magnitude_threshold([x], 1.0) == float("-inf")
    assert magnitude_threshold([x], 0.1) == x.abs().max().item()
    with pytest.raises(ValueError, match="NaN"):
        magnitude_threshold([torch.tensor([1.0, float("nan"), 3.0])], 0.5)
    with pytest.raises(ValueError, match="'density'"):
        magnitude_threshold([x], 1.5)
    inf = torch.tensor([float("inf"), 1.0, -float("inf"), 2.0])
    assert magnitude_threshold([inf], 0.5) == float("inf")


# ---- the fused merge -------------------------------------------------------------------------

CASES = [
    ("task_arithmetic", dict(lam=0.7, weights=[0.5, 1.0, 2.0])),
    ("task_arithmetic", dict(normalize=True, weights=[0.5, -1.0, 2.0])),
    ("ties", dict(densities=0.2)),
    ("ties", dict(densities=[0.3, 0.5, 0.9], rescale=True, normalize=False, lam=1.3)),
    ("ties", dict(densities=0.5, weights=[1.0, 3.0, -0.5])),
    ("dare_linear", dict(densities=0.4, seed=3)),
    ("dare_linear", dict(densities=0.4, seed=3, rescale="inverse_density", normalize=True)),
    ("dare_ties", dict(densities=[0.2, 0.4, 0.6], seed=11, tensor_index=5)),
    ("dare_ties", dict(densities=0.4, seed=3, rescale="none", normalize=True)),
    ("ties", dict(densities=[0.3, 0.6, 0.1], tie="exact_k", weights=[1.0, 0.5, 2.0])),
    ("ties", dict(densities=0.5, weights=[1.0, 3.0, -0.5], consensus="count")),
    ("ties", dict(densities=[0.3, 0.6, 0.1], tie="exact_k", consensus="count")),
    ("dare_ties", dict(densities=0.4, seed=3, consensus="count")),
]


def reference(base, models, method, kw, out_dtype):
    m = get_method(method)
    n = len(models)
    d = kw.get("densities", 1.0)
    rescale = {None: m.rescale, True: "l1", False: "none"}.get(kw.get("rescale"), kw.get("rescale"))
    return mr.generalized_merge_ref(
        base,
        models,
        weights=kw.get("weights", [1.0] * n),
        densities=d if isinstance(d, list) else [d] * n,
        sparsify=m.sparsify,
        consensus=kw.get("consensus", m.consensus),
        normalize=kw.get("normalize", m.normalize),
        rescale=rescale,
        lam=kw.get("lam", 1.0),
        seed=kw.get("seed", 0),
        tensor_index=kw.get("tensor_index", 0),
        tie=kw.get("tie", "keep_ties"),
        out_dtype=out_dtype,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (4099,), (300, 301)], ids=str)
@pytest.mark.parametrize(
    ("method", "kw"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)]
)
def test_merge_equals_reference_bit_for_bit(device, dtype, shape, method, kw):
    base, models = models_like(shape, dtype, device, seed=len(shape) + len(method))
    for out_dtype in (torch.float32, dtype):
        got = merge_tensors(base, models, method, out_dtype=out_dtype, **kw)
        expected = reference(base.cpu(), [m.cpu() for m in models], method, kw, out_dtype)
        assert got.dtype == out_dtype and got.device.type == device
        assert torch.equal(got.cpu(), expected), (got.cpu() - expected).abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_dare_masks_at_the_draw_boundaries(device):
    base, models = models_like((64, 65), torch.float32, device, n=1)
    stream = mr.stream_of(7, 1, 0)
    for density in draw_boundary_keeps(64 * 65, 3, stream):
        kw = dict(densities=density, seed=3, tensor_index=7, rescale="none")
        got = merge_tensors(base, models, "dare_linear", **kw)
        expected = reference(base.cpu(), [models[0].cpu()], "dare_linear", kw, torch.float32)
        assert torch.equal(got.cpu(), expected), density


@pytest.mark.parametrize("device", DEVICES)
def test_dare_keeps_density_and_seed_changes_mask(device):
    base, models = models_like((512, 512), torch.float32, device, n=1)
    a = merge_tensors(base, models, "dare_linear", densities=0.3, seed=1, rescale="none")
    assert abs((a != base).float().mean().item() - 0.3) < 0.005
    b = merge_tensors(base, models, "dare_linear", densities=0.3, seed=2, rescale="none")
    assert not torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_global_thresholds_are_used(device):
    base, models = models_like((99, 7), torch.float32, device)
    thresholds = [magnitude_threshold([m], 0.25, base) for m in models]
    a = merge_tensors(base, models, "ties", densities=0.25)
    b = merge_tensors(base, models, "ties", densities=0.9, thresholds=thresholds)
    assert torch.equal(a, b)  # the thresholds decide, not the densities


LIST_SHAPES = [(7,), (300, 301), (1,), (0,), (4099,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("method", "kw"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)]
)
def test_list_merge_equals_one_tensor_at_a_time(device, dtype, method, kw):
    # One native call over positions of different shapes (empty included) gives, position by
    # position, exactly what merge_tensors gives with that position's tensor_index.
    pairs = [models_like(s, dtype, device, seed=j) for j, s in enumerate(LIST_SHAPES)]
    bases = [b for b, _ in pairs]
    models = [[ms[t] for _, ms in pairs] for t in range(3)]
    kw = {k: v for k, v in kw.items() if k != "tensor_index"}
    indices = [5, 0, 9, 2, 77]
    got = merge_tensor_list(bases, models, method, tensor_indices=indices, **kw)
    assert len(got) == len(bases)
    for j, base in enumerate(bases):
        one = merge_tensors(base, [ms[j] for ms in models], method, tensor_index=indices[j], **kw)
        assert got[j].shape == base.shape and torch.equal(got[j], one), j


def test_list_merge_methods_without_native_kernels_and_bad_arguments():
    pairs = [models_like(s, torch.float32, "cpu", seed=j) for j, s in enumerate([(5,), (3, 4)])]
    bases = [b for b, _ in pairs]
    models = [[ms[t] for _, ms in pairs] for t in range(3)]
    got = merge_tensor_list(bases, models, "model_stock")
    for j, base in enumerate(bases):
        assert torch.equal(got[j], merge_tensors(base, [ms[j] for ms in models], "model_stock"))
    with pytest.raises(ValueError, match=r"'models\[1\]': has 1 tensors for 2 bases"):
        merge_tensor_list(bases, [models[0], models[1][:1], models[2]], "ties")
    with pytest.raises(ValueError, match="tensor_indices"):
        merge_tensor_list(bases, models, "ties", tensor_indices=[0])
    with pytest.raises(ValueError, match="shape"):
        merge_tensor_list(bases, [models[0], models[1][::-1], models[2]], "ties")


def test_linear_model_stock_slerp_through_the_public_op():
    base, models = models_like((33, 17), torch.float32, "cpu", n=3)
    torch.testing.assert_close(
        merge_tensors(None, models, "linear", weights=[1.0, 1.0, 2.0]),
        (models[0] + models[1] + 2 * models[2]) / 4,
    )
    torch.testing.assert_close(
        merge_tensors(base, models, "model_stock"), mr.model_stock_ref(base, models)
    )
    torch.testing.assert_close(
        merge_tensors(base, models[:1], "slerp", t=0.3), mr.slerp_ref(base, models[0], 0.3)
    )


def test_methods_without_native_masks_fall_back_with_a_warning(monkeypatch):
    monkeypatch.setenv("MELDKIT_BACKEND", "auto")
    monkeypatch.setattr(_native, "_warned", set())
    base, models = models_like((50,), torch.float32, "cpu")
    kw = {"densities": 0.8, "epsilons": 0.1, "seed": 3, "rescale": "inverse_density"}
    with pytest.warns(meldkit.MeldkitFallbackWarning, match="native DELLA path"):
        got = merge_tensors(base, models, "della", **kw)
    expected = mr.generalized_merge_ref(
        base,
        models,
        weights=[1.0] * 3,
        densities=[0.8] * 3,
        sparsify="della",
        consensus="sum",
        normalize=True,
        rescale="inverse_density",
        epsilons=[0.1] * 3,
        seed=3,
    )
    assert torch.equal(got, expected)


NAN_CASES = [
    ("task_arithmetic", {}),
    ("ties", {"densities": 1.0}),
    ("ties", {"densities": 1.0, "rescale": "l1"}),
    ("dare_linear", {"densities": 0.5, "seed": 3}),
    ("dare_linear", {"densities": 0.5, "seed": 3, "rescale": "inverse_density"}),
    ("dare_ties", {"densities": 0.4, "seed": 5}),
    ("dare_ties", {"densities": 0.4, "seed": 5, "rescale": "none"}),
    ("breadcrumbs", {"densities": 1.0, "gammas": 0.0}),
    ("della", {"densities": 0.5, "epsilons": 0.1, "seed": 7}),
    ("della_linear", {"densities": 0.5, "epsilons": 0.1, "seed": 7}),
    ("linear", {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("method", "kw"), NAN_CASES, ids=lambda v: str(v))
def test_nan_in_a_task_vector_gives_the_references_nans(device, dtype, method, kw, monkeypatch):
    """NaN in a fine-tuned tensor (or the base) is not dropped: the native kernels give NaN
    where the reference gives it (NaN·0 = NaN: masked or not; a NaN L1 norm makes the whole
    rescaled tensor NaN), and the reference's values elsewhere. Magnitude selection below
    density 1 refuses NaN instead (test_threshold_refuses_nan)."""
    if device == "cuda" and method.startswith("della"):
        pytest.skip("DELLA runs natively on the CPU only")
    base, models = models_like((5, 300), dtype, device, n=3, seed=11)
    models[0][0, 7] = float("nan")
    models[2][3, 299] = float("nan")
    base[4, 0] = float("nan")
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    got = merge_tensors(base, models, method, **kw)
    listed = merge_tensor_list([base], [[m] for m in models], method, tensor_indices=[0], **kw)
    monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    want = merge_tensors(base, models, method, **kw)
    assert got.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(listed[0], want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_l1_rescale_at_density_one_keeps_a_nan_only_task_vector(device, monkeypatch):
    """At density 1 the L1 pass keeps NaN, as the merge pass and the reference do: a task vector
    whose only nonzero entries are NaN has a NaN kept norm (so every element is NaN), not a kept
    norm of 0 and a factor of 1 (the CPU pass used to drop NaN there)."""
    base = torch.zeros(8, device=device)
    m1, m2 = base.clone(), base.clone()
    m1[3] = float("nan")
    m2[5] = 1.0
    kw = {"densities": 1.0, "rescale": "l1"}
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    got = merge_tensors(base, [m1, m2], "ties", **kw)
    monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    want = merge_tensors(base, [m1, m2], "ties", **kw)
    assert want.isnan().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


INF_CASES = [
    *NAN_CASES,
    ("ties", {"densities": 0.5}),
    ("ties", {"densities": 0.5, "rescale": "l1"}),
    ("ties", {"densities": 0.5, "tie": "exact_k"}),
    ("dare_linear", {"densities": 0.5, "seed": 3, "rescale": "l1"}),
    ("breadcrumbs", {"densities": 0.5, "gammas": 0.0}),
    ("breadcrumbs_ties", {"densities": 0.6, "gammas": 0.001}),  # the upper cut at inf
    ("breadcrumbs", {"densities": 0.001, "gammas": 0.0}),  # the lower cut at inf
    ("della", {"densities": 0.5, "epsilons": 0.1, "seed": 7, "rescale": "none"}),
    ("della", {"densities": 1.0}),
    ("della_linear", {"densities": 1.0}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("method", "kw"), INF_CASES, ids=lambda v: str(v))
def test_inf_in_a_task_vector_gives_the_references_values(device, dtype, method, kw, monkeypatch):
    """±inf in a fine-tuned tensor, on every method's native path: the reference's
    values, NaNs included (a kept inf stays ±inf, a dropped one is dropped, magnitude selection
    ranks it largest, and an L1 factor that is not finite makes the whole result NaN). The
    native paths used to differ: DARE's L1 factor of inf scaled the kept entries only, DELLA
    raised naming the internal 'scales', breadcrumbs refused an infinite boundary magnitude."""
    if device == "cuda" and method.startswith("della"):
        pytest.skip("DELLA runs natively on the CPU only")
    base, models = models_like((5, 300), dtype, device, n=3, seed=12)
    models[0][0, 7] = float("inf")
    models[0][1, 8] = float("-inf")  # two infinities: both ends of a breadcrumbs band
    models[2][3, 299] = float("-inf")
    models[1][4, 0] = float("-inf")  # opposite infinities meet
    models[2][4, 0] = float("inf")
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    got = merge_tensors(base, models, method, **kw)
    listed = merge_tensor_list([base], [[m] for m in models], method, tensor_indices=[0], **kw)
    monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    want = merge_tensors(base, models, method, **kw)
    assert not want.isfinite().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(listed[0], want, rtol=0, atol=0, equal_nan=True)
    if get_method(method).sparsify != "none" and (
        kw.get("rescale", get_method(method).rescale) == "l1"
    ):
        assert want.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("dare_linear", {"densities": 0.5, "rescale": "l1"}),
        ("dare_ties", {"densities": 0.5, "rescale": "l1"}),
        ("della", {"densities": 0.5, "epsilons": 0.1}),
        ("della_linear", {"densities": 0.5, "epsilons": 0.1}),
    ],
    ids=str,
)
def test_a_dropped_inf_makes_the_l1_factor_and_the_result_nan(device, method, kw, monkeypatch):
    """An inf the mask drops still makes ‖τ‖₁ inf: the factor is not finite, so it is NaN and
    so is every element, on the native paths as on the reference (DARE's native factor used
    to be inf, scaling only the kept entries; DELLA raised naming the internal 'scales'; the
    reference had NaN at the dropped entries, ±inf at the kept ones)."""
    if device == "cuda" and method.startswith("della"):
        pytest.skip("DELLA runs natively on the CPU only")
    base, models = models_like((64,), torch.float32, device, n=2, seed=5, scale=0.1)
    u = uniform_ref(64, 0, mr.stream_of(0, 2, 1))
    e = int(torch.nonzero(u >= 0.6)[0])  # dropped at every keep probability used here
    models[1][e] = base[e] + float("inf")
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    got = merge_tensors(base, models, method, **kw)
    monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    want = merge_tensors(base, models, method, **kw)
    assert want.isnan().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["della", "della_linear", "task_arithmetic"])
def test_nan_with_l1_rescale_as_the_reference_at_density_one(device, method, monkeypatch):
    """DELLA at density 1 keeps τ whole, and its L1 factor ‖τ‖₁/‖τ‖₁ is NaN when τ holds NaN:
    the whole result NaN (the native path used to take the factor as 1). task_arithmetic has
    no mask: rescale="l1" is inert there, on the reference too (which used to apply it)."""
    if device == "cuda" and method.startswith("della"):
        pytest.skip("DELLA runs natively on the CPU only")
    base = torch.zeros(6, device=device)
    m1 = torch.tensor([0.1, -0.2, 0.3, float("nan"), 0.02, -0.03], device=device)
    m2 = torch.tensor([0.2, 0.1, -0.1, 0.02, -0.01, 0.04], device=device)
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    got = merge_tensors(base, [m1, m2], method, densities=1.0, rescale="l1")
    monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    want = merge_tensors(base, [m1, m2], method, densities=1.0, rescale="l1")
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if method == "task_arithmetic":
        assert want.isnan().tolist() == [False, False, False, True, False, False]
        assert torch.equal(want[:3], m1[:3] + m2[:3])
    else:
        assert want.isnan().all()


@pytest.mark.parametrize("n", [2, 33])
def test_thresholds_decide_at_the_default_density(n, monkeypatch):
    """Given thresholds trim at density 1 (the default) too, on every backend: the reference
    (MELDKIT_BACKEND=reference, or more than 32 models) used to ignore them there."""
    base = torch.zeros(6)
    m1 = torch.tensor([0.1, -0.2, 0.3, 0.01, 0.02, -0.03])
    m2 = torch.tensor([0.2, 0.1, -0.1, 0.02, -0.01, 0.04])
    models = ([m1, m2] * 17)[:n]
    results = []
    for backend in ("auto", "reference"):
        monkeypatch.setenv("MELDKIT_BACKEND", backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", meldkit.MeldkitFallbackWarning)
            results.append(merge_tensors(base, models, "ties", thresholds=[0.05] * n))
    assert torch.equal(results[0], results[1])
    assert results[0][3:].tolist() == [0.0, 0.0, 0.0]  # every |τ| < 0.05 there: dropped


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_inverse_density_rescale_of_a_density_whose_reciprocal_overflows(method, monkeypatch):
    """1/1e-39 is inf in float32: only kept entries are scaled by it, on every backend (the
    reference multiplied the dropped zeros too, making the whole result NaN)."""
    base = torch.zeros(6)
    m1 = torch.tensor([0.1, -0.2, 0.3, 0.01, 0.02, -0.03])
    m2 = torch.tensor([0.2, 0.1, -0.1, 0.02, -0.01, 0.04])
    kw = {"densities": [1e-39, 0.5], "rescale": "inverse_density", "seed": 1}
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    got = merge_tensors(base, [m1, m2], method, **kw)
    monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    want = merge_tensors(base, [m1, m2], method, **kw)
    assert want.isfinite().all()  # model 0 keeps nothing here
    assert torch.equal(got, want)


def test_magnitude_selection_of_nan_names_the_model():
    base, models = models_like((50,), torch.float32, "cpu")
    clean = [m.clone() for m in models]
    models[1][17] = float("nan")
    with pytest.raises(ValueError, match=r"merge_tensors: method 'ties' .* models\[1\] holds NaN"):
        merge_tensors(base, models, "ties", densities=0.5)
    with pytest.raises(ValueError, match=r"merge_tensors: .* models\[1\] holds NaN"):
        merge_tensors(base, models, "breadcrumbs", densities=0.5)
    with pytest.raises(ValueError, match=r"merge_tensors: .* models\[1\] holds NaN"):
        merge_tensors(base, models, "ties", densities=0.5, out=torch.empty(50))
    with pytest.raises(ValueError, match=r"merge_tensor_list: .* models\[1\]\[1\] holds NaN"):
        merge_tensor_list(
            [base, base], [[x, m] for x, m in zip(clean, models, strict=True)], densities=0.5
        )


@pytest.mark.parametrize("device", DEVICES)
def test_magnitude_selection_of_nan_names_the_base_or_the_infinities(device):
    """NaN in the base is the base's, not the first model's (it used to be reported as
    "models[0] − base"); a task vector made NaN by ∞ − ∞ names the model and its base. Found
    without float32 copies of the inputs (the error path used to subtract every pair)."""
    base, models = models_like((50,), torch.bfloat16, device)
    nan_base = base.clone()
    nan_base[3] = float("nan")
    for bases, listed in (([nan_base], False), ([base, nan_base], True)):
        where = r"bases\[1\] holds NaN" if listed else r" base holds NaN"
        with pytest.raises(ValueError, match=where):
            if listed:
                merge_tensor_list(bases, [[m, m] for m in models], densities=0.5)
            else:
                merge_tensors(nan_base, models, "ties", densities=0.5)
    inf_base, inf_models = base.clone(), [m.clone() for m in models]
    inf_base[9] = float("inf")
    inf_models[0][9] = float("-inf")  # inf − (−inf): infinite, not NaN
    inf_models[2][9] = float("inf")  # inf − inf: NaN
    with pytest.raises(ValueError, match=r"models\[2\] − base holds NaN \(both are infinite"):
        merge_tensors(inf_base, inf_models, "ties", densities=0.5)


def test_lam_and_t_are_checked_by_name(monkeypatch):
    """λ and slerp's t: real numbers, finite (λ used to reach the kernel unchecked, NaN/inf
    then raising with the internal op's name or, on the reference, giving NaN; '2' was
    accepted, None a bare TypeError)."""
    base, models = models_like((5,), torch.float32, "cpu")
    for backend in ("auto", "reference"):
        monkeypatch.setenv("MELDKIT_BACKEND", backend)
        for lam, exc in [(float("nan"), ValueError), (float("inf"), ValueError), (1e39, ValueError),
                         ("2", TypeError), (None, TypeError), (True, TypeError)]:  # fmt: skip
            with pytest.raises(exc, match="merge_tensors: argument 'lam'"):
                merge_tensors(base, models, "ties", densities=0.5, lam=lam)
            with pytest.raises(exc, match="merge_tensors: argument 'lam'"):
                merge_tensor_list([base], [[m] for m in models], "ties", lam=lam)
        for t, exc in [(float("nan"), ValueError), ("0.5", TypeError), (None, TypeError)]:
            with pytest.raises(exc, match="merge_tensors: argument 't'"):
                merge_tensors(base, models[:1], "slerp", t=t)
    assert torch.equal(
        merge_tensors(base, models, "task_arithmetic", lam=2),
        merge_tensors(base, models, "task_arithmetic", lam=2.0),
    )


def test_lam_and_t_may_be_0d_tensors_and_numpy_scalars():
    """A 0-d real tensor or array and a NumPy scalar are numbers (read with .item()), as they
    were before λ and t were checked; a bool tensor, a 1-element 1-d tensor and a complex one
    are not."""
    np = pytest.importorskip("numpy")
    base, models = models_like((5,), torch.float32, "cpu")
    want = merge_tensors(base, models, "ties", densities=0.5, lam=0.5)
    for lam in (torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), np.float32(0.5),
                np.array(0.5)):  # fmt: skip
        assert torch.equal(merge_tensors(base, models, "ties", densities=0.5, lam=lam), want)
        assert torch.equal(merge_tensor_list([base], [[m] for m in models], "ties",
                                             densities=0.5, lam=lam)[0], want)  # fmt: skip
    want = merge_tensors(base, models[:1], "slerp", t=0.25)
    for t in (torch.tensor(0.25), np.float64(0.25), torch.tensor(1) / 4):
        assert torch.equal(merge_tensors(base, models[:1], "slerp", t=t), want)
    for bad in (torch.tensor(True), np.bool_(True), torch.tensor([0.5]), torch.tensor(0.5j)):
        with pytest.raises(TypeError, match="argument 'lam': expected a float, got"):
            merge_tensors(base, models, "ties", densities=0.5, lam=bad)
    with pytest.raises(ValueError, match="argument 't': must be finite"):
        merge_tensors(base, models[:1], "slerp", t=torch.tensor(float("inf")))


def test_scalar_arguments_are_checked_by_name():
    """Wrong types or values of merge_tensors', merge_tensor_list's and magnitude_threshold's
    scalar arguments raise naming the argument (an int out_dtype used to give zeros, a string
    normalize counted as True, a complex tensor a wrong threshold)."""
    base, models = models_like((50,), torch.float32, "cpu")
    cases = [
        (
            lambda: merge_tensors(base, models, "ties", out_dtype=torch.int32),
            TypeError,
            "'out_dtype'",
        ),
        (
            lambda: merge_tensors(base, models, "model_stock", out_dtype=torch.bool),
            TypeError,
            "'out_d",
        ),
        (
            lambda: merge_tensor_list([base], [[m] for m in models], out_dtype=torch.int8),
            TypeError,
            "'out_dtype'",
        ),
        (lambda: merge_tensors(base, models, "ties", seed="a"), TypeError, "'seed'"),
        (lambda: merge_tensors(base, models, "ties", seed=1.7), TypeError, "'seed'"),
        (
            lambda: merge_tensors(base, models, "ties", tensor_index="a"),
            TypeError,
            "'tensor_index'",
        ),
        (lambda: merge_tensors(base, models, "ties", thresholds=0.5), TypeError, "'thresholds'"),
        (
            lambda: merge_tensors(base, models, "ties", thresholds=["a"] * 3),
            TypeError,
            "'thresholds'",
        ),
        (lambda: merge_tensors(base, models, "linear", normalize="no"), TypeError, "'normalize'"),
        (lambda: merge_tensors(None, models, "linear", weights=[1, -1, 0]), ValueError, "sum to 0"),
        (
            lambda: merge_tensor_list([base], [[m] for m in models], tensor_indices=[7.9]),
            TypeError,
            "'tensor_indices'",
        ),
        (
            lambda: magnitude_threshold([base.to(torch.complex64)], 0.5),
            TypeError,
            r"'tensors\[0\]'",
        ),
        (lambda: magnitude_threshold([base.int()], 0.5), TypeError, r"'tensors\[0\]'"),
        (lambda: magnitude_threshold([[1.0]], 0.5), TypeError, r"'tensors\[0\]'"),
        (lambda: magnitude_threshold([base], "0.5"), TypeError, "'density'"),
        (lambda: magnitude_threshold([base], 0.5, base=[base[:3]]), ValueError, r"'base\[0\]'"),
        (lambda: merge_tensors(base, models, "breadcrumbs", gammas=-0.5), ValueError, "'gammas'"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()


def test_native_backend_refuses_every_fallback(monkeypatch):
    """MELDKIT_BACKEND=native: "never fall back; raise instead", also for the fallbacks a
    method decides on from its arguments (more models than a call takes, DELLA with
    inverse-density rescaling, exactly-k ties with L1 rescaling)."""
    monkeypatch.setenv("MELDKIT_BACKEND", "native")
    base, models = models_like((50,), torch.float32, "cpu")
    cases = [
        ("ties", [models[0]] * 33, {"densities": 0.5}, "at most 32 models"),
        (
            "della",
            models,
            {"densities": 0.8, "epsilons": 0.1, "rescale": "inverse_density"},
            "DELLA",
        ),
        ("ties", models, {"densities": 0.5, "tie": "exact_k", "rescale": "l1"}, "exact_k"),
    ]
    for method, ms, kw, message in cases:
        with pytest.raises(RuntimeError, match=f"MELDKIT_BACKEND=native but .*{message}"):
            merge_tensors(base, ms, method, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(37,), (1,), (97, 41), (3, 5, 7), (6, 3001)], ids=str)
def test_della_native_equals_reference(dtype, method, shape):
    """DELLA on the CPU (native ranks by radix sort, native draws, the fused merge with each
    model's L1 factor) merges exactly as the reference: rows with ties (bf16 task vectors,
    rows of 3001 that use all three radix digits), 1-D tensors as one row, both rescales."""
    m = get_method(method)
    base, models = models_like(shape, dtype, "cpu", n=3, seed=len(shape))
    w = [0.5, 1.0, 0.25]
    for (d, e), rescale in [((0.5, 0.1), "l1"), ((0.9, 0.1), "none"), ((0.3, 0.0), "l1")]:
        got = merge_tensors(
            base,
            models,
            method,
            densities=d,
            epsilons=e,
            seed=7,
            weights=w,
            rescale=rescale,
            tensor_index=3,
        )
        expected = mr.generalized_merge_ref(
            base,
            models,
            weights=w,
            densities=[d] * 3,
            sparsify="della",
            consensus=m.consensus,
            normalize=m.normalize,
            rescale=rescale,
            epsilons=[e] * 3,
            seed=7,
            tensor_index=3,
        )
        assert torch.equal(got, expected), (d, e, rescale)
    listed = merge_tensor_list([base], [[x] for x in models], method, densities=0.5, seed=7)
    one = merge_tensors(base, models, method, densities=0.5, seed=7)
    assert torch.equal(listed[0], one)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_density_one_and_zero_as_mergekit(method):
    """Density 1 (the default) keeps each task vector whole, 0 drops it, whatever ε: mergekit's
    short-circuits, on the native path as on the reference."""
    m = get_method(method)
    base, models = models_like((9, 33), torch.float32, "cpu", n=2, seed=3)
    for densities in ([1.0, 1.0], [0.0, 1.0], [0.0, 0.0]):
        got = merge_tensors(base, models, method, densities=densities, weights=[0.7, 0.4])
        expected = mr.generalized_merge_ref(
            base,
            models,
            weights=[0.7, 0.4],
            densities=densities,
            sparsify="della",
            consensus=m.consensus,
            normalize=m.normalize,
            rescale=m.rescale,
            epsilons=[0.15, 0.15],
        )
        assert torch.equal(got, expected), densities
    kept = merge_tensors(base, models, method, weights=[0.7, 0.4])  # density defaults to 1
    plain = merge_tensors(
        base,
        models,
        "ties" if m.consensus == "sum" else "task_arithmetic",
        weights=[0.7, 0.4],
        normalize=m.normalize,
    )
    torch.testing.assert_close(kept, plain)


def _crumbs_cases(dtype, device):
    """(name, base, models): plain, bf16-style tie groups at the band's ends, sparse task
    vectors (most |τ| = 0), and one tie group that holds both ends."""
    base, models = models_like((97, 41), dtype, device, n=3, seed=9)
    yield "random", base, models
    g = torch.Generator().manual_seed(10)
    steps = torch.randint(-6, 7, (3, 97, 41), generator=g).to(torch.float64) / 64
    yield "ties", base, [(base.double().cpu() + s).to(device, dtype) for s in steps]
    sparse = [m.clone() for m in models]
    for i, m in enumerate(sparse):
        keep = torch.rand(m.shape, generator=g) < 0.1 + 0.1 * i
        m.copy_(torch.where(keep.to(device), m, base))
    yield "sparse", base, sparse
    flat = base.double().cpu() + 0.125
    flat.view(-1)[::7] += 0.25
    yield "one group", base, [flat.to(device, dtype)] * 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_native_equals_reference(device, dtype, method):
    """Breadcrumbs without its sort (two exact selections, ties at the boundary values by index)
    merges exactly as the reference, over densities and γ that cover every band: the usual one,
    γ = 0 (nothing cut at the top), n_bot < 0 (γ absorbs it), everything kept, nothing kept."""
    m = get_method(method)
    params = [(0.8, 0.05), (0.5, 0.0), (0.97, 0.1), (1.0, 0.0), (0.0, 0.0), (0.3, 0.3)]
    for name, base, models in _crumbs_cases(dtype, device):
        n = len(models)
        for density, gamma in params:
            got = merge_tensors(
                base, models, method, densities=density, gammas=gamma, weights=[0.7, 1.3, 1.0][:n]
            )
            expected = mr.generalized_merge_ref(
                base.cpu(),
                [x.cpu() for x in models],
                weights=[0.7, 1.3, 1.0][:n],
                densities=[density] * n,
                sparsify="breadcrumbs",
                consensus=m.consensus,
                normalize=m.normalize,
                gammas=[gamma] * n,
            )
            assert torch.equal(got.cpu(), expected), (name, density, gamma)
        listed = merge_tensor_list(
            [base, base[:5]], [[x, x[:5]] for x in models], method, densities=0.6, gammas=0.02
        )
        for j, b in enumerate((base, base[:5])):
            one = merge_tensors(
                b, [x if j == 0 else x[:5] for x in models], method, densities=0.6, gammas=0.02
            )
            assert torch.equal(listed[j], one), name


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("task_arithmetic", {"lam": 0.7}),
        ("ties", {"densities": 0.3}),
        ("ties", {"densities": 0.3, "tie": "exact_k"}),
        ("dare_ties", {"densities": 0.5, "seed": 3}),
        ("dare_linear", {"densities": 0.5, "seed": 3}),
        ("breadcrumbs", {"densities": 0.8, "gammas": 0.05}),
        ("breadcrumbs_ties", {"densities": 0.8, "gammas": 0.05}),
        ("della", {"densities": 0.5, "epsilons": 0.1, "seed": 5}),
        ("della_linear", {"densities": 0.5, "epsilons": 0.1, "seed": 5}),
    ],
)
def test_more_models_than_the_kernels_take_run_the_reference(monkeypatch, method, kw):
    """33 models (the native kernels take at most 32 per call): every task-vector method,
    DELLA's native path included, runs the reference with a warning saying why, through
    merge_tensors (with and without ``out``) and merge_tensor_list."""
    monkeypatch.setenv("MELDKIT_BACKEND", "auto")
    monkeypatch.setattr(_native, "_warned", set())
    n = 33
    base, models = models_like((41, 7), torch.float32, "cpu", n=n, seed=4)
    m = get_method(method)
    weights = [0.5 + 0.1 * (t % 7) - 0.4 * (t % 3 == 0) for t in range(n)]
    per_model = {k: v for k, v in kw.items() if k in ("densities", "gammas", "epsilons")}
    expected = mr.generalized_merge_ref(
        base,
        models,
        weights=weights,
        sparsify=m.sparsify,
        consensus=m.consensus,
        normalize=m.normalize,
        rescale=m.rescale,
        lam=kw.get("lam", 1.0),
        tie=kw.get("tie", "keep_ties"),
        seed=kw.get("seed", 0),
        tensor_index=9,
        **{k: [v] * n for k, v in per_model.items()},
    )
    with pytest.warns(meldkit.MeldkitFallbackWarning, match="at most 32 models per call, got 33"):
        got = merge_tensors(base, models, method, weights=weights, tensor_index=9, **kw)
    assert torch.equal(got, expected)
    out = torch.empty_like(base)
    merge_tensors(base, models, method, weights=weights, tensor_index=9, out=out, **kw)
    assert torch.equal(out, expected)
    listed = merge_tensor_list(
        [base, base[:3]],
        [[x, x[:3]] for x in models],
        method,
        weights=weights,
        tensor_indices=[9, 2],
        **kw,
    )
    assert torch.equal(listed[0], expected)
    assert torch.equal(
        listed[1],
        merge_tensors(
            base[:3],
            [x[:3] for x in models],
            method,
            weights=weights,
            **{
                **kw,
                "tensor_index": 2,
            },
        ),
    )


def test_breadcrumbs_native_runs_without_warning(monkeypatch, recwarn):
    monkeypatch.setenv("MELDKIT_BACKEND", "auto")
    monkeypatch.setattr(_native, "_warned", set())
    base, models = models_like((50,), torch.float32, "cpu")
    merge_tensors(base, models, "breadcrumbs", densities=0.8, gammas=0.05)
    assert not [w for w in recwarn if issubclass(w.category, meldkit.MeldkitFallbackWarning)]


def test_merge_bad_arguments():
    base, models = models_like((5,), torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown merge_method"):
        merge_tensors(base, models, "tiez")
    with pytest.raises(ValueError, match="needs a base"):
        merge_tensors(None, models, "ties")
    with pytest.raises(ValueError, match="densities must be in"):
        merge_tensors(base, models, "ties", densities=1.5)
    with pytest.raises(ValueError, match=rf"'weights': has 2 entries for {len(models)} models"):
        merge_tensors(base, models, "ties", weights=[1.0, 1.0])
    with pytest.raises(TypeError, match=r"'models\[0\]': dtype torch.float16 differs from 'base'"):
        merge_tensors(base, [m.half() for m in models], "ties")
    with pytest.raises(TypeError, match=r"'models\[1\]\[0\]'.* differs from 'bases\[0\]'"):
        merge_tensor_list([base], [[models[0]], [models[1].half()]], "ties")
    with pytest.raises(ValueError, match=r"'epsilons': must be >= 0"):
        merge_tensors(base, models, "della", densities=0.5, epsilons=-0.1)
    with pytest.raises(ValueError, match="shape"):
        merge_tensors(base, [*models, torch.randn(6)], "ties")
    with pytest.raises(ValueError, match="rescale must be one of"):
        merge_tensors(base, models, "ties", rescale="l2")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"densities": 0.3}),
        ("dare_ties", {"densities": 0.5, "seed": 3}),
        ("dare_linear", {"densities": 0.5, "rescale": "l1"}),
        ("task_arithmetic", {"lam": 0.7}),
        ("breadcrumbs", {"densities": 0.8, "gammas": 0.05}),
        ("della", {"densities": 0.4}),
        ("ties", {"densities": 0.3, "tie": "exact_k"}),
        ("linear", {}),
        ("model_stock", {}),
    ],
)
def test_merge_into_out(dtype, method, params):
    # out= writes into the caller's buffer (the streaming engine reuses one): same values as a
    # fresh result, in the buffer's dtype, for the native paths and the copied ones alike.
    base, models = models_like((37, 129), dtype, "cpu")
    for out_dtype in (dtype, torch.float32):
        expected = merge_tensors(base, models, method, out_dtype=out_dtype, **params)
        out = torch.full(base.shape, 7.0, dtype=out_dtype)
        got = merge_tensors(base, models, method, out=out, **params)
        assert got is out and torch.equal(out, expected), out_dtype


def test_merge_into_bad_out():
    base, models = models_like((5, 8), torch.float32, "cpu")
    bad = [
        (torch.empty(8, 5), "shape \\[8, 5\\], the inputs have \\[5, 8\\]"),
        (torch.empty(8, 5).t(), "must be contiguous"),
        (torch.empty(5, 8, dtype=torch.int32), "dtype torch.int32 is not a floating dtype"),
        (base, "shares memory with an input"),
        (models[2], "shares memory with an input"),
        (torch.empty(5, 8, device="meta"), "on meta, the inputs on cpu"),
    ]
    for out, message in bad:
        with pytest.raises(ValueError, match="argument 'out': " + message):
            merge_tensors(base, models, "ties", densities=0.5, out=out)
    with pytest.raises(ValueError, match=r"dtype torch\.float32, but out_dtype=torch\.float16"):
        merge_tensors(base, models, "ties", out=torch.empty(5, 8), out_dtype=torch.float16)
    with pytest.raises(TypeError, match="expected a Tensor"):
        merge_tensors(base, models, "ties", out=[0.0] * 40)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_out_overlap_is_by_bytes(method):
    """``out`` is refused only when its bytes overlap an input's: empty tensors (all with data
    pointer 0) never do, and a disjoint slice of an input's buffer is accepted."""
    empty = torch.zeros(0)
    got = merge_tensors(empty, [empty, empty.clone()], method, out=torch.empty(0))
    assert got.shape == (0,)
    buf = torch.zeros(30)
    base, out = buf[0:10], buf[20:30]
    models = [torch.full((10,), 1.0), torch.full((10,), 2.0)]
    expected = merge_tensors(base, models, method)
    assert merge_tensors(base, models, method, out=out) is out
    assert torch.equal(buf[20:30], expected)
    with pytest.raises(ValueError, match="shares memory with an input"):
        merge_tensors(buf[0:10], models, method, out=buf[5:15])


def test_out_overlap_of_two_storages_over_the_same_memory():
    """Separate storages over overlapping memory (torch.from_numpy of an array and of a slice
    of it: two storages, two data pointers) are compared by their elements, not taken as
    disjoint because their storages differ: an overlap is refused, a disjoint slice accepted."""
    np = pytest.importorskip("numpy")
    array = np.zeros(30, dtype=np.float32)
    a, b = torch.from_numpy(array), torch.from_numpy(array[5:])  # b[i] is a[i + 5]
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    models = [torch.full((10,), 1.0), torch.full((10,), 2.0)]
    with pytest.raises(ValueError, match="shares memory with an input"):
        merge_tensors(a[0:10], models, "task_arithmetic", out=b[0:10])
    out = merge_tensors(a[0:10], models, "task_arithmetic", out=b[10:20])
    assert out.tolist() == [3.0] * 10
    assert array[15:25].tolist() == [3.0] * 10
    with pytest.raises(ValueError, match="shares memory with an input"):
        merge_tensors(torch.zeros(10), [models[0], b[:10]], "ties", out=a[14:24])


def test_out_may_not_alias_a_model_but_may_alias_base():
    base, models = models_like((4099,), torch.float32, "cpu")
    C = _native._C
    expected = merge_tensors(base, models, "task_arithmetic")
    b = base.clone()
    C.task_merge(
        b, models, b, [1.0] * 3, [1.0] * 3, None, None, 0, None, "none", "none", False, 1.0
    )
    assert torch.equal(b, expected)
    with pytest.raises(ValueError, match="not one of the models"):
        C.task_merge(
            base,
            models,
            models[1],
            [1.0] * 3,
            [1.0] * 3,
            None,
            None,
            0,
            None,
            "none",
            "none",
            False,
            1.0,
        )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpu_for_every_native_method(dtype):
    base, models = models_like((1000, 333), dtype, "cpu", seed=9)
    for method, kw in CASES:
        cpu = merge_tensors(base, models, method, **kw)
        cuda = merge_tensors(base.cuda(), [m.cuda() for m in models], method, **kw)
        assert torch.equal(cuda.cpu(), cpu), method


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("dare_ties", {"densities": 0.4, "seed": 5}),
        ("dare_linear", {"densities": 0.6, "seed": 2}),
        ("ties", {"densities": 0.3, "rescale": "l1"}),
    ],
    ids=lambda v: str(v),
)
def test_cuda_l1_factors_are_the_cpus_bit_for_bit(method, kw):
    """The L1 rescale sums |tau| in the CPU's order on CUDA too (chunks of 2^14 elements, 32
    interleaved double lanes each, chunks added in order): float32 task vectors whose magnitudes
    span 16 decades, where another order changes the factor's last bits (and with them every
    output), over a length that ends inside a chunk and inside a lane group."""
    g = torch.Generator().manual_seed(21)
    n = 3 * 16384 + 77
    base = torch.randn(n, generator=g)
    models = []
    for _ in range(3):
        mag = torch.pow(10.0, torch.rand(n, generator=g) * 16 - 8)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        models.append(base + sign * mag)
    cpu = merge_tensors(base, models, method, **kw)
    cuda = merge_tensors(base.cuda(), [m.cuda() for m in models], method, **kw)
    assert torch.equal(cuda.cpu(), cpu)
    listed = merge_tensor_list(
        [base.cuda(), base[:100].cuda()],
        [[m.cuda(), m[:100].cuda()] for m in models],
        method,
        tensor_indices=[0, 1],
        **kw,
    )
    assert torch.equal(listed[0].cpu(), cpu)


@pytest.mark.cuda
def test_cuda_workspace_may_not_share_memory_with_the_tensors():
    """merge_many's and magnitude_select's float64 workspaces are scratch: one that shares bytes
    with an input or an output is refused by name (the kernels would overwrite it)."""
    base, models = models_like((1 << 14,), torch.float32, "cuda", seed=6)
    out = torch.empty_like(base)
    stream = _native.stream_of(base.device)
    for ws in (out.view(torch.float64), models[1].view(torch.float64)):
        with pytest.raises(ValueError, match=r"'workspace'.*overlaps"):
            _native._C.merge_many(
                [base],
                [[m] for m in models],
                [out],
                [1.0] * 3,
                [0.5] * 3,
                None,
                "magnitude",
                "sum",
                False,
                "l1",
                1.0,
                0,
                [0],
                ws,
                stream,
            )
    with pytest.raises(ValueError, match=r"'workspace'.*overlaps"):
        _native._C.magnitude_select(models, [base] * 3, 100, base.view(torch.float64), stream)


@pytest.mark.cuda
def test_cuda_merge_writes_every_element_of_unaligned_views():
    base, models = models_like((4101,), torch.bfloat16, "cuda", seed=4)
    views = [m[1:] for m in models]
    got = merge_tensors(base[1:], views, "ties", densities=0.3)
    expected = merge_tensors(base[1:].cpu(), [v.cpu() for v in views], "ties", densities=0.3)
    assert torch.equal(got.cpu(), expected)
    out = poison(torch.empty(4100, device="cuda"))
    _native._C.task_merge(
        base[1:], views, out, [1.0] * 3, [1.0] * 3, None, None, 0, None, "none", "none", False, 1.0
    )
    assert not out.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    base, models = models_like((33, 7), torch.float32, device)
    args = (
        base,
        models,
        "ties",
        [1.0] * 3,
        [0.5] * 3,
        [0.01] * 3,
        [0.15] * 3,
        1.0,
        True,
        "none",
        "keep_ties",
        "sum",
        0,
        0,
        None,
        None,
    )
    torch.library.opcheck(torch.ops.meldkit.merge_tensors.default, args)
    args = (
        base,
        models,
        "dare_ties",
        [1.0] * 3,
        [0.5] * 3,
        [0.01] * 3,
        [0.15] * 3,
        1.0,
        False,
        "l1",
        "keep_ties",
        "count",
        3,
        5,
        None,
        torch.bfloat16,
    )
    torch.library.opcheck(torch.ops.meldkit.merge_tensors.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_breadcrumbs_masks_across_blocks(device, dtype):
    """The band selection on 200k elements (the CPU kernel's blocks are 2^15): tie groups of tens
    of thousands at both boundaries, their kept ranks straddling blocks, against the
    reference's sorted mask; also with both boundaries in one tie group."""
    from meldkit.ops.merge import _breadcrumbs_model

    g = torch.Generator().manual_seed(12)
    n = 200_003
    base = torch.randn(n, generator=g, dtype=torch.float64)
    steps = torch.randint(-8, 9, (n,), generator=g).to(torch.float64) / 32
    theta = (base + steps).to(dtype)
    base = base.to(dtype)
    tau = theta.double() - base.double()
    for density, gamma in [(0.8, 0.05), (0.37, 0.21), (0.95, 0.0), (0.02, 0.5)]:
        mask = mr.breadcrumbs_mask_ref(tau.float(), density, gamma)
        want = torch.where(mask | (tau == 0), theta, base)
        got = _breadcrumbs_model(base.to(device), theta.to(device), density, gamma)
        assert torch.equal(got.cpu(), want), (density, gamma)


def test_exact_k_native_equals_reference_on_large_tied_tensors():
    from meldkit.ops.merge import _exact_k_model

    # Over 2^20 elements the selection takes the sampled bracket, and the fused pass keeps the
    # ties at each model's threshold up to its cutoff index: tiles before it in registers,
    # after it with the next float up as threshold, the one it falls in split. bf16: few
    # distinct magnitudes, so thresholds fall on the bracket's ends (whose ties the selection's
    # pass counts per block); float32 on a grid of 2^-12: many distinct magnitudes with ties,
    # so thresholds fall inside it (a counting pass finds the cutoff).
    g = torch.Generator().manual_seed(5)
    n = (1 << 20) + 4099
    b16 = torch.randn(n, generator=g).to(torch.bfloat16)
    m16 = [(b16.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(3)]
    b32 = torch.randn(n, generator=g)
    m32 = [b32 + torch.round(0.02 * torch.randn(n, generator=g) * 4096) / 4096 for _ in range(3)]
    for (base, models), densities in [
        ((b16, m16), [0.3, 0.3, 0.3]),
        ((b16, m16), [0.05, 0.5, 0.9]),
        ((b32, m32), [0.3, 0.3, 0.3]),
        ((b32, m32), [0.05, 0.5, 0.9]),
    ]:
        kw = {"densities": densities, "tie": "exact_k"}
        got = merge_tensors(base, models, "ties", **kw)
        assert torch.equal(got, reference(base, models, "ties", kw, None)), densities
        keep_ties = merge_tensors(base, models, "ties", densities=densities)
        assert not torch.equal(got, keep_ties)  # the ties at the thresholds mattered
        # The path of other devices (CUDA): each model masked by tensor ops, then merged
        # without masks; run here on the CPU tensors.
        for x, d in zip(models, densities, strict=True):
            mask = mr.magnitude_mask_ref(x.float() - base.float(), d, tie="exact_k")
            assert torch.equal(_exact_k_model(base, x, d), torch.where(mask, x, base)), d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_k_model_keeps_every_tie_or_the_first_ones(dtype):
    """The path of other devices (CUDA) for ``tie="exact_k"``, on CPU tensors: when every entry
    tied with the threshold is kept (no ties beyond it: continuous values) and when only the
    first ones in index order are (many ties: bf16, or values on a grid), the reference's mask."""
    from meldkit.ops.merge import _exact_k_model

    g = torch.Generator().manual_seed(8)
    base = torch.randn(6000, generator=g)
    smooth = base + 0.01 * torch.randn(6000, generator=g)
    grid = base + torch.round(torch.randn(6000, generator=g) * 8) / 64
    for x in (smooth, grid):
        b, x = base.to(dtype), x.to(dtype)
        for d in (0.01, 0.3, 0.77):
            mask = mr.magnitude_mask_ref(x.float() - b.float(), d, tie="exact_k")
            assert torch.equal(_exact_k_model(b, x, d), torch.where(mask, x, b)), (d, dtype)


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_inverse_density_rescale_at_density_zero(method):
    base, models = models_like((31, 17), torch.float32, "cpu")
    kw = dict(densities=[0.0, 0.5, 0.0], rescale="inverse_density", seed=2)
    got = merge_tensors(base, models, method, **kw)
    assert torch.equal(got, reference(base, models, method, kw, None))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("device", DEVICES)
def test_exact_k_keeps_at_least_one_entry(device):
    base, models = models_like((7, 13), torch.float32, device)
    kw = {"densities": 0.005, "tie": "exact_k"}  # k = int(91·0.005) = 0
    got = merge_tensors(base, models, "ties", **kw)
    expected = reference(base.cpu(), [m.cpu() for m in models], "ties", kw, None)
    assert torch.equal(got.cpu(), expected)
    assert int((got != base).sum()) >= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("densities", [0.0, [0.0, 0.5]], ids=["all_zero", "one_zero"])
def test_exact_k_at_density_0_keeps_no_infinite_entry(device, densities):
    """Density 0 under the exactly-k rule keeps nothing, not even an entry whose |τ| is +inf
    (equal to the keep-nothing threshold): a model that keeps none must contribute none, as in
    the reference, on every backend."""
    base, models = models_like((5, 9), torch.float32, device, n=2)
    models[0][1, 2] = float("inf")
    models[0][3, 4] = float("-inf")
    kw = {"densities": densities, "tie": "exact_k"}
    got = merge_tensors(base, models, "ties", **kw)
    expected = reference(base.cpu(), [m.cpu() for m in models], "ties", kw, None)
    assert torch.isfinite(expected).all()
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_k_is_the_same_on_every_device(device):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(300_001, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(base.shape, generator=g)).to(torch.bfloat16)]
    models.append((base.float() + 0.02 * torch.randn(base.shape, generator=g)).to(torch.bfloat16))
    want = merge_tensors(base, models, "ties", densities=[0.3, 0.6], tie="exact_k")
    got = merge_tensors(
        base.to(device), [x.to(device) for x in models], "ties", densities=[0.3, 0.6], tie="exact_k"
    )
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["ties", "ties_like_sum"])
def test_exact_k_native_equals_reference(dtype, method):
    """TIES with tie="exact_k" on the CPU (one selection, the band pass keeping the first ties by
    index) merges exactly as the reference: tie-heavy task vectors (200k elements, several of
    the band pass's blocks), sparse ones, and densities 0, 1 and in between."""
    kw = {"normalize": False, "lam": 1.3} if method == "ties_like_sum" else {}
    g = torch.Generator().manual_seed(21)
    n = 200_003
    base64 = torch.randn(n, generator=g, dtype=torch.float64)
    steps = torch.randint(-8, 9, (3, n), generator=g).to(torch.float64) / 32
    steps[2] *= torch.rand(n, generator=g) < 0.2  # a sparse fine-tune: most |τ| = 0
    base = base64.to(dtype)
    models = [(base64 + s).to(dtype) for s in steps]
    m = get_method("ties")
    for density in (0.0, 0.07, 0.5, 0.93, 1.0):
        got = merge_tensors(base, models, "ties", densities=density, tie="exact_k", **kw)
        expected = mr.generalized_merge_ref(
            base,
            models,
            weights=[1.0] * 3,
            densities=[density] * 3,
            sparsify="magnitude",
            consensus=m.consensus,
            normalize=kw.get("normalize", m.normalize),
            lam=kw.get("lam", 1.0),
            tie="exact_k",
        )
        assert torch.equal(got, expected), density


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_sign_election_by_count(device, method, monkeypatch):
    """consensus="count" elects the sign most models vote for, "sum" (the default) the sign of
    the mass: τ = (+1, +1, −5) at one element gives +1 (the mean of the two agreeing) by count
    and −5 by mass, on every sign-electing method and backend, through merge_tensors and
    merge_tensor_list alike (DELLA on CUDA through its reference, asked for: it has no CUDA
    kernel, so the GPU check's MELDKIT_BACKEND=native would refuse it)."""
    if device == "cuda" and method == "della":
        monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    base = torch.zeros(4, device=device)
    models = [
        base + torch.tensor(v, device=device)
        for v in ([1.0, 2, 0, 0], [1.0, 2, 0, 0], [-5.0, -1, 0, 0])
    ]
    kw = dict(densities=1.0, seed=0)
    if method == "della":
        kw["epsilons"] = 0.0
    if method == "breadcrumbs_ties":
        kw["gammas"] = 0.0
    # rescale "none": every entry kept as is (density 1), so the votes are the raw deltas.
    kw.update(rescale="none", normalize=True)
    by_mass = merge_tensors(base, models, method, **kw)
    by_count = merge_tensors(base, models, method, consensus="count", **kw)
    assert by_mass.cpu().tolist() == pytest.approx([-5.0, 2.0, 0, 0])
    assert by_count.cpu().tolist() == pytest.approx([1.0, 2.0, 0, 0])
    assert torch.equal(merge_tensors(base, models, method, consensus="sum", **kw), by_mass)
    many = merge_tensor_list(
        [base, base], [[x, x] for x in models], method, consensus="count", **kw
    )
    assert all(torch.equal(x, by_count) for x in many)


def test_consensus_argument_errors():
    base, models = models_like((6,), torch.float32, "cpu")
    with pytest.raises(
        ValueError, match=r"argument 'consensus'.*'task_arithmetic' elects no signs"
    ):
        merge_tensors(base, models, "task_arithmetic", consensus="count")
    with pytest.raises(ValueError, match=r"argument 'consensus'.*'sum'.*'count'.*got 'mass'"):
        merge_tensors(base, models, "ties", consensus="mass")
    with pytest.raises(TypeError, match="argument 'consensus'"):
        merge_tensor_list([base], [[x] for x in models], "ties", consensus=1)


@pytest.mark.parametrize(
    ("method", "kw"),
    [("ties", {}), ("ties", {"tie": "keep_ties"}), ("breadcrumbs", {"gammas": 0.25})],
)
@pytest.mark.parametrize("how", ["float64", "reference"])
@pytest.mark.filterwarnings("ignore::meldkit.MeldkitFallbackWarning")
def test_the_reference_refuses_nan_where_magnitudes_are_ranked(method, kw, how, monkeypatch):
    # The paths that run the reference (float64 inputs, MELDKIT_BACKEND=reference) merged NaN
    # silently where the kernels refuse it; at density 1 (nothing ranked) NaN merges as NaN.
    from meldkit.ops import magnitude_threshold

    dtype = torch.float64 if how == "float64" else torch.float32
    if how == "reference":
        monkeypatch.setenv("MELDKIT_BACKEND", "reference")
    base = torch.zeros(4, dtype=dtype)
    models = [torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)]
    models.append(torch.tensor([1.0, float("nan"), 3.0, 4.0], dtype=dtype))
    with pytest.raises(ValueError, match=r"cannot rank NaN, and models\[1\] holds NaN"):
        merge_tensors(base, models, method, densities=0.5, **kw)
    with pytest.raises(ValueError, match=r"magnitude_threshold: 'tensors\[0\]' holds NaN"):
        magnitude_threshold([models[1]], 0.5)
    out = merge_tensors(base, models, method, densities=1.0, **kw)
    assert torch.isnan(out[1]) and not torch.isnan(out[[0, 2, 3]]).any()


@pytest.mark.parametrize("rescale", ["l1", "none", "inverse_density"])
@pytest.mark.filterwarnings("ignore::meldkit.MeldkitFallbackWarning")
def test_della_on_a_tensor_with_an_empty_dimension(rescale, monkeypatch):
    for backend in ("auto", "reference"):
        monkeypatch.setenv("MELDKIT_BACKEND", backend)
        base = torch.zeros(4, 0)
        out = merge_tensors(
            base, [base, base], "della", densities=0.5, epsilons=0.1, rescale=rescale
        )
        assert out.shape == (4, 0)


def test_parameters_that_require_grad_merge_into_a_plain_tensor():
    # Merging makes new weights: a backward through the result failed with torch's "no
    # autograd formula" error; the result now requires no grad.
    base = torch.nn.Parameter(torch.zeros(6))
    models = [torch.nn.Parameter(torch.randn(6)) for _ in range(2)]
    out = merge_tensors(base, models, "ties", densities=0.5)
    assert not out.requires_grad
    want = merge_tensors(base.detach(), [m.detach() for m in models], "ties", densities=0.5)
    assert torch.equal(out, want)
    (listed,) = merge_tensor_list([base], [[m] for m in models], "ties", densities=0.5)
    assert not listed.requires_grad and torch.equal(listed, want)
    into = torch.nn.Parameter(torch.empty(6))  # a model's weight, merged into in place
    assert merge_tensors(base, models, "ties", densities=0.5, out=into) is into
    assert torch.equal(into.detach(), want) and into.requires_grad
