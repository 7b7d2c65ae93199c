"""`meldkit merge` and meldkit.merging.merge on real safetensors checkpoints written here: a tiny
Llama-shaped base and fine-tunes made by sparse perturbation (one of them sharded)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from meldkit import _native
from meldkit.merging import (
    Checkpoint,
    CheckpointError,
    ConfigError,
    MergeError,
    merge,
    merge_state_dicts,
    parse_config,
)
from meldkit.merging.checkpoint import ReadAhead
from meldkit.merging.engine import _tensor_params
from meldkit.merging.synthetic import sparse_finetune, write_checkpoint

HIDDEN, VOCAB, LAYERS = 16, 64, 2


def llama_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            ("self_attn.k_proj.weight", (HIDDEN // 2, HIDDEN)),
            ("mlp.up_proj.weight", (3 * HIDDEN, HIDDEN)),
            ("mlp.down_proj.weight", (HIDDEN, 3 * HIDDEN)),
            ("input_layernorm.weight", (HIDDEN,)),
        ]:
            state[p + name] = torch.randn(shape, generator=g)
    state["model.norm.weight"] = torch.ones(HIDDEN)
    state["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
    state["model.position_ids"] = torch.arange(8)  # an integer buffer: copied, never merged
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


def finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    return sparse_finetune(base, seed, fraction=0.3, scale=0.05)


def write_model(folder: Path, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    config = {"model_type": "llama", "hidden_size": HIDDEN}
    return write_checkpoint(folder, state, shards=shards, config=config)


@pytest.fixture
def zoo(tmp_path):
    base = llama_state(0)
    tunes = [finetune(base, s) for s in (1, 2, 3)]
    paths = {"base": write_model(tmp_path / "base", base)}
    for i, t in enumerate(tunes):
        paths[f"ft{i}"] = write_model(tmp_path / f"ft{i}", t, shards=2 if i == 1 else 1)
    return tmp_path, base, tunes, paths


def config_for(method, paths, n=3, **params):
    per_model = {
        "ties": {"weight": 0.5, "density": 0.4},
        "dare_ties": {"weight": 0.7, "density": 0.5},
        "dare_linear": {"weight": 0.7, "density": 0.5},
        "task_arithmetic": {"weight": 0.6},
        "breadcrumbs": {"weight": 1.0, "density": 0.8, "gamma": 0.05},
        "linear": {"weight": 1.0},
        "model_stock": {},
        "slerp": {},
    }[method]
    cfg = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths[f"ft{i}"]), "parameters": dict(per_model)} for i in range(n)
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    if method == "linear":  # linear averages a base_model in with the models, as mergekit does
        del cfg["base_model"]
    if params:
        cfg["parameters"] = params
    return cfg


def read(folder: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(folder)
    return {n: ck.get(n) for n in ck.names}


@pytest.mark.parametrize(
    ("method", "n", "params"),
    [
        ("ties", 3, {"normalize": True}),
        ("ties", 3, {"consensus": "count"}),
        ("dare_ties", 3, {"lambda": 0.9}),
        ("dare_ties", 3, {"lambda": 0.9, "consensus": "count"}),
        ("dare_linear", 2, {}),
        ("task_arithmetic", 3, {"lambda": 0.5}),
        ("breadcrumbs", 2, {}),
        ("linear", 3, {}),
        ("model_stock", 3, {}),
        ("slerp", 1, {"t": 0.3}),
    ],
)
def test_merge_matches_in_memory_merge(zoo, method, n, params, monkeypatch):
    tmp, base, tunes, paths = zoo
    cfg = config_for(method, paths, n=n, **params)
    out = merge(cfg, tmp / "out", seed=7, progress=False)
    merged = read(out)
    parsed = parse_config(cfg)
    kw = {"weights": parsed.model_param("weight", 1.0)}
    if "density" in parsed.method.model_params:
        kw["densities"] = parsed.model_param("density", 1.0)
    if "gamma" in parsed.method.model_params:
        kw["gammas"] = parsed.model_param("gamma", 0.01)
    kw.update({"lam" if k == "lambda" else k: v for k, v in params.items()})

    def f32(d):
        return {k: v.float() if v.is_floating_point() else v for k, v in d.items()}

    expected = merge_state_dicts(
        f32(base), [f32(t) for t in tunes[:n]], method, seed=7, out_dtype=torch.bfloat16, **kw
    )
    assert set(merged) == set(base)
    for name, tensor in expected.items():
        assert merged[name].dtype == tensor.dtype, name
        assert torch.equal(merged[name], tensor), name
    assert torch.equal(merged["model.position_ids"], base["model.position_ids"])
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not list(tmp.glob(".out.*")), "temporary folder left behind"


@pytest.mark.parametrize("background", [True, False])
def test_sharded_output_and_index(zoo, background):
    tmp, base, _, paths = zoo
    out = merge(
        config_for("ties", paths),
        tmp / "out",
        out_shard_size="4KB",
        progress=False,
        background_write=background,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((out / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(base)
    single = merge(config_for("ties", paths), tmp / "out1", progress=False)
    a, b = read(out), read(single)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dare_is_reproducible_by_seed(zoo):
    tmp, _, _, paths = zoo
    cfg = config_for("dare_ties", paths)
    a = read(merge(cfg, tmp / "a", seed=1, progress=False))
    b = read(merge(cfg, tmp / "b", seed=1, progress=False))
    c = read(merge(cfg, tmp / "c", seed=2, progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_config_errors_name_the_key(zoo, tmp_path):
    _, _, _, paths = zoo
    good = config_for("ties", paths)
    cases = [
        ({**good, "merge_method": "tiez"}, "unknown merge_method 'tiez'"),
        ({**good, "modules": {}}, "not supported yet: modules"),
        ({**good, "slices": []}, "give models or slices, not both"),
        ({**good, "models": [{"model": good["base_model"]}]}, "every model listed is the base"),
        ({**good, "bogus": 1}, "unknown keys: bogus"),
        ({**good, "parameters": {"gamma": 0.1}}, "parameters: gamma not accepted by ties"),
        ({**good, "dtype": "float8"}, "dtype: 'float8'"),
        ({k: v for k, v in good.items() if k != "base_model"}, "needs base_model"),
        (
            {**good, "models": [{"model": str(paths["ft0"]), "parameters": {"density": 2}}]},
            "density: 2 is not in [0, 1]",
        ),
        (
            {
                **good,
                "models": [{"model": str(paths["ft0"]), "parameters": {"density": [0.5, 1.5]}}],
            },
            "density: 1.5 is not in [0, 1]",
        ),
        (
            {
                **good,
                "models": [
                    {
                        "model": str(paths["ft0"]),
                        "parameters": {"weight": [{"filtr": "mlp", "value": 1}]},
                    }
                ],
            },
            "weight[0]: unknown keys: filtr",
        ),
        (
            {**good, "parameters": {"normalize": [True, False]}},
            "parameters.normalize: expected one value",
        ),
        (
            {**good, "models": [{"model": str(paths["ft0"]), "parameters": {"epsilon": 0.1}}]},
            "epsilon not accepted by ties",
        ),
        (
            {**good, "parameters": {"consensus": "mass"}},
            "parameters.consensus: expected sum or count (the sign election), got 'mass'",
        ),
        (
            {**config_for("task_arithmetic", paths), "parameters": {"consensus": "count"}},
            "parameters: consensus not accepted by task_arithmetic",
        ),
    ]
    for cfg, text in cases:
        with pytest.raises(ConfigError) as info:
            parse_config(cfg)
        assert text in str(info.value), (text, str(info.value))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("merge_method: [ties\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(bad_yaml)


def _slices(paths, ranges, per_slice, source_params=None, base=True):
    """A slices-form config: for each layer range, the base (unless not base) and the three
    fine-tunes, with slice-level and per-source parameters."""
    slices = []
    for k, (a, b) in enumerate(ranges):
        sources = [{"model": str(paths["base"]), "layer_range": [a, b]}] if base else []
        for i in range(3):
            src = {"model": str(paths[f"ft{i}"]), "layer_range": [a, b]}
            if source_params and source_params[k][i]:
                src["parameters"] = source_params[k][i]
            sources.append(src)
        slices.append({"sources": sources, "parameters": per_slice[k]})
    cfg = config_for("ties", paths)
    del cfg["models"]
    return {**cfg, "slices": slices}


def test_one_slice_over_every_layer_is_the_models_form(zoo):
    tmp, _, _, paths = zoo
    models_form = config_for("ties", paths)
    sliced = _slices(paths, [(0, LAYERS)], [{"weight": 0.5, "density": 0.4}])
    a = read(merge(models_form, tmp / "a", progress=False))
    b = read(merge(sliced, tmp / "b", progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_slices_give_each_layer_range_its_parameters(zoo):
    # Layer 0 from slice 0, layer 1 from slice 1; the embeddings take slice 0's values and the
    # final norm and head slice 1's; a source's parameters override its slice's, which override
    # the top-level ones; a gradient runs over its slice's layers (t = 1 in a one-layer slice).
    tmp, _, _, paths = zoo
    sliced = _slices(
        paths,
        [(0, 1), (1, 2)],
        [{"weight": 0.5}, {"weight": 0.8, "density": [0.1, 0.9]}],
        source_params=[[{"density": 0.6}, None, {"weight": 0.2}], [None, {"density": 0.3}, None]],
    )
    sliced["parameters"] = {"density": 0.7}
    ours = read(merge(sliced, tmp / "sliced", progress=False))
    w0 = {"weight": [0.5, 0.5, 0.2], "density": [0.6, 0.7, 0.7]}  # slice 0
    w1 = {"weight": [0.8, 0.8, 0.8], "density": [0.9, 0.3, 0.9]}  # slice 1, gradient at t = 1
    w1_t0 = {"weight": [0.8, 0.8, 0.8], "density": [0.1, 0.3, 0.1]}  # slice 1 outside the layers
    for values, names, folder in [
        (w0, lambda n: "layers.0." in n or "embed" in n, "s0"),
        (w1, lambda n: "layers.1." in n, "s1"),
        (w1_t0, lambda n: n in ("model.norm.weight", "lm_head.weight"), "s1t0"),
    ]:
        cfg = config_for("ties", paths)
        for i, m in enumerate(cfg["models"]):
            m["parameters"] = {k: v[i] for k, v in values.items()}
        expected = read(merge(cfg, tmp / folder, progress=False))
        chosen = [n for n in expected if names(n) and expected[n].is_floating_point()]
        assert chosen
        for n in chosen:
            assert torch.equal(ours[n], expected[n]), n


def test_slices_give_each_layer_range_its_method_parameters(zoo):
    # A slice's lambda and normalize override the top-level ones for its tensors, as in
    # mergekit: a filter of the slice's that matches nothing falls through to the top-level
    # value, a gradient runs over the slice's layers, the embeddings take slice 0's values at
    # t = 0 and the final norm and head slice 1's at t = 0.
    from meldkit.ops import merge_tensors

    tmp, base, tunes, paths = zoo
    sliced = _slices(
        paths,
        [(0, 1), (1, 2)],
        [
            {"weight": 0.5, "density": 0.4, "lambda": [{"filter": "mlp", "value": 0.3}]},
            {"weight": 0.5, "density": 0.4, "lambda": [0.2, 0.8], "normalize": False},
        ],
    )
    sliced["parameters"] = {"lambda": 0.9, "normalize": True}
    out = read(merge(sliced, tmp / "sliced", progress=False))

    def expected_params(name: str) -> tuple[float, bool]:
        if "layers.0." in name:
            return (0.3 if "mlp" in name else 0.9), True
        if "layers.1." in name:
            return 0.8, False
        return (0.9, True) if "embed" in name else (0.2, False)

    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        lam, normalize = expected_params(name)
        expected = merge_tensors(
            tensor.float(),
            [tune[name].float() for tune in tunes],
            "ties",
            weights=[0.5] * 3,
            densities=[0.4] * 3,
            lam=lam,
            normalize=normalize,
            tie="exact_k",
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(out[name], expected), name


def test_slerp_t_per_slice(zoo):
    # Each slice's t for its tensors (slice 1's filter falls through to the top-level t), and
    # without a top-level t every tensor needs one from its slice, as in mergekit.
    from meldkit.ops import merge_tensors

    tmp, base, tunes, paths = zoo

    def slice_(a, b, t):
        sources = [{"model": str(paths[m]), "layer_range": [a, b]} for m in ("base", "ft0")]
        return {"sources": sources, "parameters": {"t": t}}

    cfg = {
        "merge_method": "slerp",
        "base_model": str(paths["base"]),
        "slices": [slice_(0, 1, 0.2), slice_(1, 2, [{"filter": "self_attn", "value": [0.0, 0.9]}])],
        "parameters": {"t": 0.6},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    out = read(merge(cfg, tmp / "out", progress=False))

    def t_of(name: str) -> float:
        if "layers.0." in name or "embed" in name:
            return 0.2
        if "layers.1." in name:  # the gradient at t = 1 (a one-layer slice)
            return 0.9 if "self_attn" in name else 0.6
        return 0.6  # the final norm and head: slice 1 at t = 0, no filter matches

    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        expected = merge_tensors(
            tensor.float(),
            [tunes[0][name].float()],
            "slerp",
            t=t_of(name),
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(out[name], expected), name
    del cfg["parameters"]  # slice 1's filter leaves the others without t, as in mergekit
    with pytest.raises(
        ConfigError,
        match=r"parameters\.t: no filter matches (lm_head|model\.norm|model\.layers\.1)",
    ):
        merge(cfg, tmp / "out2", progress=False)
    del cfg["slices"][0]["parameters"]
    with pytest.raises(ConfigError, match=r"slerp needs parameters\.t .*slices\[0\]"):
        parse_config(cfg)


def test_tensors_outside_the_layers_go_with_the_first_or_last_slice():
    from meldkit.merging.config import is_pre_layer

    pre = [
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "bert.embeddings.LayerNorm.weight",
        "gpt_neox.embed_in.weight",
    ]
    post = ["model.norm.weight", "lm_head.weight", "transformer.ln_f.weight", "embed_out.weight"]
    assert all(is_pre_layer(n) for n in pre)
    assert not any(is_pre_layer(n) for n in post)


def test_slices_meldkit_cannot_honour_are_refused(zoo):
    tmp, _, _, paths = zoo
    good = _slices(paths, [(0, 1), (1, 2)], [{"weight": 0.5}, {"weight": 0.5}])

    def edit(fn):
        cfg = json.loads(json.dumps(good))
        fn(cfg)
        return cfg

    def shift(cfg):
        cfg["slices"][1]["sources"][2]["layer_range"] = [0, 1]

    def gap(cfg):
        for s in cfg["slices"][1]["sources"]:
            s["layer_range"] = [2, 3]

    def drop_model(cfg):
        del cfg["slices"][1]["sources"][3]

    cases = [
        (edit(shift), "differs from the slice's [1, 2]"),
        (edit(gap), "slices[1]: starts at layer 2, expected 1"),
        (edit(drop_model), "slices[1].sources: lists other models than slices[0]"),
        (edit(lambda c: c["slices"][0].update(bogus=1)), "slices[0]: unknown keys: bogus"),
        (
            edit(lambda c: c["slices"][0]["sources"][1].update(layer_range=[1, 0])),
            "layer_range: expected [START, END]",
        ),
        (
            edit(lambda c: c["slices"][0].update(parameters={"t": 0.5})),
            "slices[0].parameters: t not accepted by ties per model",
        ),
        (edit(lambda c: c.update(slices=[])), "slices: expected a non-empty list"),
        (
            edit(lambda c: c["slices"][0]["sources"][1].update(parameters={"density": 1.5})),
            "density: 1.5 is not in [0, 1]",
        ),
    ]
    for cfg, text in cases:
        with pytest.raises(ConfigError) as info:
            parse_config(cfg)
        assert text in str(info.value), (text, str(info.value))
    short = _slices(paths, [(0, 1)], [{"weight": 0.5}])  # the models have 2 layers
    with pytest.raises(MergeError, match="the slices cover layers 0-0, but the models have 2"):
        merge(short, tmp / "out", progress=False)
    assert not (tmp / "out").exists()


def test_the_output_has_a_model_card(zoo):
    tmp, _, _, paths = zoo
    cfg = config_for("ties", paths)
    yml = tmp / "merge.yml"
    yml.write_text(yaml.safe_dump(cfg))
    card = (merge(yml, tmp / "out", seed=5, progress=False) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- meldkit\n- merge\n---")
    assert "by `ties` (Yadav et al., TIES-Merging" in card
    assert f"on the base model `{paths['base']}`" in card
    assert all(f"- `{paths[f'ft{i}']}`" in card for i in range(3))
    assert "seed 5" in card and "magnitude trimming per tensor" in card
    assert "inputs converted to float32 (the config's dtype), merged in float32, stored in " in card
    assert "```yaml\n" + yml.read_text().rstrip() + "\n```" in card
    # dtype bfloat16 rounds the inputs; the arithmetic stays float32 (not "computed in bfloat16")
    bf16 = {**cfg, "dtype": "bfloat16"}
    del bf16["out_dtype"]
    card = (merge(bf16, tmp / "out_bf16", progress=False) / "README.md").read_text()
    assert "inputs rounded to bfloat16 (the config's dtype), merged in float32, stored in " in card
    assert "computed in" not in card
    # A dict config is dumped as YAML; hub cache folders are named by their id.
    hub = tmp / "hub" / "models--someorg--tiny-llama" / "snapshots" / "abc123"
    hub.parent.mkdir(parents=True)
    paths["base"].rename(hub)
    paths["base"] = hub
    cfg = config_for("ties", paths)
    card = (merge(cfg, tmp / "out2", progress=False) / "README.md").read_text()
    assert "base_model:\n- someorg/tiny-llama\nlibrary_name" in card
    assert "merge_method: ties" in card and "on the base model `someorg/tiny-llama`" in card


def test_numbers_as_yaml_strings_and_numpy_scalars_are_numbers(zoo):
    # YAML reads 5e-1 (no decimal point) as a string; mergekit takes it as 0.5. NumPy scalars
    # in a Python config are numbers too.
    import numpy as np

    tmp, _, _, paths = zoo
    cfg = config_for("ties", paths, n=2)
    text = (
        yaml.safe_dump(cfg)
        .replace("weight: 0.5", "weight: 5e-1")
        .replace("density: 0.4", "density: 4e-1")
    )
    assert "5e-1" in text and yaml.safe_load(text)["models"][0]["parameters"]["weight"] == "5e-1"
    (tmp / "e.yml").write_text(text)
    want = read(merge(cfg, tmp / "plain", progress=False))
    assert read(merge(tmp / "e.yml", tmp / "strings", progress=False)).keys() == want.keys()
    for name, t in read(tmp / "strings").items():
        assert torch.equal(t, want[name]), name
    numpy_cfg = config_for("ties", paths, n=2)
    for m in numpy_cfg["models"]:
        m["parameters"] = {"weight": np.float32(0.5), "density": [np.float64(0.4), "4e-1"]}
    got = read(merge(numpy_cfg, tmp / "numpy", progress=False))
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    for text in ("nan", "-inf", "1_000"):  # float() reads them; a config's number is finite
        bad = {**cfg, "models": [{"model": str(paths["ft0"]), "parameters": {"weight": text}}]}
        with pytest.raises(
            ConfigError, match=rf"weight: expected a number or true/false, got '{text}'"
        ):
            parse_config(bad)
    with pytest.raises(ConfigError, match=r"weight: expected a number or true/false, got 'half'"):
        parse_config(
            {**cfg, "models": [{"model": str(paths["ft0"]), "parameters": {"weight": "half"}}]}
        )
    # A quoted YAML boolean is a boolean, as mergekit reads it.
    quoted = read(merge({**cfg, "parameters": {"normalize": "False"}}, tmp / "q", progress=False))
    plain = read(merge({**cfg, "parameters": {"normalize": False}}, tmp / "p", progress=False))
    assert all(torch.equal(quoted[k], plain[k]) for k in plain)
    assert any(not torch.equal(quoted[k], want[k]) for k in want)  # normalize did change


def test_linear_weights_summing_to_zero_are_refused_before_merging(zoo):
    tmp, _, _, paths = zoo
    cfg = config_for("linear", paths, n=2)
    for m in cfg["models"]:
        m["parameters"] = {"weight": [{"filter": "mlp", "value": 0.0}, {"value": 0.5}]}
    with pytest.raises(
        ConfigError, match=r"model.layers.0.mlp.down_proj.weight: the models. weights sum to 0"
    ):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()
    cfg["parameters"] = {"normalize": False}  # then it is a plain weighted sum
    merge(cfg, tmp / "out", progress=False)


def test_fsync_flushes_every_file_and_folder_before_the_move(zoo, monkeypatch):
    from meldkit.merging import checkpoint

    tmp, _, _, paths = zoo
    synced, moved = [], []
    fsync, replace = checkpoint._fsync_path, os.replace

    def spy_replace(src, dst):
        moved.append(len(synced))
        return replace(src, dst)

    monkeypatch.setattr(
        checkpoint, "_fsync_path", lambda p, folder=False: (synced.append(p), fsync(p, folder))
    )
    monkeypatch.setattr(os, "replace", spy_replace)
    out = merge(config_for("task_arithmetic", paths), tmp / "out", progress=False)
    assert synced == []  # off by default
    out2 = merge(config_for("task_arithmetic", paths), tmp / "out2", progress=False, fsync=True)
    before = {p.name for p in synced[: moved[-1]]}
    assert {p.name for p in out2.iterdir()} <= before  # every file, before the move
    assert synced[moved[-1] - 1].name.startswith(".out2")  # then the folder itself
    assert synced[moved[-1] :] == [out2.parent]  # and the parent after it
    assert {p.name for p in out.iterdir()} == {p.name for p in out2.iterdir()}


def test_fsync_skips_folders_a_file_system_cannot_flush(zoo, monkeypatch):
    # Some FUSE and network mounts refuse fsync on a folder (EINVAL): skipped, not fatal.
    import errno
    import stat

    tmp, _, _, paths = zoo
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = merge(config_for("task_arithmetic", paths), tmp / "out", progress=False, fsync=True)
    assert (out / "model.safetensors").is_file()


def test_a_base_without_config_json_warns_before_merging(zoo):
    tmp, _, _, paths = zoo
    (paths["base"] / "config.json").unlink()
    with pytest.warns(UserWarning, match=r"base has no config.json: the merged model will have"):
        out = merge(config_for("task_arithmetic", paths), tmp / "out", progress=False)
    assert not (out / "config.json").exists()


def test_the_model_card_names_models_as_the_config_does(zoo, monkeypatch):
    # Relative paths stay relative in the card (it is published with the model): not this
    # machine's folders, as mergekit writes the names its YAML gives.
    tmp, _, _, paths = zoo
    monkeypatch.chdir(tmp)
    cfg = config_for("ties", {k: Path(v.name) for k, v in paths.items()})
    card = (merge(cfg, tmp / "out", progress=False) / "README.md").read_text()
    assert "on the base model `base`." in card
    assert all(f"- `ft{i}`" in card for i in range(3))
    assert str(tmp) not in card


def test_tokenizer_source_picks_the_tokenizer_files(zoo):
    # mergekit's tokenizer_source (legacy) and tokenizer: {source: ...}: base, or a merged model.
    # The model files (config.json) stay the base's; the weights do not depend on it.
    tmp, _, _, paths = zoo
    for name, folder in paths.items():
        (folder / "tokenizer_config.json").write_text(json.dumps({"from": name}))
        (folder / "tokenizer.json").write_text(json.dumps({"vocab": name}))
    (paths["base"] / "config.json").write_text(json.dumps({"model_type": "llama", "from": "base"}))
    plain = read(merge(config_for("ties", paths), tmp / "plain", progress=False))
    cases = [
        ({"tokenizer_source": "base"}, "base"),
        ({"tokenizer": {"source": "base"}}, "base"),
        ({"tokenizer_source": str(paths["ft1"])}, "ft1"),
        ({"tokenizer": {"source": str(paths["ft2"])}}, "ft2"),
        ({}, "base"),
    ]
    for i, (extra, expected) in enumerate(cases):
        out = merge({**config_for("ties", paths), **extra}, tmp / f"out{i}", progress=False)
        assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": expected}
        assert json.loads((out / "tokenizer.json").read_text()) == {"vocab": expected}
        assert json.loads((out / "config.json").read_text())["from"] == "base"
        merged = read(out)
        assert all(torch.equal(merged[k], plain[k]) for k in plain)
    # Relative to the YAML file's folder, like the model paths.
    yml = tmp / "merge.yml"
    cfg = config_for("ties", paths)
    cfg["tokenizer_source"] = "ft0"
    yml.write_text(yaml.safe_dump(cfg))
    assert parse_config(yml).tokenizer_source == tmp / "ft0"


def test_tokenizer_sources_meldkit_cannot_honour_are_refused(zoo):
    tmp, _, _, paths = zoo
    good = config_for("ties", paths)
    linear = config_for("linear", paths)
    cases = [
        ({**good, "tokenizer_source": "union"}, "union is not supported"),
        ({**good, "tokenizer": {"source": "union"}}, "tokenizer.source: union is not supported"),
        ({**good, "tokenizer_source": str(tmp / "elsewhere")}, "is not a model of this merge"),
        ({**good, "tokenizer": {"source": "base", "tokens": {}}}, "keys not supported: tokens"),
        ({**good, "tokenizer": "base"}, "tokenizer: expected a mapping"),
        ({**good, "tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "not both"),
        ({**linear, "tokenizer_source": "base"}, "tokenizer_source: base needs base_model"),
        ({**good, "tokenizer_source": 3}, "tokenizer_source: expected a model folder path"),
    ]
    for cfg, text in cases:
        with pytest.raises(ConfigError) as info:
            parse_config(cfg)
        assert text in str(info.value), (text, str(info.value))


def test_model_errors_fail_before_merging(zoo):
    tmp, base, _, paths = zoo
    cfg = config_for("ties", paths)
    cfg["models"][0]["model"] = str(tmp / "nope")
    with pytest.raises(MergeError, match="no such model folder"):
        merge(cfg, tmp / "out", progress=False)
    wrong = dict(base)
    wrong["model.norm.weight"] = torch.ones(HIDDEN + 1, dtype=torch.bfloat16)
    write_model(tmp / "wrong", wrong)
    cfg = config_for("ties", paths)
    cfg["models"][2]["model"] = str(tmp / "wrong")
    with pytest.raises(MergeError, match=r"model.norm.weight has shape \[17\]"):
        merge(cfg, tmp / "out", progress=False)
    partial = {k: v for k, v in base.items() if k != "model.layers.1.mlp.down_proj.weight"}
    write_model(tmp / "partial", partial)
    cfg["models"][2]["model"] = str(tmp / "partial")
    with pytest.raises(MergeError, match="missing 1 tensors"):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()


def test_truncated_file_and_pickle_policy(zoo):
    tmp, base, _, _ = zoo
    broken = write_model(tmp / "broken", base)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="broken"):
        ck = Checkpoint(broken)
        for n in ck.names:
            ck.get(n)
    pickled = tmp / "pickled"
    pickled.mkdir()
    torch.save(base, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint(pickled)
    ck = Checkpoint(pickled, allow_pickle=True)
    assert torch.equal(ck.get("lm_head.weight"), base["lm_head.weight"])


def test_interrupted_merge_leaves_nothing_and_rerun_succeeds(zoo, monkeypatch):
    tmp, _, _, paths = zoo
    import meldkit.ops

    calls = {"n": 0}
    real = meldkit.ops.merge_tensors

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(meldkit.ops, "merge_tensors", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge(config_for("ties", paths), tmp / "out", progress=False)
    assert not (tmp / "out").exists() and not list(tmp.glob(".out.*"))
    monkeypatch.setattr(meldkit.ops, "merge_tensors", real)
    assert merge(config_for("ties", paths), tmp / "out", progress=False).is_dir()
    with pytest.raises(CheckpointError, match="not empty"):
        merge(config_for("ties", paths), tmp / "out", progress=False)


_KILLABLE_MERGE = """
import sys, time
import meldkit.ops
real = meldkit.ops.merge_tensors
calls = {"n": 0}
def slow(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
        print("merging", flush=True)
        time.sleep(60)
    return real(*args, **kwargs)
meldkit.ops.merge_tensors = slow
from meldkit.cli import main
sys.exit(main(["merge", sys.argv[1], sys.argv[2], "--no-progress"]))
"""


def test_a_terminated_merge_leaves_nothing_and_killed_ones_are_cleaned_up(zoo):
    import signal

    tmp, _, _, paths = zoo
    cfg = tmp / "kill.yaml"
    cfg.write_text(yaml.safe_dump(config_for("ties", paths)))
    out = tmp / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_MERGE, str(cfg), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    with proc.stdout:
        assert proc.stdout.readline().strip() == "merging"
        partial = list(tmp.glob(".killed.*"))
        assert len(partial) == 1 and (partial[0] / ".meldkit-partial").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not out.exists() and not list(tmp.glob(".killed.*"))

    # A merge killed without a chance to clean up (SIGKILL) leaves its folder; the next merge
    # into the same output removes it and says so, and leaves a live merge's folder, other
    # outputs' folders and unmarked ones alone.
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_MERGE, str(cfg), str(tmp / "sigkilled")],
        stdout=subprocess.PIPE,
        text=True,
    )
    with proc.stdout:
        assert proc.stdout.readline().strip() == "merging"
        proc.kill()
        proc.wait(timeout=60)
    (sigkilled,) = tmp.glob(".sigkilled.*")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()
    parent = os.getppid()
    stat = Path(f"/proc/{parent}/stat").read_text()
    started = stat[stat.rindex(")") + 2 :].split()[19]  # field 22: the start time
    for name, marker in (
        (".killed.dead", f"{dead.pid} {host}"),
        (".killed.live", f"{parent} {host}"),
        (".killed.live_started", f"{parent} {host} {started}"),
        (".killed.reused", f"{parent} {host} 1"),  # its PID now names another process
        (".killed.other", f"{dead.pid} another-host"),
        (".killed.user", None),
    ):
        (tmp / name).mkdir()
        if marker is not None:
            (tmp / name / ".meldkit-partial").write_text(marker)
    with pytest.warns(
        UserWarning,
        match=r"removed 2 partial output\(s\) of merges that were "
        r"killed",
    ) as info:
        merge(config_for("ties", paths), out, progress=False)
    assert f"process {dead.pid}, " in str(info[0].message)
    assert sigkilled.exists()  # another output's folder
    with pytest.warns(UserWarning, match=r"removed 1 partial output") as info:
        merge(config_for("ties", paths), tmp / "sigkilled", progress=False)
    assert f"{sigkilled} (process {proc.pid}, " in str(info[0].message)
    assert not sigkilled.exists()
    assert not (tmp / ".killed.dead").exists() and not (tmp / ".killed.reused").exists()
    for n in (".killed.live", ".killed.live_started", ".killed.other", ".killed.user"):
        assert (tmp / n).is_dir(), n
    assert not (out / ".meldkit-partial").exists()


def _cached_snapshot(cache: Path, repo_id: str, folder: Path, commit: str) -> Path:
    """``folder`` laid out as the Hugging Face cache holds a download of ``repo_id`` at
    ``commit`` (its snapshot, and ``refs/main`` naming the commit); returns the snapshot."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hugging_face_ids_resolve_from_the_local_cache(zoo, monkeypatch):

    constants = pytest.importorskip("huggingface_hub.constants")
    tmp, _, _, paths = zoo
    cache = tmp / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _cached_snapshot(cache, "org/tiny-base", paths["base"], commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network, whatever happens

    by_path = read(merge(config_for("ties", paths), tmp / "by_path", progress=False))
    cfg = config_for("ties", paths)
    cfg["base_model"] = "org/tiny-base"
    assert parse_config(cfg).base == snapshot
    by_id = read(merge(cfg, tmp / "by_id", progress=False))
    assert all(torch.equal(by_id[k], by_path[k]) for k in by_path)
    cfg["base_model"] = "org/not-downloaded"
    with pytest.raises(MergeError, match="local cache only: download the model first"):
        merge(cfg, tmp / "missing", progress=False)


def test_a_missing_hugging_face_id_names_the_id_and_the_cause(zoo, monkeypatch):
    # huggingface_hub is not a dependency: without it, an ID cannot be read, and the error
    # says so (not "<yaml folder>/org/model: no such model folder")
    tmp, _, _, paths = zoo
    monkeypatch.chdir(tmp)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: not installed
    cfg = config_for("ties", paths)
    cfg["base_model"] = "org/tiny-base"
    with pytest.raises(MergeError) as info:
        merge(cfg, tmp / "out", progress=False)
    text = str(info.value)
    assert text.startswith("base_model: org/tiny-base: no such model folder or file: tried ")
    assert "needs the huggingface_hub package, which is not installed" in text
    assert "hf download org/tiny-base" in text
    # mergekit's MODEL+LORA: refused as such
    cfg["base_model"] = "org/tiny-base+org/tiny-lora"
    with pytest.raises(
        ConfigError,
        match=r"base_model: org/tiny-base\+org/tiny-lora: "
        r"mergekit's MODEL\+LORA syntax .* is not supported",
    ):
        parse_config(cfg)
    assert not (tmp / "out").exists()


def test_relative_model_paths_resolve_as_mergekit_then_beside_the_config(zoo, monkeypatch):
    tmp, _, _, paths = zoo
    monkeypatch.chdir(tmp)
    folder = tmp / "configs"
    folder.mkdir()
    cfg = config_for("ties", paths)
    cfg["base_model"] = "base"  # in the working directory, where mergekit looks
    cfg["models"][0]["model"] = "ft0"
    (folder / "cwd.yaml").write_text(yaml.safe_dump(cfg))
    parsed = parse_config(folder / "cwd.yaml")
    assert parsed.base == Path("base").absolute() and parsed.models[0].path.name == "ft0"
    assert parsed.models[0].path.parent == tmp
    # only beside the config: found there
    write_model(folder / "beside", llama_state(0))
    cfg["models"][1]["model"] = "beside"
    (folder / "beside.yaml").write_text(yaml.safe_dump(cfg))
    assert parse_config(folder / "beside.yaml").models[1].path == folder / "beside"
    # in both: the working directory's, as mergekit reads it, with a warning
    write_model(tmp / "beside", llama_state(0))
    with pytest.warns(UserWarning, match=r"models\[1\]\.model: beside names .* merging"):
        assert parse_config(folder / "beside.yaml").models[1].path == tmp / "beside"
    # in neither: both named
    cfg["models"][1]["model"] = str(paths["ft1"])
    cfg["models"][2]["model"] = "nowhere"
    (folder / "nowhere.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(MergeError) as info:
        merge(folder / "nowhere.yaml", tmp / "out", progress=False)
    text = str(info.value)
    assert text.startswith("models[2].model: nowhere: no such model folder or file: tried ")
    assert f"{tmp / 'nowhere'} (the working directory, where mergekit looks)" in text
    assert f"{folder / 'nowhere'} (the config's folder)" in text


def _meldkit_merge_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "meldkit", "merge", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli(zoo):
    tmp, _, _, paths = zoo
    cfg_path = tmp / "ties.yaml"
    cfg_path.write_text(yaml.safe_dump(config_for("ties", paths)))
    res = _meldkit_merge_cli(
        cfg_path,
        tmp / "cli_out",
        "--no-progress",
        "--out-shard-size",
        "1GB",
        "--read-ahead",
        "none",
    )
    assert res.returncode == 0, res.stderr
    assert (tmp / "cli_out" / "model.safetensors").is_file()
    bad = tmp / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config_for("ties", paths), "merge_method": "nope"}))
    res = _meldkit_merge_cli(bad, tmp / "x")
    assert res.returncode == 2 and "unknown merge_method 'nope'" in res.stderr
    res = _meldkit_merge_cli(cfg_path, tmp / "y", "--read-ahead", "lots")
    assert res.returncode == 2 and "read_ahead: not a size: 'lots'" in res.stderr


