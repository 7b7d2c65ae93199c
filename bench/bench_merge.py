"""End-to-end `meldkit merge` against the I/O floor: the time to read every input tensor and
write the merged model, measured in the same run on the same files.

    python bench/bench_merge.py --workdir /tmp/merge-bench [--tensors 8] [--dim 4096] [--models 3]
                                [--method ties] [--device cpu] [--json rows.jsonl]

It writes a base and N sparse fine-tunes (``--tensors`` bf16 matrices of ``dim`` x ``dim`` each,
in 2 shards) under ``--workdir`` (the user's path: nothing is written into the repository), then
times, each twice and keeping the faster:

- ``io_floor``: load every tensor of every model with safetensors and save one model's worth of
  tensors (what any merge must at least do);
- ``meldkit``: ``meldkit.merging.merge`` with the chosen method (no progress bar).

The issue's target is meldkit within 1.5x of the I/O floor. The op-level benchmarks (kernels
against a sort-based PyTorch merge and the reference) are ``meldkit bench --op merge``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from meldkit.merging import merge


def write_models(root: Path, n: int, tensors: int, dim: int) -> dict[str, str]:
    g = torch.Generator().manual_seed(0)
    base = {
        f"model.layers.{i}.mlp.weight": torch.randn(dim, dim, generator=g) for i in range(tensors)
    }
    paths = {}
    for name in ["base"] + [f"ft{i}" for i in range(n)]:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        if name == "base":
            state = base
        else:
            state = {
                k: v
                + (torch.rand(v.shape, generator=g) < 0.3)
                * 0.01
                * torch.randn(v.shape, generator=g)
                for k, v in base.items()
            }
        names = list(state)
        half = len(names) // 2 or 1
        weight_map = {}
        for s, part in enumerate([names[:half], names[half:]]):
            if not part:
                continue
            fname = f"model-{s + 1:05d}-of-00002.safetensors"
            save_file({k: state[k].to(torch.bfloat16) for k in part}, str(folder / fname))
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (folder / "config.json").write_text("{}")
        paths[name] = str(folder)
    return paths


def io_floor(paths: dict[str, str], out: Path) -> None:
    merged = None
    for p in paths.values():
        state = {}
        for f in sorted(Path(p).glob("*.safetensors")):
            state.update(load_file(str(f)))
        merged = state
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"))


def best_of(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="scratch folder for the checkpoints")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--method", default="ties", choices=["ties", "dare_ties", "task_arithmetic"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="append a JSON row here")
    args = ap.parse_args(argv)

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    paths = write_models(root, args.models, args.tensors, args.dim)
    per_model = {"weight": 1.0 / args.models}
    if args.method != "task_arithmetic":
        per_model["density"] = 0.3
    cfg = {
        "merge_method": args.method,
        "base_model": paths["base"],
        "models": [{"model": paths[f"ft{i}"], "parameters": per_model} for i in range(args.models)],
    }
    scratch = Path(tempfile.mkdtemp(dir=root))

    def run_io():
        shutil.rmtree(scratch / "io", ignore_errors=True)
        io_floor(paths, scratch / "io")

    def run_merge():
        shutil.rmtree(scratch / "out", ignore_errors=True)
        merge(cfg, scratch / "out", device=args.device, progress=False)

    t_io = best_of(run_io)
    t_merge = best_of(run_merge)
    shutil.rmtree(scratch, ignore_errors=True)
    gb_in = (args.models + 1) * args.tensors * args.dim * args.dim * 2 / 1e9
    row = {
        "op": "merge_e2e",
        "method": args.method,
        "models": args.models,
        "tensors": args.tensors,
        "dim": args.dim,
        "device": args.device,
        "input_gb": gb_in,
        "io_floor_s": t_io,
        "meldkit_s": t_merge,
        "ratio_to_io_floor": t_merge / t_io,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"{args.method} of {args.models} models + base, {args.tensors} x [{args.dim}, {args.dim}] "
        f"bf16 ({gb_in:.2f} GB in) on {args.device}: io floor {t_io:.2f} s, meldkit merge "
        f"{t_merge:.2f} s, ratio {t_merge / t_io:.2f}x (target <= 1.5x)"
    )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
