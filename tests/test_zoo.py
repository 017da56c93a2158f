"""The demo zoo: a deterministic offline build, its manifest, and per-task evaluation (API and CLI).

Uses the session's `--quick` zoo (conftest.py); one more quick build checks determinism.
"""
from __future__ import annotations

import json
import re
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
from engine.errors import MergeExplorerError
from engine.image_data import stratified_subset
from engine.evaluate import AccuracyReport, as_suite, evaluate, evaluate_model, predict_logits
from engine.zoo import load_zoo
from engine.zoo.build import build_zoo
from engine.zoo import tasks as zoo_tasks
from engine.zoo.build import QUICK_RECIPE, RECIPE_VERSION, recipe_with
from engine.zoo.manifest import MANIFEST_NAME, load_pretraining_pool
from engine.zoo.suite import ZooSuite, preprocess_images

ROOT = Path(__file__).resolve().parents[1]


def engine_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


# ---- the build ------------------------------------------------------------------------------


def test_the_quick_build_is_deterministic(quick_zoo, tmp_path):
    """Built again the way the full recipe builds (pretraining in a child process with a renderer
    working ahead beside it, experts in two worker processes), the quick zoo holds the same tensors as
    the session's in-process build."""
    again = build_zoo(tmp_path / "zoo", quick=True, recipe=recipe_with(QUICK_RECIPE, {"processes": "true"}),
                      workers=2)
    first, second = quick_zoo.manifest, again.manifest
    assert second["build"]["workers"] == 2 and second["recipe"]["processes"]
    # Every checkpoint, head, test split and the pool hold the same tensors, bit for bit. (Not the same
    # file bytes: safetensors writes its metadata map in a random order.)
    assert first["content_sha256"] == second["content_sha256"]
    assert first["table"] == second["table"]


def test_an_expert_from_images_rendered_ahead_is_the_same_expert(quick_zoo, tmp_path):
    """The render-ahead path (splits rendered into a stash while theta_0 pretrains) gives an expert job
    the same images, so the same test split, example grid and expert, as rendering in the job."""
    import dataclasses
    import shutil

    from engine.zoo import build as B

    recipe = dataclasses.replace(B.QUICK_RECIPE, n_train=64, n_test=24, finetune_steps=4)
    heads = B._load_open_clip(quick_zoo.root / "heads.safetensors")
    roots, jobs = [tmp_path / "rendered_ahead", tmp_path / "rendered_in_job"], []
    for root in roots:
        (root / "data").mkdir(parents=True)
        for name in ("pretrained.safetensors", "data/pool.safetensors"):
            shutil.copyfile(quick_zoo.root / name, root / name)
        jobs.append({"task": "arrows", "task_index": 6, "seed": 0, "root": str(root),
                     "recipe": dataclasses.asdict(recipe), "recipe_version": "test",
                     "pretrained_file": "pretrained.safetensors", "expert_file": "experts/arrows.safetensors",
                     "test_file": "data/arrows.test.safetensors", "examples_file": "examples/arrows.png",
                     "head": heads["arrows"].numpy()})
    stash = tmp_path / "stash"
    stash.mkdir()
    B._render_ahead([jobs[0]], str(stash))
    assert sorted(p.name for p in stash.iterdir()) == ["arrows.npz"]  # no half-written file left
    ahead = B._expert_job({**jobs[0], "stash": str(stash)})
    in_job = B._expert_job(jobs[1])
    assert ahead["rendered_ahead"] and not in_job["rendered_ahead"]
    for name in ("experts/arrows.safetensors", "data/arrows.test.safetensors"):
        a, b = (B._load_open_clip(root / name) for root in roots)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (roots[0] / "examples/arrows.png").read_bytes() == (roots[1] / "examples/arrows.png").read_bytes()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc")
def test_build_workers_exit_when_the_build_is_killed(tmp_path):
    """A killed `zoo build` leaves no worker behind: a worker busy with a long job (an expert's
    fine-tuning, here a sleep) exits within seconds of its parent's SIGKILL instead of finishing it."""
    import signal
    import textwrap

    script = tmp_path / "killed_build.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing, os, time
        from concurrent.futures import ProcessPoolExecutor
        from engine.zoo.build import _exit_with_parent

        if __name__ == "__main__":
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_exit_with_parent) as workers:
                print(workers.submit(os.getpid).result(), flush=True)
                workers.submit(time.sleep, 60)
                time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        worker = int(parent.stdout.readline())
        time.sleep(1.0)  # the worker is in its 60-second job
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        parent.kill()
        parent.wait(timeout=10)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc")
def test_a_build_stopped_by_sigterm_leaves_no_process_or_temporary_file(tmp_path):
    """`kill` on a running `zoo build` (pretraining in its child, the renderer working ahead) ends it
    with status 143 within seconds, with no child process left and its temporary folder removed."""
    import signal

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    build = subprocess.Popen(
        [sys.executable, "-m", "engine", "zoo", "build", "--quick", "--dir", str(tmp_path / "zoo"),
         "--set", "processes=true", "--workers", "2"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)})
    try:
        for line in build.stderr:  # the renderer starts before pretraining, so both are running now
            if "pretraining: step" in line:
                break
        children = [int(pid) for pid in Path(f"/proc/{build.pid}/task/{build.pid}/children").read_text().split()]
        assert len(children) >= 2, children  # the renderer and the pretraining process (+ resource tracker)
        build.send_signal(signal.SIGTERM)
        assert build.wait(timeout=20) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in children)
        assert list(scratch.glob("merge-explorer-zoo-*")) == []  # (torch may leave caches of its own there)
    finally:
        build.kill()
        build.wait(timeout=10)


