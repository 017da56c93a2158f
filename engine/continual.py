"""Continual model merging: task orders, the step loop, the accuracy matrix and ACC/BWT/FWT.

Models arrive one at a time (docs/methods.md, continual merging). A continual method sees θ_0 once
(`init`), then for each task t in the order `step(task, θ_t, seed_images, head)` and returns the
merged model: a canonical state dict (weight-space merges) or an `nn.Module` image encoder (MINGLE,
whose routing depends on the input). After every step the merged model is evaluated on the test
sets of the tasks seen so far, which fills one row of the accuracy matrix a_j(θ_i).

The methods are the registry's continual forms (engine.methods.registry.continual_methods): each
method's own file declares its continual class beside its one-shot merge. Accuracies here are in
percent (as the paper's tables).
"""
from __future__ import annotations

import random
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .analysis.gates import gate_activations
from .errors import ConfigError
from .methods.registry import get_continual_method

StateDict = dict[str, torch.Tensor]
Head = Callable[[torch.Tensor], torch.Tensor]  # image features (N, D) -> logits (N, C)

# ---------------------------------------------------------------------------------------------
# Orders and seed sets
# ---------------------------------------------------------------------------------------------

PAPER_ORDER_SEEDS = tuple(range(42, 52))  # docs/methods.md, task orders


def task_order(tasks: Sequence[str], seed: int) -> list[str]:
    """`random.seed(s); random.shuffle(tasks)` on the canonical list, without touching global state.

    `random.Random(s)` seeds the same Mersenne Twister as `random.seed(s)`, so the permutation is
    identical to the paper's (tests check the 8-task rows, listed in docs/methods.md).
    """
    order = list(tasks)
    random.Random(seed).shuffle(order)
    return order


def select_seed_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """5 random test images per class (all of a class if it has fewer), as `select_seed_subset` (docs/methods.md, seed sets).

    Labels are used only for the stratification; the images stay in the evaluation set.
    """
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == label).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.sort(torch.cat(chosen)).values


def task_seed(seed: int, task: str) -> int:
    return (zlib.crc32(task.encode()) ^ (seed * 7919)) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# What a continual run needs from a model zoo
# ---------------------------------------------------------------------------------------------


class ContinualSource(Protocol):
    """Everything the protocol reads; every `engine.tasks.TaskSuite` (demo zoo or suite file) is one."""

    tasks: list[str]  # canonical task list, the one orders shuffle

    def theta0(self) -> StateDict: ...
    def theta(self, task: str) -> StateDict: ...
    def test_set(self, task: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...  # model-ready
    def logits_fn(self, task: str) -> Head: ...
    def expert_accuracy(self, task: str, limit: int | None = None) -> float | None: ...  # percent, for FWT
    def build_encoder(self, state: Mapping[str, torch.Tensor]) -> nn.Module: ...


# ---------------------------------------------------------------------------------------------
# Baselines: small classes with one interface
# ---------------------------------------------------------------------------------------------


class ContinualMethod(Protocol):
    name: str

    def init(self, theta0: StateDict) -> None: ...
    def step(self, task: str, theta_t: StateDict, seed_images: torch.Tensor, head: Head) -> StateDict | nn.Module: ...


def make_method(name: str, config: Any = None, encoder: Mapping | Callable | None = None,
                device: str | torch.device = "cpu"):
    """A fresh continual method from the registry. `encoder` (MINGLE) builds the vision encoder for a
    state dict: a suite's `build_encoder`, or open_clip VisionTransformer kwargs. Only MINGLE
    computes on `device` while merging; the weight-space baselines merge on the CPU (a few vector
    operations per step) and are evaluated on `device`."""
    return get_continual_method(name).make_continual(config, encoder=encoder, device=device)


def method_config(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """The validated continual Config of method `name` from a dict of field values (others default)."""
    return get_continual_method(name).continual_config(**dict(values or {}))


# ---------------------------------------------------------------------------------------------
# Evaluation and metrics
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy_pct(encoder: nn.Module, head: Head, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 128) -> float:
    """Top-1 accuracy in %, batches in test-set order (MINGLE routes per batch: docs/methods.md, MINGLE)."""
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = head(encoder(images[start:start + batch_size]))
        correct += int((logits.argmax(-1) == labels[start:start + batch_size].to(logits.device)).sum())
    return 100.0 * correct / max(len(images), 1)


def acc_bwt_fwt(matrix: Sequence[Sequence[float | None]], finetuned: Sequence[float | None] | None = None
                ) -> tuple[float, float | None, float | None]:
    """ACC, BWT, FWT from the step × task matrix (row i = after merging the i-th task; docs/methods.md, metrics).

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
                  device: str | torch.device = "cpu", limit: int | None = None) -> ContinualResult:
    """One order: merge task by task, evaluating on every task seen so far after each step.

    Test sets (at most `limit` images per task, seeded and class-stratified; seed images are drawn
    from them) are moved to `device` once; a method's merged state dict is evaluated there too.
    """
    unknown = [t for t in order if t not in source.tasks]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; the source has {', '.join(source.tasks)}")
    t_start = time.perf_counter()
    method.init(source.theta0())
    n = len(order)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    timings: dict[str, Any] = {"merge_s": [], "eval_s": []}
    device = torch.device(device)
    test_sets = {task: tuple(x.to(device) for x in source.test_set(task, limit)) for task in order}
    heads = {task: source.logits_fn(task) for task in order}
    merged = None
    for i, task in enumerate(order):
        if progress is not None:
            progress(i / n, f"step {i + 1}/{n}: merging {task}")
        images, labels = test_sets[task]
        seed_idx = select_seed_indices(labels, seeds_per_class, task_seed(seed, task))
        clock = time.perf_counter()
        merged = method.step(task, source.theta(task), images[seed_idx.to(images.device)], heads[task])
        encoder = merged if isinstance(merged, nn.Module) else source.build_encoder(merged).to(device)
        timings["merge_s"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        for j in range(i + 1):
            imgs, labs = test_sets[order[j]]
            matrix[i][j] = accuracy_pct(encoder, heads[order[j]], imgs, labs, eval_batch_size)
        timings["eval_s"].append(time.perf_counter() - clock)
        if progress is not None:
            progress((i + 1) / n, f"step {i + 1}/{n}: merged {task} and tested {i + 1} task(s)")
    finetuned = [source.expert_accuracy(t, limit) for t in order]
    acc, bwt, fwt = acc_bwt_fwt(matrix, finetuned)
    gates = None
    if gate_stats and isinstance(merged, nn.Module) and hasattr(merged, "gated"):
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