@pytest.mark.parametrize("consensus", [None, "count"])
def test_model_scope_trimming_uses_whole_model_thresholds(zoo, consensus):
    from meldkit.ops import merge_ref
    from meldkit.ops.merge import merge_tensors

    tmp, base, tunes, paths = zoo
    cfg = config_for("ties", paths, **({"consensus": consensus} if consensus else {}))
    for m in cfg[
        "models"
    ]:  # below the 30 % of entries the fine-tunes perturbed: ties at 0 stay out
        m["parameters"]["density"] = 0.2
    out = read(merge(cfg, tmp / "out", progress=False, trim_scope="model"))
    floats = [k for k, v in base.items() if v.is_floating_point()]
    densities = parse_config(cfg).model_param("density", 1.0)
    thresholds = []
    for t, tune in enumerate(tunes):
        flat = torch.cat([(tune[k].float() - base[k].float()).abs().flatten() for k in floats])
        thresholds.append(merge_ref.magnitude_threshold_ref(flat, densities[t]).item())
    kept = above = 0
    for k in floats:
        expected = merge_tensors(
            base[k].float(),
            [t[k].float() for t in tunes],
            "ties",
            weights=[0.5] * 3,
            densities=densities,
            thresholds=thresholds,
            consensus=consensus,
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(out[k], expected), k
        mag = (tunes[0][k].float() - base[k].float()).abs()
        kept += int((mag >= thresholds[0]).sum())
        above += int((mag > thresholds[0]).sum())
    # The whole model keeps its density: fewer entries lie strictly above the threshold, and the
    # kept ones (ties at the threshold included) reach it.
    k_model = int(sum(base[k].numel() for k in floats) * densities[0])
    assert above < k_model <= kept
    with pytest.raises(MergeError, match="trim_scope='model' applies to magnitude trimming"):
        merge(config_for("task_arithmetic", paths), tmp / "x", trim_scope="model")


def test_gradient_and_filtered_parameters(zoo):
    from meldkit.merging.engine import layer_positions
    from meldkit.ops.merge import merge_tensors

    tmp, base, tunes, paths = zoo
    cfg = config_for("ties", paths)
    for m in cfg["models"]:
        m["parameters"] = {
            "density": [0.2, 0.8],
            "weight": [{"filter": "mlp", "value": [2.0, 1.0]}, {"filter": "*", "value": 0.5}],
        }
    out = read(merge(cfg, tmp / "out", progress=False))
    positions = layer_positions(list(base))
    assert positions["model.embed_tokens.weight"] == 0.0
    assert positions["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert positions["model.layers.1.mlp.up_proj.weight"] == 1.0
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        t = positions[name]
        density = 0.2 + 0.6 * t
        weight = (2.0 - t) if "mlp" in name else 0.5
        expected = merge_tensors(
            tensor.float(),
            [tune[name].float() for tune in tunes],
            "ties",
            weights=[weight] * 3,
            densities=[density] * 3,
            tie="exact_k",  # the engine's rule per tensor (mergekit's)
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(out[name], expected), name


def test_layer_positions_count_each_stack_as_mergekit_does():
    # mergekit positions layer i of a module's L layers at i / (L - 1), each module (language
    # layers, vision blocks, T5's encoder and decoder) with its own L from config.json.
    from meldkit.merging.engine import layer_layout, layer_positions

    def stack(prefix, count, leaf="mlp.weight"):
        return [f"{prefix}.{i}.{leaf}" for i in range(count)]

    # Qwen2-VL: 28 language layers, 32 vision blocks
    vl = ["model.embed_tokens.weight", *stack("model.layers", 28), *stack("visual.blocks", 32)]
    pos = layer_positions(vl, {"num_hidden_layers": 28, "vision_config": {"depth": 32}})
    assert pos["model.layers.27.mlp.weight"] == 1.0
    assert pos["model.layers.14.mlp.weight"] == 14 / 27
    assert pos["visual.blocks.31.mlp.weight"] == 1.0
    assert pos["model.embed_tokens.weight"] == 0.0
    # T5: block 3 of 6 (its inner "layer.1" is not the layer)
    t5 = [
        f"{p}.block.{i}.layer.{j}.w.weight"
        for p in ("encoder", "decoder")
        for i in range(6)
        for j in (0, 1)
    ]
    pos = layer_positions(t5, {"num_layers": 6, "num_decoder_layers": 6})
    assert pos["encoder.block.3.layer.1.w.weight"] == 3 / 5
    assert pos["decoder.block.5.layer.0.w.weight"] == 1.0
    # names that start with the list (a bare transformer, RWKV)
    pos = layer_positions(
        [*stack("layers", 3), *stack("blocks", 5, "att.key.weight"), "head.weight"]
    )
    assert pos["layers.2.mlp.weight"] == 1.0 and pos["layers.1.mlp.weight"] == 0.5
    assert pos["blocks.2.att.key.weight"] == 0.5
    assert pos["head.weight"] == 0.0
    # what makes the positions uncertain
    assert layer_layout(stack("model.layers", 4), {"num_hidden_layers": 4}).problems == []
    (gap,) = layer_layout([n for n in stack("model.layers", 4) if ".2." not in n]).problems
    assert "model.layers: layers 2 missing" in gap
    (cfg,) = layer_layout(stack("model.layers", 4), {"num_hidden_layers": 6}).problems
    assert "num_hidden_layers = 6, but model.layers has 4 layers" in cfg
    (none,) = layer_layout(vl, {"num_hidden_layers": 30}).problems
    assert "no stack has that many: model.layers (28), visual.blocks (32)" in none


def test_gradients_follow_each_stack_and_are_refused_where_positions_are_uncertain(zoo):
    from meldkit.ops.merge import merge_tensors

    tmp, _, _, _ = zoo
    g = torch.Generator().manual_seed(5)
    base = {f"model.layers.{i}.w.weight": torch.randn(8, 8, generator=g) for i in range(2)}
    base |= {f"visual.blocks.{i}.w.weight": torch.randn(8, 8, generator=g) for i in range(5)}
    base["model.embed_tokens.weight"] = torch.randn(16, 8, generator=g)
    config = {"num_hidden_layers": 2, "vision_config": {"depth": 5}}
    paths = {"base": write_checkpoint(tmp / "vl_base", base, config=config)}
    tunes = [sparse_finetune(base, s, fraction=0.5, scale=0.1) for s in (1, 2)]
    for i, t in enumerate(tunes):
        paths[f"ft{i}"] = write_checkpoint(tmp / f"vl_ft{i}", t, config=config)
    cfg = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths[f"ft{i}"]), "parameters": {"weight": 1.0, "density": [0.2, 0.8]}}
            for i in range(2)
        ],
    }
    out = read(merge(cfg, tmp / "vl_out", progress=False))
    for name, t in [
        ("model.layers.1.w.weight", 1.0),  # the last language layer, not 1/4
        ("visual.blocks.2.w.weight", 0.5),
        ("model.embed_tokens.weight", 0.0),
    ]:
        expected = merge_tensors(
            base[name],
            [tu[name] for tu in tunes],
            "ties",
            weights=[1.0, 1.0],
            densities=[0.2 + 0.6 * t] * 2,
            tie="exact_k",
        )
        assert torch.equal(out[name], expected), name
    # a config.json that contradicts the tensors: a gradient is refused before any merging,
    # a merge without one goes ahead
    (paths["base"] / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    with pytest.raises(
        MergeError,
        match=r"a gradient parameter needs each tensor's layer "
        r"position.*num_hidden_layers = 3, but no stack has that many",
    ):
        merge(cfg, tmp / "vl_bad", progress=False)
    assert not (tmp / "vl_bad").exists()
    for m in cfg["models"]:
        m["parameters"]["density"] = 0.5
    merge(cfg, tmp / "vl_flat", progress=False)


def test_a_filter_that_matches_nothing_falls_through_to_the_top_level(zoo):
    # mergekit resolves a parameter from the most specific scope whose value applies: a
    # model's filtered weight that matches no filter gives the top-level weight, not the default.
    _, _, _, paths = zoo
    cfg = config_for("ties", paths, weight=0.3)
    for m in cfg["models"]:
        m["parameters"] = {"weight": [{"filter": "mlp", "value": 2.0}], "density": 0.4}
    parsed = parse_config(cfg)
    assert (
        _tensor_params(parsed, "model.layers.0.mlp.up_proj.weight", 0.0, 0)["weights"] == [2.0] * 3
    )
    assert _tensor_params(parsed, "lm_head.weight")["weights"] == [0.3] * 3


def _writer_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(40, 30, generator=g).bfloat16(),
        "b.scalar": torch.tensor(2.5),
        "c.empty": torch.empty(0, 7, dtype=torch.float16),
        "d.ids": torch.arange(11),
        "e.mask": torch.rand(5, 3, generator=g) > 0.5,
        "f.wide": torch.randn(300, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("mode", ["thread", "caller", "kernels"])
@pytest.mark.parametrize("shard_size", [10**9, 2000])
def test_writer_streams_valid_safetensors(tmp_path, mode, shard_size):
    from safetensors import safe_open

    from meldkit.merging.checkpoint import ShardedWriter

    tensors = _writer_tensors()
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(
        tmp_path / "out",
        plan,
        shard_size,
        background=mode == "thread",
        kernel_writes=mode == "kernels",
    )
    for name in reversed(list(tensors)):  # any order: every tensor has its place already
        writer.add(name, tensors[name])
    out = writer.commit(aux_from=None)
    files = sorted(out.glob("*.safetensors"))
    assert (len(files) > 1) == (shard_size == 2000)
    assert (out / "model.safetensors.index.json").is_file() == (len(files) > 1)
    got = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
            got.update({k: h.get_tensor(k) for k in h.keys()})
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.skipif(_native._C is None, reason="meldkit._C is not built")
def test_queued_writes_run_inside_the_merge_kernels_and_report_errors(tmp_path):
    from meldkit.merging.checkpoint import _KernelWrite
    from meldkit.ops import merge_tensors

    data = torch.arange(1 << 16, dtype=torch.int32)
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        write = _KernelWrite(_native._C.side_write(fd, 8, data.data_ptr(), data.nbytes), data)
        assert not write.done()
        g = torch.Generator().manual_seed(0)
        base = torch.randn(256, 256, generator=g)
        models = [base + 0.01 * torch.randn(256, 256, generator=g) for _ in range(2)]
        merge_tensors(base, models, "ties", densities=0.5)  # its merge pass runs the write
        assert write.done()
        write.result()
    finally:
        os.close(fd)
    assert path.read_bytes()[8:] == data.numpy().tobytes()
    read_only = os.open(path, os.O_RDONLY)
    try:
        bad = _KernelWrite(_native._C.side_write(read_only, 0, data.data_ptr(), 16), data)
        # Read-ahead advice shares the queue; waiting for it leaves the write's error in place.
        _native._C.side_jobs_wait(_native._C.side_advise(read_only, 0, 16))
        assert bad.done()
        with pytest.raises(OSError, match="16 bytes at offset 0 failed: Bad file descriptor"):
            bad.result()
        with pytest.raises(OSError, match="Bad file descriptor"):  # again: the same error
            bad.result()
    finally:
        os.close(read_only)
    with pytest.raises(ValueError, match="never queued"):
        _native._C.side_write_wait(10**12)
    with pytest.raises(ValueError, match="never queued"):
        _native._C.side_jobs_wait(10**12)
    with pytest.raises(ValueError, match="bad descriptor"):
        _native._C.side_advise(-1, 0, 16)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_output_folder_gets_the_mode_of_a_new_folder(zoo, umask):
    # the temporary folder is private (mkdtemp: 0700) while it is written; the output is not
    tmp, _, _, paths = zoo
    old = os.umask(umask)
    try:
        out = merge(config_for("ties", paths), tmp / "out", progress=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_too_little_free_space_fails_before_merging(zoo, monkeypatch):
    import shutil
    from collections import namedtuple

    tmp, base, _, paths = zoo
    asked = []
    usage = namedtuple("usage", "total used free")

    def small_disk(path):
        asked.append(Path(path))
        return usage(10**12, 10**12 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    monkeypatch.setattr("meldkit.ops.merge_tensors", _never_merge)
    # out_dtype bfloat16: 2 bytes a float, the integer buffer as it is
    needed = sum(
        t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in base.values()
    )
    assert 10**4 < needed < 10**5
    with pytest.raises(
        MergeError,
        match=r"out_dir .*new/out: the merged model needs (\S+) MB, "
        r"but .* has 1\.0 kB free: free some space or write the output elsewhere",
    ) as info:
        merge(config_for("ties", paths), tmp / "new" / "out", progress=False)
    # The tensors, their headers and the copied files (config, tokenizer), and 1 MiB to spare.
    asked_mb = float(re.search(r"needs (\S+) MB", str(info.value))[1])
    assert needed + 2**20 <= asked_mb * 1e6 + 5e4 and asked_mb * 1e6 <= needed + 2**20 + 2e5
    assert asked == [tmp]  # the nearest folder that exists
    assert not (tmp / "new").exists()


def _never_merge(*args, **kwargs):
    raise AssertionError("merged a tensor before the checks")


def test_writer_refuses_what_its_plan_does_not_hold(tmp_path):
    from meldkit.merging.checkpoint import ShardedWriter

    tensors = _writer_tensors()
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path / "out", plan, 10**9)
    with pytest.raises(KeyError, match="not in the writer's plan"):
        writer.add("z.unknown", torch.zeros(1))
    with pytest.raises(ValueError, match=r"planned as torch\.bfloat16"):
        writer.add("a.weight", torch.zeros(40, 30))
    with pytest.raises(ValueError, match=r"\[40, 30\], got torch.bfloat16 \[30, 40\]"):
        writer.add("a.weight", torch.zeros(30, 40, dtype=torch.bfloat16))
    writer.add("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a.weight", tensors["a.weight"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.commit(aux_from=None)
    writer.abort()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_failed_background_write_fails_the_merge(zoo, monkeypatch):
    import meldkit.merging.checkpoint as ckpt

    tmp, _, _, paths = zoo
    calls = {"n": 0}
    real = ckpt.os.pwrite

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(ckpt.os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        merge(config_for("ties", paths), tmp / "out", progress=False, background_write=True)
    assert not (tmp / "out").exists() and not list(tmp.glob(".out.*"))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_global_thresholds_exact_with_huge_tie_groups(monkeypatch, backend, dtype):
    # Whole-model thresholds by two streamed histograms (native on the CPU, bincount with
    # MELDKIT_BACKEND=reference) equal the k-th largest over the concatenation, also where a tie
    # group holds most elements: exact zeros of a sparse fine-tune, and bf16's collapsed values.
    from meldkit.merging.global_trim import global_thresholds
    from meldkit.ops import merge_ref

    monkeypatch.setenv("MELDKIT_BACKEND", backend)
    g = torch.Generator().manual_seed(4)
    shapes = {"a": (300, 70), "b": (5,), "c": (1 << 17,), "d": (0, 3)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    sparse = {
        k: (v.float() + (torch.rand(v.shape, generator=g) < 0.2) * torch.randn(v.shape)).to(dtype)
        for k, v in base.items()
    }
    dense = {
        k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()
    }
    models = [sparse, dense, base]  # the last: every magnitude 0
    names = list(shapes)
    for densities in ([0.1, 0.3, 0.5], [0.5, 0.9, 0.01], [0.0, 1.0, 0.2], [0.19, 0.999, 1.0]):
        got = global_thresholds(
            names, lambda n: base[n], lambda n: [m[n] for m in models], densities
        )
        for t, (m, d) in enumerate(zip(models, densities, strict=True)):
            flat = torch.cat([(m[n].float() - base[n].float()).abs().flatten() for n in names])
            k = int(flat.numel() * d)
            if k <= 0 or k >= flat.numel():
                assert got[t] == (math.inf if k <= 0 else -math.inf)
            else:
                assert got[t] == merge_ref.magnitude_threshold_ref(flat, d).item(), (t, d)
    bad = {k: v.clone() for k, v in dense.items()}
    bad["c"][777] = float("nan")
    with pytest.raises(ValueError, match="c: the task vector of model 1 contains NaN"):
        global_thresholds(names, lambda n: base[n], lambda n: [sparse[n], bad[n]], [0.3, 0.3])


# ---- mergekit's semantics where meldkit differed (each case checked against mergekit 0.1.5) ----


def test_linear_averages_the_base_like_any_model(zoo):
    # mergekit's linear has no θ₀: a base_model listed among the models is averaged with its
    # weight, and one only named as base_model is added with the top-level weight.
    tmp, base, tunes, paths = zoo
    f32 = {n: t.float() for n, t in base.items() if t.is_floating_point()}
    ft = [{n: t.float() for n, t in tune.items() if t.is_floating_point()} for tune in tunes]
    listed = config_for("linear", paths, n=1)
    listed["models"].insert(0, {"model": str(paths["base"]), "parameters": {"weight": 1.0}})
    listed["base_model"] = str(paths["base"])
    out = read(merge(listed, tmp / "listed", progress=False))
    for n, t in f32.items():
        assert torch.equal(out[n], ((t + ft[0][n]) / 2).bfloat16()), n
    named = config_for("linear", paths, n=2)
    named["base_model"] = str(paths["base"])
    named["parameters"] = {"weight": 2.0}
    out = read(merge(named, tmp / "named", progress=False))
    for n, t in f32.items():
        expected = (2 * t + ft[0][n] + ft[1][n]) / 4
        torch.testing.assert_close(out[n].float(), expected.bfloat16().float(), rtol=0, atol=0)
    del named["parameters"]  # mergekit: "Missing required parameter weight" for the base
    with pytest.raises(ConfigError, match="base_model: linear averages the base"):
        parse_config(named)
    # the slices form: a base among a slice's sources is averaged; one only named is not added
    for listed_base, count in ((True, 4), (False, 3)):
        sliced = _slices(paths, [(0, LAYERS)], [{"weight": 1.0}], base=listed_base)
        assert len(parse_config({**sliced, "merge_method": "linear"}).models) == count
    # every other method merges onto the base: listed among the models, it adds τ = 0
    ties = config_for("ties", paths, n=1)
    ties["models"].append({"model": str(paths["base"]), "parameters": {"weight": 1.0}})
    assert len(parse_config(ties).models) == 1


def test_della_density_one_or_zero_and_bad_values_fail_before_merging(zoo, monkeypatch):
    tmp, base, tunes, paths = zoo
    cfg = config_for("ties", paths, n=1)
    cfg["merge_method"] = "della"
    cfg["models"][0]["parameters"] = {"weight": 1.0}  # density 1 by default: τ kept whole
    out = read(merge(cfg, tmp / "whole", progress=False))
    for n, t in tunes[0].items():
        assert torch.equal(out[n], t), n
    cfg["models"][0]["parameters"] = {"weight": 1.0, "density": 0}  # τ dropped
    out = read(merge(cfg, tmp / "none", progress=False))
    for n, t in base.items():
        assert torch.equal(out[n], t), n

    import meldkit.ops

    def never(*args, **kwargs):
        raise AssertionError("a tensor was merged before the parameters were checked")

    monkeypatch.setattr(meldkit.ops, "merge_tensors", never)
    cases = [
        ({"density": 0.1}, "models[0] (", "density 0.1 and epsilon 0.15 (the default)"),
        ({"density": 0.9, "epsilon": 0.2}, "models[0] (", "density 0.9 and epsilon 0.2;"),
        # a gradient: 0.1 at the last layer only, found by resolving every tensor up front
        ({"density": [0.5, 0.1]}, "model.layers.1.", "density 0.1 and epsilon 0.15"),
        ({"epsilon": -0.1}, "models[0].parameters.epsilon: -0.1 is not in [0, 1]", ""),
    ]
    for params, where, text in cases:
        cfg["models"][0]["parameters"] = {"weight": 1.0, **params}
        with pytest.raises(ConfigError) as info:
            merge(cfg, tmp / "bad", progress=False)
        assert where in str(info.value) and text in str(info.value), str(info.value)
    crumbs = config_for("breadcrumbs", paths, n=1)
    crumbs["models"][0]["parameters"]["gamma"] = -0.1
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.gamma: -0.1 is not in"):
        merge(crumbs, tmp / "bad", progress=False)
    crumbs["models"][0]["parameters"]["gamma"] = [{"filter": "mlp", "value": 1.5}, {"value": 0}]
    with pytest.raises(ConfigError, match=r"gamma: 1.5 is not in \[0, 1\]"):
        merge(crumbs, tmp / "bad", progress=False)
    assert not (tmp / "bad").exists()


def test_shard_sizes_read_b_as_billions_like_mergekit(zoo, capsys):
    from meldkit.cli import main
    from meldkit.merging.checkpoint import parse_size

    assert parse_size("1B") == parse_size("1b") == 10**9  # mergekit's README: --out-shard-size 1B
    assert parse_size("5B") == 5 * 10**9 and parse_size("500M") == 500 * 10**6
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4KB") == parse_size("4k") == 4000
    assert parse_size("1.5MB") == 1_500_000 and parse_size("1e9") == parse_size(10**9)
    for bad in ("five", "GB", "", "1XB", "nanGB", "0", "-5GB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    tmp, _, _, paths = zoo
    cfg_path = tmp / "ties.yaml"
    cfg_path.write_text(yaml.safe_dump(config_for("ties", paths)))
    args = ["merge", str(cfg_path), str(tmp / "out"), "--no-progress"]
    assert main([*args, "--out-shard-size", "5 parsecs"]) == 2
    err = capsys.readouterr().err
    assert "out_shard_size: not a size: '5 parsecs'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp / "out").exists()


def test_keys_mergekit_accepts_are_accepted(zoo):
    tmp, _, _, paths = zoo
    for method in ("task_arithmetic", "breadcrumbs", "della_linear", "ties", "dare_linear"):
        cfg = config_for("ties", paths)
        cfg["merge_method"] = method
        cfg["parameters"] = {"int8_mask": True, "rescale": False, "lambda": 1.0}
        if method == "task_arithmetic":
            with pytest.warns(UserWarning, match="change nothing in task_arithmetic"):
                parse_config(cfg)
        else:
            parse_config(cfg)
    # task_arithmetic takes density and rescale, as mergekit does, and ignores them as mergekit
    # does (it sparsifies nothing), saying so: the merge is the same
    ta = config_for("task_arithmetic", paths)
    plain = read(merge(ta, tmp / "plain", progress=False))
    for m in ta["models"]:
        m["parameters"]["density"] = 0.3
    ta["parameters"] = {"rescale": True, "int8_mask": True}
    with pytest.warns(UserWarning, match="density and rescale change nothing in task_arithmetic"):
        inert = read(merge(ta, tmp / "ta", progress=False))
    assert all(torch.equal(a, b) for a, b in zip(inert.values(), plain.values(), strict=True))
    # int8_mask changes nothing: mergekit's memory saving for masks meldkit never holds
    ties = config_for("ties", paths)
    a = read(merge(ties, tmp / "a", progress=False))
    b = read(merge({**ties, "parameters": {"int8_mask": True}}, tmp / "b", progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # rescale by name: the DARE paper's inverse density
    # rescale by name: the DARE paper's inverse density
    dare = config_for("dare_ties", paths)
    for name in ("inverse_density", "l1", "none"):
        dare["parameters"] = {"rescale": name}
        assert _tensor_params(parse_config(dare))["rescale"] == name
    dare["parameters"] = {"rescale": "l2"}
    with pytest.raises(ConfigError, match=r"parameters\.rescale: 'l2' is not a rescaling"):
        parse_config(dare)


def test_a_top_level_parameter_given_per_model(zoo):
    # mergekit ignores a per-model lambda silently (it merges with the top-level lambda or its
    # default, 1). meldkit takes it when every merged model gives the same value, with a
    # warning, and refuses it otherwise: never ignored.
    tmp, _, _, paths = zoo
    top = config_for("ties", paths, **{"lambda": 0.5})
    per_model = config_for("ties", paths)
    for m in per_model["models"]:
        m["parameters"]["lambda"] = 0.5
    with pytest.warns(
        UserWarning,
        match=r"lambda: 0\.5 given by every model .*taken as "
        r"parameters\.lambda.*mergekit ignores a per-model lambda",
    ):
        got = read(merge(per_model, tmp / "per_model", progress=False))
    want = read(merge(top, tmp / "top", progress=False))
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the base listed among the models need not give it
    with_base = json.loads(json.dumps(per_model))
    with_base["models"].insert(0, {"model": str(paths["base"])})
    with pytest.warns(UserWarning, match="given by every model"):
        assert parse_config(with_base).params["lambda"] == 0.5
    # only the base entry gives it: ignored with a warning, as mergekit ignores it
    base_only = json.loads(json.dumps(config_for("ties", paths)))
    base_only["models"].insert(0, {"model": str(paths["base"]), "parameters": {"lambda": 0.5}})
    with pytest.warns(UserWarning, match="only entries that are not merged give it"):
        assert "lambda" not in parse_config(base_only).params
    one = config_for("ties", paths)
    one["models"][0]["parameters"]["lambda"] = 0.5
    with pytest.raises(
        ConfigError,
        match=r"models\[0\]\.parameters\.lambda: lambda is a "
        r"top-level parameter of ties .*but models\[1\]\.parameters gives none",
    ):
        parse_config(one)
    differ = json.loads(json.dumps(per_model))
    differ["models"][2]["parameters"]["lambda"] = 2.0
    with pytest.raises(ConfigError, match=r"models\[2\]\.parameters gives 2\.0"):
        parse_config(differ)
    clash = {**per_model, "parameters": {"lambda": 0.8}}
    with pytest.raises(ConfigError, match=r"but parameters\.lambda is 0\.8"):
        parse_config(clash)
    # a slice's sources: the same rule, for the slice's value
    sliced = _slices(paths, [(0, LAYERS)], [{"weight": 0.5, "density": 0.4}])
    for src in sliced["slices"][0]["sources"][1:]:
        src["parameters"] = {"lambda": 0.5}
    with pytest.warns(UserWarning, match=r"taken as slices\[0\]\.parameters\.lambda"):
        got = read(merge(sliced, tmp / "sliced", progress=False))
    assert all(torch.equal(got[k], want[k]) for k in want)
    sliced["slices"][0]["sources"][1]["parameters"] = {}
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources\[1\]\.parameters gives none"):
        parse_config(sliced)


def test_malformed_parameters_blocks_are_config_errors(zoo):
    _, _, _, paths = zoo
    good = config_for("ties", paths)
    with pytest.raises(ConfigError, match="parameters: expected a mapping"):
        parse_config({**good, "parameters": [1]})
    bad = json.loads(json.dumps(good))
    bad["models"][1]["parameters"] = [1, 2]
    with pytest.raises(ConfigError, match=r"models\[1\].parameters: expected a mapping"):
        parse_config(bad)


def test_pickle_folders_load_only_the_model_weights(zoo):
    tmp, base, _, _ = zoo
    trainer = tmp / "trainer"
    trainer.mkdir()
    names = sorted(base)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half]}
    shards["pytorch_model-00002-of-00002.bin"] = names[half:]
    for fname, keys in shards.items():
        torch.save({k: base[k] for k in keys}, trainer / fname)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (trainer / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    # A Trainer's other pickles: not weights (weights_only=True cannot even load the first)
    (trainer / "training_args.bin").write_bytes(b"not a state dict")
    torch.save({"step": torch.tensor(3)}, trainer / "optimizer.bin")
    ck = Checkpoint(trainer, allow_pickle=True)
    assert sorted(ck.names) == names and "step" not in ck
    assert torch.equal(ck.get("lm_head.weight"), base["lm_head.weight"])
    (trainer / "pytorch_model-00002-of-00002.bin").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.bin: not a readable PyTorch"):
        Checkpoint(trainer, allow_pickle=True)


def test_nan_in_a_task_vector_is_a_one_line_cli_error(zoo, capsys):
    from meldkit.cli import main

    tmp, _, tunes, paths = zoo
    poisoned = dict(tunes[0])
    poisoned["lm_head.weight"] = poisoned["lm_head.weight"].clone()
    poisoned["lm_head.weight"][3, 4] = float("nan")
    write_model(tmp / "nan", poisoned)
    cfg = config_for("ties", paths)
    cfg["models"][0]["model"] = str(tmp / "nan")
    cfg_path = tmp / "nan.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(cfg_path), str(tmp / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meldkit merge: ") and len(err.strip().splitlines()) == 1, err
    assert "lm_head.weight: " in err and "nan" in err.lower() and not (tmp / "out").exists()


def test_float_against_integer_dtype_is_refused_before_merging(zoo):
    tmp, base, _, paths = zoo
    wrong = dict(base)
    wrong["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.int32)
    write_model(tmp / "int", wrong)
    cfg = config_for("ties", paths)
    cfg["models"][1]["model"] = str(tmp / "int")
    with pytest.raises(MergeError, match=r"model.norm.weight has dtype int32, \S+ has bfloat16"):
        merge(cfg, tmp / "out", progress=False)
    # float dtypes may differ: every input is converted to the compute dtype
    halves = {k: v.half() if v.is_floating_point() else v for k, v in base.items()}
    write_model(tmp / "fp16", halves)
    cfg["models"][1]["model"] = str(tmp / "fp16")
    assert merge(cfg, tmp / "out", progress=False).is_dir()


def test_config_json_records_the_output_dtype(zoo):
    tmp, _, _, paths = zoo
    config = json.loads((paths["base"] / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (paths["base"] / "config.json").write_text(json.dumps(config))
    cfg = config_for("ties", paths)  # dtype float32, out_dtype bfloat16
    out = json.loads((merge(cfg, tmp / "out", progress=False) / "config.json").read_text())
    assert out["torch_dtype"] == "bfloat16" and out["hidden_size"] == HIDDEN
    del cfg["out_dtype"]
    cfg["dtype"] = "float16"
    out = json.loads((merge(cfg, tmp / "out2", progress=False) / "config.json").read_text())
    assert out["torch_dtype"] == "float16"
    del cfg["dtype"]  # neither: the base's config as it is
    out = json.loads((merge(cfg, tmp / "out3", progress=False) / "config.json").read_text())
    assert out["torch_dtype"] == "float32"


def test_slerp_t_per_tensor_like_mergekit(zoo):
    # mergekit's standard slerp config: t filtered by tensor name, a gradient over the layers
    from meldkit.ops import merge_ref

    tmp, base, tunes, paths = zoo
    cfg = config_for("slerp", paths, n=1)
    cfg["parameters"] = {
        "t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]
    }
    out = read(merge(cfg, tmp / "out", progress=False))
    t_of = {
        "model.layers.0.self_attn.q_proj.weight": 0.0,
        "model.layers.1.self_attn.q_proj.weight": 1.0,
        "model.layers.0.mlp.up_proj.weight": 1.0,
        "model.layers.1.mlp.down_proj.weight": 0.0,
        "model.layers.1.input_layernorm.weight": 0.5,
        "lm_head.weight": 0.5,
    }
    for name, t in t_of.items():
        expected = merge_ref.slerp_ref(
            base[name].float(), tunes[0][name].float(), t, out_dtype=torch.bfloat16
        )
        assert torch.equal(out[name], expected), name
    del cfg["parameters"]  # mergekit: "Missing required parameter t"
    with pytest.raises(ConfigError, match=r"slerp needs parameters\.t"):
        parse_config(cfg)
    cfg["parameters"] = {"t": [{"filter": "mlp", "value": 0.3}]}  # no default for the others
    with pytest.raises(
        ConfigError, match=r"parameters\.t: no filter matches (lm_head|model\.embed)"
    ):
        merge(cfg, tmp / "out2", progress=False)


def test_byte_ranges_locate_each_tensors_bytes(zoo):
    _, _, tunes, paths = zoo
    ck = Checkpoint(paths["ft1"])  # the sharded one
    assert len({ck.byte_range(n)[0] for n in ck.names}) == 2
    for n in ck.names:
        path, offset, length = ck.byte_range(n)
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        t = tunes[1][n]
        assert length == t.numel() * t.element_size()
        assert raw == t.contiguous().view(torch.uint8).numpy().tobytes(), n


def _advice_log(monkeypatch):
    """Record the read-ahead thread's posix_fadvise calls as (path, offset, length)."""
    calls, cond = [], threading.Condition()
    paths_of = {}
    real_open = os.open

    def fake_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        paths_of[fd] = Path(path)
        return fd

    def fake_fadvise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        with cond:
            calls.append((paths_of[fd], offset, length))
            cond.notify_all()

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "posix_fadvise", fake_fadvise, raising=False)
    return calls, cond


def test_read_ahead_reads_the_next_step_and_its_window_in_order(tmp_path, monkeypatch):
    files = []
    for i in range(2):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"\0" * 1000)
    # Six steps of 100 bytes (two ranges of 50, one per file).
    steps = [[(files[0], 50 * k, 50), (files[1], 50 * k, 50)] for k in range(6)]
    calls, cond = _advice_log(monkeypatch)

    def issued(count):
        with cond:
            assert cond.wait_for(lambda: len(calls) >= count, timeout=10)
        time.sleep(0.05)  # time enough for a call too many to show up
        with cond:
            return list(calls)

    with ReadAhead(steps, window=150) as ra:  # the next step, and one more whole step
        assert issued(6) == steps[0] + steps[1] + steps[2]
        ra.at(1)
        assert issued(8) == steps[0] + steps[1] + steps[2] + steps[3]
        ra.at(5)
        assert issued(12) == [r for s in steps for r in s]
    calls.clear()
    with ReadAhead(steps, window=0) as ra:
        assert issued(4) == steps[0] + steps[1]
        ra.at(2)
        assert issued(8) == steps[0] + steps[1] + steps[2] + steps[3]


def test_merges_read_ahead_and_give_the_same_output_at_any_distance(zoo, monkeypatch):
    tmp, _, _, paths = zoo
    want = read(merge(config_for("ties", paths), tmp / "off", progress=False, read_ahead=None))
    made = []

    class Recorded(ReadAhead):  # what the merge asks of its read-aheads
        def __init__(self, steps, window, *, kernels=False):
            self.steps, self.window, self.kernels, self.started = steps, window, kernels, []
            super().__init__(steps, window, kernels=kernels)
            made.append(self)

        def at(self, step):
            self.started.append(step)
            super().at(step)

    monkeypatch.setattr("meldkit.merging.engine.ReadAhead", Recorded)
    inputs = [Checkpoint(p) for p in paths.values()]
    names = inputs[0].names
    # Every input's bytes of a floating tensor; only the base's of an integer buffer (copied).
    every = [
        [c.byte_range(n) for c in (inputs if inputs[0].dtype(n).is_floating_point else inputs[:1])]
        for n in names
    ]
    floats = [s for s, n in zip(every, names, strict=True) if inputs[0].dtype(n).is_floating_point]
    for i, (ahead, window) in enumerate([(0, 0), ("1KB", 1000), ("1GB", 10**9), (5000, 5000)]):
        made.clear()
        got = read(
            merge(config_for("ties", paths), tmp / f"o{i}", progress=False, read_ahead=ahead)
        )
        assert all(torch.equal(want[k], got[k]) for k in want)
        [ra] = made
        assert ra.steps == every and ra.window == window and ra.kernels  # CPU: the kernels read
        assert ra.started == [0, *range(len(names))]  # step 0 read ahead as it was made
    # Whole-model trimming reads every floating tensor twice before the merge does, on a thread:
    # its histogram passes are not merge kernels.
    made.clear()
    calls, _ = _advice_log(monkeypatch)
    merge(config_for("ties", paths), tmp / "model", progress=False, trim_scope="model")
    trim, merging = made
    assert trim.steps == floats * 2 and trim.started == list(range(2 * len(floats)))
    assert not trim.kernels
    # Advice in the passes' order, once per range (the passes may end before the last).
    assert calls == [r for s in floats * 2 for r in s][: len(calls)]
    assert merging.steps == every and merging.started == [0, *range(len(names))]
    made.clear()
    merge(config_for("ties", paths), tmp / "none", progress=False, read_ahead=None)
    assert [ra.steps for ra in made] == [[]]


def _cached(fd, offset, length):
    """Whether ``length`` bytes at ``offset`` are in the page cache (a read that must not wait)."""
    try:
        return os.preadv(fd, [bytearray(length)], offset, os.RWF_NOWAIT) == length
    except BlockingIOError:
        return False


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs preadv(RWF_NOWAIT) (Linux)")
def test_read_ahead_in_the_merge_kernels_reads_files_into_the_page_cache(tmp_path):
    f = tmp_path / "weights"
    f.write_bytes(os.urandom(4 << 20))
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if _cached(fd, 0, 4096):
            pytest.skip("this file system keeps its files in memory")
        halves = [[(f, 0, 2 << 20)], [(f, 2 << 20, 2 << 20)]]
        with ReadAhead(halves, 0, kernels=True):
            pass  # no merge kernel runs: closing runs the queued advice on this thread
        deadline = time.monotonic() + 30
        while not (_cached(fd, 0, 2 << 20) and _cached(fd, 2 << 20, 2 << 20)):
            assert time.monotonic() < deadline, "the advised bytes never reached the page cache"
            time.sleep(0.01)
    finally:
        os.close(fd)


def test_read_ahead_is_advice_only(zoo, monkeypatch):
    tmp, _, _, paths = zoo
    want = read(merge(config_for("ties", paths), tmp / "want", progress=False, read_ahead=None))

    def failing(*_):
        raise OSError(22, "fadvise refused")

    monkeypatch.setattr(os, "posix_fadvise", failing, raising=False)  # a refusal is ignored
    got = read(merge(config_for("ties", paths), tmp / "a", progress=False))
    assert all(torch.equal(want[k], got[k]) for k in want)
    monkeypatch.delattr(os, "posix_fadvise", raising=False)  # platforms without it
    got = read(merge(config_for("ties", paths), tmp / "b", progress=False))
    assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(MergeError, match="read_ahead"):
        merge(config_for("ties", paths), tmp / "c", progress=False, read_ahead="lots")


@pytest.mark.filterwarnings("ignore::meldkit.MeldkitFallbackWarning")  # > 32 models: reference
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_more_models_than_the_kernels_take(zoo, method, monkeypatch):
    # 33 fine-tunes: the native kernels take 32 per call; the merge runs the reference instead
    # of failing at the first tensor, and equals the in-memory merge (a fallback, which
    # MELDKIT_BACKEND=native refuses: test_native_backend_refuses_every_fallback).
    monkeypatch.setenv("MELDKIT_BACKEND", "auto")
    tmp, base, _, paths = zoo
    n = 33
    tunes = [finetune(base, 100 + i) for i in range(n)]
    for i, t in enumerate(tunes):
        paths[f"ft{i}"] = write_model(tmp / f"many{i}", t)
    cfg = config_for(method, paths, n=n)
    merged = read(merge(cfg, tmp / "out", seed=3, progress=False))

    def f32(d):
        return {k: v.float() if v.is_floating_point() else v for k, v in d.items()}

    per_model = cfg["models"][0]["parameters"]
    expected = merge_state_dicts(
        f32(base),
        [f32(t) for t in tunes],
        method,
        seed=3,
        weights=[per_model["weight"]] * n,
        densities=[per_model["density"]] * n,
        out_dtype=torch.bfloat16,
    )
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "della", "linear"])
def test_weight_is_required_as_in_mergekit(zoo, method):
    # mergekit declares weight without a default for the task-vector methods and linear, and
    # stops with "Missing required parameter weight": so does meldkit, naming the model.
    _, _, _, paths = zoo
    cfg = config_for("ties" if method == "della" else method, paths)
    cfg["merge_method"] = method
    if method == "della":
        for m in cfg["models"]:
            m["parameters"]["density"] = 0.5
    del cfg["models"][1]["parameters"]["weight"]
    with pytest.raises(
        ConfigError, match=rf"models\[1\] \({re.escape(str(paths['ft1']))}\): weight is missing"
    ):
        parse_config(cfg)
    cfg["parameters"] = {"weight": 0.25}  # a top-level weight is every model's default
    parsed = parse_config(cfg)
    assert _tensor_params(parsed, "lm_head.weight")["weights"][1] == 0.25


def test_a_filtered_weight_that_leaves_a_tensor_without_one_is_refused(zoo):
    # weight: [{filter: mlp, value: 0.5}] gives the other tensors no weight (no default
    # below it): refused before any tensor is merged, naming the model, tensor and parameter.
    tmp, _, _, paths = zoo
    cfg = config_for("task_arithmetic", paths)
    cfg["models"][2]["parameters"] = {"weight": [{"filter": "mlp", "value": 0.5}]}
    with pytest.raises(
        ConfigError,
        match=rf"models\[2\] \({re.escape(str(paths['ft2']))}\): weight: no value for tensor "
        r"lm_head\.weight",
    ):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists() and not list(tmp.glob(".out.*"))
    # A slice whose sources and parameters give no weight, with none at the top level: the
    # head goes with the last slice.
    sliced = _slices(paths, [(0, 1), (1, LAYERS)], [{"weight": 0.5}, {"density": 0.4}])
    with pytest.raises(
        ConfigError,
        match=rf"^slices \({re.escape(str(paths['ft0']))}\): weight: no value for tensor "
        r"lm_head\.weight",
    ):
        merge(sliced, tmp / "out", progress=False)
    # With a filter that matches every remaining tensor, or a top-level weight, it merges.
    cfg["models"][2]["parameters"]["weight"].append({"value": 0.2})
    assert merge(cfg, tmp / "out", progress=False).is_dir()


def test_every_tokenizer_file_travels_with_the_merge(zoo):
    # Tokenizers without tokenizer.json load from their vocabulary files: every one of them
    # (and the files the configs name) is copied, or the merged model loads a wrong tokenizer.
    tmp, _, _, paths = zoo
    src = paths["base"]
    files = {
        "vocab.txt": "[PAD]\n[UNK]\nw1\n",
        "spiece.model": "sp",
        "sentencepiece.bpe.model": "bpe",
        "tokenizer.model.v3": "v3",
        "chat_template.json": '{"chat_template": "{{ x }}"}',
        "vocab.json": '{"a": 0}',
        "merges.txt": "a b\n",
        "my.vocab": "custom",
        "tokenization_custom.py": "# remote code\n",
        "modeling_custom.py": "# remote code\n",
        "additional_chat_templates/tools.jinja": "{{ tools }}",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_text(text)
    (src / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "vocab_file": "my.vocab",
                "auto_map": {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]},
            }
        )
    )
    config = {"model_type": "llama", "auto_map": {"AutoModel": "modeling_custom.CustomModel"}}
    (src / "config.json").write_text(json.dumps(config))
    (src / "notes.txt").write_text("not the model's")
    out = merge(config_for("ties", paths), tmp / "out", progress=False)
    for name, text in files.items():
        assert (out / name).read_text() == text, name
    assert not (out / "notes.txt").exists()


def test_tokenizer_source_by_hugging_face_id_and_older_spellings(zoo, monkeypatch):

    constants = pytest.importorskip("huggingface_hub.constants")
    tmp, _, _, paths = zoo
    cache = tmp / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshots = {}
    for repo, folder in (("tiny-base", "base"), ("tiny-ft", "ft0")):
        (paths[folder] / "tokenizer.json").write_text(json.dumps({"from": folder}))
        snapshots[repo] = _cached_snapshot(cache, f"org/{repo}", paths[folder], commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config_for("ties", paths)
    cfg["base_model"] = "org/tiny-base"
    cfg["models"][0]["model"] = "org/tiny-ft"
    # A merged model named by its ID; older mergekit's model: prefix; dtype as torch spells it.
    for source in ("org/tiny-ft", "model:org/tiny-ft"):
        assert (
            parse_config({**cfg, "tokenizer_source": source}).tokenizer_source
            == (snapshots["tiny-ft"])
        )
    relative = {**config_for("ties", paths), "tokenizer_source": f"model:{paths['ft1']}"}
    assert parse_config(relative).tokenizer_source == paths["ft1"]
    out = merge({**cfg, "tokenizer_source": "org/tiny-ft"}, tmp / "out", progress=False)
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "ft0"}
    parsed = parse_config({**cfg, "dtype": "torch.float32", "out_dtype": "torch.bfloat16"})
    assert (parsed.dtype, parsed.out_dtype) == (torch.float32, torch.bfloat16)
    with pytest.raises(ConfigError, match=r"dtype: 'torch\.float8'"):
        parse_config({**cfg, "dtype": "torch.float8"})


def test_larger_vocabularies_are_trimmed_to_the_base_as_in_mergekit(zoo):
    # A fine-tune with 8 added tokens: its embeddings and head merge over the base's rows, with
    # one warning naming both tensors and the model (spec §5.4); fewer rows are refused.
    tmp, _, tunes, paths = zoo
    big = dict(tunes[1])
    extra = torch.randn(8, HIDDEN).to(torch.bfloat16)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        big[name] = torch.cat([big[name], extra])
    paths["big"] = write_model(tmp / "big", big)
    cfg = config_for("ties", paths)
    want = read(merge(cfg, tmp / "want", progress=False))
    cfg["models"][1]["model"] = str(paths["big"])
    with pytest.warns(UserWarning, match="vocabulary sizes differ") as record:
        got = read(merge(cfg, tmp / "got", progress=False))
    message = str(record[0].message)
    assert len(record) == 1 and str(paths["big"]) in message
    assert "lm_head.weight (72 rows, not 64)" in message
    assert "model.embed_tokens.weight (72 rows, not 64)" in message
    assert all(torch.equal(got[k], want[k]) for k in want)
    small = dict(tunes[1])
    small["lm_head.weight"] = small["lm_head.weight"][:60]
    cfg["models"][1]["model"] = str(write_model(tmp / "small", small))
    with pytest.raises(MergeError, match=r"lm_head.weight has shape \[60, 16\].*fewer vocabulary"):
        merge(cfg, tmp / "out", progress=False)
    # Other tensors must match exactly, as before.
    wide = dict(tunes[1])
    wide["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3 * HIDDEN + 8, HIDDEN)
    cfg["models"][1]["model"] = str(write_model(tmp / "wide", wide))
    with pytest.raises(MergeError, match=r"up_proj.weight has shape \[56, 16\]"):
        merge(cfg, tmp / "out", progress=False)


def _big_vocabulary(tmp, tunes, paths):
    """A fine-tune of the zoo with 8 added tokens (72 rows of embeddings and head, not 64)."""
    big = dict(tunes[1])
    extra = torch.randn(8, HIDDEN).to(torch.bfloat16)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        big[name] = torch.cat([big[name], extra])
    paths["big"] = write_model(tmp / "big", big)
    for name, folder in paths.items():
        (folder / "tokenizer.json").write_text(json.dumps({"from": name}))
    return paths["big"]


def test_the_tokenizer_of_a_trimmed_model_is_refused(zoo):
    # Its embeddings are trimmed to the base's rows: its larger tokenizer would not match them.
    tmp, _, tunes, paths = zoo
    big = _big_vocabulary(tmp, tunes, paths)
    cfg = config_for("ties", paths)
    cfg["models"][1]["model"] = str(big)
    for model, source in (
        (big, {"tokenizer_source": str(big)}),
        (big, {"tokenizer": {"source": f"model:{big}"}}),
        (big / "model.safetensors", {"tokenizer_source": str(big / "model.safetensors")}),
    ):
        cfg["models"][1]["model"] = str(model)
        with pytest.raises(
            ConfigError,
            match=rf"tokenizer source .*big.*: {re.escape(str(model))} has more vocabulary rows "
            rf"than the base {re.escape(str(paths['base']))} \(lm_head\.weight \(72 rows, not "
            r"64\), model\.embed_tokens\.weight \(72 rows, not 64\)\).*Take the tokenizer from "
            "the base",
        ):
            merge({**cfg, **source}, tmp / "out", progress=False)
        assert not (tmp / "out").exists()
    # The base's tokenizer, or a model's whose rows are the base's, is taken (with the warning).
    for source, expected in (("base", "base"), (str(paths["ft0"]), "ft0")):
        with pytest.warns(UserWarning, match="vocabulary sizes differ"):
            out = merge({**cfg, "tokenizer_source": source}, tmp / f"o{expected}", progress=False)
        assert json.loads((out / "tokenizer.json").read_text()) == {"from": expected}
        assert read(out)["model.embed_tokens.weight"].shape[0] == VOCAB


def test_without_a_base_vocabulary_sizes_must_match_in_any_order(zoo):
    # Linear without base_model: no model's vocabulary is the output's, so a larger one is
    # refused whether it comes first (it was then the reference, the others refused) or later
    # (it was trimmed to the first model's).
    tmp, _, tunes, paths = zoo
    big = _big_vocabulary(tmp, tunes, paths)
    for position in (0, 1):
        cfg = config_for("linear", paths)
        cfg["models"][position]["model"] = str(big)
        with pytest.raises(
            MergeError,
            match=r"(lm_head|embed_tokens)\.weight has shape \[(72|64), 16\].*vocabulary sizes "
            r"differ: (72|64) rows, .* has (64|72); without base_model .*name as base_model",
        ):
            merge(cfg, tmp / "out", progress=False)
        assert not (tmp / "out").exists()
    # Naming the model whose vocabulary the output keeps as base_model trims the others to it,
    # whatever their order.
    outs = []
    for position in (0, 2):
        cfg = config_for("linear", paths)
        cfg["base_model"] = str(paths["ft0"])  # listed among the models: averaged in
        cfg["models"][1]["model"] = str(big)
        cfg["models"].insert(position, cfg["models"].pop(1))
        with pytest.warns(UserWarning, match="vocabulary sizes differ"):
            outs.append(read(merge(cfg, tmp / f"out{position}", progress=False)))
    for got in outs:
        assert got["model.embed_tokens.weight"].shape[0] == got["lm_head.weight"].shape[0] == VOCAB
    assert all(torch.allclose(outs[0][k].float(), outs[1][k].float(), atol=1e-2) for k in outs[0])


def test_models_given_as_safetensors_files_bring_their_folders_files(zoo):
    tmp, _, _, paths = zoo
    for name, folder in paths.items():
        (folder / "tokenizer.json").write_text(json.dumps({"from": name}))
    cfg = config_for("ties", paths)
    want = read(merge(cfg, tmp / "want", progress=False))
    cfg["base_model"] = str(paths["base"] / "model.safetensors")
    cfg["models"][0]["model"] = str(paths["ft0"] / "model.safetensors")
    out = merge(cfg, tmp / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "base"}
    got = read(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    cfg["tokenizer_source"] = cfg["models"][0]["model"]
    out = merge(cfg, tmp / "out2", progress=False)
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "ft0"}


def test_a_model_listed_twice_is_refused(zoo):
    # mergekit refuses duplicate merge inputs; meldkit would otherwise count the model twice.
    _, _, _, paths = zoo
    cfg = config_for("ties", paths)
    for spelling in (str(paths["ft0"]), f"{paths['ft0'].parent}/./ft0"):
        cfg["models"][2]["model"] = spelling
        with pytest.raises(
            ConfigError, match=r"models\[2\]\.model: .* is the model of models\[0\]"
        ):
            parse_config(cfg)


def test_options_are_checked_before_merging(zoo):
    tmp, _, _, paths = zoo
    cfg = config_for("dare_ties", paths)
    (tmp / "afile").write_text("")
    cases = [
        (dict(seed=-1), "seed must be an integer in"),
        (dict(seed=2**63), "seed must be an integer in"),
        (dict(seed=1.5), "seed must be an integer in"),
        (dict(device="tpu"), "device must be cpu, cuda or cuda:N, got 'tpu'"),
    ]
    for kw, text in cases:
        with pytest.raises(MergeError, match=text):
            merge(cfg, tmp / "out", progress=False, **kw)
    with pytest.raises(MergeError, match=r"out_dir .*afile: is a file, not a folder"):
        merge(cfg, tmp / "afile", progress=False)
    with pytest.raises(MergeError, match=r"afile is a file, not a folder"):
        merge(cfg, tmp / "afile" / "out", progress=False)
    assert not (tmp / "out").exists()
    cfg_path = tmp / "dare.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    for args, text in (
        (["--seed", "-1"], "argument --seed: '-1' is not an integer in [0, 2**63)"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ):
        res = _meldkit_merge_cli(cfg_path, tmp / "out", "--no-progress", *args)
        assert res.returncode == 2 and text in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    res = _meldkit_merge_cli(cfg_path, tmp / "afile", "--no-progress")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"meldkit merge: out_dir {tmp / 'afile'}: is a file, not a folder"


def test_merge_state_dicts_needs_models():
    with pytest.raises(MergeError, match="'models': expected a non-empty list"):
        merge_state_dicts(None, [], "linear")
    with pytest.raises(MergeError, match="'models'"):
        merge_state_dicts(None, {"a": torch.zeros(2)}, "linear")


def test_merge_state_dicts_names_the_tensor_of_another_dtype():
    base = {"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(2)}
    other = {"a.weight": torch.ones(3, 2), "b.weight": torch.ones(2, dtype=torch.bfloat16)}
    with pytest.raises(MergeError, match=r"b\.weight: torch\.bfloat16 on cpu in model 1, but "):
        merge_state_dicts(base, [dict(base), other], "task_arithmetic")


def test_merge_state_dicts_refuses_tensors_the_base_lacks():
    base = {"a": torch.zeros(3)}
    model = {
        "a": torch.ones(3),
        "lora_extra.weight": torch.ones(2),
        "x.position_ids": torch.arange(2),
    }
    with pytest.raises(MergeError, match=r"model 0 has 1 \(lora_extra.weight\) tensors the base"):
        merge_state_dicts(base, [model], "task_arithmetic", weights=[1.0])
    del model["lora_extra.weight"]  # buffers (an integer one here) are not weights
    assert torch.equal(
        merge_state_dicts(base, [model], "task_arithmetic", weights=[1.0])["a"], model["a"]
    )


def test_merge_state_dicts_counts_per_model_values_in_models():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(8, 8, generator=g)}
    models = [{"a": base["a"] + 0.1 * torch.randn(8, 8, generator=g)} for _ in range(2)]
    with pytest.raises(MergeError, match=r"argument 'weights': 3 values for 2 models"):
        merge_state_dicts(base, models, "ties", weights=[1, 1, 1], densities=0.5)
    with pytest.raises(MergeError, match=r"argument 'densities': 1 values for 2 models"):
        merge_state_dicts(base, models, "ties", weights=[1, 1], densities=[0.5])
    # a negative epsilon is out of range (density ± epsilon would still lie in (0, 1])
    with pytest.raises(MergeError, match=r"argument 'epsilons': -0\.1 \(model 0\) is not in "):
        merge_state_dicts(base, models, "della", weights=[1, 1], densities=0.5, epsilons=-0.1)
    with pytest.raises(MergeError, match=r"argument 'epsilons': 1\.5 \(model 1\)"):
        merge_state_dicts(base, models, "della", weights=[1, 1], densities=0.5, epsilons=[0, 1.5])
    out = merge_state_dicts(base, models, "della", weights=[1, 1], densities=0.5, epsilons=0.1)
    assert out["a"].shape == (8, 8)


def test_an_index_that_names_tensors_its_shards_lack_is_refused(zoo):
    # The merge would otherwise write a model without them (transformers initialises them).
    tmp, _, _, paths = zoo
    index = paths["ft1"] / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    moved = "model.layers.1.mlp.down_proj.weight"
    weight_map[moved] = next(f for f in weight_map.values() if f != weight_map[moved])
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MergeError, match=rf"1 tensors are not in the shards it names.*{moved}"):
        merge(config_for("ties", paths), tmp / "out", progress=False)
    assert not (tmp / "out").exists()


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ('{"weight_map": ["a"]}', "not a checkpoint index"),
        ("[]", "not a checkpoint index"),
        ('{"weight_map": null}', "not a checkpoint index"),
        (
            '{"weight_map": {"lm_head.weight": 3}}',
            "weight_map gives lm_head.weight the file 3, not a file name",
        ),
    ],
)
def test_a_malformed_index_is_a_one_line_error_naming_it(zoo, content, text):
    tmp, _, _, paths = zoo
    index = paths["ft1"] / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(CheckpointError, match=rf"index\.json: {text}"):
        Checkpoint(paths["ft1"])
    cfg_path = tmp / "ties.yaml"
    cfg_path.write_text(yaml.safe_dump(config_for("ties", paths)))
    res = _meldkit_merge_cli(cfg_path, tmp / "out", "--no-progress")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"meldkit merge: {index}: {text}")
    assert len(res.stderr.strip().splitlines()) == 1


def test_tensors_the_reference_lacks_are_refused_not_dropped(zoo):
    tmp, _, tunes, paths = zoo
    extra = dict(tunes[0])
    extra["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(3 * HIDDEN, HIDDEN)
    cfg = config_for("ties", paths)
    cfg["models"][0]["model"] = str(write_model(tmp / "extra", extra))
    with pytest.raises(
        MergeError,
        match=rf"{paths['base']}: missing 1 tensors of {tmp / 'extra'} "
        r"\(first: model.layers.0.mlp.gate_proj.weight\)",
    ):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()


# Buffers that older transformers saved and newer ones rebuild at load time (Llama's inv_freq
# before 4.31, BERT's position_ids, GPT-2's causal masks), and an integer buffer.
OLD_BUFFERS = {
    "model.layers.0.self_attn.rotary_emb.inv_freq": torch.tensor([1.0, 0.1, 0.01, 0.001]),
    "model.layers.1.self_attn.rotary_emb.inv_freq": torch.tensor([1.0, 0.1, 0.01, 0.001]),
    "bert.embeddings.position_ids": torch.arange(8)[None],
    "transformer.h.0.attn.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool).tril(),
    "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
    "model.layers.0.self_attn.counter": torch.tensor([3], dtype=torch.int32),
}


def test_buffers_a_model_has_and_the_base_lacks_are_skipped(zoo):
    """A fine-tune saved by an older transformers keeps buffers that are rebuilt at load time
    today (and any non-floating tensor): merged onto a base without them they are skipped with
    a warning naming them, as before the check for tensors the base lacks (which refused them
    as "missing tensors"); the output is the merge without them."""
    tmp, _, tunes, paths = zoo
    cfg = config_for("ties", paths)
    want = read(merge(cfg, tmp / "want", progress=False))
    old = write_model(tmp / "old", {**tunes[0], **OLD_BUFFERS})
    cfg["models"][0]["model"] = str(old)
    with pytest.warns(UserWarning, match=rf"{old}: 6 \(.*\), which {paths['base']} lacks: skip"):
        got = read(merge(cfg, tmp / "out", progress=False))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_buffers_the_base_has_and_a_model_lacks_are_copied_from_the_base(zoo):
    """The reverse: a base saved with such buffers and fine-tunes saved without them. The
    output has the base's buffers, copied (in the output dtype, as merged tensors are), the
    rest merged as without them; refused as "missing tensors" before. Without a base the first
    model is the reference, whichever side has the buffers."""
    tmp, base, tunes, paths = zoo
    cfg = config_for("ties", paths)
    want = read(merge(cfg, tmp / "want", progress=False))
    old_base = write_model(tmp / "old_base", {**base, **OLD_BUFFERS})
    cfg["base_model"] = str(old_base)
    with pytest.warns(UserWarning, match=rf"{old_base}: 6 \(.*\), which .*ft0.* lack: copied"):
        got = read(merge(cfg, tmp / "out", progress=False))
    assert got.keys() == want.keys() | OLD_BUFFERS.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    for k, v in OLD_BUFFERS.items():
        assert torch.equal(got[k], v.to(torch.bfloat16) if v.is_floating_point() else v), k
    # linear: the first model's buffers are copied; a later model's are skipped
    old_ft = write_model(tmp / "old_ft", {**tunes[0], **OLD_BUFFERS})
    for order, has in (([old_ft, paths["ft1"]], True), ([paths["ft1"], old_ft], False)):
        lin = {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in order],
        }
        with pytest.warns(UserWarning, match="copied" if has else "skipped"):
            got = read(merge(lin, tmp / f"lin_{has}", progress=False))
        assert ("transformer.h.0.attn.bias" in got) is has


def test_a_weight_the_base_lacks_is_refused_even_beside_buffers(zoo):
    """Only buffers are let through: a floating weight the base lacks (named like no rebuilt
    buffer) is still refused, named, and a floating weight a model lacks too."""
    tmp, base, tunes, paths = zoo
    extra = {**tunes[0], **OLD_BUFFERS, "model.layers.0.mlp.gate_proj.bias": torch.zeros(4)}
    cfg = config_for("ties", paths)
    cfg["models"][0]["model"] = str(write_model(tmp / "extra", extra))
    with pytest.raises(MergeError, match=r"missing 1 tensors .*\(first: model.layers.0.mlp.gate_p"):
        merge(cfg, tmp / "out", progress=False)
    lacking = {k: v for k, v in tunes[0].items() if k != "model.norm.weight"}
    cfg = config_for("ties", paths)
    cfg["base_model"] = str(write_model(tmp / "old_base", {**base, **OLD_BUFFERS}))
    cfg["models"][1]["model"] = str(write_model(tmp / "lacking", lacking))
    with pytest.raises(
        MergeError, match=r"lacking: missing 1 tensors .*\(first: model.norm.weight\)"
    ):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()


def test_one_shard_of_a_sharded_model_is_refused(zoo):
    tmp, _, _, paths = zoo
    cfg = config_for("ties", paths)
    shard = paths["ft1"] / "model-00001-of-00002.safetensors"
    cfg["base_model"] = str(shard)
    with pytest.raises(MergeError, match=rf"{shard}: one shard of the sharded model in "):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()


def _tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != "lm_head.weight"}


def test_a_head_tied_to_the_embeddings_merges_with_stored_heads(zoo):
    # As mergekit reads lm_head.weight's tied name model.embed_tokens.weight: a model whose
    # config ties its head has its embeddings read as its head, whichever side it is on, and
    # the output stores its head (tie_word_embeddings false): no model's head is dropped.
    from meldkit.ops.merge import merge_tensors

    tmp, base, tunes, paths = zoo
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    tied = {"model_type": "llama", "hidden_size": HIDDEN, "tie_word_embeddings": True}
    untied = {**tied, "tie_word_embeddings": False}
    tied_base = write_checkpoint(tmp / "tied_base", _tied(base), config=tied)
    tied_ft = write_checkpoint(tmp / "tied_ft", _tied(tunes[1]), config=tied)
    untied_ft = write_checkpoint(tmp / "untied_ft", tunes[0], config=untied)

    def ta(b, m):
        return {
            "merge_method": "task_arithmetic",
            "base_model": str(b),
            "models": [{"model": str(m), "parameters": {"weight": 1.0}}],
        }

    for b, m, b_head, m_head, tie_after in (
        (tied_base, untied_ft, base[embed], tunes[0][head], False),
        (paths["base"], tied_ft, base[head], tunes[1][embed], None),
    ):
        with pytest.warns(UserWarning, match=r"tie_word_embeddings.*the output has its own head"):
            out = merge(ta(b, m), tmp / f"out_{b.name}", progress=False)
        got = read(out)
        want = merge_tensors(b_head, [m_head], "task_arithmetic", weights=[1.0])
        assert torch.equal(got[head], want)
        config = json.loads((out / "config.json").read_text())
        assert config.get("tie_word_embeddings") is tie_after
    # linear without a base: the same head in either order
    outs = []
    for order in ((tied_ft, untied_ft), (untied_ft, tied_ft)):
        cfg = {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in order],
        }
        with pytest.warns(UserWarning, match="tie_word_embeddings"):
            outs.append(read(merge(cfg, tmp / f"lin_{order[0].name}", progress=False)))
    assert torch.equal(outs[0][head], outs[1][head])
    # a model without a head whose config does not tie it is incomplete: refused, saying so
    not_tied = write_checkpoint(tmp / "not_tied", _tied(tunes[1]), config=untied)
    with pytest.raises(MergeError, match=r"missing 1 tensors.*tie_word_embeddings: false, so"):
        merge(ta(paths["base"], not_tied), tmp / "out_not_tied", progress=False)
    no_config = tmp / "no_config"
    write_checkpoint(no_config, _tied(tunes[1]), config={})
    (no_config / "config.json").unlink()
    with pytest.raises(MergeError, match=r"missing 1 tensors.*has no config.json to say so"):
        merge(ta(paths["base"], no_config), tmp / "out_no_config", progress=False)


