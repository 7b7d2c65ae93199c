"""The ``meldkit`` command: ``info``, ``bench`` and ``demo`` (methods add their subcommands)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings


def _cmd_info(args: argparse.Namespace) -> int:
    from meldkit.info import info

    facts = info()
    if args.json:
        import json

        print(json.dumps(facts, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from meldkit import bench

    return bench.run(args)


def _cmd_merge(args: argparse.Namespace) -> int:
    import signal

    from meldkit.merging import ConfigError, MergeError, merge
    from meldkit.merging.checkpoint import CheckpointError

    # mergekit's flags (mergekit-yaml's), for configs and scripts written for it.
    if args.cuda and args.device is not None and not args.device.startswith("cuda"):
        print(f"meldkit merge: --cuda and --device {args.device} disagree", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if args.cuda else "cpu")
    if args.random_seed is not None and args.seed is not None and args.random_seed != args.seed:
        print(
            f"meldkit merge: --seed {args.seed} and --random-seed {args.random_seed} disagree "
            "(--random-seed is mergekit's name for --seed)",
            file=sys.stderr,
        )
        return 2
    seed = args.seed if args.seed is not None else (args.random_seed or 0)
    tiny = _bare_bytes(args.out_shard_size)
    if tiny is not None and tiny < 10**6:
        meant = args.out_shard_size.strip() if args.out_shard_size.strip().isdigit() else "5"
        print(
            f"meldkit merge: warning: --out-shard-size {args.out_shard_size} means {tiny:,} "
            "bytes (a number without a unit counts bytes, as in mergekit), so nearly every "
            f"tensor gets a shard of its own; did you mean {meant}GB?",
            file=sys.stderr,
        )
    for flag, given, why in (
        (
            "--allow-crimes",
            args.allow_crimes,
            "meldkit does not compare architectures: it merges any models whose tensors match "
            "by name, shape and dtype kind, and refuses the others",
        ),
        (
            "--lazy-unpickle",
            args.lazy_unpickle,
            "meldkit reads every tensor lazily (safetensors; pickle .bin files, which need "
            "--allow-pickle, are memory-mapped, except those in torch's legacy format)",
        ),
        (
            "--copy-tokenizer",
            args.copy_tokenizer,
            "meldkit always copies the tokenizer files (the base's, or tokenizer_source's)",
        ),
    ):
        if given:
            print(f"meldkit merge: note: {flag} changes nothing: {why}", file=sys.stderr)

    def _terminated(signum, frame):  # unwinds through merge(), which removes its partial output
        print(f"meldkit merge: {signal.Signals(signum).name}: stopped", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            try:
                previous[sig] = signal.signal(sig, _terminated)
            except ValueError:  # not the main thread: leave the process's handlers alone
                break
    try:
        out = merge(
            args.config,
            args.out_dir,
            device=device,
            out_shard_size=args.out_shard_size,
            seed=seed,
            allow_pickle=args.allow_pickle,
            progress=not args.no_progress,
            trim_scope=args.trim_scope,
            tie=args.tie,
            read_ahead=None if args.read_ahead.lower() == "none" else args.read_ahead,
            fsync=args.fsync,
        )
    except (ConfigError, MergeError, CheckpointError) as exc:
        print(f"meldkit merge: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # Raised by an op in the middle of the merge (a NaN in a task vector, ...): the output
        # is already removed; one line, not a traceback.
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"meldkit merge: the merge failed: {text}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output cannot be written (permissions, a full disk, ...)
        print(f"meldkit merge: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        print(f"merged model written to {out}")
    except BrokenPipeError:  # stdout closed (`| head -0`): the merge itself succeeded
        # No second error when Python flushes stdout at exit (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from meldkit.demo import run_demo
    from meldkit.merging.engine import MergeError, _merge_device

    if args.device is not None:
        try:  # the check merge --device makes: a CUDA device that torch sees
            _merge_device(args.device)
        except MergeError as exc:
            print(f"meldkit demo: {exc}", file=sys.stderr)
            return 2
    return run_demo(device=args.device)


def _bare_bytes(text: str) -> int | None:
    """The byte count of a size written without a unit (``"5"``, ``"1e6"``), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    # below 1, or not finite: parse_size's error says why
    return int(value) if math.isfinite(value) and value >= 1 else None


