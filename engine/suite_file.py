"""Suite files: real CLIP checkpoints, test images on disk, zero-shot heads from class names.

A suite file is TOML (read with the standard library's `tomllib`); paths are relative to the file.
The format, with every key, is in docs/suites.md:

    [model]
    open_clip = "ViT-B-32"                              # an open_clip architecture name or config JSON
    pretrained = "clip/open_clip_model.safetensors"     # full CLIP weights
    # hf = "clip-vit-base-patch32"                      # or: a Hugging Face CLIPModel folder

    [experts]                                           # task name = checkpoint (any accepted format)
    eurosat = "ft/eurosat.safetensors"

    [tasks.eurosat]
    data = "data/eurosat/test"                          # ImageFolder, or a folder of .parquet shards
    classes = "builtin"                                 # or a list, or omitted (folder names)
    templates = "builtin"                               # or a list; default ["a photo of a {}."]
    limit = 500                                         # optional, images per task

Everything that can be checked cheaply is checked when the file is loaded, before any heavy work:
the files and folders exist, the architecture is known, every expert's tensors fit the pretrained
model's shapes (read from file headers only), the class count matches the data. Each problem is a
ConfigError with one line naming the suite file and the key.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .access import Roots, check_allowed
from .builtin_tasks import find_builtin_task
from .cache import cache_path, file_identity, touch, write_atomically
from .checkpoints import open_checkpoint
from .errors import ConfigError, MergeExplorerError
from .image_data import ImageListing, TestSplit, decode_images, list_images, stratified_subset
from .tasks import TaskSuite

DEFAULT_TEMPLATES = ("a photo of a {}.",)
MODEL_KEYS = {"open_clip", "pretrained", "hf"}
TASK_KEYS = {"data", "classes", "templates", "limit"}
TOP_KEYS = {"model", "experts", "tasks", "limit", "reference"}


@dataclass
class SuiteTask:
    name: str
    data: Path
    classes: list[str]
    templates: list[str]
    limit: int | None
    listing: ImageListing = field(repr=False)


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _resolve(base: Path, value: Any, where: str, *, kind: str, roots: Roots = None) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path (a string), got {value!r}")
    path = (base / value).expanduser()
    if roots is not None:
        try:
            check_allowed(path, roots, "file")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if kind == "file" and not path.exists():
        raise ConfigError(f"{where}: no such file or folder '{value}' (looked at {path})")
    if kind == "dir" and not path.is_dir():
        raise ConfigError(f"{where}: no such folder '{value}' (looked at {path})")
    return path


def _limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: limit must be a whole number of images ≥ 1, got {value!r}")
    return value


def _unknown_keys(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of strings or \"builtin\"")
    return list(value)


def _task(path: Path, name: str, table: Mapping[str, Any], default_limit: int | None, roots: Roots = None) -> SuiteTask:
    base = path.parent
    where = f"{path}: [tasks.{name}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table with data = \"FOLDER\"")
    _unknown_keys(table, TASK_KEYS, where)
    if "data" not in table:
        raise ConfigError(f"{where}: missing data = \"FOLDER\" (its test images)")
    data = _resolve(base, table["data"], f"{where} data", kind="dir", roots=roots)
    listing = list_images(data, f"{where} data")
    if roots is not None:  # an image may be a symlink out of the data folder
        for ref in listing.refs:
            check_allowed(ref.path, roots, f"image of {where}")
    builtin = find_builtin_task(name)
    classes_value = table.get("classes")
    if classes_value is None:
        if listing.class_folders is None:
            raise ConfigError(f"{where}: parquet data has no folder names; give classes = [...] or \"builtin\"")
        classes = list(listing.class_folders)
    elif classes_value == "builtin":
        if builtin is None:
            raise ConfigError(f"{where} classes: no built-in class names for a task called {name!r} "
                              "(built in: sun397, stanford-cars, resisc45, eurosat, svhn, gtsrb, mnist, dtd)")
        classes = list(builtin.classes)
    else:
        classes = _strings(classes_value, f"{where} classes")
    templates_value = table.get("templates")
    if templates_value is None:
        templates = list(DEFAULT_TEMPLATES)
    elif templates_value == "builtin":
        if builtin is None:
            raise ConfigError(f"{where} templates: no built-in templates for a task called {name!r}")
        templates = list(builtin.templates)
    else:
        templates = _strings(templates_value, f"{where} templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"{where} templates: {bad[0]!r} must contain exactly one {{}} for the class name")
    if listing.class_folders is not None and len(listing.class_folders) != len(classes):
        raise ConfigError(f"{where} classes: {len(classes)} class names but {data} has "
                          f"{len(listing.class_folders)} class folders")
    if listing.num_labels > len(classes):
        raise ConfigError(f"{where} classes: {len(classes)} class names but the data has labels up to "
                          f"{listing.num_labels - 1}")
    limit = _limit(table.get("limit", default_limit), f"{where} limit")
    return SuiteTask(name, data, classes, templates, limit, listing)


class ClipSuite(TaskSuite):
    """Real CLIP checkpoints described by a suite file (see the module docstring)."""

    kind = "clip"

    def __init__(self, path: Path, model_spec: dict[str, Path | str], experts: dict[str, Path],
                 tasks: dict[str, SuiteTask], *, label: str | None = None, clip=None) -> None:
        super().__init__()
        self.path = path
        self.model_spec = model_spec
        self._experts = dict(experts)
        self._task_specs = tasks
        self.tasks = list(experts)
        self.label = label or f"the suite {path}"
        self._clip = clip
        self.default_limit = None  # limits are per task in the file: see task_limit

    # ---- the CLIP model ---------------------------------------------------------------------
    @property
    def clip(self):
        """The pretrained CLIP (vision + text), loaded on first use."""
        with self._lock:
            if self._clip is None:
                from .clip_model import load_clip

                spec = self.model_spec
                self._clip = load_clip(open_clip=spec.get("open_clip"), weights=spec.get("pretrained"),
                                       hf=spec.get("hf"), label=str(self.path))
            return self._clip

    @property
    def logit_scale(self) -> float:  # type: ignore[override]
        return float(self.clip.model.logit_scale.detach().exp())

    @property
    def image_size(self) -> int:
        return int(self.clip.image_size)

    @property
    def pretrained_path(self) -> Path:
        return Path(self.model_spec.get("pretrained") or self.model_spec["hf"])

    def expert_path(self, task: str) -> Path:
        self.check_task(task)
        return self._experts[task]

    def classes(self, task: str) -> list[str]:
        self.check_task(task)
        return list(self._task_specs[task].classes)

    def task_spec(self, task: str) -> SuiteTask:
        self.check_task(task)
        return self._task_specs[task]

    def model_input(self, images) -> torch.Tensor:
        x = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()
        return TestSplit(x, torch.zeros(len(x), dtype=torch.long), self.clip.mean, self.clip.std).model_ready()

    def description(self, task: str) -> str:
        spec = self._task_specs[task]
        return f"{len(spec.classes)} classes, {len(spec.listing.refs)} test images ({spec.listing.layout})"

    def new_encoder(self) -> nn.Module:
        from .clip_model import new_visual_tower

        return new_visual_tower(self.clip.model_cfg)

    def identity(self) -> Any:
        return {"suite": str(self.path.resolve()), "model": {k: str(v) for k, v in self.model_spec.items()},
                "experts": {t: str(p) for t, p in self._experts.items()},
                "tasks": {t: [str(s.data), s.classes, s.templates, s.limit] for t, s in self._task_specs.items()
                          if t in self.tasks}}

    # ---- limits -----------------------------------------------------------------------------
    def resolve_limit(self, limit: int | None) -> int | None:
        """An explicit `limit` wins (0 = full test sets); None defers to each task's own limit."""
        if limit is None:
            return None
        return None if limit <= 0 else int(limit)

    def task_limit(self, task: str, limit: int | None) -> int | None:
        return self._task_specs[task].limit if limit is None else (None if limit <= 0 else limit)

    # ---- heads ------------------------------------------------------------------------------
    def _read_heads(self) -> dict[str, torch.Tensor]:
        from .zero_shot import zero_shot_head

        return {t: zero_shot_head(self.clip, self._task_specs[t].classes, self._task_specs[t].templates)
                for t in self.tasks}

    # ---- test data --------------------------------------------------------------------------
    def _read_split(self, task: str, limit: int | None, progress) -> TestSplit:
        from .clip_model import eval_geometry

        spec = self._task_specs[task]
        limit = self.task_limit(task, limit)
        keep = stratified_subset(spec.listing.labels, limit)
        clip = self.clip
        key = {"data": file_identity(spec.data), "limit": limit, "keep": len(keep),
               "preprocess": clip.preprocess_key()}
        cached = cache_path("test-images", key, ".safetensors")
        labels = torch.as_tensor(spec.listing.labels[keep]).long()
        if cached.is_file():
            try:
                images = load_file(str(cached))["images"]
                if images.shape[0] == len(keep):
                    touch(cached)
                    return TestSplit(images, labels, clip.mean, clip.std)
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                pass
        refs = [spec.listing.refs[i] for i in keep]
        images = decode_images(refs, eval_geometry(clip), label=f"{self.path}: [tasks.{task}] data",
                               progress=progress)
        write_atomically(cached, lambda tmp: save_file({"images": images}, str(tmp)))
        return TestSplit(images, labels, clip.mean, clip.std)

    # ---- expert accuracies (measured once, kept in the cache folder) -------------------------
    def _accuracy_key(self, task: str, limit: int | None) -> Path:
        spec = self._task_specs[task]
        return cache_path("expert-accuracy", {"expert": file_identity(self._experts[task]),
                                              "pretrained": file_identity(self.pretrained_path),
                                              "data": file_identity(spec.data), "classes": spec.classes,
                                              "templates": spec.templates,
                                              "limit": self.task_limit(task, limit)}, ".json")

    def _stored_expert_accuracy(self, task: str, limit: int | None) -> float | None:
        path = self._accuracy_key(task, limit)
        try:
            return float(json.loads(path.read_text())["accuracy"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remember_expert_accuracy(self, task: str, limit: int | None, value: float) -> None:
        path = self._accuracy_key(task, limit)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps({"task": task, "accuracy": value})))

    def _copy_with(self, tasks, expert_paths, label) -> "ClipSuite":
        return ClipSuite(self.path, self.model_spec, {t: Path(expert_paths[t]) for t in tasks},
                         {t: self._task_specs[t] for t in tasks}, label=label, clip=self._clip)


