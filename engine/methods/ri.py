"""Resolving Interference (RI): adapt each expert on unlabeled auxiliary images before any merge.

RI is a pre-merge step, not a merge operator (methods.md §5). Expert i is fine-tuned, starting
from θ_i, to minimise on auxiliary images x ∼ D_aux

    L_RI(θ̃_i) = E_x[ KL(h_i(f(x; θ_i)) ‖ h_i(f(x; θ̃_i)))                         keep the task
                    + α/(N−1) Σ_{j≠i} KL(h_j(f(x; θ_0)) ‖ h_j(f(x; θ̃_i))) ]       leave other heads alone

with every head frozen and both teachers (θ_i, θ_0) frozen (§5.2). Afterwards τ̃_i = θ̃_i − θ_0 and
any merge method runs unchanged on the adapted experts (§5.4): `adapt_zoo` writes them as a zoo in
the same format, so every page and every CLI command works on it.

Paper settings (ViT-B/32 on an A40, §5.3): α = 1, AdamW lr 1e-6, weight decay 1e-4, 2500 steps of
batch 128 on ImageNet (≈ 7 min per expert). The demo defaults here are different on purpose: the
demo zoo is a tiny ViT on 32-px images and all 8 experts must adapt in ≤ 5 min on 2 CPU cores, so
we take 150 steps of batch 64 at lr 1e-4 [inferred] on a fixed pool of 2048 auxiliary images.
Fewer, larger steps: a 100x larger LR on a model with far fewer, smaller weights; the paper's
observation that most of the ξ drop happens early (1000 of 2500 steps) is what makes a short run
meaningful. The LR was chosen from the RI loss on auxiliary data only (where it stops falling
quickly), never from task accuracy.

[inferred] choices, each an option (§5.3 "unknown"): AdamW (torch's decoupled decay towards zero;
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
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..analysis.interference import kl_divergence
from ..errors import ConfigError
from .base import param, validate_config

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
# The model: an image encoder f(x; θ) read through frozen heads h_t (methods.md §6.4)
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


def load_canonical(encoder: torch.nn.Module, canonical: Mapping[str, torch.Tensor]) -> None:
    from ..checkpoints import canonical_to_open_clip

    state = canonical_to_open_clip(canonical)
    own = encoder.state_dict()
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def encoder_to_canonical(encoder: torch.nn.Module, like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The encoder's weights under canonical names (in `like`'s dtypes and key set when given)."""
    from ..checkpoints import open_clip_to_canonical

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
# The objective (methods.md §5.2)
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
    `model.load(θ_0).embed_all(aux_images)` and share across experts, §5.3). `model` is modified.
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
# A whole zoo: adapt every expert, write an adapted zoo in the same format (methods.md §5.4)
# --------------------------------------------------------------------------------------------

RI_MANIFEST_KEY = "ri"  # what the adapted zoo's manifest records about its making


@dataclass
class RIResult:
    """What `adapt_zoo` did: where, with which settings, how long, and ξ of TA before/after."""

    source_zoo: str
    out: str
    tasks: list[str]
    config: dict[str, Any]
    experts: list[AdaptationStats]
    timings: dict[str, float]
    xi_task_arithmetic: dict[str, Any] | None = None
    adapted_accuracies: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source_zoo": self.source_zoo, "out": self.out, "tasks": self.tasks, "config": self.config,
                "experts": [{k: v for k, v in s.to_json().items() if k != "history"} for s in self.experts],
                "timings": self.timings, "xi_task_arithmetic": self.xi_task_arithmetic,
                "adapted_accuracies": self.adapted_accuracies}


def _read_canonical(path) -> dict[str, torch.Tensor]:
    from ..checkpoints import open_checkpoint

    reader = open_checkpoint(path)
    return {name: reader.tensor(name) for name in reader.keys()}


def zoo_model(zoo, device: str | torch.device = "cpu") -> HeadedTower:
    """The zoo's encoder architecture with its frozen heads, ready for `load` (weights not yet loaded)."""
    from ..evaluate import zoo_encoder, zoo_heads

    return HeadedTower(zoo_encoder(zoo).to(device), {t: h.to(device) for t, h in zoo_heads(zoo).items()},
                       logit_scale=getattr(zoo, "logit_scale", 100.0))


def zoo_aux_tensor(zoo, config: RIConfig, device: str | torch.device = "cpu") -> torch.Tensor:
    """The fixed, seeded auxiliary stream as the model's input tensor (the zoo's own preprocessing)."""
    from ..evaluate import preprocess
    from ..zoo.aux_data import aux_images

    # render/noise are drawn at the zoo's input size (`Zoo.image_size`, the manifest's model kwargs),
    # the size of its test images and of its pool.
    size = None if config.aux == "pool" else int(zoo.image_size)
    return preprocess(zoo, aux_images(config.aux, config.aux_size, config.seed, zoo=zoo, size=size)).to(device)


