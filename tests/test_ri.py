"""Resolving Interference (docs/methods.md, RI): the interference metric ξ, the RI loss and adaptation.

The first half runs on a tiny open_clip tower with random unit-norm heads (seconds); the second
half adapts the quick zoo's experts end to end (`engine.methods.ri.adapt_suite`) and checks that the
adapted experts work like any others: as a zoo copy written by `ri --out`, and as the cache entries
(`engine.adapted`) the app's "RI-adapted experts" switch reads.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine.analysis.interference import interference_from_logits, kl_divergence
from engine.errors import ConfigError
from engine.methods.base import validate_config
from engine.methods.ri import (HeadedTower, RIConfig, adapt_expert, adapt_experts, encoder_to_canonical,
                               ri_loss)
from helpers import tiny_tower



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: a second OpenMP thread mostly spin-waits (measured 5-300x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TASKS = ("a", "b", "c")


def tiny_setup(seed: int = 0, expert_noise: float = 0.05):
    """A tiny tower (16 px, width 16, 2 layers), 3 heads of 4 classes, θ_0 and 3 experts θ_0 + noise."""
    encoder = tiny_tower(seed)
    gen = torch.Generator().manual_seed(seed + 10)
    heads = {t: F.normalize(torch.randn(4, 8, generator=gen), dim=-1) for t in TASKS}
    pretrained = encoder_to_canonical(encoder)
    experts = {t: {k: v + expert_noise * torch.randn(v.shape, generator=gen) for k, v in pretrained.items()}
               for t in TASKS}
    images = torch.randn(96, 3, 16, 16, generator=gen)
    return HeadedTower(encoder, heads), pretrained, experts, images


def all_logits(model: HeadedTower, weights, images):
    return model.logits(model.load(weights).embed_all(images))


# ---- ξ -------------------------------------------------------------------------------------


@pytest.mark.fast
def test_kl_is_zero_for_equal_logits_and_matches_the_definition():
    p = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    assert float(kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)
    pp, qq = p.softmax(-1), q.softmax(-1)
    by_hand = (pp * (pp / qq).log()).sum(-1)
    torch.testing.assert_close(kl_divergence(p, q, reduction="none"), by_hand)
    assert float(kl_divergence(p, q)) == pytest.approx(float(by_hand.mean()))
    assert float(kl_divergence(p, q)) > 0


@pytest.mark.fast
def test_xi_is_zero_when_the_merged_model_equals_the_expert():
    model, _, experts, images = tiny_setup()
    # Merged model = expert t for every t: under head t it reproduces expert t exactly.
    for t, task in enumerate(TASKS):
        expert_logits = {task: all_logits(model, experts[task], images)[t]}
        merged_logits = {task: all_logits(model, experts[task], images)[t]}
        report = interference_from_logits(expert_logits, merged_logits)
        assert report.per_task[task] == pytest.approx(0.0, abs=1e-6)
        assert report.agreement_pct[task] == 100.0


@pytest.mark.fast
def test_xi_sums_per_task_kl_and_grows_with_the_distance_from_the_expert():
    model, pretrained, experts, images = tiny_setup()
    expert = {task: all_logits(model, experts[task], images)[t] for t, task in enumerate(TASKS)}
    merged_far = {task: all_logits(model, pretrained, images)[t] for t, task in enumerate(TASKS)}
    report = interference_from_logits(expert, merged_far)
    assert report.total == pytest.approx(sum(report.per_task.values()))
    assert report.mean == pytest.approx(report.total / 3)
    assert all(v > 0 for v in report.per_task.values())
    assert report.n_samples == {t: 96 for t in TASKS}
    with pytest.raises(ConfigError):
        interference_from_logits(expert, {"a": merged_far["a"]})


# ---- the RI loss -----------------------------------------------------------------------------


@pytest.mark.fast
def test_ri_loss_is_keep_plus_alpha_times_mean_interference():
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(5, 4, generator=gen) for _ in TASKS]
    pretrained = [torch.randn(5, 4, generator=gen) for _ in TASKS]
    expert = torch.randn(5, 4, generator=gen)
    loss = ri_loss(student, expert, pretrained, own=1, alpha=0.7)
    keep = kl_divergence(expert, student[1])
    inter = (kl_divergence(pretrained[0], student[0]) + kl_divergence(pretrained[2], student[2])) / 2
    torch.testing.assert_close(loss.keep, keep)
    torch.testing.assert_close(loss.interference, inter)
    torch.testing.assert_close(loss.total, keep + 0.7 * inter)
    # One task alone: nothing to interfere with.
    alone = ri_loss(student[:1], expert, pretrained[:1], own=0, alpha=1.0)
    assert float(alone.interference) == 0.0


def test_ri_loss_decreases_on_a_tiny_model():
    model, pretrained, experts, images = tiny_setup(expert_noise=0.1)
    base_embeddings = model.load(pretrained).embed_all(images)
    # Full-batch steps: per-batch KL on random images is heavy-tailed, so minibatch curves are noisy.
    config = RIConfig(alpha=1.0, steps=60, lr=3e-4, batch_size=96, aux_size=96)
    adapted, stats = adapt_expert(model, experts["b"], 1, images, base_embeddings, config)
    assert stats.steps == 60 and len(stats.history) == 60
    assert stats.history[-1] < 0.25 * stats.history[0]
    assert stats.aux_loss_before == pytest.approx(stats.history[0], rel=1e-4)
    assert stats.aux_loss_after < 0.25 * stats.aux_loss_before
    assert stats.aux_interference_after < stats.aux_interference_before
    # The pool diagnostic agrees with recomputing L_RI from the adapted weights.
    logits = all_logits(model, adapted, images)
    expert_logits = all_logits(model, experts["b"], images)[1]
    recomputed = ri_loss(logits, expert_logits, model.logits(base_embeddings), 1, 1.0).total
    assert float(recomputed) == pytest.approx(stats.aux_loss_after, rel=1e-3, abs=1e-6)
    assert set(adapted) == set(experts["b"]) and all(adapted[k].dtype == experts["b"][k].dtype for k in adapted)


def test_with_alpha_zero_the_adapted_expert_keeps_the_experts_predictions():
    model, pretrained, experts, images = tiny_setup()
    base_embeddings = model.load(pretrained).embed_all(images)
    config = RIConfig(alpha=0.0, steps=40, lr=3e-3, batch_size=32, aux_size=96)
    adapted, stats = adapt_expert(model, experts["a"], 0, images, base_embeddings, config)
    assert stats.aux_loss_before == pytest.approx(0.0, abs=1e-6)  # it starts at the teacher
    before = all_logits(model, experts["a"], images)
    after = all_logits(model, adapted, images)
    assert float(kl_divergence(before[0], after[0])) < 1e-4
    assert torch.equal(before[0].argmax(-1), after[0].argmax(-1))
    # ... while with α = 1 the same run moves the other heads towards θ_0.
    adapted1, _ = adapt_expert(model, experts["a"], 0, images, base_embeddings, RIConfig(
        alpha=1.0, steps=40, lr=3e-3, batch_size=32, aux_size=96))
    base = model.logits(base_embeddings)
    moved = all_logits(model, adapted1, images)
    assert float(kl_divergence(base[2], moved[2])) < float(kl_divergence(base[2], before[2]))


def test_zero_steps_returns_the_expert_unchanged_and_every_expert_is_adapted():
    model, pretrained, experts, images = tiny_setup()
    adapted, stats = adapt_experts(model, pretrained, experts, images, RIConfig(steps=0, aux_size=96))
    for task in TASKS:
        for name, tensor in experts[task].items():
            torch.testing.assert_close(adapted[task][name], tensor, rtol=0, atol=1e-6)
    assert [s.task for s in stats] == list(TASKS)
    seen = []
    adapt_experts(model, pretrained, experts, images, RIConfig(steps=3, batch_size=8, aux_size=96),
                  progress=lambda f, msg: seen.append(f))
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


@pytest.mark.fast
def test_config_rejects_bad_values_with_the_field_name():
    with pytest.raises(ConfigError, match="aux"):
        validate_config(RIConfig(aux="imagenet"))
    with pytest.raises(ConfigError, match="α"):
        validate_config(RIConfig(alpha=-1.0))
    with pytest.raises(ConfigError, match="trainable"):
        validate_config(RIConfig(trainable="heads"))
    assert not math.isnan(RIConfig().lr)


# ---- auxiliary images --------------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("source", ["render", "noise"])
def test_aux_streams_are_fixed_by_their_seed(source):
    import numpy as np

    from engine.aux_data import aux_images

    a = aux_images(source, 16, seed=3)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, aux_images(source, 16, seed=3))
    assert not np.array_equal(a, aux_images(source, 16, seed=4))
    assert a.std() > 20  # not blank
    sized = aux_images(source, 4, seed=3, size=24)  # a suite's own input size
    assert sized.shape == (4, 24, 24, 3) and sized.dtype == np.uint8
    with pytest.raises(ConfigError, match="needs the demo zoo"):
        aux_images("pool", 4)
    with pytest.raises(ConfigError, match="needs the demo zoo"):
        aux_images("pool", 4, suite=object())  # a suite without a pretraining pool (a suite file)
    with pytest.raises(ConfigError, match="one of"):
        aux_images("imagenet", 4)
    with pytest.raises(ConfigError, match="at least one image"):
        aux_images(source, 0)


@pytest.mark.fast
def test_the_pool_stream_draws_from_the_suites_pool():
    import numpy as np

    from engine.aux_data import aux_images

    class PoolSuite:
        label = "a suite with a pool"

        def pool_images(self):
            return np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3)

    pool = PoolSuite().pool_images()
    drawn = aux_images("pool", 6, seed=1, suite=PoolSuite())
    assert drawn.shape == (6, 4, 4, 3) and np.array_equal(drawn, aux_images("pool", 6, seed=1, suite=PoolSuite()))
    rows = [next(i for i in range(10) if np.array_equal(pool[i], x)) for x in drawn]
    assert len(set(rows)) == 6  # without replacement while the pool is large enough
    assert aux_images("pool", 25, seed=1, suite=PoolSuite()).shape == (25, 4, 4, 3)  # with replacement beyond it


# ---- the quick zoo: ξ, adaptation, and the adapted experts work like any others ----------------------

QUICK_RI = dict(steps=4, batch_size=16, aux_size=64, lr=1e-4)


@pytest.fixture(scope="module")
def zoo(quick_zoo):
    return quick_zoo


@pytest.fixture(scope="module")
def suite(quick_suite):
    return quick_suite


@pytest.fixture(scope="module")
def adapted(suite, tmp_path_factory):
    """The quick zoo's experts adapted in memory, and written as a zoo copy (what `ri --zoo Z --out DIR` does)."""
    from engine.adapted import write_adapted_zoo
    from engine.methods.ri import adapt_suite

    out = tmp_path_factory.mktemp("ri") / "adapted"
    torch.set_num_threads(1)
    weights, result = adapt_suite(suite, RIConfig(**QUICK_RI))
    write_adapted_zoo(suite, out, weights, result)
    return weights, result, out


