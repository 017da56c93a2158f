"""Sign conflicts between trimmed task vectors: the product's central plot (docs/methods.md, sign-conflict statistics).

For trimmed vectors tau_hat (TIES trim at k %, same scope as the merge), with pos/neg the number of
tasks whose kept entry p is positive/negative and nz = pos + neg:

* conflict(p) = pos >= 1 and neg >= 1;
* rate_all = conflicts / D (the paper's "percentage of parameters"), rate_nonzero1 over entries
  with nz >= 1, rate_nonzero2 over entries with nz >= 2 (where a conflict is possible at all);
* pairwise[a][b] = share of entries kept by both a and b whose signs are opposite;
* random_baseline = the same rate for independent masks of density k and fair-coin signs.

The curve over k (5 ... 100 %) and over the number of merged tasks are computed in the same single
pass over the entries, not by redoing the analysis per point: an entry kept at k is kept at every
larger k, so each entry's conflict appears at one level of the k grid and is histogrammed there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .. import kernels
from ..errors import ConfigError
from ..trim import check_k, segment_starts, trim_thresholds

DEFAULT_K_GRID = tuple(float(k) for k in range(5, 101, 5))

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover
    njit = None


def random_sign_baseline(n_tasks: int, k_pct: float) -> dict[str, float]:
    """Conflict rates if masks were independent with density k and signs fair coins (docs/methods.md, sign-conflict statistics)."""
    k = k_pct / 100.0
    n = n_tasks
    p_conflict = 1 - 2 * (1 - k / 2) ** n + (1 - k) ** n
    p_nz1 = 1 - (1 - k) ** n
    p_nz2 = p_nz1 - n * k * (1 - k) ** (n - 1)
    return {
        "rate_all": p_conflict,
        "rate_nonzero1": p_conflict / p_nz1 if p_nz1 > 0 else 0.0,
        "rate_nonzero2": p_conflict / p_nz2 if p_nz2 > 0 else 0.0,
    }


if njit is not None:

    @njit(cache=True, parallel=True)
    def _conflict_kernel(data, item_start, item_end, item_seg, thr, grid_thr, order,
                         counts, pair_both, pair_opposite, n_hist, k_hist):
        """Per work item: counts[it] = (conflicts, nz>=1, nz>=2) at the chosen k; pairwise co-kept /
        opposite counts; n_hist[it, n] = entries whose first conflict appears when the first n tasks
        of `order` are merged; k_hist[it, c, g] = entries whose conflict (c=0), first kept entry (c=1)
        or second kept entry (c=2) appears at grid level g (level G = never).
        """
        n_tasks = data.shape[0]
        n_grid = grid_thr.shape[0]
        for it in prange(item_start.shape[0]):
            seg = item_seg[it]
            kept_task = np.empty(n_tasks, dtype=np.int64)
            kept_sign = np.empty(n_tasks, dtype=np.int64)
            level = np.empty(n_tasks, dtype=np.int64)
            for j in range(item_start[it], item_end[it]):
                n_kept = 0
                n_pos = 0
                n_neg = 0
                for t in range(n_tasks):
                    v = data[t, j]
                    if v != 0.0 and abs(v) >= thr[t, seg]:
                        kept_task[n_kept] = t
                        kept_sign[n_kept] = 1 if v > 0.0 else -1
                        n_kept += 1
                        if v > 0.0:
                            n_pos += 1
                        else:
                            n_neg += 1
                if n_pos > 0 and n_neg > 0:
                    counts[it, 0] += 1
                if n_kept >= 1:
                    counts[it, 1] += 1
                if n_kept >= 2:
                    counts[it, 2] += 1
                    for a in range(n_kept):
                        for b in range(a + 1, n_kept):
                            ta = kept_task[a]
                            tb = kept_task[b]
                            pair_both[it, ta, tb] += 1
                            if kept_sign[a] != kept_sign[b]:
                                pair_opposite[it, ta, tb] += 1
                # number of merged tasks (in `order`) at which this entry first conflicts
                seen_pos = False
                seen_neg = False
                first = 0
                for i in range(n_tasks):
                    v = data[order[i], j]
                    if v != 0.0 and abs(v) >= thr[order[i], seg]:
                        if v > 0.0:
                            seen_pos = True
                        else:
                            seen_neg = True
                        if seen_pos and seen_neg:
                            first = i + 1
                            break
                n_hist[it, first] += 1
                # k grid: the first level at which each task keeps this entry (thresholds fall as k grows)
                min_pos = n_grid
                min_neg = n_grid
                best1 = n_grid
                best2 = n_grid
                for t in range(n_tasks):
                    v = data[t, j]
                    lv = n_grid
                    if v != 0.0:
                        a = abs(v)
                        lo = 0
                        hi = n_grid
                        while lo < hi:  # smallest g with a >= grid_thr[g, t, seg]
                            mid = (lo + hi) // 2
                            if a >= grid_thr[mid, t, seg]:
                                hi = mid
                            else:
                                lo = mid + 1
                        lv = lo
                    level[t] = lv
                    if lv < n_grid:
                        if v > 0.0:
                            min_pos = min(min_pos, lv)
                        else:
                            min_neg = min(min_neg, lv)
                        if lv < best1:
                            best2 = best1
                            best1 = lv
                        elif lv < best2:
                            best2 = lv
                k_hist[it, 0, max(min_pos, min_neg)] += 1
                k_hist[it, 1, best1] += 1
                k_hist[it, 2, best2] += 1


@dataclass
class ConflictReport:
    """Sign-conflict statistics of one set of trimmed task vectors; JSON-ready via to_json()."""

    tasks: list[str]
    k: float
    trim: str
    overall: dict[str, float]
    per_tensor: dict[str, dict[str, float]]
    pairwise: list[list[float | None]]
    k_curve: dict[str, list[float]]
    n_tasks_curve: dict[str, list[float]]
    per_tensor_k_curve: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _rates(conflicts: float, nz1: float, nz2: float, n: float, baseline: dict[str, float]) -> dict[str, float]:
    return {
        "rate_all": conflicts / n if n else 0.0,
        "rate_nonzero1": conflicts / nz1 if nz1 else 0.0,
        "rate_nonzero2": conflicts / nz2 if nz2 else 0.0,
        "random_baseline": baseline["rate_all"],
        "random_baseline_nonzero2": baseline["rate_nonzero2"],
        "n_params": int(n),
        "n_conflicts": int(conflicts),
        "n_nonzero1": int(nz1),
        "n_nonzero2": int(nz2),
    }


def sign_conflicts(stack, k: float = 20.0, trim: str = "global", k_grid: Sequence[float] = DEFAULT_K_GRID,
                   task_order: Sequence[str] | None = None) -> ConflictReport:
    """Sign-conflict statistics of the stack's task vectors after a TIES trim at k % (see module doc)."""
    k = check_k(k)
    grid = sorted({check_k(g) for g in k_grid})
    if not grid:
        raise ConfigError("the k grid for the conflict curve is empty")
    order_names = list(task_order) if task_order is not None else list(stack.tasks)
    if sorted(order_names) != sorted(stack.tasks):
        raise ConfigError(f"task order must list each task once: {', '.join(stack.tasks)}")
    order = np.array([stack.index(t) for t in order_names], dtype=np.int64)
    n_tasks = len(stack.tasks)

    data = stack.data if kernels.can_use_numba(stack.data) else stack.data.detach().float().cpu().contiguous()
    thr = trim_thresholds(stack, k, trim).numpy().astype(np.float32)
    grid_thr = np.stack([trim_thresholds(stack, g, trim).numpy() for g in grid]).astype(np.float32)
    # work items never cross a tensor, so per-tensor figures are sums over items
    starts, ends, tensor_of = kernels.work_items(stack.offsets.astype(np.int64))
    seg_of = tensor_of if trim == "per-tensor" else np.zeros_like(tensor_of)
    segment_starts(stack, trim)  # validates the scope name
    n_items = len(starts)
    counts = np.zeros((n_items, 3), dtype=np.int64)
    pair_both = np.zeros((n_items, n_tasks, n_tasks), dtype=np.int64)
    pair_opposite = np.zeros((n_items, n_tasks, n_tasks), dtype=np.int64)
    n_hist = np.zeros((n_items, n_tasks + 1), dtype=np.int64)
    k_hist = np.zeros((n_items, 3, len(grid) + 1), dtype=np.int64)
    _conflict_kernel(data.numpy(), starts, ends, seg_of, thr, grid_thr, order, counts, pair_both, pair_opposite,
                     n_hist, k_hist)

    baseline = random_sign_baseline(n_tasks, k)
    total = counts.sum(0)
    overall = _rates(*total, stack.numel, baseline)
    per_tensor: dict[str, dict[str, float]] = {}
    per_tensor_k_curve: dict[str, list[float]] = {}
    by_tensor = np.zeros((len(stack.names), 3), dtype=np.int64)
    np.add.at(by_tensor, tensor_of, counts)
    k_by_tensor = np.zeros((len(stack.names), len(grid) + 1), dtype=np.int64)
    np.add.at(k_by_tensor, tensor_of, k_hist[:, 0, :])
    for i, name in enumerate(stack.names):
        size = int(stack.offsets[i + 1] - stack.offsets[i])
        per_tensor[name] = _rates(*by_tensor[i], size, baseline)
        per_tensor_k_curve[name] = (np.cumsum(k_by_tensor[i, :-1]) / size).tolist()

    both = pair_both.sum(0)
    opposite = pair_opposite.sum(0)
    both = both + both.T
    opposite = opposite + opposite.T
    pairwise: list[list[float | None]] = []
    for a in range(n_tasks):
        row: list[float | None] = []
        for b in range(n_tasks):
            if a == b:
                row.append(0.0)
            else:
                row.append(float(opposite[a, b] / both[a, b]) if both[a, b] else None)
        pairwise.append(row)

    k_tot = k_hist.sum(0)
    conflict_cum = np.cumsum(k_tot[0, :-1])
    nz2_cum = np.cumsum(k_tot[2, :-1])
    k_curve = {
        "k": grid,
        "rate_all": (conflict_cum / stack.numel).tolist(),
        "rate_nonzero2": np.divide(conflict_cum, nz2_cum, out=np.zeros(len(grid)), where=nz2_cum > 0).tolist(),
        "random_baseline": [random_sign_baseline(n_tasks, g)["rate_all"] for g in grid],
        "random_baseline_nonzero2": [random_sign_baseline(n_tasks, g)["rate_nonzero2"] for g in grid],
    }
    n_cum = np.cumsum(n_hist.sum(0)[1:])  # entry i: conflicts among the first i+1 tasks
    ns = list(range(2, n_tasks + 1))
    n_tasks_curve = {
        "n": ns,
        "tasks": order_names,
        "rate_all": [float(n_cum[n - 1] / stack.numel) for n in ns],
        "random_baseline": [random_sign_baseline(n, k)["rate_all"] for n in ns],
    }
    return ConflictReport(tasks=list(stack.tasks), k=k, trim=trim, overall=overall, per_tensor=per_tensor,
                          pairwise=pairwise, k_curve=k_curve, n_tasks_curve=n_tasks_curve,
                          per_tensor_k_curve=per_tensor_k_curve)
