"""The ``hf-subset-select`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


class CLIError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _cmd_demo(ns: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(output_dir=ns.output_dir, scale=ns.scale, seed=ns.seed)
    run_demo(config)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-subset-select",
        description="Choose auxiliary data sources for a target task from cached projected gradients.",
    )
    parser.add_argument("--version", action="version", version=f"hf-subset-select {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo}")
    demo = sub.add_parser("demo", help="Run the whole pipeline on built-in toy sources (offline, CPU).")
    demo.add_argument(
        "--output_dir", default="hf_subset_select_demo", help="Where the demo writes its artifacts."
    )
    demo.add_argument(
        "--scale", default="full", choices=["full", "test"], help="'test' is a reduced, faster run."
    )
    demo.add_argument("--seed", type=int, default=0, help="Seed for data, models and training.")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "func", None) is None:
        parser.print_help()
        return 2
    try:
        ns.func(ns)
    except (CLIError, FileNotFoundError, ValueError) as exc:
        print(f"hf-subset-select {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