def test_a_config_without_tie_word_embeddings_ties_the_head(zoo):
    """transformers' default for tie_word_embeddings is True, and save_pretrained leaves out
    keys equal to their defaults (GPT-2's config.json has none): a model without a head whose
    config.json leaves the key out is tied (it used to be taken as untied and refused as an
    incomplete checkpoint). GPT-2's names, the tied model as the base and as a fine-tune."""
    from meldkit.ops.merge import merge_tensors

    tmp = zoo[0]
    g = torch.Generator().manual_seed(4)
    gpt2 = {
        "transformer.wte.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "transformer.h.0.attn.c_attn.weight": torch.randn(HIDDEN, 3 * HIDDEN, generator=g),
        "transformer.ln_f.weight": torch.ones(HIDDEN),
    }
    stored = finetune(gpt2, 2)
    stored["lm_head.weight"] = stored["transformer.wte.weight"] + 0.01
    config = {"model_type": "gpt2", "n_embd": HIDDEN, "n_layer": 1}
    tied = write_checkpoint(tmp / "gpt2", gpt2, config=config)
    untied = write_checkpoint(
        tmp / "gpt2_ft", stored, config={**config, "tie_word_embeddings": False}
    )
    for b, m, b_head, m_head in (
        (tied, untied, gpt2["transformer.wte.weight"], stored["lm_head.weight"]),
        (untied, tied, stored["lm_head.weight"], gpt2["transformer.wte.weight"]),
    ):
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": str(b),
            "models": [{"model": str(m), "parameters": {"weight": 1.0}}],
        }
        with pytest.warns(UserWarning, match=rf"{tied} \(its transformer.wte.weight read as its"):
            out = merge(cfg, tmp / f"out_{b.name}", progress=False)
        want = merge_tensors(b_head, [m_head], "task_arithmetic", weights=[1.0])
        assert torch.equal(read(out)["lm_head.weight"], want)
        # the output stores its head: a config that left the key out (true) now says false
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_config_edits_land_before_the_output_moves_into_place(zoo, monkeypatch):
    # config.json's dtype and tie_word_embeddings are edited in the temporary folder: a merge
    # interrupted after the move cannot leave a tied config beside an untied head.
    tmp, base, _, paths = zoo
    tied = {"model_type": "llama", "hidden_size": HIDDEN, "tie_word_embeddings": True}
    tied_base = write_checkpoint(tmp / "tied_base", _tied(base), config=tied)
    seen = []
    replace = os.replace

    def spy(src, dst):
        if Path(src).is_dir():
            seen.append(json.loads((Path(src) / "config.json").read_text()))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(tied_base),
        "models": [{"model": str(paths["ft0"]), "parameters": {"weight": 1.0}}],
        "dtype": "float32",
        "out_dtype": "float16",
    }
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        out = merge(cfg, tmp / "out", progress=False)
    (moved,) = seen
    assert moved["torch_dtype"] == "float16" and moved["tie_word_embeddings"] is False
    assert json.loads((out / "config.json").read_text()) == moved


