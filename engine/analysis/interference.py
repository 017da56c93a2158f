"""Cross-task interference ξ of a merged model (Resolving Interference, docs/methods.md).

    ξ(θ_m) = Σ_t E_{x∼D_t}[ KL( softmax h_t(f(x; θ_t)) ‖ softmax h_t(f(x; θ_m)) ) ]

For every task t the expert θ_t is the teacher and the merged model θ_m the student, both read
through task t's own frozen head h_t (the logits already carry CLIP's logit scale of 100), on
task t's *test* images. ξ = 0 means the merge reproduces every expert under that expert's head.
ξ needs task data, so it is an analysis metric only; RI's training never sees it.

Units: nats per test image. `total` is the paper's sum over tasks; `mean` (total / T) is what to
compare across different task counts (whether the paper's figures sum or average is unconfirmed,
so both are reported).

The expert's test-set logits do not depend on the merge, so `measure_interference` caches them per
(expert file, size, mtime, task): a sweep over merges pays for the experts once.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..evaluate import as_suite, predict_logits


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, temperature: float = 1.0,
                  reduction: str = "mean") -> torch.Tensor:
    """KL(p_teacher ‖ p_student) between the softmax distributions of two (B, C) logit tensors, in nats.

    reduction="mean" averages over the batch (PyTorch's "batchmean"), "none" gives one value per row.
    Computed from log-softmaxes (never from probabilities) so a confident teacher cannot give 0·log 0.
    The temperature divides both logits; at 1 (the default, our choice: docs/methods.md, RI) the CLIP logit
    scale of 100 that the heads carry is what sets the sharpness.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ConfigError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                          f"{tuple(student_logits.shape)} must have the same shape")
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if reduction == "none":
        return per_row
    if reduction == "mean":
        return per_row.mean()
    raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")


@dataclass
class InterferenceReport:
    """ξ of one merged model: per task, summed (the paper's ξ) and averaged over tasks, in nats/image."""

    per_task: dict[str, float]
    total: float
    mean: float
    n_samples: dict[str, int] = field(default_factory=dict)
    agreement_pct: dict[str, float] = field(default_factory=dict)  # argmax(expert) == argmax(merged), %

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def interference_from_logits(expert_logits: Mapping[str, torch.Tensor],
                             merged_logits: Mapping[str, torch.Tensor]) -> InterferenceReport:
    """ξ from each task's (N_t, C_t) test-set logits of its expert and of the merged model (same order)."""
    if set(expert_logits) != set(merged_logits):
        raise ConfigError(f"expert logits cover tasks {sorted(expert_logits)} but merged logits cover "
                          f"{sorted(merged_logits)}")
    if not expert_logits:
        raise ConfigError("interference needs at least one task")
    per_task, counts, agreement = {}, {}, {}
    for task, teacher in expert_logits.items():
        student = merged_logits[task]
        per_task[task] = float(kl_divergence(teacher, student))
        counts[task] = int(teacher.shape[0])
        agreement[task] = float((teacher.argmax(-1) == student.argmax(-1)).float().mean() * 100)
    total = float(sum(per_task.values()))
    return InterferenceReport(per_task=per_task, total=total, mean=total / len(per_task), n_samples=counts,
                              agreement_pct=agreement)


# --------------------------------------------------------------------------------------------
# On a task suite: test images and heads come from the suite (engine.evaluate)
# --------------------------------------------------------------------------------------------

_EXPERT_LOGITS: dict[tuple, torch.Tensor] = {}


def _file_key(path: str | Path) -> tuple:
    path = Path(path)
    try:
        stat = os.stat(path)
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns
    except OSError:
        return str(path), None, None


def _test_images(suite, task: str, limit: int | None) -> torch.Tensor:
    return suite.test_set(task, limit)[0]


def expert_test_logits(suite, task: str, *, limit: int | None = None, device: str = "cpu") -> torch.Tensor:
    """Expert `task`'s logits on task `task`'s test images under its own head (cached per expert file)."""
    key = (_file_key(suite.expert_path(task)), suite.cache_key, task, suite.resolve_limit(limit), str(device))
    if key not in _EXPERT_LOGITS:
        images = _test_images(suite, task, limit)
        _EXPERT_LOGITS[key] = predict_logits(suite, task, task, images, device=device).float().cpu()
    return _EXPERT_LOGITS[key]


def measure_interference(suite, merged: Mapping[str, torch.Tensor], tasks: Sequence[str] | None = None, *,
                         limit: int | None = None, device: str = "cpu", reference: str = "auto",
                         progress: Callable[[float, str], None] | None = None) -> InterferenceReport:
    """ξ of the merged canonical state dict `merged` against the experts, per task and in total.

    The teachers are `reference_suite(suite, reference)`'s experts: for RI-adapted experts, by default
    the ORIGINAL ones (the adapted experts are a means; what one wanted to merge are the originals).
    """
    suite = as_suite(suite)
    teachers = reference_suite(suite, reference)
    tasks = list(tasks) if tasks else suite.task_names()
    for t in tasks:
        suite.check_task(t)
    expert, student = {}, {}
    for i, task in enumerate(tasks):
        expert[task] = expert_test_logits(teachers, task, limit=limit, device=device)
        images = _test_images(suite, task, limit)
        student[task] = predict_logits(suite, merged, task, images, device=device).float().cpu()
        if progress is not None:
            progress((i + 1) / len(tasks), f"ξ on {task}")
    return interference_from_logits(expert, student)


def reference_suite(suite, which: str = "auto"):
    """The suite whose experts ξ is measured against: "auto"/"original" = the original experts (the
    suite's `reference`, itself unless its experts were RI-adapted), "own" = the suite's own experts."""
    if which not in ("auto", "own", "original"):
        raise ConfigError(f"reference must be auto, own or original, got {which!r}")
    if which == "own":
        return suite
    if which == "original" and suite.reference is suite:
        raise ConfigError(f"{suite.label}: its experts are not RI-adapted; use --reference own")
    return suite.reference
