"""One folder for everything the engine derives and can rebuild: zero-shot heads, decoded test
images, measured expert accuracies, RI-adapted experts.

`MERGE_EXPLORER_CACHE` names it; the default is `$XDG_CACHE_HOME/merge-explorer` (usually
`~/.cache/merge-explorer`). Deleting it only costs recomputation.

- **Atomic**: an entry (a file, or a folder such as a set of adapted experts) is written under a
  temporary name starting with "." and renamed into place when complete, so an interrupted write
  never leaves a half-written entry; stale temporaries are removed later.
- **Bounded**: `MERGE_EXPLORER_CACHE_MB` (default 2000) caps the folder's size. After every new
  entry the least recently used entries are removed until it fits, never one that is in use: an
  entry is in use while something in this process holds a pin on it (`pin`), and reading an entry
  refreshes its "last used" time (`touch`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

CACHE_ENV = "MERGE_EXPLORER_CACHE"
CAP_ENV = "MERGE_EXPLORER_CACHE_MB"
DEFAULT_CAP_MB = 2000
STALE_TEMP_S = 3600.0  # a temporary entry untouched this long belongs to a run that died

_PINS: dict[Path, int] = {}
_PINS_LOCK = threading.Lock()


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
    """`write(tmp)` then rename to `path`; on any failure the temporary file is removed. Then the
    cache is brought back under its cap (the new entry stays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    enforce_cap(keep=[path])


# --------------------------------------------------------------------------------------------
# Size cap and least-recently-used eviction
# --------------------------------------------------------------------------------------------


def cap_bytes() -> int:
    return int(float(os.environ.get(CAP_ENV, DEFAULT_CAP_MB)) * 2**20)


def touch(path: Path) -> None:
    """Mark an entry as just used (its modification time is the "last used" clock)."""
    try:
        os.utime(path)
    except OSError:
        pass


def pin(path: Path) -> None:
    """Keep `path` (an entry or anything inside one) from eviction until `unpin`."""
    with _PINS_LOCK:
        key = Path(path).resolve()
        _PINS[key] = _PINS.get(key, 0) + 1


def unpin(path: Path) -> None:
    with _PINS_LOCK:
        key = Path(path).resolve()
        if _PINS.get(key, 0) <= 1:
            _PINS.pop(key, None)
        else:
            _PINS[key] -= 1


def _pinned(entry: Path) -> bool:
    entry = entry.resolve()
    with _PINS_LOCK:
        return any(p == entry or p.is_relative_to(entry) for p in _PINS)


def _size(entry: Path) -> int:
    if entry.is_dir():
        return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    return entry.stat().st_size


def entries() -> list[Path]:
    """Every complete entry: the items in each kind's folder whose names do not start with "."."""
    root = cache_root()
    if not root.is_dir():
        return []
    return [item for kind in root.iterdir() if kind.is_dir() for item in kind.iterdir()
            if not item.name.startswith(".")]


def clean_stale_temporaries(older_than_s: float = STALE_TEMP_S) -> int:
    """Remove temporaries left by runs that died (untouched for `older_than_s`); returns how many."""
    root, now, removed = cache_root(), time.time(), 0
    if not root.is_dir():
        return 0
    for kind in (k for k in root.iterdir() if k.is_dir()):
        for item in kind.iterdir():
            if item.name.startswith(".") and now - item.stat().st_mtime > older_than_s:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
                removed += 1
    return removed


def enforce_cap(keep: list[Path] | None = None) -> list[Path]:
    """Remove least recently used entries until the cache fits its cap; never a pinned entry or one in
    `keep`. Returns what was removed."""
    clean_stale_temporaries()
    found = []
    for entry in entries():
        try:
            found.append((entry.stat().st_mtime, entry, _size(entry)))
        except OSError:
            continue  # removed meanwhile by another process
    total, cap = sum(size for _, _, size in found), cap_bytes()
    protected = {Path(p).resolve() for p in keep or []}
    removed = []
    for _, entry, size in sorted(found, key=lambda item: item[0]):
        if total <= cap:
            break
        if entry.resolve() in protected or _pinned(entry):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        total -= size
        removed.append(entry)
    return removed


def size_bytes() -> int:
    return sum(_size(e) for e in entries())


def file_identity(path: Path) -> list:
    """A cheap identity for a file or folder's files (resolved path, sizes, mtimes): cache keys use it
    instead of hashing gigabytes of weights or images."""
    path = Path(path).resolve()
    if path.is_dir():
        entries = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path), [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in entries]]
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]
