"""Engine calls the pages make, cached and shown with progress.

Results are plain dicts (JSON-able) kept in a server-wide store per kind, keyed by everything that
made them (the source's content key, tasks, method, settings, image budget), so every session that
asks for the same view gets it at once. A result that is not there yet is computed with a
progress bar in the page.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Callable

import streamlit as st

from engine.methods import get_method

from .sources import Active

Progress = Callable[[float, str], None]


@st.cache_resource(max_entries=16)
def result_store(kind: str) -> OrderedDict:
    """Finished results of one kind, shared by every session (a class opening the same link sees
    them at once). Keys are JSON of everything that made the result."""
    return OrderedDict()


def remember(store: OrderedDict, key: str, value: Any, size: int = 256) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > size:
        store.popitem(last=False)


def key_of(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def with_progress(kind: str, key: str, compute: Callable[[Progress], Any], text: str, size: int = 256) -> Any:
    """The stored result for `key`, else `compute(progress)` under a progress bar, then stored."""
    store = result_store(kind)
    if key in store:
        store.move_to_end(key)
        return store[key]
    bar = st.progress(0.0, text=text)
    try:
        value = compute(lambda f, msg: bar.progress(min(max(float(f), 0.0), 1.0), text=f"{text} {msg}"))
    finally:
        bar.empty()
    remember(store, key, value, size)
    return value


# --------------------------------------------------------------------------------------------
# Merges and their accuracy
# --------------------------------------------------------------------------------------------


def merge_report(act: Active, tasks: list[str], method_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Merge the chosen tasks and evaluate on each one: the AccuracyReport as JSON (accuracies in %)."""
    from engine.evaluate import evaluate

    def compute(progress: Progress) -> dict[str, Any]:
        method = get_method(method_name)
        stack = act.subset(tasks)
        merged = stack.apply(method.merge(stack, method.config(**config)))
        return evaluate(act.suite, merged, tasks=tasks, limit=act.limit, progress=progress).to_json()

    return with_progress("merge", key_of(act.key, tasks, method_name, config), compute,
                         "Merging and measuring accuracy on every task…")


def reference_accuracies(act: Active) -> dict[str, dict[str, float]]:
    """{"individual": {task: %}, "pretrained": {task: %}} under the source's image budget."""
    from engine.evaluate import evaluate

    def compute(progress: Progress) -> dict[str, dict[str, float]]:
        suite = act.suite
        individual = {}
        for i, t in enumerate(act.tasks):
            progress(i / (len(act.tasks) + 1), f"expert {t}")
            individual[t] = float(suite.expert_accuracy(t, act.limit))
        pretrained = evaluate(suite, "pretrained", limit=act.limit).per_task
        return {"individual": individual, "pretrained": {t: float(v) for t, v in pretrained.items()}}

    return with_progress("reference", key_of(act.key), compute, "Measuring the experts and the pretrained model…")


def merged_checkpoint_bytes(act: Active, tasks: list[str], method_name: str, config: dict[str, Any]) -> bytes:
    """The merged model as safetensors bytes with the same provenance `merge --out` writes."""
    from engine.merged import merged_bytes

    method = get_method(method_name)
    return merged_bytes(act.subset(tasks), method, method.config(**config))


def interference_report(act: Active, tasks: list[str], method_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """ξ per task of a merge of `act`'s experts, against the original experts (RI-adapted: their originals)."""
    from engine.analysis.interference import measure_interference

    def compute(progress: Progress) -> dict[str, Any]:
        method = get_method(method_name)
        stack = act.subset(tasks)
        merged = stack.apply(method.merge(stack, method.config(**config)))
        return measure_interference(act.suite, merged, tasks, limit=act.limit, progress=progress).to_json()

    return with_progress("interference", key_of(act.key, tasks, method_name, config), compute,
                         "Measuring interference ξ against the original experts…")


# --------------------------------------------------------------------------------------------
# Sign conflicts and magnitudes (any source)
# --------------------------------------------------------------------------------------------


@st.cache_data(show_spinner="Counting sign conflicts…", max_entries=256)
def conflict_report(source_key: str, tasks: tuple[str, ...], k: float, trim: str, _active: Active) -> dict[str, Any]:
    from engine.analysis.conflicts import sign_conflicts

    return sign_conflicts(_active.subset(list(tasks)), k=float(k), trim=trim).to_json()


@st.cache_data(show_spinner="Histogramming the task vector…", max_entries=256)
def magnitude_report(source_key: str, task: str, k: float, trim: str, _active: Active) -> dict[str, Any]:
    from engine.analysis.magnitudes import magnitude_histogram

    return magnitude_histogram(_active.stack, task, k=float(k), trim=trim)
