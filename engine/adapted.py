"""RI-adapted experts on disk: written, read back and cached (the algorithm is engine.methods.ri).

Two places hold them:

- the **cache** (`engine.cache`), one folder per (suite, RI settings), used by the app's
  "RI-adapted experts" switch: `ensure_adapted(suite, config)` adapts once and afterwards returns
  the stored experts at once. A folder is written under a temporary name and renamed into place
  when complete, so an interrupted run never leaves a half-written entry;
- a folder the user names (`python -m engine ri --out DIR`): for the demo zoo a complete copy of
  the zoo whose manifest records the RI run (usable with `--zoo DIR`); for a suite file the adapted
  experts plus a suite file `DIR/suite.toml` that points at the original model and data and names
  the original suite as its `reference` (usable with `--suite DIR/suite.toml`).

Either way, normalised accuracy and ξ keep referring to the ORIGINAL experts (docs/methods.md, RI).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .cache import cache_root, enforce_cap, pin, touch, unpin
from .checkpoints import canonical_to_open_clip, save_safetensors
from .errors import ConfigError
from .methods.ri import RIConfig, RIResult, adapt_suite
from .zoo.manifest import MANIFEST_NAME

Progress = Callable[[float, str], None]
RECORD_NAME = "ri.json"
RI_MANIFEST_KEY = "ri"  # what an adapted zoo's manifest records about its making


def _digest(suite, config: RIConfig) -> str:
    identity = {"config": dataclasses.asdict(config), "suite": suite.identity()}
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def adapted_dir(suite, config: RIConfig | None = None) -> Path:
    """The cache folder of `suite`'s experts adapted with `config` (other settings, other folder)."""
    return cache_root() / "ri" / _digest(suite, config or RIConfig())


def _expert_file(folder: Path, task: str) -> Path:
    return folder / "experts" / f"{task}.safetensors"


def _adapted_suite(suite, folder: Path, record: Mapping[str, Any]):
    label = f"{suite.label}, RI-adapted experts (α {record['config']['alpha']}, {record['config']['steps']} steps)"
    adapted = suite.with_experts({t: _expert_file(folder, t) for t in suite.task_names()}, label)
    adapted.ri_record = dict(record)
    # In use while this suite object lives: the cache's size cap never evicts it meanwhile.
    touch(folder)
    pin(folder)
    weakref.finalize(adapted, unpin, folder)
    return adapted


def cached_adapted(suite, config: RIConfig | None = None):
    """The suite with its experts adapted by `config` when that has been done before, else None."""
    folder = adapted_dir(suite, config)
    try:
        record = json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not all(_expert_file(folder, t).is_file() for t in suite.task_names()):
        return None
    return _adapted_suite(suite, folder, record)


def write_experts(folder: Path, adapted: Mapping[str, Mapping[str, torch.Tensor]], result: RIResult) -> None:
    """Adapted experts as canonical safetensors plus the run's record, into `folder`."""
    (folder / "experts").mkdir(parents=True, exist_ok=True)
    for task, weights in adapted.items():
        save_safetensors(_expert_file(folder, task), dict(weights),
                         {"ri": "adapted expert", "task": task, "config": result.config})
    (folder / RECORD_NAME).write_text(json.dumps(result.record(), indent=2, default=str) + "\n")


def ensure_adapted(suite, config: RIConfig | None = None, *, device: str | torch.device = "cpu",
                   progress: Progress | None = None):
    """`suite` with RI-adapted experts for `config`, adapting (and caching) them first if needed."""
    config = config or RIConfig()
    found = cached_adapted(suite, config)
    if found is not None:
        return found
    adapted, result = adapt_suite(suite, config, device=device, progress=progress)
    folder = adapted_dir(suite, config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_experts(tmp, adapted, result)
        if folder.exists():  # an incomplete leftover (cached_adapted said so): replace it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = cached_adapted(suite, config)  # pinned from here on
    enforce_cap(keep=[folder])
    return found


def ri_record(suite) -> dict[str, Any] | None:
    """How a suite's experts were adapted (config, source, statistics), or None for original experts."""
    record = getattr(suite, "ri_record", None)
    if record:
        return dict(record)
    manifest = getattr(getattr(suite, "zoo", None), "manifest", None)
    if isinstance(manifest, Mapping) and RI_MANIFEST_KEY in manifest:
        return dict(manifest[RI_MANIFEST_KEY])
    return None


# --------------------------------------------------------------------------------------------
# A folder the user names: `python -m engine ri --out DIR`
# --------------------------------------------------------------------------------------------


def check_out_dir(suite, out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir).expanduser()
    sources = {Path(p).resolve() for p in (getattr(getattr(suite, "zoo", None), "root", None),
                                           getattr(suite, "path", None)) if p is not None}
    if out.resolve() in sources or any(out.resolve() == s.parent for s in sources if s.is_file()):
        raise ConfigError(f"{out}: the adapted experts must go to a new folder, not over the source")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite")
    return out


def write_adapted_zoo(zoo_suite, out_dir: Path, adapted: Mapping[str, Mapping[str, torch.Tensor]],
                      result: RIResult) -> Path:
    """A copy of the demo zoo at `out_dir` with the adapted experts and the RI record in its manifest."""
    zoo = zoo_suite.zoo
    root = Path(zoo.root)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root, out_dir, dirs_exist_ok=True)
    for task, weights in adapted.items():
        target = out_dir / zoo.task(task).expert_file
        # the zoo keeps open_clip key layout (`visual.` prefix), as its build wrote it
        save_safetensors(target, canonical_to_open_clip(dict(weights), prefix="visual."),
                         {"ri": "adapted expert", "task": task, "source": str(zoo.expert_path(task))})
    manifest_path = out_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest[RI_MANIFEST_KEY] = {**result.record(), "source_zoo": str(root)}
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(manifest_path)
    return out_dir


def write_adapted_suite_file(suite, out_dir: Path, adapted: Mapping[str, Mapping[str, torch.Tensor]],
                             result: RIResult) -> Path:
    """Adapted experts plus `out_dir/suite.toml`: the original model and data (absolute paths), the
    adapted experts, and `reference` = the original suite file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_experts(out_dir, adapted, result)
    lines = [f"# RI-adapted experts of {suite.path} (written by python -m engine ri)",
             f"reference = {json.dumps(str(Path(suite.path).resolve()))}", "", "[model]"]
    lines += [f"{key} = {json.dumps(str(value.resolve()) if isinstance(value, Path) else str(value))}"
              for key, value in suite.model_spec.items()]
    lines += ["", "[experts]"]
    lines += [f"{json.dumps(t)} = {json.dumps(str(_expert_file(out_dir, t).resolve()))}" for t in suite.task_names()]
    for task in suite.task_names():
        spec = suite.task_spec(task)
        lines += ["", f"[tasks.{json.dumps(task)}]", f"data = {json.dumps(str(spec.data.resolve()))}",
                  f"classes = {json.dumps(spec.classes)}", f"templates = {json.dumps(spec.templates)}"]
        if spec.limit is not None:
            lines.append(f"limit = {spec.limit}")
    path = out_dir / "suite.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
