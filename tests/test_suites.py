"""Task suites over real CLIP checkpoints (suite files, engine.suite_file) and the demo zoo behind the
same TaskSuite interface.

Every test reads as an example of the API on the tiny, download-free suite of
`tests/clip_fixtures.build_clip_suite` (a random tiny CLIP ViT, experts alpha/beta/gamma, an
ImageFolder of PNGs, parquet shards and an ImageFolder of JPEGs with one odd-sized image):

- heads are open_clip's own `build_zero_shot_classifier`, cached on disk;
- `python -m engine evaluate --suite` agrees image for image with a hand-written open_clip loop;
- the open_clip and the Hugging Face (FusionBench) layouts of the same weights give the same numbers;
- MINGLE, RI, sweeps and `--limit` run on a suite;
- a bad suite file is exit code 2 with one line naming the file and the key, before any heavy work;
- the demo zoo is a TaskSuite too (`ZooSuite`), and reproduces its manifest.

Each test points MERGE_EXPLORER_CACHE at its own folder (autouse fixture), so zero-shot heads, decoded
images, expert accuracies and RI-adapted experts never leak from one test into another.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import image_transform
from PIL import Image
from safetensors.torch import load_file, save_file

import engine.evaluate as engine_evaluate
from clip_fixtures import EXPERTS, TINY_CLIP_CFG, build_clip_suite
from engine.cli import main as cli_main
from engine.clip_model import new_visual_tower
from engine.continual import make_method, run_continual, task_order
from engine.evaluate import as_suite, evaluate, predict_logits
from engine.image_data import stratified_subset
from engine.methods import get_method
from engine.methods.mingle import MingleConfig
from engine.methods.ri import RIConfig, adapt_suite
from engine.suite_file import ClipSuite, load_suite_file
from engine.sweep import sweep_methods
from engine.task_vectors import TaskVectorStack

REPO = Path(__file__).resolve().parents[1]
fast = pytest.mark.fast  # marked one by one: some tests here run subprocesses or need the quick zoo


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models are tiny: one thread is much faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh engine cache folder per test, and no in-process evaluation state from earlier tests."""
    folder = tmp_path / "engine-cache"
    monkeypatch.setenv("MERGE_EXPLORER_CACHE", str(folder))
    engine_evaluate.clear_cache()
    yield folder
    engine_evaluate.clear_cache()


@pytest.fixture(scope="module")
def oc_suite(tmp_path_factory) -> Path:
    """The tiny suite in the open_clip layout (config JSON + full CLIP safetensors, `visual.*` experts).
    Shared by the module: tests only read it (bad-suite tests edit a copy)."""
    return build_clip_suite(tmp_path_factory.mktemp("suite-open_clip"), layout="open_clip")


@pytest.fixture(scope="module")
def hf_suite(tmp_path_factory) -> Path:
    """The same weights as a Hugging Face CLIPModel folder + CLIPVisionModel expert folders."""
    return build_clip_suite(tmp_path_factory.mktemp("suite-hf"), layout="hf")


