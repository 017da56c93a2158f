"""TIES step by step on one small block of one weight matrix: what the TIES lesson shows.

Every number comes from the engine's own TIES: the trim thresholds are `trim_thresholds` over the
*whole* task vectors (a block is trimmed with the model-wide threshold, not its own top-k), trim,
elect and the disjoint merge are the kernel functions `ties_merge_torch` is made of, and the merged
block is cut out of `get_method("ties").merge` over the whole model (the same call the Merge page
makes). Nothing here re-implements a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .. import kernels
from ..errors import ConfigError
from ..methods import get_method
from ..trim import segment_starts, trim_thresholds

BLOCK = 10  # cells per side of the lesson's block: small enough to read every value


@dataclass
class TiesBlock:
    """One block [rows × cols] of `tensor` through TIES. Arrays are [task, row, col] or [row, col]."""

    tasks: list[str]
    tensor: str
    row: int                      # first row and column of the block inside the tensor (viewed as 2-D)
    col: int
    config: dict[str, Any]        # the TIES settings (k, lam, trim, disjoint, tie_rule)
    thresholds: list[float]       # per task: the magnitude a value needs to survive the trim here
    task_vectors: np.ndarray      # τ_t = θ_t − θ_0 on the block
    kept: np.ndarray              # |τ_t| ≥ threshold_t
    trimmed: np.ndarray           # τ_t where kept, else 0
    summed: np.ndarray            # Σ_t trimmed
    elected: np.ndarray           # the elected sign: +1, −1, or 0 where nothing was kept
    agree: np.ndarray             # kept and of the elected sign: the values the disjoint merge uses
    merged: np.ndarray            # TIES's merged task vector (λ applied), from the whole-model merge
    task_arithmetic: np.ndarray   # plain Task Arithmetic's sum Σ_t τ_t (λ = 1), for comparison
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}


def block_tensors(stack) -> list[str]:
    """Tensors a lesson block can come from: the 2-D weight matrices (attention and MLP)."""
    return [n for n, s in zip(stack.names, stack.shapes) if len(s) == 2 and min(s) >= 2]


def _block_indices(stack, tensor: str, row: int, col: int, size: int) -> tuple[np.ndarray, int, int]:
    if tensor not in stack.names:
        raise ConfigError(f"no tensor {tensor!r} in the task vectors")
    i = stack.names.index(tensor)
    shape = stack.shapes[i]
    n_rows, n_cols = shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows, cols = min(size, n_rows), min(size, n_cols)
    if not (0 <= row <= n_rows - rows and 0 <= col <= n_cols - cols):
        raise ConfigError(f"a {rows}×{cols} block at row {row}, column {col} does not fit in {tensor} "
                          f"({n_rows}×{n_cols})")
    grid = (np.arange(row, row + rows)[:, None] * n_cols + np.arange(col, col + cols)[None, :])
    return int(stack.offsets[i]) + grid.reshape(-1), rows, cols


def ties_block(stack, tasks: Sequence[str], tensor: str, *, row: int = 0, col: int = 0, size: int = BLOCK,
               **ties_config: Any) -> TiesBlock:
    """TIES of `tasks` (from `stack`) with `ties_config` (TiesConfig fields), shown on one block."""
    method = get_method("ties")
    config = method.config(**ties_config)
    sub = stack.subset(list(tasks))
    index, rows, cols = _block_indices(sub, tensor, row, col, size)
    merged_full = method.merge(sub, config)  # the engine's TIES over the whole model

    thresholds = trim_thresholds(sub, config.k, config.trim)
    starts = segment_starts(sub, config.trim)
    segment = 0 if config.trim == "global" else sub.names.index(tensor)
    where = torch.as_tensor(index, device=sub.data.device)
    block = sub.data[:, where].float()
    threshold = thresholds[:, segment:segment + 1].to(block.device)  # per task, for this tensor
    kept_values = kernels.ties_trim_block(block, threshold)
    sign, tie = kernels.ties_elect_block(kept_values, config.tie_rule)
    if config.tie_rule == "global_majority" and bool(tie.any()):
        sign = kernels.ties_resolve_ties(sign, tie, kernels.ties_majority_sign(sub.data, starts, thresholds))
    _, agree = kernels.ties_disjoint_block(kept_values, sign, config.disjoint, config.lam)

    def grid(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().reshape(*t.shape[:-1], rows, cols)

    kept = block.abs() >= threshold
    merged = grid(merged_full[where])
    ta = grid(block.sum(0))
    positive, negative = (kept_values > 0).any(0), (kept_values < 0).any(0)
    ties_sign, ta_sign = np.sign(merged), np.sign(ta)
    counts = {
        "cells": rows * cols,
        "values": len(tasks) * rows * cols,
        "dropped_by_trim": int((~kept).sum()),
        "conflicting_cells": int((positive & negative).sum()),
        "reset_cells": int((ties_sign == 0).sum()),  # nothing kept: the merge leaves θ_0 there
        "sign_differs_from_ta": int(((ties_sign != 0) & (ties_sign != ta_sign)).sum()),
        "outvoted_values": int((kept & ~agree).sum()),  # kept by the trim, of the losing sign
    }
    return TiesBlock(
        tasks=list(tasks), tensor=tensor, row=row, col=col,
        config={"k": config.k, "lam": config.lam, "trim": config.trim, "disjoint": config.disjoint,
                "tie_rule": config.tie_rule},
        thresholds=[float(v) for v in thresholds[:, segment]],
        task_vectors=grid(block), kept=grid(kept), trimmed=grid(kept_values), summed=grid(kept_values.sum(0)),
        elected=grid(sign).astype(np.int8), agree=grid(agree), merged=merged, task_arithmetic=ta, counts=counts)
