"""`python -m engine evaluate`: per-task accuracy of one model on a task suite's test images."""
from __future__ import annotations

import argparse

from ..evaluate import evaluate_model
from .common import print_json
from .sources_args import add_suite_arguments, suite_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="per-task accuracy of a model on a suite's tasks (and normalised accuracy)",
        description="Top-1 accuracy on each task's held-out test images, under the task's frozen zero-shot head "
                    "(logit scale of the CLIP model, 100 for OpenAI CLIP); normalised accuracy = accuracy / the "
                    "task's fine-tuned expert's under the same image budget.")
    add_suite_arguments(parser, zoo_default_text=" (default when no --suite: $MERGE_EXPLORER_ZOO or .zoo/demo)")
    parser.add_argument("--model", default="pretrained",
                        help="pretrained (default), a task name (its fine-tuned expert), or a checkpoint file "
                             "fine-tuned from the suite's pretrained model (e.g. a merge saved with merge --out)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="evaluate only these tasks (default: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true",
                        help='print {"per_task", "average", "normalized", "normalized_average", "n_images"} as JSON')
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    suite = suite_from_args(args, default_zoo=True)
    report = evaluate_model(suite, args.model, tasks=args.tasks, device=args.device, limit=args.limit)
    if args.json:
        print_json(report.to_json())
        return 0
    print(f"{args.model} on {suite.label}")
    print(f"{'task':<16}{'accuracy %':>12}{'normalised':>12}{'images':>8}")
    for task, acc in report.per_task.items():
        norm = report.normalized.get(task)
        cells = f"{task:<16}{acc:>12.1f}" + (f"{norm:>12.3f}" if norm is not None else f"{'':>12}")
        print(cells + f"{report.n_images[task]:>8}")
    print(f"{'average':<16}{report.average:>12.1f}{report.normalized_average:>12.3f}")
    return 0
