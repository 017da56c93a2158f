"""Resolving Interference (RI): adapt each expert on unlabeled auxiliary images before any merge.

RI is a pre-merge step, not a merge operator (docs/methods.md, RI). Expert i is fine-tuned, starting
from θ_i, to minimise on auxiliary images x ∼ D_aux

    L_RI(θ̃_i) = E_x[ KL(h_i(f(x; θ_i)) ‖ h_i(f(x; θ̃_i)))                         keep the task
                    + α/(N−1) Σ_{j≠i} KL(h_j(f(x; θ_0)) ‖ h_j(f(x; θ̃_i))) ]       leave other heads alone

with every head frozen and both teachers (θ_i, θ_0) frozen. Afterwards τ̃_i = θ̃_i − θ_0 and
any merge method runs unchanged on the adapted experts: `adapt_zoo` writes them as a zoo in
the same format, so every page and every CLI command works on it.

Paper settings (ViT-B/32 on an A40; docs/methods.md, RI): α = 1, AdamW lr 1e-6, weight decay 1e-4, 2500 steps of
batch 128 on ImageNet (≈ 7 min per expert). The demo defaults here are different on purpose: the
demo zoo is a tiny ViT on 32-px images and all 8 experts must adapt in ≤ 5 min on 2 CPU cores, so
we take 150 steps of batch 64 at lr 1e-4 [inferred] on a fixed pool of 2048 auxiliary images.
Fewer, larger steps: a 100x larger LR on a model with far fewer, smaller weights; the paper's
observation that most of the ξ drop happens early (1000 of 2500 steps) is what makes a short run
meaningful. The LR was chosen from the RI loss on auxiliary data only (where it stops falling
quickly), never from task accuracy.

[inferred] choices, each an option (where the paper is silent): AdamW (torch's decoupled decay towards zero;
at lr·wd = 1e-8 per step it is negligible here, as in the paper) with constant LR starting at θ_i;
every vision-tower weight trainable; KL(teacher ‖ student) as a batch mean at temperature 1 with
the heads' logit scale (100) inside the logits; the model kept in eval mode (no dropout) while
training; θ_0's and θ_i's outputs on the fixed, seeded auxiliary pool computed once and cached
(θ_0's once for all experts).

A numerical note for α = 0: the loss starts at exactly its minimum (student = teacher), so the
gradients are float round-off, which Adam's normalisation would turn into lr-sized steps; the
expert's predictions still stay put (tests/test_ri.py checks KL < 1e-4), but `steps=0` is the
exact identity.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..analysis.interference import kl_divergence, measure_interference
from ..aux_data import aux_images
from ..checkpoints import open_clip_to_canonical
from ..errors import ConfigError
from ..evaluate import accuracy_only
from ..task_vectors import TaskVectorStack
from ..tasks import load_canonical
from .base import MethodSpec, param, validate_config
from .registry import get_method, register

Progress = Callable[[float, str], None]

# Which open_clip VisionTransformer parameters train (names without the `visual.` prefix).
TRAINABLE = {
    "all": ("*",),
    "blocks": ("transformer.resblocks.*",),
    "linear": ("transformer.resblocks.*.attn.in_proj_*", "transformer.resblocks.*.attn.out_proj.*",
               "transformer.resblocks.*.mlp.c_fc.*", "transformer.resblocks.*.mlp.c_proj.*"),
    "mlp": ("transformer.resblocks.*.mlp.*",),
    "attention": ("transformer.resblocks.*.attn.*",),
}


@dataclass(frozen=True)
class RIConfig:
    alpha: float = param(1.0, "Weight α of the interference term (match θ_0 under the other heads); 0 only keeps "
                         "the expert.", label="α", min=0.0, max=100.0, step=0.1, flag="--alpha")
    steps: int = param(150, "Optimiser steps per expert (paper: 2500 on ViT-B/32; demo: 150).", label="steps",
                       min=0, max=100000, step=10, flag="--steps")
    lr: float = param(1e-4, "AdamW learning rate, constant (paper: 1e-6 for ViT-B/32; demo: 1e-4).",
                      label="learning rate", min=0.0, max=1.0, flag="--lr")
    weight_decay: float = param(1e-4, "AdamW weight decay (paper: 1e-4).", label="weight decay", min=0.0, max=1.0,
                                flag="--weight-decay")
    batch_size: int = param(64, "Auxiliary images per step (paper: 128 for B/32; demo: 64).", label="batch",
                            min=1, max=4096, flag="--batch-size")
    trainable: str = param("all", "Which vision-tower parameters adapt: all, blocks, linear (attn+MLP "
                           "matrices), mlp or attention.", label="trainable", choices=tuple(TRAINABLE),
                           flag="--trainable")
    aux: str = param("pool", "Auxiliary images: pool (the zoo's unlabeled pretraining pool), render (random "
                     "drawings unrelated to the tasks) or noise (Gaussian).", label="auxiliary data",
                     choices=("pool", "render", "noise"), flag="--aux")
    aux_size: int = param(2048, "Distinct auxiliary images in the fixed, seeded stream (batches cycle over it).",
                          label="aux images", min=1, max=1_000_000, flag="--aux-size")
    temperature: float = param(1.0, "Softmax temperature of both KL terms (1 = plain CLIP logits at scale 100).",
                               label="temperature", min=0.01, max=100.0, flag="--temperature")
    seed: int = param(0, "Seed of the auxiliary stream and batch order (the same for every expert).",
                      label="seed", min=0, max=2**31 - 1, flag="--seed")


# --------------------------------------------------------------------------------------------
# The model: an image encoder f(x; θ) read through frozen heads h_t (docs/methods.md, heads)
# --------------------------------------------------------------------------------------------


class HeadedTower:
    """f(x; θ) plus frozen zero-shot heads: logits_t = scale · ⟨normalize(f(x)), H_t⟩ (H_t rows unit-norm).

    `encoder` is an open_clip VisionTransformer (bare, no `visual.` prefix); `heads` maps each task to
    its (C_t, d) class-embedding matrix, in task order. All heads are stacked into one matrix so one
    forward and one matmul give every head's logits.
    """

    def __init__(self, encoder: torch.nn.Module, heads: Mapping[str, torch.Tensor], logit_scale: float = 100.0):
        self.encoder = encoder
        self.tasks = list(heads)
        self.sizes = [int(heads[t].shape[0]) for t in self.tasks]
        self.head_matrix = torch.cat([F.normalize(heads[t].float(), dim=-1) for t in self.tasks]).detach()
        self.logit_scale = float(logit_scale)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """normalize(f(x; θ)) for a (B, 3, H, W) float batch."""
        return F.normalize(self.encoder(images).float(), dim=-1)

    def logits(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits from normalised embeddings, as a list in task order."""
        return list(torch.split(self.logit_scale * embeddings @ self.head_matrix.T, self.sizes, dim=-1))

    @torch.no_grad()
    def embed_all(self, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        was_training = self.encoder.training
        self.encoder.eval()
        out = torch.cat([self.embed(images[i:i + chunk]) for i in range(0, len(images), chunk)])
        self.encoder.train(was_training)
        return out

    def load(self, canonical: Mapping[str, torch.Tensor]) -> "HeadedTower":
        """Copy canonical weights (checkpoints.py naming) into the encoder, in place."""
        load_canonical(self.encoder, canonical)
        return self


def encoder_to_canonical(encoder: torch.nn.Module, like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The encoder's weights under canonical names (in `like`'s dtypes and key set when given)."""
    canonical, _ = open_clip_to_canonical({k: v.detach() for k, v in encoder.state_dict().items()})
    if like is None:
        return {k: v.clone() for k, v in canonical.items()}
    missing = sorted(set(like) - set(canonical))
    if missing:
        raise ConfigError(f"the adapted encoder has no tensor '{missing[0]}' that the expert checkpoint has")
    return {k: canonical[k].to(like[k].dtype).clone() for k in like}


def trainable_names(encoder: torch.nn.Module, which: str) -> list[str]:
    try:
        patterns = TRAINABLE[which]
    except KeyError:
        raise ConfigError(f"trainable must be one of {', '.join(TRAINABLE)}, got {which!r}") from None
    names = [n for n, _ in encoder.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ConfigError(f"trainable={which!r} selects no parameter of this encoder")
    return names


# --------------------------------------------------------------------------------------------
# The objective (docs/methods.md, RI)
# --------------------------------------------------------------------------------------------


@dataclass
class RILoss:
    total: torch.Tensor
    keep: torch.Tensor  # KL(expert ‖ student) under the expert's own head
    interference: torch.Tensor  # mean over j ≠ i of KL(pretrained ‖ student) under head j (before α)


def ri_loss(student_logits: Sequence[torch.Tensor], expert_logits: torch.Tensor,
            pretrained_logits: Sequence[torch.Tensor], own: int, alpha: float, temperature: float = 1.0) -> RILoss:
    """L_RI for one batch: student and pretrained logits under every head (task order), the expert's under its own.

    With a single task there are no other heads: the interference term is 0.
    """
    n = len(student_logits)
    if len(pretrained_logits) != n:
        raise ConfigError(f"{len(pretrained_logits)} pretrained heads for {n} student heads")
    keep = kl_divergence(expert_logits, student_logits[own], temperature=temperature)
    others = [kl_divergence(pretrained_logits[j], student_logits[j], temperature=temperature)
              for j in range(n) if j != own]
    interference = torch.stack(others).mean() if others else keep.new_zeros(())
    return RILoss(total=keep + alpha * interference, keep=keep, interference=interference)


# --------------------------------------------------------------------------------------------
# Adapting one expert
# --------------------------------------------------------------------------------------------


@dataclass
class AdaptationStats:
    task: str
    steps: int
    seconds: float
    # L_RI and its two terms over the whole auxiliary pool, at θ_i (before) and at θ̃_i (after)
    aux_loss_before: float
    aux_loss_after: float
    aux_keep_after: float
    aux_interference_before: float
    aux_interference_after: float
    history: list[float] = field(default_factory=list)  # total loss per step
    trainable_params: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@torch.no_grad()
def pool_loss(model: HeadedTower, student_embeddings: torch.Tensor, expert_embeddings: torch.Tensor,
              pretrained_embeddings: torch.Tensor, own: int, config: RIConfig) -> RILoss:
    """L_RI over a whole pool from cached normalised embeddings (a diagnostic; no gradients)."""
    expert_logits = model.logits(expert_embeddings)[own]
    return ri_loss(model.logits(student_embeddings), expert_logits, model.logits(pretrained_embeddings), own,
                   config.alpha, config.temperature)


def batch_order(n_aux: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Indices of each step's batch: seeded permutations of the pool, concatenated (same for every expert)."""
    gen = torch.Generator().manual_seed(seed + 1)
    needed = steps * batch_size
    perms = [torch.randperm(n_aux, generator=gen) for _ in range(-(-needed // n_aux))]
    order = torch.cat(perms) if perms else torch.empty(0, dtype=torch.long)
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def adapt_expert(model: HeadedTower, expert: Mapping[str, torch.Tensor], own: int, aux_images: torch.Tensor,
                 pretrained_embeddings: torch.Tensor, config: RIConfig, *, progress: Progress | None = None,
                 task: str | None = None) -> tuple[dict[str, torch.Tensor], AdaptationStats]:
    """Minimise L_RI for expert `own`, starting from its weights; returns (θ̃ canonical, stats).

    `pretrained_embeddings` are θ_0's normalised embeddings of `aux_images` (compute once with
    `model.load(θ_0).embed_all(aux_images)` and share across experts). `model` is modified.
    """
    validate_config(config)
    task = task or model.tasks[own]
    start = time.perf_counter()
    model.load(expert)
    encoder = model.encoder
    encoder.eval()  # no dropout / patch dropout: teachers and student see the same function [inferred]
    expert_embeddings = model.embed_all(aux_images)  # teacher 1, once per expert
    names = set(trainable_names(encoder, config.trainable))
    params = []
    for name, p in encoder.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history = []
    batches = batch_order(len(aux_images), config.steps, config.batch_size, config.seed)
    own_slice = slice(sum(model.sizes[:own]), sum(model.sizes[:own + 1]))
    for step, idx in enumerate(batches):
        with torch.no_grad():
            pretrained_logits = model.logits(pretrained_embeddings[idx])
            expert_logits = model.logit_scale * expert_embeddings[idx] @ model.head_matrix[own_slice].T
        student_logits = model.logits(model.embed(aux_images[idx]))
        loss = ri_loss(student_logits, expert_logits, pretrained_logits, own, config.alpha, config.temperature)
        optimiser.zero_grad(set_to_none=True)
        loss.total.backward()
        optimiser.step()
        history.append(float(loss.total.detach()))
        if progress is not None and (step % 10 == 9 or step == len(batches) - 1):
            progress((step + 1) / len(batches), f"{task}: step {step + 1}/{len(batches)}, loss {history[-1]:.4f}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    after = pool_loss(model, model.embed_all(aux_images), expert_embeddings, pretrained_embeddings, own, config)
    before = pool_loss(model, expert_embeddings, expert_embeddings, pretrained_embeddings, own, config)
    stats = AdaptationStats(
        task=task, steps=len(history), seconds=time.perf_counter() - start,
        aux_loss_before=float(before.total), aux_loss_after=float(after.total), aux_keep_after=float(after.keep),
        aux_interference_before=float(before.interference), aux_interference_after=float(after.interference),
        history=history, trainable_params=sum(p.numel() for p in params))
    return encoder_to_canonical(encoder, like=expert), stats


def adapt_experts(model: HeadedTower, pretrained: Mapping[str, torch.Tensor],
                  experts: Mapping[str, Mapping[str, torch.Tensor]], aux_images: torch.Tensor, config: RIConfig, *,
                  progress: Progress | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], list[AdaptationStats]]:
    """RI for every expert (task order of `model`): θ_0's aux embeddings once, then one adaptation each."""
    validate_config(config)
    tasks = model.tasks
    missing = [t for t in tasks if t not in experts]
    if missing:
        raise ConfigError(f"no expert checkpoint for task {missing[0]!r}")
    pretrained_embeddings = model.load(pretrained).embed_all(aux_images)
    adapted, stats = {}, []
    for i, task in enumerate(tasks):
        sub = None if progress is None else (
            lambda f, msg, i=i: progress((i + f) / len(tasks), msg))
        adapted[task], s = adapt_expert(model, experts[task], i, aux_images, pretrained_embeddings, config,
                                        progress=sub, task=task)
        stats.append(s)
    return adapted, stats


# --------------------------------------------------------------------------------------------
# A whole suite: adapt every expert, in memory (engine.adapted stores and caches the result)
# --------------------------------------------------------------------------------------------


@dataclass
class RIResult:
    """What `adapt_suite` did: which experts, with which settings, how long, and how well."""

    suite: str
    tasks: list[str]
    config: dict[str, Any]
    experts: list[AdaptationStats]
    timings: dict[str, float]
    adapted_accuracies: dict[str, float] | None = None
    xi_task_arithmetic: dict[str, Any] | None = None
    out: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "out": self.out, "tasks": self.tasks, "config": self.config,
                "experts": [{k: v for k, v in s.to_json().items() if k != "history"} for s in self.experts],
                "timings": self.timings, "xi_task_arithmetic": self.xi_task_arithmetic,
                "adapted_accuracies": self.adapted_accuracies}

    def record(self) -> dict[str, Any]:
        """What is stored beside adapted experts (config, source, statistics)."""
        return {"config": self.config, "source": self.suite, "adapted_accuracies": self.adapted_accuracies,
                "experts": [{k: v for k, v in s.to_json().items() if k != "history"} for s in self.experts]}


def suite_model(suite, device: str | torch.device = "cpu") -> HeadedTower:
    """The suite's encoder architecture with its frozen heads, ready for `load` (weights not yet loaded)."""
    return HeadedTower(suite.new_encoder().to(device), {t: h.to(device) for t, h in suite.heads().items()},
                       logit_scale=suite.logit_scale)


def aux_tensor(suite, config: RIConfig, device: str | torch.device = "cpu") -> torch.Tensor:
    """The fixed, seeded auxiliary stream as model input (the suite's own preprocessing).

    render/noise are drawn at the suite's input size, the size of its test images."""
    size = None if config.aux == "pool" else int(suite.image_size)
    images = aux_images(config.aux, config.aux_size, config.seed, suite=suite, size=size)
    return suite.model_input(images).to(device)


def adapt_suite(suite, config: RIConfig | None = None, *, device: str | torch.device = "cpu",
                measure_accuracy: bool = True, progress: Progress | None = None
                ) -> tuple[dict[str, dict[str, torch.Tensor]], RIResult]:
    """RI for every expert of `suite`: ({task: θ̃_t canonical}, what was done).

    With `measure_accuracy`, each adapted expert's accuracy on its own task is measured (the
    suite's test images under its default budget) and recorded beside the originals'.
    """
    config = config or RIConfig()
    validate_config(config)
    report = progress or (lambda f, m: None)
    timings: dict[str, float] = {}
    start_all = time.perf_counter()
    tasks = suite.task_names()
    start = time.perf_counter()
    model = suite_model(suite, device)
    aux = aux_tensor(suite, config, device)
    pretrained = suite.theta0()
    experts = {t: suite.theta(t) for t in tasks}
    timings["setup_s"] = time.perf_counter() - start
    start = time.perf_counter()
    adapted, stats = adapt_experts(model, pretrained, experts, aux, config,
                                   progress=lambda f, m: report(0.95 * f, m))
    timings["adapt_s"] = time.perf_counter() - start
    result = RIResult(suite=suite.label, tasks=tasks, config=dataclasses.asdict(config), experts=stats,
                      timings=timings)
    if measure_accuracy:
        start = time.perf_counter()
        report(0.95, "measuring the adapted experts' own accuracy")
        result.adapted_accuracies = {t: accuracy_only(suite, adapted[t], [t])[t] for t in tasks}
        timings["accuracy_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - start_all
    report(1.0, "adapted every expert")
    return adapted, result


def xi_before_after(suite, adapted_suite, method: str = "task-arithmetic", *,
                    limit: int | None = None) -> dict[str, Any]:
    """ξ (against the ORIGINAL experts) of `method` at its defaults, merging the original vs the adapted experts."""
    m = get_method(method)
    cfg = m.Config()
    out = {"method": method, "hyperparameters": dataclasses.asdict(cfg)}
    for label, s in (("before", suite), ("after", adapted_suite)):
        stack = TaskVectorStack.from_suite(s)
        merged = stack.apply(m.merge(stack, cfg))
        out[label] = measure_interference(s, merged, limit=limit).to_json()
    return out


METHOD = register(MethodSpec(
    name="ri", label="RI-adapted experts",
    summary="Resolving Interference: adapt each expert on unlabeled images before any merge.", family="pre-merge",
    Config=RIConfig))
