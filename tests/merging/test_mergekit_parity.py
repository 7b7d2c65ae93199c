"""`meldkit merge` against mergekit's own `mergekit-yaml` on the same tiny Llama checkpoints.

Optional: runs when the `mergekit-yaml` command is on PATH (mergekit is pip-installable; it is not
a dependency of meldkit). Both tools compute in float32 here; the results must agree to float32
rounding (the two sum the models in different orders). DARE and DELLA draw their masks from
different random generators and are compared by their properties elsewhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import save_file

from meldkit.merging import Checkpoint, merge

MERGEKIT = shutil.which("mergekit-yaml")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml is not installed"),
]

HIDDEN, INTER, VOCAB, LAYERS, HEADS = 16, 48, 64, 2, 2
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def tiny_llama(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def sparse_finetune(base, seed, fraction=0.4):
    g = torch.Generator().manual_seed(seed)
    return {
        k: v
        + (torch.rand(v.shape, generator=g) < fraction) * 0.05 * torch.randn(v.shape, generator=g)
        for k, v in base.items()
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base = tiny_llama(0)
    paths = {}
    for name, state in [("base", base)] + [
        (f"ft{i}", sparse_finetune(base, 10 + i)) for i in range(3)
    ]:
        (root / name).mkdir()
        save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(CONFIG))
        paths[name] = str(root / name)
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
    cfg_path = root / f"{method}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    theirs = root / f"mergekit_{method}"
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
    ours = merge(cfg, root / f"meldkit_{method}", progress=False)
    a, b = Checkpoint(ours), Checkpoint(theirs)
    assert set(a.names) == set(b.names)
    for name in a.names:
        x, y = a.get(name).float(), b.get(name).float()
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"{method}: {name}")
