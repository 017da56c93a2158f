"""Interference: where the experts' task vectors disagree in sign, and how much TIES trims away."""
from __future__ import annotations

import math

import streamlit as st

from engine import figures
from engine.errors import MergeExplorerError
from engine.methods import get_method
from pages.ui import calls, sections, state, widgets

VIEWS = {"layer": "bars per layer", "tensor": "bars per tensor", "heatmap": "heatmap: layers × k"}
METRICS = {"rate_all": "all parameters", "rate_nonzero2": "parameters kept by ≥ 2 tasks"}

state.start_page("interference")
st.title("Interference")
st.markdown("Two experts **conflict** on a parameter when, after trimming, one pushes it up (τ > 0) and another "
            "pushes it down (τ < 0). Merging must then pick a side: that is interference.")
act = sections.active()

c1, c2, c3 = st.columns([2, 1.2, 1], gap="medium")
with c1:
    tasks = widgets.task_selector(act.tasks, "Tasks compared")
with c2:
    ties_params = widgets.method_widgets(get_method("ties"), only=("k", "trim"))
with c3:
    metric = state.bind(
        st.radio, "metric", "rate_all", "Conflict rate out of", list(METRICS), format_func=METRICS.get,
        valid=lambda v: v in METRICS,
        help="Denominator: every parameter (the TIES paper's plot), or only parameters that at least two tasks "
             "kept after trimming (where a conflict is possible at all).")
k, trim = float(ties_params["k"]), ties_params["trim"]

try:
    if len(tasks) < 2:
        raise MergeExplorerError("choose at least two tasks: a conflict needs two task vectors that disagree")
    report = calls.conflict_report(act.key, tuple(tasks), k, trim, act)
    st.session_state["last_conflicts"] = {"report": report, "k": k, "trim": trim, "tasks": tasks, "key": act.key}
except MergeExplorerError as exc:
    st.error(str(exc), icon=":material/error:")
    last = st.session_state.get("last_conflicts")
    if last is None or last.get("key") != act.key:
        state.sync_url({"tasks": widgets.url_tasks(act.tasks, tasks), "k": k, "trim": trim, "metric": metric})
        st.stop()
    report, k, trim, tasks = last["report"], last["k"], last["trim"], last["tasks"]
    st.caption(f"Still showing the last analysis that worked: k = {k:g} %, {trim} trim, {len(tasks)} tasks.")

overall = report["overall"]
m1, m2, m3 = st.columns(3)
m1.metric("Conflicting parameters", f"{100 * overall['rate_all']:.2f} %",
          help="Share of all parameters where at least one kept task vector is positive and another negative.")
m2.metric("…among parameters kept by ≥ 2 tasks", f"{100 * overall['rate_nonzero2']:.1f} %",
          help="Same count, divided only by the parameters where two or more tasks survived the trim.")
m3.metric("Random-sign baseline", f"{100 * overall['random_baseline']:.2f} %",
          delta=f"{100 * (overall['rate_all'] - overall['random_baseline']):+.2f} pts measured − random",
          delta_color="off",
          help="What the first number would be if each task kept a random k % of parameters with coin-flip signs.")

# ---- per layer / tensor ---------------------------------------------------------------------
view = state.bind(st.segmented_control, "view", "layer", "Conflicts by", list(VIEWS), format_func=VIEWS.get,
                   valid=lambda v: v in VIEWS, help="Bars at the current k, or a heatmap over several k values.")
view = view or "layer"
numels = {name: math.prod(shape) for name, shape in zip(act.stack.names, act.stack.shapes)}
if view == "heatmap":
    # one analysis pass already gives every tensor's conflict rate over the whole k grid
    layers, z = figures.layer_k_matrix(report["per_tensor_k_curve"], numels)
    fig = figures.conflict_layer_k_heatmap(layers, report["k_curve"]["k"], z, current_k=k)
    note = ("one row per layer (input side at the top), one column per keep fraction k; the colour is the share "
            "of that layer's parameters where kept task vectors pull in opposite directions (out of all "
            "parameters, whatever the denominator above). Keeping more (larger k) lets more small, noisy "
            "changes collide.")
else:
    fig = figures.conflict_by_tensor_bars(report["per_tensor"], metric=metric, numels=numels,
                                          by_layer=view == "layer", k=k)
    note = ("one bar per " + ("layer (its tensors pooled, weighted by size)" if view == "layer" else "weight tensor")
            + ": the share of its parameters where the kept task vectors disagree in sign. The dashed line is "
              "what random signs would give; bars above it mean the tasks fight more than chance there.")
sections.show_figure(fig, "conflict_layers_chart", note)

# ---- curves ---------------------------------------------------------------------------------
left, right = st.columns(2, gap="large")
with left:
    sections.show_figure(figures.conflict_vs_k(report["k_curve"], current_k=k), "conflict_k_chart",
        "the overall conflict rate as each task vector keeps more of its largest changes (k, in %). Solid: "
        "measured on these experts; dashed: random signs. The dotted red line is the k chosen above.", half=True)
with right:
    sections.show_figure(figures.conflict_vs_n_tasks(report["n_tasks_curve"], k=k, current_n=len(tasks)),
                       "conflict_n_chart",
        "the conflict rate when merging 2, 3, … of the chosen tasks at the current k. More tasks, more chances "
        "that someone disagrees: this is why merging many experts gets harder.", half=True)

left, right = st.columns(2, gap="large")
with left:
    sections.show_figure(figures.pairwise_conflict_heatmap(report["tasks"], report["pairwise"]), "pairwise_chart",
        "for each pair of tasks, among the parameters both kept after trimming, the % whose signs disagree. "
        "About 50 % means unrelated directions; lower means the two tasks changed the model alike.", half=True)
with right:
    mag_task = state.bind(st.selectbox, "mag_task", act.tasks[0], "Task vector to inspect", act.tasks,
                           url_key="task", valid=lambda v: v in act.tasks,
                           help="Whose task vector τ = θ_task − θ₀ to show in the histogram below.")
    try:
        hist = calls.magnitude_report(act.key, mag_task, k, trim, act)
    except MergeExplorerError as exc:
        st.error(str(exc), icon=":material/error:")
    else:
        sections.show_figure(figures.magnitude_histogram(hist, task=mag_task, k=k), "magnitude_chart",
            "how big the changes made by fine-tuning are, on a log scale (each step right = 10× larger). "
            "TIES keeps only the blue part right of the red threshold (the top k %) and resets the grey part "
            "to the pretrained value." + (" With per-tensor trim each tensor has its own threshold; the line "
                                          "shows a typical one." if trim != "global" else ""), half=True)

state.sync_url({"tasks": widgets.url_tasks(act.tasks, tasks), "k": k, "trim": trim, "metric": metric, "view": view,
                "task": mag_task})
