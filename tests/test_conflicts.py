"""Sign-conflict statistics: the hand-worked example, the reference, the curves and the baseline."""
from __future__ import annotations

import pytest
import torch

import reference as ref
from engine.analysis.conflicts import random_sign_baseline, sign_conflicts
from engine.analysis.magnitudes import magnitude_histogram
from engine.trim import trimmed
from test_ties import HAND_ROWS, stack_from_rows


def test_hand_worked_conflicts():
    # trimmed at k = 60 % (see test_ties): signs per entry
    #   p0: +, -, +   conflict      p1: 0, +, -   conflict      p2: +, 0, 0
    #   p3: 0, +, 0                 p4: -, -, +   conflict
    report = sign_conflicts(stack_from_rows(HAND_ROWS), k=60)
    assert report.overall["rate_all"] == pytest.approx(3 / 5)
    assert report.overall["rate_nonzero1"] == pytest.approx(3 / 5)
    assert report.overall["rate_nonzero2"] == pytest.approx(3 / 3)
    # pairs: (1,2) share p0 (opposite) and p4 (same); (1,3) share p0 (same), p4 (opposite);
    # (2,3) share p0, p1, p4, all opposite
    assert report.pairwise == [[0.0, 0.5, 0.5], [0.5, 0.0, 1.0], [0.5, 1.0, 0.0]]
    # first two tasks conflict at p0 only; all three at p0, p1, p4
    assert report.n_tasks_curve["n"] == [2, 3]
    assert report.n_tasks_curve["rate_all"] == pytest.approx([1 / 5, 3 / 5])


def test_pairwise_is_undefined_without_overlap():
    report = sign_conflicts(stack_from_rows([[1.0, 0.0], [0.0, -1.0]]), k=100)
    assert report.pairwise[0][1] is None and report.overall["rate_all"] == 0.0


@pytest.mark.parametrize("trim", ["global", "per-tensor"])
def test_matches_reference_on_random_vectors(trim):
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(6, 80_000, generator=gen) * torch.rand(6, 80_000, generator=gen)
    stack = stack_from_rows(rows, split=[70_000, 9_000, 1_000])
    report = sign_conflicts(stack, k=20, trim=trim)
    expected = ref.conflict_stats(trimmed(stack, 20, trim).double())
    for key in ("rate_all", "rate_nonzero1", "rate_nonzero2"):
        assert report.overall[key] == pytest.approx(expected[key], abs=1e-12)
    for a in range(6):
        for b in range(6):
            assert report.pairwise[a][b] == pytest.approx(expected["pairwise"][a][b], abs=1e-12)
    # per-tensor figures add up to the overall count
    assert sum(r["n_conflicts"] for r in report.per_tensor.values()) == report.overall["n_conflicts"]
    # independent fair-coin-like signs: the measured rate sits on the random baseline
    assert report.overall["rate_all"] == pytest.approx(report.overall["random_baseline"], abs=0.01)


def test_curves_equal_recomputing_each_point():
    gen = torch.Generator().manual_seed(9)
    rows = torch.randn(4, 5_000, generator=gen)
    stack = stack_from_rows(rows, split=[4_000, 1_000])
    report = sign_conflicts(stack, k=20, k_grid=[10, 20, 35, 100], task_order=["task3", "task1", "task4", "task2"])
    for k, rate_all, rate_2 in zip(report.k_curve["k"], report.k_curve["rate_all"], report.k_curve["rate_nonzero2"]):
        direct = sign_conflicts(stack, k=k).overall
        assert rate_all == pytest.approx(direct["rate_all"], abs=1e-12)
        assert rate_2 == pytest.approx(direct["rate_nonzero2"], abs=1e-12)
    for n, rate in zip(report.n_tasks_curve["n"], report.n_tasks_curve["rate_all"]):
        subset = stack.subset(report.n_tasks_curve["tasks"][:n])
        assert rate == pytest.approx(sign_conflicts(subset, k=20).overall["rate_all"], abs=1e-12)
    for name, curve in report.per_tensor_k_curve.items():
        assert curve[1] == pytest.approx(report.per_tensor[name]["rate_all"], abs=1e-12)


@pytest.mark.parametrize("n, expected", [(2, (2.0, 5.6, 50.0)), (8, (30.7, 36.9, 61.8)), (20, (76.8, 77.7, 82.6))])
def test_random_baseline_matches_methods_table(n, expected):
    rates = random_sign_baseline(n, 20.0)
    got = (100 * rates["rate_all"], 100 * rates["rate_nonzero1"], 100 * rates["rate_nonzero2"])
    assert got == pytest.approx(expected, abs=0.06)


def test_magnitude_histogram_marks_threshold():
    rows = torch.tensor([[0.001, -0.01, 0.1, -1.0, 0.0]])
    hist = magnitude_histogram(stack_from_rows(rows), "task1", k=40, bins=4)
    assert hist["threshold"] == pytest.approx(0.1)
    assert hist["kept_fraction"] == pytest.approx(2 / 5)
    assert sum(hist["counts"]) == 4 and hist["n_zero"] == 1
    assert hist["edges"][0] == pytest.approx(-3.0) and hist["edges"][-1] == pytest.approx(0.0)