def adapt_zoo(zoo, out_dir, config: RIConfig | None = None, *, device: str | torch.device = "cpu",
              overwrite: bool = False, measure_xi: bool = True, xi_max_samples: int | None = None,
              measure_accuracy: bool = True, progress: Progress | None = None) -> RIResult:
    """RI for every expert of `zoo`, written to `out_dir` as a zoo of the same format.

    The adapted zoo is a copy of the source (data, heads, θ_0, manifest) whose expert files are
    replaced by θ̃_i; its manifest records the RI config, the source zoo and per-expert statistics.
    [inferred, documented choice] The manifest keeps the ORIGINAL experts' individual accuracies for
    normalisation: RI is a means to merge the original experts better, so normalised accuracy of a
    merge of adapted experts stays comparable with one of the originals. The adapted experts' own
    accuracies are measured and recorded beside them (`ri.adapted_accuracies`).
    """
    config = config or RIConfig()
    validate_config(config)
    report = progress or (lambda f, m: None)
    timings: dict[str, float] = {}
    start_all = time.perf_counter()
    tasks = list(zoo.task_names())
    out_dir = _check_out_dir(zoo, out_dir, overwrite)

    start = time.perf_counter()
    model = zoo_model(zoo, device)
    aux = zoo_aux_tensor(zoo, config, device)
    pretrained = _read_canonical(zoo.pretrained_path)
    experts = {t: _read_canonical(zoo.expert_path(t)) for t in tasks}
    timings["setup_s"] = time.perf_counter() - start

    start = time.perf_counter()
    span = 0.8 if measure_xi else 0.95
    adapted, stats = adapt_experts(model, pretrained, experts, aux, config,
                                   progress=lambda f, m: report(span * f, m))
    timings["adapt_s"] = time.perf_counter() - start

    start = time.perf_counter()
    report(span, "writing the adapted zoo")
    result = RIResult(source_zoo=str(zoo.root), out=str(out_dir), tasks=tasks, config=dataclasses.asdict(config),
                      experts=stats, timings=timings)
    new_zoo = write_adapted_zoo(zoo, out_dir, adapted, ri_record=None, overwrite=overwrite)
    timings["write_s"] = time.perf_counter() - start

    if measure_accuracy:
        from ..evaluate import evaluate

        start = time.perf_counter()
        result.adapted_accuracies = {t: evaluate(zoo, adapted[t], tasks=[t]).per_task[t] for t in tasks}
        timings["accuracy_s"] = time.perf_counter() - start
    if measure_xi:
        start = time.perf_counter()
        report(0.9, "measuring ξ of Task Arithmetic before and after")
        result.xi_task_arithmetic = xi_before_after(zoo, new_zoo, max_samples=xi_max_samples)
        timings["xi_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - start_all
    record = {"config": result.config, "source_zoo": str(zoo.root),
              "original_accuracies": dict(getattr(zoo, "accuracies", {}) or {}),
              "adapted_accuracies": result.adapted_accuracies,
              "experts": [{k: v for k, v in s.to_json().items() if k != "history"} for s in stats]}
    write_adapted_zoo(zoo, out_dir, None, ri_record=record, overwrite=True)
    report(1.0, "done")
    return result


def _check_out_dir(zoo, out_dir, overwrite: bool):
    from pathlib import Path

    out = Path(out_dir).expanduser()
    if out.resolve() == Path(zoo.root).resolve():
        raise ConfigError(f"{out}: the adapted zoo must go to a new folder, not over the source zoo")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite")
    return out


def xi_before_after(source_zoo, adapted_zoo, method: str = "task-arithmetic", *,
                    max_samples: int | None = None) -> dict[str, Any]:
    """ξ (against the ORIGINAL experts) of `method` at its defaults, merging the original vs the adapted experts."""
    from ..analysis.interference import measure_interference
    from ..task_vectors import TaskVectorStack
    from . import get_method

    m = get_method(method)
    cfg = m.Config()
    out = {"method": method, "hyperparameters": dataclasses.asdict(cfg)}
    for label, z in (("before", source_zoo), ("after", adapted_zoo)):
        tasks = list(z.task_names())
        stack = TaskVectorStack.from_files(z.pretrained_path, [z.expert_path(t) for t in tasks], tasks)
        merged = stack.apply(m.merge(stack, cfg))
        out[label] = measure_interference(source_zoo, merged, tasks, max_samples=max_samples).to_json()
    return out


def _manifest_path(root) -> "Path":
    from pathlib import Path

    try:
        from ..zoo.manifest import MANIFEST_NAME
    except ImportError:
        MANIFEST_NAME = "zoo.json"
    return Path(root) / MANIFEST_NAME


def _write_expert_like(original_path, target_path, canonical: Mapping[str, torch.Tensor], metadata: dict) -> None:
    """Save θ̃ where the zoo expects the expert, in the original file's key layout (canonical or open_clip)."""
    from pathlib import Path

    from ..checkpoints import canonical_to_open_clip, save_safetensors

    original_path, target_path = Path(original_path), Path(target_path)
    if original_path.suffix != ".safetensors":
        raise ConfigError(f"{original_path}: RI writes adapted experts as .safetensors; this zoo stores its experts "
                          f"as {original_path.suffix}")
    from safetensors import safe_open

    with safe_open(str(original_path), framework="pt") as f:
        keys = list(f.keys())
        old_meta = f.metadata() or {}
    anchor = next((k for k in keys if k == "conv1.weight" or k.endswith(".conv1.weight")), None)
    if anchor is not None:  # an open_clip layout: keep its prefix (`visual.`, `model.visual.` or none)
        tensors = canonical_to_open_clip(canonical, prefix=anchor[: -len("conv1.weight")])
    else:
        tensors = dict(canonical)
    from ..checkpoints import METADATA_KEY

    previous = old_meta.get(METADATA_KEY)
    record = dict(metadata)
    if previous:
        record["original_metadata"] = previous
    save_safetensors(target_path, tensors, record)


def write_adapted_zoo(zoo, out_dir, adapted: Mapping[str, Mapping[str, torch.Tensor]] | None,
                      ri_record: Mapping[str, Any] | None = None, overwrite: bool = False):
    """Copy `zoo` to `out_dir`, replace its expert files by `adapted`, record `ri_record` in the manifest.

    With `adapted=None` only the manifest record is (re)written. Returns the loaded adapted zoo.
    """
    import json
    import shutil
    from pathlib import Path

    from ..zoo.manifest import load_zoo

    root, out = Path(zoo.root), Path(out_dir).expanduser()
    if adapted is not None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(root, out, dirs_exist_ok=True)
        for task, weights in adapted.items():
            original = Path(zoo.expert_path(task))
            target = out / original.resolve().relative_to(root.resolve())
            _write_expert_like(original, target, weights, {"ri": "adapted expert", "task": task,
                                                           "source": str(original)})
    if ri_record is not None:
        path = _manifest_path(out)
        manifest = json.loads(path.read_text())
        manifest[RI_MANIFEST_KEY] = dict(ri_record)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
        tmp.replace(path)
    return load_zoo(out)


def ri_record(zoo) -> dict[str, Any] | None:
    """The RI record of an adapted zoo's manifest (config, source zoo, statistics), or None for a plain zoo."""
    import json

    record = getattr(zoo, "manifest", None)
    if isinstance(record, Mapping) and RI_MANIFEST_KEY in record:
        return dict(record[RI_MANIFEST_KEY])
    path = _manifest_path(zoo.root)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get(RI_MANIFEST_KEY)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# A cache of adapted zoos (the app's "RI-adapted experts" switch)
# --------------------------------------------------------------------------------------------

def adapted_zoo_dir(zoo, config: RIConfig | None = None) -> "Path":
    """Where the RI-adapted copy of `zoo` for `config` is kept: a sibling folder `<zoo>-ri-<hash>`.

    The hash covers the RI config and the source zoo's content hashes (zoo.json `content_sha256`),
    so a rebuilt zoo or other RI settings get their own folder and a stale copy is never reused.
    """
    import hashlib
    import json
    from pathlib import Path

    config = config or RIConfig()
    identity = {"config": dataclasses.asdict(config),
                "zoo": (getattr(zoo, "manifest", None) or {}).get("content_sha256") or str(zoo.root)}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    root = Path(zoo.root)
    return root.parent / f"{root.name}-ri-{digest}"


def cached_adapted_zoo(zoo, config: RIConfig | None = None):
    """The adapted zoo for `config` when it has been built (its manifest carries the RI record), else None."""
    from ..zoo.manifest import load_zoo

    out = adapted_zoo_dir(zoo, config)
    if not _manifest_path(out).is_file():
        return None
    adapted = load_zoo(out)
    return adapted if ri_record(adapted) is not None else None  # no record: a run stopped half-way


def ensure_adapted_zoo(zoo, config: RIConfig | None = None, *, device: str | torch.device = "cpu",
                       progress: Progress | None = None):
    """The RI-adapted zoo for `config`, adapting the experts first when no finished copy exists.

    The run writes into a temporary sibling folder that is renamed into place only at the end, so an
    interrupted or failed run leaves no half-written zoo behind (and an earlier copy stays intact).
    ξ is not measured here (callers measure what they show).
    """
    import shutil
    import tempfile

    config = config or RIConfig()
    validate_config(config)
    found = cached_adapted_zoo(zoo, config)
    if found is not None:
        return found
    out = adapted_zoo_dir(zoo, config)
    tmp = tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent)
    try:
        adapt_zoo(zoo, tmp, config, device=device, overwrite=True, measure_xi=False, measure_accuracy=True,
                  progress=progress)
        if out.exists():  # a leftover without a record (checked above): replace it
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from ..zoo.manifest import load_zoo

    return load_zoo(out)
