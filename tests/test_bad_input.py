"""Property test: every binding of meldkit._C turns bad arguments into a clean Python exception.

Hypothesis builds a valid call, then corrupts one argument (wrong dtype, mismatched shape, mixed
devices, non-contiguous, empty, read-only, aliased, not a tensor at all, ...). Each corrupted call
must raise TypeError or ValueError naming the op — never crash, hang, or write into its inputs.
A later op adds its binding by adding a `BindingSpec` to `BINDINGS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meldkit import _native

pytestmark = pytest.mark.skipif(_native._C is None, reason="meldkit._C is not built")

_C = _native._C
BAD_DTYPES = [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64]


@dataclasses.dataclass
class BindingSpec:
    """A binding, a builder of valid arguments, and the corruptions that apply to it."""

    name: str
    call: Callable[[dict], None]
    valid: Callable[[st.DrawFn, str], dict]
    corruptions: dict[str, Callable[[st.DrawFn, dict, str], dict]]


# ---- weighted_sum ------------------------------------------------------------------------------


def _ws_valid(draw, device):
    n = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    tensors = [torch.randn(shape).to(device, dtype) for _ in range(n)]
    weights = [draw(st.floats(-4, 4)) for _ in range(n)]
    out = torch.empty(shape, dtype=dtype, device=device)
    return {"tensors": tensors, "weights": weights, "out": out, "workspace": None, "stream": 0}


def _ws_call(a):
    _C.weighted_sum(a["tensors"], a["weights"], a["out"], a["workspace"], a["stream"])


def _replace_input(draw, a, make):
    i = draw(st.integers(0, len(a["tensors"]) - 1))
    a["tensors"] = [make(t) if j == i else t for j, t in enumerate(a["tensors"])]
    return a


def _other_device(t):
    # Without a GPU the meta device plays the other device: it exports no DLPack at all.
    return (
        t.to("cpu")
        if t.device.type == "cuda"
        else t.to("cuda" if torch.cuda.is_available() else "meta")
    )


def _at_least_2x3(a):
    # Size-1 dims make any stride contiguous: give the call a shape where layout matters.
    t = a["tensors"][0]
    a["tensors"] = [torch.randn(2, 3).to(t) for _ in a["tensors"]]
    a["out"] = torch.empty(2, 3, dtype=a["out"].dtype, device=a["out"].device)


def _ws_corruptions():
    def wrong_dtype(draw, a, device):
        dtype = draw(st.sampled_from(BAD_DTYPES))
        return _replace_input(draw, a, lambda t: torch.ones(t.shape, dtype=dtype, device=t.device))

    def mixed_dtypes(draw, a, device):
        a["tensors"] = [*a["tensors"], a["tensors"][0].to(torch.float64)]
        a["weights"] = [*a["weights"], 1.0]
        return a

    def mismatched_shape(draw, a, device):
        return _replace_input(draw, a, lambda t: torch.randn(t.numel() + 1).to(t))

    def mixed_devices(draw, a, device):
        return _replace_input(draw, a, _other_device)

    def non_contiguous(draw, a, device):
        _at_least_2x3(a)
        return _replace_input(draw, a, lambda t: t.t().contiguous().t())

    def empty_list(draw, a, device):
        a["tensors"], a["weights"] = [], []
        return a

    def not_a_tensor(draw, a, device):
        bad = draw(st.sampled_from([None, 3, "tensor", [1.0, 2.0], object()]))
        return _replace_input(draw, a, lambda t: bad)

    def tensors_not_a_list(draw, a, device):
        a["tensors"] = draw(st.sampled_from([None, 1.5, "abc", a["tensors"][0]]))
        return a

    def weight_count(draw, a, device):
        a["weights"] = a["weights"] + [1.0] if draw(st.booleans()) else a["weights"][:-1]
        return a

    def weight_not_finite(draw, a, device):
        i = draw(st.integers(0, len(a["weights"]) - 1))
        a["weights"][i] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300]))
        return a

    def weight_not_a_number(draw, a, device):
        a["weights"] = draw(st.sampled_from([None, "1,2", [object()] * len(a["tensors"])]))
        return a

    def out_wrong_shape(draw, a, device):
        a["out"] = torch.empty(a["out"].numel() + 2, dtype=a["out"].dtype, device=a["out"].device)
        return a

    def out_wrong_dtype(draw, a, device):
        a["out"] = torch.empty(
            a["out"].shape, dtype=draw(st.sampled_from(BAD_DTYPES)), device=device
        )
        return a

    def out_other_device(draw, a, device):
        a["out"] = _other_device(a["out"])
        return a

    def out_non_contiguous(draw, a, device):
        _at_least_2x3(a)
        a["out"] = a["out"].t().contiguous().t()
        return a

    def out_read_only(draw, a, device):
        arr = np.zeros(a["out"].shape, dtype=np.float32)
        arr.setflags(write=False)
        a["tensors"] = [t.cpu().float() for t in a["tensors"]]
        a["out"] = arr
        return a

    def out_overlaps_input(draw, a, device):
        _at_least_2x3(a)
        t = a["tensors"][0]
        flat = torch.randn(2 * t.numel() + 1).to(t)
        a["tensors"] = [flat[: t.numel()].view(t.shape) for _ in a["tensors"]]
        a["out"] = flat[1 : t.numel() + 1].view(t.shape)
        return a

    def out_none(draw, a, device):
        a["out"] = None
        return a

    def bad_workspace(draw, a, device):
        if device != "cuda":
            # No workspace is needed on the CPU; a bad stream value is this case's corruption.
            a["stream"] = "default"
            return a
        _at_least_2x3(a)  # so that a one-element workspace is too small
        n = _C.WEIGHTED_SUM_MAX_INPUTS_PER_LAUNCH + 1
        a["tensors"] = [a["tensors"][0]] * n
        a["weights"] = [1.0] * n
        a["workspace"] = draw(
            st.sampled_from(
                [
                    None,
                    torch.empty(1, device=device),
                    torch.empty(a["out"].shape, dtype=torch.float16, device=device),
                ]
            )
        )
        return a

    return {
        f.__name__: f
        for f in (
            wrong_dtype,
            mixed_dtypes,
            mismatched_shape,
            mixed_devices,
            non_contiguous,
            empty_list,
            not_a_tensor,
            tensors_not_a_list,
            weight_count,
            weight_not_finite,
            weight_not_a_number,
            out_wrong_shape,
            out_wrong_dtype,
            out_other_device,
            out_non_contiguous,
            out_read_only,
            out_overlaps_input,
            out_none,
            bad_workspace,
        )
    }


# ---- task_merge and magnitude_select ----------------------------------------------------------


def _tm_valid(draw, device):
    n = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    base = torch.randn(shape).to(device, dtype)
    sparsify = draw(st.sampled_from(["none", "magnitude", "random"]))
    return {
        "base": base,
        "models": [torch.randn(shape).to(device, dtype) for _ in range(n)],
        "out": torch.empty(shape, dtype=dtype, device=device),
        "weights": [1.0] * n,
        "scales": [1.0] * n,
        "thresholds": [0.5] * n if sparsify == "magnitude" else None,
        "densities": [0.5] * n if sparsify == "random" else None,
        "seed": draw(st.integers(0, 2**63)),
        "streams": list(range(n)) if sparsify == "random" else None,
        "sparsify": sparsify,
        "consensus": draw(st.sampled_from(["none", "sum", "count"])),
        "normalize": draw(st.booleans()),
        "lam": 1.0,
    }


def _tm_call(a):
    _C.task_merge(
        a["base"],
        a["models"],
        a["out"],
        a["weights"],
        a["scales"],
        a["thresholds"],
        a["densities"],
        a["seed"],
        a["streams"],
        a["sparsify"],
        a["consensus"],
        a["normalize"],
        a["lam"],
    )


def _tm_corruptions():
    def model_dtype(draw, a, device):
        a["models"][0] = a["models"][0].to(draw(st.sampled_from([torch.float64, torch.int32])))
        return a

    def model_shape(draw, a, device):
        a["models"][-1] = torch.randn(a["base"].numel() + 1).to(a["base"])
        return a

    def model_device(draw, a, device):
        a["models"][0] = _other_device(a["models"][0])
        return a

    def no_models(draw, a, device):
        a["models"] = []
        return a

    def too_many_models(draw, a, device):
        n = _C.MERGE_MAX_MODELS + 1
        a["models"] = [a["base"]] * n
        a["weights"] = a["scales"] = [1.0] * n
        a["sparsify"], a["thresholds"], a["densities"], a["streams"] = "none", None, None, None
        return a

    def bad_mode(draw, a, device):
        key = draw(st.sampled_from(["sparsify", "consensus"]))
        a[key] = "median"
        return a

    def missing_mask_args(draw, a, device):
        a["sparsify"] = draw(st.sampled_from(["magnitude", "random"]))
        a["thresholds"] = a["densities"] = a["streams"] = None
        return a

    def bad_density(draw, a, device):
        n = len(a["models"])
        a["sparsify"], a["streams"] = "random", list(range(n))
        a["densities"] = [draw(st.sampled_from([-0.1, 1.5, float("nan")]))] * n
        return a

    def weight_count(draw, a, device):
        a["weights"] = a["weights"] + [1.0]
        return a

    def out_is_a_model(draw, a, device):
        a["out"] = a["models"][0]
        return a

    def out_shape(draw, a, device):
        a["out"] = torch.empty(a["base"].numel() + 3, dtype=a["base"].dtype, device=device)
        return a

    def non_contiguous_base(draw, a, device):
        a["base"] = torch.randn(3, 4).to(a["base"]).t()
        a["models"] = [torch.randn(4, 3).to(a["base"]) for _ in a["models"]]
        a["out"] = torch.empty(4, 3, dtype=a["base"].dtype, device=device)
        return a

    return {
        f.__name__: f
        for f in (
            model_dtype,
            model_shape,
            model_device,
            no_models,
            too_many_models,
            bad_mode,
            missing_mask_args,
            bad_density,
            weight_count,
            out_is_a_model,
            out_shape,
            non_contiguous_base,
        )
    }


def _mm_valid(draw, device):
    n = draw(st.integers(1, 3))
    j = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    shapes = [tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=2))) for _ in range(j)]
    return {
        "bases": [torch.randn(s).to(device, dtype) for s in shapes],
        "models": [[torch.randn(s).to(device, dtype) for s in shapes] for _ in range(n)],
        "outs": [torch.empty(s, dtype=dtype, device=device) for s in shapes],
        "weights": [1.0] * n,
        "densities": [0.5] * n,
        "thresholds": None,
        "sparsify": draw(st.sampled_from(["none", "magnitude", "random"])),
        "consensus": draw(st.sampled_from(["none", "sum", "count"])),
        "normalize": draw(st.booleans()),
        "rescale": draw(st.sampled_from(["none", "inverse_density", "l1"])),
        "lam": 1.0,
        "seed": draw(st.integers(0, 2**63)),
        "tensor_indices": list(range(j)),
        "workspace": None,
    }


def _mm_call(a):
    ws = a["workspace"]
    if ws is None and a["bases"] and isinstance(a["bases"][0], torch.Tensor):
        if a["bases"][0].device.type == "cuda":
            most = max(b.numel() for b in a["bases"])
            numel = _C.merge_many_workspace_numel(len(a["models"]), most)
            ws = torch.empty(numel, dtype=torch.float64, device="cuda")
    _C.merge_many(
        a["bases"],
        a["models"],
        a["outs"],
        a["weights"],
        a["densities"],
        a["thresholds"],
        a["sparsify"],
        a["consensus"],
        a["normalize"],
        a["rescale"],
        a["lam"],
        a["seed"],
        a["tensor_indices"],
        ws,
    )


def _mm_corruptions():
    def model_count_per_position(draw, a, device):
        a["models"][0] = a["models"][0][:-1]
        return a

    def model_shape(draw, a, device):
        a["models"][-1][0] = torch.randn(a["bases"][0].numel() + 1).to(a["bases"][0])
        return a

    def model_dtype(draw, a, device):
        a["models"][0][-1] = a["models"][0][-1].to(torch.float64)
        return a

    def mixed_devices(draw, a, device):
        a["bases"] = [*a["bases"], _other_device(a["bases"][0])]
        a["models"] = [[*ms, _other_device(ms[0])] for ms in a["models"]]
        a["outs"] = [*a["outs"], _other_device(a["outs"][0])]
        a["tensor_indices"] = list(range(len(a["bases"])))
        return a

    def no_bases(draw, a, device):
        a["bases"], a["outs"], a["tensor_indices"] = [], [], []
        a["models"] = [[] for _ in a["models"]]
        return a

    def out_is_a_model(draw, a, device):
        a["outs"][0] = a["models"][0][0]
        return a

    def out_count(draw, a, device):
        a["outs"] = a["outs"][1:]
        return a

    def index_count(draw, a, device):
        a["tensor_indices"] = [*a["tensor_indices"], 0]
        return a

    def bad_density(draw, a, device):
        a["densities"][0] = draw(st.sampled_from([-0.1, 1.5, float("nan")]))
        return a

    def bad_rescale(draw, a, device):
        a["rescale"] = "l2"
        return a

    def nan_threshold(draw, a, device):
        a["thresholds"] = [float("nan")] * len(a["models"])
        return a

    return {
        f.__name__: f
        for f in (
            model_count_per_position,
            model_shape,
            model_dtype,
            mixed_devices,
            no_bases,
            out_is_a_model,
            out_count,
            index_count,
            bad_density,
            bad_rescale,
            nan_threshold,
        )
    }


# ---- routed_lora forward and backward -----------------------------------------------------------


def _rl_valid(draw, device):
    n, din, dout = draw(st.integers(0, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    e, r = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    router = draw(st.booleans())
    f32 = dict(dtype=torch.float32, device=device)
    return {
        "x": torch.randn(n, din).to(device, dtype),
        "lora_a": torch.randn(e, r, din).to(device, dtype),
        "lora_b": torch.randn(e, dout, r).to(device, dtype),
        "scaling": torch.ones(e, **f32),
        "router_weight": torch.randn(e, din).to(device, dtype) if router else None,
        "gates": None if router else torch.rand(n, e).to(device, dtype),
        "top_k": draw(st.integers(1, e)) if router else 0,
        "dropout": draw(st.sampled_from([0.0, 0.1])),
        "seed": draw(st.integers(0, 2**63)),
        "y": torch.empty(n, dout, dtype=dtype, device=device),
        "probs": torch.empty(n, e, **f32) if router else None,
        "weights": torch.empty(n, e, **f32),
        "h": torch.empty(n, e * r, **f32),
        "backward": draw(st.booleans()),
    }


def _rl_call(a):
    if not a["backward"]:
        _C.routed_lora_forward(
            a["x"], a["lora_a"], a["lora_b"], a["scaling"], a["router_weight"], a["gates"],
            a["top_k"], a["dropout"], a["seed"], a["y"], a["probs"], a["weights"], a["h"],
        )  # fmt: skip
        return
    x, la, lb, rw = a["x"], a["lora_a"], a["lora_b"], a["router_weight"]
    empty = lambda t: torch.empty_like(t) if isinstance(t, torch.Tensor) else None  # noqa: E731
    g = a["gates"]
    _C.routed_lora_backward(
        a["y"], x, la, lb, a["scaling"], rw, a["weights"], a["probs"], None, a["h"], a["top_k"],
        a["dropout"], a["seed"], empty(x), empty(la), empty(lb), empty(rw),
        empty(g),
    )  # fmt: skip


def _rl_corruptions():
    def wrong_dtype(draw, a, device):
        name = draw(st.sampled_from(["x", "lora_a", "lora_b"]))
        a[name] = a[name].to(draw(st.sampled_from([torch.int32, torch.float64])))
        return a

    def rank_mismatch(draw, a, device):
        e, dout, r = a["lora_b"].shape
        a["lora_b"] = torch.randn(e, dout, r + 1).to(a["lora_b"])
        return a

    def d_in_mismatch(draw, a, device):
        e, r, din = a["lora_a"].shape
        a["lora_a"] = torch.randn(e, r, din + 1).to(a["lora_a"])
        return a

    def both_modes(draw, a, device):
        n, e = a["weights"].shape
        a["router_weight"] = torch.randn(e, a["x"].shape[1]).to(a["x"])
        a["gates"] = torch.rand(n, e).to(a["x"])
        return a

    def top_k_out_of_range(draw, a, device):
        e = a["lora_a"].shape[0]
        a["top_k"] = draw(st.sampled_from([-1, e + 1])) if a["router_weight"] is not None else 1
        return a

    def bad_dropout(draw, a, device):
        a["dropout"] = draw(st.sampled_from([-0.1, 1.0, float("nan")]))
        return a

    def scaling_shape(draw, a, device):
        a["scaling"] = torch.ones(a["lora_a"].shape[0] + 1, device=a["x"].device)
        return a

    def output_shape(draw, a, device):
        a["h"] = torch.empty(a["h"].shape[0], a["h"].shape[1] + 1, device=a["h"].device)
        return a

    def outputs_overlap(draw, a, device):
        n, er = a["h"].shape
        e = a["weights"].shape[1]
        if n == 0:  # nothing to overlap: a wrong shape instead
            a["h"] = torch.empty(1, 1, device=a["h"].device)
            return a
        a["backward"] = False  # h and weights are forward outputs (backward only reads them)
        buf = torch.empty(n * er + n * e, device=a["h"].device)
        a["h"] = buf[: n * er].view(n, er)
        a["weights"] = buf[n * er - 1 : n * er - 1 + n * e].view(n, e)  # shares h's last element
        return a

    def x_on_other_device(draw, a, device):
        a["x"] = _other_device(a["x"])
        return a

    def non_contiguous_x(draw, a, device):
        n, din = a["x"].shape
        a["x"] = torch.randn(max(n, 2), din, 2).to(a["x"])[..., 0]  # row stride 2·din
        return a

    def not_a_tensor(draw, a, device):
        a["lora_b"] = a["lora_b"].tolist()
        return a

    return {
        f.__name__: f
        for f in (
            wrong_dtype,
            rank_mismatch,
            d_in_mismatch,
            both_modes,
            top_k_out_of_range,
            bad_dropout,
            scaling_shape,
            output_shape,
            outputs_overlap,
            x_on_other_device,
            non_contiguous_x,
            not_a_tensor,
        )
    }


# ---- logit_fusion ------------------------------------------------------------------------------


def _lf_valid(draw, device):
    b, v, t = draw(st.integers(0, 4)), draw(st.integers(1, 40)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    n = draw(st.integers(1, 5))
    f32 = dict(dtype=torch.float32, device=device)
    return {
        "large": torch.randn(b, v).to(device, dtype),
        "small_base": torch.randn(b, v).to(device, dtype),
        "experts": torch.randn(t, b, v).to(device, dtype),
        "alphas": [0.1 * i for i in range(n)],
        "loss": torch.empty(b, t, n, **f32),
        "alpha": torch.empty(b, **f32),
        "expert": torch.empty(b, dtype=torch.int64, device=device),
        "logits": torch.empty(b, v, **f32) if draw(st.booleans()) else None,
    }


def _lf_call(a):
    _C.logit_fusion(
        a["large"], a["small_base"], a["experts"], a["alphas"], a["loss"], a["alpha"],
        a["expert"], a["logits"],
    )  # fmt: skip


def _lf_corruptions():
    def wrong_dtype(draw, a, device):
        name = draw(st.sampled_from(["large", "small_base", "experts"]))
        a[name] = a[name].to(draw(st.sampled_from([torch.int32, torch.int64, torch.float64])))
        return a

    def vocab_mismatch(draw, a, device):
        b, v = a["large"].shape
        a["small_base"] = torch.randn(b, v + 1).to(a["large"])
        return a

    def experts_2d(draw, a, device):
        a["experts"] = a["experts"][0]
        return a

    def empty_grid(draw, a, device):
        a["alphas"] = []
        return a

    def non_finite_alpha(draw, a, device):
        a["alphas"] = [float(draw(st.sampled_from(["nan", "inf"])))]
        return a

    def expert_not_int64(draw, a, device):
        a["expert"] = a["expert"].to(torch.int32)
        return a

    def loss_shape(draw, a, device):
        a["loss"] = torch.empty(1, 1, 1, 2, device=a["loss"].device)
        return a

    def output_dtype(draw, a, device):
        a["alpha"] = a["alpha"].to(torch.float16)
        return a

    def other_device(draw, a, device):
        a["experts"] = _other_device(a["experts"])
        return a

    def non_contiguous(draw, a, device):
        b, v = a["large"].shape
        a["large"] = torch.randn(max(b, 2), v, 2).to(a["large"])[..., 0]
        return a

    def empty_vocab(draw, a, device):
        b = a["large"].shape[0]
        for name in ("large", "small_base"):
            a[name] = a[name][:, :0]
        a["experts"] = a["experts"][:, :, :0]
        a["logits"] = None if a["logits"] is None else a["logits"][:, :0]
        a["large"] = a["large"].reshape(b, 0)
        return a

    return {
        f.__name__: f
        for f in (
            wrong_dtype,
            vocab_mismatch,
            experts_2d,
            empty_grid,
            non_finite_alpha,
            expert_not_int64,
            loss_shape,
            output_dtype,
            other_device,
            non_contiguous,
            empty_vocab,
        )
    }


def _ms_valid(draw, device):
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    a = [torch.randn(draw(st.integers(1, 50))).to(device, dtype) for _ in range(n)]
    total = sum(t.numel() for t in a)
    return {"a": a, "b": None, "k": draw(st.integers(1, total)), "workspace": None}


def _ms_call(args):
    ws = args["workspace"]
    if ws is None and args["a"] and isinstance(args["a"][0], torch.Tensor):
        if args["a"][0].device.type == "cuda":
            ws = torch.empty(_C.MAGNITUDE_SELECT_CUDA_WORKSPACE, dtype=torch.float64, device="cuda")
    _C.magnitude_select(args["a"], args["b"], args["k"], ws)


def _ms_corruptions():
    def k_out_of_range(draw, a, device):
        a["k"] = draw(st.sampled_from([0, -1, sum(t.numel() for t in a["a"]) + 1]))
        return a

    def nan_input(draw, a, device):
        a["a"][0] = a["a"][0].clone()
        a["a"][0][0] = float("nan")
        a["k"] = 1
        return a

    def b_mismatch(draw, a, device):
        a["b"] = [torch.randn(t.numel() + 1).to(t) for t in a["a"]]
        return a

    def b_count(draw, a, device):
        a["b"] = [t.clone() for t in a["a"]] + [a["a"][0].clone()]
        return a

    def wrong_dtype(draw, a, device):
        a["a"][0] = a["a"][0].to(torch.int64)
        return a

    def empty(draw, a, device):
        a["a"] = []
        return a

    def mixed_devices(draw, a, device):
        a["a"] = [*a["a"], _other_device(a["a"][0])]
        return a

    return {
        f.__name__: f
        for f in (
            k_out_of_range,
            nan_input,
            b_mismatch,
            b_count,
            wrong_dtype,
            empty,
            mixed_devices,
        )
    }


# ---- blend -------------------------------------------------------------------------------------


def _bl_valid(draw, device):
    n = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    shapes = [tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))) for _ in range(n)]
    bases = [torch.randn(s).to(device, dtype) for s in shapes]
    return {
        "outs": [torch.empty_like(b) for b in bases],
        "bases": bases,
        "taus": [torch.randn(b.shape).to(b) for b in bases],
        "dense": [b.dim() == 1 for b in bases],
        "g_table": [0.0, -0.5, 0.8, 0.3],
        "g_dense": 0.1,
        "keep1": draw(st.floats(0, 1)),
        "keep2": draw(st.floats(0, 1)),
        "seed": draw(st.integers(0, 2**64 - 1)),
        "streams1": [2 * i for i in range(n)],
        "streams2": [2 * i + 1 for i in range(n)],
    }


def _bl_call(a):
    rows, num_chunks = _C.blend_plan(
        a["outs"], a["bases"], a["taus"], a["dense"], a["streams1"], a["streams2"]
    )
    table = torch.tensor(rows, dtype=torch.int64).view(-1, 8).to(a["bases"][0].device)
    if a.get("bad_table") == "dtype":
        table = table.double()
    elif a.get("bad_table") == "shape":
        table = table[:, :7].contiguous()
    _C.blend_run(
        table,
        num_chunks,
        a["bases"][0],
        a["g_table"],
        a["g_dense"],
        a["keep1"],
        a["keep2"],
        True,
        True,
        a["seed"],
    )


def _bl_corruptions():
    def wrong_dtype(draw, a, device):
        a["bases"][0] = a["bases"][0].to(torch.int64)
        return a

    def tau_shape(draw, a, device):
        a["taus"][-1] = torch.randn(a["taus"][-1].numel() + 1).to(a["taus"][-1])
        return a

    def tau_dtype(draw, a, device):
        t = a["taus"][0]
        a["taus"][0] = t.to(torch.float16 if t.dtype != torch.float16 else torch.float32)
        return a

    def lengths(draw, a, device):
        key = draw(st.sampled_from(["outs", "taus", "dense", "streams1", "streams2"]))
        a[key] = a[key][:-1] if draw(st.booleans()) else [*a[key], a[key][0]]
        return a

    def non_finite(draw, a, device):
        a["g_dense"] = draw(st.sampled_from([float("nan"), float("inf")]))
        return a

    def out_is_tau(draw, a, device):
        a["outs"][0] = a["taus"][0]
        return a

    def bad_table(draw, a, device):
        a["bad_table"] = draw(st.sampled_from(["dtype", "shape"]))
        return a

    def mixed_devices(draw, a, device):
        a["taus"][0] = _other_device(a["taus"][0])
        return a

    def non_contiguous(draw, a, device):
        b = a["bases"][0]
        a["bases"][0] = torch.randn(2, 4).to(b).t()  # [4, 2], strides (1, 4)
        a["taus"][0] = torch.randn(4, 2).to(b)
        a["outs"][0] = torch.empty(4, 2).to(b)
        return a

    def empty(draw, a, device):
        for key in ("outs", "bases", "taus", "dense", "streams1", "streams2"):
            a[key] = []
        return a

    return {
        f.__name__: f
        for f in (
            wrong_dtype,
            tau_shape,
            tau_dtype,
            lengths,
            non_finite,
            out_is_tau,
            bad_table,
            mixed_devices,
            non_contiguous,
            empty,
        )
    }


# ---- routed_lora_dropout (the GEMM path's dropout masks) --------------------------------------


def _rd_valid(draw, device):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    src = torch.randn(draw(st.integers(0, 9)), draw(st.integers(1, 20)), dtype=dtype, device=device)
    return {
        "src": src,
        "out": torch.empty_like(src) if draw(st.booleans()) else src,
        "dropout": draw(st.floats(0.01, 0.99)),
        "seed": draw(st.integers(0, 2**64 - 1)),
        "expert": draw(st.integers(0, 2**32 - 1)),
    }


def _rd_call(a):
    _C.routed_lora_dropout(
        a["src"], a["out"], a["dropout"], a["seed"], a["expert"], _native.stream_of(a["src"].device)
    )


def _rd_corruptions():
    def not_compute_dtype(draw, a, device):
        dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.int64]))
        a["src"] = a["src"].to(dtype)
        a["out"] = torch.empty_like(a["src"])
        return a

    def out_mismatch(draw, a, device):
        src = a["src"]
        a["out"] = draw(
            st.sampled_from(
                [
                    torch.empty(src.shape[0] + 1, src.shape[1], dtype=src.dtype, device=device),
                    torch.empty_like(
                        src, dtype=torch.float64 if src.dtype == torch.float32 else torch.float32
                    ),
                    _other_device(torch.empty_like(src)),
                ]
            )
        )
        return a

    def not_two_dims(draw, a, device):
        a["src"] = a["src"].reshape(-1)
        a["out"] = torch.empty_like(a["src"])
        return a

    def non_contiguous(draw, a, device):
        a["src"] = torch.randn(6, 4, dtype=a["src"].dtype, device=device).t()
        a["out"] = torch.empty(4, 6, dtype=a["src"].dtype, device=device)
        return a

    def bad_dropout(draw, a, device):
        a["dropout"] = draw(st.sampled_from([0.0, 1.0, -0.5, 2.0, float("nan")]))
        return a

    def bad_expert(draw, a, device):
        a["expert"] = draw(st.sampled_from([-1, 2**32]))
        return a

    def out_overlaps_src(draw, a, device):
        # out one element past src in the same buffer: CUDA's grid-stride loop would race.
        rows, cols = max(a["src"].shape[0], 1), max(a["src"].shape[1], 2)
        flat = torch.randn(rows * cols + 1, dtype=a["src"].dtype, device=device)
        a["src"] = flat[: rows * cols].view(rows, cols)
        a["out"] = flat[1:].view(rows, cols)
        return a

    return {
        f.__name__: f
        for f in (
            not_compute_dtype,
            out_mismatch,
            not_two_dims,
            non_contiguous,
            bad_dropout,
            bad_expert,
            out_overlaps_src,
        )
    }


# ---- magnitude_histogram (CPU only: whole-model TIES's streamed selection) --------------------


def _mh_valid(draw, device):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    n = draw(st.integers(0, 60))
    base = torch.randn(n).to(dtype)
    return {
        "theta": (base.float() + torch.randn(n)).to(dtype),
        "base": base,
        "hist": torch.zeros(1 << 16, dtype=torch.int64),
        "prefix": draw(st.integers(-1, (1 << 16) - 1)),
    }


def _mh_call(a):
    _C.magnitude_histogram(a["theta"], a["base"], a["hist"], a["prefix"])


def _mh_corruptions():
    def wrong_dtype(draw, a, device):
        key = draw(st.sampled_from(["theta", "base"]))
        a[key] = a[key].to(draw(st.sampled_from([torch.int64, torch.float64])))
        return a

    def shape_mismatch(draw, a, device):
        a["base"] = torch.zeros(a["theta"].numel() + 1).to(a["theta"])
        return a

    def bad_hist(draw, a, device):
        a["hist"] = draw(
            st.sampled_from(
                [
                    torch.zeros(1 << 16, dtype=torch.int32),
                    torch.zeros(1 << 15, dtype=torch.int64),
                    torch.zeros(2, 1 << 16, dtype=torch.int64)[:, 0],
                ]
            )
        )
        return a

    def bad_prefix(draw, a, device):
        a["prefix"] = draw(st.sampled_from([-2, 1 << 16, -(1 << 40)]))
        return a

    def not_a_tensor(draw, a, device):
        a[draw(st.sampled_from(["theta", "base", "hist"]))] = [0.0, 1.0]
        return a

    return {
        f.__name__: f for f in (wrong_dtype, shape_mismatch, bad_hist, bad_prefix, not_a_tensor)
    }


# ---- band_select (CPU only: the CUDA path of Breadcrumbs is PyTorch ops) ----------------------


def _bs_valid(draw, device):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    n = draw(st.integers(2, 60))
    base = torch.randn(n).to(dtype)
    theta = (base.float() + torch.randn(n)).to(dtype)
    start = draw(st.integers(0, n - 1))
    stop = draw(st.integers(start + 1, n))
    a = (theta.float() - base.float()).abs().sort().values
    return {
        "theta": theta,
        "base": base,
        "out": torch.empty_like(theta),
        "lo": float(a[start]) if start > 0 else None,
        "hi": float(a[stop - 1]) if stop < n else None,
        "start": start,
        "stop": stop,
    }


def _bs_call(a):
    _C.band_select(
        a["theta"],
        a["base"],
        a["out"],
        a["lo"],
        a["hi"],
        a["start"],
        a["stop"],
        a.get("lo_ties_first", False),
    )


def _select_tensor_corruptions():
    """The corruptions of theta, base and out that both CPU-only selections share."""

    def wrong_dtype(draw, a, device):
        a[draw(st.sampled_from(["base", "out"]))] = a["theta"].to(torch.int64)
        return a

    def shape_mismatch(draw, a, device):
        a["out"] = torch.empty(a["theta"].numel() + 1).to(a["theta"])
        return a

    def out_aliases(draw, a, device):
        a["out"] = a[draw(st.sampled_from(["theta", "base"]))]
        return a

    return [wrong_dtype, shape_mismatch, out_aliases]


def _bs_corruptions():
    def bad_range(draw, a, device):
        n = a["theta"].numel()
        a["start"], a["stop"] = draw(st.sampled_from([(-1, n), (3, 2), (0, n + 1), (1, n)]))
        if a["start"] == 1:
            a["lo"] = None  # start > 0 needs lo
        return a

    def bad_bounds(draw, a, device):
        a["lo"], a["hi"] = draw(st.sampled_from([(2.0, 1.0), (float("nan"), 1.0), (-1.0, 1.0)]))
        a["start"], a["stop"] = 1, a["theta"].numel() - 1
        return a

    def first_ties_with_hi(draw, a, device):
        n = a["theta"].numel()
        mags = (a["theta"].float() - a["base"].float()).abs().sort().values
        a["start"], a["stop"], a["lo"], a["hi"] = 0, n - 1, None, float(mags[n - 2])
        a["lo_ties_first"] = True  # only without an upper cut
        return a

    return {
        f.__name__: f
        for f in (
            *_select_tensor_corruptions(),
            bad_range,
            bad_bounds,
            first_ties_with_hi,
        )
    }


# ---- della_select (CPU only: DELLA elsewhere runs the reference) -------------------------------


def _ds_valid(draw, device):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    rows, row_len = draw(st.integers(1, 4)), draw(st.integers(1, 30))
    base = torch.randn(rows, row_len).to(dtype)
    eps = draw(st.floats(0.0, 0.2))
    return {
        "theta": (base.float() + torch.randn(rows, row_len)).to(dtype),
        "base": base,
        "out": torch.empty_like(base),
        "row_len": row_len,
        "density": draw(st.floats(eps + 0.01, 1.0 - eps)),
        "epsilon": eps,
        "seed": draw(st.integers(0, 2**64 - 1)),
        "stream_id": draw(st.integers(0, 2**32 - 1)),
    }


def _ds_call(a):
    _C.della_select(
        a["theta"],
        a["base"],
        a["out"],
        a["row_len"],
        a["density"],
        a["epsilon"],
        a["seed"],
        a["stream_id"],
    )


def _ds_corruptions():
    def bad_row_len(draw, a, device):
        a["row_len"] = draw(st.sampled_from([0, -3, a["theta"].numel() + 1]))
        return a

    def bad_probabilities(draw, a, device):
        a["density"], a["epsilon"] = draw(st.sampled_from([(0.1, 0.2), (0.95, 0.1), (0.5, -0.1)]))
        return a

    return {f.__name__: f for f in (*_select_tensor_corruptions(), bad_row_len, bad_probabilities)}


BINDINGS = [
    BindingSpec("weighted_sum", _ws_call, _ws_valid, _ws_corruptions()),
    BindingSpec("task_merge", _tm_call, _tm_valid, _tm_corruptions()),
    BindingSpec("magnitude_select", _ms_call, _ms_valid, _ms_corruptions()),
    BindingSpec("merge_many", _mm_call, _mm_valid, _mm_corruptions()),
    BindingSpec("routed_lora", _rl_call, _rl_valid, _rl_corruptions()),
    BindingSpec("logit_fusion", _lf_call, _lf_valid, _lf_corruptions()),
    BindingSpec("blend", _bl_call, _bl_valid, _bl_corruptions()),
    BindingSpec("routed_lora_dropout", _rd_call, _rd_valid, _rd_corruptions()),
    BindingSpec("magnitude_histogram", _mh_call, _mh_valid, _mh_corruptions()),
    BindingSpec("band_select", _bs_call, _bs_valid, _bs_corruptions()),
    BindingSpec("della_select", _ds_call, _ds_valid, _ds_corruptions()),
]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _C.has_cuda() else [])
CASES = [(spec, kind) for spec in BINDINGS for kind in spec.corruptions]


@st.composite
def corrupted_call(draw, spec, kind, device):
    return spec.corruptions[kind](draw, spec.valid(draw, device), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("spec", "kind"), CASES, ids=[f"{s.name}-{k}" for s, k in CASES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bad_input_raises_cleanly(device, spec, kind, data):
    args = data.draw(corrupted_call(spec, kind, device))
    listed = next((v for v in args.values() if isinstance(v, list)), [])
    tensors = [t for t in listed if isinstance(t, torch.Tensor)]
    before = [t.clone() if t.device.type != "meta" else t for t in tensors]
    with pytest.raises((TypeError, ValueError)) as info:
        spec.call(args)
    assert spec.name in str(info.value), str(info.value)
    for t, b in zip(tensors, before, strict=True):
        if t.device.type != "meta":
            # A failed call must not write into its inputs (NaN inputs stay NaN).
            torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", BINDINGS, ids=lambda s: s.name)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_valid_input_runs(device, spec, data):
    # The other half of the property: the valid builder really is valid.
    spec.call(spec.valid(data.draw, device))


def test_zero_size_tensors_are_valid():
    ts = [torch.empty(3, 0) for _ in range(2)]
    _C.weighted_sum(ts, [1.0, 2.0], torch.empty(3, 0))


def test_numpy_arrays_work_through_dlpack():
    # Any DLPack producer is accepted, not only torch.
    a = np.arange(10, dtype=np.float32)
    out = np.empty(10, dtype=np.float32)
    _C.weighted_sum([a, a], [1.0, 2.0], out)
    np.testing.assert_array_equal(out, 3 * a)


def test_sparse_inputs_are_named_by_every_op():
    # routed_lora and logit_fusion gave raw torch errors ("reshape is not implemented for
    # sparse tensors", "unsupported memory format option"); the other ops named the argument.
    from meldkit.ops import logit_fusion, routed_lora

    def sparse(t):
        return t.to_sparse()

    x, a, b = torch.randn(4, 8), torch.randn(3, 2, 8), torch.randn(3, 6, 2)
    router = torch.randn(3, 8)
    big, small, ex = torch.randn(2, 5), torch.randn(2, 5), torch.randn(1, 2, 5)
    calls = {
        "x": lambda: routed_lora(sparse(x), a, b, 1.0, router_weight=router, top_k=1),
        "lora_a": lambda: routed_lora(x, sparse(a), b, 1.0, router_weight=router, top_k=1),
        "router_weight": lambda: routed_lora(x, a, b, 1.0, router_weight=sparse(router), top_k=1),
        "gates": lambda: routed_lora(x, a, b, 1.0, gates=sparse(torch.rand(4, 3))),
        "large": lambda: logit_fusion(sparse(big), small, ex),
        "experts": lambda: logit_fusion(big, small, sparse(ex)),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"argument '{name}': layout torch\.sparse_coo"):
            call()
