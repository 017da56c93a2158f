"""One registry of methods: a method declared in one file appears in the CLI, the app and the
continual runner without touching any of them.

The toy method below is that one file's worth of code (a per-entry median of the task vectors, with
a continual form that keeps the vectors seen so far), registered at test time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.methods import MethodSpec, param, register
from engine.methods.registry import unregister


# ---- the toy method: what a contributor writes in engine/methods/median.py -------------------

@dataclass(frozen=True)
class MedianConfig:
    lam: float = param(1.0, "Scaling λ of the per-entry median of the task vectors.", label="λ (scaling)",
                       min=0.0, max=3.0, step=0.05, flag="--lam")


def _median(stack, config: MedianConfig) -> torch.Tensor:
    return stack.data.float().median(dim=0).values.mul_(config.lam)


class ContinualMedian:
    name = "toy-median"

    def __init__(self, config: MedianConfig | None = None, *, encoder=None, device="cpu") -> None:
        self.config = config or MedianConfig()

    def init(self, theta0):
        self.theta0, self.taus = dict(theta0), []

    def step(self, task, theta_t, seed_images=None, head=None):
        names = [k for k, v in self.theta0.items() if v.is_floating_point()]
        self.taus.append({k: theta_t[k].float() - self.theta0[k].float() for k in names})
        merged = dict(self.theta0)
        for k in names:
            merged[k] = self.theta0[k].float() + self.config.lam * torch.stack([t[k] for t in self.taus]).median(0).values
        return merged


TOY = MethodSpec(name="toy-median", label="Median (toy)", summary="Per-entry median of the task vectors.",
                 family="static", Config=MedianConfig, run=_median, continual=ContinualMedian,
                 continual_label="C-Median (toy)")

# ----------------------------------------------------------------------------------------------


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister(TOY.name)


@pytest.mark.fast
def test_a_registered_method_is_listed_and_merges(toy):
    from engine.methods import continual_methods, get_merge_method, merge_methods

    assert "toy-median" in merge_methods() and "toy-median" in continual_methods()
    stack_rows = torch.tensor([[1.0, -2.0, 3.0], [2.0, 0.0, -1.0], [5.0, 1.0, 0.0]])
    from test_ties import stack_from_rows

    delta = get_merge_method("toy-median").merge(stack_from_rows(stack_rows), MedianConfig(lam=0.5))
    assert delta.tolist() == [1.0, 0.0, 0.0]  # 0.5 × per-column median (2, 0, 0)


def test_it_appears_in_merge_help_and_runs_from_the_cli(toy, quick_zoo, capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as done:
        main(["merge", "--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "toy-median = Median (toy)" in help_text
    code = main(["merge", "--zoo", str(quick_zoo.root), "--method", "toy-median", "--lam", "0.5",
                 "--evaluate", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["method"] == "toy-median" and out["hyperparameters"] == {"lam": 0.5}
    assert set(out["accuracy"]["per_task"]) == set(quick_zoo.task_names())


def test_its_continual_form_runs_from_continual_method(toy, quick_zoo, capsys):
    from engine.cli import main

    code = main(["continual", "--zoo", str(quick_zoo.root), "--method", "toy-median", "--lam", "0.3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["method"] == "toy-median" and out["config"] == {"lam": 0.3}
    assert len(out["acc_matrix"]) == len(quick_zoo.task_names())


def test_it_appears_in_the_merge_page(toy, quick_zoo, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MERGE_EXPLORER_ZOO", str(quick_zoo.root))
    monkeypatch.setenv("MERGE_EXPLORER_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=180)
    at.run()
    at.switch_page("pages/views/merge.py").run()
    methods = at.radio(key="w.merge.method")
    assert "Median (toy)" in methods.options  # shown by its label
    methods.set_value("toy-median").run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.slider(key="w.merge.toy-median.lam").value == 1.0  # its widget, generated from its Config
    at.switch_page("pages/views/continual.py").run()
    assert "C-Median (toy)" in at.multiselect(key="w.continual.continual_methods").options
