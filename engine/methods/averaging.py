"""Weight averaging: θ = (1/T) Σ_t θ_t = θ_0 + mean_t τ_t; its continual form is the running mean (SWA)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MethodSpec
from .registry import register


@dataclass(frozen=True)
class AveragingConfig:
    """Plain averaging has no hyperparameters (it is Task Arithmetic with λ = 1/T)."""


def _average(stack, config: AveragingConfig) -> torch.Tensor:
    return stack.data.float().mean(dim=0)


class ContinualAverage:
    """θ̄_t = θ̄_{t−1} + (θ_t − θ̄_{t−1}) / t: after T steps, the plain average of θ_1..θ_T."""

    name = "average"

    def __init__(self, config: AveragingConfig | None = None, *, encoder=None, device="cpu") -> None:
        self.config = config or AveragingConfig()

    def init(self, theta0: dict[str, torch.Tensor]) -> None:
        self.theta0, self.merged, self.count = dict(theta0), None, 0

    def step(self, task, theta_t, seed_images=None, head=None) -> dict[str, torch.Tensor]:
        self.count += 1
        if self.merged is None:
            self.merged = {k: v.float().clone() if v.is_floating_point() else v for k, v in theta_t.items()}
        else:
            for k in sorted(k for k, v in self.merged.items() if v.is_floating_point()):
                self.merged[k] += (theta_t[k].float() - self.merged[k]) / self.count
        return self.merged


METHOD = register(MethodSpec(
    name="average", label="Weight averaging", summary="Average the fine-tuned weights.", family="static",
    Config=AveragingConfig, run=_average, continual=ContinualAverage, continual_label="C-Averaging"))