def _check_experts(path: Path, pretrained: Path, experts: Mapping[str, Path]) -> None:
    """Every expert's tensors must exist in the pretrained model with the same shapes (headers only)."""
    try:
        base = open_checkpoint(pretrained)
    except MergeExplorerError as exc:
        raise ConfigError(f"{path}: [model] {exc}") from None
    base_keys = set(base.keys())
    for task, expert_path in experts.items():
        where = f"{path}: [experts] {task}"
        try:
            reader = open_checkpoint(expert_path)
        except MergeExplorerError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        extra = sorted(set(reader.keys()) - base_keys)
        if extra:
            raise ConfigError(f"{where}: tensor '{extra[0]}' is not in the pretrained model's vision tower; "
                              "the expert does not match the architecture")
        for name in reader.keys():
            shape, base_shape = reader.spec(name)[0], base.spec(name)[0]
            if shape != base_shape:
                raise ConfigError(f"{where}: tensor '{name}' has shape {shape} but the pretrained model has "
                                  f"{base_shape}; the expert does not match the architecture")


def load_suite_file(path: str | Path, *, limit: int | None = None, check_experts: bool = True,
                    roots: Roots = None) -> ClipSuite:
    """Read and check a suite file (see the module docstring). `limit` overrides every task's limit;
    with `roots` (engine.access) the file and every path it names must lie under one of them."""
    path = Path(path).expanduser()
    check_allowed(path, roots, "suite file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such suite file")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML file ({exc})") from None
    _unknown_keys(doc, TOP_KEYS, str(path))
    base = path.parent
    model = doc.get("model")
    if not isinstance(model, Mapping):
        raise ConfigError(f"{path}: missing [model] with open_clip + pretrained, or hf")
    _unknown_keys(model, MODEL_KEYS, f"{path}: [model]")
    spec: dict[str, Any] = {}
    if "hf" in model:
        if "open_clip" in model or "pretrained" in model:
            raise ConfigError(f"{path}: [model] give either hf = FOLDER, or open_clip + pretrained, not both")
        spec["hf"] = _resolve(base, model["hf"], f"{path}: [model] hf", kind="dir", roots=roots)
    else:
        if "open_clip" not in model or "pretrained" not in model:
            raise ConfigError(f"{path}: [model] needs open_clip = \"ARCH\" and pretrained = \"FILE\" (or hf = FOLDER)")
        arch = model["open_clip"]
        if not isinstance(arch, str) or not arch:
            raise ConfigError(f"{path}: [model] open_clip must be an architecture name or a config JSON path")
        if arch.endswith(".json"):
            spec["open_clip"] = _resolve(base, arch, f"{path}: [model] open_clip", kind="file", roots=roots)
        else:
            from .clip_model import check_architecture

            try:
                check_architecture(arch)
            except MergeExplorerError as exc:
                raise ConfigError(f"{path}: [model] open_clip: {exc}") from None
            spec["open_clip"] = arch
        spec["pretrained"] = _resolve(base, model["pretrained"], f"{path}: [model] pretrained", kind="file",
                                      roots=roots)
    experts_table = doc.get("experts")
    if not isinstance(experts_table, Mapping) or not experts_table:
        raise ConfigError(f"{path}: missing [experts] with at least one task = \"CHECKPOINT\"")
    experts = {str(t): _resolve(base, p, f"{path}: [experts] {t}", kind="file", roots=roots)
               for t, p in experts_table.items()}
    tasks_table = doc.get("tasks", {})
    if not isinstance(tasks_table, Mapping):
        raise ConfigError(f"{path}: [tasks] must be tables like [tasks.NAME]")
    for name in tasks_table:
        if name not in experts:
            raise ConfigError(f"{path}: [tasks.{name}] has no expert; add {name} = \"CHECKPOINT\" under [experts]")
    default_limit = _limit(doc.get("limit"), f"{path}: limit")
    tasks = {}
    for name in experts:
        if name not in tasks_table:
            raise ConfigError(f"{path}: [tasks.{name}] is missing: every expert needs its test data")
        tasks[name] = _task(path, name, tasks_table[name], default_limit, roots)
        if limit is not None:
            tasks[name].limit = None if limit <= 0 else limit
    if check_experts:
        _check_experts(path, Path(spec.get("pretrained") or spec["hf"]), experts)
    suite = ClipSuite(path, spec, experts, tasks)
    if "reference" in doc:  # RI-adapted experts: normalise and measure ξ against the original suite's
        original = _resolve(base, doc["reference"], f"{path}: reference", kind="file", roots=roots)
        if original.resolve() == path.resolve():
            raise ConfigError(f"{path}: reference must name another suite file (the original experts)")
        reference = load_suite_file(original, limit=limit, check_experts=False, roots=roots)
        if reference.task_names() != suite.task_names():
            raise ConfigError(f"{path}: reference {original} has tasks {reference.task_names()}, "
                              f"this suite {suite.task_names()}")
        suite._reference = reference
        record = path.parent / "ri.json"  # written beside the suite file by `ri --out`
        if record.is_file():
            try:
                suite.ri_record = json.loads(record.read_text())
            except ValueError:
                raise ConfigError(f"{record}: not valid JSON (the record of the RI run)") from None
    return suite
