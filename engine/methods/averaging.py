"""Weight averaging: theta = (1/T) sum_t theta_t = theta_0 + mean_t tau_t (methods.md §2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method


@dataclass(frozen=True)
class AveragingConfig:
    """Plain averaging has no hyperparameters (it is Task Arithmetic with lambda = 1/T)."""


def _average(stack, config: AveragingConfig) -> torch.Tensor:
    return stack.data.float().mean(dim=0)


METHOD = Method(name="average", label="Weight averaging", summary="Average the fine-tuned weights.",
                Config=AveragingConfig, run=_average)
