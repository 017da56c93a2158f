"""Server CPU to build the Merge page's chart, with the lean template (engine.figures.TEMPLATE)
against Plotly's full plotly_white, in this process: what every slider move costs the server
before the browser draws anything.

Per round: figures.accuracy_bars for 8 tasks, figures.fit_for_screen (the copy the pages draw) and
to_json (what st.plotly_chart sends). Rounds alternate between the two templates so that a noisy
machine slows both alike.

    python benchmarks/figure_build.py [--rounds 40]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import figures  # noqa: E402

TASKS = ["digits", "letters", "shapes", "colors", "textures", "counting", "arrows", "landuse"]


def one_chart(template) -> tuple[float, int]:
    """Seconds of CPU for one chart as the Merge page builds it, and its JSON size in bytes."""
    figures._LAYOUT["template"] = template
    acc = {t: 40.0 + i for i, t in enumerate(TASKS)}
    start = time.process_time()
    fig = figures.accuracy_bars(TASKS, acc, {t: 90.0 for t in TASKS}, {t: 35.0 for t in TASKS},
                                merged_label="merged (TIES-Merging)", settings="TIES-Merging, k = 20, λ = 1")
    spec = figures.fit_for_screen(fig).to_json()
    return time.process_time() - start, len(spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    lean = figures.TEMPLATE
    variants = {"plotly_white (full)": "plotly_white", "lean template": lean}
    times: dict[str, list[float]] = {name: [] for name in variants}
    sizes: dict[str, int] = {}
    try:
        for name, template in variants.items():  # warm-up: validators imported, caches filled
            one_chart(template)
        for _ in range(args.rounds):
            for name, template in variants.items():
                seconds, sizes[name] = one_chart(template)
                times[name].append(seconds)
    finally:
        figures._LAYOUT["template"] = lean
    base = statistics.median(times["plotly_white (full)"])
    print(f"{'template':<22} {'median CPU':>12} {'ratio':>7} {'spec bytes':>11}")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:<22} {1000 * med:9.1f} ms {med / base:7.2f} {sizes[name]:11d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
