"""`python -m engine zoo build|info`: build the offline demo zoo, or show what an existing one holds."""
from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import time

from ..errors import MergeExplorerError
from ..zoo.build import build_zoo, format_table, recipe_for, recipe_with, up_to_date, variant_version
from ..zoo.manifest import default_zoo_dir, load_zoo
from .common import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "zoo", help="build or inspect the offline demo zoo (tiny CLIP ViT, 8 tasks, experts)",
        description="The demo zoo: a tiny CLIP ViT pretrained and fine-tuned on 8 rendered tasks, "
                    "built on this machine without downloads (default folder: $MERGE_EXPLORER_ZOO or .zoo/demo).")
    actions = parser.add_subparsers(dest="zoo_command", metavar="ACTION")
    build = actions.add_parser("build", help="build the zoo (a no-op when an up-to-date one exists)",
                               description="Render the tasks, pretrain, fine-tune one expert per task and "
                                           "measure accuracies (about half an hour on 2 CPU cores; --quick: seconds).")
    build.add_argument("--dir", default=None, help="zoo folder (default: $MERGE_EXPLORER_ZOO or .zoo/demo)")
    build.add_argument("--quick", action="store_true", help="a small 4-task zoo in well under a minute (for tests)")
    build.add_argument("--force", action="store_true", help="rebuild even if an up-to-date zoo is there")
    build.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    build.add_argument("--workers", type=int, default=None,
                       help="processes fine-tuning experts in parallel (default: 2 if the machine has 2+ cores; "
                            "does not change the result)")
    build.add_argument("--json", action="store_true", help="print the manifest's accuracy table as JSON")
    build.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="recipe experiment: change one recipe field (repeatable; e.g. --set task_frame=2); "
                            "needs --dir, the demo zoo stays as shipped (docs/zoo-recipe.md)")
    build.add_argument("--pretrained-from", default=None, metavar="ZOO_DIR",
                       help="recipe experiment: reuse the pool and pretrained tower of the zoo in ZOO_DIR when this "
                            "recipe would pretrain the same one (skips about half the build); needs --dir")
    info = actions.add_parser("info", help="print a zoo's tasks and accuracy table")
    info.add_argument("--dir", default=None, help="zoo folder (default: $MERGE_EXPLORER_ZOO or .zoo/demo)")
    info.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run, zoo_parser=parser)


def _summary(zoo) -> dict:
    return {"root": str(zoo.root), "recipe_version": zoo.recipe_version, "seed": zoo.seed, "quick": zoo.quick,
            "tasks": {t.name: {"classes": t.classes, "description": t.description, "n_test": t.n_test}
                      for t in zoo.tasks},
            "table": zoo.table, "targets": zoo.manifest.get("targets"), "build": zoo.manifest.get("build"),
            "size_bytes": zoo.manifest.get("size_bytes")}


def _print_text(zoo) -> None:
    print(f"demo zoo at {zoo.root} (recipe {zoo.recipe_version}, seed {zoo.seed}{', quick' if zoo.quick else ''})")
    for t in zoo.tasks:
        print(f"  {t.name:<9} {len(t.classes):>2} classes  {t.description}")
    print()
    print(format_table(zoo))
    targets = zoo.manifest.get("targets", {})
    if targets.get("applies") and "averaging_gain" in targets.get("met", {}):
        met, m = targets["met"], targets["measured"]
        mark = {True: "ok", False: "NOT MET"}
        lo, hi = targets["pretrained_average_range"]
        checks = [
            (f"experts {m['finetuned_average']:.1f} >= {targets['finetuned_average_min']:g}", "finetuned_average"),
            (f"pretrained {m['pretrained_average']:.1f} in [{lo:g}, {hi:g}]", "pretrained_average"),
            (f"averaging - pretrained {m['averaging_gain']:+.1f} >= {targets['averaging_gain_min']:g}", "averaging_gain"),
            (f"TA - averaging {m['task_arithmetic_over_averaging']:+.1f} >= "
             f"{targets['task_arithmetic_over_averaging_min']:g}", "task_arithmetic_over_averaging"),
            (f"TIES - averaging {m['ties_over_averaging']:+.1f} >= {targets['ties_over_averaging_min']:g}",
             "ties_over_averaging"),
            (f"experts - best merge {m['interference']:.1f} >= {targets['interference_min']:g}", "interference"),
            ("TA normalised falls with more tasks "
             + " > ".join(f"{v:.3f}" for v in m["task_arithmetic_normalized_by_n_tasks"].values()),
             "task_arithmetic_falls_with_more_tasks"),
        ]
        print()
        print("the papers' shape, as margins:")
        for text, key in checks:
            print(f"  {text:<58} [{mark[met[key]]}]")
    build = zoo.manifest.get("build", {})
    if build:
        size = zoo.manifest.get("size_bytes", 0) / 1e6
        print(f"built in {build['timings_s']['total_s']:.0f} s ({build['workers']} worker(s)); {size:.1f} MB on disk")


def _field_value(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise MergeExplorerError(f"zoo build: --set takes FIELD=VALUE, not {item!r}")
    return name.strip(), value.strip()


def run(args: argparse.Namespace) -> int:
    if args.zoo_command is None:
        args.zoo_parser.print_help()
        return 2
    root = args.dir or default_zoo_dir()
    if args.zoo_command == "info":
        zoo = load_zoo(root)
    else:
        base = recipe_for(args.quick)
        recipe = recipe_with(base, dict(_field_value(item) for item in args.set))
        if (args.set or args.pretrained_from) and args.dir is None:
            raise MergeExplorerError("zoo build: a recipe experiment (--set, --pretrained-from) needs its own folder: "
                                     "add --dir")
        version = variant_version(base, recipe, args.pretrained_from)
        fresh = args.force or not up_to_date(root, args.quick, args.seed, version)
        start = time.perf_counter()

        def progress(fraction: float, message: str) -> None:
            print(f"[{int(100 * fraction):3d}%] {time.perf_counter() - start:6.1f} s  {message}", file=sys.stderr,
                  flush=True)

        if fresh:
            _stop_cleanly_on_sigterm()
        zoo = build_zoo(root, quick=args.quick, progress=progress if fresh else None, force=args.force,
                        seed=args.seed, workers=args.workers, recipe=recipe, pretrained_from=args.pretrained_from)
        if not fresh and not args.json:
            print(f"the zoo at {zoo.root} is up to date (recipe {zoo.recipe_version}); --force rebuilds it")
            return 0
    if args.json:
        print_json(_summary(zoo))
    else:
        _print_text(zoo)
    return 0


def _stop_cleanly_on_sigterm() -> None:
    """A build stopped by SIGTERM (`kill`, a supervisor) ends like one stopped by Ctrl-C: its worker
    processes stop at once and its temporary files are removed (Python's default would skip both)."""
    def stop(signum, frame):
        for child in multiprocessing.active_children():
            child.kill()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
