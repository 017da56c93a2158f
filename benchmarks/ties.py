"""Exact global-top-k TIES (trim + elect + disjoint mean) on 8 ViT-B/32-sized task vectors.

Prints our time and peak memory once the task vectors are in memory, a plain `kthvalue` TIES (the
common flattened implementation, as in the official code) run in the same process, and the ratio.
The baseline needs ~7 fp32 copies of T x D, so by default it runs on a quarter-size model and the
ratio is taken at that same size (our time at full size is printed too).

    python benchmarks/ties.py [--tasks 8] [--k 20] [--baseline-scale 0.25] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.methods import get_method  # noqa: E402
from engine.task_vectors import TaskVectorStack  # noqa: E402


def vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """Canonical tensor shapes of the CLIP ViT-B/32 vision tower plus its projection (87.8 M entries)."""
    width, mlp, layers = 768, 3072, 12
    shapes = {
        "embeddings.class_embedding": (width,),
        "embeddings.patch_embedding.weight": (width, 3, 32, 32),
        "embeddings.position_embedding.weight": (50, width),
        "pre_layrnorm.weight": (width,), "pre_layrnorm.bias": (width,),
        "post_layernorm.weight": (width,), "post_layernorm.bias": (width,),
        "visual_projection.weight": (512, width),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for proj in "qkv":
            shapes[p + f"self_attn.{proj}_proj.weight"] = (width, width)
            shapes[p + f"self_attn.{proj}_proj.bias"] = (width,)
        shapes[p + "self_attn.out_proj.weight"] = (width, width)
        shapes[p + "self_attn.out_proj.bias"] = (width,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[p + ln + ".weight"] = (width,)
            shapes[p + ln + ".bias"] = (width,)
        shapes[p + "mlp.fc1.weight"] = (mlp, width)
        shapes[p + "mlp.fc1.bias"] = (mlp,)
        shapes[p + "mlp.fc2.weight"] = (width, mlp)
        shapes[p + "mlp.fc2.bias"] = (width,)
    return shapes


def random_stack(n_tasks: int, scale: float, seed: int = 0) -> TaskVectorStack:
    """A stack with ViT-B/32 layout (each tensor's size times `scale`) and heavy-tailed random deltas."""
    shapes = vit_b32_shapes()
    names = sorted(shapes)
    sizes = [max(1, int(np.prod(shapes[n]) * scale)) for n in names]
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(sizes)
    gen = torch.Generator().manual_seed(seed)
    data = torch.empty((n_tasks, int(offsets[-1])), dtype=torch.float32)
    for t in range(n_tasks):
        data[t].normal_(generator=gen)
        data[t].mul_(torch.empty(1).exponential_(generator=gen).item() * 1e-3)
    flat_shapes = [(s,) for s in sizes]
    base = {n: torch.zeros(s) for n, s in zip(names, sizes)}
    return TaskVectorStack(tasks=[f"task{t}" for t in range(n_tasks)], names=names, shapes=flat_shapes,
                           offsets=offsets, data=data, base=base)


class PeakRSS:
    """Samples this process's resident memory every 2 ms (reads /proc/self/statm)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = self.read()
        self._stop = threading.Event()

    def read(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.peak = self.start = self.read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def baseline_ties(data: torch.Tensor, k: float, lam: float = 1.0) -> torch.Tensor:
    """The common implementation: flattened kthvalue threshold, dense masks, dense disjoint mean."""
    n = data.shape[1]
    kth = int(n * (1 - k / 100))
    thresholds = data.abs().kthvalue(kth, dim=1, keepdim=True).values
    trimmed = data * (data.abs() >= thresholds)
    sign = torch.sign(trimmed.sum(dim=0))
    agree = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    return lam * selected.sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def time_ours(stack: TaskVectorStack, k: float, repeats: int) -> tuple[float, int]:
    ties = get_method("ties")
    config = ties.config(k=k, lam=1.0, trim="global", disjoint="mean")
    best, peak = float("inf"), 0
    for _ in range(repeats):
        stack._cache.clear()  # thresholds are cached per (k, scope): time them every run
        with PeakRSS() as rss:
            start = time.perf_counter()
            merged = ties.merge(stack, config)
            elapsed = time.perf_counter() - start
        del merged
        best = min(best, elapsed)
        peak = max(peak, rss.peak - rss.start)
    return best, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--k", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-scale", type=float, default=0.25,
                        help="model size for the kthvalue baseline, as a fraction of ViT-B/32 (1.0 needs ~20 GB)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    # warm-up: JIT-compile the kernels on a tiny stack so compile time is not measured
    time_ours(random_stack(2, 1e-3), args.k, 1)

    stack = random_stack(args.tasks, 1.0)
    tv_bytes = stack.data.numel() * stack.data.element_size()
    ours_full, ours_full_peak = time_ours(stack, args.k, args.repeats)
    print(f"task vectors: {args.tasks} x {stack.numel:,} fp32 = {tv_bytes / 2**30:.2f} GiB, "
          f"{os.cpu_count()} CPU threads, torch {torch.__version__}")
    print(f"ours     full size : {ours_full:7.3f} s   extra peak memory {ours_full_peak / 2**30:5.2f} GiB "
          f"(total {(tv_bytes + ours_full_peak) / tv_bytes:.2f}x the task vectors)")
    del stack

    small = random_stack(args.tasks, args.baseline_scale, seed=1)
    small_bytes = small.data.numel() * small.data.element_size()
    ours_small, _ = time_ours(small, args.k, args.repeats)
    with PeakRSS() as rss:
        start = time.perf_counter()
        expected = baseline_ties(small.data, args.k)
        base_time = time.perf_counter() - start
    small._cache.clear()
    ours = get_method("ties").merge(small, get_method("ties").config(k=args.k, lam=1.0))
    max_diff = float((ours - expected).abs().max())
    print(f"scale {args.baseline_scale:g} ({small.numel:,} entries per task, {small_bytes / 2**30:.2f} GiB):")
    print(f"  kthvalue baseline: {base_time:7.3f} s   extra peak memory {(rss.peak - rss.start) / 2**30:5.2f} GiB")
    print(f"  ours             : {ours_small:7.3f} s")
    print(f"  speed-up         : {base_time / ours_small:7.1f}x   (max |ours - baseline| = {max_diff:.2e}; "
          "the baseline keeps floor(D*k)+1 entries, ours ceil(D*k/100): at most one entry per task differs)")
    print(f"  baseline extrapolated to full size: ~{base_time / args.baseline_scale:.1f} s -> "
          f"~{base_time / args.baseline_scale / ours_full:.0f}x slower than ours at full size")


if __name__ == "__main__":
    main()
