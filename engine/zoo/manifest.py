"""The demo zoo on disk: where it lives, what `zoo.json` says, and how to read it back.

A zoo folder holds (paths relative to the folder, all named in `zoo.json`):

    zoo.json                      the manifest (this module's `Zoo`)
    pretrained.safetensors        theta_0: open_clip VisionTransformer state dict, keys `visual.*`
    experts/<task>.safetensors    theta_t, same format, fine-tuned on one task with its head frozen
    heads.safetensors             one frozen zero-shot head per task: <task> -> [classes, output_dim],
                                  rows L2-normalised; logits = logit_scale * <normalize(f(x)), row>
    data/<task>.test.safetensors  held-out test split: `images` uint8 [N, H, W, 3], `labels` int64 [N]
    data/pool.safetensors         unlabeled pretraining-pool images: `images` uint8 [N, H, W, 3]
    examples/<task>.png           example grid for the UI: one row per class (class order), test images

Checkpoints are in the same format real ones are (docs/checkpoints.md, open_clip), so the zoo goes through the
same loader (`engine.checkpoints`) as any downloaded model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from ..errors import MergeExplorerError

MANIFEST_NAME = "zoo.json"
FORMAT = "merge-explorer-zoo"
FORMAT_VERSION = 1
ZOO_ENV = "MERGE_EXPLORER_ZOO"
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_zoo_dir() -> Path:
    """`$MERGE_EXPLORER_ZOO` when set, else `<repo>/.zoo/demo` (git-ignored)."""
    env = os.environ.get(ZOO_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".zoo" / "demo"



@dataclass
class ZooTask:
    name: str
    description: str
    classes: list[str]
    n_train: int
    n_test: int
    expert_file: str  # relative to the zoo root
    examples_file: str  # relative PNG: one row per class, `examples_per_class` test images per row
    accuracy: dict[str, float] = field(default_factory=dict)  # {"pretrained", "finetuned", "averaging", ...}: pct
    test_file: str = ""
    examples_per_class: int = 8

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "classes": list(self.classes),
                "n_train": self.n_train, "n_test": self.n_test, "expert_file": self.expert_file,
                "test_file": self.test_file, "examples_file": self.examples_file,
                "examples_per_class": self.examples_per_class, "accuracy": dict(self.accuracy)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ZooTask":
        return cls(name=data["name"], description=data["description"], classes=list(data["classes"]),
                   n_train=int(data["n_train"]), n_test=int(data["n_test"]), expert_file=data["expert_file"],
                   examples_file=data["examples_file"], accuracy=dict(data.get("accuracy", {})),
                   test_file=data.get("test_file", f"data/{data['name']}.test.safetensors"),
                   examples_per_class=int(data.get("examples_per_class", 8)))


@dataclass
class Zoo:
    """A loaded manifest. Paths are absolute; accuracies are percentages (0-100).

    `accuracies[task]` holds that task's row of the build's table: the pretrained model ("pretrained",
    zero-shot), its own fine-tuned expert ("finetuned", the normalisation reference), and the merges
    the build measured ("averaging", "task_arithmetic", "ties"). `table` holds the same per method,
    with averages and normalised accuracies; `merges` the configs that made those rows.
    """

    root: Path
    tasks: list[ZooTask]
    pretrained_path: Path
    model_config: dict[str, Any]  # {"library", "class", "kwargs": VisionTransformer(**kwargs), "preprocess", ...}
    recipe_version: str
    seed: int
    accuracies: dict[str, dict[str, float]] = field(default_factory=dict)
    quick: bool = False
    logit_scale: float = 100.0
    heads_file: str = "heads.safetensors"
    pool_file: str = "data/pool.safetensors"
    table: dict[str, dict[str, Any]] = field(default_factory=dict)
    merges: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)  # the raw zoo.json

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> ZooTask:
        for t in self.tasks:
            if t.name == name:
                return t
        raise MergeExplorerError(f"the zoo at {self.root} has no task {name!r}; its tasks: "
                                 f"{', '.join(self.task_names())}")

    def expert_path(self, task: str) -> Path:
        return self.root / self.task(task).expert_file

    def test_path(self, task: str) -> Path:
        return self.root / self.task(task).test_file

    def examples_path(self, task: str) -> Path:
        return self.root / self.task(task).examples_file

    @property
    def heads_path(self) -> Path:
        return self.root / self.heads_file

    @property
    def pool_path(self) -> Path:
        return self.root / self.pool_file

    @property
    def image_size(self) -> int:
        return int(self.model_config["kwargs"]["image_size"])

    @property
    def cache_key(self) -> tuple:
        """Identifies this build's data: caches of test tensors and heads are keyed on it."""
        return (str(self.root.resolve()), self.recipe_version, self.seed, self.quick,
                self.manifest.get("content_sha256", {}).get(self.heads_file, ""))

    def finetuned_accuracy(self, task: str) -> float | None:
        return self.task(task).accuracy.get("finetuned")

    def test_split(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """The raw test split: (uint8 [N, H, W, 3], int64 labels [N])."""
        data = load_file(str(self.test_path(task)))
        return data["images"], data["labels"]

    def pool_images(self) -> np.ndarray:
        """The unlabeled pretraining-pool images, uint8 [N, H, W, 3]."""
        return load_file(str(self.pool_path))["images"]


def load_pretraining_pool(zoo: Zoo | str | Path) -> np.ndarray:
    """The zoo's unlabeled pretraining pool as uint8 [N, H, W, 3] (for auxiliary-data methods)."""
    zoo = zoo if isinstance(zoo, Zoo) else load_zoo(zoo)
    return zoo.pool_images()


def _missing(root: Path) -> MergeExplorerError:
    command = "python -m engine zoo build" + (f" --dir {root}" if root != default_zoo_dir() else "")
    return MergeExplorerError(f"no demo zoo at {root}: run `{command}`")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The raw `zoo.json` of `root`; MergeExplorerError if missing or unreadable."""
    root = Path(root).expanduser()
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise _missing(root)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeExplorerError(f"{path}: unreadable zoo manifest ({exc}); rebuild it with "
                                 f"`python -m engine zoo build --force`") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MergeExplorerError(f"{path}: not a Merge Explorer zoo manifest; rebuild it with "
                                 f"`python -m engine zoo build --force`")
    return data


def zoo_from_manifest(root: Path, data: dict[str, Any]) -> Zoo:
    try:
        tasks = [ZooTask.from_json(t) for t in data["tasks"]]
        per_task = {t.name: dict(t.accuracy) for t in tasks}
        return Zoo(root=root, tasks=tasks, pretrained_path=root / data["files"]["pretrained"],
                   model_config=dict(data["model"]), recipe_version=str(data["recipe_version"]),
                   seed=int(data["seed"]), accuracies=per_task, quick=bool(data.get("quick", False)),
                   logit_scale=float(data["model"].get("logit_scale", 100.0)),
                   heads_file=data["files"]["heads"], pool_file=data["files"]["pool"],
                   table=dict(data.get("table", {})), merges=dict(data.get("merges", {})), manifest=data)
    except (KeyError, TypeError, ValueError) as exc:
        raise MergeExplorerError(f"{root / MANIFEST_NAME}: malformed zoo manifest (missing {exc}); rebuild it with "
                                 f"`python -m engine zoo build --force`") from exc


def load_zoo(root: str | Path | None = None) -> Zoo:
    """Read the zoo at `root` (default `default_zoo_dir()`), checking that every file it names exists."""
    root = Path(root).expanduser() if root is not None else default_zoo_dir()
    zoo = zoo_from_manifest(root, read_manifest(root))
    files = [zoo.pretrained_path, zoo.heads_path, zoo.pool_path]
    for t in zoo.tasks:
        files += [zoo.expert_path(t.name), zoo.test_path(t.name)]
    for path in files:
        if not path.is_file():
            raise MergeExplorerError(f"the zoo at {root} is incomplete ({path.relative_to(root)} is missing): "
                                     f"rebuild it with `python -m engine zoo build --force`")
    return zoo
