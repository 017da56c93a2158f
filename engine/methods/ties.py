"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023; docs/methods.md).

1. trim: keep the top-k% magnitudes of each task vector (see engine/trim.py for the exact rule);
2. elect: per entry, the sign of the sum of trimmed values (the sign with more total mass wins);
3. disjoint merge: mean (paper) or sum (FusionBench) of the trimmed values that agree with it;
4. scale: theta = theta_0 + lambda * tau_m.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import kernels
from ..task_vectors import TaskVectorStack
from ..trim import TRIM_SCOPES, segment_starts, trim_thresholds
from .base import MethodSpec, param
from .registry import register

TIE_RULES = ("global_majority", "positive", "zero")
TIE_RULE_LABELS = {"global_majority": "model-wide majority sign", "positive": "+ (positive)", "zero": "none (stay at θ₀)"}
TRIM_LABELS = {"global": "whole model", "per-tensor": "each tensor"}


@dataclass(frozen=True)
class TiesConfig:
    k: float = param(20.0, "Trim k: each task vector keeps only its k % largest-magnitude entries; the rest are "
                     "reset to the pretrained value.", label="trim k (%)", min=0.0, max=100.0, step=1.0, above_min=True,
                     flag="--k")
    lam: float = param(1.0, "Scaling λ of the merged task vector (1.0 with 'mean', about 0.3 with 'sum').",
                       label="λ (scaling)", min=0.0, max=3.0, step=0.05, flag="--lam")
    trim: str = param("global", "Where the top-k % is counted: over the whole model (global, as the paper's code) "
                      "or separately inside each tensor (per-tensor, as mergekit).", label="trim scope",
                      choices=TRIM_SCOPES, choice_labels=TRIM_LABELS, flag="--trim")
    disjoint: str = param("mean", "How agreeing values are combined: their mean (paper) or their sum "
                          "(FusionBench, used with λ ≈ 0.3).", label="disjoint merge", choices=("mean", "sum"),
                          flag="--disjoint")
    tie_rule: str = param("global_majority", "Sign used where trimmed values cancel exactly: the model-wide "
                          "majority sign (official code), + (mergekit) or none (entry stays pretrained).",
                          label="tie rule", choices=TIE_RULES, choice_labels=TIE_RULE_LABELS, flag="--tie-rule")


def _ties(stack, config: TiesConfig) -> torch.Tensor:
    thresholds = trim_thresholds(stack, config.k, config.trim)
    starts = segment_starts(stack, config.trim)
    merge = kernels.ties_merge_cpu if kernels.can_use_numba(stack.data) else kernels.ties_merge_torch
    return merge(stack.data, starts, thresholds, disjoint=config.disjoint, scale=config.lam,
                 tie_rule=config.tie_rule)


@dataclass(frozen=True)
class ContinualTiesConfig:
    k: float = param(20.0, "TIES trim: each of the two rows keeps its top-k % magnitudes (global trim).",
                     label="trim k (%)", min=0.0, max=100.0, step=1.0, above_min=True, flag="--k")
    lam: float = param(0.3, "Scaling λ (0.3 for 8 tasks, 0.1 for 14/20).", label="λ", min=0.0, max=3.0, step=0.05,
                       flag="--lam")
    disjoint: str = param("sum", "Disjoint merge of the two rows: sum (FusionBench) or mean (paper).",
                          label="disjoint merge", choices=("sum", "mean"), flag="--disjoint")
    accumulate: bool = param(True, "FusionBench's ContinualTiesMergingForCLIP: merged += λ·TIES(merged − θ_0, τ_t), "
                             "the previous vector taken after λ and counted again; off: merged = θ_0 + λ·TIES(R, τ_t) "
                             "with R the unscaled running TIES vector.", label="accumulate (official code)",
                             flag="--accumulate")


class ContinualTies:
    """Two-row TIES per step: the merged-so-far vector and the new task vector.

    Whether the stored previous vector is taken before or after λ is not stated in the paper. The
    official class (FusionBench `ContinualTiesMergingForCLIP`) takes it *after* λ (merged − θ_0) and
    *adds* λ·TIES([merged − θ_0, τ_t]) to the merged model, so the previous vector enters twice; at
    t = 1 the merged model is θ_0 + λ τ_1. That is the default (`accumulate`); the alternative keeps
    an unscaled running vector R_t = TIES(R_{t−1}, τ_t) and sets θ = θ_0 + λ R_t (docs/methods.md).
    """

    name = "ties"

    def __init__(self, config: ContinualTiesConfig | None = None, *, encoder=None, device="cpu") -> None:
        self.config = config or ContinualTiesConfig()

    def init(self, theta0: dict[str, torch.Tensor]) -> None:
        self.theta0 = dict(theta0)
        self.names = sorted(k for k, v in theta0.items() if v.is_floating_point())
        self.shapes = [tuple(self.theta0[n].shape) for n in self.names]
        self.offsets = np.zeros(len(self.shapes) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([int(np.prod(s)) for s in self.shapes])
        self.base = self._flatten(theta0)
        self.vector: torch.Tensor | None = None  # merged − θ_0 (accumulate) or R (replace)

    def _flatten(self, state) -> torch.Tensor:
        return torch.cat([state[n].float().reshape(-1) for n in self.names])

    def _ties(self, rows: torch.Tensor) -> torch.Tensor:
        stack = TaskVectorStack(tasks=["previous", "new"], names=self.names, shapes=self.shapes,
                                offsets=self.offsets, data=rows.contiguous(), base=self.theta0)
        return _ties(stack, TiesConfig(k=self.config.k, lam=1.0, disjoint=self.config.disjoint))

    def step(self, task, theta_t, seed_images=None, head=None) -> dict[str, torch.Tensor]:
        tau = self._flatten(theta_t) - self.base
        lam = self.config.lam
        if self.vector is None:
            self.vector = lam * tau if self.config.accumulate else tau
        elif self.config.accumulate:
            self.vector = self.vector + lam * self._ties(torch.stack([self.vector, tau]))
        else:
            self.vector = self._ties(torch.stack([self.vector, tau]))
        merged_tv = self.vector if self.config.accumulate else lam * self.vector
        merged = dict(self.theta0)
        for i, n in enumerate(self.names):
            d = merged_tv[int(self.offsets[i]):int(self.offsets[i + 1])].view(self.shapes[i])
            merged[n] = self.theta0[n].float() + d
        return merged


METHOD = register(MethodSpec(
    name="ties", label="TIES-Merging",
    summary="Trim small changes, elect one sign per weight, average only the values that agree.", family="static",
    Config=TiesConfig, run=_ties, continual=ContinualTies, ContinualConfig=ContinualTiesConfig,
    continual_label="C-TIES"))
