"""The run store (engine.runs) and its reports (engine.report): round trips of every run kind,
concurrent writers in two processes, a writer killed mid-write, a migration from the first schema,
and the CLI (`runs list/show/export/name/pin/delete`, `--no-record`)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.errors import MergeExplorerError
from engine.report import export_html, run_title, settings_diff
from engine.runs import KINDS, MIGRATIONS, SCHEMA_VERSION, RunStore, file_fingerprint

pytestmark = pytest.mark.fast
REPO = Path(__file__).resolve().parents[1]

TASKS = ["digits", "letters"]
RESULTS = {
    "merge": {"per_task": {"digits": 50.0, "letters": 70.0}, "average": 60.0, "normalized_average": 0.7},
    "sweep": {"results": [{"method": "ties", "label": "TIES-Merging", "param": "lam", "values": [0.5, 1.0], "tasks": TASKS,
                           "average": [40.0, 60.0], "normalized_average": [0.5, 0.7], "varies": True,
                           "per_task": {"digits": [30.0, 50.0], "letters": [50.0, 70.0]}}]},
    "conflicts": {"tasks": TASKS, "k": 20.0, "k_curve": {"k": [10.0, 20.0], "rate_all": [0.1, 0.2]},
                  "pairwise": [[None, 0.3], [0.3, None]]},
    "continual": {"method": "mingle", "order": TASKS, "acc_matrix": [[80.0, None], [70.0, 90.0]], "ACC": 80.0,
                  "BWT": -10.0},
    "ri": {"with_ri": {"per_task": {"digits": 55.0, "letters": 72.0}, "average": 63.5},
           "without_ri": {"per_task": {"digits": 50.0, "letters": 70.0}, "average": 60.0}},
}


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "runs.sqlite")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips(store, kind):
    source = {"kind": "zoo", "path": "/zoo", "fingerprint": "abc", "limit": None}
    run_id = store.record(kind, RESULTS[kind], method="ties", config={"k": 20.0, "lam": 1.0}, source=source,
                          device="cpu", timings={"total_s": 1.5}, key="key-1", origin="app", view="/merge?k=20")
    run = store.get(run_id)
    assert (run.kind, run.method, run.config, run.source, run.result) == (kind, "ties", {"k": 20.0, "lam": 1.0},
                                                                        source, RESULTS[kind])
    assert (run.device, run.timings, run.key, run.origin, run.view) == ("cpu", {"total_s": 1.5}, "key-1", "app",
                                                                       "/merge?k=20")
    assert store.latest(kind, "key-1").id == run_id and store.latest(kind, "other") is None
    assert json.loads(json.dumps(run.to_json()))["result"] == RESULTS[kind]


def test_pinned_runs_come_first_then_newest(store):
    ids = [store.record("merge", RESULTS["merge"], method="ties") for _ in range(3)]
    store.pin(ids[0])
    store.rename(ids[0], "  lesson 1: TIES  ")
    assert [r.id for r in store.runs()] == [ids[0], ids[2], ids[1]]
    first = store.runs()[0]
    assert first.pinned and first.name == "lesson 1: TIES" and run_title(first) == f"#{ids[0]} lesson 1: TIES"
    store.pin(ids[0], False)
    store.delete(ids[1])
    assert [r.id for r in store.runs()] == [ids[2], ids[0]]
    with pytest.raises(MergeExplorerError, match=f"no run #{ids[1]}"):
        store.get(ids[1])
    with pytest.raises(ValueError, match="unknown run kind"):
        store.record("weights", {})


def test_run_title_names_the_method_and_its_settings(store):
    run = store.get(store.record("merge", RESULTS["merge"], method="ties", config={"k": 20.0, "lam": 1.0,
                                                                                  "disjoint": "mean"}))
    assert run_title(run) == f"#{run.id} TIES-Merging, k = 20, λ = 1"


def test_settings_diff_names_exactly_the_differing_settings(store):
    source = {"kind": "zoo", "path": "/zoo", "fingerprint": "abc", "limit": None}
    a = store.get(store.record("merge", RESULTS["merge"], method="ties",
                               config={"k": 10.0, "lam": 1.0, "disjoint": "mean"}, source=source))
    b = store.get(store.record("merge", RESULTS["merge"], method="ties",
                               config={"k": 30.0, "lam": 1.0, "disjoint": "sum"}, source=source))
    names, rows, differing = settings_diff([a, b])
    assert differing == {"k", "disjoint"}
    assert {"kind", "method", "k", "lam", "disjoint", "source", "source fingerprint"} <= set(names)
    assert next(r for r in rows if r["setting"] == "k") == {"setting": "k", f"#{a.id}": "10", f"#{b.id}": "30"}


def test_export_embeds_plotly_and_every_figure(store):
    ids = [store.record(kind, RESULTS[kind], method="ties" if kind != "ri" else "task-arithmetic",
                        config={"k": 20.0, "lam": 1.0}, view="/merge?method=ties") for kind in KINDS]
    page = export_html([store.get(i) for i in ids], app_url="http://127.0.0.1:9999/")
    assert "<script src=" not in page and "cdn.plot.ly" not in page.split("</script>", 1)[1]
    assert page.count('class="plotly-graph-div"') == 1 + 1 + 1 + 2 + 2 + 1  # comparison + each kind's figures
    assert 'href="http://127.0.0.1:9999/merge?method=ties"' in page
    assert "class=differs" in page  # kinds differ


def test_a_migration_from_the_first_schema_keeps_old_runs(tmp_path):
    path = tmp_path / "runs.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO runs (created, kind, method, config, source, engine_version, device, timings, result) "
               "VALUES (1.0, 'merge', 'ties', '{\"k\": 20}', '{}', '0.1', 'cpu', '{}', '{\"average\": 42.0}')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = RunStore(path)
    old = store.get(1)
    assert (old.config, old.result, old.pinned, old.name, old.origin) == ({"k": 20}, {"average": 42.0}, False,
                                                                          None, "cli")
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.pin(1)
    assert store.runs()[0].pinned


def test_a_newer_schema_or_a_foreign_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "runs.sqlite"
    sqlite3.connect(path).execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(MergeExplorerError, match="newer than this engine"):
        RunStore(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all, just text" * 100)
    with pytest.raises(MergeExplorerError, match="not a usable run store"):
        RunStore(junk)


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from engine.runs import RunStore
    store = RunStore(sys.argv[1])
    for i in range(int(sys.argv[2])):
        store.record("merge", {{"average": float(i), "writer": sys.argv[3]}}, method="ties", config={{"i": i}})
        if len(sys.argv) > 4:
            print(i, flush=True)
""")


