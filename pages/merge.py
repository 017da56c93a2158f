"""Merge: pick a method and its hyperparameters, see per-task accuracy, download the merged model."""
from __future__ import annotations

import json

import streamlit as st

from engine import figures
from engine.errors import MergeExplorerError
from engine.methods import METHODS
from pages import _shared as shared

shared.start_page("merge")
st.title("Merge")
act = shared.active()

controls, results = st.columns([1, 2.2], gap="large")
with controls:
    method_name = shared.bind(
        st.radio, "method", "ties", "Merge method", list(METHODS), format_func=lambda n: METHODS[n].label,
        valid=lambda v: v in METHODS,
        help="How the experts' task vectors are combined into one model.")
    method = METHODS[method_name]
    st.caption(method.summary)
    tasks = shared.task_selector(act)
    config = shared.config_widgets(method)
    normalized = shared.bind(
        st.toggle, "norm", False, "Normalised accuracy",
        help="Divide each task's accuracy by its own expert's: 100 % means 'as good as the expert'.")

shared.sync_url({"method": method_name, "tasks": shared.url_tasks(act, tasks), **config,
                 "norm": normalized or None})

with results:
    config_json = json.dumps(config, sort_keys=True)
    shown = None
    if act.zoo is None:
        st.info("This folder has no test sets, so accuracy cannot be measured here; you can still download "
                "the merged checkpoint, and the Interference page works on any source.")
    else:
        try:
            report = shared.merge_report(act.key, tuple(tasks), method_name, config_json, act)
            shown = {"report": report, "tasks": tasks, "method": method_name, "config": config}
            st.session_state["last_merge"] = shown
        except MergeExplorerError as exc:
            st.error(str(exc), icon=":material/error:")
            shown = st.session_state.get("last_merge")
            if shown is not None:
                st.caption(f"Still showing the last merge that worked: {METHODS[shown['method']].label}, "
                           + ", ".join(f"{k} = {v}" for k, v in shown["config"].items()))

    if shown is not None:
        report, shown_tasks = shown["report"], shown["tasks"]
        ref = shared.reference_accuracies(act.key, act)
        individual = {t: ref["individual"][t] for t in shown_tasks if t in ref["individual"]}
        pretrained = {t: ref["pretrained"][t] for t in shown_tasks if t in ref["pretrained"]}
        expert_avg = sum(individual.values()) / max(len(individual), 1)
        pre_avg = sum(pretrained.values()) / max(len(pretrained), 1)

        norm_avg = report.get("normalized_average")
        m1, m2, m3 = st.columns(3)
        m1.metric("Average accuracy", f"{report['average']:.1f} %",
                  delta=f"{report['average'] - pre_avg:+.1f} pts vs pretrained",
                  help="Mean top-1 accuracy of the merged model over the merged tasks.")
        m2.metric("Normalised average", "—" if norm_avg is None else f"{100 * norm_avg:.1f} %",
                  help="Mean of (merged accuracy / expert accuracy) per task: 100 % = no loss from merging.")
        m3.metric("Experts' average", f"{expert_avg:.1f} %",
                  help="What the individual fine-tuned models reach, each on its own task (the ceiling).")

        fig = figures.accuracy_bars(shown_tasks, report["per_task"], individual, pretrained,
                                    normalized=normalized, merged_label=f"merged ({METHODS[shown['method']].label})")
        st.plotly_chart(fig, key="accuracy_chart", config={"displaylogo": False})
        shared.what_am_i_looking_at(
            "one group of bars per task. Green is the task's own expert (the best a single model got), grey the "
            "pretrained model before fine-tuning, blue the one merged model serving every task at once. The gap "
            "between green and blue is what merging cost on that task — interference between task vectors."
            + (" Normalised: every bar is divided by the expert's accuracy." if normalized else ""))

    if act.zoo is None or shown is not None:
        dl_tasks = shown["tasks"] if shown else tasks
        dl_method = shown["method"] if shown else method_name
        dl_config = shown["config"] if shown else config
        st.download_button(
            "Download merged checkpoint (.safetensors)",
            data=lambda: shared.merged_checkpoint_bytes(act, dl_tasks, dl_method, dl_config),
            file_name=f"merged-{dl_method}.safetensors", mime="application/octet-stream",
            on_click="ignore", key="download_merged",
            help="θ₀ + merged task vector, canonical tensor names; the method, hyperparameters and tasks are "
                 "in the file's metadata.")
