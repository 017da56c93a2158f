"""Learn: lessons that show how TIES and MINGLE work, step by step, on the current source's real weights.

A lesson is a list of steps (title, one or two sentences, a figure, at most two controls). The lesson,
the step and the lesson's settings live in the URL, so a lecturer can link to a step; Back / Next
(keys ← / →) move between steps. Every number comes from the engine: the TIES lesson from
engine.analysis.ties_steps (the engine's own TIES over the whole model, shown on a small block), the
MINGLE lesson from engine.analysis.gate_plane and a continual MINGLE run.
"""
from __future__ import annotations

import streamlit as st

from engine import figures, lesson_figures
from engine.analysis.gate_plane import DEFAULT_LAYER, GAMMAS
from engine.errors import MergeExplorerError
from pages.ui import calls, presenter, sections, state

LESSONS = {"ties": "TIES, step by step", "gates": "MINGLE's gates"}
TIES_STEPS = ["Task vectors", "Trim", "Elect", "Disjoint merge", "What TIES did"]
GATE_STEPS = ["Layer inputs", "Protected directions", "The new gate's update", "Relaxation γ", "Measured gates"]
TIES_K_DEFAULT = 20.0

state.start_page("learn")
st.title("Learn")
act = sections.active()
STEP_KEY = "w.learn.step"


def _set_step(step: int) -> None:
    """Go to `step` (a button's or the lesson switch's callback: the step widget follows)."""
    state.settings()["step"] = step
    st.session_state[STEP_KEY] = step


lesson = state.bind(st.segmented_control, "lesson", "ties", "Lesson", list(LESSONS), format_func=LESSONS.get,
                    valid=lambda v: v in LESSONS, on_change=_set_step, args=(1,),  # another lesson: step 1
                    help="Pick a lesson; each one walks through a method in a few steps.")
lesson = lesson or "ties"
steps = TIES_STEPS if lesson == "ties" else GATE_STEPS


def _move(delta: int) -> None:
    _set_step(min(max(int(state.settings().get("step", 1)) + delta, 1), len(steps)))


step = int(state.bind(st.select_slider, "step", 1, "Step", options=list(range(1, len(steps) + 1)),
                      format_func=lambda i: f"{i}. {steps[i - 1]}", valid=lambda v: isinstance(v, int)
                      and 1 <= v <= len(steps), label_visibility="collapsed",
                      help="Jump to a step; Back / Next (or ← / →) move one step."))
st.subheader(f"Step {step} of {len(steps)}: {steps[step - 1]}")
back, forward, _ = st.columns([1, 1, 3])
back.button("Back", key="step_back", icon=":material/arrow_back:", on_click=_move, args=(-1,), disabled=step <= 1,
            shortcut="Left", width="stretch", help="The previous step (key ←).")
forward.button("Next", key="step_next", icon=":material/arrow_forward:", on_click=_move, args=(1,),
               disabled=step >= len(steps), shortcut="Right", width="stretch", help="The next step (key →).")


# ---------------------------------------------------------------------------------------------- TIES


@st.cache_data(show_spinner="Running TIES on the whole model…", max_entries=64)
def lesson_block(source_key: str, tasks: tuple[str, ...], tensor: str, row: int, col: int, k: float,
                 _act) -> dict:
    from engine.analysis.ties_steps import ties_block

    return ties_block(_act.stack, list(tasks), tensor, row=row, col=col, k=k).to_json()