def _alive(pid: int) -> bool:
    """Running, not gone or a zombie (an orphan's zombie waits for whoever adopts it to reap it)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


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


def test_checkpoints_are_open_clip_towers_with_frozen_unit_heads(quick_zoo, quick_suite):
    expert = open_checkpoint(quick_zoo.expert_path("digits"))
    base = open_checkpoint(quick_zoo.pretrained_path)
    assert expert.format == base.format == "open_clip"
    assert expert.keys() == base.keys() and "visual_projection.weight" in base.keys()
    heads = quick_suite.heads()
    assert list(heads) == quick_zoo.task_names()
    for task in quick_zoo.tasks:
        head = heads[task.name]
        assert head.shape == (len(task.classes), quick_zoo.model_config["kwargs"]["output_dim"])
        assert torch.allclose(head.norm(dim=1), torch.ones(len(task.classes)), atol=1e-5)
        assert torch.equal(quick_suite.head(task.name), head)
    pool = load_pretraining_pool(quick_zoo)
    assert pool.shape == (QUICK_RECIPE.pool_stored, 32, 32, 3) and pool.dtype == np.uint8
    assert np.array_equal(quick_suite.pool_images(), pool)


# ---- the zoo as a task suite ------------------------------------------------------------------


def test_the_zoo_suite_is_shared_and_describes_the_zoo(quick_zoo, quick_suite):
    assert ZooSuite.of(quick_zoo) is quick_suite
    assert ZooSuite.load(quick_zoo.root) is quick_suite  # the same build, read again: the same caches
    assert as_suite(quick_suite) is quick_suite
    from engine.sources import suite_source

    source = suite_source(quick_suite)  # what --zoo resolves to on the CLI and in the app: it carries the suite
    assert as_suite(source) is quick_suite and source.can_evaluate
    assert source.tasks == quick_zoo.task_names() and source.base_path == quick_zoo.pretrained_path
    assert quick_suite.kind == "zoo" and str(quick_zoo.root) in quick_suite.label
    assert quick_suite.task_names() == quick_zoo.task_names() and quick_suite.logit_scale == 100.0
    assert quick_suite.pretrained_path == quick_zoo.pretrained_path
    assert quick_suite.expert_paths() == [quick_zoo.expert_path(t) for t in quick_zoo.task_names()]
    for task in quick_zoo.tasks:
        assert quick_suite.classes(task.name) == task.classes and quick_suite.num_classes(task.name) == len(task.classes)
        assert quick_suite.description(task.name) == task.description
    # `select` keeps the order asked for; `reference` of an untouched zoo is itself
    two = quick_zoo.task_names()[:2][::-1]
    assert quick_suite.select(two).task_names() == two and quick_suite.select(None) is quick_suite
    assert quick_suite.reference is quick_suite
    with pytest.raises(MergeExplorerError, match="unknown task 'nope'"):
        quick_suite.check_task("nope")
    with pytest.raises(MergeExplorerError, match="unknown model 'nope'"):
        quick_suite.resolve_weights("nope")


def test_suite_weights_are_canonical_and_load_into_its_encoder(quick_zoo, quick_suite):
    from engine.methods.mingle import build_encoder

    task = quick_zoo.task_names()[0]
    reader = open_checkpoint(quick_zoo.expert_path(task))
    theta = quick_suite.theta(task)
    assert sorted(theta) == reader.keys() and all(torch.equal(theta[k], reader.tensor(k)) for k in theta)
    assert sorted(quick_suite.theta0()) == reader.keys()
    for weights in (task, str(quick_zoo.expert_path(task)), theta):
        resolved = quick_suite.resolve_weights(weights)
        assert all(torch.equal(resolved[k], theta[k]) for k in theta)
    pretrained = quick_suite.resolve_weights("pretrained")
    assert all(torch.equal(pretrained[k], v) for k, v in quick_suite.theta0().items())
    # a partial state dict is completed from θ_0; a foreign tensor is refused
    name = sorted(theta)[0]
    partial = quick_suite.complete({name: theta[name]})
    assert torch.equal(partial[name], theta[name]) and set(partial) == set(theta)
    other = sorted(theta)[1]
    assert torch.equal(partial[other], quick_suite.theta0()[other])
    with pytest.raises(MergeExplorerError, match="'no.such.tensor' is not part of"):
        quick_suite.complete({"no.such.tensor": torch.zeros(1)})
    # the suite's encoder is the zoo's open_clip tower: the same function as one built from the manifest's kwargs
    images = quick_suite.test_set(task)[0][:8]
    encoder = quick_suite.build_encoder(theta)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        assert torch.equal(encoder(images), build_encoder(quick_zoo.model_config["kwargs"], theta)(images))


def test_test_sets_are_model_ready_and_limits_are_seeded_stratified_subsets(quick_zoo, quick_suite):
    task = quick_zoo.task_names()[2]
    raw, raw_labels = quick_zoo.test_split(task)
    images, labels = quick_suite.test_set(task)
    assert images.dtype == torch.float32 and images.shape == (len(raw), 3, 32, 32)
    assert torch.equal(labels, torch.as_tensor(raw_labels).long())
    assert torch.equal(images, quick_suite.model_input(raw))  # ÷255 and CLIP mean/std, exactly as the build
    assert torch.equal(images, preprocess_images(quick_zoo.model_config, raw))
    assert quick_suite.model_input(images) is images  # float input is taken as already preprocessed
    with pytest.raises(MergeExplorerError, match="uint8"):
        quick_suite.model_input(raw[..., :2])
    split = quick_suite.test_split(task)
    assert len(split) == len(raw) and quick_suite.test_split(task) is split  # cached
    assert quick_suite.resolve_limit(None) is None and quick_suite.resolve_limit(0) is None
    assert quick_suite.resolve_limit(-3) is None and quick_suite.resolve_limit(7) == 7
    assert len(quick_suite.test_set(task, limit=0)[1]) == len(raw)  # 0 = the full split
    assert len(quick_suite.test_set(task, limit=10 * len(raw))[1]) == len(raw)

    n_classes = quick_suite.num_classes(task)
    limit = 3 * n_classes + 1
    sub_images, sub_labels = quick_suite.test_set(task, limit=limit)
    assert len(sub_labels) == limit
    counts = torch.bincount(sub_labels, minlength=n_classes)
    full = torch.bincount(labels, minlength=n_classes).double()
    assert torch.all((counts - full * limit / len(raw)).abs() < 1)  # each class keeps its share
    # the subset is a seeded choice of the split's own images, in split order, and the same every time
    again_images, again_labels = ZooSuite(quick_zoo).test_set(task, limit=limit)
    assert torch.equal(sub_images, again_images) and torch.equal(sub_labels, again_labels)
    rows = stratified_subset(raw_labels, limit, seed=0)
    assert list(rows) == sorted(set(rows.tolist())) and list(rows) != list(range(limit))  # not simply the first N
    assert torch.equal(sub_images, images[rows]) and torch.equal(sub_labels, labels[rows])


# ---- evaluation -----------------------------------------------------------------------------


def test_evaluate_takes_canonical_weights_names_or_files(quick_zoo, quick_suite):
    reader = open_checkpoint(quick_zoo.expert_path("colors"))
    canonical = {name: reader.tensor(name) for name in reader.keys()}
    by_weights = evaluate(quick_suite, canonical)
    by_name = evaluate_model(quick_suite, "colors")
    by_file = evaluate_model(quick_suite, str(quick_zoo.expert_path("colors")))
    by_suite = evaluate(ZooSuite.load(quick_zoo.root), "colors")  # the zoo read again: the same suite, numbers
    assert isinstance(by_weights, AccuracyReport)
    assert by_weights.per_task == by_name.per_task == by_file.per_task == by_suite.per_task
    assert by_name.per_task["colors"] == quick_zoo.task("colors").accuracy["finetuned"]
    assert by_name.normalized["colors"] == pytest.approx(1.0)
    assert by_name.n_images == {t.name: t.n_test for t in quick_zoo.tasks} and by_name.limit is None
    only = evaluate(quick_suite, "pretrained", tasks=["arrows"])
    assert list(only.per_task) == ["arrows"] and list(only.n_images) == ["arrows"]
    assert only.per_task["arrows"] == quick_zoo.task("arrows").accuracy["pretrained"]
    payload = by_name.to_json()
    assert payload["n_images"] == by_name.n_images and payload["limit"] is None
    json.dumps(payload)


def test_a_bare_zoo_object_is_refused_with_the_way_to_wrap_it(quick_zoo, quick_suite):
    """Every consumer takes a task suite; a `Zoo` (the manifest) is wrapped once, by `ZooSuite.of`."""
    with pytest.raises(MergeExplorerError, match=r"ZooSuite\.of\(zoo\)"):
        evaluate(quick_zoo, "colors")
    assert as_suite(quick_suite) is quick_suite


def test_evaluate_with_a_limit_normalises_by_the_expert_on_the_same_images(quick_zoo, quick_suite):
    task, limit = "colors", 9
    report = evaluate(quick_suite, "pretrained", tasks=[task], limit=limit)
    assert report.n_images == {task: limit} and report.limit == limit
    images, labels = quick_suite.test_set(task, limit=limit)
    with torch.no_grad():
        logits = quick_suite.logits_fn(task)(quick_suite.build_encoder(quick_suite.theta0())(images))
    assert report.per_task[task] == pytest.approx(100.0 * float((logits.argmax(-1) == labels).double().mean()))
    # the expert's accuracy on those same 9 images is measured (the manifest has full-split numbers only)
    expert = quick_suite.expert_accuracy(task, limit=limit)
    assert expert == evaluate(quick_suite, task, tasks=[task], limit=limit).per_task[task]
    assert report.normalized[task] == pytest.approx(report.per_task[task] / expert)
    assert quick_suite.expert_accuracy(task) == quick_zoo.task(task).accuracy["finetuned"]
    assert evaluate(quick_suite, "pretrained", tasks=[task], limit=0).n_images == {task: quick_zoo.task(task).n_test}


def test_predict_logits_are_clip_logits_at_scale_100(quick_zoo, quick_suite):
    images, labels = quick_suite.test_set("arrows")
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32) and len(labels) == len(images)
    raw, _ = quick_zoo.test_split("arrows")
    logits = predict_logits(quick_suite, "arrows", "arrows", quick_suite.model_input(raw[:16]))
    assert logits.shape == (16, len(quick_zoo.task("arrows").classes))
    assert logits.abs().max() <= 100.0 + 1e-3  # 100 * cosine
    assert torch.allclose(logits, predict_logits(quick_suite, "arrows", "arrows", images[:16]), atol=1e-4)
    # the same logits as the suite's head function on the expert's features
    with torch.no_grad():
        by_hand = quick_suite.logits_fn("arrows")(quick_suite.build_encoder(quick_suite.theta("arrows"))(images[:16]))
    assert torch.allclose(logits, by_hand, atol=1e-4)
    assert torch.equal(logits.argmax(-1), by_hand.argmax(-1))


def test_evaluate_cli_json_reproduces_the_manifest(quick_zoo):
    task = quick_zoo.task_names()[1]
    done = engine_cli("evaluate", "--zoo", str(quick_zoo.root), "--model", task, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"per_task", "average", "normalized", "normalized_average", "n_images", "limit"}
    assert list(report["per_task"]) == quick_zoo.task_names()
    assert report["per_task"][task] == quick_zoo.task(task).accuracy["finetuned"]
    assert report["normalized"][task] == 1.0
    assert report["n_images"] == {t.name: t.n_test for t in quick_zoo.tasks} and report["limit"] is None

    done = engine_cli("evaluate", "--zoo", str(quick_zoo.root), "--model", "pretrained", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["per_task"] == quick_zoo.table["pretrained"]["per_task"]

    done = engine_cli("evaluate", "--zoo", str(quick_zoo.root), "--model", "pretrained", "--limit", "9",
                      "--tasks", task, "--json")
    assert done.returncode == 0, done.stderr
    limited = json.loads(done.stdout)
    assert limited["n_images"] == {task: 9} and limited["limit"] == 9
    assert limited["per_task"][task] == round(
        evaluate(ZooSuite.of(quick_zoo), "pretrained", tasks=[task], limit=9).per_task[task], 4)


def test_evaluate_cli_refuses_bad_input_with_one_line(quick_zoo, tmp_path):
    done = engine_cli("evaluate", "--zoo", str(quick_zoo.root), "--model", "no-such-task", "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no-such-task" in done.stderr

    done = engine_cli("evaluate", "--zoo", str(tmp_path / "nowhere"), "--json")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "zoo build" in done.stderr

    done = engine_cli("evaluate", "--zoo", str(quick_zoo.root), "--suite", str(tmp_path / "s.toml"), "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "either --zoo DIR or --suite FILE" in done.stderr

    done = engine_cli("evaluate", "--suite", str(tmp_path / "missing.toml"), "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no such suite file" in done.stderr


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


@pytest.mark.fast
def test_a_task_look_frames_every_image_and_keeps_the_rest():
    """`frame` px of the task's own colour on all four sides, the inside unchanged, for the splits
    and the prototypes alike; every task a different colour; frame 0 = the images as drawn."""
    plain, labels = zoo_tasks.render_split("arrows", "test", 6, seed=3)
    framed, framed_labels = zoo_tasks.render_split("arrows", "test", 6, seed=3, frame=2)
    assert np.array_equal(labels, framed_labels)
    assert np.array_equal(framed[:, 2:-2, 2:-2], plain[:, 2:-2, 2:-2])
    colour = np.array(zoo_tasks.LOOK_COLORS["arrows"], dtype=np.uint8)
    for edge in (framed[:, :2], framed[:, -2:], framed[:, :, :2], framed[:, :, -2:]):
        assert (edge == colour).all()
    assert not (plain[:, :2] == colour).all()
    protos, _ = zoo_tasks.prototype_images("digits", 2, frame=1)
    assert (protos[:, 0] == np.array(zoo_tasks.LOOK_COLORS["digits"], dtype=np.uint8)).all()
    assert np.array_equal(zoo_tasks.prototype_images("digits", 2)[0][:, 1:-1, 1:-1], protos[:, 1:-1, 1:-1])
    assert len(set(zoo_tasks.LOOK_COLORS.values())) == len(zoo_tasks.TASKS)
    assert {t.name for t in zoo_tasks.TASKS} == set(zoo_tasks.LOOK_COLORS)


@pytest.mark.fast
def test_anchor_images_take_the_other_tasks_looks_in_turn_never_their_own():
    """with_other_looks: the first `fraction` of the images framed in the other tasks' colours,
    cycling through them; the rest, and every image's inside, as drawn; the task's own colour never."""
    tasks = tuple(zoo_tasks.LOOK_COLORS)
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    out = zoo_tasks.with_other_looks(images, "shapes", tasks, frame=2, fraction=0.7)
    others = [t for t in tasks if t != "shapes"]
    for i in range(14):
        assert (out[i, :2] == np.array(zoo_tasks.LOOK_COLORS[others[i % 7]], dtype=np.uint8)).all(), i
    assert np.array_equal(out[14:], images[14:]) and np.array_equal(out[:, 2:-2, 2:-2], images[:, 2:-2, 2:-2])
    own = np.array(zoo_tasks.LOOK_COLORS["shapes"], dtype=np.uint8)
    assert not any((out[i, :2] == own).all() for i in range(20))
    assert np.array_equal(zoo_tasks.with_other_looks(images, "shapes", tasks, frame=2, fraction=0.0), images)


@pytest.mark.fast
def test_pretraining_looks_frame_the_chosen_images_and_name_the_frame_in_the_caption():
    """Recipe.pretrain_looks: _frame paints a border of palette[look - 1] where look > 0 and leaves
    the rest, and the pretraining loss takes (concept, look) pairs as its captions."""
    import dataclasses

    import torch

    from engine.zoo import build as B

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    palette = torch.tensor(zoo_tasks.look_palette(4), dtype=torch.float32) / 255
    y = B._frame(x, torch.tensor([0, 1, 3]), palette, 2)
    assert torch.equal(y[0], x[0]) and torch.equal(y[:, :, 2:-2, 2:-2], x[:, :, 2:-2, 2:-2])
    for image, colour in ((y[1], palette[0]), (y[2], palette[2])):
        for edge in (image[:, :2], image[:, -2:], image[:, :, :2], image[:, :, -2:]):
            assert torch.equal(edge, colour[:, None, None].expand_as(edge))
    assert len(set(zoo_tasks.look_palette(12))) == 12
    pool, concepts = zoo_tasks.render_pool(64, 0)
    recipe = dataclasses.replace(B.QUICK_RECIPE, pretrain_steps=2, pretrain_batch=16)
    plain = B.pretrain(pool, concepts, recipe, 0).state_dict()
    again = B.pretrain(pool, concepts, recipe, 0).state_dict()
    looks = B.pretrain(pool, concepts, dataclasses.replace(recipe, task_frame=2, pretrain_looks=3), 0).state_dict()
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    assert not all(torch.equal(plain[k], looks[k]) for k in plain)


def _common_offset_share(model, images) -> float:
    """Mean over the block linears' input layers (layer norms, MLP hidden) of |mean x|^2 / mean |x|^2."""
    from engine.zoo import build as B

    shares = []

    def record(module, inputs, output):
        x = output.reshape(-1, output.shape[-1]).double()
        shares.append(float(x.mean(0).pow(2).sum() / x.pow(2).sum(-1).mean()))

    handles = [m.register_forward_hook(record) for block in model.transformer.resblocks
               for m in (block.ln_1, block.ln_2, block.mlp.gelu)]
    with torch.no_grad():
        model.eval()(B._normalize(B._to_input(images)))
    for h in handles:
        h.remove()
    return float(np.mean(shares))


