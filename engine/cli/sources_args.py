"""Flags that choose the checkpoints: --zoo DIR, --suite FILE, or --base FILE --experts FILE ...,
plus --tasks and --limit."""
from __future__ import annotations

import argparse

from ..access import cli_roots
from ..errors import ConfigError
from ..sources import Source, load_task_suite, resolve_source
from ..zoo.manifest import default_zoo_dir

LIMIT_HELP = ("test images per task (seeded, class-stratified); overrides the suite file's limits; "
              "0 = full test sets (default: the suite's own setting; the demo zoo uses all)")


def add_suite_arguments(parser: argparse.ArgumentParser, *, zoo_default_text: str = "") -> None:
    """--zoo DIR | --suite FILE (a task suite: checkpoints with test data) and --limit N."""
    parser.add_argument("--zoo", metavar="DIR", help="a demo-zoo folder (python -m engine zoo build)" + zoo_default_text)
    parser.add_argument("--suite", metavar="FILE", help="a suite file: your own CLIP checkpoints and test data "
                                                        "(TOML; see docs/suites.md)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help=LIMIT_HELP)


def suite_from_args(args: argparse.Namespace, *, default_zoo: bool = False):
    """The TaskSuite named by --zoo/--suite (or the default demo zoo when neither is given and allowed)."""
    zoo, suite = args.zoo, args.suite
    if zoo is None and suite is None:
        if not default_zoo:
            raise ConfigError("give --zoo DIR or --suite FILE (test data and heads are needed here)")
        zoo = default_zoo_dir()
    return load_task_suite(zoo=zoo, suite=suite, limit=args.limit, roots=cli_roots())


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints (give --zoo, --suite, or --base with --experts)")
    group.add_argument("--zoo", metavar="DIR", help="a model zoo folder (pretrained model + named task models + zoo.json)")
    group.add_argument("--suite", metavar="FILE", help="a suite file: your own CLIP checkpoints with test data "
                                                       "(TOML; see docs/suites.md)")
    group.add_argument("--base", metavar="FILE", help="pretrained checkpoint (.safetensors, .pt/.bin state dict, or HF folder)")
    group.add_argument("--experts", metavar="FILE", nargs="+", help="fine-tuned checkpoints, one per task")
    group.add_argument("--tasks", metavar="TASK", nargs="+",
                       help="merge only these tasks, in this order (default: all)")
    group.add_argument("--limit", type=int, default=None, metavar="N", help=LIMIT_HELP)


def source_from_args(args: argparse.Namespace) -> Source:
    return resolve_source(zoo=args.zoo, suite=args.suite, base=args.base, experts=args.experts,
                          limit=args.limit, roots=cli_roots()).select(args.tasks)
