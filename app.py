"""Merge Explorer: `streamlit run app.py`.

Navigation over the page scripts in pages/ and the shared sidebar (model source, device); nothing
else. The demo zoo's location is MERGE_EXPLORER_ZOO when set, else engine.zoo's default.
"""
from __future__ import annotations

import os

# Before torch loads: OpenMP threads that spin-wait at every barrier make a 2-thread forward pass
# ~20x slower (2.6 s instead of 0.13 s per evaluation on the quick zoo) whenever another process
# shares the CPU; passive waiting costs nothing measurable when the CPU is idle. Override by
# setting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

from engine.device import resolve_device  # noqa: E402
from engine.errors import MergeExplorerError  # noqa: E402
from pages import _shared as shared  # noqa: E402

st.set_page_config(page_title="Merge Explorer", page_icon=":material/merge:", layout="wide")

PAGES = [
    st.Page("pages/models.py", title="Models", icon=":material/inventory_2:", default=True),
    st.Page("pages/merge.py", title="Merge", icon=":material/call_merge:"),
    st.Page("pages/interference.py", title="Interference", icon=":material/bolt:"),
    st.Page("pages/sweep.py", title="Sweep", icon=":material/monitoring:"),
    st.Page("pages/continual.py", title="Continual", icon=":material/timeline:"),
]
page = st.navigation(PAGES)
shared.remember_start_url()
shared.start_page("sidebar")  # widgets drawn by app.py on every page

with st.sidebar:
    st.markdown("### Merge Explorer")
    st.caption("How fine-tuned CLIP ViT experts interfere when merged into one model.")
    kind = shared.bind(
        st.radio, "source", "zoo", "Model source", ["zoo", "folder"], url_key="source",
        format_func={"zoo": "Demo zoo", "folder": "Local folder"}.get, horizontal=True,
        valid=lambda v: v in ("zoo", "folder"),
        help="The demo zoo is a small ViT fine-tuned on toy tasks; a local folder holds your own "
             "pretrained checkpoint plus one checkpoint per fine-tuned expert.")
    if kind == "folder":
        path = shared.bind(
            st.text_input, "folder", "", "Checkpoint folder", url_key="folder",
            placeholder="/path/to/checkpoints",
            help="A folder with the pretrained model (e.g. pretrained.safetensors) and one file or "
                 "sub-folder per fine-tuned expert; the file names become the task names.").strip()
    else:
        path = str(shared.default_zoo_dir())

    st.session_state.pop("source_problem", None)
    if kind == "folder" and not path:
        st.info("Type the path of a folder of checkpoints.")
        if st.session_state.get("active") is not None:
            st.caption(f"Still showing: `{st.session_state['active'].path}`")
    else:
        try:
            act = shared.load_active(kind, path)
        except MergeExplorerError as exc:
            previous = st.session_state.get("active")
            if kind == "zoo" and not shared.zoo_is_built(shared.default_zoo_dir()):
                st.session_state["source_problem"] = "zoo-missing"
                st.warning("The demo zoo is not built yet: build it on any page.")
                st.session_state["active"] = None
            else:
                st.error(f"Cannot use this source: {exc}")
                if previous is not None:
                    st.caption(f"Still showing the previous source: `{previous.path}`")
        else:
            st.session_state["active"] = act
            label = "demo zoo" if act.kind == "zoo" else "folder"
            st.success(f"{len(act.tasks)} experts from the {label}", icon=":material/check_circle:")

    device = resolve_device("auto")
    st.caption(f"Device: **{device.type.upper()}**" + (" (no CUDA GPU found)" if device.type == "cpu" else ""))

page.run()
