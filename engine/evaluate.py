"""Per-task accuracy of a vision tower on a task suite's tasks, and normalised accuracy.

A model is evaluated the CLIP way (docs/methods.md, heads): logits = logit_scale ·
⟨normalize(f(x)), h_c⟩ with the task's frozen head rows h_c (unit vectors). Normalised accuracy is
the model's accuracy divided by the task's own fine-tuned expert's under the same image budget,
per task, as in the TIES and MINGLE papers.

Evaluation must be fast enough for a slider, so everything but the weights is cached per suite and
device: the encoder module, the heads and the test images. A call is then one `load_state_dict`
and one batched forward pass per task. On CUDA, CLIP suites run under fp16 autocast with
channels-last inputs; the demo zoo always runs in float32 with one fixed batch size, so its numbers
are bit-identical on every call.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .device import resolve_device
from .errors import MergeExplorerError
from .image_data import TestSplit

# open_clip's preprocessing constants for OpenAI CLIP (open_clip.constants.OPENAI_DATASET_MEAN/STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ZOO_EVAL_BATCH = 1000  # the demo zoo: one fixed batch size, so every caller gets bit-identical logits
CLIP_EVAL_BATCH = 256

Progress = Callable[[float, str], None]


@dataclass
class AccuracyReport:
    """Accuracies in percent; normalised accuracies as ratios (1.0 = as good as the expert).

    `n_images[task]` is how many test images each number was measured on; `limit` the per-task
    budget asked for (None = full test sets).
    """

    per_task: dict[str, float]
    average: float
    normalized: dict[str, float]
    normalized_average: float
    n_images: dict[str, int] = field(default_factory=dict)
    limit: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"per_task": {t: round(v, 4) for t, v in self.per_task.items()},
                "average": round(self.average, 4),
                "normalized": {t: round(v, 6) for t, v in self.normalized.items()},
                "normalized_average": round(self.normalized_average, 6) if self.normalized else None,
                "n_images": dict(self.n_images), "limit": self.limit}


def as_suite(source: Any):
    """The TaskSuite itself, or the one a `Source` carries (a demo-zoo `Zoo` is wrapped by the caller:
    `engine.zoo.suite.ZooSuite.of(zoo)`)."""
    for candidate in (source, getattr(source, "suite", None)):
        if candidate is not None and hasattr(candidate, "test_split") and hasattr(candidate, "heads"):
            return candidate
    raise MergeExplorerError(f"cannot evaluate on {type(source).__name__}: give a task suite (the demo zoo's is "
                             "engine.zoo.suite.ZooSuite.of(zoo))")


# --------------------------------------------------------------------------------------------
# Per (suite, device): one encoder, heads and test splits on the device
# --------------------------------------------------------------------------------------------


class _DeviceState:
    def __init__(self, suite, device: torch.device) -> None:
        self.device = device
        self.lock = threading.Lock()  # one encoder object: calls from app threads take turns
        self.model = suite.new_encoder().to(device).eval()
        self.fast = suite.kind != "zoo" and device.type == "cuda"
        if self.fast:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.heads = {t: h.to(device) for t, h in suite.heads().items()}
        self.logit_scale = float(suite.logit_scale)
        self.batch_size = ZOO_EVAL_BATCH if suite.kind == "zoo" else CLIP_EVAL_BATCH
        self.splits: dict[tuple[str, int | None], TestSplit] = {}

    def split(self, suite, task: str, limit: int | None, progress: Progress | None = None) -> TestSplit:
        key = (task, suite.resolve_limit(limit))
        if key not in self.splits:
            self.splits[key] = suite.test_split(task, limit, progress).to(self.device)
        return self.splits[key]


_STATES: OrderedDict[tuple, _DeviceState] = OrderedDict()
_STATES_LOCK = threading.Lock()
_MAX_STATES = 4


def _state(suite, device: torch.device) -> _DeviceState:
    key = (*suite.cache_key, str(device))
    with _STATES_LOCK:
        state = _STATES.get(key)
        if state is None:
            state = _DeviceState(suite, device)
            _STATES[key] = state
            while len(_STATES) > _MAX_STATES:
                _STATES.popitem(last=False)
        _STATES.move_to_end(key)
        return state


def clear_cache() -> None:
    with _STATES_LOCK:
        _STATES.clear()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _autocast(state: _DeviceState):
    return torch.autocast("cuda", dtype=torch.float16) if state.fast else nullcontext()


def _features(state: _DeviceState, images: torch.Tensor) -> torch.Tensor:
    if state.fast:
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(state):
        return state.model(images).float()


def _logits(state: _DeviceState, task: str, features: torch.Tensor) -> torch.Tensor:
    return state.logit_scale * F.normalize(features, dim=-1) @ state.heads[task].T


def _correct(state: _DeviceState, task: str, split: TestSplit) -> int:
    correct = 0
    for images, labels in split.batches(state.batch_size):
        correct += int((_logits(state, task, _features(state, images)).argmax(dim=1) == labels).sum())
    return correct


def _load(state: _DeviceState, suite, canonical: Mapping[str, torch.Tensor], label: str) -> None:
    suite.load_weights(state.model, canonical, label)


def accuracy_only(suite, weights: Any, tasks: Sequence[str], *, device: str | torch.device = "auto",
                  limit: int | None = None, progress: Progress | None = None) -> dict[str, float]:
    """{task: top-1 accuracy %} of `weights` (anything `TaskSuite.resolve_weights` takes), no normalisation."""
    suite = as_suite(suite)
    for t in tasks:
        suite.check_task(t)
    state = _state(suite, resolve_device(str(device)))
    canonical = suite.resolve_weights(weights)
    label = str(weights) if not isinstance(weights, Mapping) else "merged weights"
    splits = {}
    for i, task in enumerate(tasks):  # decoding (first call only) happens outside the model lock
        if progress is not None:
            progress(i / max(1, len(tasks)), f"loading test images of {task}")
        splits[task] = state.split(suite, task, limit)
    per_task: dict[str, float] = {}
    with state.lock, torch.inference_mode():
        _load(state, suite, canonical, label)
        for i, task in enumerate(tasks):
            if progress is not None:
                progress(i / max(1, len(tasks)), f"evaluating {task} ({len(splits[task])} images)")
            per_task[task] = 100.0 * _correct(state, task, splits[task]) / max(1, len(splits[task]))
    if progress is not None:
        progress(1.0, "evaluated")
    return per_task


def evaluate(suite, weights, tasks: Sequence[str] | None = None, device: str | torch.device = "auto",
             limit: int | None = None, progress: Progress | None = None) -> AccuracyReport:
    """Top-1 accuracy (%) of `weights` on each task's test images, and normalised accuracy.

    `suite`: a TaskSuite; `weights`: a canonical state dict (e.g.
    `TaskVectorStack.apply(...)`), "pretrained", a task name or a checkpoint path. `limit` caps the
    images per task (seeded, class-stratified; None = the suite's default). Normalised accuracy
    divides by each task's expert accuracy under the same budget (missing while the demo zoo is
    being built: then `normalized` is empty).
    """
    suite = as_suite(suite)
    tasks = list(tasks) if tasks is not None else suite.task_names()
    if not tasks:
        raise MergeExplorerError("evaluate at least one task")
    per_task = accuracy_only(suite, weights, tasks, device=device, limit=limit, progress=progress)
    normalized = {}
    for task in tasks:
        reference = suite.expert_accuracy(task, limit, device)
        if reference:
            normalized[task] = per_task[task] / float(reference)
    state = _state(suite, resolve_device(str(device)))
    n_images = {t: len(state.split(suite, t, limit)) for t in tasks}
    return AccuracyReport(per_task=per_task, average=float(np.mean(list(per_task.values()))),
                          normalized=normalized,
                          normalized_average=float(np.mean(list(normalized.values()))) if normalized else float("nan"),
                          n_images=n_images, limit=suite.resolve_limit(limit))


def evaluate_model(suite, name, tasks: Sequence[str] | None = None, device: str | torch.device = "auto",
                   limit: int | None = None) -> AccuracyReport:
    """`evaluate` for "pretrained", a task's expert (by task name), or a checkpoint file."""
    return evaluate(suite, str(name), tasks=tasks, device=device, limit=limit)


def predict_logits(suite, weights, task: str, images: torch.Tensor, device: str | torch.device = "auto"
                   ) -> torch.Tensor:
    """Logits [N, classes] of `weights` under task `task`'s head for model-ready float images."""
    suite = as_suite(suite)
    suite.check_task(task)
    state = _state(suite, resolve_device(str(device)))
    canonical = suite.resolve_weights(weights)
    x = images.to(state.device)
    with state.lock, torch.inference_mode():
        _load(state, suite, canonical, str(weights) if not isinstance(weights, Mapping) else "merged weights")
        out = [_logits(state, task, _features(state, x[i:i + state.batch_size]))
               for i in range(0, len(x), state.batch_size)]
        return torch.cat(out).clone() if out else torch.empty(0, state.heads[task].shape[0], device=state.device)
