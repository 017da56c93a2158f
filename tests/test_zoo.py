"""The demo zoo: a deterministic offline build, its manifest, and per-task evaluation (API and CLI).

Uses the session's `--quick` zoo (conftest.py); one more quick build checks determinism.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.checkpoints import open_checkpoint
from engine.evaluate import AccuracyReport, evaluate, evaluate_model, load_test_set, predict_logits, zoo_heads
from engine.zoo import build_zoo, load_zoo
from engine.zoo import tasks as zoo_tasks
from engine.zoo.build import QUICK_RECIPE, RECIPE_VERSION
from engine.zoo.manifest import MANIFEST_NAME, load_pretraining_pool

ROOT = Path(__file__).resolve().parents[1]


def engine_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


# ---- the build ------------------------------------------------------------------------------


def test_the_quick_build_is_deterministic(quick_zoo, tmp_path):
    again = build_zoo(tmp_path / "zoo", quick=True)
    first, second = quick_zoo.manifest, again.manifest
    # Every checkpoint, head, test split and the pool hold the same tensors, bit for bit. (Not the same
    # file bytes: safetensors writes its metadata map in a random order.)
    assert first["content_sha256"] == second["content_sha256"]
    assert first["table"] == second["table"]


def test_an_up_to_date_zoo_is_not_rebuilt(quick_zoo):
    manifest = quick_zoo.root / MANIFEST_NAME
    stamp = manifest.stat().st_mtime_ns
    messages = []
    start = time.perf_counter()
    zoo = build_zoo(quick_zoo.root, quick=True, progress=lambda fraction, message: messages.append(message))
    assert time.perf_counter() - start < 5
    assert manifest.stat().st_mtime_ns == stamp
    assert zoo.task_names() == quick_zoo.task_names()
    assert "up to date" in messages[-1]


def test_the_manifest_describes_tasks_files_and_accuracies(quick_zoo):
    zoo = load_zoo(quick_zoo.root)
    assert zoo.recipe_version == RECIPE_VERSION and zoo.seed == 0 and zoo.quick
    assert zoo.task_names() == list(QUICK_RECIPE.tasks)
    assert zoo.model_config["kwargs"]["image_size"] == 32 and zoo.logit_scale == 100.0
    for task in zoo.tasks:
        assert task.description and len(task.classes) == len(set(task.classes)) >= 2
        assert task.n_test == QUICK_RECIPE.n_test
        images, labels = zoo.test_split(task.name)
        assert images.shape == (task.n_test, 32, 32, 3) and images.dtype == np.uint8
        assert set(np.unique(labels)) == set(range(len(task.classes)))
        with Image.open(zoo.examples_path(task.name)) as grid:  # one row per class
            assert grid.height > grid.width * len(task.classes) / (task.examples_per_class + 1)
        assert set(task.accuracy) == {"pretrained", "finetuned", "averaging", "task_arithmetic", "ties"}
        assert zoo.accuracies[task.name] == task.accuracy
    for row in ("pretrained", "finetuned", "averaging", "task_arithmetic", "ties"):
        entry = zoo.table[row]
        assert entry["average"] == pytest.approx(np.mean(list(entry["per_task"].values())), abs=1e-3)
    assert zoo.merges["ties"] == {"method": "ties", "config": {"k": 20.0, "lam": 1.0, "disjoint": "mean"}}
    assert zoo.manifest["targets"]["applies"] is False  # a quick zoo is not held to the paper-like targets
    assert zoo.manifest["size_bytes"] < 100e6


def test_checkpoints_are_open_clip_towers_with_frozen_unit_heads(quick_zoo):
    expert = open_checkpoint(quick_zoo.expert_path("digits"))
    base = open_checkpoint(quick_zoo.pretrained_path)
    assert expert.format == base.format == "open_clip"
    assert expert.keys() == base.keys() and "visual_projection.weight" in base.keys()
    heads = zoo_heads(quick_zoo)
    for task in quick_zoo.tasks:
        head = heads[task.name]
        assert head.shape == (len(task.classes), quick_zoo.model_config["kwargs"]["output_dim"])
        assert torch.allclose(head.norm(dim=1), torch.ones(len(task.classes)), atol=1e-5)
    pool = load_pretraining_pool(quick_zoo)
    assert pool.shape == (QUICK_RECIPE.pool_stored, 32, 32, 3) and pool.dtype == np.uint8


# ---- evaluation -----------------------------------------------------------------------------


def test_evaluate_takes_canonical_weights_names_or_files(quick_zoo):
    reader = open_checkpoint(quick_zoo.expert_path("colors"))
    canonical = {name: reader.tensor(name) for name in reader.keys()}
    by_weights = evaluate(quick_zoo, canonical)
    by_name = evaluate_model(quick_zoo, "colors")
    by_file = evaluate_model(quick_zoo, str(quick_zoo.expert_path("colors")))
    assert isinstance(by_weights, AccuracyReport)
    assert by_weights.per_task == by_name.per_task == by_file.per_task
    assert by_name.per_task["colors"] == quick_zoo.task("colors").accuracy["finetuned"]
    assert by_name.normalized["colors"] == pytest.approx(1.0)
    only = evaluate(quick_zoo, "pretrained", tasks=["arrows"])
    assert list(only.per_task) == ["arrows"]


def test_predict_logits_are_clip_logits_at_scale_100(quick_zoo):
    images, labels = load_test_set(quick_zoo, "arrows")
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32) and len(labels) == len(images)
    raw, _ = quick_zoo.test_split("arrows")
    logits = predict_logits(quick_zoo, "arrows", "arrows", raw[:16])  # uint8 images are preprocessed
    assert logits.shape == (16, len(quick_zoo.task("arrows").classes))
    assert logits.abs().max() <= 100.0 + 1e-3  # 100 * cosine
    assert torch.allclose(logits, predict_logits(quick_zoo, "arrows", "arrows", images[:16]), atol=1e-4)


def test_evaluate_cli_json_reproduces_the_manifest(quick_zoo):
    task = quick_zoo.task_names()[1]
    done = engine_cli("evaluate", "--zoo", str(quick_zoo.root), "--model", task, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"per_task", "average", "normalized", "normalized_average"}
    assert list(report["per_task"]) == quick_zoo.task_names()
    assert report["per_task"][task] == quick_zoo.task(task).accuracy["finetuned"]
    assert report["normalized"][task] == 1.0

    done = engine_cli("evaluate", "--zoo", str(quick_zoo.root), "--model", "pretrained", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["per_task"] == quick_zoo.table["pretrained"]["per_task"]


def test_evaluate_cli_refuses_bad_input_with_one_line(quick_zoo, tmp_path):
    done = engine_cli("evaluate", "--zoo", str(quick_zoo.root), "--model", "no-such-task", "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no-such-task" in done.stderr

    done = engine_cli("evaluate", "--zoo", str(tmp_path / "nowhere"), "--json")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "zoo build" in done.stderr


# ---- the tasks --------------------------------------------------------------------------------


def test_renderers_are_seeded_and_hold_out_their_test_sources():
    for task in zoo_tasks.TASKS:
        a, la = zoo_tasks.render_split(task, "test", 12, seed=3)
        b, lb = zoo_tasks.render_split(task, "test", 12, seed=3)
        assert np.array_equal(a, b) and np.array_equal(la, lb)
        assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    split = zoo_tasks._digit_split()  # handwriting samples never shared between train and test
    for c in range(10):
        assert not set(split["train"][c]) & set(split["test"][c])
    assert len(zoo_tasks.TASKS) == 8 and len({t.name for t in zoo_tasks.TASKS}) == 8
