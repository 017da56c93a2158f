"""Sweep: accuracy vs λ or vs k, every method on the same axes."""
from __future__ import annotations

import json

import numpy as np
import streamlit as st

from engine import figures
from engine.errors import MergeExplorerError
from engine.methods import merge_methods
from engine.sweep import sweep_methods
from pages.ui import calls, sections, state, widgets

PARAMS = {"lam": "λ (scaling)", "k": "k (TIES trim, %)"}
RANGES = {"lam": (0.0, 3.0, 0.05, (0.1, 1.5)), "k": (1.0, 100.0, 1.0, (5.0, 100.0))}
STORE_SIZE = 32

state.start_page("sweep")
st.title("Sweep")
st.markdown("Merge the same experts at many values of one hyperparameter and watch the accuracy move. "
            "A method without that hyperparameter is drawn as a flat dashed line, for reference.")
state.sync_url({})
act = sections.active(needs_evaluation="A sweep measures accuracy; it")
METHODS = merge_methods()


c1, c2, c3 = st.columns([1, 1.4, 1.2], gap="medium")
with c1:
    param = state.bind(st.radio, "sweep", "lam", "Sweep over", list(PARAMS), format_func=PARAMS.get,
                        valid=lambda v: v in PARAMS,
                        help="λ scales the whole merged change; k is how much of each task vector TIES keeps.")
    lo, hi, step, default_range = RANGES[param]
    value_range = state.bind(st.slider, f"range_{param}", default_range, "Range", min_value=lo, max_value=hi,
                              step=step, url_key=f"{param}_range",
                              valid=lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and lo <= v[0] <= v[1] <= hi,
                              help="Smallest and largest value tried.")
    n_points = state.bind(st.slider, "points", 8, "Points", min_value=2, max_value=16,
                           help="How many evenly spaced values between the two ends (more = slower).")
with c2:
    method_names = state.bind(st.multiselect, "methods", list(METHODS), "Methods", list(METHODS),
                               format_func=lambda n: METHODS[n].label,
                               valid=lambda v: isinstance(v, list) and all(m in METHODS for m in v),
                               help="Which merge methods to draw side by side.")
    tasks = widgets.task_selector(act.tasks)
with c3:
    metric = state.bind(st.selectbox, "sweep_metric", "average", "Show accuracy of", ["average", *act.tasks],
                         url_key="metric", valid=lambda v: v == "average" or v in act.tasks,
                         format_func=lambda v: "average over tasks" if v == "average" else f"task: {v}",
                         help="The mean over the merged tasks, or one task's own accuracy.")
    normalized = state.bind(st.toggle, "norm", False, "Normalised accuracy",
                             help="Divide by each expert's accuracy: 100 % means 'as good as the expert'.")
    ri_on, ri_values = sections.ri_controls(act)

# The other hyperparameters stay as set on the Merge page (or their defaults).
configs = {}
for name in method_names:
    configs[name] = widgets.stored_config(METHODS[name])
fixed = ", ".join(f"{METHODS[n].label}: " + (", ".join(f"{k} = {v}" for k, v in c.items() if k != param) or "—")
                  for n, c in configs.items())
st.caption(f"Held fixed (set them on the Merge page): {fixed}")

values = [round(float(v), 4) for v in np.linspace(value_range[0], value_range[1], int(n_points))]
if param == "k":
    values = sorted({max(v, 0.1) for v in values})
state.sync_url({"sweep": param, f"{param}_range": list(value_range), "points": n_points,
                "methods": ",".join(method_names), "tasks": widgets.url_tasks(act.tasks, tasks),
                "metric": metric, "norm": normalized or None, **sections.ri_url_params(ri_on, ri_values)})

try:
    ri_act = sections.ri_active(act, ri_values) if ri_on else None
except MergeExplorerError as exc:
    st.error(str(exc), icon=":material/error:")
    st.stop()
# With RI on, every method is swept twice: on the original experts and on the RI-adapted ones.
variants = [(act, False)] + ([(ri_act, True)] if ri_act is not None else [])
key = json.dumps([act.key, param, values, method_names, tasks, configs, ri_act.key if ri_act else None],
                 sort_keys=True, default=str)
run = st.button("Run sweep", type="primary", key="run_sweep", disabled=not method_names,
                help=f"{len(values)} values × {len(method_names)} methods" + (" × 2 (with and without RI)" if ri_on
                                                                            else "")
                     + "; it runs on the server's shared queue, with progress and a Cancel button below.")


