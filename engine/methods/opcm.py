"""OPCM: orthogonal projection-based continual merging (Tang et al., "Merging Models on the Fly
Without Retraining", arXiv 2501.09522; docs/methods.md).

Keep the running, unnormalised sum Σ_t of (projected) task vectors. At step t:

* every linear weight (q/k/v/out, fc1, fc2 of each block, and the visual projection — all
  `nn.Linear` in HF CLIP): with Σ_{t−1} = U S Vᵀ, write τ_t in that basis, C = Uᵀ τ_t V, zero the
  top-left split×split block, rotate back. split = the number of leading singular values whose
  cumulative mass s.cumsum()/s.sum() is still ≤ α (the official `argmax(cumsum/sum > α)`), α = 0.5;
* every other tensor: τ_t as is;
* Σ_t = Σ_{t−1} + cleaned τ_t, and θ = θ_0 + Σ_t · avg_norm / ‖Σ_t‖, with avg_norm the mean of the
  ‖τ_i‖ seen so far (norms over all floating-point tensors). That is the official λ_t bookkeeping:
  λ_t = ‖Σ_t‖ / avg_norm and merged − θ_0 = Σ_t / λ_t. At t = 1 the merged model is θ_1.

The official code zeroes C's diagonal with `.diag().fill_(0)` (a no-op on a 2-D tensor) in the
version MINGLE used, and `.diagonal().fill_(0)` (effective) in later FusionBench versions
(docs/methods.md): `zero_diagonal` chooses; the default follows the no-op.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .base import MethodSpec, param
from .registry import register

LINEAR_WEIGHT = re.compile(r"(encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|visual_projection)\.weight")


@dataclass(frozen=True)
class OPCMConfig:
    alpha: float = param(0.5, "Split: project the new task vector off the leading singular directions of the "
                         "running merged vector that hold up to this fraction of its singular-value mass.",
                         label="α", min=0.0, max=1.0, step=0.05, flag="--alpha")
    zero_diagonal: bool = param(False, "Also zero the diagonal of Uᵀ τ V (later FusionBench's effective "
                                "`.diagonal().fill_(0)`); off = the no-op `.diag().fill_(0)` MINGLE's baseline ran.",
                                label="zero diagonal", flag="--zero-diagonal")


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """Index of the first singular value at which cumulative mass exceeds α (official `argmax`)."""
    s = singular_values.double()
    if s.sum() <= 0:
        return 0
    exceeds = (s.cumsum(0) / s.sum()) > alpha
    return int(exceeds.float().argmax())  # all False (α ≥ 1) gives 0, as the official code


def project_task_vector(previous_sum: torch.Tensor, tau: torch.Tensor, alpha: float,
                        zero_diagonal: bool = False) -> torch.Tensor:
    """τ with its component in the top split×split block of previous_sum's singular bases removed."""
    u, s, vh = torch.linalg.svd(previous_sum.double(), full_matrices=True)
    k = split_rank(s, alpha)
    c = u.T @ tau.double() @ vh.T
    if zero_diagonal:
        c.diagonal().fill_(0)
    c[:k, :k] = 0
    return (u @ c @ vh).to(tau.dtype)


class ContinualOPCM:
    name = "opcm"

    def __init__(self, config: OPCMConfig | None = None, *, encoder=None, device="cpu") -> None:
        self.config = config or OPCMConfig()

    def init(self, theta0: dict[str, torch.Tensor]) -> None:
        self.theta0 = dict(theta0)
        self.names = sorted(k for k, v in theta0.items() if v.is_floating_point())
        self.sum: dict[str, torch.Tensor] | None = None
        self.norms: list[float] = []

    def step(self, task, theta_t, seed_images=None, head=None) -> dict[str, torch.Tensor]:
        tau = {n: theta_t[n].float() - self.theta0[n].float() for n in self.names}
        self.norms.append(float(torch.sqrt(sum((t.double() ** 2).sum() for t in tau.values()))))
        if self.sum is None:
            self.sum = tau
        else:
            for n in self.names:
                if LINEAR_WEIGHT.fullmatch(n) and tau[n].ndim == 2:
                    tau[n] = project_task_vector(self.sum[n], tau[n], self.config.alpha, self.config.zero_diagonal)
                self.sum[n] = self.sum[n] + tau[n]
        total = float(torch.sqrt(sum((t.double() ** 2).sum() for t in self.sum.values())))
        scale = (sum(self.norms) / len(self.norms)) / total if total > 0 else 0.0
        merged = dict(self.theta0)
        for n in self.names:
            merged[n] = self.theta0[n].float() + scale * self.sum[n]
        return merged


METHOD = register(MethodSpec(
    name="opcm", label="OPCM", summary="Project each new task vector off the directions the merge already uses, then rescale.", family="continual", Config=OPCMConfig, continual=ContinualOPCM))