@pytest.mark.fast
def test_the_centring_penalty_shrinks_the_common_offset_of_layer_inputs():
    """Recipe.pretrain_centre penalises the batch-and-token mean of every layer norm's and MLP hidden
    layer's output: the same short pretraining leaves a much smaller common offset with it, and the
    returned tower carries no training hooks."""
    import dataclasses

    from engine.zoo import build as B

    pool, concepts = zoo_tasks.render_pool(256, 0)
    recipe = dataclasses.replace(B.QUICK_RECIPE, pretrain_steps=12, pretrain_batch=16)
    plain = B.pretrain(pool, concepts, recipe, 0)
    centred = B.pretrain(pool, concepts, dataclasses.replace(recipe, pretrain_centre=10.0), 0)
    held_out = zoo_tasks.render_pool(64, 1)[0]
    before, after = _common_offset_share(plain, held_out), _common_offset_share(centred, held_out)
    assert after < 0.5 * before, (before, after)
    for module in centred.modules():
        assert not module._forward_hooks


def _theta0_and_head(classes: int = 4):
    """A fresh recipe-shaped tower's state (the zoo's "visual." names) and a fixed random unit head:
    the inputs of the `finetune` tests below."""
    import torch.nn.functional as F

    from engine.zoo import build as B

    theta0 = {f"visual.{k}": v for k, v in B._new_model(0).state_dict().items()}
    head = F.normalize(torch.randn(classes, B.MODEL_KWARGS["output_dim"], generator=torch.Generator().manual_seed(1)),
                       dim=1)
    return theta0, head