def ties_lesson() -> dict:
    from engine.analysis.ties_steps import BLOCK, block_tensors

    tensors = block_tensors(act.stack)
    default_tensor = next((t for t in tensors if "q_proj" in t), tensors[0])
    tasks = state.setting("lesson_tasks", act.tasks[:3])
    tasks = [t for t in tasks if t in act.tasks][:3] or act.tasks[:3]
    tensor = state.setting("tensor", default_tensor)
    tensor = tensor if tensor in tensors else default_tensor
    if step == 1 and not presenter.is_on():
        c1, c2, c3 = st.columns([3, 3, 2])
        tasks = state.bind(c1.multiselect, "lesson_tasks", tasks, "Three tasks", act.tasks, max_selections=3,
                           valid=lambda v: isinstance(v, list) and 1 <= len(v) <= 3 and all(t in act.tasks for t in v),
                           help="The experts whose task vectors the lesson merges (TIES works on any number; "
                                "three fit on a screen).") or tasks
        tensor = state.bind(c2.selectbox, "tensor", tensor, "Weight matrix", tensors, valid=lambda v: v in tensors,
                            format_func=figures.short_tensor_name,
                            help="Which weight matrix of the model the block is cut from (q_proj: the attention's "
                                 "query weights of the first block).")
    shape = act.stack.shapes[act.stack.names.index(tensor)]
    max_row, max_col = max(0, shape[0] - BLOCK), max(0, int(shape[1]) - BLOCK)
    row = int(state.setting("row", 0))
    col = int(state.setting("col", 0))
    if step == 1 and not presenter.is_on():
        with c3:
            row = state.bind(st.number_input, "row", 0, "First row", min_value=0, max_value=max_row, step=BLOCK,
                             valid=lambda v: isinstance(v, int) and 0 <= v <= max_row,
                             help="Where the 10×10 block starts inside the matrix (row).")
            col = state.bind(st.number_input, "col", 0, "First column", min_value=0, max_value=max_col, step=BLOCK,
                             valid=lambda v: isinstance(v, int) and 0 <= v <= max_col,
                             help="Where the 10×10 block starts inside the matrix (column).")
    row, col = min(int(row), max_row), min(int(col), max_col)
    k = float(state.setting("lesson_k", TIES_K_DEFAULT))
    if step >= 2:
        k = float(state.bind(st.slider, "lesson_k", TIES_K_DEFAULT, "Trim k (%)", min_value=1.0, max_value=100.0,
                             step=1.0, valid=lambda v: isinstance(v, (int, float)) and 1 <= v <= 100,
                             help="Each task vector keeps only its k % largest changes (counted over the whole "
                                  "model); everything smaller is reset to the pretrained value."))
    block = lesson_block(act.key, tuple(tasks), tensor, row, col, k, act)
    c = block["counts"]

    if step == 1:
        st.markdown("A **task vector** is what fine-tuning changed: the fine-tuned weights minus the pretrained "
                    "ones (τ = θ_task − θ₀). Here are three of them on the same 10×10 block of one weight "
                    "matrix; red means the weight went up, blue down.")
        sections.show_figure(lesson_figures.task_vector_block(block), "lesson_ties_vectors",
                             "one square per weight, one panel per task, one colour scale for all three. Hover for "
                             "the exact change. TIES merges these numbers cell by cell.")
    elif step == 2:
        st.markdown(f"**Trim:** each task keeps only its {k:g} % largest changes, counted over the *whole* model, "
                    "so a value survives if it is bigger than that task's threshold. Small changes are mostly "
                    "noise, and dropping them removes many needless clashes.")
        sections.show_figure(lesson_figures.trimmed_block(block), "lesson_ties_trim",
                             f"faded cells fall below their task's threshold and are reset to θ₀: "
                             f"{c['dropped_by_trim']} of the {c['values']} values in this block.")
        shown_task = tasks[0]
        if not presenter.is_on():
            shown_task = state.bind(st.selectbox, "hist_task", tasks[0], "Histogram of", tasks,
                                    valid=lambda v: v in tasks, help="Whose task vector the histogram below shows.")
        hist = calls.magnitude_report(act.key, shown_task, k, "global", act)
        sections.show_figure(figures.magnitude_histogram(hist, task=shown_task, k=k), "lesson_ties_hist",
                             "all of this task's changes in the whole model, by size (log scale); the red line is "
                             "the threshold. Everything left of it is dropped.")
    elif step == 3:
        st.markdown("**Elect:** in each cell, add up the values that survived the trim; the sign of the sum (the "
                    "side with more total weight) becomes the cell's sign. Framed cells are where the tasks "
                    "disagreed: one pushed the weight up, another down.")
        sections.show_figure(lesson_figures.elected_block(block), "lesson_ties_elect",
                             f"{c['conflicting_cells']} of the {c['cells']} cells have a conflict; "
                             f"{c['outvoted_values']} kept values lose the vote and are left out of the merge.")
    elif step == 4:
        st.markdown("**Disjoint merge:** in each cell, average only the values whose sign matches the elected one. "
                    "Task Arithmetic instead adds every change, so opposite changes cancel and small noise adds up.")
        sections.show_figure(lesson_figures.merged_block(block), "lesson_ties_merge",
                             "left: TIES's merged change; middle: Task Arithmetic's plain sum; right: their "
                             f"difference. TIES leaves {c['reset_cells']} cells at θ₀, where no task kept a value.")
    else:
        st.markdown("**What TIES did to this block:** trim dropped most values, the election settled the conflicts, "
                    "and the merge kept only agreeing changes. Every number here is the engine's own TIES run on the "
                    "whole model (with its model-wide trim thresholds), cut to this block.")
        sections.show_figure(lesson_figures.lesson_counts(block), "lesson_ties_counts",
                             "each bar counts one effect of a TIES step on this block; the label says out of how many.")
        st.markdown("Now see the same setting on the whole model:")
        l1, l2 = st.columns(2)
        l1.button("Open Merge with k and these tasks", key="to_merge", on_click=_open_with, args=("merge", tasks, k),
                  icon=":material/call_merge:", help="The accuracy of this TIES merge on every task.")
        l2.button("Open Interference with k and these tasks", key="to_interference", on_click=_open_with,
                  args=("interference", tasks, k), icon=":material/bolt:",
                  help="Where these task vectors conflict, layer by layer.")
        target = st.session_state.pop("lesson_target", None)
        if target:
            st.switch_page(f"pages/views/{target}.py")
    return {"lesson_tasks": ",".join(tasks), "tensor": tensor if tensor != default_tensor else None,
            "row": row or None, "col": col or None, "lesson_k": k if k != TIES_K_DEFAULT else None}


