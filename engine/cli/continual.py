"""`python -m engine continual`: test-time continual merging over a suite's tasks, one or more orders.

Prints ACC/BWT (and FWT) per order and their mean ± std; with --json the full result: `order`,
`acc_matrix` (step × task in merge order, %, null for tasks not yet seen), `ACC`, `BWT`, `FWT`,
`timings`, and for MINGLE `gates` (per gate × evaluated task means and stds across layers, and
per-layer means). Several --order-seed values give {"orders": {seed: result}, "summary": ...}.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from ..continual import make_method, run_continual, summarize, task_order
from ..device import resolve_device
from ..errors import ConfigError
from ..methods import continual_methods, get_continual_method
from ..runs import describe_source
from .common import add_record_argument, print_json, record_run
from .method_args import add_config_arguments, given_values
from .sources_args import add_suite_arguments, suite_from_args

# Run settings shared by every method; MINGLE's Config has them too and receives the same values.
RUN_FIELDS = {"seed", "seeds_per_class", "eval_batch_size"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "continual", help="test-time continual merging (MINGLE and continual baselines), accuracy matrix and BWT",
        description="Merge a suite's experts one at a time in a paper order (random.seed(s); random.shuffle), "
                    "evaluating after every step on the tasks seen so far.")
    add_suite_arguments(parser)
    add_config_arguments(parser, continual_methods(), lambda m: m.continual_config_cls,
                         title="method settings (defaults are each method's own; see docs/methods.md)",
                         skip=RUN_FIELDS)
    parser.add_argument("--order-seed", type=int, nargs="+", default=[42], metavar="S",
                        help="order seeds (paper: 42..51); several give mean ± std (default 42)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="use only these tasks (canonical order kept)")
    parser.add_argument("--seeds-per-class", type=int, default=5, help="unlabelled seed images per class (5)")
    parser.add_argument("--eval-batch-size", type=int, default=128,
                        help="evaluation batch (128; MINGLE routes per batch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of seed-image selection, gate init and loader")
    parser.add_argument("--no-gates", action="store_true", help="skip MINGLE's gate-activation pass after the last task")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu or cuda[:N]: where MINGLE adapts and models are evaluated")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared CPU a second OpenMP thread mostly waits)")
    parser.add_argument("--json", action="store_true", help="print the full JSON result")
    add_record_argument(parser)
    parser.set_defaults(handler=run)


def _method_values(args, config_cls) -> dict:
    """The chosen method's Config fields from the flags given, plus the run settings it shares."""
    values = given_values(args)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values.update({name: getattr(args, name) for name in RUN_FIELDS if name in names})
    return values


def _method_factory(args, suite):
    spec = get_continual_method(args.method)
    config = spec.continual_config(**_method_values(args, spec.continual_config_cls))  # fails before any work
    return spec, lambda: make_method(args.method, config, suite.build_encoder, device=args.device)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads < 1:
        raise ConfigError("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    source = suite_from_args(args)
    if args.tasks:
        for task in args.tasks:
            source.check_task(task)
        source = source.select([t for t in source.task_names() if t in args.tasks])  # canonical order
    spec, factory = _method_factory(args, source)  # validates the config before any work
    gates = args.method == "mingle" and not args.no_gates and not getattr(args, "static", False)
    results = {}
    for seed in args.order_seed:
        order = task_order(source.tasks, seed)
        start = time.perf_counter()
        results[seed] = run_continual(source, factory(), order, seeds_per_class=args.seeds_per_class, seed=args.seed,
                                      eval_batch_size=args.eval_batch_size, device=args.device, limit=args.limit,
                                      gate_stats=gates)
        record_run(args, "continual", results[seed].to_json(), method=args.method,
                   config={**_method_values(args, spec.continual_config_cls), "order_seed": seed},
                   source=describe_source(source, args.limit), device=str(args.device),
                   timings=results[seed].timings)
        if not args.json:
            r = results[seed]
            bwt = "n/a" if r.BWT is None else f"{r.BWT:+.1f}"
            fwt = "n/a" if r.FWT is None else f"{r.FWT:+.1f}"
            print(f"order s{seed}: {' '.join(order)}  ACC {r.ACC:.1f}  BWT {bwt}  FWT {fwt}  "
                  f"(merge {r.timings['merge_total_s']:.1f} s, total {time.perf_counter() - start:.1f} s)")
    if args.json:
        if len(results) == 1:
            print_json(next(iter(results.values())).to_json())
        else:
            print_json({"orders": {str(s): r.to_json() for s, r in results.items()},
                        "summary": summarize(list(results.values()))})
    elif len(results) > 1:
        summary = summarize(list(results.values()))
        parts = [f"{k} {v['mean']:.1f} ± {v['std']:.1f}" for k, v in summary.items()
                 if v is not None and k != "merge_total_s"]
        print(f"{args.method} over {len(results)} orders: " + ", ".join(parts))
    return 0
