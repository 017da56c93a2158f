"""Resolving Interference on the demo zoo: time RI for all 8 experts, then merge with and without it.

Prints the wall time of adapting every expert with the default (demo) settings (the issue's budget
is ≤ 5 min on a 2-core CPU), then for weight averaging, Task Arithmetic and TIES at their own
defaults the average accuracy (absolute and normalised by the ORIGINAL experts) and ξ (against the
original experts, nats per image) on the original experts and on the RI-adapted ones, with ξ per task.

    python benchmarks/ri.py [--zoo .zoo/demo] [--out DIR] [--threads 2] [--aux pool] [--steps N] [--json FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.analysis.interference import measure_interference  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.methods import get_method  # noqa: E402
from engine.adapted import write_experts  # noqa: E402
from engine.methods.ri import RIConfig, adapt_suite  # noqa: E402
from engine.task_vectors import TaskVectorStack  # noqa: E402
from engine.zoo.suite import ZooSuite  # noqa: E402

METHODS = ("average", "task-arithmetic", "ties")


def merge_and_measure(suite, method_name: str) -> dict:
    """Merge `suite`'s experts with a method at its defaults; accuracy, and ξ against the original experts."""
    method = get_method(method_name)
    stack = TaskVectorStack.from_suite(suite)
    merged = stack.apply(method.merge(stack, method.Config()))
    accuracy = evaluate(suite, merged).to_json()
    xi = measure_interference(suite, merged).to_json()
    return {"average_pct": accuracy["average"], "normalized": accuracy.get("normalized_average"),
            "per_task_pct": accuracy["per_task"], "xi": xi}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=".zoo/demo")
    parser.add_argument("--out", default=None, help="keep the adapted experts here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aux", default=None, choices=("pool", "render", "noise"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--no-table", dest="table", action="store_false", help="only time the adaptation")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write all numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("aux", args.aux), ("steps", args.steps), ("alpha", args.alpha)) if v is not None}
    config = dataclasses.replace(RIConfig(), **overrides)

    zoo = ZooSuite.load(args.zoo)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "ri"
        start = time.perf_counter()
        adapted_weights, result = adapt_suite(zoo, config, measure_accuracy=False)
        write_start = time.perf_counter()
        write_experts(out, adapted_weights, result)
        write_s = time.perf_counter() - write_start
        wall_s = time.perf_counter() - start
        print(f"RI, {len(result.tasks)} experts, {torch.get_num_threads()} threads, settings {dataclasses.asdict(config)}")
        print(f"  wall time {wall_s:.1f} s (adaptation {result.timings['adapt_s']:.1f} s, "
              f"setup {result.timings['setup_s']:.1f} s, write {write_s:.1f} s); budget 300 s")
        for s in result.experts:
            print(f"    {s.task:>10}: {s.seconds:5.1f} s   L_RI(aux) {s.aux_loss_before:.4f} -> {s.aux_loss_after:.4f}"
                  f"   interference term {s.aux_interference_before:.4f} -> {s.aux_interference_after:.4f}"
                  f"   keep term {s.aux_keep_after:.4f}")
        payload = {"config": dataclasses.asdict(config), "wall_s": wall_s, "threads": torch.get_num_threads(),
                   "timings": result.timings, "experts": [s.to_json() for s in result.experts]}
        if args.table:
            adapted = zoo.with_experts({t: out / "experts" / f"{t}.safetensors" for t in zoo.task_names()},
                                       f"{zoo.label}, RI-adapted")
            rows = {}
            for name in METHODS:
                rows[name] = {"without": merge_and_measure(zoo, name), "with": merge_and_measure(adapted, name)}
            payload["table"] = rows
            print("\n| method | acc without RI | acc with RI | norm. without | norm. with | ξ without | ξ with |")
            print("|---|---|---|---|---|---|---|")
            for name, r in rows.items():
                a, b = r["without"], r["with"]
                fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
                print(f"| {name} | {a['average_pct']:.1f} | {b['average_pct']:.1f} | {fmt(a['normalized'])} | "
                      f"{fmt(b['normalized'])} | {a['xi']['total']:.3f} | {b['xi']['total']:.3f} |")
            tasks = result.tasks
            print("\nξ per task (nats/image, against the original experts), without -> with RI")
            print("| method | " + " | ".join(tasks) + " |")
            print("|---|" + "---|" * len(tasks))
            for name, r in rows.items():
                cells = [f"{r['without']['xi']['per_task'][t]:.3f} → {r['with']['xi']['per_task'][t]:.3f}" for t in tasks]
                print(f"| {name} | " + " | ".join(cells) + " |")
            print("\naccuracy per task (%), without -> with RI")
            for name, r in rows.items():
                cells = [f"{r['without']['per_task_pct'][t]:.1f}→{r['with']['per_task_pct'][t]:.1f}" for t in tasks]
                print(f"  {name:>16}: " + "  ".join(f"{t} {c}" for t, c in zip(tasks, cells)))
        if args.json:
            Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