def compute_sweep(progress) -> list[dict]:
    from engine.evaluate import evaluate

    results = []
    for i, (source, is_ri) in enumerate(variants):
        def step(f: float, msg: str, _i=i, _ri=is_ri) -> None:
            progress((_i + f) / len(variants), ("RI-adapted experts: " if _ri else "") + msg)

        for r in sweep_methods(source.subset(tasks), [METHODS[n] for n in method_names], param, values,
                               evaluate_fn=lambda sd, s=source: evaluate(s.suite, sd, tasks=tasks, limit=s.limit),
                               configs=configs, progress=step):
            r.extra["ri"] = is_ri
            results.append(r.to_json())
    return results


keep = calls.recorder(act)


def record_sweep(value: list[dict], seconds: float) -> None:
    reference = calls.result_store("reference").get(calls.key_of(act.key))
    keep("sweep", key, {"results": value, "reference": reference}, method=",".join(method_names),
         config={"param": param, "from": value_range[0], "to": value_range[1], "points": n_points,
                 "ri": ri_values if ri_on else None,
                 **{f"{m}.{k}": v for m, c in configs.items() for k, v in c.items()}},
         seconds=seconds)


results = None
if calls.asked("sweep", key, run):
    try:
        results = calls.run_job("sweep", key, compute_sweep, "Sweeping…", size=STORE_SIZE, record=record_sweep)
    except MergeExplorerError as exc:
        st.error(str(exc), icon=":material/error:")
if results is None:
    took = calls.measured("sweep")
    st.info("Press **Run sweep** to merge and evaluate at every value" + (f" (a sweep has taken {took})." if took
                                                                             else "."))
    st.stop()

ref = calls.reference_accuracies(act)
fig = figures.sweep_lines(results, metric=metric, normalized=normalized, individual=ref["individual"],
                          pretrained=ref["pretrained"])
sections.show_figure(fig, "sweep_chart",
    f"each line is one merge method; each point is a full merge at that value of {PARAMS[param]} followed by a "
    "test on every task. The dotted green line is where the experts stand (each on its own task), the dash-dot "
    "grey line where the pretrained model stood before any fine-tuning: a merge is worth it where its curve "
    "rises above the grey line. The peak of a line is that method's best setting for these tasks; dashed lines "
    "are methods that ignore this hyperparameter."
    + (" Dotted lines merge the experts as fine-tuned, solid lines the same experts after RI; the RI paper "
       "finds RI lifts merges and makes them less sensitive to λ (a flatter line)." if ri_on else ""))


def variant(r: dict) -> tuple[str, str]:
    """(key, label) of one line: the method, and whether it merged RI-adapted experts."""
    ri = bool((r.get("extra") or {}).get("ri"))
    return r["method"] + ("+ri" if ri else ""), r["label"] + (" + RI" if ri else " (original)" if ri_on else "")


best_rows = []
for r in results:
    i = int(np.argmax(r["average"])) if r["varies"] else 0
    best_rows.append({"method": variant(r)[1],
                      f"best {figures.PARAM_SYMBOLS[param]}": f"{r['values'][i]:g}" if r["varies"] else "— (has none)",
                      "average accuracy (%)": round(r["average"][i], 1),
                      "normalised average (%)": round(100 * r["normalized_average"][i], 1),
                      "spread over the range (points)": round(max(r["average"]) - min(r["average"]), 1)})
sections.budget_caption(act)
st.dataframe(best_rows, hide_index=True, width="stretch",
             column_config={"spread over the range (points)": st.column_config.NumberColumn(
                 help="Best minus worst average accuracy over the swept values: how sensitive the method is.")})

varying = [r for r in results if r["varies"]]
if varying:
    labels = dict(variant(r) for r in varying)
    which = state.bind(st.selectbox, "per_task_method", variant(varying[-1])[0], "Per-task lines for", list(labels),
                        format_func=labels.get, valid=lambda v: v in labels,
                        help="Show every task's accuracy for one method.")
    chosen = next(r for r in varying if variant(r)[0] == which)
    sections.show_figure(figures.sweep_per_task_lines({**chosen, "label": labels[which]}, normalized=normalized,
                                                 individual=ref["individual"]), "sweep_per_task_chart",
        "the same sweep for one method, one line per task. Tasks rarely peak at the same value: the best "
        "average is a compromise between them.")
