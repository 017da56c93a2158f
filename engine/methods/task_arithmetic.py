"""Task Arithmetic: theta = theta_0 + lambda * sum_t tau_t (Ilharco et al.; methods.md §2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, param


@dataclass(frozen=True)
class TaskArithmeticConfig:
    lam: float = param(0.3, "Scaling λ of the summed task vectors: 0 gives the pretrained model, larger moves further "
                       "towards every fine-tuned model at once.", label="λ (scaling)", min=0.0, max=3.0, step=0.05,
                       flag="--lam")


def _task_arithmetic(stack, config: TaskArithmeticConfig) -> torch.Tensor:
    return stack.data.float().sum(dim=0).mul_(config.lam)


METHOD = Method(name="task-arithmetic", label="Task Arithmetic",
                summary="Add λ times the sum of the task vectors to the pretrained model.",
                Config=TaskArithmeticConfig, run=_task_arithmetic)
