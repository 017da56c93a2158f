"""Resolving Interference (methods.md §5): the interference metric ξ, the RI loss and adaptation.

The first half runs on a tiny open_clip tower with random unit-norm heads (seconds); the second
half adapts a quick zoo end to end and checks the adapted zoo works like any other.
"""
from __future__ import annotations

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


def test_kl_is_zero_for_equal_logits_and_matches_the_definition():
    p = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    assert float(kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)
    pp, qq = p.softmax(-1), q.softmax(-1)
    by_hand = (pp * (pp / qq).log()).sum(-1)
    torch.testing.assert_close(kl_divergence(p, q, reduction="none"), by_hand)
    assert float(kl_divergence(p, q)) == pytest.approx(float(by_hand.mean()))
    assert float(kl_divergence(p, q)) > 0


def test_xi_is_zero_when_the_merged_model_equals_the_expert():
    model, _, experts, images = tiny_setup()
    # Merged model = expert t for every t: under head t it reproduces expert t exactly.
    for t, task in enumerate(TASKS):
        expert_logits = {task: all_logits(model, experts[task], images)[t]}
        merged_logits = {task: all_logits(model, experts[task], images)[t]}
        report = interference_from_logits(expert_logits, merged_logits)
        assert report.per_task[task] == pytest.approx(0.0, abs=1e-6)
        assert report.agreement_pct[task] == 100.0


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


def test_config_rejects_bad_values_with_the_field_name():
    with pytest.raises(ConfigError, match="aux"):
        validate_config(RIConfig(aux="imagenet"))
    with pytest.raises(ConfigError, match="α"):
        validate_config(RIConfig(alpha=-1.0))
    with pytest.raises(ConfigError, match="trainable"):
        validate_config(RIConfig(trainable="heads"))
    assert not math.isnan(RIConfig().lr)


# ---- auxiliary images --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["render", "noise"])
def test_aux_streams_are_fixed_by_their_seed(source):
    import numpy as np

    from engine.zoo.aux_data import aux_images

    a = aux_images(source, 16, seed=3)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, aux_images(source, 16, seed=3))
    assert not np.array_equal(a, aux_images(source, 16, seed=4))
    assert a.std() > 20  # not blank
    with pytest.raises(ConfigError, match="needs a zoo"):
        aux_images("pool", 4)
    with pytest.raises(ConfigError, match="one of"):
        aux_images("imagenet", 4)


# ---- a whole zoo: the adapted zoo works like any other --------------------------------------------

QUICK_RI = dict(steps=4, batch_size=16, aux_size=64, lr=1e-4)


@pytest.fixture(scope="module")
def zoo(request):
    pytest.importorskip("engine.zoo.manifest", reason="the zoo manifest has not landed yet")
    from pathlib import Path

    from engine.zoo.manifest import load_zoo

    quick_zoo = request.getfixturevalue("quick_zoo")
    return load_zoo(Path(getattr(quick_zoo, "root", quick_zoo)))


@pytest.fixture(scope="module")
def adapted(zoo, tmp_path_factory):
    from engine.methods.ri import adapt_zoo

    out = tmp_path_factory.mktemp("ri") / "adapted"
    torch.set_num_threads(1)
    result = adapt_zoo(zoo, out, RIConfig(**QUICK_RI), xi_max_samples=64)
    return result, out


def test_xi_on_a_zoo_is_zero_for_the_expert_itself(zoo):
    from engine.analysis.interference import measure_interference
    from engine.methods.ri import _read_canonical

    task = zoo.task_names()[0]
    report = measure_interference(zoo, _read_canonical(zoo.expert_path(task)), [task], max_samples=64)
    assert report.per_task[task] == pytest.approx(0.0, abs=1e-5)
    pretrained = measure_interference(zoo, _read_canonical(zoo.pretrained_path), [task], max_samples=64)
    assert pretrained.per_task[task] > 0


