"""What every page shares: the active model source, cached engine objects and URL-backed settings.

Not a page (st.navigation only runs the scripts app.py lists). Everything expensive is cached here,
keyed by content, never by tensors:
- the zoo and the task-vector stack with `st.cache_resource`, keyed by the checkpoint files'
  (path, size, mtime) fingerprint and the tasks tuple;
- reports (accuracy of a merge, sign conflicts, magnitudes) with `st.cache_data`, keyed by that
  same source key plus the hyperparameters.

Settings live in `st.session_state["settings"]` (they survive page switches, unlike widget state)
and in the URL's query params (so a link reopens the same view). Widgets are bound to a setting
with `bind(...)`; each page calls `sync_url(...)` with the settings it shows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from engine.errors import MergeExplorerError

ZOO_ENV = "MERGE_EXPLORER_ZOO"
SETTINGS = "settings"
PAGE_KEY = "page"  # which script is drawing widgets now (see start_page)
START_URL = "start_url"


# --------------------------------------------------------------------------------------------
# settings <-> widgets <-> URL
# --------------------------------------------------------------------------------------------

def start_page(name: str) -> None:
    """First line of every page script: make sure app.py is the router, then name the page.

    Streamlit runs a script in `pages/` *directly* (its legacy multipage mode, no app.py, so no
    sidebar and no model source) until some session has executed app.py's `st.navigation`: on a
    freshly started server whose first visitor opens a shared link such as /merge?k=30, and in
    AppTest after `switch_page`. Then we leave that mode and rerun, which goes through app.py and
    lands on the same page.

    A widget's state belongs to the page that drew it, so each page binds a setting through its
    own widget key; the setting itself (in `settings()`) is what pages share.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False  # what app.py's st.navigation sets
        st.rerun()
    st.session_state[PAGE_KEY] = name


def remember_start_url() -> None:
    """Keep the query params the session was opened with: settings are read from them on first use,
    even on a page reached later (the page shown first rewrites the URL to its own settings)."""
    if START_URL not in st.session_state:
        st.session_state[START_URL] = {k: st.query_params[k] for k in st.query_params}


def settings() -> dict[str, Any]:
    if SETTINGS not in st.session_state:
        st.session_state[SETTINGS] = {}
    return st.session_state[SETTINGS]