def _open_with(page: str, tasks: list[str], k: float) -> None:
    """Carry the lesson's k and tasks to Merge or Interference (their TIES settings and task choice)."""
    store = state.settings()
    store.update({"method": "ties", "ties.k": float(k), "tasks": list(tasks)})
    for key in [k_ for k_ in st.session_state if str(k_).endswith((".ties.k", ".tasks", ".method"))]:
        del st.session_state[key]
    st.session_state["lesson_target"] = page


# ---------------------------------------------------------------------------------------------- MINGLE


def gates_lesson() -> dict:
    if not act.can_evaluate:
        st.info(f"{act.label} has no test images, and MINGLE learns its gates from unlabelled test images: "
                "open this lesson on the demo zoo or a suite file.")
        return {}
    tasks = state.setting("gate_tasks", act.tasks[:3])
    tasks = [t for t in tasks if t in act.tasks] or act.tasks[:3]
    if step == 1 and not presenter.is_on():
        tasks = state.bind(st.multiselect, "gate_tasks", tasks, "Tasks, in merge order", act.tasks,
                           max_selections=4,
                           valid=lambda v: isinstance(v, list) and 2 <= len(v) <= 4 and all(t in act.tasks for t in v),
                           help="MINGLE merges them one after another; the last one is the new task whose gate the "
                                "lesson follows.") or tasks
    if len(tasks) < 2:
        st.warning("Choose at least two tasks: earlier ones to protect and a new one.")
        return {}
    gamma = float(state.setting("gamma", 1.0))
    if step >= 4:
        gamma = float(state.bind(st.select_slider, "gamma", 1.0, "γ (relaxation)", options=list(GAMMAS),
                                 valid=lambda v: v in GAMMAS,
                                 help="0 = hard projection (nothing may change along protected directions); larger "
                                      "γ lets more through where the new task's update keeps pointing."))
    key = calls.key_of(act.key, "gate-plane", tasks, DEFAULT_LAYER, act.limit)

    def compute(progress) -> dict:
        from engine.analysis.gate_plane import gate_plane

        return gate_plane(act.suite, tasks, layer=DEFAULT_LAYER, limit=act.limit, progress=progress).to_json()

    try:
        plane = calls.run_job("gate-plane", key, compute, "Running MINGLE on the earlier tasks…")
    except MergeExplorerError as exc:
        st.error(str(exc), icon=":material/error:")
        return {"gate_tasks": ",".join(tasks)}
    earlier, new = ", ".join(plane["earlier"]), plane["new"]
    if step == 1:
        st.markdown(f"MINGLE adds tasks one at a time, and each layer of the model sees one input vector per image "
                    f"patch. Here are the inputs of `{plane['layer']}` for {earlier} (merged earlier) and {new} "
                    f"(the new task), flattened from {plane['input_dim']} numbers to 2 so they fit on the screen.")
        fig = lesson_figures.gate_plane({**plane, "protected": [], "raw": None, "hard": None, "relaxed": {}},
                                        gamma=gamma)
        sections.show_figure(fig, "lesson_gates_inputs",
                             "one dot per image patch; the axes are the two directions along which the earlier "
                             "tasks' inputs vary most (PCA without centring).")
    elif step == 2:
        st.markdown("After each task, MINGLE remembers the few input directions that task used most: the "
                    "**protected directions**. A later task must not change how the layer reacts along them, "
                    "or the earlier task would suffer.")
        fig = lesson_figures.gate_plane({**plane, "raw": None, "hard": None, "relaxed": {}}, gamma=gamma)
        sections.show_figure(fig, "lesson_gates_protected",
                             f"dotted lines: the {len(plane['protected'])} protected directions of this layer "
                             "(seen from the 2-D view, so some look short).")
    elif step == 3:
        st.markdown("The new task gets a **gate**, a score computed from the input that switches its expert on, and "
                    "training nudges the gate in the direction that helps the new task most (grey). MINGLE first "
                    "removes the part of that nudge along protected directions (red), so inputs like the earlier "
                    "tasks' do not switch the new expert on.")
        fig = lesson_figures.gate_plane({**plane, "relaxed": {}}, gamma=gamma)
        hard_share = plane["kept_norm"]["0"]
        sections.show_figure(fig, "lesson_gates_update",
                             f"arrows show directions only. The hard projection keeps {100 * hard_share:.0f} % of the "
                             "update's length; the rest pointed along protected directions.")
    elif step == 4:
        st.markdown("A hard projection can block the new task too much. MINGLE relaxes it: directions the new task "
                    "keeps pushing on are let through a little, more so for larger **γ**.")
        kept = plane["kept_norm"][lesson_figures.nearest_gamma(plane, gamma)]
        sections.show_figure(lesson_figures.gate_plane(plane, gamma=gamma), "lesson_gates_relaxed",
                             "blue: the update after the relaxed projection for this γ, between the hard "
                             f"projection (red) and none (grey); it keeps {100 * kept:.0f} % of the update's length.")
        if not presenter.is_on():
            sections.show_figure(lesson_figures.projection_strength(plane, gamma=gamma), "lesson_gates_strength",
                                 "for each protected direction, how much of the update along it survives; γ = 0 "
                                 "lets nothing through. It assumes the update keeps its direction for the 50 "
                                 "training steps, as MINGLE's running average of alignment does.")
    else:
        st.markdown(f"Finally, the measured result: MINGLE merged {', '.join(tasks)} in this order with γ = {gamma:g}. "
                    "Each panel is one gate; a good gate is high on its own task (grey) and low on the others.")
        run_key = calls.key_of(act.key, "gate-lesson-run", tasks, gamma, act.limit)

        def run(progress) -> dict:
            from engine.continual import make_method, method_config, run_continual

            method = make_method("mingle", method_config("mingle", {"gamma": gamma}), act.suite.build_encoder)
            return run_continual(act.suite, method, tasks, gate_stats=True, progress=progress,
                                 limit=act.limit).to_json()

        pressed = st.button("Run MINGLE on these tasks", key="run_gate_lesson", type="primary",
                            help=f"Merges {len(tasks)} tasks with MINGLE's defaults and γ = {gamma:g}, then measures "
                                 "every gate on every task's test images. " + calls.measured("gate-lesson"))
        if calls.asked("gate-lesson", run_key, pressed):
            try:
                result = calls.run_job("gate-lesson", run_key, run, "Running MINGLE and measuring its gates…")
                gates = result["gates"]
                sections.show_figure(figures.gate_activation_panels({f"γ = {gamma:g}": gates}),
                                     "lesson_gates_measured",
                                     "mean gate output per test set; the grey band marks the gate's own task. Here "
                                     f"{gates['routed_tasks']} of {len(gates['gate_tasks'])} tasks switch on their "
                                     "own gate most; "
                                     f"average accuracy after the last step: {result['ACC']:.1f} %.")
            except MergeExplorerError as exc:
                st.error(str(exc), icon=":material/error:")
    return {"gate_tasks": ",".join(tasks), "gamma": gamma if gamma != 1.0 else None}


lesson_params = ties_lesson() if lesson == "ties" else gates_lesson()
state.sync_url({"lesson": lesson, "step": step, **lesson_params})
