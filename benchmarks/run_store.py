"""What keeping history costs a slider: the run store's write next to the merge it records.

On the demo zoo (or --zoo DIR), in one process: a slider's merge as the Merge page makes it
(TIES merge -> θ_0 + δ -> evaluation on every task) and the recording the page adds after it
(`RunStore.record` of that result with its source record: kind, path, content fingerprint) into a
fresh store file, each repeated --repeats times with a new k. Also the write under contention:
a second process recording as fast as it can into the same file meanwhile.

    python benchmarks/run_store.py [--zoo DIR] [--repeats 20]

Target: recording adds ≤ 20 ms to a slider's merge.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TARGET_MS = 20.0
HAMMER = """
import sys, time
sys.path.insert(0, {repo!r})
from engine.runs import RunStore
store = RunStore(sys.argv[1])
end = time.time() + float(sys.argv[2])
while time.time() < end:
    store.record("merge", {{"average": 1.0, "per_task": {{"t": 1.0}}}}, method="ties", config={{"k": 1.0}})
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the demo zoo)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from engine.evaluate import evaluate
    from engine.methods import get_method
    from engine.runs import RunStore, describe_source
    from engine.sources import suite_source
    from engine.task_vectors import TaskVectorStack
    from engine.zoo.manifest import default_zoo_dir
    from engine.zoo.suite import ZooSuite

    zoo_dir = args.zoo or default_zoo_dir()
    if not (Path(zoo_dir) / "zoo.json").exists():
        print(f"{zoo_dir}: no zoo.json; build the demo zoo first (python -m engine zoo build)", file=sys.stderr)
        return 2
    suite = ZooSuite.load(zoo_dir)
    stack = TaskVectorStack.from_suite(suite)
    source = suite_source(suite)
    ties = get_method("ties")
    tasks = list(stack.tasks)
    evaluate(suite, stack.apply(ties.merge(stack, ties.config())), tasks=tasks)  # warm: kernels, test tensors

    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs.sqlite")
        t = time.perf_counter()
        describe_source(source)
        first_fingerprint_ms = 1e3 * (time.perf_counter() - t)
        merge_ms, record_ms = [], []
        for i in range(args.repeats):
            k = 10.0 + i
            t = time.perf_counter()
            report = evaluate(suite, stack.apply(ties.merge(stack, ties.config(k=k))), tasks=tasks).to_json()
            merge_ms.append(1e3 * (time.perf_counter() - t))
            t = time.perf_counter()
            store.record("merge", {**report, "tasks": tasks}, method="ties", config={"k": k, "lam": 1.0},
                         source=describe_source(source), device="cpu", timings={"total_s": merge_ms[-1] / 1e3},
                         key=f"bench-{i}", origin="app", view=f"merge?method=ties&k={k:g}")
            record_ms.append(1e3 * (time.perf_counter() - t))

        script = Path(tmp) / "hammer.py"
        script.write_text(HAMMER.format(repo=str(REPO)))
        other = subprocess.Popen([sys.executable, str(script), str(store.path), "8"])
        time.sleep(1.0)
        contended_ms = []
        for i in range(args.repeats):
            t = time.perf_counter()
            store.record("merge", {**report, "tasks": tasks}, method="ties", config={"k": float(i)},
                         source=describe_source(source), key=f"contended-{i}", origin="app")
            contended_ms.append(1e3 * (time.perf_counter() - t))
            time.sleep(0.05)
        other.wait(timeout=60)
        total = store.count()

    med_merge, med_rec = statistics.median(merge_ms), statistics.median(record_ms)
    print(f"zoo: {zoo_dir}  tasks: {len(tasks)}  repeats: {args.repeats}  CPUs: {os.cpu_count()}  "
          f"load: {os.getloadavg()[0]:.2f}")
    print(f"{'slider merge (merge + evaluate)':<44} median {med_merge:8.1f} ms   max {max(merge_ms):8.1f} ms")
    print(f"{'recording it (RunStore.record + source)':<44} median {med_rec:8.2f} ms   max {max(record_ms):8.2f} ms"
          f"   = {100 * med_rec / med_merge:.1f} % of the merge")
    print(f"{'recording, another process writing too':<44} median {statistics.median(contended_ms):8.2f} ms   "
          f"max {max(contended_ms):8.2f} ms   ({total} runs in the file at the end)")
    print(f"{'first source fingerprint (then memoized)':<44} {first_fingerprint_ms:8.1f} ms")
    ok = med_rec <= TARGET_MS
    print(f"target: recording ≤ {TARGET_MS:.0f} ms per merge: {'ok' if ok else 'SLOW'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
