"""`python -m engine merge|conflicts`: results against the reference, JSON contract, bad input -> exit 2.

Tiny open_clip checkpoints written here (tests/helpers.py); one test merges and evaluates the session's
quick zoo in-process (`--zoo --evaluate --limit`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import reference as ref
from engine.checkpoints import open_checkpoint, read_metadata
from helpers import write_tiny_zoo_files

ROOT = Path(__file__).resolve().parents[1]


def engine_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_zoo_files(tmp_path_factory.mktemp("ckpts"), n_experts=3)


def canonical_rows(base_path, expert_paths):
    """Task vectors as dense rows over canonical tensors (sorted names), read independently of the stack."""
    base = open_checkpoint(base_path)
    names = [n for n in base.keys() if base.tensor(n).is_floating_point()]
    theta0 = torch.cat([base.tensor(n).double().flatten() for n in names])
    rows = []
    for path in expert_paths:
        reader = open_checkpoint(path)
        rows.append(torch.cat([reader.tensor(n).double().flatten() for n in names]) - theta0)
    spans, start = [], 0
    for n in names:
        size = base.tensor(n).numel()
        spans.append((start, start + size))
        start += size
    return names, theta0, torch.stack(rows), spans


@pytest.mark.parametrize("trim", ["global", "per-tensor"])
@pytest.mark.parametrize("disjoint", ["mean", "sum"])
def test_cli_ties_matches_reference(files, tmp_path, trim, disjoint):
    base_path, expert_paths = files
    out = tmp_path / "merged.safetensors"
    result = engine_cli("merge", "--method", "ties", "--base", str(base_path), "--experts", *map(str, expert_paths),
                        "--k", "30", "--lam", "0.8", "--trim", trim, "--disjoint", disjoint, "--out", str(out),
                        "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["method"] == "ties"
    assert payload["hyperparameters"] == {"k": 30.0, "lam": 0.8, "trim": trim, "disjoint": disjoint,
                                          "tie_rule": "global_majority"}
    assert set(payload["timings"]) >= {"load_s", "merge_s", "save_s"}
    assert payload["out"] == str(out)
    assert payload["kept_from_base"]["tensors"] == [] and payload["kept_from_base"]["why"]

    names, theta0, rows, spans = canonical_rows(base_path, expert_paths)
    expected = theta0 + ref.ties(rows, 30, 0.8, disjoint, spans if trim == "per-tensor" else None)
    merged = load_file(str(out))
    got = torch.cat([merged[n].double().flatten() for n in names])
    assert float((got - expected).abs().max()) <= 1e-6
    meta = read_metadata(out)
    assert meta["method"] == "ties" and meta["hyperparameters"]["k"] == 30.0
    assert [e["sha256"] for e in meta["experts"]] == [open_checkpoint(p).sha256() for p in expert_paths]


@pytest.mark.parametrize("method, lam, expected_lam", [("task-arithmetic", "0.4", 0.4), ("average", None, None)])
def test_cli_linear_methods_match_reference(files, tmp_path, method, lam, expected_lam):
    base_path, expert_paths = files
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--method", method, "--base", str(base_path), "--experts", *map(str, expert_paths),
            "--out", str(out), "--json"]
    if lam:
        args += ["--lam", lam]
    result = engine_cli(*args)
    assert result.returncode == 0, result.stderr
    names, theta0, rows, _ = canonical_rows(base_path, expert_paths)
    expected = theta0 + (rows.sum(0) * expected_lam if expected_lam else rows.mean(0))
    merged = load_file(str(out))
    assert float((torch.cat([merged[n].double().flatten() for n in names]) - expected).abs().max()) <= 1e-6


def test_cli_conflicts_json(files):
    base_path, expert_paths = files
    result = engine_cli("conflicts", "--base", str(base_path), "--experts", *map(str, expert_paths), "--k", "20",
                        "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload["overall"]) >= {"rate_all", "rate_nonzero2", "random_baseline"}
    assert payload["tasks"] == ["task1", "task2", "task3"]
    assert len(payload["pairwise"]) == 3 and all(len(row) == 3 for row in payload["pairwise"])
    assert set(payload["per_tensor"]["encoder.layers.0.self_attn.q_proj.weight"]) >= {"rate_all", "rate_nonzero2",
                                                                                      "random_baseline"}
    names, _, rows, _ = canonical_rows(base_path, expert_paths)
    expected = ref.conflict_stats(ref.trim_rows(rows, 20))
    assert payload["overall"]["rate_all"] == pytest.approx(expected["rate_all"], abs=1e-12)
    assert payload["overall"]["rate_nonzero2"] == pytest.approx(expected["rate_nonzero2"], abs=1e-12)
    assert payload["overall"]["random_baseline"] == pytest.approx(ref.random_sign_baseline(3, 20))
    assert len(payload["k_curve"]["random_baseline_nonzero2"]) == len(payload["k_curve"]["k"])
    k_index = payload["k_curve"]["k"].index(20.0)
    assert payload["k_curve"]["rate_all"][k_index] == pytest.approx(payload["overall"]["rate_all"])


def _without_projection(path: Path, out: Path) -> Path:
    """An expert saved the way HF CLIPVisionModel (FusionBench) experts are: no visual projection."""
    tensors = load_file(str(path))
    del tensors["visual.proj"]
    save_file(tensors, str(out))
    return out


def test_cli_keeps_tensors_no_expert_has_at_the_pretrained_values(files, tmp_path):
    base_path, expert_paths = files
    experts = [_without_projection(p, tmp_path / p.name) for p in expert_paths]
    out = tmp_path / "merged.safetensors"
    result = engine_cli("merge", "--method", "task-arithmetic", "--lam", "0.4", "--base", str(base_path),
                        "--experts", *map(str, experts), "--out", str(out), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["kept_from_base"]["tensors"] == ["visual_projection.weight"]
    assert "pretrained" in payload["kept_from_base"]["why"]
    reader = open_checkpoint(out)
    assert torch.equal(reader.tensor("visual_projection.weight"),
                       open_checkpoint(base_path).tensor("visual_projection.weight"))  # θ_0's, bit for bit
    # every other tensor is merged as before, and the count of merged parameters leaves the projection out
    names, theta0, rows, _ = canonical_rows(base_path, expert_paths)
    keep = [i for i, n in enumerate(names) if n != "visual_projection.weight"]
    base = open_checkpoint(base_path)
    sizes = [base.tensor(n).numel() for n in names]
    assert payload["n_params_merged"] == sum(sizes) - sizes[names.index("visual_projection.weight")]
    start = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        if i in keep:
            expected = theta0[start:start + size] + 0.4 * rows[:, start:start + size].sum(0)
            assert float((reader.tensor(name).double().flatten() - expected).abs().max()) <= 1e-6, name
        start += size
    text = engine_cli("merge", "--method", "average", "--base", str(base_path), "--experts", *map(str, experts))
    assert text.returncode == 0 and "kept at the pretrained values" in text.stdout
    assert "visual_projection.weight" in text.stdout


def test_cli_refuses_a_tensor_that_only_some_experts_lack(files, tmp_path):
    base_path, expert_paths = files
    odd = _without_projection(expert_paths[1], tmp_path / "svhn.safetensors")
    result = engine_cli("merge", "--method", "ties", "--base", str(base_path), "--experts", str(expert_paths[0]),
                        str(odd))
    assert_clean_failure(result, "svhn.safetensors", "is missing tensor 'visual_projection.weight'")


def test_merge_evaluates_a_zoo_under_a_limit(quick_zoo, capsys):
    from engine.cli import main
    from engine.evaluate import evaluate
    from engine.methods.registry import get_merge_method
    from engine.task_vectors import TaskVectorStack
    from engine.zoo.suite import ZooSuite

    tasks = quick_zoo.task_names()[:2]
    code = main(["merge", "--zoo", str(quick_zoo.root), "--method", "ties", "--tasks", *tasks, "--evaluate",
                 "--limit", "20", "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    assert payload["tasks"] == tasks and payload["kept_from_base"]["tensors"] == []
    accuracy = payload["accuracy"]
    assert accuracy["n_images"] == {t: 20 for t in tasks} and accuracy["limit"] == 20
    suite = ZooSuite.of(quick_zoo)
    stack = TaskVectorStack.from_suite(suite, tasks)
    ties = get_merge_method("ties")
    expected = evaluate(suite, stack.apply(ties.merge(stack, ties.Config())), tasks=tasks, limit=20, device="cpu")
    assert accuracy["per_task"] == {t: round(v, 4) for t, v in expected.per_task.items()}
    assert accuracy["normalized"] == {t: round(v, 6) for t, v in expected.normalized.items()}


def test_help_on_every_command():
    for command in ([], ["merge"], ["conflicts"]):
        result = engine_cli(*command, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout


def test_every_command_that_takes_a_zoo_takes_a_suite_and_a_limit(capsys):
    from engine.cli import main

    for command in ("evaluate", "merge", "conflicts", "interference", "ri", "continual"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0
        assert "--zoo" in out and "--suite FILE" in out and "--limit N" in out, command
    with pytest.raises(SystemExit):
        main(["interference", "--help"])
    assert "--max-samples" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["ri", "--help"])
    assert "--xi-max-samples" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr naming the problem, never a traceback
# ---------------------------------------------------------------------------------------------
def assert_clean_failure(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_truncated_checkpoint(files, tmp_path):
    base_path, expert_paths = files
    broken = tmp_path / "broken.safetensors"
    data = expert_paths[0].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    result = engine_cli("merge", "--method", "ties", "--base", str(base_path), "--experts", str(broken),
                        str(expert_paths[1]))
    assert_clean_failure(result, "broken.safetensors")


def test_a_pickled_module_is_refused_in_one_line_without_library_warnings(files, tmp_path):
    base_path, expert_paths = files
    pickled = tmp_path / "finetuned.pt"
    torch.save(torch.nn.Linear(4, 4), pickled)  # a whole module, as task_vectors saves its experts
    result = engine_cli("merge", "--method", "average", "--base", str(base_path), "--experts", str(pickled))
    assert_clean_failure(result, "finetuned.pt", "pickled", "unsafe")
    assert "Warning" not in result.stderr and not result.stdout


def test_mismatched_checkpoint(files, tmp_path):
    base_path, expert_paths = files
    tensors = load_file(str(expert_paths[0]))
    tensors["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(7, 16)
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd))
    result = engine_cli("merge", "--method", "task-arithmetic", "--base", str(base_path), "--experts", str(odd))
    assert_clean_failure(result, "odd.safetensors", "encoder.layers.1.mlp.fc1.weight", "shape")


def test_non_finite_checkpoint(files, tmp_path):
    base_path, expert_paths = files
    tensors = load_file(str(expert_paths[1]))
    tensors["visual.ln_post.weight"][3] = float("nan")
    nan_file = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_file))
    result = engine_cli("conflicts", "--base", str(base_path), "--experts", str(expert_paths[0]), str(nan_file))
    assert_clean_failure(result, "nan.safetensors", "post_layernorm.weight", "NaN")


@pytest.mark.parametrize("args, fragment", [
    (["merge", "--method", "ties", "--k", "150"], "trim k"),
    (["merge", "--method", "ties", "--k", "abc"], "--k"),
    (["merge", "--method", "average", "--lam", "0.5"], "average has no setting 'lam'"),
    (["merge", "--method", "ties"], "--zoo DIR, --suite FILE, or --base FILE"),
    (["merge", "--method", "ties", "--zoo", "/nonexistent/zoo"], "/nonexistent/zoo"),
    (["merge", "--method", "ties", "--suite", "/nonexistent/suite.toml"], "/nonexistent/suite.toml: no such suite"),
    (["merge", "--method", "ties", "--zoo", "/z", "--suite", "/s.toml"], "not --zoo and --suite"),
    (["merge", "--method", "ties", "--evaluate"], "--evaluate needs --zoo DIR or --suite FILE"),
    (["interference", "--method", "ties"], "interference needs --zoo DIR or --suite FILE"),
    (["merge", "--method", "ties", "--out", "merged.pt"], ".safetensors"),
    (["conflicts", "--k", "0"], "trim k"),
])
def test_bad_arguments(files, args, fragment):
    base_path, expert_paths = files
    if not {"--zoo", "--suite"} & set(args) and (args[-1] != "ties" or args[0] == "interference"):
        args = args + ["--base", str(base_path), "--experts", str(expert_paths[0])]
    assert_clean_failure(engine_cli(*args), fragment)


def test_unknown_format(files, tmp_path):
    base_path, _ = files
    weird = tmp_path / "weights.npz"
    weird.write_bytes(b"not a checkpoint")
    assert_clean_failure(engine_cli("merge", "--method", "ties", "--base", str(base_path), "--experts", str(weird)),
                         "weights.npz")


def test_failed_merge_leaves_earlier_output_intact(files, tmp_path):
    base_path, expert_paths = files
    out = tmp_path / "merged.safetensors"
    ok = engine_cli("merge", "--method", "ties", "--base", str(base_path), "--experts", *map(str, expert_paths),
                    "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    before = out.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(expert_paths[0].read_bytes()[:100])
    failed = engine_cli("merge", "--method", "ties", "--base", str(base_path), "--experts", str(broken),
                        "--out", str(out))
    assert failed.returncode == 2
    assert out.read_bytes() == before