def test_a_llama_config_without_tie_word_embeddings_is_untied(zoo, monkeypatch):
    """LlamaConfig defaults tie_word_embeddings to False: a Llama config.json without the key
    (written by hand) loads untied in transformers, so a Llama checkpoint without its head is
    incomplete, refused naming the default (its embeddings were merged as its head)."""
    from meldkit.merging import engine

    tmp, _, tunes, paths = zoo
    headless = write_checkpoint(
        tmp / "headless", _tied(tunes[1]), config={"model_type": "llama", "hidden_size": HIDDEN}
    )
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "models": [{"model": str(headless), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(MergeError, match=r"leaves tie_word_embeddings out, which for model_type"):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()
    # transformers' class defaults, and the table used without transformers
    for available in (True, False):
        engine._default_tie.cache_clear()
        if not available:
            monkeypatch.setitem(sys.modules, "transformers", None)
        assert engine._default_tie("llama") is False
        assert engine._default_tie("qwen2") is False
        assert engine._default_tie("gpt2") is True
        assert engine._default_tie("gemma") is True
        assert engine._default_tie(None) is True
        # a multimodal config ties by its text model's default
        assert engine._default_tie("llava", "gemma") is True
        assert engine._default_tie("llava", "llama") is False
    engine._default_tie.cache_clear()


def test_tied_heads_of_multimodal_bert_and_stored_tied_heads(zoo):
    """Llava/Gemma-3 as transformers saves them (language_model.*), BERT's decoder bias, a
    tied base that stores its head beside an untied fine-tune (the output config is untied),
    and T5's tied head refused with its own reason."""
    from meldkit.ops.merge import merge_tensors

    tmp = zoo[0]
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def ta(b, m):
        return {
            "merge_method": "task_arithmetic",
            "base_model": str(b),
            "models": [{"model": str(m), "parameters": {"weight": 1.0}}],
        }

    def merged(b_head, m_head):
        return merge_tensors(b_head, [m_head], "task_arithmetic", weights=[1.0])

    # Llava: the untied base stores language_model.lm_head.weight, the tied fine-tune not.
    llava = {
        "language_model.model.embed_tokens.weight": r(VOCAB, HIDDEN),
        "language_model.model.norm.weight": torch.ones(HIDDEN),
        "language_model.lm_head.weight": r(VOCAB, HIDDEN),
    }
    text = {"model_type": "llama"}
    base = write_checkpoint(
        tmp / "llava", llava, config={"model_type": "llava", "text_config": text}
    )
    tied_ft = {k: v + 0.01 for k, v in llava.items() if "lm_head" not in k}
    ft = write_checkpoint(
        tmp / "llava_ft",
        tied_ft,
        config={"model_type": "llava", "text_config": {**text, "tie_word_embeddings": True}},
    )
    with pytest.warns(UserWarning, match="language_model.model.embed_tokens.weight read as"):
        out = merge(ta(base, ft), tmp / "out_llava", progress=False)
    want = merged(
        llava["language_model.lm_head.weight"], tied_ft["language_model.model.embed_tokens.weight"]
    )
    assert torch.equal(read(out)["language_model.lm_head.weight"], want)

    # BERT: an untied fine-tune stores decoder.weight and decoder.bias; a tied base neither.
    bert = {
        "bert.embeddings.word_embeddings.weight": r(VOCAB, HIDDEN),
        "cls.predictions.bias": r(VOCAB),
    }
    untied = {
        **{k: v + 0.01 for k, v in bert.items()},
        "cls.predictions.decoder.weight": r(VOCAB, HIDDEN),
        "cls.predictions.decoder.bias": r(VOCAB),
    }
    b = write_checkpoint(tmp / "bert", bert, config={"model_type": "bert"})
    m = write_checkpoint(
        tmp / "bert_ft", untied, config={"model_type": "bert", "tie_word_embeddings": False}
    )
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        got = read(merge(ta(b, m), tmp / "out_bert", progress=False))
    assert torch.equal(
        got["cls.predictions.decoder.bias"],
        merged(bert["cls.predictions.bias"], untied["cls.predictions.decoder.bias"]),
    )

    # A tied base that stores its head (= its embeddings) beside an untied fine-tune: the
    # output's head is not its embeddings, so its config must not tie them.
    gem = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN)}
    gem["lm_head.weight"] = gem["model.embed_tokens.weight"].clone()
    b = write_checkpoint(tmp / "gemma", gem, config={"model_type": "gemma2"})
    own = {**gem, "lm_head.weight": r(VOCAB, HIDDEN)}
    m = write_checkpoint(
        tmp / "gemma_ft", own, config={"model_type": "gemma2", "tie_word_embeddings": False}
    )
    with pytest.warns(UserWarning, match="config.json gets tie_word_embeddings: false"):
        out = merge(ta(b, m), tmp / "out_gemma", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    same = write_checkpoint(tmp / "gemma_same", gem, config={"model_type": "gemma2"})
    out = merge(ta(b, same), tmp / "out_gemma_same", progress=False)  # all tied: stays tied
    assert "tie_word_embeddings" not in json.loads((out / "config.json").read_text())

    # T5: a tied head is the shared embeddings scaled, so it cannot be read as one.
    t5 = {"shared.weight": r(VOCAB, HIDDEN), "encoder.final_layer_norm.weight": torch.ones(HIDDEN)}
    t5_untied = {**t5, "lm_head.weight": r(VOCAB, HIDDEN)}
    b = write_checkpoint(
        tmp / "t5", t5_untied, config={"model_type": "t5", "tie_word_embeddings": False}
    )
    m = write_checkpoint(tmp / "t5_tied", t5, config={"model_type": "t5"})
    with pytest.raises(MergeError, match=r"tied T5-style model stores no lm_head.weight"):
        merge(ta(b, m), tmp / "out_t5", progress=False)
    # also when the tied one stores its (unscaled) head copy
    stored = write_checkpoint(
        tmp / "t5_tied_stored",
        {**t5, "lm_head.weight": t5["shared.weight"].clone()},
        config={"model_type": "t5"},
    )
    with pytest.raises(MergeError, match=r"t5_tied_stored ties its output head"):
        merge(ta(b, stored), tmp / "out_t5_stored", progress=False)


def test_gradients_are_refused_where_no_layer_name_is_recognised(zoo):
    # XLM numbers its layers transformer.attentions.N / transformer.ffns.N: with a layer count
    # in config.json and no stack found, a gradient would otherwise use t = 0 on every layer.
    from meldkit.merging.engine import layer_layout

    tmp, _, _, _ = zoo
    g = torch.Generator().manual_seed(3)
    base = {f"transformer.ffns.{i}.lin1.weight": torch.randn(8, 8, generator=g) for i in range(3)}
    config = {"model_type": "xlm", "n_layers": 3}
    (problem,) = layer_layout(list(base), config).problems
    assert "n_layers = 3, but no tensor name has a layer index" in problem
    b = write_checkpoint(tmp / "xlm_b", base, config=config)
    f = write_checkpoint(tmp / "xlm_f", sparse_finetune(base, 1), config=config)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(b),
        "models": [{"model": str(f), "parameters": {"weight": [0.0, 1.0]}}],
    }
    with pytest.raises(MergeError, match=r"a gradient parameter needs .* no tensor name has"):
        merge(cfg, tmp / "out", progress=False)
    cfg["models"][0]["parameters"]["weight"] = 1.0
    merge(cfg, tmp / "flat", progress=False)


