"""The continual protocol and the continual baselines (docs/methods.md, Continual merging), on tiny models.

`TinySource` is a stand-in task suite (the `ContinualSource` protocol): a 2-block open_clip ViT, three "tasks" whose fine-tuned models are
θ_0 plus noise, and test labels defined as the fine-tuned model's own predictions (so each θ_t
scores 100 % on its task and forgetting is measurable).
"""
from __future__ import annotations

import json

import pytest
import torch

from engine.continual import (acc_bwt_fwt, make_method, run_continual, run_orders, select_seed_indices, summarize,
                              task_order)
from engine.methods.averaging import ContinualAverage
from engine.methods.magmax import ContinualMagMax, max_magnitude
from engine.methods.mingle import MingleConfig, build_encoder
from engine.methods.opcm import ContinualOPCM, project_task_vector, split_rank
from engine.methods.task_arithmetic import ContinualTaskArithmetic, TaskArithmeticConfig
from engine.methods.ties import ContinualTies

torch.set_num_threads(1)  # tiny ops: a second OpenMP thread only waits on a shared CPU

TINY_VIT = dict(image_size=8, patch_size=4, width=16, layers=2, heads=2, mlp_ratio=2.0, output_dim=8)


class TinySource:
    """A stand-in task suite offering exactly what `engine.continual.ContinualSource` asks for."""

    def __init__(self, tasks=("a", "b", "c"), n_test=24, seed=0, vit=None, classes=4):
        from open_clip.transformer import VisionTransformer

        from engine.checkpoints import open_clip_to_canonical

        torch.manual_seed(seed)
        self.tasks = list(tasks)
        vit = dict(vit or TINY_VIT)
        self.model_config = vit
        visual = VisionTransformer(**vit)
        self._theta0 = open_clip_to_canonical({k: v.detach().clone() for k, v in visual.state_dict().items()})[0]
        gen = torch.Generator().manual_seed(seed + 1)
        self._thetas, self._heads, self._tests = {}, {}, {}
        self.limits_seen, self.expert_limits = [], []
        for task in self.tasks:
            self._thetas[task] = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in self._theta0.items()}
            self._heads[task] = torch.randn(vit["output_dim"], classes, generator=gen)
            images = torch.randn(n_test, 3, vit["image_size"], vit["image_size"], generator=gen)
            with torch.no_grad():
                labels = self.logits_fn(task)(build_encoder(vit, self._thetas[task])(images)).argmax(-1)
            self._tests[task] = (images, labels)

    def theta0(self):
        return dict(self._theta0)

    def theta(self, task):
        return dict(self._thetas[task])

    def test_set(self, task, limit=None):
        from engine.image_data import stratified_subset

        self.limits_seen.append(limit)
        images, labels = self._tests[task]
        keep = torch.as_tensor(stratified_subset(labels.numpy(), limit))
        return images[keep], labels[keep]

    def logits_fn(self, task):
        w = torch.nn.functional.normalize(self._heads[task], dim=0)
        return lambda f: 100 * torch.nn.functional.normalize(f, dim=-1) @ w

    def expert_accuracy(self, task, limit=None):
        self.expert_limits.append(limit)
        return 100.0

    def build_encoder(self, state):
        return build_encoder(self.model_config, state)


# ---- orders and metrics --------------------------------------------------------------------------

PAPER_8 = {  # docs/methods.md, task orders (TA8 ids)
    42: "04 05 07 08 03 06 01 02", 43: "07 08 05 04 02 06 03 01", 44: "03 06 04 02 01 08 05 07",
    45: "06 08 02 01 03 07 04 05", 46: "07 06 03 08 05 01 04 02", 47: "07 02 03 08 05 04 01 06",
    48: "07 01 04 03 08 05 02 06", 49: "08 05 06 07 01 04 03 02", 50: "01 04 05 02 06 03 07 08",
    51: "08 03 01 02 06 05 07 04"}


@pytest.mark.parametrize("seed", sorted(PAPER_8))
@pytest.mark.fast
def test_orders_match_the_papers_table(seed):
    assert task_order([f"{i:02d}" for i in range(1, 9)], seed) == PAPER_8[seed].split()


