"""Slider-to-chart latency: how long after moving λ or k the app has a new chart to send.

Measures, on the demo zoo (or --zoo DIR) on this machine, after the merge inputs are cached
(task vectors loaded, kernels compiled, experts' reference accuracies known):

The engine path evaluates on the pages' default budget of 200 test images per task.

1. engine path, Merge page: merge -> theta_0 + delta -> evaluate -> accuracy figure (to JSON),
   for λ moves (trim thresholds cached) and for k moves to a k not seen before (new thresholds);
2. engine path, Interference page: sign-conflict report + magnitude histogram + its five figures
   for a new k;
3. the whole Streamlit script run (AppTest), from setting the slider to the rerun finishing, on
   the Merge and Interference pages: the server-side part of what a user waits for.

The browser-side figure (key press -> redrawn Plotly chart in Chromium) comes from the e2e test,
which writes test-artifacts/e2e-slider-latency.json; it is printed too when present.

    python benchmarks/slider_latency.py [--zoo DIR] [--repeats 5] [--no-apptest]

Prints a table of median / max seconds per path and whether the median is within 1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# What app.py sets before torch loads (see there): measure the app's configuration.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TARGET_S = 1.0
LIMIT = 200  # the pages' default image budget per task (pages/ui/state.py DEFAULT_LIMIT)


def _row(name: str, samples: list[float]) -> str:
    med, worst = statistics.median(samples), max(samples)
    verdict = "ok" if med <= TARGET_S else "SLOW"
    return f"{name:<64} {med:8.3f} {worst:8.3f} {len(samples):4d}  {verdict}"


def _engine_paths(zoo_dir: Path, repeats: int) -> list[tuple[str, list[float]]]:
    from engine import figures
    from engine.analysis.conflicts import sign_conflicts
    from engine.analysis.magnitudes import magnitude_histogram
    from engine.evaluate import evaluate, evaluate_model
    from engine.methods import get_method
    from engine.task_vectors import TaskVectorStack
    from engine.zoo.suite import ZooSuite

    t0 = time.perf_counter()
    zoo = ZooSuite.load(zoo_dir)
    stack = TaskVectorStack.from_suite(zoo)
    load_s = time.perf_counter() - t0
    tasks = list(stack.tasks)
    print(f"zoo: {zoo_dir}  tasks: {len(tasks)}  task-vector entries D = {stack.numel:,}  "
          f"(load + task vectors {load_s:.2f} s)")

    ties = get_method("ties")
    t0 = time.perf_counter()
    individual = {t: float(evaluate_model(zoo, t, limit=LIMIT).per_task[t]) for t in tasks}
    pre = evaluate_model(zoo, "pretrained", limit=LIMIT)
    pretrained = {t: float(pre.per_task[t]) for t in tasks}
    evaluate(zoo, stack.apply(ties.merge(stack, ties.config())), tasks=tasks, limit=LIMIT)  # JIT + test-set caches
    print(f"warm-up (experts' accuracies, first merge, kernel compile): {time.perf_counter() - t0:.2f} s\n")

    def merge_to_figure(method, **cfg) -> dict[str, float]:
        parts = {}
        t = time.perf_counter()
        delta = method.merge(stack, method.config(**cfg))
        parts["merge"] = time.perf_counter() - t
        t = time.perf_counter()
        merged = stack.apply(delta)
        parts["apply"] = time.perf_counter() - t
        t = time.perf_counter()
        report = evaluate(zoo, merged, tasks=tasks, limit=LIMIT)
        parts["evaluate"] = time.perf_counter() - t
        t = time.perf_counter()
        figures.accuracy_bars(tasks, report.per_task, individual, pretrained).to_json()
        parts["figure"] = time.perf_counter() - t
        parts["total"] = sum(parts.values())
        return parts

    rows: list[tuple[str, list[float]]] = []
    lam_runs = [merge_to_figure(ties, k=20.0, lam=0.5 + 0.1 * i) for i in range(repeats)]
    rows.append(("Merge page, TIES, move λ (thresholds cached): total", [r["total"] for r in lam_runs]))
    for part in ("merge", "apply", "evaluate", "figure"):
        rows.append((f"    of which {part}", [r[part] for r in lam_runs]))
    k_runs = [merge_to_figure(ties, k=21.0 + 3 * i, lam=1.0) for i in range(repeats)]
    rows.append(("Merge page, TIES, move k to a new value (new thresholds)", [r["total"] for r in k_runs]))
    ta = get_method("task-arithmetic")
    rows.append(("Merge page, Task Arithmetic, move λ",
                 [merge_to_figure(ta, lam=0.2 + 0.05 * i)["total"] for i in range(repeats)]))

    def conflicts_to_figures(k: float) -> float:
        t = time.perf_counter()
        rep = sign_conflicts(stack, k=k, trim="global").to_json()
        hist = magnitude_histogram(stack, tasks[0], k=k, trim="global")
        numels = {n: int(stack.offsets[i + 1] - stack.offsets[i]) for i, n in enumerate(stack.names)}
        for fig in (figures.conflict_by_tensor_bars(rep["per_tensor"], numels=numels, by_layer=True, k=k),
                    figures.conflict_vs_k(rep["k_curve"], current_k=k),
                    figures.conflict_vs_n_tasks(rep["n_tasks_curve"], k=k),
                    figures.pairwise_conflict_heatmap(rep["tasks"], rep["pairwise"]),
                    figures.magnitude_histogram(hist, task=tasks[0], k=k)):
            fig.to_json()
        return time.perf_counter() - t

    conflicts_to_figures(20.0)
    rows.append(("Interference page, move k (conflicts + magnitudes + 5 figures)",
                 [conflicts_to_figures(31.0 + 2 * i) for i in range(repeats)]))
    return rows


def _apptest_paths(zoo_dir: Path, repeats: int) -> list[tuple[str, list[float]]]:
    from streamlit.testing.v1 import AppTest

    os.environ["MERGE_EXPLORER_ZOO"] = str(zoo_dir)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600).run()
    at.switch_page("pages/views/merge.py").run()
    at.radio(key="w.merge.method").set_value("ties").run()
    rows = []

    def timed(widget, value) -> float:
        t = time.perf_counter()
        widget.set_value(value).run()
        elapsed = time.perf_counter() - t
        assert not at.exception, [e.message for e in at.exception]
        return elapsed

    rows.append(("AppTest rerun, Merge page, move λ",
                 [timed(at.slider(key="w.merge.ties.lam"), 0.55 + 0.05 * i) for i in range(repeats)]))
    rows.append(("AppTest rerun, Merge page, move k (new values)",
                 [timed(at.slider(key="w.merge.ties.k"), 40.0 + i) for i in range(repeats)]))
    at.switch_page("pages/views/interference.py").run()
    rows.append(("AppTest rerun, Interference page, move k (new values)",
                 [timed(at.slider(key="w.interference.ties.k"), 60.0 + i) for i in range(repeats)]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None,
                        help="zoo folder (default: $MERGE_EXPLORER_ZOO, else the demo zoo's default place)")
    parser.add_argument("--repeats", type=int, default=5, help="slider moves timed per path")
    parser.add_argument("--no-apptest", action="store_true", help="skip the whole-script (AppTest) timings")
    args = parser.parse_args()
    from engine.zoo.manifest import MANIFEST_NAME, default_zoo_dir

    zoo_dir = args.zoo or default_zoo_dir()

    if not (zoo_dir / MANIFEST_NAME).is_file():
        print(f"no zoo at {zoo_dir}: build it with `python -m engine zoo build` (or pass --zoo)", file=sys.stderr)
        return 2
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.2f}")
    rows = _engine_paths(zoo_dir, args.repeats)
    if not args.no_apptest:
        rows += _apptest_paths(zoo_dir, args.repeats)
    print(f"{'path (slider move -> chart ready)':<64} {'median_s':>8} {'max_s':>8} {'n':>4}  (target ≤ {TARGET_S:g} s)")
    for name, samples in rows:
        print(_row(name, samples))
    browser = REPO / "test-artifacts" / "e2e-slider-latency.json"
    if browser.is_file():
        data = json.loads(browser.read_text())
        print(f"\nChromium (tests/test_e2e_browser.py, quick zoo): key press -> redrawn chart: "
              f"λ first {data['lam_first_s']:.2f} s, λ {', '.join(f'{x:.2f}' for x in data['lam_warm_s'])} s, "
              f"k {', '.join(f'{x:.2f}' for x in data['k_s'])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
