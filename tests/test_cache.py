"""The cache folder: a size cap with least-recently-used eviction that never removes an entry in
use, and writes that an interrupted process cannot leave half done (engine.cache, engine.adapted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGE_EXPLORER_CACHE_MB", str(1.0))
    return tmp_path / "cache"


@pytest.mark.fast
def test_least_recently_used_entries_go_first_and_pinned_ones_stay(small_cache, monkeypatch):
    monkeypatch.setenv("MERGE_EXPLORER_CACHE_MB", "100")  # room for all five while writing
    paths = []
    for i in range(5):
        path = cache.cache_path("blobs", i, ".bin")
        cache.write_atomically(path, lambda tmp: tmp.write_bytes(b"x" * 300_000))
        os.utime(path, (1000 + i, 1000 + i))  # written long ago, in order
        paths.append(path)
    monkeypatch.setenv("MERGE_EXPLORER_CACHE_MB", "1.0")  # then the cap shrinks to about three entries
    cache.pin(paths[0])  # the oldest is in use
    cache.touch(paths[1])  # and the second was just read
    cache.enforce_cap()
    kept = [p.exists() for p in paths]
    assert cache.size_bytes() <= cache.cap_bytes()
    assert kept[0] and kept[1] and not kept[2]  # the oldest unpinned, unused entries went first
    cache.unpin(paths[0])


@pytest.mark.fast
def test_stale_temporaries_are_cleaned_and_never_counted(small_cache):
    kind = small_cache / "blobs"
    kind.mkdir(parents=True)
    leftover = kind / ".half-written-abc"
    leftover.mkdir()
    (leftover / "part").write_bytes(b"x" * 10)
    assert cache.entries() == []
    os.utime(leftover, (0, 0))
    assert cache.clean_stale_temporaries() == 1 and not leftover.exists()


def test_the_cap_holds_after_ten_ri_settings_in_a_row(quick_suite, tmp_path, monkeypatch):
    from engine.adapted import adapted_dir, cached_adapted, ensure_adapted
    from engine.methods.ri import RIConfig

    monkeypatch.setenv("MERGE_EXPLORER_CACHE", str(tmp_path / "cache"))
    one = sum(Path(quick_suite.expert_path(t)).stat().st_size for t in quick_suite.task_names())
    monkeypatch.setenv("MERGE_EXPLORER_CACHE_MB", str(2.5 * one / 2**20))  # room for two settings
    held = None
    for i in range(10):
        config = RIConfig(steps=1, alpha=0.1 * (i + 1), aux="noise", aux_size=8, batch_size=8)
        adapted = ensure_adapted(quick_suite, config)
        if i == 0:
            held = adapted  # still in use by someone: must survive
        assert cache.size_bytes() <= cache.cap_bytes() + one  # at most the protected entry over the cap
        assert adapted_dir(quick_suite, config).is_dir()
    assert cache.size_bytes() <= cache.cap_bytes() + one
    first = RIConfig(steps=1, alpha=0.1, aux="noise", aux_size=8, batch_size=8)
    assert adapted_dir(quick_suite, first).is_dir() and held is not None  # pinned while `held` lives
    assert cached_adapted(quick_suite, RIConfig(steps=1, alpha=0.2, aux="noise", aux_size=8, batch_size=8)) is None


CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import engine.adapted as adapted
from engine.methods.ri import RIConfig
from engine.zoo.suite import ZooSuite

real = adapted.save_safetensors
def slow_save(*args, **kwargs):
    real(*args, **kwargs)
    print("WROTE", flush=True)
    time.sleep(60)  # killed here, with one expert of several on disk
adapted.save_safetensors = slow_save
adapted.ensure_adapted(ZooSuite.load({zoo!r}), RIConfig(steps=1, aux="noise", aux_size=8, batch_size=8))
"""


def test_killing_a_process_mid_write_leaves_the_cache_valid(quick_zoo, quick_suite, tmp_path):
    from engine.adapted import adapted_dir, cached_adapted, ensure_adapted
    from engine.methods.ri import RIConfig

    env = {**os.environ, "MERGE_EXPLORER_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), zoo=str(quick_zoo.root))],
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "WROTE"
    finally:
        child.kill()  # SIGKILL: no cleanup runs
        child.wait(30)
    os.environ["MERGE_EXPLORER_CACHE"], saved = str(tmp_path / "cache"), os.environ.get("MERGE_EXPLORER_CACHE")
    try:
        config = RIConfig(steps=1, aux="noise", aux_size=8, batch_size=8)
        assert cached_adapted(quick_suite, config) is None  # the half-written set is not an entry
        assert not adapted_dir(quick_suite, config).exists()
        assert cache.entries() == [] or all(not e.name.startswith(".") for e in cache.entries())
        leftovers = [p for p in (tmp_path / "cache" / "ri").iterdir() if p.name.startswith(".")]
        assert leftovers  # the dead run's temporary, invisible to readers
        adapted = ensure_adapted(quick_suite, config)  # the next run completes normally
        assert cached_adapted(quick_suite, config) is not None and adapted.task_names() == quick_suite.task_names()
        record = json.loads((adapted_dir(quick_suite, config) / "ri.json").read_text())
        assert record["config"]["steps"] == 1
    finally:
        if saved is None:
            os.environ.pop("MERGE_EXPLORER_CACHE")
        else:
            os.environ["MERGE_EXPLORER_CACHE"] = saved
