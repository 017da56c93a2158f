"""MINGLE gate activations, recorded with forward hooks (the MINGLE paper's Fig. 3; docs/methods.md).

Pass each task's full test set through the final merged encoder; in every gated layer, a forward
pre-hook evaluates all gates g_j(x) = w_jᵀx + b_j on every token (raw values, no softmax) and sums
them. Per layer we get, for each evaluated task i, the mean over all tokens and images of each gate
j. The figure's curve for gate j is the mean over layers at x = i, with a band of ± std across
layers; the product heatmap is the per-layer matrix itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch


@dataclass
class GateStats:
    gate_tasks: list[str]  # gate j was trained on the j-th merged task
    eval_tasks: list[str]
    layers: list[str]  # canonical linear names
    per_layer: np.ndarray  # (layers, gates, eval tasks): mean raw gate output over tokens and images

    @property
    def mean(self) -> np.ndarray:
        """(gates, eval tasks): mean over layers."""
        return self.per_layer.mean(0)

    @property
    def std(self) -> np.ndarray:
        """(gates, eval tasks): std across layers (population)."""
        return self.per_layer.std(0)

    def own_gate_highest(self) -> dict[str, bool]:
        """Per evaluated task that has a gate: whether its own gate has the highest mean activation
        (over layers) on its test images, i.e. whether the gates route that task to its expert."""
        mean = self.mean
        out = {}
        for i, task in enumerate(self.eval_tasks):
            if task in self.gate_tasks:
                own = self.gate_tasks.index(task)
                out[task] = bool(mean[own, i] >= mean[:, i].max())
        return out

    def to_json(self) -> dict:
        routed = self.own_gate_highest()
        return {"gate_tasks": self.gate_tasks, "eval_tasks": self.eval_tasks, "layers": self.layers,
                "mean": self.mean.tolist(), "std": self.std.tolist(),
                "per_layer": {name: self.per_layer[i].tolist() for i, name in enumerate(self.layers)},
                "own_gate_highest": routed, "routed_tasks": sum(routed.values())}


@torch.no_grad()
def gate_activations(encoder, images_by_task: Mapping[str, torch.Tensor], *, gate_tasks: Sequence[str] | None = None,
                     batch_size: int = 16) -> GateStats:
    """Hook every gated linear of a `MingleEncoder` and average its gates over each task's images.

    Batch 16 as the official capture script; the per-token gate values do not depend on the batch,
    but the inputs of deeper layers do (routing is per batch), so this is part of the recipe.
    """
    layers = list(encoder.selected)
    modules = [encoder.linears[n] for n in layers]
    n_gates = modules[0].num_experts if modules else 0
    eval_tasks = list(images_by_task)
    sums = np.zeros((len(layers), n_gates, len(eval_tasks)))
    counts = np.zeros(len(eval_tasks))
    current = {"task": 0}

    def hook(index):
        def fn(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            sums[index, :, current["task"]] += module.gate_values(x).sum(0).double().cpu().numpy()
            if index == 0:
                counts[current["task"]] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        for k, task in enumerate(eval_tasks):
            current["task"] = k
            images = images_by_task[task].to(modules[0].weight.device) if modules else images_by_task[task]
            for start in range(0, len(images), batch_size):
                encoder(images[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    # Every gated layer sees the same number of tokens per image, so one count serves them all.
    per_layer = sums / np.maximum(counts, 1)[None, None, :]
    names = list(gate_tasks) if gate_tasks is not None else [f"gate {j + 1}" for j in range(n_gates)]
    return GateStats(gate_tasks=names[:n_gates], eval_tasks=eval_tasks, layers=layers, per_layer=per_layer)
