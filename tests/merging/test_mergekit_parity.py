"""`meldkit merge` against mergekit's own `mergekit-yaml` on the same tiny Llama checkpoints.

Optional: runs when the `mergekit-yaml` command is on PATH (mergekit is pip-installable; it is not
a dependency of meldkit). Both tools compute in float32 here; the results must agree to float32
rounding (the two sum the models in different orders). DARE and DELLA draw their masks from
different random generators and are compared by their properties elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import yaml

from meldkit.merging import Checkpoint, merge
from meldkit.merging.synthetic import (
    llama_config,
    llama_shapes,
    random_state,
    sparse_finetune,
    write_checkpoint,
)

MERGEKIT = shutil.which("mergekit-yaml")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml is not installed"),
]

HIDDEN, INTER, VOCAB, LAYERS, HEADS = 16, 48, 64, 2, 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    config = llama_config(LAYERS, HIDDEN, INTER, VOCAB, HEADS)
    base = random_state(llama_shapes(LAYERS, HIDDEN, INTER, VOCAB), seed=0)
    paths = {"base": str(write_checkpoint(root / "base", base, config=config))}
    for i in range(3):
        tune = sparse_finetune(base, seed=10 + i, fraction=0.4)
        paths[f"ft{i}"] = str(write_checkpoint(root / f"ft{i}", tune, config=config))
    return root, paths


METHODS = {
    "task_arithmetic": ({"weight": 0.6}, {"lambda": 0.8}),
    "linear": ({"weight": 0.5}, {}),
    "ties": ({"weight": 0.7, "density": 0.5}, {"normalize": True}),
    "breadcrumbs": ({"weight": 0.8, "density": 0.7, "gamma": 0.1}, {}),
    "breadcrumbs_ties": ({"weight": 0.8, "density": 0.7, "gamma": 0.1}, {}),
    "model_stock": ({}, {}),
    # Gradient (interpolated over layers) and filtered values, resolved per tensor.
    "ties_gradient": (
        {
            "density": [0.3, 0.7],
            "weight": [{"filter": "mlp", "value": [1.0, 0.4]}, {"value": 0.6}],
        },
        {"normalize": True},
    ),
}


def _mergekit_and_meldkit(root, cfg, name):
    """Checkpoints of ``cfg`` (a mapping) merged by mergekit-yaml and by meldkit."""
    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    theirs = root / f"mergekit_{name}"
    res = subprocess.run(
        [MERGEKIT, str(cfg_path), str(theirs), "--allow-crimes", "--no-lazy-unpickle"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0:  # older mergekit versions spell the flag differently
        res = subprocess.run(
            [MERGEKIT, str(cfg_path), str(theirs)], capture_output=True, text=True, timeout=600
        )
    assert res.returncode == 0, res.stderr[-2000:]
    ours = merge(cfg_path, root / f"meldkit_{name}", progress=False)
    return Checkpoint(ours), Checkpoint(theirs)


def _assert_same(a, b, label):
    """Every tensor of the two checkpoints equal to float32 rounding."""
    assert set(a.names) == set(b.names)
    for name in a.names:
        x, y = a.get(name).float(), b.get(name).float()
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"{label}: {name}")


def test_slices_same_result_as_mergekit(checkpoints):
    # mergekit's slices form: per-slice and per-source parameters, a gradient over a slice's
    # layers, the embeddings planned with the first slice and the norm and head with the last.
    root, paths = checkpoints
    slices = []
    for k, (a, b) in enumerate([(0, 1), (1, LAYERS)]):
        sources = [{"model": paths["base"], "layer_range": [a, b]}]
        for i in range(3):
            src = {"model": paths[f"ft{i}"], "layer_range": [a, b]}
            if (k, i) == (0, 1):
                src["parameters"] = {"density": 0.3, "weight": 0.2}
            sources.append(src)
        params = {"weight": 0.7, "density": 0.6} if k == 0 else {"density": [0.2, 0.9]}
        slices.append({"sources": sources, "parameters": params})
    cfg = {
        "merge_method": "ties",
        "base_model": paths["base"],
        "slices": slices,
        "parameters": {"normalize": True, "weight": 0.5},
        "dtype": "float32",
    }
    _assert_same(*_mergekit_and_meldkit(root, cfg, "slices"), "slices")


@pytest.mark.filterwarnings("ignore::meldkit.MeldkitFallbackWarning")  # ties + rescale: reference
@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_per_slice_method_parameters_same_result_as_mergekit(checkpoints, method):
    # Top-level method parameters given per slice: they override the top-level ones for the
    # slice's tensors, a filter that matches nothing falls through to the top-level value, a
    # gradient runs over the slice's layers (the head at the last slice's t = 0); a source's
    # per-model filter falls through to its slice's value, then the top-level one.
    root, paths = checkpoints
    models = ["base", "ft0", "ft1", "ft2"] if method == "ties" else ["base", "ft0"]
    if method == "ties":
        per_slice = [
            {"lambda": [{"filter": "mlp", "value": 0.4}], "weight": 0.7, "density": 0.5},
            {"lambda": [0.3, 1.5], "normalize": False, "rescale": True, "int8_mask": True},
        ]
        top = {"lambda": 0.8, "normalize": True, "weight": 0.5, "density": 0.6}
    else:
        per_slice = [{"t": 0.2}, {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}]}]
        top = {"t": 0.7}
    slices = []
    for (a, b), params in zip([(0, 1), (1, LAYERS)], per_slice, strict=True):
        sources = [{"model": paths[m], "layer_range": [a, b]} for m in models]
        slices.append({"sources": sources, "parameters": params})
    if method == "ties":  # a per-model filter that matches nothing falls through the same way
        slices[1]["sources"][2]["parameters"] = {"weight": [{"filter": "mlp", "value": 0.2}]}
    cfg = {
        "merge_method": method,
        "base_model": paths["base"],
        "slices": slices,
        "parameters": top,
        "dtype": "float32",
    }
    _assert_same(*_mergekit_and_meldkit(root, cfg, f"slice_params_{method}"), method)


@pytest.mark.filterwarnings("ignore::meldkit.MeldkitFallbackWarning")  # breadcrumbs: reference
@pytest.mark.parametrize("method", list(METHODS))
def test_same_result_as_mergekit(checkpoints, method):
    root, paths = checkpoints
    per_model, params = METHODS[method]
    cfg = {
        "merge_method": method.removesuffix("_gradient"),
        "base_model": paths["base"],
        "models": [{"model": paths[f"ft{i}"], "parameters": dict(per_model)} for i in range(3)],
        "dtype": "float32",
    }
    if method == "linear":
        del cfg["base_model"]
    if params:
        cfg["parameters"] = params
    _assert_same(*_mergekit_and_meldkit(root, cfg, method), method)