def _cli_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "MERGE_EXPLORER_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def start_cli(cache: Path, *args: str) -> subprocess.Popen:
    """`python -m engine ARGS` started in the background (several can run while the test works)."""
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=REPO, env=_cli_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def json_ok(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def cli_here(capsys, *args: str) -> dict:
    """`python -m engine ARGS` (with --json) run in this process: the command line's own code path
    (engine.cli.main), without the ~10 s of imports a fresh process costs on this machine. The
    fresh-process contract itself is checked by the subprocess tests (evaluate, bad suites)."""
    capsys.readouterr()
    rc = cli_main(list(args))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


# ---- an independent reference: open_clip's own model, transform, tokenizer and classifier ----


def reference_clip(suite_file: Path, expert: str | None = None) -> tuple[CLIP, dict]:
    """The suite's CLIP built and loaded with open_clip directly (open_clip layout only); with
    `expert`, its vision tower replaced by that expert's `visual.*` tensors."""
    root = suite_file.parent
    cfg = json.loads((root / "tiny_clip.json").read_text())
    model = CLIP(**cfg).eval()
    model.load_state_dict(load_file(str(root / "clip" / "open_clip_model.safetensors")))
    if expert is not None:
        tensors = load_file(str(root / "ft" / f"{expert}.safetensors"))
        model.visual.load_state_dict({k.removeprefix("visual."): v for k, v in tensors.items()})
    return model, cfg


def reference_classifier(model: CLIP, cfg: dict, classes, templates) -> torch.Tensor:
    """[D, C]: open_clip.build_zero_shot_classifier with open_clip's tokenizer."""
    tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    with torch.no_grad():
        return open_clip.build_zero_shot_classifier(model, tokenizer, list(classes), list(templates),
                                                    device="cpu", use_tqdm=False)


def reference_images(suite_file: Path, task: str) -> tuple[list[Image.Image], np.ndarray, list[str], list[str]]:
    """(PIL images, labels, classes, templates) of a task, read straight from the suite file's data:
    ImageFolder = sorted class folders, sorted files; parquet = sorted shards read with pyarrow."""
    spec = tomllib.loads(suite_file.read_text())["tasks"][task]
    data = suite_file.parent / spec["data"]
    shards = sorted(data.glob("*.parquet"))
    images, labels = [], []
    if shards:
        for shard in shards:
            table = pq.read_table(shard).to_pylist()
            images += [Image.open(io.BytesIO(row["image"]["bytes"])) for row in table]
            labels += [row["label"] for row in table]
        classes = spec["classes"]
    else:
        classes = sorted(p.name for p in data.iterdir() if p.is_dir())
        for label, name in enumerate(classes):
            for file in sorted((data / name).iterdir()):
                images.append(Image.open(file))
                labels.append(label)
    templates = spec.get("templates", ["a photo of a {}."])
    return images, np.asarray(labels), list(spec.get("classes", classes)), templates


def reference_predictions(suite_file: Path, weights: str, task: str) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(argmax per image, labels, model input) of a hand-written open_clip zero-shot loop, on the
    images the suite evaluates (the task's own `limit`, if any, as a seeded stratified subset)."""
    model, cfg = reference_clip(suite_file, None if weights == "pretrained" else weights)
    images, labels, classes, templates = reference_images(suite_file, task)
    limit = tomllib.loads(suite_file.read_text())["tasks"][task].get("limit")
    keep = stratified_subset(labels, limit)
    images, labels = [images[i] for i in keep], labels[keep]
    size = cfg["vision_cfg"]["image_size"]
    preprocess = image_transform(size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                 std=open_clip.OPENAI_DATASET_STD)
    x = torch.stack([preprocess(image) for image in images])
    weights_matrix = reference_classifier(model, cfg, classes, templates)
    with torch.no_grad():
        features = F.normalize(model.encode_image(x), dim=-1)
        logits = model.logit_scale.exp() * features @ weights_matrix
    return logits.argmax(dim=1).numpy(), labels, x


# --------------------------------------------------------------------------------------------
# 1. Zero-shot heads: open_clip's classifier, built once and cached on disk
# --------------------------------------------------------------------------------------------


@fast
def test_heads_are_open_clips_zero_shot_classifier_and_cached(oc_suite, cache, monkeypatch):
    suite = load_suite_file(oc_suite)
    model, cfg = reference_clip(oc_suite)
    heads = suite.heads()
    # alpha has two explicit templates; beta and gamma use the default one
    assert suite.task_spec("alpha").templates == ["a photo of a {}.", "a drawing of a {}."]
    assert suite.task_spec("beta").templates == suite.task_spec("gamma").templates == ["a photo of a {}."]
    for task in ("alpha", "beta", "gamma"):
        expected = reference_classifier(model, cfg, suite.classes(task), suite.task_spec(task).templates).T
        assert heads[task].shape == expected.shape == (suite.num_classes(task), cfg["embed_dim"])
        torch.testing.assert_close(heads[task], expected, rtol=0, atol=1e-6)
    assert len(list((cache / "heads").glob("*.safetensors"))) == 3

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the head should come from the on-disk cache")

    monkeypatch.setattr("engine.zero_shot.build_head", no_rebuild)
    again = load_suite_file(oc_suite).heads()  # a fresh suite object: nothing in memory
    for task in heads:
        assert torch.equal(again[task], heads[task])


# --------------------------------------------------------------------------------------------
# 2. `evaluate --suite` equals a hand-written open_clip loop, image for image
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [pytest.param("pretrained", marks=pytest.mark.slow), "beta"])
def test_evaluate_cli_matches_open_clip_image_for_image(oc_suite, cache, capsys, weights):
    """`python -m engine evaluate --suite S --model M --json` (pretrained: a fresh process; the expert:
    the same command in this process) against open_clip's own model, transform and classifier."""
    args = ("evaluate", "--suite", str(oc_suite), "--model", weights, "--device", "cpu", "--json")
    run = start_cli(cache, *args) if weights == "pretrained" else None
    suite = load_suite_file(oc_suite)
    expected_accuracy = {}
    for task in suite.task_names():
        predictions, labels, x = reference_predictions(oc_suite, weights, task)
        expected_accuracy[task] = 100.0 * float((predictions == labels).sum()) / len(labels)
        images, engine_labels = suite.test_set(task)
        assert engine_labels.tolist() == labels.tolist()  # same images, same order
        torch.testing.assert_close(images, x, rtol=0, atol=1e-6)  # open_clip's eval transform
        logits = predict_logits(suite, weights, task, images, device="cpu")
        assert logits.argmax(dim=1).tolist() == predictions.tolist()
    report = evaluate(suite, weights, device="cpu")
    assert report.per_task == expected_accuracy
    payload = json_ok(finish(run)) if run is not None else cli_here(capsys, *args)
    assert payload["per_task"] == {t: round(v, 4) for t, v in expected_accuracy.items()}
    assert payload["n_images"] == {"alpha": 18, "beta": 24, "gamma": 6}  # gamma: limit = 6 in the file


# --------------------------------------------------------------------------------------------
# 3. The open_clip and the Hugging Face layout of the same weights: the same numbers
# --------------------------------------------------------------------------------------------


def test_open_clip_and_hf_layouts_give_identical_accuracy(oc_suite, hf_suite, capsys):
    suites = {"open_clip": load_suite_file(oc_suite), "hf": load_suite_file(hf_suite)}
    for weights in ("pretrained", *EXPERTS):
        reports = {k: evaluate(s, weights, device="cpu") for k, s in suites.items()}
        assert reports["open_clip"].per_task == reports["hf"].per_task, weights
        assert reports["open_clip"].normalized == reports["hf"].normalized, weights

    ties = get_method("ties")
    stacks = {k: TaskVectorStack.from_suite(s) for k, s in suites.items()}
    merged = {k: stack.apply(ties.merge(stack, ties.Config())) for k, stack in stacks.items()}
    assert (evaluate(suites["open_clip"], merged["open_clip"], device="cpu").per_task
            == evaluate(suites["hf"], merged["hf"], device="cpu").per_task)
    # CLIPVisionModel experts have no projection: it stays at the pretrained value, and says so
    assert stacks["hf"].kept_from_base == ["visual_projection.weight"]
    assert stacks["open_clip"].kept_from_base == []
    for layout, path, kept in (("hf", hf_suite, ["visual_projection.weight"]), ("open_clip", oc_suite, [])):
        payload = cli_here(capsys, "merge", "--suite", str(path), "--method", "ties", "--device", "cpu", "--json")
        assert payload["kept_from_base"]["tensors"] == kept, layout
    assert torch.equal(merged["hf"]["visual_projection.weight"], merged["open_clip"]["visual_projection.weight"])


# --------------------------------------------------------------------------------------------
# 4. Continual merging (MINGLE and a baseline) on a suite
# --------------------------------------------------------------------------------------------


def _check_matrix(result, n: int) -> None:
    matrix = result.acc_matrix
    assert len(matrix) == n and all(len(row) == n for row in matrix)
    for i, row in enumerate(matrix):
        assert all(v is None for v in row[i + 1:])  # tasks not merged yet
        assert all(isinstance(v, float) and np.isfinite(v) and 0.0 <= v <= 100.0 for v in row[:i + 1])
    assert result.ACC == pytest.approx(np.mean(matrix[-1]))
    assert np.isfinite(result.BWT)


@pytest.mark.slow
def test_mingle_and_a_baseline_run_on_a_suite(oc_suite, capsys):
    suite = load_suite_file(oc_suite)
    order = task_order(suite.task_names(), 42)
    mingle = run_continual(suite, make_method("mingle", MingleConfig(steps=3, rank=8), suite.build_encoder), order)
    assert mingle.order == order
    _check_matrix(mingle, len(order))
    average = run_continual(suite, make_method("average"), order)
    _check_matrix(average, len(order))
    payload = cli_here(capsys, "continual", "--suite", str(oc_suite), "--method", "mingle", "--steps", "2",
                       "--device", "cpu", "--json")
    assert payload["gates"] and len(payload["acc_matrix"]) == len(suite.task_names())
    assert payload["config"]["steps"] == 2


# --------------------------------------------------------------------------------------------
# 5. RI on a suite: adapt, cache, normalise by the ORIGINAL experts, `ri --suite`
# --------------------------------------------------------------------------------------------

RI_QUICK = RIConfig(steps=3, aux="render", aux_size=16, batch_size=8)


def test_ri_adapts_a_suite_and_caches_the_experts(oc_suite, tmp_path, monkeypatch, capsys):
    from engine.adapted import ensure_adapted

    suite = load_suite_file(oc_suite)
    adapted, result = adapt_suite(suite, RI_QUICK)
    assert set(adapted) == set(suite.task_names()) and result.tasks == suite.task_names()
    for task, weights in adapted.items():
        assert set(weights) <= set(suite.theta0())
        assert any(not torch.equal(weights[k], v) for k, v in suite.theta(task).items() if k in weights)

    first = ensure_adapted(suite, RI_QUICK)
    files = {t: first.expert_path(t) for t in suite.task_names()}
    stamps = {t: p.stat().st_mtime_ns for t, p in files.items()}
    with monkeypatch.context() as patch:  # the second call must not adapt again
        patch.setattr("engine.adapted.adapt_suite", lambda *a, **k: pytest.fail("should be a cache hit"))
        start = time.perf_counter()
        second = ensure_adapted(suite, RI_QUICK)
        assert time.perf_counter() - start < 2.0
    assert {t: second.expert_path(t) for t in suite.task_names()} == files
    assert {t: p.stat().st_mtime_ns for t, p in files.items()} == stamps
    for task in suite.task_names():
        assert second.expert_path(task) != suite.expert_path(task)
        assert second.expert_accuracy(task) == suite.expert_accuracy(task)  # the original experts' accuracy
    report = evaluate(second, "alpha", device="cpu")
    assert report.normalized["alpha"] == pytest.approx(report.per_task["alpha"] / suite.expert_accuracy("alpha"))

    out = tmp_path / "ri-out"
    payload = cli_here(capsys, "ri", "--suite", str(oc_suite), "--out", str(out), "--steps", "2", "--aux", "render",
                       "--aux-size", "16", "--batch-size", "8", "--device", "cpu", "--json")
    written = out / "suite.toml"
    assert Path(payload["out"]) == written and written.is_file()
    reloaded = load_suite_file(written)
    assert reloaded.task_names() == suite.task_names() and reloaded.reference.path.resolve() == oc_suite.resolve()
    report = evaluate(reloaded, "pretrained", device="cpu")
    assert report.per_task == evaluate(suite, "pretrained", device="cpu").per_task  # same model and data
    xi = cli_here(capsys, "interference", "--suite", str(written), "--method", "task-arithmetic", "--device", "cpu",
                  "--json")
    assert xi["reference_experts"] == load_suite_file(oc_suite).label
    assert xi["suite"] == reloaded.label != xi["reference_experts"]


# --------------------------------------------------------------------------------------------
# 6. Sweeps on a suite
# --------------------------------------------------------------------------------------------


def test_sweep_methods_on_a_suite(oc_suite):
    suite = load_suite_file(oc_suite)
    stack = TaskVectorStack.from_suite(suite)
    methods = [get_method("task-arithmetic"), get_method("ties")]
    results = sweep_methods(stack, methods, "lam", [0.2, 0.5],
                            evaluate_fn=lambda sd: evaluate(suite, sd, limit=6, device="cpu"))
    assert [r.method for r in results] == ["task-arithmetic", "ties"]
    for r in results:
        assert r.varies and r.values == [0.2, 0.5] and r.tasks == suite.task_names()
        assert all(len(v) == 2 for v in r.per_task.values()) and len(r.average) == 2
        assert all(np.isfinite(v) for v in r.normalized_average)
    ta = methods[0]
    direct = evaluate(suite, stack.apply(ta.merge(stack, ta.Config(lam=0.5))), limit=6, device="cpu")
    assert [results[0].per_task[t][1] for t in suite.task_names()] == [direct.per_task[t] for t in suite.task_names()]


# --------------------------------------------------------------------------------------------
# 7. --limit: a seeded, class-stratified subset
# --------------------------------------------------------------------------------------------


@fast
def test_stratified_subset_keeps_class_shares_and_is_seeded():
    labels = np.array([0] * 6 + [1] * 3)
    picked = stratified_subset(labels, 3)
    assert np.array_equal(picked, stratified_subset(labels, 3))  # seeded: same images every time
    assert sorted(labels[picked].tolist()) == [0, 0, 1]
    assert np.all(np.diff(picked) > 0)  # in file order
    assert np.array_equal(stratified_subset(labels, None), np.arange(9))
    assert np.array_equal(stratified_subset(labels, 50), np.arange(9))


def test_limit_on_the_cli_is_stratified_and_seeded(oc_suite, capsys):
    suite = load_suite_file(oc_suite, limit=4)
    for task in suite.task_names():
        split = suite.test_split(task)
        assert len(split) == 4
        counts = np.bincount(split.labels.numpy(), minlength=suite.num_classes(task))
        assert counts.max() - counts.min() <= 1  # every class keeps its share (balanced test sets)
    alpha = load_suite_file(oc_suite).test_split("alpha", limit=4).labels.tolist()
    assert alpha == suite.test_split("alpha").labels.tolist() == [0, 0, 1, 2]  # largest remainder: class 0
    big = load_suite_file(oc_suite)  # a limit above a task's size takes the whole task; 0 = full test sets
    assert evaluate(big, "pretrained", limit=20, device="cpu").n_images == {"alpha": 18, "beta": 20, "gamma": 18}
    assert {t: len(load_suite_file(oc_suite, limit=0).test_split(t)) for t in big.task_names()} == {
        "alpha": 18, "beta": 24, "gamma": 18}
    payload = cli_here(capsys, "evaluate", "--suite", str(oc_suite), "--limit", "4", "--device", "cpu", "--json")
    assert payload["n_images"] == {"alpha": 4, "beta": 4, "gamma": 4} and payload["limit"] == 4
    in_process = evaluate(suite, "pretrained", device="cpu").per_task
    assert payload["per_task"] == {t: round(v, 4) for t, v in in_process.items()}


# --------------------------------------------------------------------------------------------
# 8. Bad suite files: exit 2, one line naming the file and the key, before any heavy work
# --------------------------------------------------------------------------------------------


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _reshape_one_tensor(root: Path) -> None:
    path = root / "ft" / "beta.safetensors"
    tensors = load_file(str(path))
    tensors["visual.conv1.weight"] = tensors["visual.conv1.weight"].reshape(64, -1).contiguous()
    save_file(tensors, str(path))


def _expert_of_another_config(root: Path) -> None:
    """beta replaced by a vision tower of a deeper tiny config (3 blocks instead of 2)."""
    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    cfg["vision_cfg"]["layers"] = 3
    tower = new_visual_tower(cfg)
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()},
              str(root / "ft" / "beta.safetensors"))


