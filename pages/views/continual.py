"""Continual: tasks arrive one at a time; MINGLE and the continual baselines merge them as they come.

Widgets in, `engine.continual.run_continual` per method (cached per settings), figures out.
"""
from __future__ import annotations

import json

import streamlit as st

from engine import figures
from engine.continual import PAPER_ORDER_SEEDS, make_method, method_config, run_continual, task_order
from engine.device import resolve_device
from engine.errors import MergeExplorerError
from engine.methods import continual_methods
from pages.ui import calls, sections, state, widgets

MINGLE_FIELDS = ("rank", "gamma", "beta", "subspace_k", "steps", "seeds_per_class", "layers", "projection")
DEFAULT_METHODS = ["mingle", "opcm", "task-arithmetic"]
# The γ comparison (docs/methods.md, MINGLE): MINGLE as set above, changing only these (projection is
# switched on for the γ variants: γ means nothing without it).
GAMMA_VARIANTS = {"no projection": {"projection": False},
                  "γ = 0 (hard projection)": {"gamma": 0.0, "projection": True},
                  "γ = 1": {"gamma": 1.0, "projection": True}, "γ = 3": {"gamma": 3.0, "projection": True}}
STORE_SIZE = 64

state.start_page("continual")
st.title("Continual merging")
st.markdown("Fine-tuned models arrive **one at a time**; after each arrival the merged model is tested on every "
            "task seen so far. MINGLE adds low-rank experts with gates trained at test time on a few unlabeled "
            "images, and keeps old tasks by steering the new gate away from what earlier tasks' inputs look "
            "like (its null space); the baselines merge weights as they come.")
state.sync_url({})
act = sections.active(needs_evaluation="Continual merging is measured on test images; it")
METHODS = continual_methods()
LABELS = {n: m.continual_name for n, m in METHODS.items()}

width = min(min(act.stack.shapes[act.stack.names.index(n)]) for n in act.stack.names if n.endswith("fc1.weight"))
c1, c2 = st.columns([1, 1.3], gap="large")
with c1:
    method_names = state.bind(
        st.multiselect, "continual_methods", [m for m in DEFAULT_METHODS if m in METHODS], "Methods", list(METHODS),
        url_key="cmethods", format_func=LABELS.get,
        valid=lambda v: isinstance(v, list) and all(m in METHODS for m in v),
        help="Which continual methods to run on the same task stream, side by side.")
    tasks = widgets.task_selector(act.tasks, "Tasks in the stream")
    order_seed = state.bind(
        st.selectbox, "order_seed", PAPER_ORDER_SEEDS[0], "Task order", list(PAPER_ORDER_SEEDS), url_key="order",
        format_func=lambda s: f"s{s}: " + " → ".join(task_order(tasks, s)),
        valid=lambda v: v in PAPER_ORDER_SEEDS,
        help="The order tasks arrive in: random.seed(s); random.shuffle(tasks), with the paper's seeds 42…51.")
    order = task_order(tasks, order_seed)
with c2:
    st.markdown("**MINGLE settings**")
    mingle_values = widgets.config_widgets(
        METHODS["mingle"].continual_config_cls, "continual.mingle", only=MINGLE_FIELDS, url_ok=True,
        bounds={"rank": (1, width), "gamma": (0.0, 10.0), "subspace_k": (0, 16), "steps": (0, 300),
                "seeds_per_class": (1, 50)})
    with st.expander("Baseline settings"):
        baseline_values = {name: widgets.config_widgets(METHODS[name].continual_config_cls, f"continual.{name}",
                                                        url_ok=False)
                           for name in method_names if name != "mingle"}

state.sync_url({"cmethods": ",".join(method_names), "tasks": widgets.url_tasks(act.tasks, tasks), "order": order_seed,
                **mingle_values})

values_for = {"mingle": mingle_values, **baseline_values}


def run_key(name: str, values: dict) -> str:
    return json.dumps([act.key, order, name, values], sort_keys=True, default=str)


