"""The demo zoo as a task suite: its manifest names the checkpoints, heads and stored test tensors.

Test images are stored as uint8 [N, 32, 32, 3] and turned into model-ready float tensors once
(÷255, CLIP mean/std), exactly as the build measured them, so the zoo's numbers do not move.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import MergeExplorerError
from ..image_data import TestSplit, stratified_subset
from ..tasks import TaskSuite, vision_tower
from .manifest import Zoo, load_zoo

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(model_config: Mapping[str, Any], images) -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch) -> float [N, 3, H, W], CLIP-normalised with the manifest's
    constants. Float input is taken as already preprocessed and returned as is."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.is_floating_point():
        return x
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise MergeExplorerError(f"images must be uint8 [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    pre = dict(model_config.get("preprocess", {}))
    mean, std = tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD))
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class ZooSuite(TaskSuite):
    """A demo zoo (any folder with a `zoo.json`) behind the TaskSuite interface."""

    kind = "zoo"

    _instances: dict[tuple, "ZooSuite"] = {}
    _instances_lock = threading.Lock()

    def __init__(self, zoo: Zoo, tasks: list[str] | None = None,
                 expert_paths: Mapping[str, Path] | None = None, label: str | None = None) -> None:
        super().__init__()
        self.zoo = zoo
        self.tasks = list(tasks) if tasks is not None else zoo.task_names()
        self._experts = {t: Path(expert_paths[t]) if expert_paths and t in expert_paths else zoo.expert_path(t)
                         for t in self.tasks}
        self.label = label or f"the demo zoo at {zoo.root}"
        self.logit_scale = float(zoo.logit_scale)
        self.default_limit = None

    @classmethod
    def of(cls, zoo: Zoo) -> "ZooSuite":
        """One shared suite per zoo build, so its caches serve every caller."""
        key = zoo.cache_key
        with cls._instances_lock:
            suite = cls._instances.get(key)
            if suite is None:
                suite = cls._instances[key] = cls(zoo)
            return suite

    @classmethod
    def load(cls, root: str | Path | None = None) -> "ZooSuite":
        return cls.of(load_zoo(root))

    # ---- TaskSuite --------------------------------------------------------------------------
    @property
    def pretrained_path(self) -> Path:
        return self.zoo.pretrained_path

    def expert_path(self, task: str) -> Path:
        self.check_task(task)
        return self._experts[task]

    def classes(self, task: str) -> list[str]:
        return list(self.zoo.task(task).classes)

    def description(self, task: str) -> str:
        return self.zoo.task(task).description

    @property
    def image_size(self) -> int:
        return self.zoo.image_size

    def new_encoder(self) -> nn.Module:
        return vision_tower(self.zoo.model_config["kwargs"])

    def identity(self) -> Any:
        return {"zoo": list(self.zoo.cache_key), "tasks": self.tasks,
                "experts": {t: str(p) for t, p in self._experts.items()}}

    def _read_heads(self) -> dict[str, torch.Tensor]:
        return {name: tensor.float() for name, tensor in load_file(str(self.zoo.heads_path)).items()}

    def _read_split(self, task: str, limit: int | None, progress) -> TestSplit:
        images, labels = self.zoo.test_split(task)
        keep = stratified_subset(labels, limit)
        x = preprocess_images(self.zoo.model_config, images[keep])
        return TestSplit(x, torch.as_tensor(labels[keep]).long())

    def _stored_expert_accuracy(self, task: str, limit: int | None) -> float | None:
        if limit is not None and limit < self.zoo.task(task).n_test:
            return None  # measured on the full split only
        return self.zoo.finetuned_accuracy(task)

    @property
    def reference(self) -> TaskSuite:
        """For a zoo written by `ri --out`: the source zoo whose experts were adapted (when it still
        exists), so normalised accuracy and ξ refer to the original experts."""
        explicit = getattr(self, "_reference", None)
        if explicit is not None:
            return explicit
        record = self.zoo.manifest.get("ri") or {}
        source = Path(record["source_zoo"]) if record.get("source_zoo") else None
        if source is not None and (source / "zoo.json").is_file() and source.resolve() != self.zoo.root.resolve():
            return ZooSuite.load(source)
        return self

    def _copy_with(self, tasks, expert_paths, label) -> "ZooSuite":
        return ZooSuite(self.zoo, tasks, expert_paths, label)

    # ---- zoo only ---------------------------------------------------------------------------
    def pool_images(self) -> np.ndarray:
        """The unlabeled pretraining-pool images, uint8 [N, H, W, 3] (RI's default auxiliary data)."""
        return self.zoo.pool_images()

    def model_input(self, images) -> torch.Tensor:
        return preprocess_images(self.zoo.model_config, images)