@pytest.mark.fast
def test_acc_bwt_fwt_on_a_hand_made_matrix():
    matrix = [[90.0, None, None],
              [80.0, 70.0, None],
              [60.0, 65.0, 50.0]]
    acc, bwt, fwt = acc_bwt_fwt(matrix, [95.0, 75.0, 60.0])
    assert acc == pytest.approx((60 + 65 + 50) / 3)
    assert bwt == pytest.approx(((60 - 90) + (65 - 70)) / 2)
    assert fwt == pytest.approx(((90 - 95) + (70 - 75) + (50 - 60)) / 3)
    assert acc_bwt_fwt([[80.0]])[1] is None and acc_bwt_fwt(matrix, [None] * 3)[2] is None


@pytest.mark.fast
def test_seed_set_is_stratified_per_class():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = select_seed_indices(labels, 5, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 5]  # all of a class with fewer than 5
    assert torch.equal(idx, select_seed_indices(labels, 5, seed=0))


# ---- baselines, against their closed forms -------------------------------------------------------

def _states(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta0 = {"encoder.layers.0.mlp.fc1.weight": torch.randn(6, 4, generator=gen),
              "encoder.layers.0.mlp.fc1.bias": torch.randn(6, generator=gen)}
    thetas = [{k: v + torch.randn(v.shape, generator=gen) for k, v in theta0.items()} for _ in range(n)]
    return theta0, thetas


def _run(method, theta0, thetas):
    method.init(theta0)
    out = None
    for i, theta in enumerate(thetas):
        out = method.step(str(i), theta, None, None)
    return out


@pytest.mark.fast
def test_continual_average_and_task_arithmetic_closed_forms():
    theta0, thetas = _states()
    avg = _run(ContinualAverage(), theta0, thetas)
    ta = _run(ContinualTaskArithmetic(TaskArithmeticConfig(lam=0.3)), theta0, thetas)
    for k in theta0:
        assert torch.allclose(avg[k], sum(t[k] for t in thetas) / 3, atol=1e-6)
        assert torch.allclose(ta[k], theta0[k] + 0.3 * sum(t[k] - theta0[k] for t in thetas), atol=1e-6)


@pytest.mark.fast
def test_magmax_keeps_the_largest_magnitude_and_new_wins_ties():
    assert max_magnitude(torch.tensor([1.0, -3.0, 2.0]), torch.tensor([-2.0, 1.0, -2.0])).tolist() == [-2.0, -3.0, -2.0]
    theta0, thetas = _states()
    merged = _run(ContinualMagMax(), theta0, thetas)
    for k in theta0:
        taus = torch.stack([t[k] - theta0[k] for t in thetas])
        best = taus.gather(0, taus.abs().argmax(0, keepdim=True))[0]
        assert torch.allclose(merged[k], theta0[k] + 0.5 * best, atol=1e-6)


def test_continual_ties_first_step_is_scaled_task_vector():
    theta0, thetas = _states(2)
    method = ContinualTies()
    method.init(theta0)
    first = method.step("0", thetas[0])
    for k in theta0:
        assert torch.allclose(first[k], theta0[k] + 0.3 * (thetas[0][k] - theta0[k]), atol=1e-6)
    second = method.step("1", thetas[1])
    assert all(torch.isfinite(v).all() for v in second.values())


@pytest.mark.fast
def test_opcm_split_rank_and_projection_block():
    assert split_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.5) == 1  # cumsum 0.4, 0.7: first > 0.5 at index 1
    assert split_rank(torch.tensor([9.0, 1.0]), 0.5) == 0  # a dominant first value: nothing projected
    gen = torch.Generator().manual_seed(3)
    previous, tau = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen,
                                                                                         dtype=torch.float64)
    u, s, vh = torch.linalg.svd(previous, full_matrices=True)
    k = split_rank(s, 0.5)
    cleaned = project_task_vector(previous, tau, 0.5)
    c_before, c_after = u.T @ tau @ vh.T, u.T @ cleaned @ vh.T
    assert torch.allclose(c_after[:k, :k], torch.zeros(k, k, dtype=torch.float64), atol=1e-12)
    c_before[:k, :k] = 0
    assert torch.allclose(c_after, c_before, atol=1e-12)


@pytest.mark.fast
def test_opcm_first_step_is_theta1_and_merged_norm_is_the_average_norm():
    theta0, thetas = _states(3)
    method = ContinualOPCM()
    method.init(theta0)
    first = method.step("0", thetas[0])
    assert all(torch.allclose(first[k], thetas[0][k], atol=1e-6) for k in theta0)
    for i in (1, 2):
        merged = method.step(str(i), thetas[i])
    norm = lambda sd: float(torch.sqrt(sum(((sd[k] - theta0[k]) ** 2).sum() for k in theta0)))  # noqa: E731
    assert norm(merged) == pytest.approx(sum(norm(t) for t in thetas) / 3, rel=1e-5)


