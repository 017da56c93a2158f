"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023; methods.md §3).

1. trim: keep the top-k% magnitudes of each task vector (see engine/trim.py for the exact rule);
2. elect: per entry, the sign of the sum of trimmed values (the sign with more total mass wins);
3. disjoint merge: mean (paper) or sum (FusionBench) of the trimmed values that agree with it;
4. scale: theta = theta_0 + lambda * tau_m.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..trim import TRIM_SCOPES, segment_starts, trim_thresholds
from .base import Method, param

TIE_RULES = ("global_majority", "positive", "zero")


@dataclass(frozen=True)
class TiesConfig:
    k: float = param(20.0, "Trim k: each task vector keeps only its k % largest-magnitude entries; the rest are "
                     "reset to the pretrained value.", label="trim k (%)", min=0.0, max=100.0, step=1.0, flag="--k")
    lam: float = param(1.0, "Scaling λ of the merged task vector (1.0 with 'mean', about 0.3 with 'sum').",
                       label="λ (scaling)", min=0.0, max=3.0, step=0.05, flag="--lam")
    trim: str = param("global", "Where the top-k % is counted: over the whole model (global, as the paper's code) "
                      "or separately inside each tensor (per-tensor, as mergekit).", label="trim scope",
                      choices=TRIM_SCOPES, flag="--trim")
    disjoint: str = param("mean", "How agreeing values are combined: their mean (paper) or their sum "
                          "(FusionBench, used with λ ≈ 0.3).", label="disjoint merge", choices=("mean", "sum"),
                          flag="--disjoint")
    tie_rule: str = param("global_majority", "Sign used where trimmed values cancel exactly: the model-wide "
                          "majority sign (official code), + (mergekit) or none (entry stays pretrained).",
                          label="tie rule", choices=TIE_RULES, flag="--tie-rule")


def _ties(stack, config: TiesConfig) -> torch.Tensor:
    if config.k <= 0:
        from ..errors import ConfigError

        raise ConfigError("trim k must be above 0 %: k = 0 would drop every task vector")
    thresholds = trim_thresholds(stack, config.k, config.trim)
    starts = segment_starts(stack, config.trim)
    merge = kernels.ties_merge_cpu if kernels.can_use_numba(stack.data) else kernels.ties_merge_torch
    return merge(stack.data, starts, thresholds, disjoint=config.disjoint, scale=config.lam,
                 tie_rule=config.tie_rule)


METHOD = Method(name="ties", label="TIES-Merging",
                summary="Trim small changes, elect one sign per weight, average only the values that agree.",
                Config=TiesConfig, run=_ties)
