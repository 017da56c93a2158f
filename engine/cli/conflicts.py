"""`python -m engine conflicts`: sign-conflict statistics of trimmed task vectors."""
from __future__ import annotations

import argparse

from ..analysis.conflicts import DEFAULT_K_GRID, sign_conflicts
from ..device import resolve_device, resolve_dtype
from ..runs import describe_source
from ..task_vectors import TaskVectorStack
from ..trim import TRIM_SCOPES
from .common import add_device_arguments, add_record_argument, print_json, record_run
from .sources_args import add_source_arguments, source_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "conflicts", help="sign-conflict rates between trimmed task vectors",
        description="Trim every task vector to its top k %% magnitudes (as TIES does), then count the parameters "
                    "where tasks disagree in sign: overall, per tensor, per task pair, and as curves over k and "
                    "over the number of merged tasks, next to the random-sign baseline.")
    add_source_arguments(parser)
    parser.add_argument("--k", type=float, default=20.0, help="trim: keep the top k %% magnitudes (default 20)")
    parser.add_argument("--trim", choices=TRIM_SCOPES, default="global",
                        help="count the top k %% over the whole model (global) or per tensor")
    parser.add_argument("--k-grid", type=float, nargs="+", default=list(DEFAULT_K_GRID), metavar="K",
                        help="k values (%%) for the conflict-vs-k curve (default 5 10 ... 100)")
    parser.add_argument("--json", action="store_true", help="print a JSON result instead of a summary")
    add_device_arguments(parser)
    add_record_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    source = source_from_args(args)
    stack = TaskVectorStack.from_files(source.base_path, source.expert_paths, source.tasks,
                                       device=resolve_device(args.device), dtype=resolve_dtype(args.dtype))
    report = sign_conflicts(stack, k=args.k, trim=args.trim, k_grid=args.k_grid)
    if args.json:
        print_json(report.to_json())
    record_run(args, "conflicts", report.to_json(), config={"k": args.k, "trim": args.trim},
               source=describe_source(source), device=str(stack.device) if hasattr(stack, "device") else None)
    if args.json:
        return 0
    o = report.overall
    print(f"Sign conflicts of {len(report.tasks)} task vectors trimmed to the top {report.k:g} % ({report.trim}):")
    print(f"  over all parameters            : {100 * o['rate_all']:5.1f} %   "
          f"(random signs: {100 * o['random_baseline']:.1f} %)")
    print(f"  where >= 2 tasks are non-zero  : {100 * o['rate_nonzero2']:5.1f} %   "
          f"(random signs: {100 * o['random_baseline_nonzero2']:.1f} %; {o['n_nonzero2']:,} parameters)")
    worst = sorted(report.per_tensor.items(), key=lambda kv: -kv[1]["rate_all"])[:5]
    print("  most conflicted tensors:")
    for name, rates in worst:
        print(f"    {name:<48} {100 * rates['rate_all']:5.1f} %")
    return 0
