"""TIES, Task Arithmetic and averaging: hand-worked cases, properties, and agreement with tests/reference.py."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from engine.errors import ConfigError
from engine.methods import get_merge_method, get_method, merge_methods
from engine.task_vectors import TaskVectorStack
from engine.trim import trim_thresholds, trimmed

TIES = get_method("ties")
TA = get_method("task-arithmetic")
AVERAGE = get_method("average")


def stack_from_rows(rows, dtype=torch.float32, split=None) -> TaskVectorStack:
    """A stack whose pretrained model is zero, so task vectors are the rows themselves.

    `split` cuts each row into named tensors of the given sizes (for per-tensor trimming).
    """
    rows = torch.as_tensor(rows, dtype=torch.float32)
    split = split or [rows.shape[1]]
    names = [f"t{i}" for i in range(len(split))]
    base = {n: torch.zeros(s) for n, s in zip(names, split)}
    experts = [dict(zip(names, torch.split(row, split))) for row in rows]
    return TaskVectorStack.from_state_dicts(base, experts, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Worked by hand: 3 tasks x 5 parameters, k = 60 % (keep ceil(0.6 * 5) = 3 per task)
#   tau1 = [ 0.5, -0.1,  0.3 , 0.0 , -0.9]  -> top 3 |.|: 0.9, 0.5, 0.3 -> [0.5, 0, 0.3, 0, -0.9]
#   tau2 = [-0.4,  0.2,  0.1 , 0.6 , -0.2]  -> 0.6, 0.4, then 0.2 twice: ties at the threshold are kept
#                                              -> [-0.4, 0.2, 0, 0.6, -0.2]
#   tau3 = [ 0.3, -0.7, -0.05, 0.05,  0.8]  -> 0.8, 0.7, 0.3 -> [0.3, -0.7, 0, 0, 0.8]
# elect (sign of the sum): [+0.4 -> +, -0.5 -> -, +0.3 -> +, +0.6 -> +, -0.3 -> -]
# disjoint mean of the agreeing values: [(0.5+0.3)/2, -0.7, 0.3, 0.6, (-0.9-0.2)/2]
# ---------------------------------------------------------------------------------------------
HAND_ROWS = [[0.5, -0.1, 0.3, 0.0, -0.9], [-0.4, 0.2, 0.1, 0.6, -0.2], [0.3, -0.7, -0.05, 0.05, 0.8]]


def test_ties_hand_worked_mean():
    merged = TIES.merge(stack_from_rows(HAND_ROWS), TIES.config(k=60, lam=1.0))
    torch.testing.assert_close(merged, torch.tensor([0.4, -0.7, 0.3, 0.6, -0.55]), rtol=0, atol=1e-6)


def test_ties_hand_worked_sum_and_lambda():
    merged = TIES.merge(stack_from_rows(HAND_ROWS), TIES.config(k=60, lam=0.5, disjoint="sum"))
    torch.testing.assert_close(merged, 0.5 * torch.tensor([0.8, -0.7, 0.3, 0.6, -1.1]), rtol=0, atol=1e-6)


def test_trim_keeps_ties_at_threshold():
    kept = trimmed(stack_from_rows(HAND_ROWS), 60)
    assert kept[1].tolist() == pytest.approx([-0.4, 0.2, 0.0, 0.6, -0.2])
    assert int((kept != 0).sum()) == 3 + 4 + 3


def test_ties_k100_is_no_trim():
    stack = stack_from_rows(HAND_ROWS)
    assert float(trim_thresholds(stack, 100).abs().max()) == 0.0
    expected = ref.ties(torch.tensor(HAND_ROWS), 100, 1.0)
    torch.testing.assert_close(TIES.merge(stack, TIES.config(k=100)).double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule, expected", [("global_majority", [-1.0, -2.5]), ("positive", [1.0, -2.5]),
                                            ("zero", [0.0, -2.5])])
def test_tie_rules(rule, expected):
    # entry 0 cancels exactly (1 - 1 = 0): a tie; entry 1 elects "-", so the model-wide majority is "-"
    stack = stack_from_rows([[1.0, -2.0], [-1.0, -3.0]])
    merged = TIES.merge(stack, TIES.config(k=100, tie_rule=rule))
    assert merged.tolist() == pytest.approx(expected)


def test_task_arithmetic_and_average_by_hand():
    stack = stack_from_rows([[1.0, -2.0, 0.5], [3.0, 2.0, -0.5]])
    assert TA.merge(stack, TA.config(lam=0.5)).tolist() == pytest.approx([2.0, 0.0, 0.0])
    assert AVERAGE.merge(stack).tolist() == pytest.approx([2.0, 0.0, 0.0])
    merged = stack.apply(TA.merge(stack, TA.config(lam=1.0)))
    assert merged["t0"].tolist() == pytest.approx([4.0, 0.0, 0.0])


def test_apply_adds_to_theta0_and_keeps_dtype():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "step": torch.tensor(7)}
    expert = {"w": torch.tensor([2.0, 0.0], dtype=torch.float16), "step": torch.tensor(9)}
    stack = TaskVectorStack.from_state_dicts(base, [expert])
    assert stack.names == ["w"]  # integer buffers are never merged
    merged = stack.apply(TA.merge(stack, TA.config(lam=0.5)))
    assert merged["w"].dtype == torch.float16
    assert merged["w"].tolist() == [1.5, 1.0]
    assert int(merged["step"]) == 7


# ---------------------------------------------------------------------------------------------
# Agreement with the independent reference on random inputs (both scopes, both disjoint modes)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trim", ["global", "per-tensor"])
@pytest.mark.parametrize("disjoint", ["mean", "sum"])
@pytest.mark.parametrize("k", [1.0, 20.0, 57.5, 100.0])
def test_ties_matches_reference_random(trim, disjoint, k):
    gen = torch.Generator().manual_seed(int(k * 10))
    split = [70_000, 300, 5, 1]  # one segment large enough for the sampled-threshold path
    rows = torch.randn(5, sum(split), generator=gen) * torch.rand(5, 1, generator=gen)
    stack = stack_from_rows(rows, split=split)
    spans = [(int(a), int(b)) for a, b in zip(stack.offsets[:-1], stack.offsets[1:])]
    merged = TIES.merge(stack, TIES.config(k=k, lam=0.7, trim=trim, disjoint=disjoint))
    expected = ref.ties(rows, k, 0.7, disjoint, spans if trim == "per-tensor" else None)
    assert float((merged.double() - expected).abs().max()) <= 1e-6


@pytest.mark.parametrize("trim", ["global", "per-tensor"])
def test_torch_path_matches_numba_path(trim, monkeypatch):
    from engine import kernels

    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 90_000, generator=gen)
    config = TIES.config(k=20, lam=1.0, trim=trim)
    fast = TIES.merge(stack_from_rows(rows, split=[80_000, 10_000]), config)
    monkeypatch.setattr(kernels, "can_use_numba", lambda data: False)
    slow = TIES.merge(stack_from_rows(rows, split=[80_000, 10_000]), config)
    assert float((fast - slow).abs().max()) <= 1e-6


def test_threshold_keeps_exactly_ceil_k_without_ties():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 200_001, generator=gen)
    stack = stack_from_rows(rows)
    for k in (0.5, 20.0, 99.9):
        kept = (rows.abs() >= trim_thresholds(stack, k)).sum(1)
        assert kept.tolist() == [math.ceil(k * 200_001 / 100)] * 3


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis). Values are multiples of 1/8 so every sum is exact in float32 and
# properties hold bit for bit, not just up to rounding.
# ---------------------------------------------------------------------------------------------
def task_rows(min_tasks=1, max_tasks=5):
    value = st.integers(-40, 40).map(lambda v: v / 8)
    return st.integers(min_tasks, max_tasks).flatmap(
        lambda t: st.integers(1, 24).flatmap(
            lambda d: st.lists(st.lists(value, min_size=d, max_size=d), min_size=t, max_size=t)))


@settings(max_examples=60, deadline=None)
@given(rows=task_rows(1, 1), lam=st.floats(0.0, 2.0))
def test_ties_k100_one_expert_equals_task_arithmetic(rows, lam):
    stack = stack_from_rows(rows)
    ties = TIES.merge(stack, TIES.config(k=100, lam=lam))
    ta = TA.merge(stack, TA.config(lam=lam))
    torch.testing.assert_close(ties, ta, rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(rows=task_rows(), k=st.sampled_from([10.0, 20.0, 50.0, 100.0]), lam=st.floats(0.0, 3.0),
       disjoint=st.sampled_from(["mean", "sum"]), trim=st.sampled_from(["global", "per-tensor"]))
def test_ties_is_linear_in_lambda(rows, k, lam, disjoint, trim):
    stack = stack_from_rows(rows)
    one = TIES.merge(stack, TIES.config(k=k, lam=1.0, disjoint=disjoint, trim=trim))
    scaled = TIES.merge(stack, TIES.config(k=k, lam=lam, disjoint=disjoint, trim=trim))
    torch.testing.assert_close(scaled, lam * one, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(rows=task_rows(2, 5), k=st.sampled_from([10.0, 20.0, 50.0, 100.0]), data=st.data(),
       disjoint=st.sampled_from(["mean", "sum"]), tie_rule=st.sampled_from(["global_majority", "positive", "zero"]))
def test_ties_is_invariant_to_expert_order(rows, k, data, disjoint, tie_rule):
    order = data.draw(st.permutations(range(len(rows))))
    config = TIES.config(k=k, disjoint=disjoint, tie_rule=tie_rule)
    merged = TIES.merge(stack_from_rows(rows), config)
    permuted = TIES.merge(stack_from_rows([rows[i] for i in order]), config)
    torch.testing.assert_close(merged, permuted, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(rows=task_rows(1, 5), k=st.sampled_from([5.0, 20.0, 50.0, 100.0]),
       disjoint=st.sampled_from(["mean", "sum"]), trim=st.sampled_from(["global", "per-tensor"]))
def test_ties_matches_reference_property(rows, k, disjoint, trim):
    stack = stack_from_rows(rows, split=[len(rows[0]) - len(rows[0]) // 2, len(rows[0]) // 2]
                            if len(rows[0]) > 1 else None)
    spans = [(int(a), int(b)) for a, b in zip(stack.offsets[:-1], stack.offsets[1:])]
    merged = TIES.merge(stack, TIES.config(k=k, lam=1.0, disjoint=disjoint, trim=trim))
    expected = ref.ties(torch.tensor(rows), k, 1.0, disjoint, spans if trim == "per-tensor" else None)
    assert float((merged.double() - expected).abs().max()) <= 1e-6


@settings(max_examples=40, deadline=None)
@given(rows=task_rows(1, 5))
def test_average_is_task_arithmetic_at_one_over_t(rows):
    stack = stack_from_rows(rows)
    torch.testing.assert_close(AVERAGE.merge(stack), TA.merge(stack, TA.config(lam=1 / len(rows))),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Impossible hyperparameters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [({"k": 0.0}, "above 0"), ({"k": 120.0}, "[0.0, 100.0]"),
                                             ({"k": float("nan")}, "finite"), ({"lam": -1.0}, "λ"),
                                             ({"trim": "layer"}, "trim scope"), ({"disjoint": "max"}, "disjoint")])
def test_bad_hyperparameters_raise_config_error(values, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        TIES.merge(stack_from_rows(HAND_ROWS), TIES.Config(**{**{"k": 20.0}, **values}))


def test_registry_lists_the_three_one_shot_merges():
    assert list(merge_methods()) == ["average", "task-arithmetic", "ties"]
    with pytest.raises(ConfigError, match="unknown merge method 'dare'"):
        get_merge_method("dare")
    with pytest.raises(ConfigError, match="unknown merge method 'mingle'"):
        get_merge_method("mingle")  # a continual-only method has no one-shot merge
    assert get_method("mingle").family == "continual"