def _url_value(raw: str, like: Any) -> Any:
    """Parse a query-param string into the type of `like` (the default value)."""
    if isinstance(like, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(float(raw))
    if isinstance(like, float):
        return float(raw)
    if isinstance(like, (list, tuple)):
        items = [v for v in raw.split(",") if v]
        if like and isinstance(like[0], (int, float)) and not isinstance(like[0], bool):
            items = [type(like[0])(float(v)) for v in items]
        return type(like)(items)
    return raw


def _url_string(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def setting(name: str, default: Any, url_key: str | None = None) -> Any:
    """The current value of a setting: session first, then the URL (first visit), then the default.

    `url_key` is the query-param name (default: `name`; "" = never read from the URL)."""
    store = settings()
    if name not in store:
        key = url_key or name
        value = default
        start = st.session_state.get(START_URL)
        url = start if start is not None else {k: st.query_params[k] for k in st.query_params}
        if url_key != "" and key in url:
            try:
                value = _url_value(url[key], default)
            except (TypeError, ValueError):
                value = default  # a hand-edited link with a bad value: fall back quietly
        store[name] = value
    return store[name]


def bind(widget: Callable[..., Any], name: str, default: Any, *args: Any, url_key: str | None = None,
         valid: Callable[[Any], bool] | None = None, **kwargs: Any) -> Any:
    """Draw `widget(*args, key=..., **kwargs)` initialised from (and written back to) setting `name`."""
    value = setting(name, default, url_key)
    if valid is not None and not valid(value):
        value = default
    wkey = f"w.{st.session_state.get(PAGE_KEY, '')}.{name}"
    if wkey not in st.session_state or (valid is not None and not valid(st.session_state[wkey])):
        st.session_state[wkey] = value
    out = widget(*args, key=wkey, **kwargs)
    settings()[name] = out
    return out


def sync_url(params: dict[str, Any]) -> None:
    """Make the URL hold exactly the source and these settings (None values are left out)."""
    wanted = {k: _url_string(v) for k, v in {**source_url_params(), **params}.items() if v is not None}
    if dict(st.query_params) != wanted:
        st.query_params.from_dict(wanted)


# --------------------------------------------------------------------------------------------
# method hyperparameter widgets, built from Config field metadata
# --------------------------------------------------------------------------------------------

def method_fields(method: Any) -> list[dataclasses.Field]:
    return list(dataclasses.fields(method.Config))


def config_widgets(method: Any, only: tuple[str, ...] | None = None, prefix: str | None = None, *,
                   bounds: dict[str, tuple[float, float]] | None = None, url_ok: bool | None = None,
                   url_prefix: str = "") -> dict[str, Any]:
    """One widget per Config field (slider for numbers, radio/selectbox for choices, toggle for bools).

    Values are stored per method ("ties.lam" and "task-arithmetic.lam" differ: their defaults do);
    the URL uses the bare field name. `bounds` narrows a slider's range for this page (a Config's
    limits are what is valid, not what is useful to slide over); the default is clamped into it.
    `url_ok` says whether bare field names in the opening link are this method's (default: when the
    link's `method` is this one, TIES when it names none); `url_prefix` goes before each field name
    in the URL where two settings groups on one page share field names. Returns {field: value}.
    """
    values: dict[str, Any] = {}
    prefix = prefix or method.name
    start = st.session_state.get(START_URL) or {}
    if url_ok is None:
        url_ok = start.get("method", "ties") == method.name
    for f in method_fields(method):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        label, help_ = meta.get("label") or f.name, meta.get("help")
        default = f.default
        name = f"{prefix}.{f.name}"
        url_key = url_prefix + f.name if url_ok else ""
        if meta.get("choices"):
            choices = list(meta["choices"])
            if len(choices) <= 2:
                values[f.name] = bind(st.radio, name, default, label, choices, url_key=url_key, help=help_,
                                      horizontal=True, valid=lambda v, c=choices: v in c)
            else:
                values[f.name] = bind(st.selectbox, name, default, label, choices, url_key=url_key, help=help_,
                                      valid=lambda v, c=choices: v in c)
        elif isinstance(default, bool):
            values[f.name] = bind(st.toggle, name, default, label, url_key=url_key, help=help_)
        elif isinstance(default, (int, float)):
            lo, hi, step = meta.get("min"), meta.get("max"), meta.get("step")
            if bounds and f.name in bounds:
                lo, hi = bounds[f.name]
            cast = int if isinstance(default, int) else float
            lo = cast(lo if lo is not None else 0)
            hi = cast(hi if hi is not None else max(1, default * 2))
            default = min(max(default, lo), hi)
            values[f.name] = bind(st.slider, name, cast(default), label, min_value=lo, max_value=hi,
                                  step=cast(step) if step else None, url_key=url_key, help=help_,
                                  valid=lambda v, lo=lo, hi=hi: isinstance(v, (int, float)) and lo <= v <= hi)
        else:
            values[f.name] = bind(st.text_input, name, str(default), label, url_key=url_key, help=help_)
    return values


# --------------------------------------------------------------------------------------------
# model source
# --------------------------------------------------------------------------------------------

def default_zoo_dir() -> Path:
    """$MERGE_EXPLORER_ZOO when set (read at every call, not at import), else the demo zoo's place."""
    env = os.environ.get(ZOO_ENV)
    if env:
        return Path(env).expanduser()
    from engine.zoo.manifest import DEFAULT_ZOO_DIR

    return Path(DEFAULT_ZOO_DIR)


def _manifest_path(root: Path) -> Path:
    from engine.zoo.manifest import MANIFEST_NAME

    return Path(root) / MANIFEST_NAME


def source_url_params() -> dict[str, Any]:
    kind = settings().get("source", "zoo")
    if kind == "folder":
        return {"source": "folder", "folder": settings().get("folder") or None}
    return {}


def _fingerprint(paths: list[str]) -> tuple:
    """(path, size, mtime_ns) of every file under the given paths: a cheap content key."""
    out = []
    for p in paths:
        path = Path(p)
        files = sorted(x for x in path.rglob("*") if x.is_file()) if path.is_dir() else [path]
        for f in files:
            try:
                st_ = f.stat()
                out.append((str(f), st_.st_size, st_.st_mtime_ns))
            except OSError:
                out.append((str(f), -1, -1))
    return tuple(out)


def zoo_is_built(root: Path) -> bool:
    return _manifest_path(root).is_file()


@st.cache_resource(show_spinner="Loading the model zoo…", max_entries=4)
def _load_zoo(root: str, fingerprint: tuple) -> Any:
    from engine.zoo.manifest import load_zoo

    return load_zoo(root)


@st.cache_resource(show_spinner="Checking the checkpoint folder…", max_entries=8)
def _discover_folder(path: str, fingerprint: tuple) -> Any:
    from engine.sources import discover_folder

    return discover_folder(path)


@st.cache_resource(show_spinner="Computing task vectors (θ_t − θ_0) for every expert…", max_entries=4)
def _load_stack(base_path: str, expert_paths: tuple[str, ...], tasks: tuple[str, ...], fingerprint: tuple) -> Any:
    from engine.task_vectors import TaskVectorStack

    return TaskVectorStack.from_files(base_path, list(expert_paths), tasks=list(tasks))


@st.cache_resource(show_spinner=False, max_entries=32)
def _subset(source_key: str, tasks: tuple[str, ...], _stack: Any) -> Any:
    return _stack.subset(list(tasks))


@dataclass
class Active:
    """The model source in use, with its loaded task vectors (and zoo, when it is one)."""

    kind: str                 # "zoo" | "folder"
    path: str
    source: Any               # engine.sources.Source
    zoo: Any | None
    stack: Any                # TaskVectorStack over all of the source's tasks
    key: str                  # content key for st.cache_data

    @property
    def tasks(self) -> list[str]:
        return list(self.stack.tasks)

    def subset(self, tasks: list[str]) -> Any:
        return _subset(self.key, tuple(tasks), self.stack)


def _source_for(kind: str, path: str) -> tuple[Any, Any | None, tuple]:
    """(Source, Zoo or None, fingerprint), validated, nothing heavy loaded yet."""
    if kind == "zoo":
        root = Path(path)
        if not zoo_is_built(root):
            raise MergeExplorerError(f"the demo zoo at {root} is not built yet")
        fp = _fingerprint([str(_manifest_path(root))])
        zoo = _load_zoo(str(root), fp)
        from engine.sources import zoo_source

        return zoo_source(zoo), zoo, fp
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MergeExplorerError(f"{folder} is not a folder: give a folder holding a pretrained checkpoint "
                                 "and one checkpoint per fine-tuned expert")
    fp = _fingerprint([str(folder)])
    return _discover_folder(str(folder), fp), None, fp


def load_active(kind: str, path: str) -> Active:
    source, zoo, fp = _source_for(kind, path)
    files = [str(source.base_path), *map(str, source.expert_paths)]
    fp = fp + _fingerprint(files) if kind == "zoo" else fp
    stack = _load_stack(str(source.base_path), tuple(map(str, source.expert_paths)), tuple(source.tasks), fp)
    key = hashlib.sha1(repr((kind, str(path), fp)).encode()).hexdigest()[:16]
    return Active(kind=kind, path=str(path), source=source, zoo=zoo, stack=stack, key=key)


def active() -> Active:
    """The source chosen in the sidebar (app.py), or stop the page with what to do."""
    act = st.session_state.get("active")
    if act is None:
        problem = st.session_state.get("source_problem")
        if problem == "zoo-missing":
            offer_zoo_build()
        else:
            st.info("Choose a model source in the sidebar: the demo zoo or a folder of checkpoints.")
        st.stop()
    return act


# --------------------------------------------------------------------------------------------
# building the demo zoo from the app
# --------------------------------------------------------------------------------------------

_BUILD_LOCK = threading.Lock()


def offer_zoo_build() -> None:
    root = default_zoo_dir()
    st.warning(f"The demo zoo is not built yet (looked in `{root}`).")
    st.markdown("It is a small CLIP-style ViT fine-tuned on a few toy tasks; building it trains the experts "
                "on this machine. Or run `python -m engine zoo build` in a terminal.")
    if st.button("Build the demo zoo", type="primary", key="build_zoo"):
        from engine.zoo.manifest import build_zoo

        bar = st.progress(0.0, text="Starting…")
        if not _BUILD_LOCK.acquire(blocking=False):
            st.info("Another session is building the zoo; reload this page when it is done.")
            st.stop()
        try:
            build_zoo(root, quick=False, progress=lambda f, msg: bar.progress(min(max(float(f), 0.0), 1.0), text=msg))
        except MergeExplorerError as exc:
            st.error(str(exc))
            st.stop()
        finally:
            _BUILD_LOCK.release()
        st.session_state.pop("source_problem", None)
        st.rerun()


# --------------------------------------------------------------------------------------------
# cached engine calls (results as plain dicts)
# --------------------------------------------------------------------------------------------

@st.cache_data(show_spinner="Merging and measuring accuracy on every task…", max_entries=512)
def merge_report(source_key: str, tasks: tuple[str, ...], method_name: str, config_json: str,
                 _active: Active) -> dict[str, Any]:
    """Merge the chosen tasks and evaluate on each one; the AccuracyReport as JSON (accuracies in %)."""
    from engine.evaluate import evaluate
    from engine.methods import get_method

    method = get_method(method_name)
    stack = _active.subset(list(tasks))
    config = method.config(**json.loads(config_json))
    merged = stack.apply(method.merge(stack, config))
    return evaluate(_active.zoo, merged, tasks=list(tasks)).to_json()


@st.cache_data(show_spinner="Evaluating the experts and the pretrained model…", max_entries=8)
def reference_accuracies(source_key: str, _active: Active) -> dict[str, dict[str, float]]:
    """{"individual": {task: %}, "pretrained": {task: %}}: the zoo build's measurements from its
    manifest, evaluated here only where the manifest has none."""
    from engine.evaluate import evaluate_model

    zoo = _active.zoo
    individual, pretrained = {}, {}
    for t in zoo.task_names():
        recorded = zoo.task(t).accuracy
        individual[t] = recorded.get("finetuned")
        pretrained[t] = recorded.get("pretrained")
        if individual[t] is None:
            individual[t] = float(evaluate_model(zoo, t, tasks=[t]).per_task[t])
    missing = [t for t, v in pretrained.items() if v is None]
    if missing:
        pretrained.update(evaluate_model(zoo, "pretrained", tasks=missing).per_task)
    return {"individual": {t: float(v) for t, v in individual.items()},
            "pretrained": {t: float(v) for t, v in pretrained.items()}}


def merged_checkpoint_bytes(active_: Active, tasks: list[str], method_name: str, config: dict[str, Any]) -> bytes:
    """The merged model as safetensors bytes (canonical names), with what made it in the metadata."""
    import safetensors.torch

    from engine.methods import get_method

    method = get_method(method_name)
    stack = active_.subset(tasks)
    merged = stack.apply(method.merge(stack, method.config(**config)))
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in merged.items()}
    metadata = {"merge_explorer": json.dumps({"method": method_name, "config": config, "tasks": tasks,
                                              "source": active_.path})}
    return safetensors.torch.save(tensors, metadata=metadata)


@st.cache_data(show_spinner="Counting sign conflicts…", max_entries=256)
def conflict_report(source_key: str, tasks: tuple[str, ...], k: float, trim: str, _active: Active) -> dict[str, Any]:
    from engine.analysis.conflicts import sign_conflicts

    return sign_conflicts(_active.subset(list(tasks)), k=float(k), trim=trim).to_json()


@st.cache_data(show_spinner="Histogramming the task vector…", max_entries=256)
def magnitude_report(source_key: str, task: str, k: float, trim: str, _active: Active) -> dict[str, Any]:
    from engine.analysis.magnitudes import magnitude_histogram

    return magnitude_histogram(_active.stack, task, k=float(k), trim=trim)


@st.cache_resource(max_entries=16)
def result_store(kind: str) -> OrderedDict:
    """Finished long runs of one kind (sweeps, continual runs), shared by every session so a class
    opening the same link sees them at once. Keys are JSON of everything that made the result."""
    return OrderedDict()


def remember(store: OrderedDict, key: str, value: Any, size: int = 32) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > size:
        store.popitem(last=False)


def task_selector(act: Active, label: str = "Tasks to merge") -> list[str]:
    """Multiselect over the source's tasks (URL key `tasks`); an empty choice falls back to all."""
    all_tasks = act.tasks
    chosen = bind(st.multiselect, "tasks", list(all_tasks), label, all_tasks,
                  valid=lambda v: isinstance(v, list) and bool(v) and all(t in all_tasks for t in v),
                  help="Which fine-tuned experts go into the merge. Fewer tasks usually means less interference.")
    if not chosen:
        st.warning("No task chosen: using all of them.")
        return list(all_tasks)
    return [t for t in all_tasks if t in chosen]  # source order, whatever the click order


def url_tasks(act: Active, tasks: list[str]) -> str | None:
    """`tasks` for the URL: left out when it is every task (shorter links)."""
    return None if list(tasks) == act.tasks else ",".join(tasks)


def what_am_i_looking_at(text: str) -> None:
    st.caption("**What am I looking at?** " + text)


def show_figure(fig: Any, key: str, explanation: str) -> None:
    """A Plotly figure and, under it, its "What am I looking at?" caption: every chart in the app has one."""
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
    what_am_i_looking_at(explanation)


@st.cache_resource(show_spinner="Loading test sets and heads…", max_entries=4)
def continual_source(source_key: str, tasks: tuple[str, ...], _active: Active) -> Any:
    """engine.continual.ZooSource over the chosen tasks (test sets are loaded once and kept)."""
    from engine.continual import ZooSource

    return ZooSource(_active.zoo, tasks=list(tasks))


# --------------------------------------------------------------------------------------------
# RI-adapted experts (Resolving Interference, methods.md §5)
# --------------------------------------------------------------------------------------------

RI_FIELDS = ("alpha", "steps", "aux")
RI_URL_PREFIX = "ri_"
_RI_LOCK = threading.Lock()


class _RIMethod:
    """What config_widgets needs of the RI settings: a name and a Config with field metadata."""

    name = "ri"

    @property
    def Config(self) -> type:  # noqa: N802 (mirrors the method objects' attribute)
        from engine.methods.ri import RIConfig

        return RIConfig


def ri_controls(act: Active) -> tuple[bool, dict[str, Any]]:
    """The "RI-adapted experts" switch and, when on, RI's main settings. Returns (on, settings)."""
    on = bind(st.toggle, "ri", False, "RI-adapted experts", disabled=act.zoo is None,
              help="Resolving Interference: before merging, each expert is trained on unlabeled images to keep "
                   "its own predictions and leave other tasks' heads as the pretrained model had them.")
    if act.zoo is None or not on:
        return False, {}
    # A form: each new setting means adapting every expert again (about a minute), so settings apply
    # together on one click rather than on every slider move.
    with st.expander("RI settings"), st.form(f"ri_form_{st.session_state.get(PAGE_KEY, '')}", border=False):
        values = config_widgets(_RIMethod(), only=RI_FIELDS, prefix="ri", url_ok=True, url_prefix=RI_URL_PREFIX,
                                bounds={"alpha": (0.0, 10.0), "steps": (0, 1000)})
        st.form_submit_button("Apply RI settings",
                              help="Adapts the experts with these settings (about a minute the first time; "
                                   "each setting's adapted experts are kept on disk beside the zoo).")
    return True, values


def ri_url_params(on: bool, values: dict[str, Any]) -> dict[str, Any]:
    return {"ri": 1, **{RI_URL_PREFIX + k: v for k, v in values.items()}} if on else {}


def ri_active(act: Active, values: dict[str, Any]) -> Active:
    """The demo zoo with RI-adapted experts, as a source: read from disk when it was adapted before
    with these settings, else adapted now (about a minute on the demo zoo) with a progress bar.

    One adaptation at a time per server; a second session waits for it and then reuses its result.
    """
    from engine.methods.ri import RIConfig, adapted_zoo_dir, cached_adapted_zoo, ensure_adapted_zoo

    config = RIConfig(**values)
    adapted = cached_adapted_zoo(act.zoo, config)
    if adapted is None:
        if not _RI_LOCK.acquire(blocking=False):
            with st.spinner("Another session is adapting the experts with RI; waiting for it…"):
                _RI_LOCK.acquire()
        try:
            bar = st.progress(0.0, text="Adapting every expert with RI (first time only; kept on disk)…")
            # On the CPU: RI's writing and evaluation of adapted experts has not been run on a GPU yet.
            adapted = ensure_adapted_zoo(act.zoo, config, progress=lambda f, msg: bar.progress(
                min(max(float(f), 0.0), 1.0), text=f"RI: {msg}"))
            bar.empty()
        finally:
            _RI_LOCK.release()
    return load_active("zoo", str(adapted_zoo_dir(act.zoo, config)))


@st.cache_data(show_spinner="Measuring interference ξ against the original experts…", max_entries=256)
def interference_report(source_key: str, reference_key: str, tasks: tuple[str, ...], method_name: str,
                        config_json: str, _active: Active, _reference: Active) -> dict[str, Any]:
    """ξ per task of a merge of `_active`'s experts, measured against `_reference`'s (original) experts."""
    from engine.analysis.interference import measure_interference
    from engine.methods import get_method

    method = get_method(method_name)
    stack = _active.subset(list(tasks))
    merged = stack.apply(method.merge(stack, method.config(**json.loads(config_json))))
    return measure_interference(_reference.zoo, merged, list(tasks)).to_json()
