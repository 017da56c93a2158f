"""Continual model merging: task orders, the step loop, the accuracy matrix and ACC/BWT/FWT.

Models arrive one at a time (methods.md §4.1). A continual method sees θ_0 once (`init`), then for
each task t in the order `step(task, θ_t, seed_images, head)` and returns the merged model: a
canonical state dict (static merges) or an `nn.Module` image encoder (MINGLE, whose routing
depends on the input). After every step the merged model is evaluated on the full test sets of the
tasks seen so far (§4.10), which fills one row of the accuracy matrix a_j(θ_i).

Methods (registry `CONTINUAL_METHODS`, each a small class):

| name            | step t                                                                   | source            |
|-----------------|--------------------------------------------------------------------------|-------------------|
| average         | θ̄_t = θ̄_{t−1} + (θ_t − θ̄_{t−1}) / t                                      | §2                |
| task-arithmetic | θ_t = θ_{t−1} + λ τ_t (λ 0.3)                                            | §2                |
| ties            | τ_m ← τ_m + λ·TIES([τ_m, τ_t]) (top 20 %, disjoint sum, λ 0.3)           | §2, FusionBench   |
| magmax          | M ← per entry the larger-|·| of (M, τ_t), new wins ties; θ = θ_0 + λ M    | §2 (MagMax-IND)   |
| opcm            | engine/methods/opcm.py                                                   | arXiv 2501.09522  |
| mingle          | engine/methods/mingle.py                                                 | §4                |

Accuracies here are in percent (as the paper's tables).
"""
from __future__ import annotations

import dataclasses
import random
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .methods.base import param, validate_config
from .methods.mingle import MingleConfig

StateDict = dict[str, torch.Tensor]
Head = Callable[[torch.Tensor], torch.Tensor]  # image features (N, D) -> logits (N, C)

# ---------------------------------------------------------------------------------------------
# Orders and seed sets
# ---------------------------------------------------------------------------------------------

PAPER_ORDER_SEEDS = tuple(range(42, 52))  # methods.md §4.11


def task_order(tasks: Sequence[str], seed: int) -> list[str]:
    """`random.seed(s); random.shuffle(tasks)` on the canonical list, without touching global state.

    `random.Random(s)` seeds the same Mersenne Twister as `random.seed(s)`, so the permutation is
    identical to the paper's (tests check the 8-task rows of methods.md §4.11).
    """
    order = list(tasks)
    random.Random(seed).shuffle(order)
    return order


def select_seed_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """5 random test images per class (all of a class if it has fewer), as `select_seed_subset` (§4.1).

    Labels are used only for the stratification; the images stay in the evaluation set.
    """
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == label).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.sort(torch.cat(chosen)).values


def _task_seed(seed: int, task: str) -> int:
    return (zlib.crc32(task.encode()) ^ (seed * 7919)) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# What a continual run needs from a model zoo
# ---------------------------------------------------------------------------------------------


class ContinualSource(Protocol):
    """Everything the protocol reads: an adapter over the demo zoo (`ZooSource`) or anything else."""

    tasks: list[str]  # canonical task list, the one orders shuffle
    model_config: dict  # open_clip VisionTransformer kwargs

    def theta0(self) -> StateDict: ...
    def theta(self, task: str) -> StateDict: ...
    def test_set(self, task: str) -> tuple[torch.Tensor, torch.Tensor]: ...  # (model-ready images, labels)
    def head(self, task: str) -> Head: ...
    def finetuned_accuracy(self, task: str) -> float | None: ...  # percent, for FWT


# ---------------------------------------------------------------------------------------------
# Baselines: small classes with one interface
# ---------------------------------------------------------------------------------------------


class ContinualMethod(Protocol):
    name: str

    def init(self, theta0: StateDict) -> None: ...
    def step(self, task: str, theta_t: StateDict, seed_images: torch.Tensor, head: Head) -> StateDict | nn.Module: ...


def _floating(state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, v in state.items() if v.is_floating_point())


@dataclass(frozen=True)
class AverageConfig:
    pass


