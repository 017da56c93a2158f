"""Merge Explorer: `streamlit run app.py`.

Navigation over the page scripts in pages/views/ (a bar at the top, so the legacy sidebar list that
.streamlit/config.toml hides stays hidden) and the shared sidebar (model source, device); nothing
else. The demo zoo's location is MERGE_EXPLORER_ZOO when set, else engine.zoo's default.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

# Before torch loads: OpenMP threads that spin-wait at every barrier make a 2-thread forward pass
# ~20x slower (2.6 s instead of 0.13 s per evaluation on the quick zoo) whenever another process
# shares the CPU; passive waiting costs nothing measurable when the CPU is idle. Override by
# setting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

from engine.device import resolve_device  # noqa: E402
from pages.ui import presenter, sources, state  # noqa: E402

# The icon is a file of ours: a material-icon name would be fetched from a public font host, which a
# classroom without internet cannot reach (and no page should depend on).
st.set_page_config(page_title="Merge Explorer", page_icon=str(Path(__file__).parent / "assets" / "icon.png"),
                   layout="wide")

# The shared work queue logs one line per job it runs (engine.jobs): what a server's operator reads.
_jobs_log = logging.getLogger("engine.jobs")
if not _jobs_log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    _jobs_log.addHandler(_handler)
    _jobs_log.setLevel(logging.INFO)

PAGES = [
    st.Page("pages/views/models.py", title="Models", icon=":material/inventory_2:", default=True),
    st.Page("pages/views/merge.py", title="Merge", icon=":material/call_merge:"),
    st.Page("pages/views/interference.py", title="Interference", icon=":material/bolt:"),
    st.Page("pages/views/sweep.py", title="Sweep", icon=":material/monitoring:"),
    st.Page("pages/views/continual.py", title="Continual", icon=":material/timeline:"),
    st.Page("pages/views/history.py", title="History", icon=":material/history:"),
    st.Page("pages/views/learn.py", title="Learn", icon=":material/school:"),
]
page = st.navigation(PAGES, position="top")
state.remember_start_url()
state.start_page("sidebar")  # widgets drawn by app.py on every page

with st.sidebar:
    st.markdown("### Merge Explorer")
    st.caption("How fine-tuned CLIP ViT experts interfere when merged into one model.")
    sources.sidebar()
    device = resolve_device("auto")
    st.caption(f"Device: **{device.type.upper()}**" + (" (no CUDA GPU found)" if device.type == "cpu" else ""))
presenter.apply()

page.run()