# ---- the whole protocol ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source():
    return TinySource()


@pytest.mark.parametrize("name", ["average", "task-arithmetic", "ties", "magmax", "opcm"])
def test_run_continual_fills_the_lower_triangle(source, name):
    result = run_continual(source, make_method(name), ["b", "a", "c"], seeds_per_class=2)
    assert result.order == ["b", "a", "c"]
    m = result.acc_matrix
    assert all(m[i][j] is None for i in range(3) for j in range(3) if j > i)
    assert all(0 <= m[i][j] <= 100 for i in range(3) for j in range(i + 1))
    acc, bwt, fwt = acc_bwt_fwt(m, [100.0] * 3)
    assert (result.ACC, result.BWT, result.FWT) == (acc, bwt, fwt)
    json.dumps(result.to_json())


def test_run_continual_mingle_records_gates(source):
    config = MingleConfig(rank=4, steps=3, batch_size=4)
    result = run_continual(source, make_method("mingle", config, source.build_encoder), source.tasks,
                           seeds_per_class=2, gate_stats=True)
    gates = result.gates
    assert gates["gate_tasks"] == source.tasks and gates["eval_tasks"] == source.tasks
    assert len(gates["mean"]) == 3 and len(gates["mean"][0]) == 3 and len(gates["std"]) == 3
    assert len(gates["per_layer"]) == 12  # 2 blocks × 6 linears
    assert result.acc_matrix[0][1] is None and result.config["rank"] == 4
    json.dumps(result.to_json())
    # open_clip VisionTransformer kwargs build the same encoders as the suite's factory: the same run
    by_kwargs = run_continual(source, make_method("mingle", config, source.model_config), source.tasks,
                              seeds_per_class=2, gate_stats=True)
    assert by_kwargs.acc_matrix == result.acc_matrix and by_kwargs.gates == result.gates


def test_mingle_needs_the_suites_encoder():
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="MINGLE needs the suite's encoder"):
        make_method("mingle", MingleConfig())


def test_run_continual_passes_the_limit_to_the_test_sets():
    """`limit` caps every task's test set (seed images are drawn from the capped sets, the matrix is
    measured on them) and FWT asks for the experts' accuracy under the same limit."""
    from engine.continual import accuracy_pct
    from engine.errors import ConfigError

    limited = TinySource()
    result = run_continual(limited, make_method("average"), ["c", "a"], seeds_per_class=1, limit=8)
    assert limited.limits_seen == [8, 8] and limited.expert_limits == [8, 8]
    reference = ContinualAverage()
    reference.init(limited.theta0())
    reference.step("c", limited.theta("c"))
    encoder = limited.build_encoder(reference.step("a", limited.theta("a")))
    for j, task in enumerate(["c", "a"]):
        images, labels = limited.test_set(task, 8)
        assert len(labels) == 8
        assert result.acc_matrix[1][j] == accuracy_pct(encoder, limited.logits_fn(task), images, labels)
    with pytest.raises(ConfigError, match="unknown task 'z'"):
        run_continual(limited, make_method("average"), ["a", "z"])


