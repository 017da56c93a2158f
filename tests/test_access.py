"""Safe sources: a server reads checkpoint folders and suite files only under the allowed roots,
after resolving `..` and symlinks (engine.access)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.access import allowed_roots, check_allowed
from engine.errors import ConfigError
from engine.sources import discover_folder
from engine.suite_file import load_suite_file
from helpers import write_tiny_zoo_files

pytestmark = pytest.mark.fast


@pytest.fixture
def root(tmp_path) -> Path:
    allowed = tmp_path / "models"
    write_tiny_zoo_files(allowed / "tiny")
    return allowed


def test_the_setting_names_the_roots_and_defaults_to_the_zoo_and_models(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGE_EXPLORER_DATA", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert allowed_roots() == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    monkeypatch.delenv("MERGE_EXPLORER_DATA")
    monkeypatch.setenv("MERGE_EXPLORER_ZOO", str(tmp_path / "zoo"))
    monkeypatch.chdir(tmp_path)
    assert allowed_roots() == [(tmp_path / "zoo").resolve(), (tmp_path / "models").resolve()]


def test_a_folder_inside_a_root_is_read(root):
    source = discover_folder(root / "tiny", roots=[root])
    assert source.tasks == ["task1", "task2", "task3"]


@pytest.mark.parametrize("outside", ["/etc", "{root}/../../../../etc", "{root}/tiny/../../.."])
def test_paths_outside_the_roots_are_refused_in_one_line(root, outside):
    path = outside.format(root=root)
    with pytest.raises(ConfigError, match="MERGE_EXPLORER_DATA") as refused:
        discover_folder(path, roots=[root])
    assert "\n" not in str(refused.value) and path in str(refused.value)


def test_symlinks_out_of_the_root_are_refused(root, tmp_path):
    outside = tmp_path / "elsewhere"
    write_tiny_zoo_files(outside)
    (root / "door").symlink_to(outside)  # a folder symlink
    with pytest.raises(ConfigError, match="MERGE_EXPLORER_DATA"):
        discover_folder(root / "door", roots=[root])
    inside = root / "mixed"
    shutil.copytree(root / "tiny", inside)
    (inside / "task3.safetensors").unlink()
    (inside / "task3.safetensors").symlink_to(outside / "task3.safetensors")  # one checkpoint symlinked out
    with pytest.raises(ConfigError, match="task3.safetensors.*MERGE_EXPLORER_DATA"):
        discover_folder(inside, roots=[root])
    assert check_allowed(root / "tiny", [root]) == (root / "tiny").resolve()


def test_a_suite_may_only_name_files_under_the_roots(tmp_path):
    from clip_fixtures import build_clip_suite

    suite = build_clip_suite(tmp_path / "models" / "suite", layout="open_clip")
    roots = [(tmp_path / "models").resolve()]
    assert load_suite_file(suite, roots=roots, check_experts=False).task_names() == ["alpha", "beta", "gamma"]
    with pytest.raises(ConfigError, match="suite file is outside"):
        load_suite_file(suite, roots=[(tmp_path / "other").resolve()])
    text = suite.read_text()
    outside = tmp_path / "secret"
    shutil.copytree(suite.parent / "data" / "alpha", outside)
    suite.write_text(text.replace('data = "data/alpha/test"', f'data = "{outside / "test"}"'))
    with pytest.raises(ConfigError, match=r"\[tasks.alpha\] data.*MERGE_EXPLORER_DATA"):
        load_suite_file(suite, roots=roots, check_experts=False)
    suite.write_text(text)
    image = next((suite.parent / "data" / "alpha" / "test").rglob("*.png"))
    image.unlink()
    image.symlink_to("/etc/hostname")  # an image symlinked out of the data folder
    with pytest.raises(ConfigError, match="MERGE_EXPLORER_DATA"):
        load_suite_file(suite, roots=roots, check_experts=False)
