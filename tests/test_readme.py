"""The README's examples run as written and do what their comments say.

Each ```python block of README.md is executed, unchanged, in a namespace that holds the objects
it names (tiny models built from configs, random tensors; nothing downloaded); the test then
checks what the comments claim. The command synopses of the ```bash blocks may only name options
that the CLI has. A new example in the README fails ``test_every_example_is_run`` until it gets a
test here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import meldkit
import meldkit.ops
from meldkit.merging.synthetic import random_state, sparse_finetune, write_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"

# The python examples per README section (its "## " heading), in order. Adding one to the README
# means adding its test below and its count here.
EXAMPLES = {
    "The two commands": 1,
    "Routed low-rank experts and GOAT": 2,
    "Twin-Merging": 1,
    "ExDe: extrapolating and decoupling image-to-video models": 1,
    "Logit fusion and weak-to-strong decoding": 1,
}


def blocks(lang: str) -> dict[str, list[tuple[int, str]]]:
    """``{section: [(first line number, code), ...]}`` of the README's ```lang blocks."""
    out: dict[str, list[tuple[int, str]]] = {}
    section, fence, start, body = None, None, 0, []
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            if line.startswith("# ") or line.startswith("## "):
                section = line.lstrip("#").strip()
            elif line.startswith("```"):
                fence, start, body = line[3:].strip(), number + 1, []
        elif line.startswith("```"):
            if fence == lang:
                out.setdefault(section, []).append((start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    return out


def run(section: str, index: int, namespace: dict) -> dict:
    """Execute example ``index`` of ``section`` in ``namespace`` (tracebacks name README.md and
    the example's line)."""
    start, code = blocks("python")[section][index]
    code = "\n" * (start - 1) + code  # line numbers of the README in tracebacks
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_every_example_is_run():
    found = {section: len(codes) for section, codes in blocks("python").items()}
    assert found == EXAMPLES, "a README python example was added or removed: update this file"


# ---- the introduction: weighted_sum ------------------------------------------------------------


def test_weighted_sum_example(capsys):
    gen = torch.Generator().manual_seed(0)
    thetas = [torch.randn(64, 33, generator=gen).to(torch.bfloat16) for _ in range(3)]
    base = torch.randn(64, 33, generator=gen)
    tau = torch.randn(64, 33, generator=gen)
    before = base.clone()
    ns = run(
        "The two commands",
        0,
        dict(zip(("theta_a", "theta_b", "theta_c"), thetas, strict=True), base=base, tau=tau),
    )
    want = sum(w * t.double() for w, t in zip((0.5, 0.3, 0.2), thetas, strict=True))
    assert ns["merged"].dtype == torch.bfloat16
    torch.testing.assert_close(ns["merged"].double(), want, rtol=8e-3, atol=8e-3)
    assert ns["base"] is base  # in place
    torch.testing.assert_close(base, before + 0.7 * tau)
    assert "weighted_sum" in capsys.readouterr().out  # info() printed its table


# ---- GOAT ----------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0):
    """A 2-layer Llama whose k/v projections (64 → 32) take the example's rank 32."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def test_goat_example(tmp_path, monkeypatch):
    from meldkit import goat

    monkeypatch.chdir(tmp_path)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    seen = {}

    def task_loss(out):
        seen["out"] = out
        return out.loss

    ns = run(
        "Routed low-rank experts and GOAT",
        0,
        dict(
            model=tiny_llama(0),
            batch={"input_ids": ids, "labels": ids},
            task_loss=task_loss,
            fresh_base_model=tiny_llama(0),
        ),
    )
    loss = ns["loss"]
    assert loss.requires_grad and torch.isfinite(loss)
    assert loss > seen["out"].loss  # the balance loss was added
    assert (tmp_path / "goat.safetensors").is_file()
    # the loaded adapter, before unwrap, gave the trained model's outputs bit for bit
    trained = goat.load_adapter(tiny_llama(0), "goat.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, seen["out"].logits)
    # unwrap gave back plain nn.Linear layers
    attn = ns["base"].model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        assert type(getattr(attn, name)) is torch.nn.Linear
    assert not any(isinstance(m, goat.GoatLinear) for m in ns["base"].modules())


def test_routed_lora_example():
    gen = torch.Generator().manual_seed(0)
    e, r, d_in, d_out = 4, 3, 24, 20
    torch.manual_seed(0)
    linear = torch.nn.Linear(d_in, d_out)
    ns = run(
        "Routed low-rank experts and GOAT",
        1,
        dict(
            meldkit=meldkit,
            x=torch.randn(5, 7, d_in, generator=gen),
            lora_a=torch.randn(e, r, d_in, generator=gen),
            lora_b=torch.randn(e, d_out, r, generator=gen),
            scaling=0.5,
            w_z=torch.randn(e, d_in, generator=gen),
            step=3,
            linear=linear,
        ),
    )
    x = ns["x"]
    y, probs = ns["y"], ns["probs"]
    assert y.shape == (5, 7, d_out) and probs.shape == (35, e)  # probs: [N tokens, E]
    torch.testing.assert_close(probs.sum(-1), torch.ones(35))
    adapter, _ = meldkit.ops.routed_lora(
        x, ns["lora_a"], ns["lora_b"], 0.5, router_weight=ns["w_z"], top_k=2
    )
    with torch.no_grad():
        torch.testing.assert_close(y, adapter + linear(x), rtol=1e-5, atol=1e-5)


# ---- Twin-Merging ----------------------------------------------------------------------------


def test_twin_example(tmp_path, monkeypatch):
    from meldkit import twin
    from meldkit.dlf._tiny import tiny_llama, word_tokenizer
    from tests.twin.models import perturbed

    monkeypatch.chdir(tmp_path)
    words = [f"w{i:02d}" for i in range(60)]
    tok = word_tokenizer(words)
    base = tiny_llama(0, vocab=64, hidden=32, dtype=torch.float32)
    m1, m2, m3 = (perturbed(base, seed=s) for s in (1, 2, 3))
    gen = torch.Generator().manual_seed(0)

    def texts(t, n):  # each task's texts use words of their own
        picks = torch.randint(0, 10, (n, 4), generator=gen) + 10 * t
        return [" ".join(words[i] for i in row) for row in picks.tolist()]

    tasks = ("banking", "clinc", "news")
    train_texts = {name: texts(t, 24) for t, name in enumerate(tasks)}
    val_texts = {name: texts(t, 8) for t, name in enumerate(tasks)}
    batch = tok(texts(1, 3), return_tensors="pt", padding=True)
    ns = run(
        "Twin-Merging",
        0,
        dict(
            base=base,
            m1=m1,
            m2=m2,
            m3=m3,
            tok=tok,
            train_texts=train_texts,
            val_texts=val_texts,
            batch=batch,
        ),
    )
    assert ns["experts"].tasks == list(tasks)
    assert (tmp_path / "twin").is_dir()
    loaded = ns["model"].eval()
    assert isinstance(loaded, twin.TwinModel) and loaded is not ns["experts"]
    with torch.no_grad():
        # the saved and loaded model routes and answers as the trained one did
        torch.testing.assert_close(loaded(**batch).logits, ns["logits"], rtol=1e-5, atol=1e-5)


# ---- ExDe ---------------------------------------------------------------------------------------


def test_exde_example():
    pytest.importorskip("diffusers")
    from meldkit import exde
    from meldkit.exde import _tiny

    pipe = _tiny.pipeline()
    base_unet = copy.deepcopy(pipe.unet)
    finetuned_unet = _tiny.finetuned(base_unet)

    class TinyCall(type(pipe)):  # the README's pipe(image), at the tiny model's size
        def __call__(self, image, **kwargs):
            kwargs = dict(height=32, width=32, num_frames=2, decode_chunk_size=2) | kwargs
            kwargs.setdefault("num_inference_steps", 4)
            kwargs.setdefault("generator", torch.Generator().manual_seed(0))
            return super().__call__(image, **kwargs)

    pipe.__class__ = TinyCall
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ns = run(
        "ExDe: extrapolating and decoupling image-to-video models",
        0,
        dict(pipe=pipe, base_unet=base_unet, finetuned_unet=finetuned_unet, image=image),
    )
    base = dict(base_unet.named_parameters())
    ft = dict(finetuned_unet.named_parameters())
    for name, p in ns["more_motion"].named_parameters():
        torch.testing.assert_close(p, base[name] - 0.25 * (ft[name] - base[name]))
    dyn = dict(ns["dyn"].named_parameters())
    assert any(not torch.equal(dyn[n], base[n]) for n in base)
    assert len(ns["frames"][0]) == 2  # two frames
    adapter = ns["adapter"]
    assert isinstance(adapter, exde.TemporalTextAdapter)
    assert sum(p.numel() for p in adapter.parameters()) > 0
    # after the with block, the base weights were back (the adapter only added modules)
    current = dict(pipe.unet.named_parameters())
    assert all(torch.equal(current[n], base[n]) for n in base)


def test_motion_degree_of_the_example_frames():
    """``exde.motion_degree(frames[0])`` on a pipeline's default output: a list of PIL images."""
    pil = pytest.importorskip("PIL.Image")
    from meldkit import exde

    gen = torch.Generator().manual_seed(0)
    frames = [(torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8) for _ in range(3)]
    degree = exde.motion_degree([pil.fromarray(f.numpy()) for f in frames])
    assert degree.value > 0 and degree.method in ("farneback", "frame_difference")


# ---- Dynamic Logit Fusion -----------------------------------------------------------------------


def test_dlf_example():
    from tests.dlf.tiny import llama, perturbed, tokenizer

    tok = tokenizer()
    small = llama(1)
    prompts = ["w01 w02 w03", "w10"]
    ns = run(
        "Logit fusion and weak-to-strong decoding",
        0,
        dict(
            large=llama(0, hidden=48),
            small_base=small,
            expert_a=perturbed(small, 2),
            expert_b=perturbed(small, 3),
            expert=perturbed(small, 2),
            tokenizer=tok,
            prompts=prompts,
        ),
    )
    out = ns["out"]
    assert len(out.texts) == len(prompts)
    steps = out.alphas.shape[1]
    assert 1 <= steps <= 64 and out.alphas.shape == out.experts.shape == (2, steps)
    # the example's last line, kept: proxy-tuning is DLF with α = 1
    proxy = ns["proxy_tuning"](ns["large"], small, [ns["expert"]], tok, prompts, max_new_tokens=8)
    done = ~torch.isnan(proxy.alphas)
    assert done.any() and (proxy.alphas[done] == 1).all()
    # and contrastive decoding runs with the two base models, no experts
    cd = ns["contrastive_decoding"](ns["large"], small, tok, prompts, max_new_tokens=4)
    assert len(cd.texts) == len(prompts) and (cd.experts[~torch.isnan(cd.alphas)] == -1).all()


# ---- merging: the YAML example and the command synopses ----------------------------------------


def test_merge_yaml_example(tmp_path):
    yaml = pytest.importorskip("yaml")
    from safetensors.torch import load_file

    from meldkit.merging import merge, merge_state_dicts

    (text,) = (code for _, code in blocks("yaml")["Merging models"])
    shapes = {"layer.weight": (24, 40), "layer.bias": (24,), "norm.weight": (40,)}
    base = random_state(shapes, 0)
    fts = [sparse_finetune(base, seed) for seed in (1, 2)]
    paths = {"path/to/base": base, "path/to/finetune_a": fts[0], "path/to/finetune_b": fts[1]}
    for i, (name, state) in enumerate(paths.items()):
        folder = write_checkpoint(tmp_path / f"model{i}", state)
        text = text.replace(name, str(folder))
    config = tmp_path / "ties.yaml"
    config.write_text(text)
    out = merge(config, tmp_path / "merged", progress=False)
    got = load_file(str(out / "model.safetensors"))
    cfg = yaml.safe_load(text)
    params = [m["parameters"] for m in cfg["models"]]
    want = merge_state_dicts(
        base,
        fts,
        cfg["merge_method"],
        weights=[p["weight"] for p in params],
        densities=[p["density"] for p in params],
        normalize=cfg["parameters"]["normalize"],
    )
    assert set(got) == set(shapes)
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16  # out_dtype
        assert torch.equal(tensor, want[name].to(torch.bfloat16)), name


def synopsis_options() -> list[tuple[str, str]]:
    """``(subcommand, option)`` for every ``--option`` on a ``meldkit SUBCOMMAND`` line of the
    README's bash blocks (continuation lines included)."""
    found = []
    for codes in blocks("bash").values():
        for _, code in codes:
            command = None
            for line in code.splitlines():
                m = re.match(r"\s*meldkit (\w+)", line)
                if m:
                    command = m.group(1)
                elif not line.startswith(" "):
                    command = None
                if command is not None:
                    found += [(command, opt) for opt in re.findall(r"--[a-z][a-z-]*", line)]
    return found


def test_synopses_name_only_real_options():
    from meldkit.cli import build_parser

    options = synopsis_options()
    assert ("merge", "--read-ahead") in options and ("bench", "--case") in options
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for command, option in options:
        assert command in subparsers, f"README names `meldkit {command}`, which does not exist"
        known = subparsers[command]._option_string_actions
        assert option in known, f"README names `meldkit {command} {option}`, which does not exist"
