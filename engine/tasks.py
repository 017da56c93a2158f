"""Task suites: what merges are evaluated on.

A suite knows its tasks and, for each task, its class names, its test images (in batches, with an
optional seeded, class-stratified `limit`), its classification head (unit rows, at the suite's
logit scale), its expert checkpoint and the expert's own accuracy (for normalised accuracy,
measured once and cached). It also knows the pretrained checkpoint and how to build the vision
encoder that a (canonical) state dict is loaded into.

Two implementations share this base class:

- `engine.zoo.suite.ZooSuite`: the demo zoo (its manifest, heads file and stored test tensors);
- `engine.suite_file.ClipSuite`: a suite file over real CLIP checkpoints, test images on disk and
  zero-shot heads built from class names (docs/suites.md).

Every consumer (evaluation, sweeps, interference, RI, continual merging, the app) takes a suite;
methods and analyses never see where the checkpoints or images come from.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import canonical_to_open_clip, open_checkpoint
from .errors import CheckpointError, ConfigError
from .evaluate import accuracy_only
from .image_data import TestSplit

StateDict = dict[str, torch.Tensor]
Progress = Callable[[float, str], None]


def read_canonical(path: str | Path) -> StateDict:
    """Every tensor of a checkpoint under canonical names (engine.checkpoints), read once."""
    reader = open_checkpoint(path)
    return {name: reader.tensor(name) for name in reader.keys()}


def vision_tower(kwargs: Mapping[str, Any]) -> nn.Module:
    """An open_clip VisionTransformer from its constructor kwargs (random weights, eval mode)."""
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(**dict(kwargs)).eval()


def load_canonical(encoder: nn.Module, canonical: Mapping[str, torch.Tensor], label: str = "weights") -> None:
    """Copy canonical weights into an open_clip vision tower in place (strict; dtypes follow the tower)."""
    tensors = canonical_to_open_clip(dict(canonical))
    own = encoder.state_dict()
    try:
        encoder.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()}, strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{label}: does not fit the model architecture ({detail}); use checkpoints "
                              "fine-tuned from this suite's pretrained model") from None


class TaskSuite:
    """The shared part of every suite: caches, canonical weights, encoders and head functions.

    Subclasses set `kind`, `label`, `tasks`, `logit_scale`, `default_limit`, `pretrained_path`
    and implement the methods marked "subclass".
    """

    kind: str = ""
    label: str = ""
    tasks: list[str]
    logit_scale: float = 100.0
    default_limit: int | None = None

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._heads: dict[str, torch.Tensor] | None = None
        self._splits: dict[tuple[str, int | None], TestSplit] = {}
        self._theta0: StateDict | None = None
        self._open_clip_theta0: StateDict | None = None
        self._expert_accuracy: dict[tuple[str, int | None], float] = {}

    # ---- subclass ---------------------------------------------------------------------------
    @property
    def pretrained_path(self) -> Path:
        raise NotImplementedError

    def expert_path(self, task: str) -> Path:
        raise NotImplementedError

    def classes(self, task: str) -> list[str]:
        raise NotImplementedError

    def description(self, task: str) -> str:
        return ""

    def new_encoder(self) -> nn.Module:
        """A vision encoder with this suite's architecture (random weights, eval mode)."""
        raise NotImplementedError

    def identity(self) -> Any:
        """JSON-able identity of everything that determines results (files, settings); keys caches."""
        raise NotImplementedError

    def _read_heads(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _read_split(self, task: str, limit: int | None, progress: Progress | None) -> TestSplit:
        raise NotImplementedError

    def _stored_expert_accuracy(self, task: str, limit: int | None) -> float | None:
        """An expert accuracy recorded with the suite itself (the zoo's manifest), else None."""
        return None

    def _remember_expert_accuracy(self, task: str, limit: int | None, value: float) -> None:
        """Keep a measured expert accuracy beyond this process (CLIP suites: the cache folder)."""

    def _copy_with(self, tasks: list[str], expert_paths: Mapping[str, Path], label: str) -> "TaskSuite":
        raise NotImplementedError

    # ---- tasks ------------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; {self.label} has: {', '.join(self.tasks)}")

    def num_classes(self, task: str) -> int:
        return len(self.classes(task))

    def expert_paths(self) -> list[Path]:
        return [self.expert_path(t) for t in self.tasks]

    def select(self, tasks: Sequence[str] | None) -> "TaskSuite":
        """The suite restricted to some tasks (in the given order); caches are not shared."""
        if not tasks or list(tasks) == self.tasks:
            return self
        for t in tasks:
            self.check_task(t)
        return self._copy_with(list(tasks), {t: self.expert_path(t) for t in tasks}, self.label)

    def with_experts(self, expert_paths: Mapping[str, Path], label: str) -> "TaskSuite":
        """The same tasks, data and heads with other expert checkpoints (e.g. RI-adapted experts).

        Normalised accuracy keeps dividing by the ORIGINAL experts' accuracy, so a merge of adapted
        experts stays comparable with one of the originals (docs/methods.md, RI).
        """
        for t in expert_paths:
            self.check_task(t)
        suite = self._copy_with(list(self.tasks), {t: Path(expert_paths.get(t, self.expert_path(t)))
                                                   for t in self.tasks}, label)
        suite._reference = self  # type: ignore[attr-defined]
        return suite

    @property
    def reference(self) -> "TaskSuite":
        """The suite whose experts define normalised accuracy (itself unless made by `with_experts`)."""
        return getattr(self, "_reference", self)

    @property
    def cache_key(self) -> tuple:
        return (self.kind, json.dumps(self.identity(), sort_keys=True, default=str))

    # ---- heads ------------------------------------------------------------------------------
    def heads(self) -> dict[str, torch.Tensor]:
        """{task: [classes, D]} unit-norm rows on the CPU (built or read once, used as stored)."""
        with self._lock:
            if self._heads is None:
                self._heads = {t: h.float() for t, h in self._read_heads().items()}
            return {t: self._heads[t] for t in self.tasks}

    def head(self, task: str) -> torch.Tensor:
        self.check_task(task)
        return self.heads()[task]

    def logits_fn(self, task: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """features (N, D) -> logits (N, C) = logit_scale * <normalize(features), normalize(head rows)>."""
        weights, scale = F.normalize(self.head(task), dim=-1), float(self.logit_scale)
        return lambda features: scale * F.normalize(features.float(), dim=-1) @ weights.to(features.device).T

    # ---- test data --------------------------------------------------------------------------
    def resolve_limit(self, limit: int | None) -> int | None:
        """`limit` if given (0 or below = the full test set), else the suite's default."""
        if limit is None:
            return self.default_limit
        return None if limit <= 0 else int(limit)

    def test_split(self, task: str, limit: int | None = None, progress: Progress | None = None) -> TestSplit:
        """Task `task`'s test images and labels under `limit` (cached on the CPU; do not modify)."""
        self.check_task(task)
        limit = self.resolve_limit(limit)
        key = (task, limit)
        with self._lock:
            if key not in self._splits:
                self._splits[key] = self._read_split(task, limit, progress)
            return self._splits[key]

    def model_input(self, images) -> torch.Tensor:
        """uint8 images [N, H, W, 3] at the suite's input size -> model-ready float [N, 3, H, W]."""
        raise NotImplementedError

    def test_set(self, task: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(model-ready float [N, 3, H, W], int64 labels [N]): the whole split at once."""
        split = self.test_split(task, limit)
        return split.tensor(), split.labels

    # ---- weights ----------------------------------------------------------------------------
    def theta0(self) -> StateDict:
        """θ_0 under canonical names (float tensors as stored)."""
        with self._lock:
            if self._theta0 is None:
                self._theta0 = read_canonical(self.pretrained_path)
            return dict(self._theta0)

    def complete(self, canonical: Mapping[str, torch.Tensor]) -> StateDict:
        """`canonical` with every tensor it lacks taken from θ_0 (experts saved without the projection,
        merges that cover only the tensors every expert has)."""
        theta0 = self.theta0()
        extra = sorted(set(canonical) - set(theta0))
        if extra:
            raise CheckpointError(f"tensor '{extra[0]}' is not part of {self.label}'s pretrained model")
        return {name: canonical.get(name, tensor) for name, tensor in theta0.items()}

    def theta(self, task: str) -> StateDict:
        """Expert θ_t under canonical names, completed from θ_0."""
        self.check_task(task)
        return self.complete(read_canonical(self.expert_path(task)))

    def resolve_weights(self, weights: Any) -> StateDict:
        """Canonical state dict from a mapping, "pretrained", a task name (its expert) or a checkpoint path."""
        if isinstance(weights, Mapping):
            return self.complete(weights)
        name = str(weights)
        if name == "pretrained":
            return self.theta0()
        if name in self.tasks:
            return self.theta(name)
        path = Path(name).expanduser()
        if path.exists():
            return self.complete(read_canonical(path))
        raise ConfigError(f"unknown model {name!r}: use pretrained, a task of {self.label} "
                          f"({', '.join(self.tasks)}) or a checkpoint file")

    def load_weights(self, encoder: nn.Module, canonical: Mapping[str, torch.Tensor], label: str = "weights") -> None:
        """Copy a canonical state dict (completed from θ_0) into an encoder built by `new_encoder` (strict)."""
        load_canonical(encoder, self.complete(canonical), label)

    def build_encoder(self, canonical: Mapping[str, torch.Tensor]) -> nn.Module:
        """A fresh encoder holding `canonical`, eval mode, no gradients."""
        encoder = self.new_encoder()
        self.load_weights(encoder, canonical)
        encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        return encoder

    # ---- accuracy of the experts ------------------------------------------------------------
    def expert_accuracy(self, task: str, limit: int | None = None, device: str | torch.device = "auto"
                        ) -> float | None:
        """The ORIGINAL expert's own accuracy (%) on its task under `limit`: the normalisation reference."""
        reference = self.reference
        if reference is not self:
            return reference.expert_accuracy(task, limit, device)
        self.check_task(task)
        limit = self.resolve_limit(limit)
        key = (task, limit)
        with self._lock:
            if key in self._expert_accuracy:
                return self._expert_accuracy[key]
        stored = self._stored_expert_accuracy(task, limit)
        if stored is None:
            stored = self._measure_expert_accuracy(task, limit, device)
            self._remember_expert_accuracy(task, limit, stored)
        if stored is not None:
            with self._lock:
                self._expert_accuracy[key] = float(stored)
        return stored

    def _measure_expert_accuracy(self, task: str, limit: int | None, device) -> float | None:
        return accuracy_only(self, task, [task], device=device, limit=limit)[task]
