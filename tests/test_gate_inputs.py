"""The novel share of a task's mean layer input (engine/analysis/gate_inputs.py): hand-computed cases,
properties, an independent recomputation through plain open_clip hooks, and the CLI on the quick zoo."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import tiny_tower
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.analysis.gate_inputs import common_share, gate_input_report, novel_share, orthonormal_span
from engine.errors import ConfigError
from engine.methods.mingle import MingleEncoder


def _e(d: int, *indices: int) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64)[:, list(indices)]


@pytest.mark.fast
def test_novel_share_by_hand():
    x = torch.tensor([3.0, 0.0, 4.0, 0.0])
    assert novel_share(x, _e(4, 0, 1)) == pytest.approx(16 / 25)  # only the 4 in e3 is outside span(e1, e2)
    assert novel_share(x, _e(4, 2)) == pytest.approx(9 / 25)
    assert novel_share(x, _e(4, 0, 2)) == pytest.approx(0.0, abs=1e-15)
    assert novel_share(x, _e(4)) == 1.0  # nothing protected: all of it is the task's own
    assert novel_share(torch.zeros(4), _e(4, 0)) == 0.0


@pytest.mark.fast
def test_orthonormal_span_drops_dependent_columns():
    diagonal = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64) / 2 ** 0.5
    span = orthonormal_span([_e(3, 0), diagonal, _e(3, 0)])
    assert span.shape == (3, 2)
    assert torch.allclose(span.T @ span, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert novel_share(torch.tensor([0.0, 0.0, 1.0]), span) == pytest.approx(1.0)  # e3 is outside span(e1, e2)
    assert orthonormal_span([_e(3)]).shape == (3, 0)


@pytest.mark.fast
def test_common_share_by_hand():
    # x̄_1 = (1, 1), x̄_2 = (1, -1): m = (1, 0), so 1 of the mean squared length 2 is common.
    assert common_share(torch.tensor([[1.0, 1.0], [1.0, -1.0]])) == pytest.approx(0.5)
    assert common_share(torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0]])) == pytest.approx(1.0)  # all alike
    assert common_share(torch.tensor([[2.0, 0.0], [-2.0, 0.0]])) == 0.0  # they cancel
    # (3, 0), (0, 4): m = (1.5, 2), |m|² = 6.25 against a mean |x̄|² of 12.5.
    assert common_share(torch.tensor([[3.0, 0.0], [0.0, 4.0]])) == pytest.approx(0.5)
    assert common_share(torch.zeros(3, 5)) == 0.0


@pytest.mark.fast
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tasks=st.integers(2, 8), d=st.integers(1, 12))
def test_common_share_properties(seed, tasks, d):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, d, generator=gen, dtype=torch.float64)
    share = common_share(x)
    assert 0.0 <= share <= 1.0 + 1e-12  # |mean|² <= mean |x|²
    r, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    assert common_share(x @ r.T) == pytest.approx(share, abs=1e-10)  # rotations change nothing
    assert common_share(3.0 * x) == pytest.approx(share, abs=1e-10)  # nor does scale
    # The rest is the tasks' spread about their mean: mean |x̄_t|² = |m|² + mean |x̄_t - m|².
    spread = float((x - x.mean(0)).pow(2).sum(1).mean() / x.pow(2).sum(1).mean())
    assert share + spread == pytest.approx(1.0, abs=1e-10)


@pytest.mark.fast
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(2, 12), k=st.integers(0, 12))
def test_novel_share_properties(seed, d, k):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, d)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    basis = q[:, :k]
    share = novel_share(x, basis)
    assert 0.0 <= share <= 1.0 + 1e-12
    # A bigger protected subspace never leaves more room.
    if k < d:
        assert novel_share(x, q[:, :k + 1]) <= share + 1e-12
    # Rotating the input and the basis together changes nothing.
    r, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    assert novel_share(r @ x, r @ basis) == pytest.approx(share, abs=1e-10)
    # The share and the protected part add up to the whole.
    assert share + float((basis.T @ x).pow(2).sum() / x.pow(2).sum()) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.fast
def test_report_matches_an_independent_computation_on_plain_open_clip():
    visual = tiny_tower(3).eval()  # width 16
    gen = torch.Generator().manual_seed(0)
    # Two "tasks" with different image statistics.
    images = {"bright": torch.rand(10, 3, 16, 16, generator=gen) + 0.5,
              "noise": torch.randn(12, 3, 16, 16, generator=gen)}
    report = gate_input_report(MingleEncoder(copy.deepcopy(visual), "all").eval(), images, subspace_k=2)
    assert report.layers[0] == "encoder.layers.0.self_attn.q_proj" and report.novel.shape == (12, 2)

    # Independent: block 1's fc1 input is ln_2's output in the unwrapped open_clip model; numpy's SVD
    # of the stacked tokens gives each task's top-2 directions.
    captured = {}
    visual.transformer.resblocks[1].ln_2.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    means, tops = {}, {}
    with torch.no_grad():
        for task, x in images.items():
            visual(x)
            tokens = captured["x"].reshape(-1, 16).double().numpy()
            means[task] = tokens.mean(0)
            tops[task] = np.linalg.svd(tokens, full_matrices=False)[2][:2].T  # right singular vectors of X
    for k, task in enumerate(images):
        other = tops["noise" if task == "bright" else "bright"]
        inside = other.T @ means[task]
        expected = 1 - inside @ inside / (means[task] @ means[task])
        assert report.novel[report.layers.index("encoder.layers.1.mlp.fc1"), k] == pytest.approx(expected, abs=1e-6)
    m = (means["bright"] + means["noise"]) / 2
    expected_common = m @ m / ((means["bright"] @ means["bright"] + means["noise"] @ means["noise"]) / 2)
    assert report.common[report.layers.index("encoder.layers.1.mlp.fc1")] == pytest.approx(expected_common, abs=1e-6)


@pytest.mark.fast
def test_report_edges_protect_nothing_or_everything():
    visual = tiny_tower(3).eval()
    gen = torch.Generator().manual_seed(1)
    images = {"a": torch.rand(6, 3, 16, 16, generator=gen), "b": torch.rand(5, 3, 16, 16, generator=gen)}
    none = gate_input_report(MingleEncoder(copy.deepcopy(visual), "qkv-fc1").eval(), images, subspace_k=0)
    assert np.allclose(none.novel, 1.0) and none.novel.shape == (8, 2)
    # k = 16 = width: the other task's directions span q/k/v's and fc1's whole input space.
    full = gate_input_report(MingleEncoder(copy.deepcopy(visual), "qkv-fc1").eval(), images, subspace_k=16)
    assert np.allclose(full.novel, 0.0, atol=1e-9)
    with pytest.raises(ConfigError, match="at least two"):
        gate_input_report(MingleEncoder(copy.deepcopy(visual), "all").eval(), {"a": images["a"]})
    with pytest.raises(ConfigError, match="0 or more"):
        gate_input_report(MingleEncoder(copy.deepcopy(visual), "all").eval(), images, subspace_k=-1)


def test_cli_on_the_quick_zoo(quick_zoo, capsys):
    from engine.cli import main

    assert main(["gate-inputs", "--zoo", str(quick_zoo.root), "--limit", "16", "--json", "--device", "cpu"]) == 0
    payload = json.loads(capsys.readouterr().out)
    tasks = quick_zoo.task_names()
    assert payload["tasks"] == tasks and payload["subspace_k"] == 3
    assert payload["images_per_task"] == {t: 16 for t in tasks}
    shares = payload["novel_share"]
    assert set(shares["per_task"]) == set(tasks) and all(0.0 <= v <= 1.0 for v in shares["per_task"].values())
    assert shares["mean"] == pytest.approx(np.mean(list(shares["per_task"].values())))
    assert len(shares["per_layer"]) == 6 * 4  # six linears per block, four blocks
    common = payload["common_share"]
    assert set(common["per_layer"]) == set(shares["per_layer"]) and all(0 <= v <= 1 for v in common["per_layer"].values())

    assert main(["gate-inputs", "--zoo", str(quick_zoo.root), "--limit", "16", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "novel share" in text and "common share" in text and all(t in text for t in tasks)

    for bad, message in ((["--tasks", tasks[0]], "at least two"), (["--subspace-k", "-1"], "0 or more"),
                         (["--tasks", "nope", tasks[0]], "nope")):
        assert main(["gate-inputs", "--zoo", str(quick_zoo.root), "--limit", "16", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
