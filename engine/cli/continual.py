"""`python -m engine continual`: test-time continual merging over a zoo's tasks, one or more orders.

Prints ACC/BWT (and FWT) per order and their mean ± std; with --json the full result: `order`,
`acc_matrix` (step × task in merge order, %, null for tasks not yet seen), `ACC`, `BWT`, `FWT`,
`timings`, and for MINGLE `gates` (per gate × evaluated task means and stds across layers, and
per-layer means). Several --order-seed values give {"orders": {seed: result}, "summary": ...}.
"""
from __future__ import annotations

import argparse
import time

from ..errors import ConfigError
from .common import print_json

METHOD_NAMES = ("mingle", "average", "task-arithmetic", "ties", "magmax", "opcm")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "continual", help="test-time continual merging (MINGLE and continual baselines), accuracy matrix and BWT",
        description="Merge a zoo's experts one at a time in a paper order (random.seed(s); random.shuffle), "
                    "evaluating after every step on the tasks seen so far.")
    parser.add_argument("--zoo", required=True, metavar="DIR", help="zoo directory (python -m engine zoo build)")
    parser.add_argument("--method", required=True, choices=METHOD_NAMES, help="continual method")
    parser.add_argument("--order-seed", type=int, nargs="+", default=[42], metavar="S",
                        help="order seeds (paper: 42..51); several give mean ± std (default 42)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="use only these zoo tasks (canonical order kept)")
    m = parser.add_argument_group("MINGLE (methods.md §4)")
    m.add_argument("--rank", type=int, default=64, help="expert rank r (default 64)")
    m.add_argument("--gamma", type=float, default=1.0, help="relaxation strength γ; 0 = hard projection (default 1.0)")
    m.add_argument("--beta", type=float, default=0.99, help="EMA decay β of the alignment scores (default 0.99)")
    m.add_argument("--subspace-k", type=int, default=3, help="protected input directions per task per layer (3)")
    m.add_argument("--steps", type=int, default=50, help="adaptation steps per task (50)")
    m.add_argument("--seeds-per-class", type=int, default=5, help="unlabelled seed images per class (5)")
    m.add_argument("--batch-size", type=int, default=16, help="adaptation batch size (16)")
    m.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (1e-4)")
    m.add_argument("--layers", choices=("all", "qkv-fc1", "attn-fc1"), default="all",
                   help="all = MINGLE, qkv-fc1 = MINGLE*, attn-fc1 = the official code's MINGLE*")
    m.add_argument("--no-projection", action="store_true", help="turn the null-space gradient projection off")
    m.add_argument("--static", action="store_true", help="MINGLE-static: fixed coefficient, no adaptation")
    m.add_argument("--static-coef", type=float, default=0.3, help="coefficient of the static variant (0.3)")
    m.add_argument("--per-image-gates", action="store_true", help="average gates per image, not over the batch")
    m.add_argument("--no-gates", action="store_true", help="skip the gate-activation pass after the last task")
    b = parser.add_argument_group("baselines (methods.md §2)")
    b.add_argument("--lam", type=float, default=None,
                   help="scaling λ: task-arithmetic/ties 0.3, magmax 0.5 (MINGLE Tab. 11)")
    b.add_argument("--k", type=float, default=20.0, help="ties: top-k %% kept per row (20)")
    b.add_argument("--alpha", type=float, default=0.5, help="opcm: singular-mass split α (0.5)")
    parser.add_argument("--eval-batch-size", type=int, default=128, help="evaluation batch (128; MINGLE routes per batch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of seed-image selection, gate init and loader")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu or cuda[:N]: where MINGLE adapts and models are evaluated")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared CPU a second OpenMP thread mostly waits)")
    parser.add_argument("--json", action="store_true", help="print the full JSON result")
    parser.set_defaults(handler=run)


# MINGLE Tab. 11's λ per baseline when --lam is not given.
DEFAULT_LAMBDAS = {"task-arithmetic": 0.3, "ties": 0.3, "magmax": 0.5}


def _method_values(args) -> dict:
    """The chosen method's Config fields from the flags (engine.continual.method_config validates them)."""
    if args.method == "mingle":
        return dict(rank=args.rank, gamma=args.gamma, beta=args.beta, subspace_k=args.subspace_k, steps=args.steps,
                    seeds_per_class=args.seeds_per_class, batch_size=args.batch_size, lr=args.lr,
                    layers=args.layers, projection=not args.no_projection, static=args.static,
                    static_coef=args.static_coef, batch_reduce=not args.per_image_gates,
                    eval_batch_size=args.eval_batch_size, seed=args.seed)
    values: dict = {}
    if args.method in DEFAULT_LAMBDAS:
        values["lam"] = DEFAULT_LAMBDAS[args.method] if args.lam is None else args.lam
    if args.method == "ties":
        values["k"] = args.k
    if args.method == "opcm":
        values["alpha"] = args.alpha
    return values


def _method_factory(args, model_config):
    from ..continual import make_method, method_config

    config = method_config(args.method, _method_values(args))  # fails before any work
    return lambda: make_method(args.method, config, model_config, device=args.device)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..continual import ZooSource, run_continual, summarize, task_order

    if args.threads < 1:
        raise ConfigError("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    from ..device import resolve_device

    args.device = resolve_device(args.device)
    source = ZooSource.from_dir(args.zoo, tasks=args.tasks)
    factory = _method_factory(args, source.model_config)  # validates the config before any work
    results = {}
    for seed in args.order_seed:
        order = task_order(source.tasks, seed)
        start = time.perf_counter()
        results[seed] = run_continual(source, factory(), order, seeds_per_class=args.seeds_per_class, seed=args.seed,
                                      eval_batch_size=args.eval_batch_size, device=args.device,
                                      gate_stats=args.method == "mingle" and not args.no_gates and not args.static)
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
