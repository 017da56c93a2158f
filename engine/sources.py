"""Where the checkpoints come from: the demo zoo, a local folder, or explicit files.

A `Source` names the pretrained checkpoint, the experts and their task names, and (for a zoo) the
evaluation data. The CLI (`--zoo` or `--base/--experts`) and the app's sidebar both resolve to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PRETRAINED_STEMS = ("pretrained", "zeroshot", "base", "theta0")


@dataclass
class Source:
    base_path: Path
    expert_paths: list[Path]
    tasks: list[str]
    zoo: Any = None  # engine.zoo.manifest.Zoo when the source is a zoo (enables accuracy)
    label: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def can_evaluate(self) -> bool:
        return self.zoo is not None

    def select(self, tasks: Sequence[str] | None) -> "Source":
        """The same source restricted to some tasks (in the given order)."""
        if not tasks:
            return self
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise ConfigError(f"unknown task {unknown[0]!r}; this source has: {', '.join(self.tasks)}")
        paths = {t: p for t, p in zip(self.tasks, self.expert_paths)}
        return Source(self.base_path, [paths[t] for t in tasks], list(tasks), self.zoo, self.label, self.extra)


def _task_name(path: Path) -> str:
    name = path.name
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def explicit_source(base: str | Path, experts: Sequence[str | Path], tasks: Sequence[str] | None = None) -> Source:
    """--base FILE --experts FILE...: task names default to the expert file names."""
    base_path = Path(base)
    expert_paths = [Path(p) for p in experts]
    if not expert_paths:
        raise ConfigError("give at least one expert checkpoint (--experts FILE ...)")
    names = list(tasks) if tasks else [_task_name(p) for p in expert_paths]
    if len(set(names)) != len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    return Source(base_path, expert_paths, names, label=str(base_path.parent))


def discover_folder(folder: str | Path) -> Source:
    """A folder holding one pretrained checkpoint (pretrained/zeroshot/base.*) and expert checkpoints.

    HF-style sub-folders (config.json + model.safetensors) count as checkpoints too.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder; give a folder with a pretrained checkpoint and expert checkpoints")
    candidates = sorted(p for p in root.iterdir()
                        if (p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
                        or (p.is_dir() and any((p / f).exists() for f in ("model.safetensors",
                                                                         "model.safetensors.index.json",
                                                                         "pytorch_model.bin"))))
    base = [p for p in candidates if _task_name(p).lower() in PRETRAINED_STEMS]
    if len(base) != 1:
        raise ConfigError(f"{root}: expected exactly one pretrained checkpoint named one of "
                          f"{', '.join(PRETRAINED_STEMS)} (.safetensors/.pt/.bin), found {len(base)}")
    experts = [p for p in candidates if p != base[0]]
    if not experts:
        raise ConfigError(f"{root}: no expert checkpoints next to {base[0].name}")
    return Source(base[0], experts, [_task_name(p) for p in experts], label=str(root))


def zoo_source(zoo) -> Source:
    """The demo zoo (or any zoo with a manifest): experts in manifest order, evaluation enabled."""
    return Source(zoo.pretrained_path, [zoo.expert_path(t) for t in zoo.task_names()], zoo.task_names(), zoo=zoo,
                  label=str(zoo.root))


def resolve_source(*, zoo: str | Path | None = None, base: str | Path | None = None,
                   experts: Sequence[str | Path] | None = None) -> Source:
    """One of --zoo DIR or --base FILE --experts FILE..., never both."""
    if zoo is not None and (base is not None or experts):
        raise ConfigError("give either --zoo DIR or --base FILE --experts FILE ..., not both")
    if zoo is not None:
        from .zoo.manifest import load_zoo

        return zoo_source(load_zoo(zoo))
    if base is None or not experts:
        raise ConfigError("give --zoo DIR, or --base FILE together with --experts FILE [FILE ...]")
    return explicit_source(base, experts)