def _kl_by_hand(suite, teacher, student, task, limit):
    from engine.evaluate import predict_logits

    images = suite.test_set(task, limit)[0]
    return float(kl_divergence(predict_logits(suite, teacher, task, images, device="cpu"),
                               predict_logits(suite, student, task, images, device="cpu")))


def test_xi_on_a_zoo_is_zero_for_the_expert_itself(zoo, suite):
    from engine.analysis.interference import expert_test_logits, measure_interference, reference_suite

    task = zoo.task_names()[0]
    report = measure_interference(suite, suite.theta(task), [task], limit=64)
    assert report.per_task[task] == pytest.approx(0.0, abs=1e-5) and report.agreement_pct[task] == 100.0
    assert report.n_samples == {task: 64}
    pretrained = measure_interference(suite, suite.theta0(), [task], limit=64)
    assert pretrained.per_task[task] > 0
    # ξ under a limit is the KL on the suite's seeded, class-stratified subset (not the first 64 images)
    assert pretrained.per_task[task] == pytest.approx(_kl_by_hand(suite, task, "pretrained", task, 64), rel=1e-5)
    first = suite.test_set(task)[0][:64]
    from engine.evaluate import predict_logits

    first_n = float(kl_divergence(predict_logits(suite, task, task, first, device="cpu"),
                                  predict_logits(suite, "pretrained", task, first, device="cpu")))
    assert pretrained.per_task[task] != pytest.approx(first_n, rel=1e-6)
    full = measure_interference(suite, suite.theta0(), [task])
    assert full.n_samples == {task: zoo.task(task).n_test}
    # the experts' logits are cached per (expert file, suite, task, limit)
    logits = expert_test_logits(suite, task, limit=64)
    assert logits.shape == (64, suite.num_classes(task)) and expert_test_logits(suite, task, limit=64) is logits
    # the original zoo's experts are not RI-adapted: "auto" and "own" are the suite itself, "original" is refused
    assert reference_suite(suite) is suite and reference_suite(suite, "own") is suite
    with pytest.raises(ConfigError, match="not RI-adapted; use --reference own"):
        reference_suite(suite, "original")
    with pytest.raises(ConfigError, match="reference must be auto, own or original"):
        measure_interference(suite, suite.theta0(), [task], limit=8, reference="theirs")


