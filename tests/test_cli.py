"""`python -m engine merge|conflicts`: results against the reference, JSON contract, bad input -> exit 2."""
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


def test_help_on_every_command():
    for command in ([], ["merge"], ["conflicts"]):
        result = engine_cli(*command, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout


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
    (["merge", "--method", "average", "--lam", "0.5"], "no hyperparameter 'lam'"),
    (["merge", "--method", "ties"], "--zoo"),
    (["merge", "--method", "ties", "--zoo", "/nonexistent/zoo"], "/nonexistent/zoo"),
    (["merge", "--method", "ties", "--out", "merged.pt"], ".safetensors"),
    (["conflicts", "--k", "0"], "trim k"),
])
def test_bad_arguments(files, args, fragment):
    base_path, expert_paths = files
    if "--zoo" not in args and args[-1] != "ties":
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
