"""Per-task accuracy of a vision tower on the demo zoo's tasks, and normalised accuracy.

A model is evaluated the CLIP way (methods.md §6.4): logits = logit_scale * <normalize(f(x)), h_c>
with the task's frozen head rows h_c (unit vectors) and logit_scale = 100. Normalised accuracy is
the merged model's accuracy divided by the task's own fine-tuned expert's (from the manifest),
per task, as in the TIES and MINGLE papers.

Evaluation must be fast enough for a slider (a merge, then all tasks, well under a second on a
laptop CPU), so everything but the weights is cached per zoo build and device: the constructed
VisionTransformer, the heads and the preprocessed test tensors. A call is then one
`load_state_dict` and one batched forward pass per task.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .device import resolve_device
from .errors import CheckpointError, MergeExplorerError

# open_clip's preprocessing constants for OpenAI CLIP (open_clip.constants.OPENAI_DATASET_MEAN/STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_BATCH = 1000  # one fixed batch size, so every caller gets bit-identical logits


@dataclass
class AccuracyReport:
    """Accuracies in percent; normalised accuracies as ratios (1.0 = as good as the expert)."""

    per_task: dict[str, float]
    average: float
    normalized: dict[str, float]
    normalized_average: float

    def to_json(self) -> dict[str, Any]:
        return {"per_task": {t: round(v, 4) for t, v in self.per_task.items()},
                "average": round(self.average, 4),
                "normalized": {t: round(v, 6) for t, v in self.normalized.items()},
                "normalized_average": round(self.normalized_average, 6) if self.normalized else None}


# --------------------------------------------------------------------------------------------
# Building blocks (also used by the zoo build, MINGLE, RI and interference analysis)
# --------------------------------------------------------------------------------------------


def new_encoder(model_config: Mapping[str, Any]) -> torch.nn.Module:
    """An open_clip VisionTransformer built from a zoo manifest's `model` entry (weights random)."""
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(**dict(model_config["kwargs"]))


def zoo_encoder(zoo) -> torch.nn.Module:
    """A fresh VisionTransformer with the zoo's architecture, in eval mode (load weights yourself)."""
    return new_encoder(zoo.model_config).eval()


def _preprocess_config(zoo_or_config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config = getattr(zoo_or_config, "model_config", zoo_or_config) or {}
    pre = config.get("preprocess", {}) if isinstance(config, Mapping) else {}
    return tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD))


def preprocess(zoo, images) -> torch.Tensor:
    """uint8 images [N, H, W, 3] (numpy or torch) -> float [N, 3, H, W], CLIP-normalised.

    `zoo` may be a Zoo or its `model_config` (anything with the manifest's "preprocess" entry).
    Float input is taken as already preprocessed and returned as is.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.is_floating_point():
        return x
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise MergeExplorerError(f"images must be uint8 [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    mean, std = _preprocess_config(zoo)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _read_heads(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: tensor.float() for name, tensor in load_file(str(path)).items()}


def zoo_heads(zoo) -> dict[str, torch.Tensor]:
    """Every task's frozen head, {task: [classes, output_dim]} with unit rows (CPU, cached)."""
    return dict(_state(zoo, torch.device("cpu")).heads)