@pytest.mark.fast
def test_the_anchor_keeps_pool_embeddings_near_theta0():
    """Recipe -3's function-preserving term: the same fine-tuning with the anchor on moves the
    embeddings of the anchor images (unlabeled pool) less than half as far as with it off."""
    import dataclasses

    import torch.nn.functional as F

    from engine.zoo import build as B

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 64)
    pool = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    theta0, head = _theta0_and_head()
    base = dataclasses.replace(B.QUICK_RECIPE, finetune_steps=30, finetune_batch=16, finetune_lr=4e-3,
                               finetune_logit_scale=20.0)
    ref = B._new_model(0)
    ref.load_state_dict({k.removeprefix("visual."): v for k, v in theta0.items()})
    x_pool = B._normalize(B._to_input(pool))

    def drift(recipe) -> float:
        model, _ = B.finetune(theta0, head, images, labels, recipe, 0, 0, anchor_images=pool)
        with torch.no_grad():
            return float((F.normalize(model(x_pool), dim=-1) - F.normalize(ref.eval()(x_pool), dim=-1))
                         .pow(2).sum(-1).mean())

    free, anchored = drift(base), drift(dataclasses.replace(base, finetune_anchor=10.0))
    assert anchored < 0.5 * free, (anchored, free)


@pytest.mark.fast
def test_the_partial_term_makes_a_fraction_of_the_task_vector_work():
    """Recipe.finetune_partial adds w * CE(theta_0 + s * tau). At the first step tau = 0, so the loss
    is exactly (1 + w) times the plain one; after 40 steps theta_0 + tau / 8 fits the task better
    with the term than without it (the term trains exactly that model)."""
    import dataclasses

    import torch.nn.functional as F

    from engine.zoo import build as B

    rng = np.random.default_rng(0)  # a learnable task: which quadrant of the noise is bright
    images = rng.integers(0, 128, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 64)
    for image, label in zip(images, labels):
        image[16 * (label // 2):16 * (label // 2) + 16, 16 * (label % 2):16 * (label % 2) + 16] += 120
    theta0, head = _theta0_and_head()
    base = dataclasses.replace(B.QUICK_RECIPE, finetune_steps=1, finetune_batch=16, finetune_lr=4e-3,
                               finetune_logit_scale=20.0, finetune_shift=0.0)
    plain = B.finetune(theta0, head, images, labels, base, 0, 0)[1]
    for weight in (1.0, 0.5):
        with_term = B.finetune(theta0, head, images, labels, dataclasses.replace(base, finetune_partial=weight), 0, 0)[1]
        assert with_term == pytest.approx((1 + weight) * plain, rel=1e-5)

    x, y = B._normalize(B._to_input(images)), torch.from_numpy(labels)
    start = B._tower(theta0, 0).state_dict()

    def loss_at_one_eighth(recipe) -> float:
        tuned = B.finetune(theta0, head, images, labels, recipe, 0, 0)[0].state_dict()
        partial = B._tower(theta0, 0)
        partial.load_state_dict({k: start[k] + (tuned[k] - start[k]) / 8 for k in start})
        with torch.no_grad():
            return float(F.cross_entropy(20.0 * F.normalize(partial.eval()(x), dim=-1) @ head.T, y))

    longer = dataclasses.replace(base, finetune_steps=40)
    assert loss_at_one_eighth(dataclasses.replace(longer, finetune_partial=1.0)) < loss_at_one_eighth(longer)


@pytest.mark.fast
def test_side_batches_feed_the_partial_term_and_the_anchor_fewer_images(monkeypatch):
    """finetune_partial_batch / finetune_anchor_batch: every step runs the expert on its whole task
    batch, the partial expert on the first `partial` of those images and the expert on `anchor` pool
    images; 0 means the whole batch, as before the fields existed."""
    import dataclasses

    from engine.zoo import build as B

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 32)
    pool = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    theta0, head = _theta0_and_head()
    base = dataclasses.replace(B.QUICK_RECIPE, finetune_steps=2, finetune_batch=16, finetune_anchor=1.0,
                               finetune_partial=1.0, finetune_shift=0.0)
    seen: list[int] = []
    make_tower = B._tower

    def recording_tower(state, seed):
        model = make_tower(state, seed)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])) if module.training else None)
        return model

    monkeypatch.setattr(B, "_tower", recording_tower)
    for partial, anchor, per_step in ((0, 0, [16, 16, 16]), (8, 4, [16, 8, 4]), (16, 3, [16, 16, 3])):
        seen.clear()
        recipe = dataclasses.replace(base, finetune_partial_batch=partial, finetune_anchor_batch=anchor)
        B.finetune(theta0, head, images, labels, recipe, 0, 0, anchor_images=pool)
        assert seen == per_step * 2, (partial, anchor, seen)


