"""The run store: every result the app or the CLI computes, kept in one SQLite file.

A *run* is one computed result with everything needed to read it later: its kind (merge, sweep,
conflicts, continual, ri), method, full settings, the source it was computed on (kind, path and a
content fingerprint), the engine version, the device, timings and the JSON result. Never weights.

The file is `$MERGE_EXPLORER_HOME/runs.sqlite` (default `~/.local/share/merge-explorer/`), in WAL
mode so that many sessions and processes write at once while others read. Each run is one
INSERT in one transaction: a process killed mid-write leaves the file intact and every run
committed before it readable. The schema carries its version in `PRAGMA user_version` and moves
forward by the migrations below, in order, each in its own transaction.

`key` is what identifies a result's inputs (the app's cache key): looking a key up finds the
latest run computed from the same inputs, which is how a link opened after a server restart shows
its stored result at once.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import MergeExplorerError

HOME_ENV = "MERGE_EXPLORER_HOME"
FILE_NAME = "runs.sqlite"
KINDS = ("merge", "sweep", "conflicts", "continual", "ri")
ENGINE_VERSION = "0.3.0"
BUSY_TIMEOUT_MS = 30_000

# Forward migrations: MIGRATIONS[i] takes the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created REAL NOT NULL,
        kind TEXT NOT NULL,
        method TEXT,
        config TEXT NOT NULL,
        source TEXT NOT NULL,
        engine_version TEXT NOT NULL,
        device TEXT,
        timings TEXT NOT NULL,
        result TEXT NOT NULL
    );
    CREATE INDEX runs_kind ON runs(kind, created);
    """,
    # 2: names and pins (a teacher's lesson set), the inputs' key (links that survive restarts),
    #    where the run was made (app or cli) and the app view that shows it
    """
    ALTER TABLE runs ADD COLUMN name TEXT;
    ALTER TABLE runs ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN key TEXT;
    ALTER TABLE runs ADD COLUMN origin TEXT NOT NULL DEFAULT 'cli';
    ALTER TABLE runs ADD COLUMN view TEXT;
    CREATE INDEX runs_key ON runs(kind, key, created);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    home = os.environ.get(HOME_ENV)
    root = Path(home).expanduser() if home else Path.home() / ".local" / "share" / "merge-explorer"
    return root / FILE_NAME


@dataclass(frozen=True)
class Run:
    id: int
    created: float
    kind: str
    method: str | None
    config: dict[str, Any]
    source: dict[str, Any]
    engine_version: str
    device: str | None
    timings: dict[str, float]
    result: dict[str, Any]
    name: str | None = None
    pinned: bool = False
    key: str | None = None
    origin: str = "cli"
    view: str | None = None

    @property
    def average(self) -> float | None:
        """The run's headline average accuracy (%), where its kind has one."""
        r = self.result
        if self.kind == "merge":
            return r.get("average")
        if self.kind == "continual":
            return r.get("ACC")
        if self.kind == "ri":
            return (r.get("with_ri") or {}).get("average")
        return None

    @property
    def when(self) -> str:
        """When it was made, local time to the minute ("2026-11-30 02:38")."""
        return dt.datetime.fromtimestamp(self.created).strftime("%Y-%m-%d %H:%M")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_COLUMNS = tuple(f.name for f in dataclasses.fields(Run))  # the table's columns are the dataclass's fields
_JSON_COLUMNS = {"config", "source", "timings", "result"}


def _row_to_run(row: Sequence[Any]) -> Run:
    values = dict(zip(_COLUMNS, row))
    for c in _JSON_COLUMNS:
        values[c] = json.loads(values[c])
    values["pinned"] = bool(values["pinned"])
    return Run(**values)


