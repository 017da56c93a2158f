"""`python -m engine gate-inputs`: how much room a model leaves MINGLE's gates to route (engine/analysis/gate_inputs.py).

Prints, for the suite's pretrained model, the novel share of each task's token-mean layer input: the
part that lies outside the other tasks' top-k input directions, which MINGLE's null space protects.
"""
from __future__ import annotations

import argparse
import time

from ..analysis.gate_inputs import measure_gate_inputs
from ..device import resolve_device
from ..errors import ConfigError
from ..methods.mingle import LAYER_SETS
from .common import print_json
from .sources_args import add_suite_arguments, suite_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "gate-inputs", help="MINGLE's room to route: each task's mean layer input outside the other tasks' directions",
        description="For every linear MINGLE gates and every task, the share (0-1, of squared length) of the task's "
                    "token-mean input that lies outside the other tasks' top-k input directions, measured on the "
                    "pretrained model and the tasks' test images. Near 0 a gate can only open on what all tasks "
                    "share, so it opens on every task alike; see docs/zoo-recipe.md.")
    add_suite_arguments(parser)
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="use only these tasks (at least two)")
    parser.add_argument("--subspace-k", type=int, default=3,
                        help="input directions per task that MINGLE protects (its default 3)")
    parser.add_argument("--layers", choices=tuple(LAYER_SETS), default="all", help="which linears (as MINGLE's --layers)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--json", action="store_true", help="print the full JSON result (per layer and task)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.subspace_k < 0:
        raise ConfigError(f"--subspace-k must be 0 or more, got {args.subspace_k}")
    suite = suite_from_args(args).select(args.tasks)  # refuses unknown task names
    start = time.perf_counter()
    report = measure_gate_inputs(suite, limit=args.limit, subspace_k=args.subspace_k, layers=args.layers,
                                 device=str(resolve_device(args.device)))
    seconds = time.perf_counter() - start
    if args.json:
        print_json({**report.to_json(), "seconds": seconds})
        return 0
    print(f"novel share of each task's mean layer input (outside the other tasks' top-{report.subspace_k} "
          f"directions; 0 = all shared, 1 = all its own), pretrained model, {seconds:.1f} s")
    width = max(len(t) for t in report.tasks)
    for task, value in zip(report.tasks, report.per_task):
        print(f"  {task:<{width}}  {100 * value:5.1f} %")
    print(f"  {'mean':<{width}}  {100 * report.mean:5.1f} %  (over {len(report.layers)} linears)")
    print(f"common share of the tasks' mean layer inputs (what every task has alike, which an unprojected gate "
          f"learns first): {100 * float(report.common.mean()):.1f} %")
    return 0
