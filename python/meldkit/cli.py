"""The ``meldkit`` command: ``info``, ``bench`` and ``demo`` (methods add their subcommands)."""

from __future__ import annotations

import argparse
import sys


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


def _cmd_demo(args: argparse.Namespace) -> int:
    from meldkit.demo import run_demo

    return run_demo(device=args.device)


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

    p = sub.add_parser("demo", help="run each op on random data against its reference")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when usable)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