def test_adapted_zoo_loads_merges_and_evaluates_like_the_original(zoo, adapted):
    from engine.checkpoints import open_checkpoint
    from engine.evaluate import evaluate
    from engine.methods import METHODS
    from engine.methods.ri import ri_record
    from engine.task_vectors import TaskVectorStack
    from engine.zoo.manifest import load_zoo

    result, out = adapted
    new = load_zoo(out)
    tasks = new.task_names()
    assert tasks == zoo.task_names() and result.tasks == tasks
    record = ri_record(new)
    assert record["config"]["steps"] == QUICK_RI["steps"] and record["source_zoo"] == str(zoo.root)
    assert ri_record(zoo) is None
    # θ_0 is untouched, every expert moved.
    base_old, base_new = open_checkpoint(zoo.pretrained_path), open_checkpoint(new.pretrained_path)
    name = base_old.keys()[0]
    assert torch.equal(base_old.tensor(name), base_new.tensor(name))
    for t in tasks:
        old, adapted_expert = open_checkpoint(zoo.expert_path(t)), open_checkpoint(new.expert_path(t))
        assert adapted_expert.keys() == old.keys()
        assert any(not torch.equal(old.tensor(n), adapted_expert.tensor(n)) for n in old.keys())
    stack = TaskVectorStack.from_files(new.pretrained_path, [new.expert_path(t) for t in tasks], tasks)
    for method in METHODS.values():
        merged = stack.apply(method.merge(stack, method.Config()))
        report = evaluate(new, merged, tasks=tasks)
        assert set(report.per_task) == set(tasks)
    xi = result.xi_task_arithmetic
    assert set(xi["before"]["per_task"]) == set(tasks) and xi["after"]["total"] >= 0
    assert set(result.adapted_accuracies) == set(tasks)
    assert result.timings["adapt_s"] > 0 and [s.steps for s in result.experts] == [QUICK_RI["steps"]] * len(tasks)