def test_run_orders_summarises_mean_and_std(source):
    out = run_orders(source, lambda: make_method("task-arithmetic"), [42, 43], seeds_per_class=2)
    assert set(out["orders"]) == {"42", "43"}
    # Continual TA's final model is order-independent, so ACC has ~zero std (docs/methods.md, Continual merging).
    assert out["summary"]["ACC"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert summarize([])["ACC"] is None


# ---- CLI --------------------------------------------------------------------------------------------

def _cli(monkeypatch, capsys, source, *argv):
    import engine.cli.continual as cli_continual
    from engine.cli import main

    seen = []
    monkeypatch.setattr(cli_continual, "suite_from_args", lambda args, **kw: seen.append(args) or source)
    code = main(["continual", "--zoo", "unused", *argv])
    if seen:
        assert seen[0].zoo == "unused"
    return code, capsys.readouterr()


def test_cli_json_has_order_matrix_metrics_timings_and_gates(monkeypatch, capsys, source):
    code, out = _cli(monkeypatch, capsys, source, "--method", "mingle", "--rank", "4", "--steps", "2",
                     "--seeds-per-class", "2", "--order-seed", "43", "--json")
    assert code == 0
    payload = json.loads(out.out)
    assert payload["order"] == task_order(source.tasks, 43)
    assert payload["acc_matrix"][0][1] is None and payload["acc_matrix"][2][2] is not None
    assert {"ACC", "BWT", "FWT", "timings", "gates"} <= set(payload)
    assert set(payload["gates"]) >= {"mean", "std", "per_layer"}


def test_cli_several_orders_give_a_summary(monkeypatch, capsys, source):
    code, out = _cli(monkeypatch, capsys, source, "--method", "opcm", "--order-seed", "42", "43", "--json")
    payload = json.loads(out.out)
    assert code == 0 and set(payload["orders"]) == {"42", "43"} and payload["summary"]["BWT"]["n"] == 2


def test_cli_rejects_bad_settings_in_one_line(monkeypatch, capsys, source):
    code, out = _cli(monkeypatch, capsys, source, "--method", "mingle", "--gamma", "-1")
    assert code == 2 and out.err.startswith("error:") and out.err.count("\n") == 1


def test_cli_needs_exactly_one_of_zoo_or_suite(capsys):
    from engine.cli import main

    code = main(["continual", "--zoo", "a", "--suite", "b.toml", "--method", "average"])
    err = capsys.readouterr().err
    assert code == 2 and "either --zoo DIR or --suite FILE" in err and err.count("\n") == 1
    code = main(["continual", "--method", "average"])
    err = capsys.readouterr().err
    assert code == 2 and "--zoo DIR or --suite FILE" in err and err.count("\n") == 1


def test_cli_tasks_keep_the_canonical_order_and_limit_reaches_the_run(monkeypatch, capsys):
    class Selectable(TinySource):
        def check_task(self, task):
            from engine.errors import ConfigError

            if task not in self.tasks:
                raise ConfigError(f"unknown task {task!r}")

        def task_names(self):
            return list(self.tasks)

        def select(self, tasks):
            self.tasks = list(tasks)
            return self

    source = Selectable()
    code, out = _cli(monkeypatch, capsys, source, "--method", "average", "--tasks", "c", "a", "--limit", "8",
                     "--json")
    payload = json.loads(out.out)
    assert code == 0 and sorted(payload["order"]) == ["a", "c"] and source.tasks == ["a", "c"]
    assert payload["order"] == task_order(["a", "c"], 42)
    assert set(source.limits_seen) == {8}
    code, out = _cli(monkeypatch, capsys, Selectable(), "--method", "average", "--tasks", "q")
    assert code == 2 and "unknown task 'q'" in out.err


# ---- the real (quick) zoo --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_source(quick_suite):
    """The quick zoo's task suite IS the continual source."""
    return quick_suite


def test_zoo_source_agrees_with_engine_evaluate(quick_zoo, zoo_source):
    """Heads, test sets, preprocessing and checkpoints read through the suite give engine.evaluate's accuracy."""
    from engine.continual import accuracy_pct
    from engine.evaluate import evaluate

    assert zoo_source.tasks == quick_zoo.task_names()
    task = quick_zoo.task_names()[0]
    images, labels = zoo_source.test_set(task)
    assert images.dtype == torch.float32 and images.shape[1:] == (3, quick_zoo.image_size, quick_zoo.image_size)
    assert len(labels) == quick_zoo.task(task).n_test
    theta = zoo_source.theta(task)
    encoder = zoo_source.build_encoder(theta)
    ours = accuracy_pct(encoder, zoo_source.logits_fn(task), images, labels)
    assert ours == pytest.approx(evaluate(zoo_source, task, tasks=[task], device="cpu").per_task[task], abs=1e-6)
    assert zoo_source.expert_accuracy(task) == pytest.approx(quick_zoo.task(task).accuracy["finetuned"])
    # the suite's encoder is the one MINGLE would build from the manifest's VisionTransformer kwargs
    with torch.no_grad():
        assert torch.equal(encoder(images[:8]), build_encoder(quick_zoo.model_config["kwargs"], theta)(images[:8]))
    # under a limit: a smaller, class-stratified test set, and the expert's accuracy on exactly those images
    small, small_labels = zoo_source.test_set(task, 12)
    assert len(small_labels) == 12 and set(small_labels.tolist()) == set(labels.tolist())
    assert zoo_source.expert_accuracy(task, 12) == pytest.approx(
        accuracy_pct(encoder, zoo_source.logits_fn(task), small, small_labels), abs=1e-6)


def test_baseline_on_the_quick_zoo_over_two_orders(zoo_source):
    out = run_orders(zoo_source, lambda: make_method("average"), [42, 43], seeds_per_class=2)
    n = len(zoo_source.tasks)
    for seed, result in out["orders"].items():
        assert result["order"] == task_order(zoo_source.tasks, int(seed))
        assert len(result["acc_matrix"]) == n and result["acc_matrix"][0][1] is None
        assert result["FWT"] is not None  # the manifest's fine-tuned accuracies are there
    # Continual averaging ends at the plain average whatever the order (docs/methods.md, Continual merging).
    assert out["summary"]["ACC"]["std"] == pytest.approx(0.0, abs=1e-6)


def test_cli_continual_on_the_quick_zoo(quick_zoo):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "engine", "continual", "--zoo", str(quick_zoo.root), "--method",
                          "opcm", "--order-seed", "44", "--json"], capture_output=True, text=True, env=env, cwd=root,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["order"] == task_order(quick_zoo.task_names(), 44) and payload["method"] == "opcm"
    assert {"acc_matrix", "ACC", "BWT", "FWT", "timings"} <= set(payload) and payload.get("gates") is None
    missing = subprocess.run([sys.executable, "-m", "engine", "continual", "--zoo", str(quick_zoo.root / "nope"),
                              "--method", "average"], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and missing.stderr.count("\n") == 1
    bad_device = subprocess.run([sys.executable, "-m", "engine", "continual", "--zoo", str(quick_zoo.root),
                                 "--method", "average", "--device", "tpu"], capture_output=True, text=True, env=env,
                                cwd=root, timeout=120)
    assert bad_device.returncode == 2 and "tpu" in bad_device.stderr and bad_device.stderr.count("\n") == 1


def test_mingle_on_an_explicit_device_matches_the_default(zoo_source):
    """The device plumbing (encoder, experts, gates, subspaces moved to `device`) changes no number on
    the CPU; the CUDA path is the same code with another device (benchmarks/mingle_vitb32.py)."""
    order = zoo_source.tasks[:2]
    config = MingleConfig(steps=3, seeds_per_class=2)
    default = run_continual(zoo_source, make_method("mingle", config, zoo_source.build_encoder), order,
                            seeds_per_class=2, gate_stats=True)
    explicit = run_continual(zoo_source, make_method("mingle", config, zoo_source.build_encoder, device="cpu"), order,
                             seeds_per_class=2, gate_stats=True, device=torch.device("cpu"))
    assert explicit.acc_matrix == default.acc_matrix
    assert explicit.gates["mean"] == default.gates["mean"]


# ---- method_config: the one place the CLI and the app turn settings into a Config ---------------------


@pytest.mark.fast
def test_method_config_defaults_values_and_errors_that_name_the_setting():
    from engine.continual import method_config
    from engine.errors import ConfigError
    from engine.methods.registry import continual_methods

    labels = {name: spec.continual_name for name, spec in continual_methods().items()}
    assert labels == {"mingle": "MINGLE", "average": "C-Averaging", "task-arithmetic": "C-Task Arithmetic",
                      "ties": "C-TIES", "magmax": "MagMax-IND", "opcm": "OPCM"}
    assert method_config("mingle") == MingleConfig()
    assert method_config("mingle", {}) == MingleConfig()
    config = method_config("mingle", {"gamma": 3.0, "steps": 5, "projection": False, "layers": "all"})
    assert isinstance(config, MingleConfig)
    assert (config.gamma, config.steps, config.projection) == (3.0, 5, False)
    assert config.rank == MingleConfig().rank  # the others stay at their defaults
    for name, spec in continual_methods().items():
        assert method_config(name) == spec.continual_config_cls()
        assert make_method(name, encoder=TINY_VIT).config == spec.continual_config_cls()

    with pytest.raises(ConfigError, match="no setting 'gama'") as unknown:
        method_config("mingle", {"gama": 1.0})
    assert "MINGLE" in str(unknown.value) and "gamma" in str(unknown.value)  # lists what it has
    with pytest.raises(ConfigError, match="γ") as bad:
        method_config("mingle", {"gamma": -1.0})
    assert "-1.0" in str(bad.value)
    with pytest.raises(ConfigError, match="steps"):
        method_config("mingle", {"steps": -5})
    with pytest.raises(ConfigError, match="layers"):
        method_config("mingle", {"layers": "some"})
    with pytest.raises(ConfigError, match="unknown continual method 'mingel'"):
        method_config("mingel", {})
    ta_fields = {f for f in type(method_config("task-arithmetic")).__dataclass_fields__}
    with pytest.raises(ConfigError, match="C-Task Arithmetic has no setting 'rank'"):
        method_config("task-arithmetic", {"rank": 4})
    assert "rank" not in ta_fields
