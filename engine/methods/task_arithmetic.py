"""Task Arithmetic: θ = θ_0 + λ Σ_t τ_t (Ilharco et al.); its continual form adds λ τ_t as each task arrives."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MethodSpec, param
from .registry import register


@dataclass(frozen=True)
class TaskArithmeticConfig:
    lam: float = param(0.3, "Scaling λ of the summed task vectors: 0 gives the pretrained model, larger moves further "
                       "towards every fine-tuned model at once.", label="λ (scaling)", min=0.0, max=3.0, step=0.05,
                       flag="--lam")


def _task_arithmetic(stack, config: TaskArithmeticConfig) -> torch.Tensor:
    return stack.data.float().sum(dim=0).mul_(config.lam)


class ContinualTaskArithmetic:
    """θ_t = θ_{t−1} + λ τ_t, so θ_T = θ_0 + λ Σ τ_t."""

    name = "task-arithmetic"

    def __init__(self, config: TaskArithmeticConfig | None = None, *, encoder=None, device="cpu") -> None:
        self.config = config or TaskArithmeticConfig()

    def init(self, theta0: dict[str, torch.Tensor]) -> None:
        self.theta0 = dict(theta0)
        self.merged = {k: v.float().clone() if v.is_floating_point() else v for k, v in theta0.items()}

    def step(self, task, theta_t, seed_images=None, head=None) -> dict[str, torch.Tensor]:
        for k in sorted(k for k, v in self.merged.items() if v.is_floating_point()):
            self.merged[k] += self.config.lam * (theta_t[k].float() - self.theta0[k].float())
        return self.merged


METHOD = register(MethodSpec(
    name="task-arithmetic", label="Task Arithmetic",
    summary="Add λ times the sum of the task vectors to the pretrained model.", family="static",
    Config=TaskArithmeticConfig, run=_task_arithmetic, continual=ContinualTaskArithmetic,
    continual_label="C-Task Arithmetic"))