def test_ri_and_interference_cli(zoo, adapted, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def cli(*args):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                              cwd=root, timeout=300)

    _, out = adapted
    run = cli("interference", "--zoo", str(out), "--method", "task-arithmetic", "--lam", "0.3", "--max-samples",
              "32", "--json", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["reference_experts"] == str(zoo.root)  # ξ against the original experts
    assert payload["xi"]["total"] == pytest.approx(sum(payload["xi"]["per_task"].values()))
    own = json.loads(cli("interference", "--zoo", str(out), "--method", "average", "--reference", "own",
                         "--max-samples", "32", "--json", "--device", "cpu").stdout)
    assert own["reference_experts"] == str(out)

    run = cli("ri", "--zoo", str(zoo.root), "--out", str(tmp_path / "cli"), "--steps", "2", "--batch-size", "8",
              "--aux-size", "16", "--aux", "noise", "--alpha", "0.5", "--xi-max-samples", "16", "--json",
              "--device", "cpu")
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["config"]["aux"] == "noise" and payload["config"]["alpha"] == 0.5
    assert {"before", "after"} <= set(payload["xi_task_arithmetic"]) and payload["timings"]["total_s"] > 0
    again = cli("ri", "--zoo", str(zoo.root), "--out", str(tmp_path / "cli"), "--steps", "2")
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stderr.count("\n") == 1
    bad = cli("ri", "--zoo", str(zoo.root), "--out", str(tmp_path / "x"), "--aux", "imagenet")
    assert bad.returncode == 2


# ---- the app's cache of adapted zoos: a sibling folder per config, written atomically ------------

CACHE_RI = dict(steps=2, batch_size=16, aux_size=64)


@pytest.fixture
def zoo_copy(quick_zoo, tmp_path):
    """A private copy of the quick zoo, so the `<zoo>-ri-<hash>` siblings land in tmp_path."""
    import shutil
    from pathlib import Path

    pytest.importorskip("engine.zoo.manifest", reason="the zoo manifest has not landed yet")
    from engine.zoo.manifest import load_zoo

    shutil.copytree(Path(getattr(quick_zoo, "root", quick_zoo)), tmp_path / "zoo")
    return load_zoo(tmp_path / "zoo")


def _siblings(zoo):
    return sorted(p.name for p in zoo.root.parent.iterdir() if p.name != zoo.root.name)


def test_ensure_adapted_zoo_builds_once_then_reads_the_cache(zoo_copy, monkeypatch):
    import engine.methods.ri as ri
    from engine.checkpoints import open_checkpoint

    config = RIConfig(**CACHE_RI)
    out = ri.adapted_zoo_dir(zoo_copy, config)
    assert out.parent == zoo_copy.root.parent and out.name.startswith(f"{zoo_copy.root.name}-ri-")
    assert ri.cached_adapted_zoo(zoo_copy, config) is None

    calls = []
    real = ri.adapt_zoo
    monkeypatch.setattr(ri, "adapt_zoo", lambda *a, **k: calls.append(1) or real(*a, **k))
    fractions = []
    adapted = ri.ensure_adapted_zoo(zoo_copy, config, progress=lambda f, m: fractions.append(f))
    assert len(calls) == 1 and fractions and fractions[-1] == 1.0
    assert adapted.root == out and out.is_dir()
    assert _siblings(zoo_copy) == [out.name]  # renamed into place: no temporary folder left
    record = ri.ri_record(adapted)
    assert record["config"]["steps"] == 2 and record["source_zoo"] == str(zoo_copy.root)
    assert set(record["adapted_accuracies"]) == set(zoo_copy.task_names())
    task = zoo_copy.task_names()[0]
    old, new = open_checkpoint(zoo_copy.expert_path(task)), open_checkpoint(adapted.expert_path(task))
    assert any(not torch.equal(old.tensor(n), new.tensor(n)) for n in old.keys())  # the expert did move

    # the second time it is read from disk: adapting again would raise
    def no_second_run(*args, **kwargs):
        raise AssertionError("adapted again although a finished copy exists")

    monkeypatch.setattr(ri, "adapt_zoo", no_second_run)
    cached = ri.cached_adapted_zoo(zoo_copy, config)
    assert cached is not None and cached.root == out
    assert ri.ensure_adapted_zoo(zoo_copy, RIConfig(**CACHE_RI)).root == out  # an equal config: same folder

    other = RIConfig(**{**CACHE_RI, "steps": 3})
    assert ri.adapted_zoo_dir(zoo_copy, other) != out
    assert ri.adapted_zoo_dir(zoo_copy, RIConfig(**{**CACHE_RI, "aux": "noise"})) != out
    assert ri.cached_adapted_zoo(zoo_copy, other) is None

    # a folder without the RI record (a run stopped half-way) is not a cached copy
    (out / "zoo.json").write_text((out / "zoo.json").read_text().replace('"ri"', '"not_ri"'))
    assert ri.cached_adapted_zoo(zoo_copy, config) is None


def test_a_failed_adaptation_leaves_no_folder_behind(zoo_copy, monkeypatch):
    import engine.methods.ri as ri

    config = RIConfig(**CACHE_RI)
    seen = {}

    def failing(zoo, out_dir, *args, **kwargs):
        from pathlib import Path

        seen["out_dir"] = Path(out_dir)
        (Path(out_dir) / "experts").mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "experts" / "half-written.safetensors").write_bytes(b"\0" * 64)
        raise ConfigError("the auxiliary images ran out")

    monkeypatch.setattr(ri, "adapt_zoo", failing)
    with pytest.raises(ConfigError, match="ran out"):
        ri.ensure_adapted_zoo(zoo_copy, config)
    out = ri.adapted_zoo_dir(zoo_copy, config)
    # it wrote into a temporary sibling, not into the final folder, and cleaned that up
    assert seen["out_dir"].parent == out.parent and seen["out_dir"].name.startswith(f".{out.name}")
    assert not out.exists() and not seen["out_dir"].exists()
    assert _siblings(zoo_copy) == []
    assert not [p for p in zoo_copy.root.parent.iterdir() if p.name.startswith(f".{zoo_copy.root.name}")]
    assert ri.cached_adapted_zoo(zoo_copy, config) is None
    with pytest.raises(ConfigError, match="steps"):  # a bad config is refused before anything is written
        ri.ensure_adapted_zoo(zoo_copy, RIConfig(steps=-1))
    assert _siblings(zoo_copy) == []