class ContinualAverage:
    """SWA: the running mean of the θ_t seen so far (methods.md §2)."""

    name = "average"
    Config = AverageConfig

    def __init__(self, config: AverageConfig | None = None) -> None:
        self.config = config or AverageConfig()

    def init(self, theta0: StateDict) -> None:
        self.theta0, self.merged, self.count = dict(theta0), None, 0

    def step(self, task, theta_t, seed_images=None, head=None) -> StateDict:
        self.count += 1
        if self.merged is None:
            self.merged = {k: v.float().clone() if v.is_floating_point() else v for k, v in theta_t.items()}
        else:
            for k in _floating(self.merged):
                self.merged[k] += (theta_t[k].float() - self.merged[k]) / self.count
        return self.merged


@dataclass(frozen=True)
class TaskArithmeticConfig:
    lam: float = param(0.3, "Scaling λ of each task vector as it arrives (0.3 for 8 tasks, 0.1 for 14/20).",
                       label="λ", min=0.0, max=3.0, step=0.05, flag="--lam")


class ContinualTaskArithmetic:
    """θ_t = θ_{t−1} + λ τ_t, so θ_T = θ_0 + λ Σ τ_t (methods.md §2)."""

    name = "task-arithmetic"
    Config = TaskArithmeticConfig

    def __init__(self, config: TaskArithmeticConfig | None = None) -> None:
        self.config = config or TaskArithmeticConfig()
        validate_config(self.config)

    def init(self, theta0: StateDict) -> None:
        self.theta0 = dict(theta0)
        self.merged = {k: v.float().clone() if v.is_floating_point() else v for k, v in theta0.items()}

    def step(self, task, theta_t, seed_images=None, head=None) -> StateDict:
        for k in _floating(self.merged):
            self.merged[k] += self.config.lam * (theta_t[k].float() - self.theta0[k].float())
        return self.merged


def _flatten(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[n].float().reshape(-1) for n in names])


def _unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor], names: Sequence[str]) -> StateDict:
    out, offset = {}, 0
    for n in names:
        size = like[n].numel()
        out[n] = vector[offset:offset + size].view(like[n].shape)
        offset += size
    return out


@dataclass(frozen=True)
class ContinualTiesConfig:
    k: float = param(20.0, "TIES trim: each of the two rows keeps its top-k % magnitudes (global trim).",
                     label="trim k (%)", min=0.0, max=100.0, step=1.0, flag="--k")
    lam: float = param(0.3, "Scaling λ (0.3 for 8 tasks, 0.1 for 14/20).", label="λ", min=0.0, max=3.0, step=0.05,
                       flag="--lam")
    disjoint: str = param("sum", "Disjoint merge of the two rows: sum (FusionBench) or mean (paper).",
                          label="disjoint merge", choices=("sum", "mean"), flag="--disjoint")
    accumulate: bool = param(True, "FusionBench's ContinualTiesMergingForCLIP: merged += λ·TIES(merged − θ_0, τ_t), "
                             "the previous vector taken after λ and counted again; off: merged = θ_0 + λ·TIES(R, τ_t) "
                             "with R the unscaled running TIES vector.", label="accumulate (official code)",
                             flag="--accumulate")


