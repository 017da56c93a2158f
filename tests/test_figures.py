"""engine.figures: every figure from hand-made results, as a page would call it.

Each test also checks the teaching contract: a title, axis titles with units, and the
random-sign baseline drawn dashed where there is one.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import plotly.graph_objects as go
import pytest

from engine import figures
from engine.sweep import SweepResult

TASKS = ["digits", "shapes", "textures"]


def assert_labelled(fig: go.Figure, *, x_unit: str | None = None, y_unit: str | None = None) -> None:
    assert isinstance(fig, go.Figure)
    assert fig.layout.title.text, "every figure needs a title"
    # panels side by side may share one x title (on one of them)
    assert any(fig.layout[name].title.text for name in fig.layout if name.startswith("xaxis")), \
        "every figure needs an x-axis title"
    assert fig.layout.yaxis.title.text, "every figure needs a y-axis title"
    if x_unit:
        assert x_unit in fig.layout.xaxis.title.text
    if y_unit:
        assert y_unit in fig.layout.yaxis.title.text
    fig.to_json()  # serialisable, as st.plotly_chart needs


def trace(fig: go.Figure, name: str):
    matches = [t for t in fig.data if t.name == name]
    assert matches, f"no trace {name!r} in {[t.name for t in fig.data]}"
    return matches[0]


def test_accuracy_bars_absolute_shows_three_series_in_percent():
    merged = {"digits": 80.0, "shapes": 60.0, "textures": 50.0}  # percent, as engine.evaluate
    individual = {"digits": 95.0, "shapes": 90.0, "textures": 75.0}
    pretrained = {"digits": 30.0, "shapes": 20.0, "textures": 25.0}
    fig = figures.accuracy_bars(TASKS, merged, individual, pretrained, merged_label="TIES")
    assert_labelled(fig, y_unit="%")
    assert list(trace(fig, "TIES").y) == pytest.approx([80.0, 60.0, 50.0])
    assert list(trace(fig, "individual expert").y) == pytest.approx([95.0, 90.0, 75.0])
    assert list(trace(fig, "pretrained (zero-shot)").y) == pytest.approx([30.0, 20.0, 25.0])
    assert list(trace(fig, "TIES").x) == TASKS


def test_accuracy_bars_normalised_divides_by_the_expert():
    merged = {"digits": 50.0, "shapes": 45.0}
    individual = {"digits": 100.0, "shapes": 90.0}
    fig = figures.accuracy_bars(["digits", "shapes"], merged, individual, normalized=True)
    assert_labelled(fig, y_unit="%")
    assert list(trace(fig, "merged").y) == pytest.approx([50.0, 50.0])
    assert all(t.name != "individual expert" for t in fig.data)  # it is the 100 % line instead
    assert fig.layout.shapes[0].y0 == 100.0
    with pytest.raises(ValueError):
        figures.accuracy_bars(["digits"], merged, None, normalized=True)


def test_layer_grouping_and_parameter_weighted_aggregate():
    assert figures.layer_of("visual.transformer.resblocks.3.attn.in_proj_weight") == "resblocks.3"
    assert figures.layer_of("visual.conv1.weight") == "visual.conv1"
    assert figures.layer_of("encoder.layers.11.mlp.fc1.weight") == "layers.11"  # canonical (HF) names
    assert figures.short_tensor_name("encoder.layers.11.mlp.fc1.weight") == "layers.11.mlp.fc1.weight"
    per_tensor = {
        "visual.transformer.resblocks.10.mlp.c_fc.weight": {"rate_all": 0.5},
        "visual.transformer.resblocks.2.attn.in_proj_weight": {"rate_all": 0.1},
        "visual.transformer.resblocks.2.ln_1.bias": {"rate_all": 0.4},
        "visual.conv1.weight": {"rate_all": 0.2},
    }
    numels = {"visual.transformer.resblocks.2.attn.in_proj_weight": 300,
              "visual.transformer.resblocks.2.ln_1.bias": 100}
    layers, rates = figures.aggregate_by_layer(per_tensor, numels)
    assert layers == ["visual.conv1", "resblocks.2", "resblocks.10"]  # input side first, numeric order
    assert rates[1] == pytest.approx((300 * 0.1 + 100 * 0.4) / 400)


def test_conflict_by_tensor_bars_have_a_dashed_random_baseline():
    per_tensor = {
        "visual.transformer.resblocks.0.attn.in_proj_weight": {"rate_all": 0.12, "random_baseline": 0.10},
        "visual.transformer.resblocks.1.attn.in_proj_weight": {"rate_all": 0.20, "random_baseline": 0.10},
    }
    fig = figures.conflict_by_tensor_bars(per_tensor, k=20)
    assert_labelled(fig, y_unit="%")
    bars = fig.data[0]
    assert list(bars.y) == pytest.approx([12.0, 20.0])
    assert list(bars.x) == ["resblocks.0.attn.in_proj_weight", "resblocks.1.attn.in_proj_weight"]
    base = trace(fig, figures.BASELINE_NAME)
    assert base.line.dash == "dash"
    assert "k = 20 %" in fig.layout.title.text
    by_layer = figures.conflict_by_tensor_bars(per_tensor, by_layer=True)
    assert list(by_layer.data[0].x) == ["resblocks.0", "resblocks.1"]


def test_layer_k_matrix_pools_tensor_curves_into_layers():
    curves = {"encoder.layers.0.mlp.fc1.weight": [0.1, 0.3], "encoder.layers.0.layer_norm1.bias": [0.5, 0.5],
              "encoder.layers.1.mlp.fc1.weight": [0.2, 0.4]}
    numels = {"encoder.layers.0.mlp.fc1.weight": 3, "encoder.layers.0.layer_norm1.bias": 1,
              "encoder.layers.1.mlp.fc1.weight": 8}
    layers, z = figures.layer_k_matrix(curves, numels)
    assert layers == ["layers.0", "layers.1"]
    assert z[0] == pytest.approx([(3 * 0.1 + 0.5) / 4, (3 * 0.3 + 0.5) / 4]) and z[1] == pytest.approx([0.2, 0.4])


def test_conflict_bars_use_the_baseline_of_the_chosen_denominator():
    per_tensor = {"a.0.w": {"rate_nonzero2": 0.4, "random_baseline": 0.1, "random_baseline_nonzero2": 0.6}}
    fig = figures.conflict_by_tensor_bars(per_tensor, metric="rate_nonzero2")
    assert list(trace(fig, figures.BASELINE_NAME).y) == pytest.approx([60.0])
    assert "≥ 2" in fig.layout.yaxis.title.text


def test_conflict_layer_k_heatmap_is_layers_by_k_in_percent():
    fig = figures.conflict_layer_k_heatmap(["resblocks.0", "resblocks.1"], [10, 20, 50],
                                           [[0.01, 0.02, 0.10], [0.03, 0.05, 0.20]])
    assert_labelled(fig, x_unit="%")
    hm = fig.data[0]
    assert list(hm.x) == ["10", "20", "50"]
    assert hm.z[1][2] == pytest.approx(20.0)
    marked = figures.conflict_layer_k_heatmap(["a"], [10, 20, 50], [[0.1, 0.2, 0.3]], current_k=23)
    assert marked.layout.shapes[0].x0 == 0.5  # the k = 20 column is outlined


def test_conflict_vs_k_and_vs_n_tasks_with_baseline():
    k_curve = {"k": [5, 20, 50, 100], "rate_all": [0.001, 0.02, 0.12, 0.45],
               "rate_nonzero2": [0.3, 0.4, 0.45, 0.45], "random_baseline": [0.0007, 0.0116, 0.0703, 0.5]}
    fig = figures.conflict_vs_k(k_curve, current_k=20)
    assert_labelled(fig, x_unit="%", y_unit="%")
    assert list(trace(fig, figures.BASELINE_NAME).y) == pytest.approx([0.07, 1.16, 7.03, 50.0])
    assert trace(fig, figures.BASELINE_NAME).line.dash == "dash"
    assert len([t for t in fig.data if t.name.startswith("measured")]) == 2
    assert fig.layout.shapes[0].x0 == 20  # the current k is marked

    # random baseline of docs/methods.md at k = 0.2: 1 - 2*0.9^n + 0.8^n
    ns = [2, 3, 4]
    n_curve = {"n": ns, "rate_all": [0.03, 0.07, 0.12],
               "random_baseline": [1 - 2 * 0.9 ** n + 0.8 ** n for n in ns]}
    fig = figures.conflict_vs_n_tasks(n_curve, k=20)
    assert_labelled(fig, y_unit="%")
    assert trace(fig, figures.BASELINE_NAME).y[0] == pytest.approx(2.0)
    assert "k = 20 %" in fig.layout.title.text


def test_pairwise_heatmap_is_square_and_symmetric_input_is_kept():
    m = [[None, 0.3, 0.4], [0.3, None, 0.5], [0.4, 0.5, None]]
    fig = figures.pairwise_conflict_heatmap(TASKS, m)
    assert_labelled(fig)
    hm = fig.data[0]
    assert list(hm.x) == TASKS and list(hm.y) == TASKS
    assert hm.z[0][1] == pytest.approx(30.0) and hm.z[0][0] is None
    zero_diagonal = figures.pairwise_conflict_heatmap(TASKS[:2], [[0.0, 0.3], [0.3, 0.0]])
    assert zero_diagonal.data[0].z[1][1] is None


def test_magnitude_histogram_marks_the_threshold_and_splits_kept_from_trimmed():
    hist = {"edges": [-6, -5, -4, -3, -2], "counts": [10, 40, 30, 20], "threshold": 10 ** -3.2,
            "kept_fraction": 0.2}
    fig = figures.magnitude_histogram(hist, task="digits", k=20)
    assert_labelled(fig, x_unit="log10", y_unit="fraction of parameters")
    kept, dropped = trace(fig, "kept by the trim"), trace(fig, "trimmed to zero")
    assert list(kept.x) == [-2.5] and list(dropped.x) == [-5.5, -4.5, -3.5]
    assert sum(kept.y) + sum(dropped.y) == pytest.approx(1.0)
    line = fig.layout.shapes[0]
    assert line.x0 == pytest.approx(-3.2) and line.line.dash == "dash"
    assert "20.0 %" in fig.layout.annotations[0].text
    assert "digits" in fig.layout.title.text


def _sweep(method, label, values, avg, varies=True):
    """Accuracies in percent, normalised averages as ratios (experts at 90 %), as engine.sweep."""
    return SweepResult(method=method, label=label, param="lam", values=values, config={}, tasks=TASKS,
                       per_task={t: list(avg) for t in TASKS}, average=list(avg),
                       normalized_average=[a / 90.0 for a in avg], varies=varies)


def test_sweep_lines_put_methods_on_one_axis():
    values = [0.2, 0.6, 1.0]
    results = [_sweep("average", "Weight averaging", values, [50.0] * 3, varies=False),
               _sweep("task-arithmetic", "Task Arithmetic", values, [50.0, 70.0, 40.0]),
               _sweep("ties", "TIES", values, [40.0, 60.0, 75.0])]
    fig = figures.sweep_lines(results)
    assert_labelled(fig, y_unit="%")
    assert "λ" in fig.layout.xaxis.title.text
    assert len(fig.data) == 3
    assert list(trace(fig, "TIES").y) == pytest.approx([40.0, 60.0, 75.0])
    flat = trace(fig, "Weight averaging (has no λ)")
    assert flat.line.dash == "dash"
    norm = figures.sweep_lines([r.to_json() for r in results], normalized=True)
    assert trace(norm, "TIES").y[2] == pytest.approx(75.0 / 0.9)
    per_task = figures.sweep_lines(results, metric="shapes", normalized=True,
                                   individual={"shapes": 80.0})
    assert trace(per_task, "TIES").y[0] == pytest.approx(50.0)


def test_sweep_per_task_lines_one_line_per_task():
    r = _sweep("ties", "TIES", [0.5, 1.0], [60.0, 70.0])
    fig = figures.sweep_per_task_lines(r)
    assert_labelled(fig, y_unit="%")
    assert [t.name for t in fig.data] == TASKS
    assert not any(v is None or math.isnan(v) for v in fig.data[0].y)


# --------------------------------------------------------------------------- engine.sweep


def _tiny_stack():
    import torch

    from engine.task_vectors import TaskVectorStack

    g = torch.Generator().manual_seed(0)
    base = {"layers.0.w": torch.randn(4, 3, generator=g), "layers.1.b": torch.randn(5, generator=g)}
    experts = [{n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(3)]
    return TaskVectorStack.from_state_dicts(base, experts, tasks=TASKS)


class _Report:
    def __init__(self, per_task):
        self.per_task = per_task
        self.average = sum(per_task.values()) / len(per_task)
        self.normalized_average = self.average / 90.0


def _distance_accuracy(stack):
    """A stand-in for engine.evaluate: accuracy (%) falls with the distance from each expert."""
    import torch

    def evaluate_fn(state_dict):
        delta = torch.cat([(state_dict[n].float() - stack.base[n].float()).reshape(-1) for n in stack.names])
        return _Report({t: float(100.0 - 50.0 * (delta - stack.data[i]).norm()) for i, t in enumerate(stack.tasks)})

    return evaluate_fn


def test_sweep_merges_at_every_value_and_reports_progress():
    from engine.methods import get_method
    from engine.sweep import sweep

    stack = _tiny_stack()
    seen = []
    result = sweep(stack, get_method("task-arithmetic"), "lam", [0.0, 0.5, 1.0],
                   evaluate_fn=_distance_accuracy(stack), progress=lambda f, m: seen.append(f))
    assert result.values == [0.0, 0.5, 1.0] and result.varies
    assert len(result.average) == 3 and set(result.per_task) == set(TASKS)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    # λ = 0 is the pretrained model: same accuracy as evaluating θ0 directly
    assert result.average[0] == pytest.approx(_distance_accuracy(stack)(stack.base).average)
    assert result.best()[0] in result.values
    json_ready = result.to_json()
    assert json_ready["param"] == "lam" and json_ready["method"] == "task-arithmetic"


def test_sweep_keeps_other_hyperparameters_and_flattens_methods_without_the_parameter():
    from engine.methods import get_method
    from engine.sweep import sweep_methods

    stack = _tiny_stack()
    calls = []

    def counting(state_dict):
        calls.append(1)
        return _distance_accuracy(stack)(state_dict)

    fractions = []
    average, ties = sweep_methods(stack, [get_method("average"), get_method("ties")], "k", [10.0, 50.0, 100.0],
                                  evaluate_fn=counting, configs={"ties": {"lam": 0.7, "k": 99.0}},
                                  progress=lambda f, m: fractions.append(f))
    assert len(calls) == 1 + 3  # averaging has no k: evaluated once, drawn flat
    assert not average.varies and len(set(average.average)) == 1 and len(average.average) == 3
    assert ties.varies and ties.config == {"lam": 0.7}  # the swept k is not "held fixed"
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    fig = figures.sweep_lines([average, ties])
    assert "k" in fig.layout.title.text and len(fig.data) == 2


# --------------------------------------------------------------------------- continual merging


def _continual(method="mingle", label="MINGLE", matrix=None, order=("a", "b", "c"), acc=None, bwt=-5.0):
    """A ContinualResult.to_json() by hand: accuracies in %, None above the diagonal (unseen tasks)."""
    matrix = matrix or [[90.0, None, None], [80.0, 70.0, None], [60.0, 65.0, 85.0]]
    last = matrix[-1]
    return {"method": method, "label": label, "config": {}, "order": list(order), "acc_matrix": matrix,
            "ACC": acc if acc is not None else sum(last) / len(last), "BWT": bwt, "FWT": None,
            "timings": {"merge_total_s": 1.0}}


def test_seen_average_is_the_mean_over_the_tasks_seen_so_far():
    assert figures.seen_average([[50.0, None], [40.0, 60.0]]) == pytest.approx([50.0, 50.0])
    # row i averages columns 0..i only: (80 + 70) / 2 = 75, (60 + 65 + 85) / 3 = 70
    assert figures.seen_average(_continual()["acc_matrix"]) == pytest.approx([90.0, 75.0, 70.0])
    assert figures.seen_average([[100.0]]) == [100.0]


def test_continual_seen_average_lines_one_line_per_method_ending_at_acc():
    results = [_continual(),
               _continual("task-arithmetic", "C-Task Arithmetic",
                          [[100.0, None, None], [50.0, 60.0, None], [30.0, 40.0, 50.0]], bwt=-40.0)]
    fig = figures.continual_seen_average_lines(results)
    assert_labelled(fig, y_unit="%")
    assert [t.name for t in fig.data] == ["MINGLE (ACC 70.0 %)", "C-Task Arithmetic (ACC 40.0 %)"]
    assert list(fig.data[0].y) == pytest.approx([90.0, 75.0, 70.0])
    assert list(fig.data[1].y) == pytest.approx([100.0, 55.0, 40.0])
    assert list(fig.data[0].x) == [1, 2, 3]
    assert fig.data[0].y[-1] == pytest.approx(results[0]["ACC"])  # ACC is the last point
    assert fig.data[0].line.color != fig.data[1].line.color
    # each step's tick names the task merged at that step
    assert [t.split("+")[-1] for t in fig.layout.xaxis.ticktext] == ["a", "b", "c"]


def test_accuracy_matrix_heatmap_is_steps_by_tasks_with_blank_unseen_cells():
    result = _continual(order=("digits", "shapes", "textures"))
    fig = figures.accuracy_matrix_heatmap(result)
    assert_labelled(fig)
    heat = fig.data[0]
    assert heat.type == "heatmap"
    assert [list(row) for row in heat.z] == [[90.0, None, None], [80.0, 70.0, None], [60.0, 65.0, 85.0]]
    assert list(heat.x) == ["digits", "shapes", "textures"]
    assert len(heat.y) == 3 and heat.y[1].endswith("shapes")
    assert (heat.zmin, heat.zmax) == (0, 100)
    assert "ACC 70.0 %" in fig.layout.title.text and "BWT -5.0" in fig.layout.title.text
    assert [list(row) for row in heat.text][0] == ["90", "", ""]  # no number printed in unseen cells
    assert "BWT" not in figures.accuracy_matrix_heatmap(_continual(bwt=None)).layout.title.text


def _gates(mean, std, gates=("a", "b", "c"), layers=("l1", "l2")):
    return {"gate_tasks": list(gates), "eval_tasks": list(gates), "layers": list(layers), "mean": mean,
            "std": std, "per_layer": {name: mean for name in layers}}


def test_gate_activation_panels_one_panel_per_gate_with_own_task_marked():
    run1 = _gates([[1.0, 0.1, 0.0], [0.2, 0.9, -0.1], [0.0, 0.3, 0.8]],
                  [[0.1, 0.05, 0.0], [0.1, 0.1, 0.1], [0.0, 0.1, 0.2]])
    # the second run leaves the paper's [-0.3, 1.3] range on both sides
    run2 = _gates([[1.5, 0.0, 0.0], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]],
                  [[0.4, 0.0, 0.0], [0.0, 0.0, 0.2], [0.0, 0.0, 0.0]])
    fig = figures.gate_activation_panels({"γ = 0": run1, "γ = 1": run2})
    assert_labelled(fig)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["gate 1: a", "gate 2: b", "gate 3: c"]
    # one grey own-task bar per gate, centred on that gate's own task in its own panel
    shapes = fig.layout.shapes
    assert len(shapes) == 3
    assert [(s.x0 + s.x1) / 2 for s in shapes] == pytest.approx([0.0, 1.0, 2.0])
    assert len({s.xref for s in shapes}) == 3
    # each run is one legend entry (its band and other panels are grouped under it)
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == ["γ = 0", "γ = 1"]
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 2 * 3
    assert list(lines[3 + 1].y) == pytest.approx([0.0, 1.0, -0.5])  # run 2, gate 2
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 2 * 3
    # band of run 2, gate 1: upper = mean + std, then lower = mean - std reversed
    assert list(bands[3].y) == pytest.approx([1.9, 0.0, 0.0, 0.0, 0.0, 1.1])
    lo, hi = fig.layout.yaxis.range
    assert lo <= -0.7 and hi >= 1.9  # covers every mean ± std
    assert lo > -0.7 - 0.2 and hi < 1.9 + 0.2  # with a small margin, not a blind autoscale


def test_gate_layer_heatmap_picks_the_eval_task_column_of_every_layer():
    stats = _gates([[0.0] * 3] * 3, [[0.0] * 3] * 3)
    # per_layer[layer][gate][eval task]
    stats["per_layer"] = {"l1": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]],
                          "l2": [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]]}
    fig = figures.gate_layer_heatmap(stats, "b")
    assert_labelled(fig)
    heat = fig.data[0]
    assert [list(r) for r in heat.z] == [[2.0, 5.0, 8.0], [-2.0, -5.0, -8.0]]
    assert list(heat.y) == ["l1", "l2"] and list(heat.x) == ["1: a", "2: b", "3: c"]
    assert heat.zmid == 0 and heat.zmax == pytest.approx(8.0) and heat.zmin == pytest.approx(-8.0)
    own = fig.layout.shapes[0]
    assert (own.x0, own.x1) == (0.5, 1.5)  # task b's own gate is column 2
    assert "'b'" in fig.layout.title.text
    with pytest.raises(ValueError):
        figures.gate_layer_heatmap(stats, "not-a-task")


# --------------------------------------------------------------------------- RI comparison


def test_ri_accuracy_bars_absolute_and_normalised():
    without = {"digits": 40.0, "shapes": 30.0}
    with_ri = {"digits": 60.0, "shapes": 45.0}
    individual = {"digits": 80.0, "shapes": 90.0}
    fig = figures.ri_accuracy_bars(["digits", "shapes"], without, with_ri, individual, method_label="TIES")
    assert_labelled(fig, y_unit="%")
    assert list(trace(fig, "TIES, original experts").y) == pytest.approx([40.0, 30.0])
    assert list(trace(fig, "TIES, RI-adapted experts").y) == pytest.approx([60.0, 45.0])
    assert list(trace(fig, "individual expert").y) == pytest.approx([80.0, 90.0])
    assert trace(fig, "TIES, original experts").marker.color != trace(fig, "TIES, RI-adapted experts").marker.color

    norm = figures.ri_accuracy_bars(["digits", "shapes"], without, with_ri, individual, normalized=True,
                                    method_label="TIES")
    assert_labelled(norm, y_unit="%")
    assert list(trace(norm, "TIES, original experts").y) == pytest.approx([100 * 40 / 80, 100 * 30 / 90])
    assert list(trace(norm, "TIES, RI-adapted experts").y) == pytest.approx([100 * 60 / 80, 100 * 45 / 90])
    assert all(t.name != "individual expert" for t in norm.data)  # the experts are 100 % there
    assert "expert" in norm.layout.yaxis.title.text


def test_interference_bars_show_each_variants_total_in_the_legend():
    xi = {"original experts": {"digits": 0.5, "shapes": 0.25},
          "RI-adapted experts": {"digits": 0.1, "shapes": 0.05}}
    fig = figures.interference_bars(["digits", "shapes"], xi)
    assert_labelled(fig)
    assert "nats" in fig.layout.yaxis.title.text
    assert [t.name for t in fig.data] == ["original experts (total 0.75)", "RI-adapted experts (total 0.15)"]
    assert list(fig.data[0].y) == pytest.approx([0.5, 0.25]) and list(fig.data[1].y) == pytest.approx([0.1, 0.05])
    assert list(fig.data[0].x) == ["digits", "shapes"]
    assert fig.data[0].marker.color != fig.data[1].marker.color


def _ri_sweep(method, label, avg, ri, varies=True):
    r = _sweep(method, label, [0.2, 0.6, 1.0], avg, varies=varies)
    r.extra["ri"] = ri
    return r


def test_sweep_lines_with_ri_draw_originals_dotted_in_the_same_colour():
    results = [_ri_sweep("task-arithmetic", "Task Arithmetic", [50.0, 70.0, 40.0], False),
               _ri_sweep("ties", "TIES", [40.0, 60.0, 75.0], False),
               _ri_sweep("task-arithmetic", "Task Arithmetic", [55.0, 72.0, 60.0], True),
               _ri_sweep("ties", "TIES", [45.0, 66.0, 76.0], True)]
    fig = figures.sweep_lines(results)
    assert_labelled(fig, y_unit="%")
    assert sorted(t.name for t in fig.data) == ["TIES (original experts)", "TIES + RI",
                                                "Task Arithmetic (original experts)", "Task Arithmetic + RI"]
    for label in ("Task Arithmetic", "TIES"):
        original, adapted = trace(fig, f"{label} (original experts)"), trace(fig, f"{label} + RI")
        assert original.line.color == adapted.line.color
        assert original.line.dash == "dot" and adapted.line.dash == "solid"
    assert list(trace(fig, "TIES + RI").y) == pytest.approx([45.0, 66.0, 76.0])
    assert list(trace(fig, "TIES (original experts)").y) == pytest.approx([40.0, 60.0, 75.0])
    # as dicts (the app's stored results) the same; without any RI result no suffix at all
    assert [t.name for t in figures.sweep_lines([r.to_json() for r in results]).data] == [t.name for t in fig.data]
    plain = figures.sweep_lines(results[:2])
    assert [t.name for t in plain.data] == ["Task Arithmetic", "TIES"]
    assert all(t.line.dash == "solid" for t in plain.data)


def test_sweep_lines_with_ri_same_colour_for_a_method_without_a_fixed_colour():
    results = [_ri_sweep("my-method", "Mine", [50.0, 70.0, 40.0], False),
               _ri_sweep("my-method", "Mine", [55.0, 72.0, 60.0], True)]
    fig = figures.sweep_lines(results)
    assert trace(fig, "Mine (original experts)").line.color == trace(fig, "Mine + RI").line.color


# --------------------------------------------------------------------------- the lean template


def _trace_types_drawn(source: str) -> set[str]:
    """Trace types a figure module constructs: go.Bar(...), fig.add_heatmap(...), ..."""
    from plotly.basedatatypes import BaseTraceType

    names = set()
    for cls in re.findall(r"\bgo\.([A-Z]\w*)\(", source):
        obj = getattr(go, cls, None)
        if isinstance(obj, type) and issubclass(obj, BaseTraceType):
            names.add(obj().type)
    trace_names = {getattr(go, c)().type for c in dir(go)
                   if isinstance(getattr(go, c), type) and issubclass(getattr(go, c), BaseTraceType)}
    names |= {m for m in re.findall(r"\.add_(\w+)\(", source) if m in trace_names}
    return names


def test_figures_draw_only_trace_types_the_lean_template_styles():
    """A trace type outside figures.TRACE_TYPES would get Plotly's bare defaults, not plotly_white's:
    add it to TRACE_TYPES when a figure starts drawing it."""
    root = Path(figures.__file__).parent
    drawn = set()
    for module in ("figures.py", "lesson_figures.py"):
        drawn |= _trace_types_drawn((root / module).read_text())
    assert drawn, "the scan found no traces: the regular expressions no longer match the code"
    assert drawn <= set(figures.TRACE_TYPES), sorted(drawn - set(figures.TRACE_TYPES))
    assert _trace_types_drawn("go.Histogram(x=[1]); fig.add_box(y=[1]); fig.add_hline(y=0)") == {"histogram", "box"}


def test_lean_template_keeps_plotly_whites_look_for_2d_charts():
    import plotly.io as pio

    full = pio.templates["plotly_white"]
    lean = figures.TEMPLATE
    assert lean.layout.to_plotly_json() == {k: v for k, v in full.layout.to_plotly_json().items()
                                            if k not in ("polar", "ternary", "scene", "geo")}
    for kind in figures.TRACE_TYPES:
        assert lean.data[kind] == full.data[kind]
    assert len(lean.data.to_plotly_json()) == len(figures.TRACE_TYPES)
    fig = figures.accuracy_bars(TASKS, {t: 50.0 for t in TASKS})
    assert fig.layout.template == lean
    assert fig.layout.template.layout.plot_bgcolor == "white"