def test_out_dir_symlinks_name_the_folder_they_point_to(zoo):
    tmp, _, _, paths = zoo
    cfg = config_for("ties", paths)
    want = read(merge(cfg, tmp / "want", progress=False))
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    out = merge(cfg, tmp / "link", progress=False)
    assert out == tmp / "real" and (tmp / "link").is_symlink()
    got = read(tmp / "link")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not list(tmp.glob(".link.*")) and not list(tmp.glob(".real.*"))


def test_the_current_folder_is_refused_as_out_dir(zoo, monkeypatch):
    """The output replaces out_dir (its temporary folder is renamed into place): merging into
    the current folder used to leave the process (and the shell that ran it) in a removed
    folder, os.getcwd() raising. Refused, by whatever name it is given."""
    tmp, _, _, paths = zoo
    cfg = config_for("ties", paths)
    (tmp / "here").mkdir()
    (tmp / "link").symlink_to(tmp / "here")
    monkeypatch.chdir(tmp / "here")
    for name in (".", str(tmp / "here"), str(tmp / "link"), "../here"):
        with pytest.raises(MergeError, match=rf"out_dir {re.escape(name)}: is the current folder"):
            merge(cfg, name, progress=False)
    assert os.getcwd() == str(tmp / "here") and not any((tmp / "here").iterdir())
    assert not list(tmp.glob(".here.*"))
    out = merge(cfg, "merged", progress=False)
    assert out == tmp / "here" / "merged" and os.getcwd() == str(tmp / "here")


