"""`python -m engine`: argument parsing and output only; every computation lives in the library.

Each sub-command is a module here with `register(subparsers)` (adds its parser and sets
`handler=run`) and `run(args) -> int`. Bad input surfaces as a `MergeExplorerError`, which
becomes exit code 2 and a single line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import MergeExplorerError

# Order is the order shown in `--help`.
COMMAND_MODULES = ("zoo", "evaluate", "merge", "conflicts", "interference", "ri", "continual", "gate_inputs", "runs")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; the contract is one line on stderr and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m engine",
        description="Merge Explorer engine: merge fine-tuned CLIP vision towers and inspect their interference.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{module_name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a usage line on bad flags
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except MergeExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
