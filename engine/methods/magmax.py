"""MagMax-IND as a continual baseline (Marczak et al., arXiv 2407.06322; docs/methods.md).

Per entry, the merged task vector keeps whichever of the task vectors seen so far has the largest
magnitude; a new vector wins ties (≥). "IND" = each θ_t fine-tuned independently from θ_0 (not
sequentially). θ = θ_0 + λ·M with λ = 0.5 (MINGLE Tab. 11). Streaming keeps only M, so the result
after T steps equals the batch max-magnitude merge of all T vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MethodSpec, param
from .registry import register


@dataclass(frozen=True)
class MagMaxConfig:
    lam: float = param(0.5, "Scaling λ of the max-magnitude task vector.", label="λ", min=0.0, max=3.0, step=0.05,
                       flag="--lam")


def max_magnitude(previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Entry-wise the value with the larger |·|; the new vector wins ties."""
    return torch.where(new.abs() >= previous.abs(), new, previous)


class ContinualMagMax:
    name = "magmax"

    def __init__(self, config: MagMaxConfig | None = None, *, encoder=None, device="cpu") -> None:
        self.config = config or MagMaxConfig()

    def init(self, theta0: dict[str, torch.Tensor]) -> None:
        self.theta0 = dict(theta0)
        self.names = sorted(k for k, v in theta0.items() if v.is_floating_point())
        self.vector: dict[str, torch.Tensor] = {}

    def step(self, task, theta_t, seed_images=None, head=None) -> dict[str, torch.Tensor]:
        merged = dict(self.theta0)
        for n in self.names:
            tau = theta_t[n].float() - self.theta0[n].float()
            self.vector[n] = tau if n not in self.vector else max_magnitude(self.vector[n], tau)
            merged[n] = self.theta0[n].float() + self.config.lam * self.vector[n]
        return merged


METHOD = register(MethodSpec(
    name="magmax", label="MagMax-IND", summary="Keep, per weight, the largest-magnitude change seen so far.", family="continual", Config=MagMaxConfig, continual=ContinualMagMax))