class RunStore:
    """One SQLite file of runs; safe to open from many threads and processes at once."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._local = threading.local()  # one connection per thread: opening one costs ~1000x an INSERT
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")  # kept in the file: set once
                self._migrate(db)
        except sqlite3.DatabaseError as exc:
            raise MergeExplorerError(f"{self.path}: not a usable run store ({exc})") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # never share a connection across a fork
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            # NORMAL in WAL mode: a commit survives a killed process (not a power cut, which is fine
            # for a history of results that can be recomputed), without an fsync per run.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._local.db, self._local.pid = db, os.getpid()
        yield db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this engine's {SCHEMA_VERSION}")
        while version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                # another process may have migrated while we waited for the write lock
                current = db.execute("PRAGMA user_version").fetchone()[0]
                if current == version:
                    for statement in MIGRATIONS[version].split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version={version + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            version = db.execute("PRAGMA user_version").fetchone()[0]

    # ------------------------------------------------------------------ writing

    def record(self, kind: str, result: Mapping[str, Any], *, method: str | None = None,
               config: Mapping[str, Any] | None = None, source: Mapping[str, Any] | None = None,
               device: str | None = None, timings: Mapping[str, float] | None = None, key: str | None = None,
               origin: str = "cli", view: str | None = None, name: str | None = None) -> int:
        """Store one run; returns its id. One INSERT: it is there completely or not at all."""
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r} (one of {', '.join(KINDS)})")
        row = {"created": time.time(), "kind": kind, "method": method, "config": _dumps(config or {}),
               "source": _dumps(source or {}), "engine_version": ENGINE_VERSION, "device": device,
               "timings": _dumps(timings or {}), "result": _dumps(result), "name": name, "key": key,
               "origin": origin, "view": view}
        with self._connect() as db:
            cur = db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             tuple(row.values()))
            return int(cur.lastrowid)

    def rename(self, run_id: int, name: str | None) -> None:
        self._change_one(run_id, "UPDATE runs SET name = ? WHERE id = ?", (name or "").strip() or None)

    def pin(self, run_id: int, pinned: bool = True) -> None:
        self._change_one(run_id, "UPDATE runs SET pinned = ? WHERE id = ?", int(bool(pinned)))

    def delete(self, run_id: int) -> None:
        self._change_one(run_id, "DELETE FROM runs WHERE id = ?")

    def _change_one(self, run_id: int, sql: str, *values: Any) -> None:
        """Run `sql` (its last parameter is the id) on one run; a missing run is a one-line error."""
        with self._connect() as db:
            if db.execute(sql, (*values, run_id)).rowcount == 0:
                raise MergeExplorerError(f"{self.path}: no run #{run_id}")

    # ------------------------------------------------------------------ reading

    def get(self, run_id: int) -> Run:
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise MergeExplorerError(f"{self.path}: no run #{run_id}")
        return _row_to_run(row)

    def runs(self, kind: str | None = None, limit: int | None = None) -> list[Run]:
        """Pinned runs first, then the newest first."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM runs"
        args: list[Any] = []
        if kind:
            sql += " WHERE kind = ?"
            args.append(kind)
        sql += " ORDER BY pinned DESC, created DESC, id DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._connect() as db:
            return [_row_to_run(r) for r in db.execute(sql, args).fetchall()]

    def latest(self, kind: str, key: str) -> Run | None:
        """The newest run of `kind` computed from the inputs `key`, if any."""
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE kind = ? AND key = ?"
                             " ORDER BY created DESC, id DESC LIMIT 1", (kind, key)).fetchone()
        return None if row is None else _row_to_run(row)

    def count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------- sources


def file_fingerprint(paths: Iterable[str | Path]) -> str:
    """A content fingerprint of files, cheap enough for multi-GB checkpoints: SHA-1 over each
    file's name, size and first and last MiB (folders: every file inside, sorted). Each file's part
    is remembered per (path, size, mtime), so recording a run re-reads nothing that has not changed."""
    h = hashlib.sha1()
    for p in paths:
        path = Path(p)
        files = sorted(x for x in path.rglob("*") if x.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(_file_part(f))
    return h.hexdigest()[:16]


_FILE_PARTS: dict[tuple[str, int, int], bytes] = {}


def _file_part(f: Path) -> bytes:
    try:
        stat = f.stat()
    except OSError:
        return f"{f.name}\0missing\0".encode()
    memo_key = (str(f), stat.st_size, stat.st_mtime_ns)
    part = _FILE_PARTS.get(memo_key)
    if part is None:
        h = hashlib.sha1(f"{f.name}\0{stat.st_size}\0".encode())
        try:
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if stat.st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read(1 << 20))
        except OSError:
            h.update(b"unreadable")
        part = _FILE_PARTS[memo_key] = h.digest()
        if len(_FILE_PARTS) > 4096:
            _FILE_PARTS.pop(next(iter(_FILE_PARTS)))
    return part


def source_record(kind: str, path: str | Path, files: Iterable[str | Path], limit: int | None = None) -> dict[str, Any]:
    """How a run names its source: kind (zoo, suite, folder, files), path, fingerprint, image budget."""
    files = [Path(f) for f in files]
    return {"kind": kind, "path": str(path), "fingerprint": file_fingerprint([Path(path), *files]
                                                                             if Path(path).is_file() else files),
            "limit": limit}


def describe_source(source: Any, limit: int | None = None) -> dict[str, Any]:
    """`source_record` of an engine.sources.Source or a TaskSuite: a suite file, a zoo or plain
    checkpoint files."""
    if hasattr(source, "base_path"):
        suite, files = getattr(source, "suite", None), [source.base_path, *source.expert_paths]
    elif hasattr(source, "pretrained_path"):
        suite, files = source, [source.pretrained_path, *source.expert_paths()]
    else:  # a suite without files (built in memory, e.g. by a test): named, not fingerprinted
        return {"kind": type(source).__name__, "path": str(getattr(source, "label", "")), "fingerprint": None,
                "limit": limit}
    if suite is not None and getattr(suite, "path", None) is not None:
        return source_record("suite", suite.path, files, limit)
    zoo = getattr(suite, "zoo", None)
    if zoo is not None:
        return source_record("zoo", zoo.root, [zoo.root / "zoo.json", *files], limit)
    return source_record("files", Path(files[0]).parent, files, limit)