def _garbage_parquet_row(root: Path) -> None:
    shard = sorted((root / "data" / "beta").glob("*.parquet"))[1]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[2]["image"]["bytes"] = b"\x89PNG but not really"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)


def _garbage_image(root: Path) -> None:
    (root / "data" / "alpha" / "test" / "circle" / "circle_000.png").write_bytes(b"not a png at all" * 8)


# name -> (how to break a copy of the suite, the suite file to pass, what the message must name)
MODEL_LINES = '[model]\nopen_clip = "tiny_clip.json"\npretrained = "clip/open_clip_model.safetensors"\n'
BAD_SUITES = {
    "missing suite file": (lambda r: None, "nope.toml", ["nope.toml"]),
    "TOML syntax error": (lambda r: _edit(r / "suite.toml", "[tasks.alpha]", "[tasks.alpha"), "suite.toml",
                          ["TOML"]),
    "missing [model]": (lambda r: _edit(r / "suite.toml", MODEL_LINES, ""), "suite.toml", ["[model]"]),
    "unknown architecture": (lambda r: _edit(r / "suite.toml", '"tiny_clip.json"', '"ViT-B-99"'), "suite.toml",
                             ["open_clip", "ViT-B-99"]),
    "pretrained file missing": (lambda r: (r / "clip" / "open_clip_model.safetensors").unlink(), "suite.toml",
                                ["pretrained"]),
    "data folder missing": (lambda r: shutil.rmtree(r / "data" / "gamma"), "suite.toml", ["[tasks.gamma]", "data"]),
    "class count != folders": (lambda r: _edit(r / "suite.toml", 'data = "data/alpha/test"',
                                               'data = "data/alpha/test"\nclasses = ["round", "boxy"]'),
                               "suite.toml", ["[tasks.alpha]", "classes"]),
    "parquet labels beyond classes": (lambda r: _edit(r / "suite.toml", ', "yellow"]', "]"), "suite.toml",
                                      ["[tasks.beta]", "classes"]),
    "expert with a reshaped tensor": (_reshape_one_tensor, "suite.toml",
                                      ["[experts] beta", "shape", "does not match the architecture"]),
    "expert of another config": (_expert_of_another_config, "suite.toml",
                                 ["[experts] beta", "does not match the architecture"]),
    "unreadable image": (_garbage_image, "suite.toml", ["circle_000.png", "unreadable image"]),
    "unreadable parquet row": (_garbage_parquet_row, "suite.toml",
                               ["[tasks.beta]", "test-00001-of-00002.parquet (row 2)", "unreadable image"]),
    "unknown task key": (lambda r: _edit(r / "suite.toml", "limit = 6", "limt = 6"), "suite.toml",
                         ["[tasks.gamma]", "limt"]),
    "builtin classes unknown task": (lambda r: _edit(r / "suite.toml", 'data = "data/alpha/test"',
                                                     'data = "data/alpha/test"\nclasses = "builtin"'),
                                     "suite.toml", ["[tasks.alpha]", "classes", "built-in"]),
}
# found when the images are decoded; every other problem when the file is loaded
DECODE_TIME = {"unreadable image", "unreadable parquet row"}


