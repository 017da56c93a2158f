"""Merge: pick a method and its hyperparameters, see per-task accuracy, download the merged model."""
from __future__ import annotations

import streamlit as st

from engine import figures
from engine.adapted import ri_record
from engine.errors import MergeExplorerError
from engine.methods import merge_methods
from pages.ui import calls, sections, sources, state, widgets


def show_ri_comparison(act: sources.Active, shown: dict, individual: dict, normalized: bool) -> None:
    """The same merge of the original (`act`) and of the RI-adapted experts (`shown["source"]`)."""
    ri_act = shown["source"]
    tasks_ = list(shown["tasks"])
    label = merge_methods()[shown["method"]].label
    without = calls.merge_report(act, tasks_, shown["method"], shown["config"])
    with_ri = shown["report"]
    st.subheader("With and without RI")
    c1, c2, c3 = st.columns(3)
    c1.metric("Average, original experts", f"{without['average']:.1f} %",
              help="The same merge (method, hyperparameters, tasks) of the experts as fine-tuned.")
    c2.metric("Average, RI-adapted experts", f"{with_ri['average']:.1f} %",
              delta=f"{with_ri['average'] - without['average']:+.1f} pts from RI",
              help="The same merge of the experts after RI adapted them on unlabeled auxiliary images.")
    adapted_own = (ri_record(ri_act.suite) or {}).get("adapted_accuracies") or {}
    own = [adapted_own[t] for t in tasks_ if t in adapted_own]
    if own:
        before = sum(individual[t] for t in tasks_ if t in adapted_own) / len(own)
        c3.metric("RI experts on their own tasks", f"{sum(own) / len(own):.1f} %",
                  delta=f"{sum(own) / len(own) - before:+.1f} pts vs the originals",
                  help="What RI cost each expert alone on its own task, before any merge.")
    sections.show_figure(figures.ri_accuracy_bars(tasks_, without["per_task"], with_ri["per_task"], individual,
                                                  normalized=normalized, method_label=label), "ri_accuracy_chart",
        "the same merge twice: grey from the experts as fine-tuned, blue from the experts after RI. Green "
        "marks are the original experts alone. RI trains each expert to leave other tasks' heads as the "
        "pretrained model had them, so that adding its task vector disturbs the other tasks less.")
    xi = {"original experts": calls.interference_report(act, tasks_, shown["method"], shown["config"])["per_task"],
          "RI-adapted experts": calls.interference_report(ri_act, tasks_, shown["method"], shown["config"])["per_task"]}
    sections.show_figure(figures.interference_bars(tasks_, xi), "ri_xi_chart",
        "ξ_t: on task t's test images and under its head, how far the merged model's predicted probabilities are "
        "from the original expert's (KL divergence, 0 = identical). Both bars compare to the original experts, "
        "the models one wanted to merge; lower is less interference.")
    calls.record_once("ri", calls.key_of(ri_act.key, tasks_, shown["method"], shown["config"]),
                      lambda: {"tasks": tasks_, "with_ri": with_ri, "without_ri": without, "xi": xi,
                               "reference": {"individual": individual}, "ri": shown["ri"]},
                      act, method=shown["method"], config={**shown["config"], **{f"ri.{k}": v for k, v in
                                                                                   (shown["ri"] or {}).items()}})
    st.page_link("pages/views/sweep.py", label="Accuracy vs λ with and without RI: Sweep page, same switch",
                 icon=":material/monitoring:")


state.start_page("merge")
st.title("Merge")
act = sections.active()
methods = merge_methods()

controls, results = st.columns([1, 2.2], gap="large")
with controls:
    method_name = state.bind(
        st.radio, "method", "ties", "Merge method", list(methods), format_func=lambda n: methods[n].label,
        valid=lambda v: v in methods,
        help="How the experts' task vectors are combined into one model.")
    method = methods[method_name]
    st.caption(method.summary)
    tasks = widgets.task_selector(act.tasks)
    config = widgets.method_widgets(method)
    normalized = state.bind(
        st.toggle, "norm", False, "Normalised accuracy", disabled=not act.can_evaluate,
        help="Divide each task's accuracy by its own expert's: 100 % means 'as good as the expert'.")
    ri_on, ri_values = sections.ri_controls(act)

state.sync_url({"method": method_name, "tasks": widgets.url_tasks(act.tasks, tasks), **config,
                "norm": normalized or None, **sections.ri_url_params(ri_on, ri_values)})