def run_all(specs: list[tuple[str, str, dict]], what: str, pressed: bool, kind: str) -> None:
    """Run every (label, method, values) not in the store as one queue job (one progress bar over all
    task steps); each finished run is stored as it completes, so a failure keeps the earlier ones."""
    missing = [(label, name, values) for label, name, values in specs
               if calls.stored_result("continual", run_key(name, values)) is None]
    job_key = calls.key_of(kind, [run_key(n, v) for _, n, v in missing])
    if not missing or not calls.asked(kind, job_key, pressed):
        return
    source = act.suite.select(tasks)
    device = resolve_device("auto")  # CUDA when present, as the sidebar says
    record = calls.recorder(act)

    def compute(progress) -> int:
        for i, (label, name, values) in enumerate(missing):
            def step(fraction: float, message: str, _i=i, _label=label) -> None:
                progress((_i + fraction) / len(missing), f"{_label} ({_i + 1}/{len(missing)}): {message}")

            method = make_method(name, method_config(name, values), source.build_encoder, device=device)
            result = run_continual(source, method, order, seeds_per_class=int(values.get("seeds_per_class", 5)),
                                   gate_stats=name == "mingle", progress=step, device=device, limit=act.limit)
            value = {**result.to_json(), "label": LABELS[name]}
            calls.remember(store, run_key(name, values), value, STORE_SIZE)
            record("continual", run_key(name, values), value, method=name,
                   config={**values, "order_seed": order_seed, "tasks": tasks},
                   seconds=result.timings["merge_total_s"] + result.timings["eval_total_s"])
        return len(missing)

    try:
        calls.run_job(kind, job_key, compute, f"Running {what}…")
    except MergeExplorerError as exc:
        st.error(f"{exc} Results computed before it are kept.", icon=":material/error:")


store = calls.result_store("continual")
specs = [(LABELS[n], n, values_for.get(n, {})) for n in method_names]
pressed = st.button("Run continual merging", type="primary", key="run_continual", disabled=not method_names,
                    help=f"{len(method_names)} method(s) × {len(order)} task steps; each step merges one more task "
                         "and tests on all tasks seen so far. It runs on the server's shared queue, with progress "
                         "and a Cancel button below.")
run_all(specs, "continual merging", pressed, "continual")

stored = {run_key(n, v): calls.stored_result("continual", run_key(n, v)) for _, n, v in specs}
results = [stored[run_key(n, v)] for _, n, v in specs if stored[run_key(n, v)] is not None]
if not results:
    took = calls.measured("continual")
    st.info("Press **Run continual merging**" + (f" (a run of the selected methods has taken {took})." if took
                                                 else "."))
