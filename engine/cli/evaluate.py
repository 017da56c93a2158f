"""`python -m engine evaluate`: per-task accuracy of one model on the demo zoo's test sets."""
from __future__ import annotations

import argparse

from .common import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="per-task accuracy of a model on a zoo's tasks (and normalised accuracy)",
        description="Top-1 accuracy on each task's held-out test split, under the task's frozen zero-shot head "
                    "(logit scale 100); normalised accuracy = accuracy / the task's fine-tuned expert's.")
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $MERGE_EXPLORER_ZOO or .zoo/demo)")
    parser.add_argument("--model", default="pretrained",
                        help="pretrained (default), a task name (its fine-tuned expert), or a checkpoint file "
                             "fine-tuned from the zoo's pretrained model (e.g. a merge saved with merge --out)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="evaluate only these tasks (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true",
                        help='print {"per_task", "average", "normalized", "normalized_average"} as JSON')
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_model
    from ..zoo.manifest import load_zoo

    zoo = load_zoo(args.zoo)
    report = evaluate_model(zoo, args.model, tasks=args.tasks, device=args.device)
    if args.json:
        print_json(report.to_json())
        return 0
    print(f"{args.model} on the zoo at {zoo.root}")
    print(f"{'task':<12}{'accuracy %':>12}{'normalised':>12}")
    for task, acc in report.per_task.items():
        norm = report.normalized.get(task)
        print(f"{task:<12}{acc:>12.1f}{norm:>12.3f}" if norm is not None else f"{task:<12}{acc:>12.1f}")
    print(f"{'average':<12}{report.average:>12.1f}{report.normalized_average:>12.3f}")
    return 0
