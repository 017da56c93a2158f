"""What a full `zoo build` keeps its two cores busy with, and why it renders ahead (engine/zoo/build.py).

Timed in one process, interleaved, median of the repeats:

- pretraining (`build.pretrain`, recipe -5's batch of 128, a short run including its initialisation)
  with the build's 2 threads, with 1 thread, and with deterministic mode's NaN fill of new tensors on
  (torch's default, which the build turns off: it changes no bit, tests/test_zoo.py);
- fine-tuning (`build.finetune`, recipe -5's three passes per step, 1 thread as in each build worker)
  with the fill off and on;
- pretraining while another process renders task images alongside (what the build does while
  theta_0 pretrains), at low priority (nice 10, the build's choice) and in Linux's idle scheduling
  class, and how many images per second it rendered, against rendering alone.

If two threads pretrain no faster than one, the second core is mostly free during pretraining. A
renderer there costs pretraining some time and saves the expert stage its rendering (each of the 2
workers renders 4 tasks otherwise): worth it when it renders fast enough.

    python benchmarks/zoo_build_stages.py [--repeats 2] [--pretrain-steps 300] [--finetune-steps 60]
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
from pathlib import Path

# As in the build's child processes, and before torch loads OpenMP, which reads it once: idle OpenMP
# threads sleep instead of spinning on the core a renderer would use.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _render_while(stop, rendered, idle_class: bool) -> None:
    """Render digits images at nice 10 or in the idle scheduling class until `stop` is set."""
    if idle_class:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(10)
    from engine.zoo import tasks as task_defs

    count = 0
    while not stop.is_set():
        task_defs.render_split("digits", "train", 100, count, 0)
        count += 1
    rendered.value = 100 * count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=60)
    args = parser.parse_args()

    from engine.zoo import build
    from engine.zoo import tasks as task_defs

    pool, concepts = task_defs.render_pool(2000, 0)
    pretraining = dataclasses.replace(build.FULL_RECIPE, pretrain_steps=args.pretrain_steps)
    finetuning = dataclasses.replace(build.FULL_RECIPE, finetune_steps=args.finetune_steps)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 2000)
    theta0 = {f"visual.{k}": v for k, v in build._new_model(0).state_dict().items()}
    head = torch.nn.functional.normalize(torch.randn(10, build.MODEL_KWARGS["output_dim"]), dim=-1)

    def pretrain(threads: int, fill: bool = False) -> None:
        with build._torch_settings(threads):
            torch.utils.deterministic.fill_uninitialized_memory = fill
            build.pretrain(pool, concepts, pretraining, 0)

    def finetune(fill: bool) -> None:
        with build._torch_settings(1):
            torch.utils.deterministic.fill_uninitialized_memory = fill
            build.finetune(theta0, head, images, labels, finetuning, 0, 0, anchor_images=pool[:512])

    spawn = multiprocessing.get_context("spawn")
    rendered_alongside: dict[bool, list[float]] = {False: [], True: []}

    def pretrain_with_renderer(idle_class: bool) -> float:
        """The pretraining's own seconds (not the renderer's start)."""
        stop, rendered = spawn.Event(), spawn.Value("q", 0)
        renderer = spawn.Process(target=_render_while, args=(stop, rendered, idle_class))
        renderer.start()
        time.sleep(3)  # past its imports
        clock = time.perf_counter()
        pretrain(2)
        seconds = time.perf_counter() - clock
        stop.set()
        renderer.join()
        rendered_alongside[idle_class].append(rendered.value / seconds)
        return seconds

    task_defs.render_split("digits", "train", 10, 0, 0)  # loads the renderer's fonts and digit scans once

    def render_alone() -> None:
        task_defs.render_split("digits", "train", 2000, 0, 0)

    timed = {
        "pretraining, 2 threads (the build)": lambda: pretrain(2),
        "pretraining, 1 thread": lambda: pretrain(1),
        "pretraining, 2 threads, NaN fill on": lambda: pretrain(2, fill=True),
        "pretraining, 2 threads, renderer at nice 10": lambda: pretrain_with_renderer(False),
        "pretraining, 2 threads, renderer in the idle class": lambda: pretrain_with_renderer(True),
        "fine-tuning, 1 thread (a build worker)": lambda: finetune(False),
        "fine-tuning, 1 thread, NaN fill on": lambda: finetune(True),
        "rendering 2,000 digits images alone": render_alone,
    }
    seconds = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            clock = time.perf_counter()
            own = fn()
            seconds[name].append(own if own is not None else time.perf_counter() - clock)
    median = {name: float(np.median(values)) for name, values in seconds.items()}
    pretrain_base = median["pretraining, 2 threads (the build)"]
    finetune_base = median["fine-tuning, 1 thread (a build worker)"]
    print(f"{'':50s} {'s':>7s}   ratio to the build's setting")
    for name, value in median.items():
        base = pretrain_base if name.startswith("pretraining") else finetune_base if name.startswith("fine") else value
        print(f"{name:50s} {value:7.2f}   {value / base:5.2f}")
    print(f"digits images rendered per second: alone {2000 / median['rendering 2,000 digits images alone']:.0f}; "
          f"alongside pretraining at nice 10 {np.median(rendered_alongside[False]):.0f}, "
          f"in the idle class {np.median(rendered_alongside[True]):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
