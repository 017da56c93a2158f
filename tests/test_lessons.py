"""The lessons' numbers (engine.analysis.ties_steps, engine.analysis.gate_plane) and their figures.

The TIES lesson must show exactly what the engine's TIES computes: its block is checked against the
whole-model merge cut to the same cells, for two k values and both trim scopes, and against a block
worked out by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import figures, lesson_figures
from engine.analysis.ties_steps import block_tensors, ties_block
from engine.errors import ConfigError
from engine.methods import get_method
from engine.task_vectors import TaskVectorStack
from engine.trim import trim_thresholds, trimmed

TIES = get_method("ties")


def matrix_stack(rows: list[list[float]], shape=(2, 3), extra: int = 0) -> TaskVectorStack:
    """Task vectors = `rows` (θ_0 = 0) over one weight matrix of `shape`, plus an `extra`-long bias."""
    data = torch.tensor(rows, dtype=torch.float32)
    names, shapes = ["w"], [tuple(shape)]
    if extra:
        names, shapes = ["b", "w"], [(extra,), tuple(shape)]  # names sorted, as stacks keep them
    offsets = np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in shapes])]).astype(np.int64)
    base = {n: torch.zeros(s) for n, s in zip(names, shapes)}
    return TaskVectorStack(tasks=[f"task{i}" for i in range(len(rows))], names=names, shapes=shapes,
                           offsets=offsets, data=data, base=base)


@pytest.mark.fast
def test_a_block_worked_out_by_hand():
    # three tasks over a 2×3 matrix; k = 50 % keeps 3 of the 6 values of each task
    stack = matrix_stack([[3.0, -1.0, 0.5, -4.0, 2.0, 0.1],
                          [-2.0, 5.0, 0.2, 1.0, -3.0, 0.3],
                          [1.0, 0.4, -6.0, -2.0, 0.6, 0.2]])
    block = ties_block(stack, stack.tasks, "w", size=3, k=50.0)
    assert block.thresholds == [2.0, 2.0, 1.0]
    assert block.kept.astype(int).tolist() == [[[1, 0, 0], [1, 1, 0]], [[1, 1, 0], [0, 1, 0]],
                                               [[1, 0, 1], [1, 0, 0]]]
    # sums of kept values: [3-2+1, 5, -6], [-4-2, 2-3, 0] -> signs [+, +, -], [-, -, 0]
    assert block.summed.tolist() == [[2.0, 5.0, -6.0], [-6.0, -1.0, 0.0]]
    assert block.elected.tolist() == [[1, 1, -1], [-1, -1, 0]]
    # disjoint mean of agreeing kept values: (3+1)/2, 5, -6, (-4-2)/2, -3, nothing kept
    np.testing.assert_allclose(block.merged, [[2.0, 5.0, -6.0], [-3.0, -3.0, 0.0]])
    np.testing.assert_allclose(block.task_arithmetic, [[2.0, 4.4, -5.3], [-5.0, -0.4, 0.6]], atol=1e-6)
    assert block.counts == {"cells": 6, "values": 18, "dropped_by_trim": 9, "conflicting_cells": 2,
                            "reset_cells": 1, "sign_differs_from_ta": 0, "outvoted_values": 2}


def _check_against_engine(stack: TaskVectorStack, tasks: list[str], tensor: str, k: float, trim: str,
                          row: int = 0, col: int = 0) -> None:
    block = ties_block(stack, tasks, tensor, row=row, col=col, k=k, trim=trim)
    sub = stack.subset(tasks)
    whole = TIES.merge(sub, TIES.config(k=k, trim=trim)).reshape(-1)
    i = sub.names.index(tensor)
    start, shape = int(sub.offsets[i]), sub.shapes[i]
    n_cols = int(np.prod(shape[1:]))
    rows, cols = block.merged.shape

    def cut(flat: torch.Tensor) -> np.ndarray:
        matrix = flat[start:start + shape[0] * n_cols].reshape(shape[0], n_cols)
        return matrix[row:row + rows, col:col + cols].cpu().numpy()

    # the merged block is the engine's whole-model TIES, cut to the block: equal, not close
    assert np.array_equal(block.merged, cut(whole))
    # the kept mask and values are the engine's trim with the whole model's thresholds
    dense = trimmed(sub, k, trim)
    for t in range(len(tasks)):
        assert np.array_equal(block.trimmed[t], cut(dense[t]))
        assert np.array_equal(block.kept[t], np.abs(cut(sub.data[t])) >= float(
            trim_thresholds(sub, k, trim)[t, 0 if trim == "global" else i]))
    # the elected sign is the sign of every merged value that is not zero
    merged_sign = np.sign(block.merged)
    assert np.array_equal(merged_sign[merged_sign != 0], block.elected[merged_sign != 0])
    # and where TIES left θ_0, no kept value agreed with it (nothing kept, or an exact tie)
    assert not block.agree[:, merged_sign == 0].any()


@pytest.mark.parametrize("k", [20.0, 60.0])
@pytest.mark.parametrize("trim", ["global", "per-tensor"])
def test_every_number_equals_the_engines_ties_on_the_slice(quick_zoo, k, trim):
    stack = TaskVectorStack.from_suite(quick_zoo)
    tensor = next(t for t in block_tensors(stack) if "q_proj" in t)
    _check_against_engine(stack, stack.tasks[:3], tensor, k, trim, row=10, col=0)


@pytest.mark.fast
@pytest.mark.parametrize("k", [20.0, 50.0])
def test_random_blocks_agree_with_the_engine(k):
    generator = torch.Generator().manual_seed(int(k))
    rows = torch.randn(3, 16 * 12 + 5, generator=generator).tolist()
    stack = matrix_stack(rows, shape=(16, 12), extra=5)  # a bias first: the matrix does not start at 0
    for row, col in [(0, 0), (6, 2)]:
        _check_against_engine(stack, stack.tasks, "w", k, "global", row=row, col=col)
        _check_against_engine(stack, stack.tasks, "w", k, "per-tensor", row=row, col=col)


@pytest.mark.fast
def test_a_block_that_does_not_fit_is_refused():
    stack = matrix_stack([[1.0] * 6, [2.0] * 6])
    with pytest.raises(ConfigError, match="does not fit"):
        ties_block(stack, stack.tasks, "w", row=1, size=2)
    with pytest.raises(ConfigError, match="no tensor"):
        ties_block(stack, stack.tasks, "nope")


@pytest.mark.fast
def test_lesson_figures_have_titles_axes_and_one_colour_scale():
    stack = matrix_stack(torch.randn(3, 100, generator=torch.Generator().manual_seed(1)).tolist(), shape=(10, 10))
    block = ties_block(stack, stack.tasks, "w", k=30.0).to_json()
    for make in (lesson_figures.task_vector_block, lesson_figures.trimmed_block, lesson_figures.elected_block,
                 lesson_figures.merged_block):
        fig = make(block)
        assert fig.layout.title.text
        x_axes = [fig.layout[name] for name in fig.layout if name.startswith("xaxis")]
        assert any(axis.title.text for axis in x_axes)
        assert fig.layout.yaxis.title.text
        heatmaps = [t for t in fig.data if t.type == "heatmap"]
        assert len({(t.zmin, t.zmax) for t in heatmaps}) == 1  # every panel on the same scale
    counts = lesson_figures.lesson_counts(block)
    assert list(counts.data[0].x) == [block["counts"][k] for k in ("dropped_by_trim", "outvoted_values",
                                                                    "conflicting_cells", "reset_cells",
                                                                    "sign_differs_from_ta")]


# --------------------------------------------------------------------------- MINGLE's gates, on a plane


def test_gate_plane_projects_the_new_gates_update_off_the_protected_directions(quick_zoo):
    from engine.analysis.gate_plane import GAMMAS, gate_plane
    from engine.zoo.suite import ZooSuite

    suite = ZooSuite.of(quick_zoo)
    tasks = suite.task_names()[:3]
    plane = gate_plane(suite, tasks, limit=40).to_json()
    assert plane["earlier"] == tasks[:2] and plane["new"] == tasks[2] and set(plane["clouds"]) == set(tasks)
    assert plane["input_dim"] == suite.theta0()[plane["layer"] + ".weight"].shape[1]
    assert plane["protected"] and len(plane["relaxed"]) == len(GAMMAS)
    # γ = 0 is the hard projection: nothing survives along a protected direction; larger γ lets more
    # through, monotonically, and never more than the whole update
    for series in plane["kept_along_protected"]:
        assert abs(series[0]) < 1e-4
        assert all(a <= b + 1e-6 for a, b in zip(series, series[1:]))
        assert series[-1] <= 1.0 + 1e-5
    norms = [plane["kept_norm"][f"{g:g}"] for g in GAMMAS]
    assert all(a <= b + 1e-6 for a, b in zip(norms, norms[1:])) and norms[0] < 1.0
    assert np.allclose(plane["hard"], plane["relaxed"]["0"], atol=1e-6)
    for gamma in (0.0, 5.0):
        fig = lesson_figures.gate_plane(plane, gamma=gamma)
        assert fig.layout.title.text and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert lesson_figures.nearest_gamma(plane, 4.0) == "5"


@pytest.mark.fast
def test_gate_plane_needs_two_tasks():
    from engine.analysis.gate_plane import gate_plane

    with pytest.raises(ConfigError, match="at least two tasks"):
        gate_plane(object(), ["only"])


# --------------------------------------------------------------------------- presenter mode figures


def _font_sizes(fig) -> list[float]:
    """Every text size a figure sets (Plotly's default of 12 px where a text has none)."""
    layout = fig.layout
    base = layout.font.size or 12
    sizes = [layout.title.font.size or base, layout.legend.font.size or base]
    for axis in [layout[name] for name in layout if name.startswith(("xaxis", "yaxis"))]:
        sizes += [axis.tickfont.size or base, axis.title.font.size or base]
    sizes += [a.font.size or base for a in layout.annotations or ()]
    sizes += [t.textfont.size or base for t in fig.data if "textfont" in t]
    return sizes


@pytest.mark.fast
def test_projector_figures_have_no_text_under_18_px():
    bars = figures.accuracy_bars(["digits", "letters"], {"digits": 50.0, "letters": 60.0},
                                 {"digits": 90.0, "letters": 80.0}, {"digits": 30.0, "letters": 20.0},
                                 merged_label="merged (TIES-Merging)", settings="TIES-Merging, k = 20, λ = 1")
    stack = matrix_stack(torch.randn(3, 100, generator=torch.Generator().manual_seed(2)).tolist(), shape=(10, 10))
    heat = lesson_figures.trimmed_block(ties_block(stack, stack.tasks, "w", k=30.0).to_json())
    for fig in (bars, heat):
        assert min(_font_sizes(fig)) < figures.PROJECTOR_FONT  # as drawn normally
        big = figures.fit_for_screen(fig, projector=True)
        assert min(_font_sizes(big)) >= figures.PROJECTOR_FONT
        assert fig.layout.font.size != big.layout.font.size  # a copy: the original is untouched


@pytest.mark.fast
def test_long_titles_wrap_at_spaces():
    assert figures.wrap_title("short", 20) == "short"
    assert figures.wrap_title("one two three four five", 9) == "one two<br>three<br>four five"
    assert figures.wrap_title("already<br>wrapped title", 5) == "already<br>wrapped title"
    fig = figures.fit_for_screen(figures.magnitude_histogram(
        {"edges": [0, 1, 2], "counts": [1, 2], "threshold": 10.0, "kept_fraction": 0.5}, task="a task with a long name",
        k=20), title_chars=30)
    assert "<br>" in fig.layout.title.text and fig.layout.margin.t > 80