class ContinualTies:
    """Two-row TIES per step (methods.md §2).

    methods.md §2 leaves open whether the stored previous vector is taken before or after λ. The
    official class (FusionBench `ContinualTiesMergingForCLIP`, read for this) takes it *after* λ
    (merged − θ_0) and *adds* λ·TIES([merged − θ_0, τ_t]) to the merged model, so the previous vector
    enters twice; at t = 1 the merged model is θ_0 + λ τ_1. That is the default (`accumulate`); the
    alternative keeps an unscaled running vector R_t = TIES(R_{t−1}, τ_t) and sets θ = θ_0 + λ R_t.
    """

    name = "ties"
    Config = ContinualTiesConfig

    def __init__(self, config: ContinualTiesConfig | None = None) -> None:
        self.config = config or ContinualTiesConfig()
        validate_config(self.config)

    def init(self, theta0: StateDict) -> None:
        self.theta0 = dict(theta0)
        self.names = _floating(theta0)
        self.base = _flatten(theta0, self.names)
        self.vector: torch.Tensor | None = None  # merged − θ_0 (accumulate) or R (replace)

    def _ties(self, rows: torch.Tensor) -> torch.Tensor:
        from .methods import get_method
        from .task_vectors import TaskVectorStack

        shapes = [tuple(self.theta0[n].shape) for n in self.names]
        offsets = np.zeros(len(shapes) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([int(np.prod(s)) for s in shapes])
        stack = TaskVectorStack(tasks=["previous", "new"], names=self.names, shapes=shapes, offsets=offsets,
                                data=rows.contiguous(), base=self.theta0)
        ties = get_method("ties")
        return ties.merge(stack, ties.config(k=self.config.k, lam=1.0, disjoint=self.config.disjoint))

    def step(self, task, theta_t, seed_images=None, head=None) -> StateDict:
        tau = _flatten(theta_t, self.names) - self.base
        lam = self.config.lam
        if self.vector is None:
            self.vector = lam * tau if self.config.accumulate else tau
        elif self.config.accumulate:
            self.vector = self.vector + lam * self._ties(torch.stack([self.vector, tau]))
        else:
            self.vector = self._ties(torch.stack([self.vector, tau]))
        merged_tv = self.vector if self.config.accumulate else lam * self.vector
        merged = dict(self.theta0)
        for n, d in _unflatten(merged_tv, self.theta0, self.names).items():
            merged[n] = self.theta0[n].float() + d
        return merged


def continual_methods() -> dict[str, type]:
    from .methods.magmax import ContinualMagMax
    from .methods.opcm import ContinualOPCM

    return {"mingle": MingleContinual, "average": ContinualAverage, "task-arithmetic": ContinualTaskArithmetic,
            "ties": ContinualTies, "magmax": ContinualMagMax, "opcm": ContinualOPCM}


class MingleContinual:
    """Adapter: engine.methods.mingle.Mingle behind the continual interface."""

    name = "mingle"
    Config = MingleConfig

    def __init__(self, config=None, model_config: Mapping | None = None, device: str | torch.device = "cpu") -> None:
        from .methods.mingle import Mingle

        self.config = config or MingleConfig()
        if model_config is None:
            raise ConfigError("MINGLE needs the zoo's model_config (open_clip VisionTransformer kwargs)")
        self.mingle = Mingle(model_config, self.config, device=device)

    def init(self, theta0: StateDict) -> None:
        self.mingle.init(theta0)

    def step(self, task, theta_t, seed_images, head) -> nn.Module:
        return self.mingle.step(task, theta_t, seed_images, head)


# Display names, as the MINGLE paper's tables call the baselines.
CONTINUAL_LABELS = {"mingle": "MINGLE", "average": "C-Averaging", "task-arithmetic": "C-Task Arithmetic",
                    "ties": "C-TIES", "magmax": "MagMax-IND", "opcm": "OPCM"}


def _method_class(name: str) -> type:
    methods = continual_methods()
    if name not in methods:
        raise ConfigError(f"unknown continual method {name!r}: use one of {', '.join(methods)}")
    return methods[name]


def method_config(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """The validated Config of continual method `name` from a dict of field values (others default)."""
    config_cls = _method_class(name).Config
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values or {}) - fields)
    if unknown:
        raise ConfigError(f"{CONTINUAL_LABELS.get(name, name)} has no setting {unknown[0]!r}"
                          + (f"; it has {', '.join(sorted(fields))}" if fields else ""))
    config = config_cls(**dict(values or {}))
    validate_config(config)
    return config


def make_method(name: str, config: Any = None, model_config: Mapping | None = None,
                device: str | torch.device = "cpu"):
    """A fresh continual method. Only MINGLE computes on `device` while merging; the weight-space
    baselines merge on the CPU (a few vector operations per step) and are evaluated on `device`."""
    cls = _method_class(name)
    if name == "mingle":
        return MingleContinual(config, model_config, device=device)
    return cls(config)


# ---------------------------------------------------------------------------------------------
# Evaluation and metrics
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy_pct(encoder: nn.Module, head: Head, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 128) -> float:
    """Top-1 accuracy in %, batches in test-set order (MINGLE routes per batch: §4.4)."""
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = head(encoder(images[start:start + batch_size]))
        correct += int((logits.argmax(-1) == labels[start:start + batch_size].to(logits.device)).sum())
    return 100.0 * correct / max(len(images), 1)


