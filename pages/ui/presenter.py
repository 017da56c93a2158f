"""Presenter mode: a page sized for a projector (no sidebar, large text and charts), `present=1` in the URL.

app.py calls `apply()` on every page; `sections.show_figure` asks `is_on()` and draws charts with
`engine.figures.fit_for_screen(projector=True)`. The CSS below also keeps metric labels and deltas
from being cut with "…" on narrow screens (1024 px), in both modes.
"""
from __future__ import annotations

import streamlit as st

from .state import PRESENT, bind, setting, settings

# Metric labels and deltas wrap instead of ending in "…" (a 1024 px laptop cut "Average acc…"), and a
# label leaves room for its help icon, which a wrapped label would push out of the column.
NARROW_CSS = """
[data-testid="stMetricLabel"] > div, [data-testid="stMetricLabel"] > div *, [data-testid="stMetricDelta"],
[data-testid="stMetricDelta"] > div, [data-testid="stMetricDelta"] > div * {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
  height: auto !important; }
[data-testid="stMetricLabel"] > span { flex-shrink: 0 !important; }
"""
# For a projector: no sidebar, larger body text, captions dark and body-sized, wider content, and
# charts that stood side by side one under the other (at projector text size half a width is too narrow).
PRESENTER_CSS = """
section[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], [data-testid="stExpandSidebarButton"]
  { display: none !important; }
.stMainBlockContainer, .block-container { max-width: 100% !important; padding-left: 2rem !important;
  padding-right: 2rem !important; padding-top: 3.5rem !important; }
[data-testid="stMarkdownContainer"] p, [data-testid="stMarkdownContainer"] li { font-size: 1.35rem !important; }
[data-testid="stWidgetLabel"] p { font-size: 1.2rem !important; }
[data-testid="stCaptionContainer"], [data-testid="stCaptionContainer"] * { font-size: 1.25rem !important;
  color: #1f1f1f !important; }
[data-testid="stMetricValue"] { font-size: 3rem !important; }
[data-testid="stHorizontalBlock"] { flex-wrap: wrap !important; }
[data-testid="stColumn"]:has(.js-plotly-plot) { min-width: 100% !important; }
h1 { font-size: 3rem !important; }
"""


def is_on() -> bool:
    return bool(setting(PRESENT, False))


def apply() -> None:
    """Draw the mode's switch (sidebar toggle, or a Leave button when the sidebar is hidden) and its CSS."""
    if not is_on():
        with st.sidebar:
            bind(st.toggle, PRESENT, False, "Presenter mode",
                 help="For a projector: hides this sidebar, makes text and charts larger; ← and → step through "
                      "a lesson. The link gets present=1, so you can bookmark it.")
    css = NARROW_CSS
    if is_on():
        css += PRESENTER_CSS
        st.button("Leave presenter mode", key="leave_presenter", on_click=_leave, icon=":material/close:",
                  help="Show the sidebar and the normal text size again.")
    st.html(f"<style>{css}</style>")


def _leave() -> None:
    settings()[PRESENT] = False
    for key in [k for k in st.session_state if str(k).endswith(f".{PRESENT}")]:  # the toggle's widget state
        del st.session_state[key]
