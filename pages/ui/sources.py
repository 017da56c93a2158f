"""The model source every page works on: the demo zoo, a suite file, or a checkpoint folder.

The sidebar (app.py calls `sidebar()`) picks one; `sections.active()` gives pages the loaded source. A suite
(the demo zoo or a suite file) has heads and test images, so every page works on it; a plain
checkpoint folder supports merging and sign conflicts only. Loading is cached by content
(paths with sizes and modification times), never by tensors.

A source that cannot be used is reported in the main area, where the eye is; pages then keep
showing the previous source, under a banner that names it, or nothing when there was none.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from engine.access import allowed_roots, check_allowed
from engine.errors import MergeExplorerError
from engine.sources import Source, discover_folder, suite_source
from engine.suite_file import load_suite_file
from engine.task_vectors import TaskVectorStack
from engine.tasks import TaskSuite
from engine.zoo.manifest import MANIFEST_NAME, default_zoo_dir

from .state import DEFAULT_LIMIT, bind, settings

KINDS = {"zoo": "Demo zoo", "suite": "Suite file", "folder": "Checkpoint folder"}
ACTIVE = "active"
PROBLEM = "source_problem"


def zoo_is_built(root: Path) -> bool:
    return (Path(root) / MANIFEST_NAME).is_file()


def _fingerprint(paths: list[str]) -> tuple:
    """(path, size, mtime_ns) of every file under the given paths: a cheap content key."""
    out = []
    for p in paths:
        path = Path(p)
        files = sorted(x for x in path.rglob("*") if x.is_file()) if path.is_dir() else [path]
        for f in files:
            try:
                stat = f.stat()
                out.append((str(f), stat.st_size, stat.st_mtime_ns))
            except OSError:
                out.append((str(f), -1, -1))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class Active:
    """The model source in use, with its task vectors loaded."""

    kind: str                   # "zoo" | "suite" | "folder"
    path: str
    label: str                  # how pages name it
    source: Source
    suite: TaskSuite | None     # None for a plain checkpoint folder (no test data)
    stack: TaskVectorStack      # over all of the source's tasks
    key: str                    # content key for result caches
    limit: int | None = None    # images per task for evaluations (None = the suite's full test sets)

    @property
    def tasks(self) -> list[str]:
        return list(self.stack.tasks)

    @property
    def can_evaluate(self) -> bool:
        return self.suite is not None

    def subset(self, tasks: list[str]) -> TaskVectorStack:
        return _subset(self.key, tuple(tasks), self.stack)

    def budget_text(self) -> str:
        """Which image budget the accuracies are measured with, for labels."""
        if self.suite is None:
            return ""
        if self.limit is None:
            return "the full test sets"
        return f"at most {self.limit} per task (a seeded subset that keeps each class's share)"


@st.cache_resource(show_spinner="Loading the demo zoo…", max_entries=4)
def _load_zoo_suite(root: str, fingerprint: tuple) -> TaskSuite:
    from engine.zoo.suite import ZooSuite

    return ZooSuite.load(root)


@st.cache_resource(show_spinner="Checking the suite file, its checkpoints and test data…", max_entries=8)
def _load_suite_file(path: str, fingerprint: tuple, roots: tuple[Path, ...]) -> TaskSuite:
    return load_suite_file(path, roots=list(roots))


@st.cache_resource(show_spinner="Checking the checkpoint folder…", max_entries=8)
def _discover_folder(path: str, fingerprint: tuple, roots: tuple[Path, ...]) -> Source:
    return discover_folder(path, roots=list(roots))


@st.cache_resource(show_spinner="Computing task vectors (θ_t − θ_0) for every expert…", max_entries=4)
def _load_stack(base_path: str, expert_paths: tuple[str, ...], tasks: tuple[str, ...],
                fingerprint: tuple) -> TaskVectorStack:
    return TaskVectorStack.from_files(base_path, list(expert_paths), tasks=list(tasks))


@st.cache_resource(show_spinner=False, max_entries=32)
def _subset(source_key: str, tasks: tuple[str, ...], _stack: TaskVectorStack) -> TaskVectorStack:
    return _stack.subset(list(tasks))


def load_active(kind: str, path: str, limit: int | None = None) -> Active:
    """Load (cached) the source `kind` at `path`; MergeExplorerError with one line if it cannot be used."""
    if kind == "zoo":
        root = Path(path)
        if not zoo_is_built(root):
            raise MergeExplorerError(f"the demo zoo at {root} is not built yet")
        fp = _fingerprint([str(root / MANIFEST_NAME)])
        suite = _load_zoo_suite(str(root), fp)
        source, label = suite_source(suite), "the demo zoo"
    elif kind == "suite":
        roots = tuple(allowed_roots())
        check_allowed(path, roots, "suite file")  # before anything is read, even its existence
        file = Path(path).expanduser()
        if not file.is_file():
            raise MergeExplorerError(f"{file}: no such suite file")
        fp = _fingerprint([str(file)])
        suite = _load_suite_file(str(file), fp, roots)
        source, label = suite_source(suite), f"the suite {file.name}"
    elif kind == "folder":
        roots = tuple(allowed_roots())
        check_allowed(path, roots, "folder")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise MergeExplorerError(f"{folder} is not a folder: give a folder holding a pretrained checkpoint "
                                     "and one checkpoint per fine-tuned expert")
        fp = _fingerprint([str(folder)])
        suite, source, label, limit = None, _discover_folder(str(folder), fp, roots), f"the folder {folder.name}", None
    else:
        raise MergeExplorerError(f"unknown source kind {kind!r}")
    files = [str(source.base_path), *map(str, source.expert_paths)]
    fp = fp + _fingerprint(files)
    stack = _load_stack(str(source.base_path), tuple(map(str, source.expert_paths)), tuple(source.tasks), fp)
    key = hashlib.sha1(repr((kind, str(path), fp, limit)).encode()).hexdigest()[:16]
    return Active(kind=kind, path=str(path), label=label, source=source, suite=suite, stack=stack, key=key,
                  limit=limit)


# --------------------------------------------------------------------------------------------
# The sidebar and what pages call
# --------------------------------------------------------------------------------------------


def sidebar() -> None:
    """Source choice and loading (drawn by app.py on every page)."""
    kind = bind(st.radio, "source", "zoo", "Model source", list(KINDS), url_key="source", format_func=KINDS.get,
                valid=lambda v: v in KINDS,
                help="The demo zoo is a small ViT fine-tuned on toy tasks; a suite file names your own CLIP "
                     "checkpoints with test images; a checkpoint folder holds checkpoints only (no accuracy).")
    limit: int | None = None
    if kind == "suite":
        path = bind(st.text_input, "suite", "", "Suite file", url_key="suite", placeholder="/path/to/suite.toml",
                    help="A TOML file naming a pretrained CLIP, one expert per task and each task's test images "
                         "(see docs/suites.md).").strip()
        limit = _limit_control()
    elif kind == "folder":
        path = bind(st.text_input, "folder", "", "Checkpoint folder", url_key="folder",
                    placeholder="/path/to/checkpoints",
                    help="A folder with the pretrained model (e.g. pretrained.safetensors) and one file or "
                         "sub-folder per fine-tuned expert; the file names become the task names.").strip()
        st.caption("A folder has no test images, so only Merge (download) and Interference work; for accuracy "
                   "describe the same checkpoints with a suite file.")
    else:
        path = str(default_zoo_dir())
        limit = _limit_control()

    st.session_state.pop(PROBLEM, None)
    if kind != "zoo" and not path:
        st.session_state[PROBLEM] = {"kind": kind, "path": "", "message": f"type the path of a {KINDS[kind].lower()}"}
        return
    try:
        act = load_active(kind, path, limit)
    except MergeExplorerError as exc:
        if kind == "zoo" and not zoo_is_built(default_zoo_dir()):
            st.session_state[PROBLEM] = {"kind": "zoo-missing", "path": path, "message": str(exc)}
            st.session_state[ACTIVE] = None
            st.warning("The demo zoo is not built yet: build it on any page.")
        else:
            st.session_state[PROBLEM] = {"kind": kind, "path": path, "message": str(exc)}
            st.error("This source cannot be used (details on the page).", icon=":material/error:")
        return
    st.session_state[ACTIVE] = act
    st.success(f"{len(act.tasks)} experts from {act.label}", icon=":material/check_circle:")


def _limit_control() -> int | None:
    """Images per task for a source with test images: a fast default for live sliders (a merge and its
    evaluation in a few tenths of a second on a CPU: benchmarks/slider_latency.py), 0 = full test sets."""
    value = bind(st.number_input, "limit", DEFAULT_LIMIT, "Images per task", url_key="limit", min_value=0,
                 max_value=1_000_000, step=50, valid=lambda v: isinstance(v, int) and v >= 0,
                 help="How many test images of each task every accuracy is measured on (a seeded subset that keeps "
                      "each class's share); fewer is faster. 0 = the full test sets.")
    if st.button("Use the full test sets", key="full_test_sets", disabled=value == 0,
                 help="Measure on every test image (slower; numbers comparable with papers)."):
        settings()["limit"] = 0
        st.session_state.pop("w.sidebar.limit", None)
        st.rerun()
    return None if value == 0 else int(value)
