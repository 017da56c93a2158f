"""Independent, deliberately naive implementations of docs/methods.md, used only as test oracles.

Written from the spec with plain full sorts and dense T x D tensors, sharing no code with the
engine's kernels, so a bug in one is unlikely to be repeated in the other.
"""
from __future__ import annotations

import math

import torch


def keep_top(x: torch.Tensor, k_pct: float) -> torch.Tensor:
    """Zero all but the ceil(k*n/100) largest |x| of a 1-D tensor; ties at the threshold are kept."""
    n = x.numel()
    if k_pct >= 100:
        return x.clone()
    keep = max(1, math.ceil(k_pct * n / 100 - 1e-9))
    threshold = torch.sort(x.abs(), descending=True).values[keep - 1]
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def trim_rows(rows: torch.Tensor, k_pct: float, spans=None) -> torch.Tensor:
    """Trim each row globally, or within each (start, end) span when spans are given (per-tensor)."""
    spans = spans or [(0, rows.shape[1])]
    out = torch.zeros_like(rows)
    for t in range(rows.shape[0]):
        for a, b in spans:
            out[t, a:b] = keep_top(rows[t, a:b], k_pct)
    return out


def ties(rows: torch.Tensor, k_pct: float, lam: float, disjoint: str = "mean", spans=None,
         tie_rule: str = "global_majority") -> torch.Tensor:
    """TIES per docs/methods.md (TIES-Merging) on a dense (T, D) float64 copy."""
    rows = rows.double()
    trimmed = trim_rows(rows, k_pct, spans)
    elected = torch.sign(trimmed.sum(0))
    tie = (elected == 0) & (trimmed != 0).any(0)
    if tie_rule == "positive":
        elected[tie] = 1.0
    elif tie_rule == "global_majority":
        elected[tie] = torch.sign(elected.sum())
    agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
    total = (trimmed * agree).sum(0)
    if disjoint == "mean":
        total = total / agree.sum(0).clamp(min=1)
    return lam * total


def conflict_stats(trimmed: torch.Tensor) -> dict:
    """Sign-conflict rates of docs/methods.md for a dense trimmed (T, D) tensor."""
    pos = (trimmed > 0).sum(0)
    neg = (trimmed < 0).sum(0)
    nz = pos + neg
    conflict = (pos >= 1) & (neg >= 1)
    n_t = trimmed.shape[0]
    pairwise = [[0.0] * n_t for _ in range(n_t)]
    for a in range(n_t):
        for b in range(n_t):
            both = (trimmed[a] != 0) & (trimmed[b] != 0)
            opposite = (trimmed[a] * trimmed[b]) < 0
            pairwise[a][b] = float(opposite.sum()) / float(both.sum()) if both.any() else float("nan")
    return {
        "rate_all": float(conflict.sum()) / trimmed.shape[1],
        "rate_nonzero1": float(conflict.sum()) / max(int((nz >= 1).sum()), 1),
        "rate_nonzero2": float(conflict.sum()) / max(int((nz >= 2).sum()), 1),
        "pairwise": pairwise,
    }


def random_sign_baseline(n: int, k_pct: float) -> float:
    k = k_pct / 100
    return 1 - 2 * (1 - k / 2) ** n + (1 - k) ** n
