"""Flags that choose the checkpoints: --zoo DIR, or --base FILE --experts FILE ..., plus --tasks."""
from __future__ import annotations

import argparse

from ..sources import Source, resolve_source


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints (give --zoo, or --base with --experts)")
    group.add_argument("--zoo", metavar="DIR", help="a model zoo folder (pretrained model + named task models + zoo.json)")
    group.add_argument("--base", metavar="FILE", help="pretrained checkpoint (.safetensors, .pt/.bin state dict, or HF folder)")
    group.add_argument("--experts", metavar="FILE", nargs="+", help="fine-tuned checkpoints, one per task")
    group.add_argument("--tasks", metavar="TASK", nargs="+",
                       help="merge only these tasks, in this order (default: all)")


def source_from_args(args: argparse.Namespace) -> Source:
    return resolve_source(zoo=args.zoo, base=args.base, experts=args.experts).select(args.tasks)
