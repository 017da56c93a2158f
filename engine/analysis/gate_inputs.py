"""How much room a model leaves MINGLE's gates to route: the novel share of each task's mean layer input.

A MINGLE gate reads ḡ_t = w_tᵀx̄ + b_t, with x̄ the token- and batch-mean input of its linear, and the
new gate's weight gradient lies along x̄ (docs/methods.md, MINGLE). The null space protects the
earlier tasks' top-k input directions (uncentred Σ x xᵀ over all tokens). So what a new task's gate
can learn without touching earlier tasks is the part of its x̄ that lies *outside* the other tasks'
protected directions:

    novel share of task t in layer l = ‖(I − U Uᵀ) x̄_t‖² / ‖x̄_t‖²,
    U = an orthonormal basis of the other tasks' top-k directions in layer l.

Near 0, a gate can only open by using directions every task shares, so it opens on every task alike
(the relaxation lets part of that through; the hard projection leaves the gate almost nothing). Near
1, each task has inputs of its own and a linear gate can route. It is measured on a model before any
merging (normally θ0) on each task's test images, so it judges a model zoo before MINGLE runs.
The per-task directions are the top-k of θ0's inputs here; MINGLE takes them from the adapted
merged model, which starts at θ0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError


def novel_share(mean_input: torch.Tensor, basis: torch.Tensor) -> float:
    """‖(I − U Uᵀ) x̄‖² / ‖x̄‖² for an orthonormal basis U (d, m); 1.0 when m = 0, 0.0 for x̄ = 0."""
    x = mean_input.double()
    norm2 = float(x @ x)
    if norm2 == 0.0:
        return 0.0
    if basis.shape[1] == 0:
        return 1.0
    inside = basis.double().T @ x
    return max(0.0, 1.0 - float(inside @ inside) / norm2)


def common_share(mean_inputs: torch.Tensor) -> float:
    """‖m‖² / mean_t ‖x̄_t‖² for the tasks' mean inputs x̄_t (rows), m their mean: how much of a task's
    mean input every task has in common (1 = all alike, 0 = they cancel; 0.0 when every x̄_t is 0).

    A gate reads w·x̄_t; the part w·m is the same on every task, so a gate that learns m opens on
    every task alike. MINGLE's first gate is never projected and learns it whenever it is large."""
    x = mean_inputs.double()
    total = float(x.pow(2).sum(1).mean())
    if total == 0.0:
        return 0.0
    m = x.mean(0)
    return float(m @ m) / total


def orthonormal_span(bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """An orthonormal basis (d, m) of the span of several bases' columns, dropping dependent ones."""
    stacked = torch.cat([b.double() for b in bases], dim=1)
    if stacked.shape[1] == 0:
        return stacked
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    keep = s > s[0] * 1e-10 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return u[:, keep]


@dataclass
class GateInputReport:
    tasks: list[str]
    layers: list[str]  # canonical linear names
    subspace_k: int
    novel: np.ndarray  # (layers, tasks): novel share of each task's mean input, 0…1
    images_per_task: dict[str, int]
    common: np.ndarray  # (layers,): share of the tasks' mean inputs they all have in common, 0…1

    @property
    def per_task(self) -> np.ndarray:
        return self.novel.mean(0)

    @property
    def per_layer(self) -> np.ndarray:
        return self.novel.mean(1)

    @property
    def mean(self) -> float:
        return float(self.novel.mean())

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "layers": self.layers, "subspace_k": self.subspace_k,
                "novel_share": {"mean": self.mean,
                                "per_task": dict(zip(self.tasks, self.per_task.tolist())),
                                "per_layer": dict(zip(self.layers, self.per_layer.tolist())),
                                "matrix": self.novel.tolist()},
                "common_share": {"mean": float(self.common.mean()),
                                 "per_layer": dict(zip(self.layers, self.common.tolist()))},
                "images_per_task": self.images_per_task}


@torch.no_grad()
def gate_input_report(encoder, images_by_task: Mapping[str, torch.Tensor], *, subspace_k: int = 3,
                      batch_size: int = 16) -> GateInputReport:
    """Novel share of every task's mean input at every gated linear of a `MingleEncoder` (no experts yet).

    Batches of 16 as MINGLE's seed-set pass; with no experts the inputs do not depend on the batch.
    """
    if subspace_k < 0:
        raise ConfigError(f"subspace k must be 0 or more, got {subspace_k}")
    if len(images_by_task) < 2:
        raise ConfigError("the novel share compares tasks: give at least two")
    from ..methods.mingle import top_subspace

    layers = list(encoder.selected)
    modules = [encoder.linears[n] for n in layers]
    tasks = list(images_by_task)
    device = modules[0].weight.device
    # Per layer: each task's sum of inputs (tasks, d_in) and uncentred second moment (tasks, d_in, d_in).
    sums = [torch.zeros(len(tasks), m.in_features, dtype=torch.float64, device=device) for m in modules]
    moments = [torch.zeros(len(tasks), m.in_features, m.in_features, dtype=torch.float64, device=device)
               for m in modules]
    tokens = np.zeros(len(tasks))
    current = {"task": 0}

    def hook(index):
        def fn(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            k = current["task"]
            sums[index][k] += x.sum(0)
            moments[index][k] += x.T @ x
            if index == 0:
                tokens[k] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        for k, task in enumerate(tasks):
            current["task"] = k
            images = images_by_task[task].to(device)
            if len(images) == 0:
                raise ConfigError(f"task {task!r} has no test images")
            for start in range(0, len(images), batch_size):
                encoder(images[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    novel = np.zeros((len(layers), len(tasks)))
    common = np.zeros(len(layers))
    token_counts = torch.as_tensor(tokens, dtype=torch.float64, device=device)[:, None]
    for i in range(len(layers)):
        means = sums[i] / token_counts  # (tasks, d_in): each task's token- and image-mean input
        common[i] = common_share(means)
        bases = [top_subspace(moments[i][k], subspace_k) for k in range(len(tasks))]
        for k in range(len(tasks)):
            others = orthonormal_span([b for j, b in enumerate(bases) if j != k])
            novel[i, k] = novel_share(means[k], others)
    return GateInputReport(tasks=tasks, layers=layers, subspace_k=subspace_k, novel=novel,
                           images_per_task={t: len(images_by_task[t]) for t in tasks}, common=common)


def measure_gate_inputs(suite, tasks: Sequence[str] | None = None, *, limit: int | None = None,
                        subspace_k: int = 3, layers: str = "all", device: str = "cpu") -> GateInputReport:
    """The report for a suite's pretrained model θ0 on its tasks' test images (at most `limit` each)."""
    from ..methods.mingle import MingleEncoder

    tasks = list(tasks or suite.tasks)
    encoder = MingleEncoder.from_state_dict(suite.build_encoder, suite.theta0(), layers).to(device).eval()
    images = {t: suite.test_set(t, limit)[0] for t in tasks}
    return gate_input_report(encoder, images, subspace_k=subspace_k)
