"""`python -m engine merge`: merge expert checkpoints with one method and optionally save/evaluate."""
from __future__ import annotations

import argparse
import time

from ..device import resolve_device, resolve_dtype
from ..errors import ConfigError
from ..evaluate import evaluate
from ..merged import provenance, write_merged
from ..methods import config_dict
from ..runs import describe_source
from ..task_vectors import TaskVectorStack
from .common import add_device_arguments, add_record_argument, print_json, record_run
from .method_args import add_method_arguments, method_and_config
from .sources_args import add_source_arguments, source_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge fine-tuned checkpoints (averaging, Task Arithmetic, TIES)",
        description="Merge fine-tuned checkpoints into one model: theta = theta_0 + merged task vector.")
    add_method_arguments(parser)
    add_source_arguments(parser)
    parser.add_argument("--include", nargs="+", metavar="GLOB", help="merge only tensors whose canonical name matches")
    parser.add_argument("--exclude", nargs="+", metavar="GLOB", help="leave tensors whose name matches at theta_0")
    parser.add_argument("--out", metavar="FILE.safetensors", help="write the merged checkpoint here (atomically)")
    parser.add_argument("--evaluate", action="store_true",
                        help="with --zoo or --suite: report per-task accuracy of the merge")
    parser.add_argument("--json", action="store_true", help="print a JSON result instead of a summary")
    add_device_arguments(parser)
    add_record_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    method, config = method_and_config(args)  # validates before any file is read
    if args.out and not args.out.endswith(".safetensors"):
        raise ConfigError(f"--out {args.out}: merged checkpoints are written as .safetensors")
    source = source_from_args(args)
    if args.evaluate and not source.can_evaluate:
        raise ConfigError("--evaluate needs --zoo DIR or --suite FILE (the heads and test data to evaluate on)")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)

    start = time.perf_counter()
    stack = TaskVectorStack.from_files(source.base_path, source.expert_paths, source.tasks, include=args.include,
                                       exclude=args.exclude, device=device, dtype=dtype)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    delta = method.merge(stack, config)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    merge_s = time.perf_counter() - start
    merged = stack.apply(delta)

    save_s = None
    if args.out:
        start = time.perf_counter()
        write_merged(args.out, merged, provenance(stack, method, config))
        save_s = time.perf_counter() - start

    result = {
        "method": method.name,
        "hyperparameters": config_dict(config),
        "tasks": source.tasks,
        "n_params_merged": stack.numel,
        "kept_from_base": {"tensors": stack.kept_from_base,
                           "why": "no expert checkpoint has these tensors, so they stay at the pretrained values"},
        "device": str(device),
        "timings": {"load_s": load_s, "merge_s": merge_s, "save_s": save_s},
        "out": args.out,
    }
    if args.evaluate:
        start = time.perf_counter()
        result["accuracy"] = evaluate(source.suite, merged, tasks=source.tasks, device=args.device,
                                      limit=args.limit).to_json()
        result["timings"]["evaluate_s"] = time.perf_counter() - start
    if args.json:
        print_json(result)
    else:
        params = ", ".join(f"{k}={v}" for k, v in config_dict(config).items()) or "no hyperparameters"
        print(f"{method.label} ({params}) of {len(source.tasks)} tasks: {', '.join(source.tasks)}")
        print(f"  {stack.numel:,} parameters merged on {device}; load {load_s:.2f} s, merge {merge_s:.3f} s"
              + (f", save {save_s:.2f} s -> {args.out}" if save_s is not None else ""))
        if stack.kept_from_base:
            print(f"  kept at the pretrained values (no expert has them): {', '.join(stack.kept_from_base)}")
        if "accuracy" in result:
            acc = result["accuracy"]
            print(f"  average accuracy {acc['average']:.1f} %, normalized {acc['normalized_average']:.3f}")
            for task, pct in acc["per_task"].items():
                print(f"    {task:>16}: {pct:5.1f} %")
    if "accuracy" in result:  # a merge with its evaluation is a run worth keeping
        record_run(args, "merge", {**result["accuracy"], "tasks": source.tasks}, method=method.name,
                   config=config_dict(config), source=describe_source(source, args.limit), device=str(device),
                   timings=result["timings"])
    return 0