with results:
    shown = None
    if not act.can_evaluate:
        st.info(f"{act.label} has no test images, so accuracy cannot be measured here: describe the same checkpoints "
                "with a suite file (docs/suites.md) for accuracy. You can still download the merged checkpoint, and "
                "the Interference page works on any source.")
    else:
        try:
            merge_act = sections.ri_active(act, ri_values) if ri_on else act
            report = calls.merge_report(merge_act, tasks, method_name, config)
            shown = {"report": report, "tasks": tasks, "method": method_name, "config": config,
                     "ri": ri_values if ri_on else None, "source": merge_act, "source_key": act.key}
            st.session_state["last_merge"] = shown
        except MergeExplorerError as exc:
            st.error(str(exc), icon=":material/error:")
            shown = st.session_state.get("last_merge")
            if shown is not None and shown.get("source_key") != act.key:
                shown = None  # another source's result: never shown here
            if shown is not None:
                st.caption(f"Still showing the last merge that worked: {methods[shown['method']].label}, "
                           + ", ".join(f"{k} = {v}" for k, v in shown["config"].items())
                           + (", RI-adapted experts" if shown.get("ri") is not None else ""))

    if shown is not None:
        report, shown_tasks = shown["report"], shown["tasks"]
        shown_label = methods[shown["method"]].label + (" on RI-adapted experts" if shown.get("ri") is not None else "")
        ref = calls.reference_accuracies(act)
        individual = {t: ref["individual"][t] for t in shown_tasks if t in ref["individual"]}
        pretrained = {t: ref["pretrained"][t] for t in shown_tasks if t in ref["pretrained"]}
        expert_avg = sum(individual.values()) / max(len(individual), 1)
        pre_avg = sum(pretrained.values()) / max(len(pretrained), 1)

        norm_avg = report.get("normalized_average")
        m1, m2, m3 = st.columns(3)
        m1.metric("Average accuracy", f"{report['average']:.1f} %",
                  delta=f"{report['average'] - pre_avg:+.1f} pts vs pretrained",
                  help="Mean top-1 accuracy of the merged model over the merged tasks; the change is against the "
                       "pretrained model θ₀ on the same tasks.")
        m2.metric("Normalised average", "—" if norm_avg is None else f"{100 * norm_avg:.1f} %",
                  help="Mean of (merged accuracy / expert accuracy) per task: 100 % = no loss from merging.")
        m3.metric("Experts' average", f"{expert_avg:.1f} %",
                  help="What the individual fine-tuned models reach, each on its own task (the ceiling).")
        sections.budget_caption(act, report.get("n_images"))

        fig = figures.accuracy_bars(shown_tasks, report["per_task"], individual, pretrained,
                                    normalized=normalized, merged_label=f"merged ({shown_label})",
                                    settings=figures.settings_text(methods[shown["method"]].label, shown["config"]))
        sections.show_figure(fig, "accuracy_chart",
            "one group of bars per task. Green is the task's own expert (the best a single model got), grey the "
            "pretrained model before fine-tuning, blue the one merged model serving every task at once. The gap "
            "between green and blue is what merging cost on that task — interference between task vectors."
            + (" Normalised: every bar is divided by the expert's accuracy." if normalized else ""))
        if act.stack.kept_from_base:
            st.caption("Not merged (no expert has them; they stay at the pretrained values): "
                       + ", ".join(f"`{n}`" for n in act.stack.kept_from_base) + ".")

        if shown.get("ri") is not None:
            show_ri_comparison(act, shown, individual, normalized)

    if not act.can_evaluate or shown is not None:
        dl_tasks = shown["tasks"] if shown else tasks
        dl_method = shown["method"] if shown else method_name
        dl_config = shown["config"] if shown else config
        dl_act = shown["source"] if shown else act
        st.download_button(
            "Download merged checkpoint (.safetensors)",
            data=lambda: calls.merged_checkpoint_bytes(dl_act, dl_tasks, dl_method, dl_config),
            file_name=f"merged-{dl_method}.safetensors", mime="application/octet-stream",
            on_click="ignore", key="download_merged",
            help="θ₀ + merged task vector, canonical tensor names; the method, hyperparameters, tasks and source "
                 "file hashes are in the file's metadata (as `merge --out` writes them).")
