"""Sections several pages draw: figures with their explanation, and the RI-adapted-experts switch."""
from __future__ import annotations

import hashlib
from typing import Any

import streamlit as st

from engine.errors import MergeExplorerError
from engine.figures import fit_for_screen

from . import calls, presenter
from .sources import ACTIVE, KINDS, PROBLEM, Active, default_zoo_dir
from .state import PAGE_KEY, bind
from .widgets import config_widgets


def what_am_i_looking_at(text: str) -> None:
    st.caption("**What am I looking at?** " + text)


def show_figure(fig: Any, key: str, explanation: str, *, half: bool = False) -> None:
    """A Plotly figure and, under it, its "What am I looking at?" caption: every chart in the app has one.
    `half`: the chart sits in one of two columns, so its title wraps sooner (in presenter mode the
    columns stack and it gets the whole width)."""
    projector = presenter.is_on()
    title_chars = 28 if half and not projector else 70
    st.plotly_chart(fit_for_screen(fig, projector=projector, title_chars=title_chars), key=key,
                    config={"displaylogo": False})
    what_am_i_looking_at(explanation)


def budget_caption(act: Active, n_images: dict[str, int] | None = None) -> None:
    """Which image budget the numbers on this page were measured with. `n_images` (task -> images
    used) says how many each task actually had."""
    if act.suite is None:
        return
    used = ""
    if n_images:
        counts = sorted(set(n_images.values()))
        used = (f"{counts[0]} test images per task" if len(counts) == 1 else
                f"{min(counts)}–{max(counts)} test images per task") + ", "
    st.caption(f"Accuracies measured on {used}{act.budget_text()} of {act.label} (sidebar: Images per task).")


# --------------------------------------------------------------------------------------------
# The source a page works on
# --------------------------------------------------------------------------------------------


def active(*, needs_evaluation: str | None = None) -> Active:
    """The source chosen in the sidebar, or stop the page with what to do.

    `needs_evaluation` names what the page measures; for a source without test data the page then
    explains in the main area why it cannot show anything and stops.
    """
    problem = st.session_state.get(PROBLEM)
    act: Active | None = st.session_state.get(ACTIVE)
    if problem is not None and problem["kind"] == "zoo-missing":
        offer_zoo_build()
        st.stop()
    if problem is not None:
        what = KINDS.get(problem["kind"], problem["kind"])
        if problem["path"]:
            st.error(f"**The {what.lower()} `{problem['path']}` cannot be used:** {problem['message']}",
                     icon=":material/error:")
        else:
            st.info(f"Choose a {what.lower()} in the sidebar: {problem['message']}.", icon=":material/info:")
        if act is None:
            st.stop()
        st.warning(f"Below: **{act.label}** (the last source that worked), not the one chosen in the sidebar.",
                   icon=":material/history:")
    if act is None:
        st.info("Choose a model source in the sidebar: the demo zoo, a suite file or a folder of checkpoints.")
        st.stop()
    if needs_evaluation and not act.can_evaluate:
        st.info(f"{needs_evaluation} needs test images and heads, which {act.label} does not have: a checkpoint "
                "folder holds weights only. Describe the same checkpoints with a suite file (docs/suites.md) "
                "or switch to the demo zoo in the sidebar.", icon=":material/info:")
        st.stop()
    return act


def offer_zoo_build() -> None:
    """The demo zoo is missing: say so and offer to build it (a job on the shared queue)."""
    root = default_zoo_dir()
    st.warning(f"The demo zoo is not built yet (looked in `{root}`).")
    st.markdown("It is a small CLIP-style ViT fine-tuned on a few toy tasks; building it trains the experts "
                "on this machine. Or run `python -m engine zoo build` in a terminal.")
    pressed = st.button("Build the demo zoo", type="primary", key="build_zoo")
    key = calls.key_of("zoo-build", str(root))
    if calls.asked("zoo-build", key, pressed):
        from engine.zoo.build import build_zoo

        try:
            calls.run_job("zoo-build", key, lambda progress: str(build_zoo(root, progress=progress).root),
                          "Building the demo zoo…")
        except MergeExplorerError as exc:
            st.error(str(exc))
            st.stop()
        st.session_state.pop(PROBLEM, None)
        st.rerun()


# --------------------------------------------------------------------------------------------
# RI-adapted experts (Resolving Interference, docs/methods.md)
# --------------------------------------------------------------------------------------------

RI_FIELDS = ("alpha", "steps", "aux")
RI_URL_PREFIX = "ri_"


def ri_controls(act: Active) -> tuple[bool, dict[str, Any]]:
    """The "RI-adapted experts" switch and, when on, RI's main settings. Returns (on, settings)."""
    from engine.methods.ri import RIConfig

    on = bind(st.toggle, "ri", False, "RI-adapted experts", disabled=not act.can_evaluate,
              help="Resolving Interference: before merging, each expert is trained on unlabeled images to keep "
                   "its own predictions and leave other tasks' heads as the pretrained model had them.")
    if not act.can_evaluate or not on:
        return False, {}
    # A form: each new setting means adapting every expert again, so settings apply together on one
    # click rather than on every slider move.
    with st.expander("RI settings"), st.form(f"ri_form_{st.session_state.get(PAGE_KEY, '')}", border=False):
        bounds = {"alpha": (0.0, 10.0), "steps": (0, 1000)}
        values = config_widgets(RIConfig, "ri", only=RI_FIELDS, url_ok=True, url_prefix=RI_URL_PREFIX, bounds=bounds)
        st.form_submit_button("Apply RI settings",
                              help="Adapts the experts with these settings the first time (each setting's adapted "
                                   "experts are kept in the cache folder and reused).")
    return True, values


def ri_url_params(on: bool, values: dict[str, Any]) -> dict[str, Any]:
    return {"ri": 1, **{RI_URL_PREFIX + k: v for k, v in values.items()}} if on else {}


@st.cache_resource(show_spinner=False, max_entries=8)
def _adapted_stack(key: str, _suite) -> Any:
    from engine.task_vectors import TaskVectorStack

    return TaskVectorStack.from_suite(_suite)


def ri_active(act: Active, values: dict[str, Any]) -> Active:
    """The source with RI-adapted experts: read from the cache folder when adapted before with these
    settings, else adapted now as a job on the server's shared queue (a second session asking for the
    same settings waits for that job instead of adapting again)."""
    from engine.adapted import cached_adapted, ensure_adapted
    from engine.methods.ri import RIConfig
    from engine.sources import suite_source

    config = RIConfig(**values)
    adapted = cached_adapted(act.suite, config)
    if adapted is None:
        key = calls.key_of("ri", act.key, values)
        adapted = calls.run_job("ri-adapt", key, lambda progress: ensure_adapted(act.suite, config, progress=progress),
                                "Adapting every expert with RI (first time only; kept in the cache)…")
    key = hashlib.sha1(f"{act.key}|ri|{sorted(values.items())}".encode()).hexdigest()[:16]
    return Active(kind=act.kind, path=act.path, label=f"{act.label} (RI-adapted experts)",
                  source=suite_source(adapted), suite=adapted, stack=_adapted_stack(key, adapted), key=key,
                  limit=act.limit)
