"""Task vectors: tau_t = theta_t - theta_0, all T of them held in one (T, D) buffer.

One contiguous buffer (rather than T state dicts) is what makes the merge kernels fast and lean:
each tensor of each task is a view into row t at the tensor's offset, a whole-model trim is a pass
over one row, and no method ever has to stack or concatenate. The pretrained weights theta_0 stay
beside it, so `apply(delta)` gives back a full state dict theta_0 + delta.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .checkpoints import open_checkpoint, validate_compatible
from .errors import CheckpointError, ConfigError

Progress = Callable[[float, str], None]


def _select_names(names: Iterable[str], include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
    """Tensor names kept by glob filters (default: every name, as the official TIES code)."""
    chosen = []
    for name in sorted(names):
        if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        chosen.append(name)
    return chosen


def _check_finite(label: str, name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{label}: tensor '{name}' contains NaN or Inf values; the checkpoint is corrupt "
                              "or was saved mid-divergence")


@dataclass
class TaskVectorStack:
    """T task vectors over the same D merge-eligible entries, plus theta_0.

    data[t, offsets[i]:offsets[i+1]] is task t's delta for tensor names[i], flattened.
    """

    tasks: list[str]
    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: np.ndarray  # int64, len(names) + 1
    data: torch.Tensor  # (T, D)
    base: dict[str, torch.Tensor]  # theta_0, every tensor (also those not merged), original dtypes
    sources: dict = field(default_factory=dict)  # provenance: paths (and hashes once computed)
    kept_from_base: list[str] = field(default_factory=list)  # θ_0 tensors no expert has: never merged
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_state_dicts(cls, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                         tasks: Sequence[str] | None = None, *, include: Sequence[str] | None = None,
                         exclude: Sequence[str] | None = None, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, labels: Sequence[str] | None = None) -> "TaskVectorStack":
        """Build from in-memory state dicts (same names and shapes; checked here)."""
        labels = list(labels or [f"expert {i + 1}" for i in range(len(experts))])
        for label, expert in zip(labels, experts):
            for name, tensor in base.items():
                if name not in expert:
                    raise CheckpointError(f"{label}: is missing tensor '{name}' present in the pretrained model")
                if tuple(expert[name].shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{label}: tensor '{name}' has shape {tuple(expert[name].shape)} but the "
                                          f"pretrained model has {tuple(tensor.shape)}")
            extra = sorted(set(expert) - set(base))
            if extra:
                raise CheckpointError(f"{label}: has extra tensor '{extra[0]}' not in the pretrained model")
        return cls._build(base.keys(), lambda name: base[name], [(lambda name, e=e: e[name]) for e in experts],
                          tasks, include, exclude, device, dtype, labels=labels, base_label="pretrained model")

    @classmethod
    def from_files(cls, base_path: str | Path, expert_paths: Sequence[str | Path], tasks: Sequence[str] | None = None,
                   *, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   progress: Progress | None = None) -> "TaskVectorStack":
        """Read checkpoints tensor by tensor (memory-mapped) after validating them against each other."""
        if not expert_paths:
            raise ConfigError("no expert checkpoints given: a merge needs at least one fine-tuned model")
        base = open_checkpoint(base_path)
        experts = [open_checkpoint(p) for p in expert_paths]
        kept = validate_compatible([base, *experts])
        stack = cls._build(base.keys(), base.tensor, [e.tensor for e in experts], tasks, include,
                           [*(exclude or []), *kept], device, dtype, labels=[str(p) for p in expert_paths],
                           base_label=str(base_path), progress=progress)
        stack.sources = {"base": str(base_path), "experts": [str(p) for p in expert_paths],
                         "readers": [base, *experts]}
        stack.kept_from_base = kept
        return stack

    @classmethod
    def from_suite(cls, suite, tasks: Sequence[str] | None = None, **options) -> "TaskVectorStack":
        """The task vectors of a suite's experts (all tasks, or `tasks` in that order)."""
        tasks = list(tasks) if tasks else suite.task_names()
        return cls.from_files(suite.pretrained_path, [suite.expert_path(t) for t in tasks], tasks, **options)

    @classmethod
    def _build(cls, all_names, read_base, read_experts, tasks, include, exclude, device, dtype, *, labels,
               base_label, progress: Progress | None = None) -> "TaskVectorStack":
        n_tasks = len(read_experts)
        tasks = list(tasks) if tasks is not None else [f"task{i + 1}" for i in range(n_tasks)]
        if len(tasks) != n_tasks:
            raise ConfigError(f"{len(tasks)} task names for {n_tasks} expert checkpoints")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"task names must be unique, got {tasks}")
        device = torch.device(device)
        base: dict[str, torch.Tensor] = {}
        for name in sorted(all_names):
            base[name] = read_base(name)
            if base[name].is_floating_point():
                _check_finite(base_label, name, base[name])
        floating = [n for n in base if base[n].is_floating_point()]
        names = _select_names(floating, include, exclude)
        if not names:
            raise ConfigError("the tensor filters leave no floating-point tensor to merge")
        shapes = [tuple(base[n].shape) for n in names]
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([int(np.prod(s)) for s in shapes])
        data = torch.empty((n_tasks, int(offsets[-1])), dtype=dtype, device=device)
        for i, name in enumerate(names):
            theta0 = base[name].to(device=device, dtype=torch.float32).reshape(-1)
            for t, read in enumerate(read_experts):
                theta_t = read(name)
                _check_finite(labels[t], name, theta_t)
                data[t, offsets[i]:offsets[i + 1]] = theta_t.to(device=device, dtype=torch.float32).reshape(-1) - theta0
            if progress is not None:
                progress((i + 1) / len(names), f"reading {name}")
        return cls(tasks=tasks, names=names, shapes=shapes, offsets=offsets, data=data, base=base)

    # ---- the algebra ------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """D: merge-eligible entries per task vector."""
        return int(self.offsets[-1])

    @property
    def device(self) -> torch.device:
        return self.data.device

    def index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ConfigError(f"unknown task {task!r}; known: {', '.join(self.tasks)}") from None

    def tensor(self, task: str | int, name: str) -> torch.Tensor:
        """Task t's delta for one tensor, as a view in the tensor's shape."""
        t = task if isinstance(task, int) else self.index(task)
        i = self.names.index(name)
        return self.data[t, self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])

    def subset(self, tasks: Sequence[str]) -> "TaskVectorStack":
        """The stack restricted to some tasks, in the given order (copies only the chosen rows)."""
        if not tasks:
            raise ConfigError("choose at least one task to merge")
        rows = [self.index(t) for t in tasks]
        if rows == list(range(len(self.tasks))):
            return self
        return TaskVectorStack(tasks=list(tasks), names=self.names, shapes=self.shapes, offsets=self.offsets,
                               data=self.data[rows].contiguous(), base=self.base, sources=self.sources,
                               kept_from_base=self.kept_from_base)

    def tensor_slices(self) -> Iterable[tuple[str, tuple[int, ...], slice]]:
        for i, name in enumerate(self.names):
            yield name, self.shapes[i], slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def apply(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta_0 + delta as a state dict (CPU, the pretrained dtypes); untouched tensors are theta_0's."""
        if delta.shape != (self.numel,):
            raise ConfigError(f"merged task vector has shape {tuple(delta.shape)}, expected ({self.numel},)")
        merged = dict(self.base)
        delta = delta.detach().to("cpu", torch.float32)
        for name, shape, span in self.tensor_slices():
            theta0 = self.base[name]
            merged[name] = (theta0.float() + delta[span].view(shape)).to(theta0.dtype)
        return merged

    def memo(self, key, compute):
        """Cache a derived quantity (e.g. trim thresholds) for the life of this immutable stack."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]
