"""MINGLE over the demo zoo's tasks: seconds per task (experts, teacher, adaptation, subspaces), total.

Runs one order (default s = 42) with the default configuration (r = 64, 50 steps at batch 16,
5 seeds per class, all six linears) and prints the per-task breakdown of merge time, the
evaluation time, and the total against the issue's budget (≤ 3 min for 8 tasks on a 2-core CPU).
The paper's reference is 78 s for 8 tasks (9.8 s/task) on a GPU with ViT-B/32 (docs/methods.md, reference numbers).

    python benchmarks/mingle.py [--zoo .zoo/demo] [--order-seed 42] [--threads 1] [--layers all]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.continual import run_continual, task_order  # noqa: E402
from engine.methods.mingle import MingleConfig, MingleContinual  # noqa: E402
from engine.zoo.suite import ZooSuite  # noqa: E402

BUDGET_S = 180.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=".zoo/demo")
    parser.add_argument("--order-seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared CPU stalls a 2nd thread)")
    parser.add_argument("--layers", default="all", choices=("all", "qkv-fc1", "attn-fc1"))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    source = ZooSuite.load(args.zoo)
    order = task_order(source.tasks, args.order_seed)
    for task in order:  # load test sets before the clock: I/O is not MINGLE's cost
        source.test_set(task)
    load_s = time.perf_counter() - start
    method = MingleContinual(MingleConfig(layers=args.layers, steps=args.steps), encoder=source.build_encoder)
    result = run_continual(source, method, order)
    print(f"zoo {args.zoo}: {len(order)} tasks, order s{args.order_seed}, threads {args.threads}, "
          f"layers {args.layers} (loading {load_s:.1f} s, not counted)")
    print(f"{'task':<12}{'experts':>9}{'teacher':>9}{'adapt':>9}{'subspace':>10}{'merge s':>9}{'eval s':>8}")
    for i, log in enumerate(method.mingle.logs):
        s = log.seconds
        print(f"{log.task:<12}{s.get('experts', 0):9.2f}{s.get('teacher', 0):9.2f}{s.get('adapt', 0):9.2f}"
              f"{s.get('subspaces', 0):10.2f}{result.timings['merge_s'][i]:9.2f}{result.timings['eval_s'][i]:8.2f}")
    merge, total = result.timings["merge_total_s"], result.timings["total_s"]
    print(f"merge: {merge:.1f} s ({merge / len(order):.1f} s/task); with evaluation after every step: {total:.1f} s "
          f"({'within' if total <= BUDGET_S else 'OVER'} the {BUDGET_S:.0f} s budget)")
    print(f"ACC {result.ACC:.1f}  BWT {result.BWT:+.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