else:
    not_run = [label for label, n, v in specs if stored[run_key(n, v)] is None]
    if not_run:
        st.caption("Not run yet with these settings: " + ", ".join(not_run) + " (press the button).")
    st.dataframe([{"method": r["label"], "ACC (%)": round(r["ACC"], 1),
                   "BWT (points)": None if r["BWT"] is None else round(r["BWT"], 1),
                   "FWT (points)": None if r["FWT"] is None else round(r["FWT"], 1),
                   "merge time (s)": round(r["timings"]["merge_total_s"], 1)} for r in results],
                 hide_index=True, width="stretch")
    sections.budget_caption(act)  # MINGLE's seed images and every accuracy come from this budget
    sections.show_figure(figures.continual_seen_average_lines(results), "seen_average_chart",
        "after each new task is merged (x), the merged model's average accuracy over all tasks seen so far (y). "
        "A line that stays high keeps old tasks while adding new ones. ACC is the last point; BWT is how much "
        "accuracy on earlier tasks changed from when they were added to the end (0 = no forgetting).")

    labels = {r["method"]: r["label"] for r in results}
    shown = state.bind(st.selectbox, "matrix_method", results[0]["method"], "Accuracy matrix of", list(labels),
                        url_key="", format_func=labels.get, valid=lambda v: v in labels,
                        help="Which method's step × task accuracy matrix to show.")
    chosen = next(r for r in results if r["method"] == shown)
    sections.show_figure(figures.accuracy_matrix_heatmap(chosen), "accuracy_matrix_chart",
        "row i is the merged model right after the i-th task arrived; each cell is its accuracy on one task. "
        "The diagonal is how well a task is learnt when it arrives; reading a column downwards shows it being "
        "kept or forgotten as later tasks come in. Blank cells: tasks that had not arrived yet.")

    mingle = next((r for r in results if r["method"] == "mingle" and r.get("gates")), None)
    if mingle is not None:
        st.subheader("MINGLE's gates")
        paper_range = state.bind(st.toggle, "gate_paper_range", False, "Paper's y range (−0.3 to 1.3)",
                                  url_key="", help="Draw the gate panels on the MINGLE paper's fixed scale instead "
                                                   "of zooming in on the values (the demo zoo's gates are small).")
        sections.show_figure(figures.gate_activation_panels({"MINGLE (settings above)": mingle["gates"]},
                                                       paper_range=paper_range), "gate_panels_chart",
            "each panel is one gate, trained when its task arrived (grey bar). The curve is the gate's average "
            "output when the final model sees each task's test images. A gate that is high only at its own task "
            "routes inputs to the right expert; high values on other tasks mean its expert interferes there.")
        eval_task = state.bind(st.selectbox, "gate_eval_task", mingle["gates"]["eval_tasks"][0],
                                "Per-layer gates on images of", list(mingle["gates"]["eval_tasks"]), url_key="",
                                valid=lambda v: v in mingle["gates"]["eval_tasks"],
                                help="Which task's test images the per-layer heatmap averages over.")
        sections.show_figure(figures.gate_layer_heatmap(mingle["gates"], eval_task), "gate_layers_chart",
            "one row per gated linear layer, one column per gate: its mean raw output on this task's images. "
            "Red is positive (the expert is added), blue negative (subtracted); the dotted column is the task's "
            "own gate.")

st.divider()
st.subheader("How γ trades forgetting for learning")
st.markdown("MINGLE four times with the settings above, changing only the null-space constraint: none, the hard "
            "projection (γ = 0), and the relaxed one at γ = 1 and γ = 3. A smaller γ protects old tasks more.")
gamma_specs = [(label, "mingle", {**mingle_values, **change}) for label, change in GAMMA_VARIANTS.items()]
gamma_pressed = st.button("Run the γ comparison", key="run_gamma",
                          help="Four MINGLE runs over the task stream (those already run are reused), on the server's "
                               "shared queue with progress below.")
run_all(gamma_specs, "the γ comparison", gamma_pressed, "continual-gamma")
gamma_runs = {label: r for label, n, v in gamma_specs if (r := calls.stored_result("continual", run_key(n, v)))}
if len(gamma_runs) == len(gamma_specs):
    st.dataframe([{"variant": label, "ACC (%)": round(r["ACC"], 1),
                   "BWT (points)": None if r["BWT"] is None else round(r["BWT"], 2)}
                  for label, r in gamma_runs.items()], hide_index=True, width="stretch")
    gamma_figure = figures.gate_activation_panels({label: r["gates"] for label, r in gamma_runs.items()},
                                                  paper_range=state.settings().get("gate_paper_range", False))
    sections.show_figure(gamma_figure, "gamma_gates_chart",
        "the paper's Fig. 3 on this zoo: every gate's output on each task's images, one curve per variant. "
        "Left of the grey bar are tasks that arrived earlier: there the constraint should hold the gate down, "
        "more so for smaller γ, which is what keeps old tasks from being forgotten.")
else:
    took = calls.measured("continual-gamma")
    st.info("Press **Run the γ comparison** (four MINGLE runs" + (f"; it has taken {took})." if took else ")."))
