"""TIES trimming: which entries of each task vector survive a keep-top-k% trim.

Product convention (docs/methods.md, TIES-Merging): k is in percent, 0 < k <= 100; a trim over n entries keeps the
ceil(k*n/100) entries of largest magnitude, and entries equal to the threshold are kept too, so
ties at the threshold may keep a few more. k = 100 keeps everything (no trim).

Scopes: `global` computes one threshold per task vector over all its entries (official TIES code,
the default); `per-tensor` one threshold per task and tensor (mergekit).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import kernels
from .errors import ConfigError

TRIM_SCOPES = ("global", "per-tensor")


def check_k(k: float) -> float:
    k = float(k)
    if not math.isfinite(k) or not 0.0 < k <= 100.0:
        raise ConfigError(f"trim k must be a percentage in (0, 100], got {k}")
    return k


def segment_starts(stack, scope: str) -> np.ndarray:
    """Boundaries of the trim segments: the whole vector (global) or each tensor (per-tensor)."""
    if scope == "global":
        return np.array([0, stack.numel], dtype=np.int64)
    if scope == "per-tensor":
        return stack.offsets.astype(np.int64)
    raise ConfigError(f"unknown trim scope {scope!r}: use one of {', '.join(TRIM_SCOPES)}")


def trim_thresholds(stack, k: float, scope: str = "global") -> torch.Tensor:
    """thresholds[t, s]: task t keeps entries of segment s with |tau| >= thresholds[t, s].

    Cached on the stack per (k, scope), so dragging lambda never recomputes them.
    """
    k = check_k(k)
    starts = segment_starts(stack, scope)

    def compute() -> torch.Tensor:
        sizes = np.diff(starts)
        if k >= 100.0:  # no trim: a threshold of 0 keeps every entry
            return torch.zeros((len(stack.tasks), len(sizes)), dtype=torch.float32)
        keep = np.array([[kernels.keep_count(int(n), k) for n in sizes]] * len(stack.tasks), dtype=np.int64)
        if kernels.can_use_numba(stack.data):
            return kernels.trim_thresholds_cpu(stack.data, starts, keep)
        return kernels.trim_thresholds_torch(stack.data, starts, keep)

    return stack.memo(("trim_thresholds", k, scope), compute)


def trimmed(stack, k: float, scope: str = "global") -> torch.Tensor:
    """tau_hat as a dense (T, D) tensor. For small models, tests and plots only: it copies the stack."""
    thresholds = trim_thresholds(stack, k, scope).to(stack.device)
    starts = segment_starts(stack, scope)
    out = stack.data.float().clone()
    for s in range(len(starts) - 1):
        block = out[:, int(starts[s]):int(starts[s + 1])]
        block[block.abs() < thresholds[:, s:s + 1]] = 0.0
    return out