@pytest.mark.fast
def test_a_precomputed_anchor_reference_trains_the_same_expert():
    """finetune_anchor_precomputed embeds every anchor image with theta_0 once, instead of each step's
    batch: the same reference up to float rounding, so the same losses and weights to ~1e-5."""
    import dataclasses

    from engine.zoo import build as B

    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 32)
    pool = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)  # more than one 256-image chunk
    theta0, head = _theta0_and_head()
    recipe = dataclasses.replace(B.QUICK_RECIPE, finetune_steps=5, finetune_batch=16, finetune_anchor=10.0,
                                 finetune_shift=0.0, finetune_lr=4e-3)
    per_step, loss_a = B.finetune(theta0, head, images, labels, recipe, 0, 0, anchor_images=pool)
    once, loss_b = B.finetune(theta0, head, images, labels, dataclasses.replace(recipe, finetune_anchor_precomputed=True),
                              0, 0, anchor_images=pool)
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    moved = sum(float((a - theta0[f"visual.{k}"]).abs().sum()) for k, a in per_step.state_dict().items())
    assert moved > 1.0  # the five steps did train
    for (name, a), b in zip(per_step.state_dict().items(), once.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


@pytest.mark.fast
def test_decay_to_start_shrinks_the_first_step_toward_theta_0():
    """finetune_decay_to_start = d moves every weight back by lr * d * (theta - theta_0) after each
    AdamW step. The first step's gradient is taken at theta_0 either way, so after one step the task
    vector is exactly (1 - lr_0 * d) times the undecayed one."""
    import dataclasses

    from engine.zoo import build as B

    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 32)
    theta0, head = _theta0_and_head()
    recipe = dataclasses.replace(B.QUICK_RECIPE, finetune_steps=1, finetune_batch=16, finetune_lr=4e-3,
                                 finetune_shift=0.0)
    plain = B.finetune(theta0, head, images, labels, recipe, 0, 0)[0].state_dict()
    for decay in (1.0, 50.0):
        decayed = B.finetune(theta0, head, images, labels, dataclasses.replace(recipe, finetune_decay_to_start=decay),
                             0, 0)[0].state_dict()
        factor = 1 - B._lr_at(0, 1, 4e-3) * decay
        for name, value in plain.items():
            start = theta0[f"visual.{name}"]
            assert torch.allclose(decayed[name] - start, factor * (value - start), atol=1e-7), name