def _device_arg(text: str) -> str:
    """``--device``: one of the choices cpu, cuda, cuda:N (argparse names the option)."""
    kind, _, index = text.partition(":")
    if (kind == "cpu" and not index) or (kind == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from cpu, cuda, cuda:N)")


def _seed_arg(text: str) -> int:
    """``--seed``: an integer in [0, 2**63), the range of the masks' counter-based key."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [0, 2**63)")
    return value


def build_parser() -> argparse.ArgumentParser:
    from meldkit._version import __version__

    parser = argparse.ArgumentParser(
        prog="meldkit", description="Fast kernels for model merging and PEFT."
    )
    parser.add_argument("--version", action="version", version=f"meldkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="print the build, the GPU state and which ops run natively")
    p.add_argument("--json", action="store_true", help="also print the facts as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="run the microbenchmarks against their baselines")
    from meldkit import bench

    bench.add_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("merge", help="merge models from a mergekit-style YAML config")
    p.add_argument("config", help="YAML: merge_method, base_model, models, parameters, dtype, ...")
    p.add_argument("out_dir", help="output folder (must not exist or be empty)")
    p.add_argument(
        "--device",
        default=None,
        type=_device_arg,
        metavar="{cpu,cuda,cuda:N}",
        help="where the arithmetic runs: cpu, cuda or cuda:N (default cpu)",
    )
    p.add_argument(
        "--out-shard-size",
        default="5GB",
        help="largest output shard in bytes: 5GB, 500MB, or 1B (B = billions, as in mergekit); "
        "a number without a unit counts bytes; default 5GB",
    )
    p.add_argument(
        "--seed",
        type=_seed_arg,
        default=None,
        help="seed of DARE/DELLA masks, an integer in [0, 2**63) (default 0)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--trim-scope",
        choices=["tensor", "model"],
        default="tensor",
        help="magnitude trimming per tensor (mergekit) or over the whole model (TIES paper)",
    )
    p.add_argument(
        "--tie",
        choices=["exact_k", "keep_ties"],
        default=None,
        help="magnitudes equal to a threshold: keep exactly k, lower indices first (mergekit; "
        "the default per tensor) or keep them all (the TIES paper; the default per model)",
    )
    p.add_argument(
        "--read-ahead",
        default="32MB",
        help="how far past the next tensor a thread has the kernel read the inputs ahead of the "
        "merge (so inputs not yet cached arrive from every file at once): a size, 0 for only "
        "the next tensor, none for no read-ahead; default 32MB",
    )
    p.add_argument(
        "--fsync",
        action="store_true",
        help="flush the output to the disk before moving it into place, so that a power loss "
        "right after the merge cannot leave empty shards (waits for the disk)",
    )
    mk = p.add_argument_group(
        "mergekit-yaml's flags", "accepted so that mergekit commands run unchanged"
    )
    mk.add_argument("--cuda", action="store_true", help="same as --device cuda")
    mk.add_argument(
        "--random-seed",
        type=_seed_arg,
        default=None,
        metavar="N",
        help="same as --seed (the masks are meldkit's, not mergekit's)",
    )
    for flag in ("--allow-crimes", "--lazy-unpickle", "--copy-tokenizer"):
        mk.add_argument(
            flag, action="store_true", help="changes nothing in meldkit (a note says why)"
        )
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("demo", help="run each op on random data against its reference")
    p.add_argument(
        "--device",
        default=None,
        type=_device_arg,
        metavar="{cpu,cuda,cuda:N}",
        help="cpu, cuda or cuda:N (default: cuda when usable, else cpu)",
    )
    p.set_defaults(func=_cmd_demo)
    return parser


def _warning_printer(prefix: str):
    """A ``warnings.showwarning`` that prints ``<prefix>: warning: <message>``, one line per
    warning, without the file, line and source line Python's default shows."""

    def show(message, category, filename, lineno, file=None, line=None):
        try:
            print(f"{prefix}: warning: {message}", file=file or sys.stderr)
        except OSError:  # stderr closed or gone: as Python's own showwarning, drop it
            pass

    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"meldkit {args.command}"
    if args.command != "info":  # info lists an invalid value among its facts instead
        from meldkit import _native

        try:
            _native.backend()
        except ValueError as exc:
            print(f"{prefix}: {exc}", file=sys.stderr)
            return 2
    with warnings.catch_warnings():  # restores Python's showwarning when the command ends
        warnings.showwarning = _warning_printer(prefix)
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
