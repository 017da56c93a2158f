"""Which folders a server may read when users type paths into a browser.

A shared server (a class on one machine) must not read whatever path a student types. The app
reads checkpoint folders and suite files (and everything a suite file names) only under the
allowed roots: `MERGE_EXPLORER_DATA`, one or more folders separated by the path separator (`:` on
Linux). By default: the demo zoo's folder and `./models`. Paths are resolved first (`..` and
symlinks followed) and checked after resolution, so neither trick leads outside. The command line
applies the same rule only when `MERGE_EXPLORER_DATA` is set (a user's own shell may read their
own files).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import ConfigError
from .zoo.manifest import default_zoo_dir

DATA_ENV = "MERGE_EXPLORER_DATA"

Roots = Sequence[Path] | None  # None: no restriction


def allowed_roots() -> list[Path]:
    """The resolved folders a server may read (see the module docstring)."""
    env = os.environ.get(DATA_ENV)
    if env:
        roots = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    else:
        roots = [default_zoo_dir(), Path.cwd() / "models"]
    return [r.resolve() for r in roots]


def cli_roots() -> list[Path] | None:
    """The command line's restriction: the allowed roots when `MERGE_EXPLORER_DATA` is set, else none."""
    return allowed_roots() if os.environ.get(DATA_ENV) else None


def check_allowed(path: str | Path, roots: Roots, what: str = "path") -> Path:
    """`path` resolved; ConfigError in one line when it lies outside every allowed root."""
    resolved = Path(path).expanduser().resolve()
    if roots is None:
        return resolved
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    shown = ", ".join(str(r) for r in roots) or "(none)"
    raise ConfigError(f"{path}: this {what} is outside the folders this server may read ({shown}); "
                      f"to allow it, add its folder to {DATA_ENV}")
