"""End-to-end `meldkit merge` against the I/O floor and against mergekit, on the same files.

    python bench/bench_merge.py --workdir /tmp/merge-bench [--layers 4] [--hidden 1024]
                                [--models 3] [--method ties] [--device cpu] [--rounds 3]
                                [--cold [--readers 1,2,4]] [--reuse] [--json rows.jsonl]

It writes a Llama-shaped base and N sparse fine-tunes (bf16, 2 shards each, with a config.json
that mergekit recognises) under ``--workdir`` (the user's path: nothing is written into the
repository), then times the following in turn, ``--rounds`` times each, and reports the fastest
run and the median of the runs (this shared machine's load moves single runs by tens of percent;
the ratios to the floor are given both ways: fastest over fastest, median over median):

- ``io_floor``: read every byte of every model (memory-mapped, as the merge reads them) and
  write one model's worth of bytes (the output's size): what any merge must at least do;
  with ``--cold``, read the files with 1, 2 and 4 reader threads (``--readers``), each timed,
  the fastest being the floor;
- ``meldkit``: ``meldkit.merging.merge`` with the chosen method (no progress bar);
- ``mergekit``: the ``mergekit-yaml`` command on the same YAML, when it is on PATH (its time
  includes its own start-up, a few seconds, so use models large enough for that not to matter).

By default the inputs stay in the page cache between runs (after the first), so the floor is a
memory-bandwidth floor and the merge's own arithmetic decides the ratio. ``--cold`` drops the
inputs from the page cache before every run (``evict``: ``posix_fadvise(POSIX_FADV_DONTNEED)``),
so everything reads from the disk, as a merge of checkpoints that were just downloaded, or that
are larger than the machine's free memory, does. ``--reuse`` keeps checkpoints an earlier run
wrote in ``--workdir``.

It also reports meldkit's input GB/s and the peak resident memory of one more meldkit merge and
one more mergekit merge, each run alone in a child process: its resident high-water mark (which
includes the pages of the memory-mapped inputs a process touches) and its largest anonymous
(own) memory.

The issue's targets: meldkit within 1.5x of the I/O floor, and at least 10x faster than mergekit
on the CPU for TIES and DARE-TIES. ``--method breadcrumbs`` / ``breadcrumbs_ties`` use density 0.9
and γ 0.01; ``della`` / ``della_linear`` density 0.3 and ε 0.1. The op-level benchmarks are
``meldkit bench --op merge``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from meldkit.bench import write_rows
from meldkit.merging import merge
from meldkit.merging.synthetic import (
    llama_config,
    llama_shapes,
    random_state,
    sparse_finetune,
    write_checkpoint,
)


def shapes_for(layers: int, hidden: int) -> dict[str, tuple]:
    return llama_shapes(layers, hidden, int(hidden * 2.75), 8192)


def write_models(root: Path, n: int, layers: int, hidden: int) -> dict[str, str]:
    base = random_state(shapes_for(layers, hidden), seed=0)
    config = llama_config(layers, hidden, int(hidden * 2.75), 8192, heads=hidden // 64)
    paths = {
        "base": str(
            write_checkpoint(root / "base", base, shards=2, config=config, dtype=torch.bfloat16)
        )
    }
    for i in range(n):
        tune = sparse_finetune(base, seed=i + 1, scale=0.01)
        paths[f"ft{i}"] = str(
            write_checkpoint(root / f"ft{i}", tune, shards=2, config=config, dtype=torch.bfloat16)
        )
    return paths


def _read_every_byte(t: torch.Tensor) -> None:
    """Bring every byte of ``t`` into the CPU once: a max over its bytes (as 16-bit words
    where the size allows), which torch runs on all threads."""
    flat = t.reshape(-1).view(torch.uint8)
    if flat.numel() % 2 == 0:
        flat = flat.view(torch.int16)
    if flat.numel():
        flat.max()


def evict(paths: dict[str, str]) -> None:
    """Drop the models' files from the page cache, so that the next read comes from the disk:
    ``sync`` (dirty pages, such as the last run's output, cannot be dropped and would be written
    back during the next run), then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file."""
    os.sync()
    for p in paths.values():
        for f in Path(p).iterdir():
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _read_files(paths: dict[str, str], readers: int) -> None:
    """Read every safetensors file of ``paths`` whole, ``readers`` files at a time, each through
    one reused 16 MB buffer: how fast the disk gives these bytes to several readers at once (on
    this machine's virtio disk 2-4 readers read 2-3x faster than one)."""
    files = sorted(f for p in paths.values() for f in Path(p).glob("*.safetensors"))

    def read(f: Path) -> None:
        buf = bytearray(16 << 20)
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass

    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(read, files))


