"""Built-in zero-shot metadata for the eight standard CLIP merging tasks (the TA8 set used by
Task Arithmetic, TIES-Merging and FusionBench): for each task, the class names that go into the
text prompts, the prompt templates, a few other names people use for the task, and a note on where
the facts come from. The class list is in the dataset's own integer label order, and that order
matters: the text embedding built from classes[i] is the zero-shot head's row for label i, so a list
in any other order (even with the right names) silently scores the wrong class. The data lives in
data/builtin_tasks.json next to this file and is read once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_PATH = Path(__file__).resolve().parent / "data" / "builtin_tasks.json"
FORMAT = "merge-explorer-builtin-tasks"

# TA8 order, as the papers list the tasks.
_CANONICAL_ORDER = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    aliases: tuple[str, ...]
    source: str


def _key(name: str) -> str:
    """Lookup key: case-folded, surrounding space dropped, '-' and '_' ignored."""
    return name.strip().casefold().replace("-", "").replace("_", "")


@cache
def _load() -> tuple[dict[str, BuiltinTask], dict[str, str]]:
    doc = json.loads(DATA_PATH.read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{DATA_PATH} is not a {FORMAT} file")
    tasks: dict[str, BuiltinTask] = {}
    index: dict[str, str] = {}
    for name, entry in doc["tasks"].items():
        task = BuiltinTask(
            name=name,
            classes=tuple(entry["classes"]),
            templates=tuple(entry["templates"]),
            aliases=tuple(entry.get("aliases", ())),
            source=entry.get("source", ""),
        )
        tasks[name] = task
        for alias in (name, *task.aliases):
            other = index.setdefault(_key(alias), name)
            if other != name:
                raise ValueError(f"name {alias!r} is claimed by both {other!r} and {name!r}")
    return tasks, index


def builtin_task_names() -> list[str]:
    """The eight canonical task names, in TA8 order."""
    tasks, _ = _load()
    return [n for n in _CANONICAL_ORDER if n in tasks] + [n for n in tasks if n not in _CANONICAL_ORDER]


def find_builtin_task(name: str) -> BuiltinTask | None:
    """The task called `name` (canonical name or alias; case, '-' and '_' do not matter), else None."""
    if not isinstance(name, str) or not name.strip():
        return None
    tasks, index = _load()
    canonical = index.get(_key(name))
    return tasks[canonical] if canonical is not None else None