def test_adapted_zoo_loads_merges_and_evaluates_like_the_original(zoo, suite, adapted):
    from engine.adapted import ri_record
    from engine.analysis.interference import measure_interference, reference_suite
    from engine.checkpoints import open_checkpoint
    from engine.evaluate import evaluate
    from engine.methods.registry import merge_methods
    from engine.methods.ri import xi_before_after
    from engine.task_vectors import TaskVectorStack
    from engine.zoo.manifest import load_zoo
    from engine.zoo.suite import ZooSuite

    weights, result, out = adapted
    new_zoo = load_zoo(out)
    new = ZooSuite.load(out)
    tasks = new.task_names()
    assert tasks == zoo.task_names() and result.tasks == tasks and set(weights) == set(tasks)
    assert result.suite == suite.label
    record = ri_record(new)
    assert record["config"]["steps"] == QUICK_RI["steps"] and record["source_zoo"] == str(zoo.root)
    assert record["source"] == suite.label and set(record["adapted_accuracies"]) == set(tasks)
    assert new_zoo.manifest["ri"] == record
    assert ri_record(suite) is None
    # normalised accuracy and ξ keep referring to the ORIGINAL experts
    assert new.reference is suite and reference_suite(new) is suite and reference_suite(new, "own") is new
    assert reference_suite(new, "original") is suite
    # θ_0 is untouched, every expert moved; the files are written as the zoo writes them (open_clip layout)
    base_old, base_new = open_checkpoint(zoo.pretrained_path), open_checkpoint(new.pretrained_path)
    assert all(torch.equal(base_old.tensor(n), base_new.tensor(n)) for n in base_old.keys())
    for t in tasks:
        old, adapted_expert = open_checkpoint(zoo.expert_path(t)), open_checkpoint(new.expert_path(t))
        assert adapted_expert.format == old.format == "open_clip"
        assert adapted_expert.keys() == old.keys()
        assert any(not torch.equal(old.tensor(n), adapted_expert.tensor(n)) for n in old.keys())
        # what was written is what adapt_suite returned, bit for bit
        assert all(torch.equal(adapted_expert.tensor(n), weights[t][n]) for n in old.keys())
        # the recorded accuracy of the adapted expert is its accuracy on its own task
        assert evaluate(new, t, tasks=[t]).per_task[t] == result.adapted_accuracies[t]
    stack = TaskVectorStack.from_suite(new)
    assert stack.tasks == tasks and stack.kept_from_base == []
    for method in merge_methods().values():
        merged = stack.apply(method.merge(stack, method.Config()))
        report = evaluate(new, merged, tasks=tasks)
        assert set(report.per_task) == set(tasks)
        for t in tasks:  # divided by the original expert's accuracy, not the adapted one's
            assert report.normalized[t] == pytest.approx(report.per_task[t] / zoo.task(t).accuracy["finetuned"])
    # ξ against the original experts by default; against the adapted ones with reference="own"
    t0 = tasks[0]
    merged = stack.apply(merge_methods()["task-arithmetic"].merge(stack, merge_methods()["task-arithmetic"].Config()))
    default = measure_interference(new, merged, [t0], limit=32)
    assert default.per_task[t0] == pytest.approx(_kl_by_hand(suite, t0, merged, t0, 32), rel=1e-5)
    own = measure_interference(new, merged, [t0], limit=32, reference="own")
    assert own.per_task[t0] == pytest.approx(_kl_by_hand(new, t0, merged, t0, 32), rel=1e-5)
    assert own.per_task[t0] != pytest.approx(default.per_task[t0], rel=1e-6)
    xi = xi_before_after(suite, new, limit=32)
    assert xi["method"] == "task-arithmetic" and set(xi["before"]["per_task"]) == set(tasks)
    assert xi["after"]["total"] >= 0 and xi["after"]["n_samples"] == {t: 32 for t in tasks}
    assert xi["after"]["per_task"][t0] == pytest.approx(default.per_task[t0], rel=1e-5)
    assert result.timings["adapt_s"] > 0 and [s.steps for s in result.experts] == [QUICK_RI["steps"]] * len(tasks)
    payload = result.to_json()
    assert payload["suite"] == suite.label and payload["tasks"] == tasks and payload["config"]["steps"] == 4


