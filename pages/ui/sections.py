"""Sections several pages draw: figures with their explanation, and the RI-adapted-experts switch."""
from __future__ import annotations

import hashlib
import threading
from typing import Any

import streamlit as st

from .sources import Active
from .state import PAGE_KEY, bind
from .widgets import config_widgets


def what_am_i_looking_at(text: str) -> None:
    st.caption("**What am I looking at?** " + text)


def show_figure(fig: Any, key: str, explanation: str) -> None:
    """A Plotly figure and, under it, its "What am I looking at?" caption: every chart in the app has one."""
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
    what_am_i_looking_at(explanation)


def budget_caption(act: Active, n_images: dict[str, int] | None = None) -> None:
    """Which image budget the numbers on this page were measured with (suites only; the demo zoo always
    uses its full test sets). `n_images` (task -> images used) says how many each task actually had."""
    if act.suite is None or act.kind == "zoo":
        return
    used = ""
    if n_images:
        counts = sorted(set(n_images.values()))
        used = (f"{counts[0]} test images per task" if len(counts) == 1 else
                f"{min(counts)}–{max(counts)} test images per task") + ", "
    st.caption(f"Accuracies measured on {used}{act.budget_text()} of {act.label} (sidebar: Images per task).")


# --------------------------------------------------------------------------------------------
# RI-adapted experts (Resolving Interference, docs/methods.md)
# --------------------------------------------------------------------------------------------

RI_FIELDS = ("alpha", "steps", "aux")
RI_URL_PREFIX = "ri_"
_RI_LOCK = threading.Lock()


def ri_controls(act: Active) -> tuple[bool, dict[str, Any]]:
    """The "RI-adapted experts" switch and, when on, RI's main settings. Returns (on, settings)."""
    from engine.methods.ri import RIConfig

    on = bind(st.toggle, "ri", False, "RI-adapted experts", disabled=not act.can_evaluate,
              help="Resolving Interference: before merging, each expert is trained on unlabeled images to keep "
                   "its own predictions and leave other tasks' heads as the pretrained model had them.")
    if not act.can_evaluate or not on:
        return False, {}
    # A form: each new setting means adapting every expert again (about a minute on the demo zoo),
    # so settings apply together on one click rather than on every slider move.
    with st.expander("RI settings"), st.form(f"ri_form_{st.session_state.get(PAGE_KEY, '')}", border=False):
        bounds = {"alpha": (0.0, 10.0), "steps": (0, 1000)}
        values = config_widgets(RIConfig, "ri", only=RI_FIELDS, url_ok=True, url_prefix=RI_URL_PREFIX, bounds=bounds)
        st.form_submit_button("Apply RI settings",
                              help="Adapts the experts with these settings (about a minute on the demo zoo the "
                                   "first time; each setting's adapted experts are kept in the cache folder).")
    return True, values


def ri_url_params(on: bool, values: dict[str, Any]) -> dict[str, Any]:
    return {"ri": 1, **{RI_URL_PREFIX + k: v for k, v in values.items()}} if on else {}


@st.cache_resource(show_spinner=False, max_entries=8)
def _adapted_stack(key: str, _suite) -> Any:
    from engine.task_vectors import TaskVectorStack

    return TaskVectorStack.from_suite(_suite)


def ri_active(act: Active, values: dict[str, Any]) -> Active:
    """The source with RI-adapted experts: read from the cache folder when adapted before with these
    settings, else adapted now with a progress bar. One adaptation at a time per server; a second
    session waits for it and then reuses its result."""
    from engine.adapted import cached_adapted, ensure_adapted
    from engine.methods.ri import RIConfig
    from engine.sources import suite_source

    config = RIConfig(**values)
    adapted = cached_adapted(act.suite, config)
    if adapted is None:
        if not _RI_LOCK.acquire(blocking=False):
            with st.spinner("Another session is adapting the experts with RI; waiting for it…"):
                _RI_LOCK.acquire()
        try:
            bar = st.progress(0.0, text="Adapting every expert with RI (first time only; kept in the cache)…")
            adapted = ensure_adapted(act.suite, config, progress=lambda f, msg: bar.progress(
                min(max(float(f), 0.0), 1.0), text=f"RI: {msg}"))
            bar.empty()
        finally:
            _RI_LOCK.release()
    key = hashlib.sha1(f"{act.key}|ri|{sorted(values.items())}".encode()).hexdigest()[:16]
    return Active(kind=act.kind, path=act.path, label=f"{act.label} (RI-adapted experts)",
                  source=suite_source(adapted), suite=adapted, stack=_adapted_stack(key, adapted), key=key,
                  limit=act.limit)