def _bad_suite(oc_suite: Path, tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    root = tmp_path / "bad"
    shutil.copytree(oc_suite.parent, root)
    breaker, name, must_name = BAD_SUITES[case]
    breaker(root)
    return root / name, must_name


def _check_one_line(rc: int, stdout: str, stderr: str, suite_file: Path, must_name: list[str]) -> None:
    assert rc == 2, stderr
    assert stdout == ""
    message = stderr.strip()
    assert message and "\n" not in message, stderr
    assert "Warning" not in stderr and "Traceback" not in stderr
    assert str(suite_file) in message, message
    for part in must_name:
        assert part in message, (part, message)


@fast
@pytest.mark.parametrize("case", list(BAD_SUITES))
def test_bad_suite_is_one_line_before_heavy_work(oc_suite, tmp_path, case, capfd, monkeypatch):
    """In-process `main(["evaluate", "--suite", BAD, "--json"])`: the CLI contract, and the CLIP model is
    never even loaded for a problem the file itself shows."""
    suite_file, must_name = _bad_suite(oc_suite, tmp_path, case)
    if case not in DECODE_TIME:
        monkeypatch.setattr("engine.clip_model.load_clip", lambda **k: pytest.fail("heavy work before the check"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli_main(["evaluate", "--suite", str(suite_file), "--device", "cpu", "--json"])
    out, err = capfd.readouterr()
    _check_one_line(rc, out, err, suite_file, must_name)
    assert not caught, [str(w.message) for w in caught]
    if case == "unreadable image":
        assert str(suite_file.parent / "data" / "alpha" / "test" / "circle" / "circle_000.png") in err


@pytest.mark.slow
def test_bad_suite_exits_2_in_a_fresh_process(oc_suite, tmp_path, cache):
    """The same contract from `python -m engine` itself: no import-time warnings, no traceback."""
    suite_file, must_name = _bad_suite(oc_suite, tmp_path, "unreadable image")  # the latest check: decode time
    run = finish(start_cli(cache, "evaluate", "--suite", str(suite_file), "--json"))
    _check_one_line(run.returncode, run.stdout, run.stderr, suite_file, must_name)
    assert str(suite_file.parent / "data" / "alpha" / "test" / "circle" / "circle_000.png") in run.stderr


# --------------------------------------------------------------------------------------------
# 9. The demo zoo goes through the same abstraction
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_zoo_is_a_task_suite(quick_zoo):
    from engine.zoo.suite import ZooSuite

    suite = ZooSuite.of(quick_zoo)
    assert as_suite(suite) is suite and not isinstance(suite, ClipSuite)
    assert ZooSuite.of(quick_zoo) is suite  # one shared suite (and its caches) per zoo build
    report = evaluate(suite, "pretrained", device="cpu")
    assert {t: round(v, 4) for t, v in report.per_task.items()} == quick_zoo.table["pretrained"]["per_task"]