@pytest.mark.fast
def test_skipping_deterministic_modes_nan_fill_changes_no_bit():
    """The build's torch settings turn off deterministic mode's NaN fill of new tensors (a fifth of a
    pretraining step): no kernel reads uninitialised memory, so an expert trains to the same bits."""
    import dataclasses

    from engine.zoo import build as B

    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 32)
    pool = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    theta0, head = _theta0_and_head()
    recipe = dataclasses.replace(B.FULL_RECIPE, finetune_steps=3, finetune_batch=16)
    trained = {}
    before = torch.utils.deterministic.fill_uninitialized_memory
    for fill in (True, False):
        with B._torch_settings(1):
            assert torch.utils.deterministic.fill_uninitialized_memory is False
            torch.utils.deterministic.fill_uninitialized_memory = fill
            trained[fill] = B.finetune(theta0, head, images, labels, recipe, 0, 0, anchor_images=pool)[0].state_dict()
        assert torch.utils.deterministic.fill_uninitialized_memory is before
    for name, value in trained[True].items():
        assert torch.equal(value, trained[False][name]), name
    assert not torch.equal(trained[True]["conv1.weight"], theta0["visual.conv1.weight"])


@pytest.mark.fast
def test_a_rank_limited_expert_moves_each_block_linear_by_at_most_rank_r():
    """finetune_rank = r cuts every block linear's delta (q, k and v apart) back to rank r after each
    step; the other parameters train as before. Unlimited, the deltas are (nearly) full rank."""
    import dataclasses

    from engine.zoo import build as B

    rng = np.random.default_rng(4)
    images, labels = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 32)
    theta0, head = _theta0_and_head()
    recipe = dataclasses.replace(B.QUICK_RECIPE, finetune_steps=6, finetune_batch=16, finetune_lr=4e-3,
                                 finetune_shift=0.0)

    def delta_ranks(r):
        model = B.finetune(theta0, head, images, labels, dataclasses.replace(recipe, finetune_rank=r), 0, 0)[0]
        state = model.state_dict()
        ranks = []
        for name, rows in B.block_linear_slices(model):
            s = torch.linalg.svdvals((state[name][rows] - theta0[f"visual.{name}"][rows]).double())
            ranks.append(int((s > 1e-5 * s[0]).sum()))
        return ranks, state

    limited, state = delta_ranks(2)
    assert len(limited) == 6 * B.MODEL_KWARGS["layers"]  # q, k, v, out, fc1, fc2 in every block
    assert max(limited) == 2
    assert not torch.equal(state["ln_post.weight"], theta0["visual.ln_post.weight"])  # the rest still trains
    free, _ = delta_ranks(0)
    assert min(free) > 2