def acc_bwt_fwt(matrix: Sequence[Sequence[float | None]], finetuned: Sequence[float | None] | None = None
                ) -> tuple[float, float | None, float | None]:
    """ACC, BWT, FWT from the step × task matrix (row i = after merging the i-th task; methods.md §4.10).

    ACC = mean_i a_i(θ_T); BWT = mean_{i<T} [a_i(θ_T) − a_i(θ_i)] (None for T = 1);
    FWT = mean_t [a_t(θ_t) − ā_t] with ā_t the fine-tuned accuracy (None when unknown).
    """
    t = len(matrix)
    last = matrix[-1]
    acc = float(np.mean([last[i] for i in range(t)]))
    bwt = float(np.mean([last[i] - matrix[i][i] for i in range(t - 1)])) if t > 1 else None
    fwt = None
    if finetuned is not None and all(f is not None for f in finetuned):
        fwt = float(np.mean([matrix[i][i] - finetuned[i] for i in range(t)]))
    return acc, bwt, fwt


@dataclass
class ContinualResult:
    method: str
    config: dict
    order: list[str]
    acc_matrix: list[list[float | None]]  # [step][task in merge order], %, None for unseen
    ACC: float
    BWT: float | None
    FWT: float | None
    timings: dict
    gates: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def run_continual(source: ContinualSource, method, order: Sequence[str], *, seeds_per_class: int = 5,
                  seed: int = 0, eval_batch_size: int = 128, gate_stats: bool = False,
                  progress: Callable[[float, str], None] | None = None,
                  device: str | torch.device = "cpu") -> ContinualResult:
    """One order: merge task by task, evaluating on every task seen so far after each step.

    Test sets are moved to `device` once; a method's merged state dict is evaluated there too.
    """
    from .methods.mingle import build_encoder

    unknown = [t for t in order if t not in source.tasks]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; the zoo has {', '.join(source.tasks)}")
    t_start = time.perf_counter()
    method.init(source.theta0())
    n = len(order)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    timings: dict[str, Any] = {"merge_s": [], "eval_s": []}
    device = torch.device(device)
    test_sets = {task: tuple(x.to(device) for x in source.test_set(task)) for task in order}
    heads = {task: source.head(task) for task in order}
    merged = None
    for i, task in enumerate(order):
        if progress is not None:
            progress(i / n, f"step {i + 1}/{n}: merging {task}")
        images, labels = test_sets[task]
        seed_idx = select_seed_indices(labels, seeds_per_class, _task_seed(seed, task))
        clock = time.perf_counter()
        merged = method.step(task, source.theta(task), images[seed_idx.to(images.device)], heads[task])
        encoder = merged if isinstance(merged, nn.Module) else build_encoder(source.model_config, merged).to(device)
        timings["merge_s"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        for j in range(i + 1):
            imgs, labs = test_sets[order[j]]
            matrix[i][j] = accuracy_pct(encoder, heads[order[j]], imgs, labs, eval_batch_size)
        timings["eval_s"].append(time.perf_counter() - clock)
        if progress is not None:
            progress((i + 1) / n, f"step {i + 1}/{n}: merged {task} and tested {i + 1} task(s)")
    finetuned = [source.finetuned_accuracy(t) for t in order]
    acc, bwt, fwt = acc_bwt_fwt(matrix, finetuned)
    gates = None
    if gate_stats and isinstance(merged, nn.Module) and hasattr(merged, "gated"):
        from .analysis.gates import gate_activations

        clock = time.perf_counter()
        gates = gate_activations(merged, {t: test_sets[t][0] for t in order}, gate_tasks=order).to_json()
        timings["gates_s"] = time.perf_counter() - clock
    timings["merge_total_s"] = float(sum(timings["merge_s"]))
    timings["eval_total_s"] = float(sum(timings["eval_s"]))
    timings["total_s"] = time.perf_counter() - t_start
    config = getattr(method, "config", None)
    config_json = asdict(config) if config is not None and hasattr(config, "__dataclass_fields__") else {}
    return ContinualResult(method=method.name, config=config_json, order=list(order), acc_matrix=matrix, ACC=acc,
                           BWT=bwt, FWT=fwt, timings=timings, gates=gates)


def summarize(results: Sequence[ContinualResult]) -> dict:
    """Mean ± std over orders (population std, np.std, as one would compute over 10 fixed orders)."""

    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}

    return {"ACC": stats([r.ACC for r in results]), "BWT": stats([r.BWT for r in results]),
            "FWT": stats([r.FWT for r in results]),
            "merge_total_s": stats([r.timings["merge_total_s"] for r in results])}