def test_two_processes_writing_200_runs_each_lose_none(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(path)
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    writers = [subprocess.Popen([sys.executable, str(script), str(path), "200", name]) for name in "ab"]
    assert [w.wait(timeout=240) for w in writers] == [0, 0]
    runs = RunStore(path).runs()
    assert len(runs) == 400
    for name in "ab":
        assert sorted(r.config["i"] for r in runs if r.result["writer"] == name) == list(range(200))


def test_a_writer_killed_mid_write_leaves_a_sound_store(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(path).record("merge", {"average": -1.0, "writer": "before"}, method="ties")
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    child = subprocess.Popen([sys.executable, str(script), str(path), "100000", "killed", "print"],
                             stdout=subprocess.PIPE, text=True)
    for _ in range(50):  # let it commit some runs, then kill it while it is writing more
        child.stdout.readline()
    time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = RunStore(path)
    runs = store.runs()
    assert any(r.result["writer"] == "before" for r in runs)
    killed = sorted(r.config["i"] for r in runs if r.result["writer"] == "killed")
    assert len(killed) >= 50 and killed == list(range(len(killed)))  # every committed run whole, no gap
    for r in runs:
        store.get(r.id)


def test_file_fingerprint_follows_content(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x" * 100)
    first = file_fingerprint([f])
    assert file_fingerprint([f]) == first
    f.write_bytes(b"y" * 100)
    os.utime(f, ns=(1, 1))
    assert file_fingerprint([f]) != first


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MERGE_EXPLORER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_cli_records_merges_and_manages_runs(quick_zoo, tmp_path):
    home, zoo = tmp_path / "home", str(quick_zoo.root)
    out = _cli("merge", "--zoo", zoo, "--method", "ties", "--k", "10", "--evaluate", "--limit", "20", home=home)
    assert out.returncode == 0, out.stderr
    assert _cli("merge", "--zoo", zoo, "--method", "ties", "--k", "30", "--evaluate", "--limit", "20",
                "--no-record", home=home).returncode == 0
    assert _cli("conflicts", "--zoo", zoo, home=home).returncode == 0
    listed = json.loads(_cli("runs", "list", "--json", home=home).stdout)["runs"]
    assert [(r["kind"], r["method"]) for r in listed] == [("conflicts", None), ("merge", "ties")]
    merge = listed[1]
    assert merge["config"]["k"] == 10.0 and merge["source"]["kind"] == "zoo" and merge["source"]["fingerprint"]
    assert merge["result"]["average"] == pytest.approx(sum(merge["result"]["per_task"].values()) / 4)
    shown = json.loads(_cli("runs", "show", str(merge["id"]), "--json", home=home).stdout)
    assert shown["result"] == merge["result"]
    report = tmp_path / "report.html"
    assert _cli("runs", "export", str(merge["id"]), str(listed[0]["id"]), "--html", str(report),
                home=home).returncode == 0
    assert report.read_text().count('class="plotly-graph-div"') >= 3
    assert _cli("runs", "pin", str(merge["id"]), home=home).returncode == 0
    assert _cli("runs", "name", str(merge["id"]), "k ten", home=home).returncode == 0
    text = _cli("runs", "list", home=home).stdout.splitlines()
    assert text[0].startswith("*") and "k ten" in text[0]
    assert _cli("runs", "delete", str(listed[0]["id"]), home=home).returncode == 0
    gone = _cli("runs", "show", str(listed[0]["id"]), home=home)
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1 and f"no run #{listed[0]['id']}" in gone.stderr
