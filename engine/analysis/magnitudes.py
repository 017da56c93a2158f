"""Distribution of a task vector's magnitudes, with the TIES trim threshold marked."""
from __future__ import annotations

import math

import torch

from ..trim import check_k, trim_thresholds

LOG10_FLOOR = -12.0  # |tau| below 1e-12 counts as unchanged (exact zeros have no log)


def magnitude_histogram(stack, task: str, k: float = 20.0, trim: str = "global", bins: int = 60) -> dict:
    """Histogram of log10 |tau_t| over the task's non-zero entries.

    Returns edges (log10 |tau|), counts, the global trim threshold (for per-tensor trimming: the
    median of the per-tensor thresholds, reported as such), the fraction of entries the trim keeps,
    and the number of exact zeros (left out of the histogram).
    """
    k = check_k(k)
    if bins < 2:
        bins = 2
    t = stack.index(task)
    row = stack.data[t].detach().float()
    magnitudes = row.abs()
    nonzero = magnitudes[magnitudes > 0]
    thresholds = trim_thresholds(stack, k, trim)[t]
    threshold = float(thresholds.median())
    logs = nonzero.clamp(min=10 ** LOG10_FLOOR).log10()
    if logs.numel() == 0:
        lo, hi = LOG10_FLOOR, 0.0
    else:
        lo, hi = float(logs.min()), float(logs.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(logs.cpu(), bins=bins, min=lo, max=hi) if logs.numel() else torch.zeros(bins)
    edges = torch.linspace(lo, hi, bins + 1)
    if trim == "global":
        kept = float((magnitudes >= threshold).sum()) / max(row.numel(), 1)
    else:
        kept_count = 0
        for s, (a, b) in enumerate(zip(stack.offsets[:-1], stack.offsets[1:])):
            kept_count += int((magnitudes[int(a):int(b)] >= thresholds[s]).sum())
        kept = kept_count / max(row.numel(), 1)
    return {
        "task": task,
        "k": k,
        "trim": trim,
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "threshold": threshold,
        "log10_threshold": math.log10(threshold) if threshold > 0 else LOG10_FLOOR,
        "kept_fraction": kept,
        "n_zero": int(row.numel() - nonzero.numel()),
    }
