"""Widgets generated from method Configs, and the task selector.

A Config field declared with `engine.methods.base.param` carries what a widget needs: label,
one-line help, bounds (and whether the lower bound itself is excluded), step, choices and how each
choice reads. So a method's valid range is stated once, in its Config, and every slider follows it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import streamlit as st

from .state import START_URL, bind


def _number_range(meta: dict, default: float, bounds: tuple[float, float] | None, cast: type) -> tuple:
    lo, hi, step = meta.get("min"), meta.get("max"), meta.get("step")
    if bounds is not None:
        lo, hi = bounds
    lo = cast(lo if lo is not None else 0)
    hi = cast(hi if hi is not None else max(1, default * 2))
    step = cast(step) if step else None
    if meta.get("above_min") and bounds is None:
        lo = lo + (step or (1 if cast is int else 0.01))  # the bound itself is not a valid value
    return lo, hi, step


def config_widgets(config_cls: type, prefix: str, only: Sequence[str] | None = None, *,
                   bounds: dict[str, tuple[float, float]] | None = None, url_ok: bool | None = None,
                   url_prefix: str = "", owner: str | None = None) -> dict[str, Any]:
    """One widget per Config field (slider for numbers, radio/selectbox for choices, toggle for bools).

    Values are stored per `prefix` ("ties.lam" and "task-arithmetic.lam" differ: their defaults do);
    the URL uses the bare field name. `bounds` narrows a slider's range for this page (a Config's
    limits are what is valid, not what is useful to slide over); the default is clamped into it.
    `url_ok` says whether bare field names in the opening link are meant for these widgets (default:
    when the link's `method` is `owner`, or names none and `owner` is TIES); `url_prefix` goes before
    each field name in the URL where two groups on one page share field names. Returns {field: value}.
    """
    values: dict[str, Any] = {}
    start = st.session_state.get(START_URL) or {}
    if url_ok is None:
        url_ok = start.get("method", "ties") == (owner or prefix)
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        meta = dict(f.metadata)
        if not meta.get("ui", True) and only is None:
            continue
        label, help_ = meta.get("label") or f.name, meta.get("help")
        default = f.default
        name = f"{prefix}.{f.name}"
        url_key = url_prefix + f.name if url_ok else ""
        if meta.get("choices"):
            choices = list(meta["choices"])
            shown = meta.get("choice_labels") or {}
            fmt = lambda v, shown=shown: shown.get(v, v)  # noqa: E731
            widget = st.radio if len(choices) <= 2 else st.selectbox
            extra = {"horizontal": True} if widget is st.radio else {}
            values[f.name] = bind(widget, name, default, label, choices, url_key=url_key, help=help_,
                                  format_func=fmt, valid=lambda v, c=choices: v in c, **extra)
        elif isinstance(default, bool):
            values[f.name] = bind(st.toggle, name, default, label, url_key=url_key, help=help_)
        elif isinstance(default, (int, float)):
            cast = int if isinstance(default, int) else float
            lo, hi, step = _number_range(meta, default, (bounds or {}).get(f.name), cast)
            default = min(max(cast(default), lo), hi)
            values[f.name] = bind(st.slider, name, default, label, min_value=lo, max_value=hi, step=step,
                                  url_key=url_key, help=help_,
                                  valid=lambda v, lo=lo, hi=hi: isinstance(v, (int, float)) and lo <= v <= hi)
        else:
            values[f.name] = bind(st.text_input, name, str(default), label, url_key=url_key, help=help_)
    return values


def method_widgets(method, **kwargs) -> dict[str, Any]:
    """`config_widgets` for a registry method's one-shot Config (settings stored under its name)."""
    return config_widgets(method.Config, method.name, owner=method.name, **kwargs)


def stored_config(method) -> dict[str, Any]:
    """A method's settings as last set on any page (Merge), else its defaults."""
    from .state import settings

    return {f.name: settings().get(f"{method.name}.{f.name}", f.default) for f in dataclasses.fields(method.Config)}


def task_selector(all_tasks: list[str], label: str = "Tasks to merge") -> list[str]:
    """Multiselect over the source's tasks (URL key `tasks`); an empty choice falls back to all."""
    chosen = bind(st.multiselect, "tasks", list(all_tasks), label, all_tasks,
                  valid=lambda v: isinstance(v, list) and bool(v) and all(t in all_tasks for t in v),
                  help="Which fine-tuned experts go into the merge. Fewer tasks usually means less interference.")
    if not chosen:
        st.warning("No task chosen: using all of them.")
        return list(all_tasks)
    return [t for t in all_tasks if t in chosen]  # source order, whatever the click order


def url_tasks(all_tasks: list[str], tasks: list[str]) -> str | None:
    """`tasks` for the URL: left out when it is every task (shorter links)."""
    return None if list(tasks) == list(all_tasks) else ",".join(tasks)