def load_test_set(zoo, task: str, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Task `task`'s held-out test split, model-ready: (float [N, 3, H, W] preprocessed, int64 labels [N]).

    Cached per zoo build and device; do not modify the returned tensors in place.
    """
    zoo.task(task)  # a one-line error for unknown tasks
    state = _state(zoo, resolve_device(str(device)))
    return state.test_set(zoo, task)


# --------------------------------------------------------------------------------------------
# The cache: one per (zoo build, device)
# --------------------------------------------------------------------------------------------


class _ZooState:
    def __init__(self, zoo, device: torch.device) -> None:
        self.device = device
        self.lock = threading.Lock()  # one model object: calls from app threads take turns
        self.model = zoo_encoder(zoo).to(device)
        self.heads = {t: h.to(device) for t, h in _read_heads(zoo.heads_path).items()}
        self.logit_scale = float(getattr(zoo, "logit_scale", 100.0))
        self.tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def test_set(self, zoo, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        if task not in self.tests:
            images, labels = zoo.test_split(task)
            self.tests[task] = (preprocess(zoo, images).to(self.device), torch.as_tensor(labels).long().to(self.device))
        return self.tests[task]


_STATES: OrderedDict[tuple, _ZooState] = OrderedDict()
_STATES_LOCK = threading.Lock()
_MAX_STATES = 4


def _state(zoo, device: torch.device) -> _ZooState:
    key = (*zoo.cache_key, str(device))
    with _STATES_LOCK:
        state = _STATES.get(key)
        if state is None:
            state = _ZooState(zoo, device)
            _STATES[key] = state
            while len(_STATES) > _MAX_STATES:
                _STATES.popitem(last=False)
        _STATES.move_to_end(key)
        return state


def clear_cache() -> None:
    with _STATES_LOCK:
        _STATES.clear()


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _read_canonical(path: Path) -> dict[str, torch.Tensor]:
    from .checkpoints import open_checkpoint

    reader = open_checkpoint(path)
    return {name: reader.tensor(name) for name in reader.keys()}


def resolve_weights(zoo, weights) -> dict[str, torch.Tensor]:
    """Canonical state dict from: a canonical mapping, "pretrained", a task name, or a checkpoint path."""
    if isinstance(weights, Mapping):
        return dict(weights)
    name = str(weights)
    if name == "pretrained":
        return _read_canonical(zoo.pretrained_path)
    if name in zoo.task_names():
        return _read_canonical(zoo.expert_path(name))
    path = Path(name).expanduser()
    if path.exists():
        return _read_canonical(path)
    raise MergeExplorerError(f"unknown model {name!r}: use pretrained, a task of the zoo "
                             f"({', '.join(zoo.task_names())}) or a checkpoint file")


def _load_into(state: _ZooState, canonical: Mapping[str, torch.Tensor], label: str) -> None:
    from .checkpoints import canonical_to_open_clip

    tensors = canonical_to_open_clip({k: v for k, v in canonical.items()})
    try:
        state.model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{label}: does not fit the zoo's model architecture ({detail}); "
                              f"evaluate checkpoints fine-tuned from this zoo's pretrained model") from None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _logits(state: _ZooState, task: str, images: torch.Tensor) -> torch.Tensor:
    head = state.heads[task]
    out = []
    for start in range(0, len(images), EVAL_BATCH):
        features = state.model(images[start:start + EVAL_BATCH])
        out.append(state.logit_scale * F.normalize(features, dim=-1) @ head.T)
    return torch.cat(out) if out else torch.empty(0, head.shape[0], device=state.device)


def predict_logits(zoo, weights, task: str, images, device: str | torch.device = "auto") -> torch.Tensor:
    """Logits [N, classes] (at the zoo's logit scale, 100) of `weights` under task `task`'s head.

    `weights`: canonical state dict, "pretrained", a task name or a checkpoint path; `images`: uint8
    [N, H, W, 3] or preprocessed float [N, 3, H, W]. Returned on the evaluation device, no grad.
    """
    zoo.task(task)
    state = _state(zoo, resolve_device(str(device)))
    canonical = resolve_weights(zoo, weights)
    x = preprocess(zoo, images).to(state.device)
    with state.lock, torch.inference_mode():
        _load_into(state, canonical, str(weights) if not isinstance(weights, Mapping) else "merged weights")
        return _logits(state, task, x).clone()


def evaluate(zoo, weights, tasks: Sequence[str] | None = None, device: str | torch.device = "auto") -> AccuracyReport:
    """Top-1 accuracy (%) of `weights` on each task's test split, and normalised accuracy.

    `weights`: a canonical state dict (e.g. `TaskVectorStack.apply(...)`), "pretrained", a task name,
    or a checkpoint path. Normalised accuracy divides by the task's fine-tuned accuracy from the
    manifest (missing while the zoo is being built: then `normalized` is empty).
    """
    tasks = list(tasks) if tasks is not None else zoo.task_names()
    if not tasks:
        raise MergeExplorerError("evaluate at least one task")
    for t in tasks:
        zoo.task(t)
    state = _state(zoo, resolve_device(str(device)))
    canonical = resolve_weights(zoo, weights)
    per_task: dict[str, float] = {}
    with state.lock, torch.inference_mode():
        state.model.eval()
        _load_into(state, canonical, str(weights) if not isinstance(weights, Mapping) else "merged weights")
        for task in tasks:
            images, labels = state.test_set(zoo, task)
            correct = (_logits(state, task, images).argmax(dim=1) == labels).sum().item()
            per_task[task] = 100.0 * correct / len(labels)
    normalized = {}
    for task in tasks:
        reference = zoo.task(task).accuracy.get("finetuned")
        if reference:
            normalized[task] = per_task[task] / float(reference)
    return AccuracyReport(per_task=per_task, average=float(np.mean(list(per_task.values()))),
                          normalized=normalized,
                          normalized_average=float(np.mean(list(normalized.values()))) if normalized else float("nan"))


def evaluate_model(zoo, name: str | Path, tasks: Sequence[str] | None = None,
                   device: str | torch.device = "auto") -> AccuracyReport:
    """`evaluate` for "pretrained", a task's expert (by task name), or a checkpoint file."""
    return evaluate(zoo, resolve_weights(zoo, name), tasks=tasks, device=device)