def test_legacy_pickle_checkpoints_load_without_mmap(zoo):
    tmp, base, _, _ = zoo
    legacy = tmp / "legacy"
    legacy.mkdir()
    torch.save(base, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ck = Checkpoint(legacy, allow_pickle=True)
    assert torch.equal(ck.get("lm_head.weight"), base["lm_head.weight"])


def test_a_tokenizer_source_without_tokenizer_files_is_refused(zoo):
    tmp, _, _, paths = zoo
    (paths["ft0"] / "tokenizer_config.json").unlink()
    cfg = {**config_for("ties", paths), "tokenizer_source": str(paths["ft0"])}
    with pytest.raises(MergeError, match=r"tokenizer_source .*ft0 has no tokenizer files"):
        merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()
    (paths["base"] / "tokenizer_config.json").unlink()
    with pytest.warns(UserWarning, match=r"base has no tokenizer files: the merged model has no"):
        merge(config_for("ties", paths), tmp / "out", progress=False)


def test_inputs_wider_than_the_reference_are_merged_and_stored_at_their_precision(zoo):
    # Without a dtype each tensor is merged from its inputs' widest dtype (mergekit 0.1.5's
    # promote_types) and stored in it: float32 fine-tunes of a bfloat16 base keep their
    # precision (they were rounded to bfloat16 first), with a warning that the output is wider.
    import warnings

    from safetensors.torch import load_file

    tmp, _, tunes, paths = zoo
    cfg = config_for("task_arithmetic", paths, n=2)
    del cfg["dtype"], cfg["out_dtype"]
    wide = write_checkpoint(tmp / "wide", tunes[0], config={}, dtype=torch.float32)
    cfg["models"][0]["model"] = str(wide)
    with pytest.warns(UserWarning, match=r"wider dtype than .*wide \(\d+ tensors.*stored in it"):
        out = merge(cfg, tmp / "out", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = merge({**cfg, "dtype": "float32"}, tmp / "out32", progress=False)
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    ref = {k: v for f in sorted(want.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert got.keys() == ref.keys()
    for k in got:
        assert got[k].dtype == (torch.float32 if ref[k].is_floating_point() else ref[k].dtype), k
        assert torch.equal(got[k], ref[k]), k
    with pytest.warns(UserWarning, match=r"wider dtype than .*stored in out_dtype"):
        out = merge({**cfg, "out_dtype": "bfloat16"}, tmp / "outbf", progress=False)
    card = (out / "README.md").read_text()
    assert "inputs converted to their widest dtype of each tensor" in card
    stored = load_file(next(out.glob("*.safetensors")))
    assert {str(v.dtype) for v in stored.values() if v.is_floating_point()} == {"torch.bfloat16"}


def test_a_folder_with_both_weight_layouts_reads_model_safetensors(zoo):
    # transformers' from_pretrained loads model.safetensors before the index: so does meldkit,
    # with a warning that the index is ignored.
    tmp, _, tunes, paths = zoo
    both = paths["ft1"]
    write_model(tmp / "single", tunes[2])
    (tmp / "single" / "model.safetensors").rename(both / "model.safetensors")
    with pytest.warns(UserWarning, match="both model.safetensors and model.safetensors.index"):
        ck = Checkpoint(both)
    assert torch.equal(ck.get("lm_head.weight"), tunes[2]["lm_head.weight"])


def test_a_peft_adapter_folder_is_named_as_one(zoo):
    tmp, _, _, paths = zoo
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    write_checkpoint(adapter, {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, HIDDEN)})
    (adapter / "model.safetensors").rename(adapter / "adapter_model.safetensors")
    cfg = config_for("ties", paths)
    cfg["models"][0]["model"] = str(adapter)
    with pytest.raises(MergeError, match=r"adapter: a PEFT adapter \(adapter_config.json\)"):
        merge(cfg, tmp / "out", progress=False)


def test_bert_and_t5_vocabulary_tensors_are_trimmed_like_embeddings(zoo):
    from meldkit.merging.engine import is_vocab_tensor

    for name in ("shared.weight", "cls.predictions.bias", "cls.predictions.decoder.weight"):
        assert is_vocab_tensor(name), name
    for name in ("model.layers.0.mlp.shared.weight", "cls.predictions.transform.dense.weight"):
        assert not is_vocab_tensor(name), name
    tmp, _, _, _ = zoo
    g = torch.Generator().manual_seed(4)
    base = {
        "bert.embeddings.word_embeddings.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "cls.predictions.bias": torch.randn(VOCAB, generator=g),
    }
    big = sparse_finetune(base, 1)
    big = {k: torch.cat([v, torch.zeros(8, *v.shape[1:])]) for k, v in big.items()}
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(write_checkpoint(tmp / "bert_b", base)),
        "models": [
            {"model": str(write_checkpoint(tmp / "bert_big", big)), "parameters": {"weight": 1}}
        ],
    }
    with pytest.warns(UserWarning, match=r"cls.predictions.bias \(72 rows, not 64\)"):
        out = read(merge(cfg, tmp / "out", progress=False))
    assert out["cls.predictions.bias"].shape == (VOCAB,)


def test_an_output_the_merge_cannot_rename_into_place_is_refused_up_front(zoo, monkeypatch):
    # The output is written beside out_dir and renamed into its place: a mount point cannot be
    # replaced (the finished merge was lost at the rename), and a parent without write access
    # cannot hold the temporary folder (it was named in a raw PermissionError).
    tmp, _, _, paths = zoo
    cfg = config_for("ties", paths)
    mount = tmp / "mounted"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount)
    with pytest.raises(MergeError, match=r"is a mount point.*e\.g\. .*mounted/merged"):
        merge(cfg, mount, progress=False)
    locked = tmp / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(MergeError, match=r"parent folder .*locked is not writable"):
        merge(cfg, locked / "out", progress=False)
    assert not (locked / "out").exists()


def test_a_hub_id_with_a_revision_is_downloaded_with_it(zoo, monkeypatch):
    tmp, _, _, paths = zoo
    monkeypatch.chdir(tmp)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    cfg = config_for("ties", paths)
    cfg["base_model"] = "org/tiny-base@v2.0"
    with pytest.raises(MergeError, match=r"hf download org/tiny-base --revision v2\.0"):
        merge(cfg, tmp / "out", progress=False)


def test_a_path_with_a_tilde_says_it_is_not_expanded(zoo, monkeypatch):
    tmp, _, _, paths = zoo
    monkeypatch.chdir(tmp)
    cfg = config_for("ties", paths)
    cfg["models"][0]["model"] = "~/no-such-model"
    with pytest.raises(MergeError, match=r"~ is not expanded, as in mergekit: write /"):
        merge(cfg, tmp / "out", progress=False)