def run_orders(source: ContinualSource, make: Callable[[], Any], seeds: Sequence[int], **kwargs) -> dict:
    """Several orders (s = 42… as in the paper); `make()` builds a fresh method per order."""
    results = [run_continual(source, make(), task_order(source.tasks, s), **kwargs) for s in seeds]
    return {"orders": {str(s): r.to_json() for s, r in zip(seeds, results)}, "summary": summarize(results)}


# ---------------------------------------------------------------------------------------------
# The demo zoo as a ContinualSource
# ---------------------------------------------------------------------------------------------


class ZooSource:
    """Adapter over engine.zoo.manifest / engine.evaluate: checkpoints, test sets, heads, fine-tuned accuracy.

    Test sets are loaded once and kept preprocessed (model-ready float tensors); heads give logits at
    the zoo's logit scale (100) on L2-normalised features, as every zero-shot CLIP head (§6.4).
    """

    def __init__(self, zoo, tasks: Sequence[str] | None = None) -> None:
        self.zoo = zoo
        names = list(zoo.task_names())
        if tasks:
            unknown = [t for t in tasks if t not in names]
            if unknown:
                raise ConfigError(f"unknown task {unknown[0]!r}; the zoo has {', '.join(names)}")
            names = [t for t in names if t in tasks]  # the canonical order is what orders shuffle
        self.tasks = names
        # zoo.json's "model" entry is {"library", "class", "kwargs", "preprocess", ...}; the protocol
        # wants the VisionTransformer kwargs themselves.
        self.model_config = dict(zoo.model_config["kwargs"])
        self._tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._heads: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_dir(cls, path, tasks: Sequence[str] | None = None) -> "ZooSource":
        try:
            from .zoo.manifest import load_zoo
        except ModuleNotFoundError as exc:  # the zoo issue has not landed in this checkout
            raise ConfigError(f"cannot read zoo {path}: this checkout has no engine.zoo.manifest ({exc.name})") from exc
        return cls(load_zoo(path), tasks)

    @staticmethod
    def _read(path) -> StateDict:
        from .checkpoints import open_checkpoint

        reader = open_checkpoint(path)
        return {name: reader.tensor(name).float() if reader.tensor(name).is_floating_point() else reader.tensor(name)
                for name in reader.keys()}

    def theta0(self) -> StateDict:
        return self._read(self.zoo.pretrained_path)

    def theta(self, task: str) -> StateDict:
        return self._read(self.zoo.expert_path(task))

    def test_set(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """engine.evaluate.load_test_set: (preprocessed float [N, 3, H, W], int64 labels [N]), cached on CPU."""
        if task not in self._tests:
            from . import evaluate

            images, labels = evaluate.load_test_set(self.zoo, task, device="cpu")
            self._tests[task] = (images.float(), labels.long())
        return self._tests[task]

    def head(self, task: str) -> Head:
        """engine.evaluate.zoo_heads rows (unit norm, [classes, D]) at the zoo's logit scale (100)."""
        from . import evaluate

        if self._heads is None:
            self._heads = {t: h.float() for t, h in evaluate.zoo_heads(self.zoo).items()}
        weights = torch.nn.functional.normalize(self._heads[task], dim=-1)
        scale = float(self.zoo.logit_scale)
        # `.to` is free when the features are on the CPU and copies a small (classes × D) matrix on a GPU.
        return lambda features: scale * torch.nn.functional.normalize(features, dim=-1) @ weights.to(features.device).T

    def finetuned_accuracy(self, task: str) -> float | None:
        """The expert's own accuracy in % from the manifest (None while the zoo is being measured)."""
        value = self.zoo.finetuned_accuracy(task)
        return None if value is None else float(value)
