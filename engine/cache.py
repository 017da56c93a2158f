"""One folder for everything the engine derives and can rebuild: zero-shot heads, decoded test
images, measured expert accuracies.

`MERGE_EXPLORER_CACHE` names it; the default is `$XDG_CACHE_HOME/merge-explorer` (usually
`~/.cache/merge-explorer`). Deleting it only costs recomputation. Entries are written to a temporary
name and renamed into place, so an interrupted write never leaves a half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

CACHE_ENV = "MERGE_EXPLORER_CACHE"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "merge-explorer"


def cache_path(kind: str, key: Any, suffix: str) -> Path:
    """Where the entry of `kind` for `key` (anything JSON-serialisable) lives."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_root() / kind / f"{digest}{suffix}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename to `path`; on any failure the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_identity(path: Path) -> list:
    """A cheap identity for a file or folder's files (resolved path, sizes, mtimes): cache keys use it
    instead of hashing gigabytes of weights or images."""
    path = Path(path).resolve()
    if path.is_dir():
        entries = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path), [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in entries]]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]