@pytest.mark.fast
def test_block_linears_only_leaves_every_other_parameter_at_theta_0():
    """finetune_block_linears_only trains the matrices MINGLE equips with experts and nothing else,
    with the partial term and the decay toward theta_0 on."""
    import dataclasses

    from engine.zoo import build as B

    rng = np.random.default_rng(5)
    images, labels = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 32)
    theta0, head = _theta0_and_head()
    recipe = dataclasses.replace(B.QUICK_RECIPE, finetune_steps=3, finetune_batch=16, finetune_lr=4e-3,
                                 finetune_shift=0.0, finetune_block_linears_only=True, finetune_partial=1.0,
                                 finetune_decay_to_start=0.5)
    model = B.finetune(theta0, head, images, labels, recipe, 0, 0)[0]
    moving = {name for name, _ in B.block_linear_slices(model)}
    for name, value in model.state_dict().items():
        if name in moving:
            assert not torch.equal(value, theta0[f"visual.{name}"]), name
        else:
            assert torch.equal(value, theta0[f"visual.{name}"]), name


# ---- recipe experiments: variants of the recipe in their own folders ------------------------


@pytest.mark.fast
def test_recipe_fields_are_set_from_text_and_bad_ones_are_named():
    from engine.zoo.build import recipe_with, variant_version

    recipe = recipe_with(QUICK_RECIPE, {"task_frame": "2", "finetune_anchor": "5", "processes": "true",
                                        "tasks": "digits, colors"})
    assert (recipe.task_frame, recipe.finetune_anchor, recipe.processes, recipe.tasks) == (2, 5.0, True,
                                                                                           ("digits", "colors"))
    assert variant_version(QUICK_RECIPE, QUICK_RECIPE) == RECIPE_VERSION
    version = variant_version(QUICK_RECIPE, recipe, Path("elsewhere"))
    assert version.startswith(RECIPE_VERSION + "+") and "task_frame=2" in version and "tasks=digits,colors" in version
    assert version.endswith("pretrained-reused")
    for bad, says in [({"nope": "1"}, "no recipe field 'nope'"), ({"task_frame": "two"}, "takes an integer"),
                      ({"processes": "maybe"}, "true or false"), ({"tasks": "digits,nope"}, "unknown task(s) nope"),
                      ({"finetune_anchor_looks": "0.5"}, "needs task_frame > 0"),
                      ({"finetune_anchor_looks": "2", "task_frame": "2"}, "a share from 0 to 1"),
                      ({"finetune_anchor_batch": "65"}, "finetune_anchor_batch takes 0 (= finetune_batch) up to"),
                      ({"finetune_partial_batch": "-1"}, "finetune_partial_batch takes 0"),
                      ({"finetune_rank": "-2"}, "finetune_rank and pretrain_centre take 0 (off) or more"),
                      ({"pretrain_centre": "-1"}, "finetune_rank and pretrain_centre take 0 (off) or more")]:
        with pytest.raises(MergeExplorerError, match=re.escape(says)) as caught:
            recipe_with(QUICK_RECIPE, bad)
        assert "\n" not in str(caught.value)


