"""The ``mmref`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
import tempfile


def _demo(args: argparse.Namespace) -> int:
    from mmref.trainer.demo import run_demo

    root = args.store or tempfile.mkdtemp(prefix="mmref-demo-")
    run_demo(root)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="mmref", description="RL for vision-language models with image refs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write generated screenshots to a store and print their refs and layouts")
    demo.add_argument("--store", help="store root (directory or fsspec URL); default: a new temp dir")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``mmref`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
