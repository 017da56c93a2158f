"""Where the checkpoints come from: a task suite (the demo zoo or a suite file), a local folder, or
explicit files.

A `Source` names the pretrained checkpoint, the experts and their task names, and (for a suite) the
evaluation data: heads and test images. The CLI (`--zoo`, `--suite` or `--base/--experts`) and the
app's sidebar both resolve to one. A plain folder or file list has no test data, so it supports
merging and sign conflicts but not accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .access import Roots, check_allowed
from .errors import ConfigError
from .suite_file import load_suite_file
from .zoo.manifest import load_zoo
from .zoo.suite import ZooSuite

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PRETRAINED_STEMS = ("pretrained", "zeroshot", "base", "theta0")


@dataclass
class Source:
    base_path: Path
    expert_paths: list[Path]
    tasks: list[str]
    suite: Any = None  # engine.tasks.TaskSuite when the source has test data (enables accuracy)
    label: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def can_evaluate(self) -> bool:
        return self.suite is not None

    def select(self, tasks: Sequence[str] | None) -> "Source":
        """The same source restricted to some tasks (in the given order)."""
        if not tasks:
            return self
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise ConfigError(f"unknown task {unknown[0]!r}; this source has: {', '.join(self.tasks)}")
        paths = {t: p for t, p in zip(self.tasks, self.expert_paths)}
        suite = self.suite.select(tasks) if self.suite is not None else None
        return Source(self.base_path, [paths[t] for t in tasks], list(tasks), suite, self.label, self.extra)


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


def discover_folder(folder: str | Path, roots: Roots = None) -> Source:
    """A folder holding one pretrained checkpoint (pretrained/zeroshot/base.*) and expert checkpoints.

    HF-style sub-folders (config.json + model.safetensors) count as checkpoints too. With `roots`,
    the folder and every checkpoint in it must lie under one of them (engine.access).
    """
    check_allowed(folder, roots, "folder")
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
    for checkpoint in [base[0], *experts]:  # a symlink inside the folder may point anywhere
        check_allowed(checkpoint, roots, "checkpoint")
    return Source(base[0], experts, [_task_name(p) for p in experts], label=str(root))


def suite_source(suite) -> Source:
    """A task suite (demo zoo or suite file): its experts in suite order, evaluation enabled."""
    return Source(suite.pretrained_path, suite.expert_paths(), suite.task_names(), suite=suite, label=suite.label)


def zoo_source(zoo) -> Source:
    """The demo zoo (or any zoo with a manifest) as a Source."""
    return suite_source(zoo if isinstance(zoo, ZooSuite) else ZooSuite.of(zoo))


def load_task_suite(*, zoo: str | Path | None = None, suite: str | Path | None = None, limit: int | None = None,
                    roots: Roots = None):
    """The TaskSuite of --zoo DIR or --suite FILE (exactly one); `roots` restricts what a suite may name."""
    if (zoo is None) == (suite is None):
        raise ConfigError("give either --zoo DIR or --suite FILE")
    if suite is not None:
        return load_suite_file(suite, limit=limit, roots=roots)
    if limit is None:
        return ZooSuite.load(zoo)
    loaded = ZooSuite(load_zoo(zoo))  # its own instance: the shared one keeps full test sets
    loaded.default_limit = None if limit <= 0 else limit
    return loaded


def resolve_source(*, zoo: str | Path | None = None, suite: str | Path | None = None,
                   base: str | Path | None = None, experts: Sequence[str | Path] | None = None,
                   limit: int | None = None, roots: Roots = None) -> Source:
    """One of --zoo DIR, --suite FILE, or --base FILE --experts FILE..."""
    given = [name for name, value in (("--zoo", zoo), ("--suite", suite), ("--base/--experts", base or experts))
             if value]
    if len(given) > 1:
        raise ConfigError(f"give one of --zoo DIR, --suite FILE or --base FILE --experts FILE ..., not {' and '.join(given)}")
    if zoo is not None or suite is not None:
        return suite_source(load_task_suite(zoo=zoo, suite=suite, limit=limit, roots=roots))
    if base is None or not experts:
        raise ConfigError("give --zoo DIR, --suite FILE, or --base FILE together with --experts FILE [FILE ...]")
    return explicit_source(base, experts)