def test_a_variant_reuses_the_pretrained_tower_and_records_what_changed(quick_zoo, tmp_path):
    from engine.zoo.build import recipe_with, up_to_date, variant_version

    recipe = recipe_with(QUICK_RECIPE, {"task_frame": "1", "finetune_steps": "10"})
    zoo = build_zoo(tmp_path / "variant", quick=True, recipe=recipe, pretrained_from=quick_zoo.root)
    ours, theirs = zoo.manifest, quick_zoo.manifest
    # the same theta_0 and pool, bit for bit; heads and experts of the variant's own recipe
    for name in ("pretrained.safetensors", "data/pool.safetensors"):
        assert ours["content_sha256"][name] == theirs["content_sha256"][name]
    assert ours["content_sha256"]["heads.safetensors"] != theirs["content_sha256"]["heads.safetensors"]
    assert ours["recipe"]["task_frame"] == 1 and ours["recipe"]["finetune_steps"] == 10
    assert ours["variant"]["changed"] == {"finetune_steps": 10, "task_frame": 1}
    assert ours["variant"]["pretrained_from"]["zoo"] == str(quick_zoo.root.resolve())
    assert ours["recipe_version"] == variant_version(QUICK_RECIPE, recipe, quick_zoo.root) != RECIPE_VERSION
    assert ours["created_by"] == (f"python -m engine zoo build --quick --dir {tmp_path / 'variant'} "
                                  f"--set finetune_steps=10 --set task_frame=1 --pretrained-from {quick_zoo.root}")
    assert set(ours["table"]) == set(theirs["table"])  # measured like any zoo
    # a variant is never taken for the demo zoo, nor the demo zoo for a variant
    assert up_to_date(zoo.root, quick=True, version=ours["recipe_version"])
    assert not up_to_date(zoo.root, quick=True)
    assert not up_to_date(quick_zoo.root, quick=True, version=ours["recipe_version"])
    # a plain build on the variant's folder (as `MERGE_EXPLORER_ZOO=<it> make app` runs) keeps it
    stamp = (zoo.root / MANIFEST_NAME).stat().st_mtime_ns
    messages = []
    kept = build_zoo(zoo.root, quick=True, progress=lambda fraction, message: messages.append(message))
    assert kept.recipe_version == ours["recipe_version"] and "kept as it is" in messages[-1]
    assert (zoo.root / MANIFEST_NAME).stat().st_mtime_ns == stamp


def test_the_zoo_cli_refuses_bad_recipe_experiments_in_one_line(quick_zoo, tmp_path):
    cases = [
        (["--set", "task_frame=2"], "needs its own folder: add --dir"),
        (["--dir", str(tmp_path / "v"), "--set", "task_frame"], "--set takes FIELD=VALUE"),
        (["--dir", str(tmp_path / "v"), "--set", "pretrain_steps=7", "--pretrained-from", str(quick_zoo.root)],
         "was pretrained differently (pretrain_steps)"),
        (["--dir", str(tmp_path / "v"), "--set", "task_frame=1", "--set", "pretrain_looks=3", "--pretrained-from",
          str(quick_zoo.root)], "was pretrained differently (pretrain_looks, task_frame)"),
        (["--dir", str(quick_zoo.root), "--pretrained-from", str(quick_zoo.root)], "is the folder being built"),
        (["--dir", str(tmp_path / "v"), "--pretrained-from", str(tmp_path / "none")], str(tmp_path / "none")),
    ]
    for args, says in cases:
        result = engine_cli("zoo", "build", "--quick", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "v").exists()  # nothing was started
    assert (quick_zoo.root / MANIFEST_NAME).exists()  # and nothing of the source was touched