def io_floor(paths: dict[str, str], out: Path, *, readers: int = 0) -> None:
    """What any merge of these models must at least do: read every byte of every input once
    and write the output's bytes.

    With ``readers`` > 0 (``--cold``: inputs not in the page cache) the inputs are instead read
    as files by that many threads at once (:func:`_read_files`), the fastest way measured here
    to read them from the disk; memory-mapped reads one tensor at a time wait on one page fault
    after another (2.1-2.7 s for 2 GB cold, against 1.1-1.3 s for two to four readers).

    The inputs are memory-mapped by safetensors, as the merge maps them, and every tensor is
    then read by a reduction on all threads: safetensors maps lazily, so loading alone reads
    nothing (until 2026-11-27 this floor loaded every model but read only the last one, the
    one it saved). On this machine the mapped read measured as fast as ``read()`` into a
    reused buffer on all threads (0.16-0.20 s for 2 GB). The write is the last model's
    tensors, the output's size, through meldkit's shard writer (plain ``pwrite`` from memory,
    no serialisation copy), as the merge writes its output.
    """
    from meldkit.merging.checkpoint import ShardedWriter

    last: dict[str, torch.Tensor] = {}
    if readers:
        _read_files(paths, readers)
        for f in sorted(Path(list(paths.values())[-1]).glob("*.safetensors")):
            last.update(load_file(str(f)))  # read above: its pages are cached now
    else:
        for p in paths.values():
            last = {}
            for f in sorted(Path(p).glob("*.safetensors")):
                for name, t in load_file(str(f)).items():
                    _read_every_byte(t)
                    last[name] = t
    plan = [(name, t.dtype, tuple(t.shape)) for name, t in last.items()]
    writer = ShardedWriter(out, plan, 5 * 10**9, background=False)
    try:
        for name, t in last.items():
            writer.add(name, t)
        writer.commit(aux_from=None)
    except BaseException:
        writer.abort()
        raise


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """Peak memory (GB) of ``cmd`` run as a child process, from ``/proc/PID/status`` read every
    10 ms while it runs: the resident high-water mark ``VmHWM`` (which counts the pages of
    memory-mapped inputs the process touched: page cache, reclaimable) and the largest
    ``RssAnon`` seen (the process's own memory). Not ``ru_maxrss``: that keeps the forked copy
    of this big benchmark process from before the child's exec."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"VmHWM:": 0, "RssAnon:": 0}
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                key = line.split(":")[0] + ":"
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass  # exiting
        time.sleep(0.01)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return peak["VmHWM:"] * 1024 / 1e9, peak["RssAnon:"] * 1024 / 1e9


def alternated(fns: dict, rounds: int, before=None) -> dict[str, list[float]]:
    """The times of ``rounds`` runs of each function, run in turn so that a slow spell of this
    shared machine hits all of them alike, each round starting one function later (a, b, c;
    b, c, a; ...) so that none always runs right after the same one. ``before()``, untimed,
    precedes every run (``evict`` for ``--cold``). Index r of every list is round r."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            if before is not None:
                before()
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="scratch folder for the checkpoints")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument(
        "--method",
        default="ties",
        choices=[
            "ties",
            "dare_ties",
            "task_arithmetic",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della",
            "della_linear",
        ],
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--trim-scope",
        default="tensor",
        choices=["tensor", "model"],
        help="model: the TIES paper's whole-model trimming (mergekit has none: not timed)",
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="runs of each, alternated (fastest and median)"
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the inputs from the page cache before every run (reads from the disk); the "
        "floor then reads the files with --readers threads",
    )
    ap.add_argument(
        "--readers",
        default="1,2,4",
        help="the cold floor's reader thread counts, each timed; the fastest is the floor",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the checkpoints already in --workdir (written by an earlier run with the "
        "same --models, --layers and --hidden) instead of writing them again",
    )
    ap.add_argument("--json", help="append a JSON row here")
    args = ap.parse_args(argv)

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    if args.reuse and all(
        (root / d / "config.json").is_file()
        for d in ["base"] + [f"ft{i}" for i in range(args.models)]
    ):
        paths = {
            "base": str(root / "base"),
            **{f"ft{i}": str(root / f"ft{i}") for i in range(args.models)},
        }
    else:
        paths = write_models(root, args.models, args.layers, args.hidden)
    per_model = {"weight": 1.0 / args.models}
    if args.method.startswith("breadcrumbs"):  # the Breadcrumbs paper's kind of setting
        per_model.update(density=0.9, gamma=0.01)
    elif args.method.startswith("della"):
        per_model.update(density=0.3, epsilon=0.1)
    elif args.method != "task_arithmetic":
        per_model["density"] = 0.3
    cfg = {
        "merge_method": args.method,
        "base_model": paths["base"],
        "models": [{"model": paths[f"ft{i}"], "parameters": per_model} for i in range(args.models)],
    }
    scratch = Path(tempfile.mkdtemp(dir=root))

    def run_io(readers: int = 0):
        shutil.rmtree(scratch / "io", ignore_errors=True)
        io_floor(paths, scratch / "io", readers=readers)

    def run_merge():
        shutil.rmtree(scratch / "out", ignore_errors=True)
        merge(cfg, scratch / "out", device=args.device, progress=False, trim_scope=args.trim_scope)

    mergekit = shutil.which("mergekit-yaml") if args.trim_scope == "tensor" else None
    cfg_path = scratch / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    def run_mergekit():
        shutil.rmtree(scratch / "mk", ignore_errors=True)
        cmd = [mergekit, str(cfg_path), str(scratch / "mk"), "--random-seed", "0"]
        if args.device == "cuda":
            cmd.append("--cuda")
        subprocess.run(cmd, check=True, capture_output=True)

    if args.cold:  # the floor is the fastest reader count
        fns = {f"io{r}": functools.partial(run_io, int(r)) for r in args.readers.split(",")}
    else:
        fns = {"io": run_io}
    fns["merge"] = run_merge
    if mergekit:
        fns["mergekit"] = run_mergekit
    times = alternated(fns, args.rounds, before=(lambda: evict(paths)) if args.cold else None)
    best = {k: min(v) for k, v in times.items()}
    # Each round's floor is its fastest reader count (one reader count when warm).
    io_times = [v for k, v in times.items() if k.startswith("io")]
    io_rounds = [min(r) for r in zip(*io_times, strict=True)]
    t_io = min(io_rounds)
    t_merge, t_mk = best["merge"], best.get("mergekit")
    med_io, med_merge = statistics.median(io_rounds), statistics.median(times["merge"])
    med_mk = statistics.median(times["mergekit"]) if t_mk else None
    rss_merge = peak_rss_of(
        [
            sys.executable,
            "-c",
            "import sys, yaml; from meldkit.merging import merge; "
            "merge(yaml.safe_load(open(sys.argv[1])), sys.argv[2], device=sys.argv[3], "
            "progress=False, trim_scope=sys.argv[4])",
            str(cfg_path),
            str(scratch / "rss"),
            args.device,
            args.trim_scope,
        ]
    )
    rss_mk = None
    if mergekit:
        shutil.rmtree(scratch / "mk", ignore_errors=True)
        rss_mk = peak_rss_of([mergekit, str(cfg_path), str(scratch / "mk"), "--random-seed", "0"])
    shutil.rmtree(scratch, ignore_errors=True)
    numel = sum(math.prod(s) for s in shapes_for(args.layers, args.hidden).values())
    gb_in = (args.models + 1) * numel * 2 / 1e9
    row = {
        "op": "merge_e2e",
        "method": args.method,
        "trim_scope": args.trim_scope,
        "models": args.models,
        "layers": args.layers,
        "hidden": args.hidden,
        "device": args.device,
        "cold": args.cold,
        "io_floor_by_readers": {
            k[2:]: v for k, v in best.items() if args.cold and k.startswith("io")
        }
        or None,
        "input_gb": gb_in,
        "io_floor_s": t_io,
        "meldkit_s": t_merge,
        "meldkit_gb_per_s": gb_in / t_merge,
        "meldkit_peak_rss_gb": rss_merge[0],
        "meldkit_peak_anon_gb": rss_merge[1],
        "mergekit_peak_rss_gb": rss_mk[0] if rss_mk else None,
        "mergekit_peak_anon_gb": rss_mk[1] if rss_mk else None,
        "ratio_to_io_floor": t_merge / t_io,
        "mergekit_s": t_mk,
        "speedup_vs_mergekit": (t_mk / t_merge) if t_mk else None,
        "rounds": args.rounds,
        "io_floor_median_s": med_io,
        "meldkit_median_s": med_merge,
        "mergekit_median_s": med_mk,
        "ratio_to_io_floor_median": med_merge / med_io,
        "speedup_vs_mergekit_median": (med_mk / med_merge) if med_mk else None,
        "times_s": times,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    vs_mk = (
        f", mergekit {t_mk:.2f} s ({t_mk / t_merge:.1f}x slower; median {med_mk:.2f} s, "
        f"{med_mk / med_merge:.1f}x; peak RSS {rss_mk[0]:.2f} GB, anonymous {rss_mk[1]:.2f} GB)"
        if t_mk
        else ""
    )
    print(
        f"{args.method} ({args.trim_scope} trimming) of {args.models} models + base, "
        f"Llama-shaped {args.layers} layers x {args.hidden} ({gb_in:.2f} GB bf16 in) "
        f"on {args.device}{' from the disk (cold)' if args.cold else ''}: io floor {t_io:.2f} s, "
        f"meldkit {t_merge:.2f} s ({t_merge / t_io:.2f}x the floor, {gb_in / t_merge:.2f} GB/s of "
        f"input, peak RSS {rss_merge[0]:.2f} GB, anonymous {rss_merge[1]:.2f} GB){vs_mk}; "
        f"medians of {args.rounds} rounds: io floor {med_io:.2f} s, meldkit {med_merge:.2f} s "
        f"({med_merge / med_io:.2f}x)"
    )
    if args.json:
        write_rows(args.json, [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
