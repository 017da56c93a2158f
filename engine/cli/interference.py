"""`python -m engine interference`: cross-task interference ξ of a merge (docs/methods.md, RI)."""
from __future__ import annotations

import argparse
import time

from ..analysis.interference import measure_interference, reference_suite
from ..device import resolve_device
from ..errors import ConfigError
from ..methods import config_dict
from ..task_vectors import TaskVectorStack
from .common import print_json
from .method_args import add_method_arguments, method_and_config
from .sources_args import add_source_arguments, source_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "interference", help="interference ξ of a merge: KL from each expert under its own head",
        description="Merge a suite's experts with one method, then measure ξ: for every task t the mean "
                    "KL(expert t || merged) of the softmax outputs under task t's head on task t's test images "
                    "(nats per image), per task and summed over tasks (docs/methods.md). For RI-adapted experts "
                    "the reference experts are the original (un-adapted) ones unless --reference own.")
    add_method_arguments(parser)
    add_source_arguments(parser)
    parser.add_argument("--reference", choices=("auto", "own", "original"), default="auto",
                        help="experts ξ is measured against: the suite's own, or (for RI-adapted experts) the "
                             "original experts they were adapted from; auto = original when recorded and present")
    parser.add_argument("--json", action="store_true", help="print a JSON result instead of a summary")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    method, config = method_and_config(args)
    source = source_from_args(args)
    if not source.can_evaluate:
        raise ConfigError("interference needs --zoo DIR or --suite FILE: ξ is measured with the heads on test images")
    device = resolve_device(args.device)
    reference = reference_suite(source.suite, args.reference)

    start = time.perf_counter()
    stack = TaskVectorStack.from_files(source.base_path, source.expert_paths, source.tasks, device=device)
    merged = stack.apply(method.merge(stack, config))
    merge_s = time.perf_counter() - start
    start = time.perf_counter()
    report = measure_interference(source.suite, merged, source.tasks, limit=args.limit, device=str(device),
                                  reference=args.reference)
    xi_s = time.perf_counter() - start

    result = {
        "method": method.name,
        "hyperparameters": config_dict(config),
        "tasks": source.tasks,
        "suite": source.suite.label,
        "reference_experts": reference.label,
        "kept_from_base": stack.kept_from_base,
        "xi": report.to_json(),
        "timings": {"merge_s": merge_s, "xi_s": xi_s},
    }
    if args.json:
        print_json(result)
        return 0
    params = ", ".join(f"{k}={v}" for k, v in config_dict(config).items()) or "no hyperparameters"
    print(f"Interference ξ of {method.label} ({params}) over {len(source.tasks)} tasks "
          f"(reference experts: {reference.label}):")
    print(f"  ξ total {report.total:.4f} nats (mean per task {report.mean:.4f})")
    for task in source.tasks:
        print(f"    {task:>16}: ξ {report.per_task[task]:.4f}   top-1 agreement with expert "
              f"{report.agreement_pct[task]:5.1f} %")
    return 0