def test_adapt_suite_with_zero_steps_keeps_every_expert(suite):
    from engine.methods.ri import adapt_suite, aux_tensor

    config = RIConfig(steps=0, aux_size=8, aux="noise")
    aux = aux_tensor(suite, config)
    assert aux.dtype == torch.float32 and aux.shape == (8, 3, 32, 32)
    assert torch.equal(aux, aux_tensor(suite, config))
    pool = aux_tensor(suite, RIConfig(aux_size=8))  # the default: the zoo's pretraining pool
    assert pool.shape == (8, 3, 32, 32) and not torch.equal(pool, aux)
    fractions = []
    weights, result = adapt_suite(suite, config, measure_accuracy=False, progress=lambda f, m: fractions.append(f))
    assert result.adapted_accuracies is None and fractions[-1] == 1.0 and fractions == sorted(fractions)
    for t in suite.task_names():
        theta = suite.theta(t)
        assert set(weights[t]) == set(theta)
        for name, tensor in theta.items():
            torch.testing.assert_close(weights[t][name], tensor, rtol=0, atol=1e-6)


def test_ri_and_interference_cli(zoo, suite, adapted, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from engine.zoo.manifest import load_zoo
    from engine.zoo.suite import ZooSuite

    root = Path(__file__).resolve().parents[1]

    def cli(*args):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                              cwd=root, timeout=300)

    _, _, out = adapted
    run = cli("interference", "--zoo", str(out), "--method", "task-arithmetic", "--lam", "0.3", "--limit",
              "32", "--json", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["reference_experts"] == suite.label  # ξ against the original experts
    assert payload["suite"] == ZooSuite.load(out).label != suite.label
    assert payload["kept_from_base"] == [] and payload["tasks"] == zoo.task_names()
    assert payload["xi"]["total"] == pytest.approx(sum(payload["xi"]["per_task"].values()))
    assert payload["xi"]["n_samples"] == {t: 32 for t in zoo.task_names()}
    own = json.loads(cli("interference", "--zoo", str(out), "--method", "average", "--reference", "own",
                         "--limit", "32", "--json", "--device", "cpu").stdout)
    assert own["reference_experts"] == own["suite"] == payload["suite"]
    gone = cli("interference", "--zoo", str(out), "--method", "average", "--max-samples", "32")
    assert gone.returncode == 2 and "--max-samples" in gone.stderr  # renamed --limit

    run = cli("ri", "--zoo", str(zoo.root), "--out", str(tmp_path / "cli"), "--steps", "2", "--batch-size", "8",
              "--aux-size", "16", "--aux", "noise", "--alpha", "0.5", "--limit", "16", "--json",
              "--device", "cpu")
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["config"]["aux"] == "noise" and payload["config"]["alpha"] == 0.5
    assert payload["suite"] == suite.label and payload["out"] == str(tmp_path / "cli")
    assert {"before", "after"} <= set(payload["xi_task_arithmetic"]) and payload["timings"]["total_s"] > 0
    assert payload["xi_task_arithmetic"]["before"]["n_samples"] == {t: 16 for t in zoo.task_names()}
    written = load_zoo(tmp_path / "cli")
    assert written.manifest["ri"]["source_zoo"] == str(zoo.root) and written.manifest["ri"]["config"]["steps"] == 2
    again = cli("ri", "--zoo", str(zoo.root), "--out", str(tmp_path / "cli"), "--steps", "2")
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stderr.count("\n") == 1
    bad = cli("ri", "--zoo", str(zoo.root), "--out", str(tmp_path / "x"), "--aux", "imagenet")
    assert bad.returncode == 2
    over = cli("ri", "--zoo", str(tmp_path / "cli"), "--out", str(tmp_path / "cli"), "--overwrite", "--steps", "2")
    assert over.returncode == 2 and "not over the source" in over.stderr and over.stderr.count("\n") == 1
    gone = cli("ri", "--zoo", str(zoo.root), "--out", str(tmp_path / "y"), "--xi-max-samples", "16")
    assert gone.returncode == 2 and "--xi-max-samples" in gone.stderr  # use --limit


# ---- the cache of adapted experts (engine.adapted): one folder per (suite, config), written atomically ----

CACHE_RI = dict(steps=2, batch_size=16, aux_size=64)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder (MERGE_EXPLORER_CACHE), so entries land in tmp_path."""
    from engine.cache import CACHE_ENV, cache_root

    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    assert cache_root() == folder
    return folder


def _entries(cache):
    ri = cache / "ri"
    return sorted(p.name for p in ri.iterdir()) if ri.is_dir() else []


def test_ensure_adapted_builds_once_then_reads_the_cache(suite, cache, monkeypatch):
    import engine.adapted as adapted_mod
    from engine.checkpoints import open_checkpoint

    config = RIConfig(**CACHE_RI)
    out = adapted_mod.adapted_dir(suite, config)
    assert out.parent == cache / "ri" and len(out.name) == 12
    assert adapted_mod.cached_adapted(suite, config) is None

    calls = []
    real = adapted_mod.adapt_suite
    monkeypatch.setattr(adapted_mod, "adapt_suite", lambda *a, **k: calls.append(1) or real(*a, **k))
    fractions = []
    adapted = adapted_mod.ensure_adapted(suite, config, progress=lambda f, m: fractions.append(f))
    assert len(calls) == 1 and fractions and fractions[-1] == 1.0
    assert out.is_dir() and _entries(cache) == [out.name]  # renamed into place: no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ["experts", "ri.json"]
    assert adapted.task_names() == suite.task_names() and adapted.reference is suite
    assert "RI-adapted" in adapted.label and adapted.label != suite.label
    assert adapted.pretrained_path == suite.pretrained_path
    assert all(adapted.expert_path(t).parent == out / "experts" for t in suite.task_names())
    record = adapted_mod.ri_record(adapted)
    assert record["config"]["steps"] == 2 and record["source"] == suite.label
    assert set(record["adapted_accuracies"]) == set(suite.task_names())
    assert adapted_mod.ri_record(suite) is None
    task = suite.task_names()[0]
    old, new = open_checkpoint(suite.expert_path(task)), open_checkpoint(adapted.expert_path(task))
    assert any(not torch.equal(old.tensor(n), new.tensor(n)) for n in old.keys())  # the expert did move
    # the adapted suite evaluates (normalised by the original experts) and its ξ refers to the originals
    from engine.evaluate import evaluate

    report = evaluate(adapted, task, tasks=[task])
    assert report.per_task[task] == record["adapted_accuracies"][task]
    assert report.normalized[task] == pytest.approx(report.per_task[task] / suite.expert_accuracy(task))

    # the second time it is read from disk: adapting again would raise
    def no_second_run(*args, **kwargs):
        raise AssertionError("adapted again although a finished copy exists")

    monkeypatch.setattr(adapted_mod, "adapt_suite", no_second_run)
    cached = adapted_mod.cached_adapted(suite, config)
    assert cached is not None and cached.expert_paths() == adapted.expert_paths()
    again = adapted_mod.ensure_adapted(suite, RIConfig(**CACHE_RI))  # an equal config: the same folder
    assert again.expert_paths() == adapted.expert_paths() and adapted_mod.ri_record(again) == record

    other = RIConfig(**{**CACHE_RI, "steps": 3})
    assert adapted_mod.adapted_dir(suite, other) != out
    assert adapted_mod.adapted_dir(suite, RIConfig(**{**CACHE_RI, "aux": "noise"})) != out
    assert adapted_mod.adapted_dir(suite.select(suite.task_names()[:2]), config) != out  # another suite
    assert adapted_mod.cached_adapted(suite, other) is None

    # an entry without its record, or with an expert missing, is not a cached copy
    (out / "ri.json").rename(out / "ri.json.bak")
    assert adapted_mod.cached_adapted(suite, config) is None
    (out / "ri.json.bak").rename(out / "ri.json")
    assert adapted_mod.cached_adapted(suite, config) is not None
    (out / "experts" / f"{task}.safetensors").unlink()
    assert adapted_mod.cached_adapted(suite, config) is None
    # ... and ensure_adapted replaces such a leftover with a complete entry
    monkeypatch.setattr(adapted_mod, "adapt_suite", real)
    rebuilt = adapted_mod.ensure_adapted(suite, config)
    assert rebuilt.expert_path(task).is_file() and _entries(cache) == [out.name]


def test_a_failed_adaptation_leaves_no_entry_behind(suite, cache, monkeypatch):
    import engine.adapted as adapted_mod
    from engine.methods.ri import RIResult

    config = RIConfig(**CACHE_RI)
    out = adapted_mod.adapted_dir(suite, config)

    def fake_adapt(s, c, **kwargs):  # no training: the experts as they are
        return ({t: s.theta(t) for t in s.task_names()},
                RIResult(suite=s.label, tasks=s.task_names(), config={"alpha": 1.0, "steps": 2}, experts=[],
                         timings={}))

    seen = {}
    real_write = adapted_mod.write_experts

    def crash_half_way(folder, weights, result):
        from pathlib import Path

        seen["folder"] = Path(folder)
        (Path(folder) / "experts").mkdir(parents=True, exist_ok=True)
        (Path(folder) / "experts" / "half-written.safetensors").write_bytes(b"\0" * 64)
        raise ConfigError("the disk ran full")

    monkeypatch.setattr(adapted_mod, "adapt_suite", fake_adapt)
    monkeypatch.setattr(adapted_mod, "write_experts", crash_half_way)
    with pytest.raises(ConfigError, match="ran full"):
        adapted_mod.ensure_adapted(suite, config)
    # it wrote into a temporary folder beside the entry, not into the entry, and cleaned that up
    assert seen["folder"].parent == out.parent and seen["folder"].name.startswith(f".{out.name}")
    assert not out.exists() and not seen["folder"].exists()
    assert _entries(cache) == []
    assert adapted_mod.cached_adapted(suite, config) is None

    # a failure while adapting writes nothing at all
    def failing(*args, **kwargs):
        raise ConfigError("the auxiliary images ran out")

    monkeypatch.setattr(adapted_mod, "adapt_suite", failing)
    with pytest.raises(ConfigError, match="ran out"):
        adapted_mod.ensure_adapted(suite, config)
    assert _entries(cache) == []

    # a bad config is refused before anything is written
    from engine.methods.ri import adapt_suite

    monkeypatch.setattr(adapted_mod, "adapt_suite", adapt_suite)
    with pytest.raises(ConfigError, match="steps"):
        adapted_mod.ensure_adapted(suite, RIConfig(steps=-1))
    assert _entries(cache) == []

    # with the writer back, the same (fake) run completes into place
    monkeypatch.setattr(adapted_mod, "adapt_suite", fake_adapt)
    monkeypatch.setattr(adapted_mod, "write_experts", real_write)
    done = adapted_mod.ensure_adapted(suite, config)
    assert _entries(cache) == [out.name] and done.expert_path(suite.task_names()[0]).is_file()


# ---- a suite file (real CLIP layout, tiny): `ri --suite` writes a suite file that refers to the original ----


@pytest.fixture(scope="module")
def clip_suite_file(tmp_path_factory):
    """The tiny "bring your own CLIP" suite of tests/clip_fixtures.py, with a private cache folder."""
    from clip_fixtures import build_clip_suite
    from engine.cache import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("clip_cache")))
        yield build_clip_suite(tmp_path_factory.mktemp("clip_suite") / "suite")


@pytest.fixture(scope="module")
def ri_on_suite_file(clip_suite_file, tmp_path_factory):
    """`python -m engine ri --suite FILE --out DIR --json` (in-process), and what it printed."""
    import contextlib
    import io
    import json

    from engine.cli import main

    out = tmp_path_factory.mktemp("ri_suite") / "adapted"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["ri", "--suite", str(clip_suite_file), "--out", str(out), "--aux", "noise", "--steps", "2",
                     "--batch-size", "8", "--aux-size", "16", "--limit", "6", "--json", "--device", "cpu"])
    assert code == 0, stderr.getvalue()
    return json.loads(stdout.getvalue()), out


@pytest.mark.slow
def test_ri_on_a_suite_file_writes_a_suite_file_whose_reference_is_the_original(clip_suite_file, ri_on_suite_file):
    from engine.analysis.interference import reference_suite
    from engine.checkpoints import open_checkpoint
    from engine.evaluate import evaluate
    from engine.suite_file import load_suite_file

    payload, out = ri_on_suite_file
    original = load_suite_file(clip_suite_file)
    tasks = original.task_names()
    assert payload["suite"] == original.label and payload["out"] == str(out / "suite.toml")
    assert payload["tasks"] == tasks and payload["config"]["aux"] == "noise" and payload["config"]["steps"] == 2
    assert [e["steps"] for e in payload["experts"]] == [2] * len(tasks)
    xi = payload["xi_task_arithmetic"]
    assert xi["before"]["n_samples"] == xi["after"]["n_samples"] == {t: 6 for t in tasks}
    assert xi["after"]["total"] == pytest.approx(sum(xi["after"]["per_task"].values()))
    record = json.loads((out / "ri.json").read_text())
    assert record["config"]["steps"] == 2 and record["source"] == original.label
    assert set(record["adapted_accuracies"]) == set(tasks)

    adapted = load_suite_file(out / "suite.toml", limit=6)
    assert adapted.task_names() == tasks and adapted.pretrained_path.resolve() == original.pretrained_path.resolve()
    assert adapted.reference.path.resolve() == clip_suite_file.resolve()
    assert reference_suite(adapted).label == original.label and reference_suite(adapted, "own") is adapted
    for t in tasks:
        assert adapted.expert_path(t).resolve() == (out / "experts" / f"{t}.safetensors").resolve()
        assert adapted.classes(t) == original.classes(t)
        old, new = open_checkpoint(original.expert_path(t)), open_checkpoint(adapted.expert_path(t))
        assert new.keys() == old.keys()
        assert any(not torch.equal(old.tensor(n), new.tensor(n)) for n in old.keys())
    # normalised accuracy divides by the ORIGINAL expert's accuracy on the same images
    task = tasks[0]
    report = evaluate(adapted, task, tasks=[task], limit=6, device="cpu")
    assert report.per_task[task] == pytest.approx(record["adapted_accuracies"][task])
    assert report.normalized[task] == pytest.approx(report.per_task[task] / original.expert_accuracy(task, 6, "cpu"))


def test_ri_record_of_a_written_suite_file(ri_on_suite_file):
    from engine.adapted import ri_record
    from engine.suite_file import load_suite_file

    _, out = ri_on_suite_file
    record = ri_record(load_suite_file(out / "suite.toml"))
    assert record is not None and record["config"]["steps"] == 2


@pytest.mark.slow
def test_ri_on_a_suite_file_refuses_the_pool_and_its_own_folder(clip_suite_file, tmp_path, capsys):
    from engine.cli import main

    code = main(["ri", "--suite", str(clip_suite_file), "--out", str(tmp_path / "pool"), "--aux", "pool",
                 "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "needs the demo zoo" in err and err.count("\n") == 1
    assert not (tmp_path / "pool").exists() or not any((tmp_path / "pool").iterdir())
    code = main(["ri", "--suite", str(clip_suite_file), "--out", str(clip_suite_file.parent), "--overwrite",
                 "--steps", "1", "--aux", "noise", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "not over the source" in err and err.count("\n") == 1
