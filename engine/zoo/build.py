"""Build the demo zoo: pretrain a tiny CLIP vision tower, fine-tune one expert per task, measure.

The recipe is the TIES / MINGLE setting in miniature (docs/methods.md; the search behind it: docs/zoo-recipe.md):

1. **Pretraining ("CLIP").** An open_clip `VisionTransformer` (ViT-B/32's code path and parameter
   names; 32x32 input, 8x8 patches, 17 tokens) learns from a generic pool of photo crops and
   drawings (tasks.py `render_pool`), each with a one-word "caption" (its subject). As in CLIP the
   image embedding is matched against caption embeddings by scaled cosine similarity; with
   one-word captions the text tower is just an embedding table. Two standard initialisations make
   a ViT learn in a few CPU minutes: whitened-PCA patch filters from pool patches, and mimetic
   self-attention (Trockman & Kolter 2023: W_q W_k^T ~ I, W_v W_o ~ -I).
2. **Zero-shot heads.** CLIP classifies with text embeddings of class prompts. Our analogue of a
   prompt is a canonical, clean rendering of the class (tasks.py `prototype_images`, several
   "templates" per class); a head row is the L2-normalised mean of the pretrained tower's
   normalised embeddings of those renders (as FusionBench averages normalised template embeddings). Logits use CLIP's logit scale of 100. Heads are frozen for good.
3. **Experts.** Each task fine-tunes the whole vision tower from theta_0 with its head frozen
   (cross-entropy on scaled cosine), as the task_vectors / FusionBench checkpoints were, plus one
   term the big CLIP does not need: the expert's normalised embeddings of unlabeled pool images are
   held near theta_0's (weight `finetune_anchor`). A 0.2 M-parameter tower is not weight-
   disentangled by itself (a task vector changes its function on every input); this term makes
   each expert change the function mainly on its own task's inputs, as a pretrained CLIP's task
   vectors do. A second term (weight `finetune_partial`) asks the partial expert
   theta_0 + s * (theta - theta_0), s in [1/8, 1], to fit the task too, so each task vector already
   works at a fraction of its length, as a large CLIP's do: that is what makes averaging eight of
   them worthwhile. Each weight also decays toward theta_0 (`finetune_decay_to_start`), so a task
   vector keeps what its task consistently asks for, and each expert sees 32,000 renders of its
   task (with 8,000 the experts overfit: training accuracy 83-98 %, test 69-88 %).
   docs/zoo-recipe.md records the search that led here.
4. **Measurements.** Pretrained, individual, and the merges the papers compare (simple averaging,
   Task Arithmetic lambda 0.3, TIES k 20 lambda 1 mean) through the engine's own merge methods and
   `engine.evaluate`; stored in zoo.json. Whatever ordering comes out is reported as measured.

Determinism: every random draw comes from a generator seeded by (seed, purpose); training runs with
`torch.use_deterministic_algorithms` and fixed thread counts (2 for pretraining, 1 per expert, so
experts can train in parallel worker processes without changing a bit), so the same seed gives
the same bytes on the same kind of CPU.

Time: pretraining keeps one of two cores busy whatever its thread count, so a low-priority process
renders the tasks' images meanwhile, and each expert job takes its task's images from it (or renders
them itself, for the tasks it did not reach): same pixels, same bits, about a minute less on 2
cores (benchmarks/zoo_build_stages.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy_file

from ..checkpoints import save_safetensors
from ..errors import MergeExplorerError
from ..evaluate import CLIP_MEAN, CLIP_STD, evaluate
from ..methods import get_method
from ..task_vectors import TaskVectorStack
from ..tasks import vision_tower
from . import tasks as task_defs
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Zoo,
    ZooTask,
    default_zoo_dir,
    load_zoo,
    read_manifest,
    zoo_from_manifest,
)
from .suite import ZooSuite

# Bump whenever anything that changes the zoo's contents changes (renderers, recipe, code paths):
# `zoo build` rebuilds a zoo whose manifest records another version.
RECIPE_VERSION = "2026.11.30-5"
DEFAULT_SEED = 0

Progress = Callable[[float, str], None]

FINETUNE_THREADS = 1  # per expert; experts train in parallel processes
MODEL_KWARGS = dict(image_size=task_defs.IMAGE_SIZE, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=4.0,
                    output_dim=64)
LOGIT_SCALE = 100.0  # CLIP's exp(logit_scale) (docs/methods.md, zero-shot heads)


@dataclass(frozen=True)
class Recipe:
    tasks: tuple[str, ...]
    n_train: int  # rendered per task at build time (not stored)
    n_test: int  # stored per task
    pool_size: int  # pretraining pool rendered at build time
    pool_stored: int  # of which stored in the zoo (unlabeled auxiliary data)
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    pretrain_weight_decay: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    finetune_weight_decay: float
    pretrain_threads: int = 2  # fixed per recipe: thread count can change floating-point results
    prototype_variants: int = task_defs.PROTOTYPE_VARIANTS
    examples_per_class: int = 8
    processes: bool = True  # pretrain and fine-tune in child processes (passive OpenMP waiting)
    # Function-preserving fine-tuning (docs/zoo-recipe.md): weight of the penalty that keeps the
    # expert's normalised embeddings of unlabeled pool images where theta_0 had them (0 = off).
    finetune_anchor: float = 0.0
    # Logit scale of the fine-tuning loss (evaluation always uses LOGIT_SCALE = CLIP's 100).
    finetune_logit_scale: float = 100.0
    # Width in pixels of the frame in each task's look colour on all its images (tasks.with_look;
    # 0 = tasks drawn as they are). Gives every task its own look, as real benchmark sets have.
    task_frame: int = 0
    # Share of the anchor's pool images framed in the *other* tasks' look colours
    # (tasks.with_other_looks; needs task_frame > 0): the expert is held still on images that look
    # like the other tasks' sets, and left free on images with its own look.
    finetune_anchor_looks: float = 0.0
    # Colours of the looks the pretraining pool shows (0 = none): each pretraining image is framed
    # (width task_frame) in one of tasks.look_palette(pretrain_looks) with probability 1/2, and its
    # caption names the frame as well as the subject ("<concept>, <colour> border"), so theta_0
    # tells looks apart before it sees any task, as CLIP tells a satellite tile from a scan.
    pretrain_looks: int = 0
    # Weight of a pretraining penalty on the common offset of the block linears' inputs: for each
    # layer norm output and MLP hidden layer, |batch-and-token mean|^2 / mean |x|^2 (0 = off). A gate
    # that reads a layer's mean input can only tell tasks apart by what is not common to all of them.
    pretrain_centre: float = 0.0
    # Weight of a second cross-entropy term on the *partial* expert theta_0 + s * (theta - theta_0),
    # s drawn log-uniformly from [1/8, 1] each step (0 = off): asks each task vector to work already
    # at a fraction of its length, as a large CLIP's do (docs/zoo-recipe.md, the alpha curve).
    finetune_partial: float = 0.0
    # Largest random translation of fine-tuning images, as a fraction of the image (borders filled by
    # reflection); pretraining crops inside the image and never shifts.
    finetune_shift: float = 0.12
    # Images per step for the partial term and for the anchor (0 = finetune_batch). The partial term
    # reuses the first of the step's task images; smaller side batches make a step cheaper.
    finetune_partial_batch: int = 0
    finetune_anchor_batch: int = 0
    # theta_0's normalised embeddings of the anchor images computed once before fine-tuning instead of
    # for every step's batch (the same values up to float rounding; saves a forward pass per step).
    finetune_anchor_precomputed: bool = False
    # Weight decay toward theta_0 instead of toward zero (L2-SP; decoupled, as AdamW's): each step
    # moves every weight back by lr * this * (theta - theta_0), so entries no gradient keeps pushing
    # shrink and a task vector keeps what its task consistently needs (0 = off).
    finetune_decay_to_start: float = 0.0
    # Rank of each block linear's task delta (q, k, v, out, fc1, fc2 of every block; 0 = unconstrained):
    # after every step the delta theta - theta_0 of each of those matrices is cut back to its best rank-r
    # approximation. A large CLIP's task matrices are nearly low-rank; a tiny tower's are not (entropy
    # effective rank 40-57 of 64), and MINGLE's projection then removes half of every later expert.
    finetune_rank: int = 0
    # Fine-tune only the block linears' weight matrices (the ones MINGLE equips with experts; biases,
    # layer norms, embeddings and the output projection stay at theta_0).
    finetune_block_linears_only: bool = False


FULL_RECIPE = Recipe(
    tasks=tuple(t.name for t in task_defs.TASKS), n_train=32000, n_test=500, pool_size=12000, pool_stored=4096,
    pretrain_steps=3000, pretrain_batch=128, pretrain_lr=2e-3, pretrain_weight_decay=0.05,
    finetune_steps=800, finetune_batch=64, finetune_lr=3e-3, finetune_weight_decay=0.0,
    finetune_anchor=10.0, finetune_logit_scale=20.0, finetune_partial=1.0, finetune_shift=0.0,
    finetune_anchor_precomputed=True, finetune_decay_to_start=0.5,
)
# The fields that decide theta_0 (with the seed and MODEL_KWARGS): a variant zoo may reuse another
# zoo's pretrained tower only when they are equal (build_zoo's `pretrained_from`).
PRETRAINING_FIELDS = ("pool_size", "pool_stored", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                      "pretrain_weight_decay", "pretrain_threads", "pretrain_looks", "pretrain_centre")


def recipe_with(base: Recipe, overrides: dict[str, Any]) -> Recipe:
    """`base` with some fields replaced: values may be strings as typed on the command line
    ("task_frame=2"); each is converted to the field's type. Unknown fields and values that do not
    parse raise MergeExplorerError (one line, naming the valid fields)."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    changes: dict[str, Any] = {}
    for name, raw in overrides.items():
        if name not in fields:
            raise MergeExplorerError(f"zoo build: no recipe field {name!r}; fields: {', '.join(fields)}")
        like = getattr(base, name)
        try:
            if isinstance(like, bool):
                value = raw if isinstance(raw, bool) else {"true": True, "1": True, "false": False,
                                                             "0": False}[str(raw).strip().lower()]
            elif isinstance(like, tuple):
                value = tuple(v.strip() for v in raw.split(",") if v.strip()) if isinstance(raw, str) else tuple(raw)
            else:
                value = type(like)(raw)
        except (KeyError, TypeError, ValueError):
            kind = {int: "an integer", float: "a number", bool: "true or false"}.get(type(like), type(like).__name__)
            raise MergeExplorerError(f"zoo build: recipe field {name} takes {kind}, not {raw!r}") from None
        changes[name] = value
    recipe = dataclasses.replace(base, **changes)
    looks, frame = recipe.finetune_anchor_looks, recipe.task_frame
    if not 0 <= looks <= 1 or (looks > 0 and frame <= 0):
        raise MergeExplorerError(f"zoo build: finetune_anchor_looks takes a share from 0 to 1 and needs task_frame > 0, "
                                 f"not {looks} with task_frame={frame}")
    if recipe.pretrain_looks < 0 or (recipe.pretrain_looks > 0 and frame <= 0):
        raise MergeExplorerError("zoo build: pretrain_looks takes a count of colours >= 0 and needs task_frame > 0")
    if recipe.finetune_rank < 0 or recipe.pretrain_centre < 0:
        raise MergeExplorerError(f"zoo build: finetune_rank and pretrain_centre take 0 (off) or more, not "
                                 f"{recipe.finetune_rank} and {recipe.pretrain_centre}")
    for name in ("finetune_partial_batch", "finetune_anchor_batch"):
        if not 0 <= getattr(recipe, name) <= recipe.finetune_batch:
            raise MergeExplorerError(f"zoo build: {name} takes 0 (= finetune_batch) up to finetune_batch "
                                     f"({recipe.finetune_batch}), not {getattr(recipe, name)}")
    unknown = [t for t in recipe.tasks if t not in {d.name for d in task_defs.TASKS}]
    if unknown:
        raise MergeExplorerError(f"zoo build: unknown task(s) {', '.join(unknown)}; tasks: "
                                 f"{', '.join(d.name for d in task_defs.TASKS)}")
    return recipe


def variant_version(base: Recipe, recipe: Recipe, pretrained_from: Path | None = None) -> str:
    """The recipe version a zoo built with `recipe` records: RECIPE_VERSION itself for the recipe as
    shipped, else RECIPE_VERSION + the changed fields (so `zoo build` never mistakes a variant for the
    demo zoo, nor the demo zoo for a variant)."""
    changed = [f"{name}={_cli_value(value)}" for name, value in changed_fields(base, recipe).items()]
    if pretrained_from is not None:
        changed.append("pretrained-reused")
    return RECIPE_VERSION + ("+" + ",".join(changed) if changed else "")


def changed_fields(base: Recipe, recipe: Recipe) -> dict[str, Any]:
    """{field: value} of `recipe` where it differs from `base`, in the Recipe's field order."""
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(Recipe)
            if getattr(recipe, f.name) != getattr(base, f.name)}


def _cli_value(value: Any) -> str:
    """A recipe value as `--set` takes it back."""
    return ",".join(value) if isinstance(value, tuple) else str(value)


# For tests and CI: four tasks, small splits, short training (no accuracy targets).
QUICK_RECIPE = Recipe(
    tasks=("digits", "colors", "arrows", "landuse"), n_train=800, n_test=200, pool_size=1500, pool_stored=256,
    pretrain_steps=120, pretrain_batch=64, pretrain_lr=2e-3, pretrain_weight_decay=0.05,
    finetune_steps=80, finetune_batch=64, finetune_lr=2e-3, finetune_weight_decay=0.0, pretrain_threads=1,
    examples_per_class=4, processes=False,
)

# The papers' shape (docs/methods.md, reported numbers; CLIP ViT-B/32 over 8 tasks: zero-shot 48.0 ->
# averaging 65.8 -> Task Arithmetic 69-70 -> TIES 72.4, fine-tuned 90.5), as margins checked at the
# end of every full build and stored in zoo.json. All averages in % over the zoo's tasks.
TARGETS = {
    "finetuned_average_min": 90.0,          # experts worth merging
    "pretrained_average_range": [30.0, 60.0],  # a zero-shot model worth merging from
    "averaging_gain_min": 8.0,              # averaging >= pretrained + 8
    "task_arithmetic_over_averaging_min": 2.0,  # TA (λ 0.3) >= averaging + 2
    "ties_over_averaging_min": 2.0,         # TIES (k 20, λ 1, mean) >= averaging + 2
    "interference_min": 8.0,                # best of those merges <= experts - 8
}
# Task Arithmetic's normalised accuracy when merging the first n tasks: it should fall as n grows.
TA_BY_N_TASKS = (2, 4, 8)

# The merges measured at build time: (row name, engine method, hyperparameters).
MERGES = (
    ("averaging", "average", {}),
    ("task_arithmetic", "task-arithmetic", {"lam": 0.3}),
    ("ties", "ties", {"k": 20.0, "lam": 1.0, "disjoint": "mean"}),
)


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


@contextmanager
def _torch_settings(threads: int):
    """Deterministic kernels and a fixed thread count, restored afterwards.

    Deterministic mode also fills every new tensor with NaN by default, to expose reads of
    uninitialised memory; no kernel here reads it (the results are the same bits either way,
    tests/test_zoo.py), and on this small tower the fill costs up to a fifth of a pretraining step."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def _generator(seed: int, *purpose: int) -> torch.Generator:
    mixed = int(np.random.SeedSequence([seed, *purpose]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(mixed)


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1] (augmentations work here, before CLIP normalisation)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _affine(x: torch.Tensor, g: torch.Generator, *, scale: tuple[float, float], aspect: float, shift: float,
            keep_inside: bool) -> torch.Tensor:
    """Batched random zoom/aspect/translation by grid sampling (reflection at the borders)."""
    n = x.shape[0]
    s = torch.empty(n).uniform_(scale[0], scale[1], generator=g)
    r = torch.exp(torch.empty(n).uniform_(-math.log(aspect), math.log(aspect), generator=g))
    sx, sy = (s * r.sqrt()).clamp(max=1.2), (s / r.sqrt()).clamp(max=1.2)
    if keep_inside:  # random-resized-crop: a window inside the image
        tx = (torch.rand(n, generator=g) * 2 - 1) * (1 - sx).clamp(min=0)
        ty = (torch.rand(n, generator=g) * 2 - 1) * (1 - sy).clamp(min=0)
    else:
        tx = (torch.rand(n, generator=g) * 2 - 1) * shift
        ty = (torch.rand(n, generator=g) * 2 - 1) * shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _frame(x: torch.Tensor, look: torch.Tensor, palette: torch.Tensor, width: int) -> torch.Tensor:
    """Images x [N, 3, H, W] in [0, 1] with a `width`-pixel border in palette[look - 1] where look > 0."""
    colour = palette[(look - 1).clamp(min=0)][:, :, None, None]
    border = torch.zeros(x.shape[-2:], dtype=torch.bool)
    border[:width], border[-width:], border[:, :width], border[:, -width:] = True, True, True, True
    where = (look > 0)[:, None, None, None] & border
    return torch.where(where, colour.expand_as(x), x)


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine decay to 0."""
    warmup = max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _new_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # open_clip initialises from the global generator
    return vision_tower(MODEL_KWARGS).train()


def _pca_patch_init(model: torch.nn.Module, pool: torch.Tensor, g: torch.Generator, n_images: int = 2048) -> None:
    """Patch-embedding filters = whitened principal components of pool patches (a data-driven init)."""
    conv = model.conv1
    width, _, p, _ = conv.weight.shape
    x = _normalize(pool[torch.randint(0, len(pool), (n_images,), generator=g)])
    patches = F.unfold(x, p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p)
    patches = patches - patches.mean(0)
    _, s, vh = torch.linalg.svd(patches, full_matrices=False)
    std = s[:width] / math.sqrt(len(patches))
    with torch.no_grad():
        conv.weight.copy_((0.5 * vh[:width] / std[:, None]).reshape(conv.weight.shape))


def _mimetic_attention_init(model: torch.nn.Module, g: torch.Generator) -> None:
    """Mimetic initialisation (Trockman & Kolter 2023): W_q^T W_k ~ 0.7 Z + 0.7 I, W_v^T W_o^T ~ 0.4 Z - 0.4 I."""
    with torch.no_grad():
        for block in model.transformer.resblocks:
            attn = block.attn
            w = attn.embed_dim
            z = torch.randn(w, w, generator=g) / math.sqrt(w)
            u, s, vh = torch.linalg.svd(0.7 * z + 0.7 * torch.eye(w))
            attn.in_proj_weight[:w] = (u * s.sqrt()).T
            attn.in_proj_weight[w:2 * w] = (vh.T * s.sqrt()).T
            z = torch.randn(w, w, generator=g) / math.sqrt(w)
            u, s, vh = torch.linalg.svd(0.4 * z - 0.4 * torch.eye(w))
            attn.in_proj_weight[2 * w:] = (vh.T * s.sqrt()).T
            attn.out_proj.weight.copy_(u * s.sqrt())


def _tower(open_clip_state: dict[str, torch.Tensor], seed: int) -> torch.nn.Module:
    """A vision tower holding `open_clip_state` (names with the "visual." prefix, as saved)."""
    model = _new_model(seed)
    model.load_state_dict({k.removeprefix("visual."): v for k, v in open_clip_state.items()})
    return model


def _open_clip_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights exactly as open_clip names them in a CLIP checkpoint (`visual.` prefix)."""
    return {f"visual.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save_model(path: Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, _open_clip_state(model), metadata)


def _save_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, metadata)


def _sha256(path: Path) -> str:
    """SHA-256 of the tensors in a safetensors file (names, dtypes, shapes, bytes), not of the file:
    safetensors writes its metadata map in a random order, so equal contents can differ in bytes."""
    digest = hashlib.sha256()
    for name, array in sorted(_load_arrays(path).items()):
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def pretrain(pool: np.ndarray, concepts: np.ndarray, recipe: Recipe, seed: int,
             progress: Progress | None = None) -> torch.nn.Module:
    """CLIP-style pretraining on the generic pool: image embedding vs one-word caption embedding."""
    g = _generator(seed, 1)
    images = _to_input(pool)
    labels = torch.from_numpy(concepts)
    model = _new_model(seed)
    _pca_patch_init(model, images, g)
    _mimetic_attention_init(model, g)
    n_concepts = len(task_defs.POOL_CONCEPTS)
    captions = torch.nn.Parameter(torch.randn(n_concepts, MODEL_KWARGS["output_dim"], generator=g) * 0.1)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))  # CLIP's learnable temperature
    trained = [*model.parameters(), captions, log_scale]
    n_looks = recipe.pretrain_looks
    if n_looks:  # a second word per caption: the frame's colour, or "no border" (row 0)
        g_look = _generator(seed, 4)
        look_words = torch.nn.Parameter(torch.randn(n_looks + 1, MODEL_KWARGS["output_dim"], generator=g_look) * 0.1)
        palette = torch.tensor(task_defs.look_palette(n_looks), dtype=torch.float32) / 255.0
        trained.append(look_words)
    optimizer = torch.optim.AdamW(trained, lr=recipe.pretrain_lr, weight_decay=recipe.pretrain_weight_decay)
    offsets: list[torch.Tensor] = []
    handles = []
    if recipe.pretrain_centre > 0:
        def record_offset(module, inputs, output):
            x = output.reshape(-1, output.shape[-1])
            offsets.append(x.mean(0).pow(2).sum() / x.pow(2).sum(-1).mean())
        for block in model.transformer.resblocks:
            for module in (block.ln_1, block.ln_2, block.mlp.gelu):
                handles.append(module.register_forward_hook(record_offset))
    model.train()
    for step in range(recipe.pretrain_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe.pretrain_steps, recipe.pretrain_lr)
        index = torch.randint(0, len(images), (recipe.pretrain_batch,), generator=g)
        x = _affine(images[index], g, scale=(0.84, 1.0), aspect=1.15, shift=0.0, keep_inside=True)
        if n_looks:
            look = torch.randint(1, n_looks + 1, (len(index),), generator=g_look)
            look = look * (torch.rand(len(index), generator=g_look) < 0.5)
            x = _frame(x, look, palette, recipe.task_frame)
            texts = F.normalize(captions[:, None, :] + look_words[None, :, :], dim=-1).flatten(0, 1)
            target = labels[index] * (n_looks + 1) + look
        else:
            texts, target = F.normalize(captions, dim=-1), labels[index]
        z = F.normalize(model(_normalize(x)), dim=-1)
        logits = log_scale.clamp(max=math.log(100.0)).exp() * z @ texts.T
        caption_loss = loss = F.cross_entropy(logits, target)
        if offsets:
            loss = loss + recipe.pretrain_centre * torch.stack(offsets).mean()
            offsets.clear()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None and (step % 50 == 0 or step == recipe.pretrain_steps - 1):
            progress((step + 1) / recipe.pretrain_steps, f"pretraining: step {step + 1}/{recipe.pretrain_steps}, "
                                                         f"caption loss {caption_loss.item():.2f}")
    for handle in handles:
        handle.remove()
    return model.eval()


def prototype_head(model: torch.nn.Module, task: str, variants: int, frame: int = 0) -> torch.Tensor:
    """The frozen zero-shot head of `task`: per class, the normalised mean of the pretrained tower's
    normalised embeddings of its canonical renders (the analogue of averaging prompt templates)."""
    images, labels = task_defs.prototype_images(task, variants, frame)
    with torch.no_grad():
        features = F.normalize(model.eval()(_normalize(_to_input(images))), dim=-1)
    rows = [F.normalize(features[torch.from_numpy(labels) == c].mean(0), dim=0) for c in range(int(labels.max()) + 1)]
    return torch.stack(rows).contiguous()


def finetune(pretrained_state: dict[str, torch.Tensor], head: torch.Tensor, images: np.ndarray, labels: np.ndarray,
             recipe: Recipe, seed: int, task_index: int, anchor_images: np.ndarray | None = None
             ) -> tuple[torch.nn.Module, float]:
    """Full fine-tuning of the vision tower on one task, head frozen: CE on scale * cosine.

    With `recipe.finetune_anchor` > 0 and `anchor_images` (unlabeled pool images), each step also
    penalises how far the normalised embeddings of a batch of them move from theta_0's: the expert
    may change what it computes on its own task's images, but as little as it can elsewhere."""
    g = _generator(seed, 2, task_index)
    model = _tower(pretrained_state, seed)
    x_all, y_all = _to_input(images), torch.from_numpy(labels)
    anchored = recipe.finetune_anchor > 0 and anchor_images is not None
    if anchored:
        reference = _tower(pretrained_state, seed).eval()
        x_anchor, g_anchor = _normalize(_to_input(anchor_images)), _generator(seed, 3, task_index)
        anchor_batch = recipe.finetune_anchor_batch or recipe.finetune_batch
        if recipe.finetune_anchor_precomputed:
            with torch.no_grad():
                z_anchor = torch.cat([F.normalize(reference(chunk), dim=-1) for chunk in x_anchor.split(256)])
    if recipe.finetune_partial > 0 or recipe.finetune_decay_to_start > 0 or recipe.finetune_rank > 0:  # from theta_0
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
    if recipe.finetune_partial > 0:
        g_partial = _generator(seed, 5, task_index)
        partial_batch = recipe.finetune_partial_batch or recipe.finetune_batch
    if recipe.finetune_block_linears_only:
        moving = {name for name, _ in block_linear_slices(model)}
        for name, p in model.named_parameters():
            p.requires_grad_(name in moving)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.finetune_lr,
                                  weight_decay=recipe.finetune_weight_decay)
    model.train()
    losses = []
    for step in range(recipe.finetune_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe.finetune_steps, recipe.finetune_lr)
        index = torch.randint(0, len(x_all), (recipe.finetune_batch,), generator=g)
        x = _normalize(_affine(x_all[index], g, scale=(0.9, 1.1), aspect=1.0, shift=recipe.finetune_shift,
                               keep_inside=False))
        z = F.normalize(model(x), dim=-1)
        loss = F.cross_entropy(recipe.finetune_logit_scale * z @ head.T, y_all[index])
        if recipe.finetune_partial > 0:
            s = math.exp(math.log(1 / 8) * float(torch.rand(1, generator=g_partial)))
            partial = {name: start[name] + s * (p - start[name]) for name, p in model.named_parameters()}
            zs = F.normalize(torch.func.functional_call(model, partial, (x[:partial_batch],)), dim=-1)
            loss = loss + recipe.finetune_partial * F.cross_entropy(recipe.finetune_logit_scale * zs @ head.T,
                                                                    y_all[index[:partial_batch]])
        if anchored:
            pick = torch.randint(0, len(x_anchor), (anchor_batch,), generator=g_anchor)
            xa = x_anchor[pick]
            if recipe.finetune_anchor_precomputed:
                za = z_anchor[pick]
            else:
                with torch.no_grad():
                    za = F.normalize(reference(xa), dim=-1)
            loss = loss + recipe.finetune_anchor * (F.normalize(model(xa), dim=-1) - za).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if recipe.finetune_decay_to_start > 0:
            with torch.no_grad():
                shrink = optimizer.param_groups[0]["lr"] * recipe.finetune_decay_to_start
                for name, p in model.named_parameters():
                    p.sub_(shrink * (p - start[name]))
        if recipe.finetune_rank > 0:
            _cut_delta_rank(model, start, recipe.finetune_rank)
        losses.append(loss.item())
    return model.eval(), float(np.mean(losses[-max(1, len(losses) // 10):]))


def block_linear_slices(model: torch.nn.Module) -> list[tuple[str, slice]]:
    """(parameter name, row slice) of every block linear's weight matrix, q, k and v apart (open_clip
    stacks them in one in_proj_weight)."""
    out = []
    for i, block in enumerate(model.transformer.resblocks):
        w = block.attn.in_proj_weight.shape[1]
        prefix = f"transformer.resblocks.{i}"
        out += [(f"{prefix}.attn.in_proj_weight", slice(j * w, (j + 1) * w)) for j in range(3)]
        out += [(f"{prefix}.attn.out_proj.weight", slice(None)), (f"{prefix}.mlp.c_fc.weight", slice(None)),
                (f"{prefix}.mlp.c_proj.weight", slice(None))]
    return out


@torch.no_grad()
def _cut_delta_rank(model: torch.nn.Module, start: dict[str, torch.Tensor], rank: int) -> None:
    """Each block linear's delta from theta_0 replaced by its best rank-`rank` approximation (truncated SVD)."""
    params = dict(model.named_parameters())
    for name, rows in block_linear_slices(model):
        p, p0 = params[name][rows], start[name][rows]
        u, s, vh = torch.linalg.svd(p - p0, full_matrices=False)
        p.copy_(p0 + (u[:, :rank] * s[:rank]) @ vh[:rank])


def _recipe_from(fields: dict[str, Any]) -> Recipe:
    """The Recipe a child process was sent as `dataclasses.asdict` (its tasks arrive as a list)."""
    return Recipe(**{**fields, "tasks": tuple(fields["tasks"])})


def _render_splits(job: dict[str, Any], recipe: Recipe) -> dict[str, np.ndarray]:
    """One task's test and training splits (the training split is never stored in the zoo). Needs no
    theta_0, so it can run while pretraining does."""
    spec, seed = task_defs.get_task(job["task"]), job["seed"]
    test_images, test_labels = task_defs.render_split(spec, "test", recipe.n_test, seed, recipe.task_frame)
    train_images, train_labels = task_defs.render_split(spec, "train", recipe.n_train, seed, recipe.task_frame)
    return {"test_images": test_images, "test_labels": test_labels,
            "train_images": train_images, "train_labels": train_labels}


def _stash_file(stash: str | Path, task: str) -> Path:
    return Path(stash) / f"{task}.npz"


def _render_ahead_child(jobs: list[dict[str, Any]], stash: str) -> None:
    """The process that renders the tasks' splits while theta_0 pretrains (killed when pretraining
    ends). Two threads pretrain no faster than one, so the second core is mostly free; at low priority
    the renderer slows pretraining by about a third while it runs and finishes all eight tasks in the
    first half of it, which saves the expert stage more than that (benchmarks/zoo_build_stages.py)."""
    _exit_with_parent(niceness=10)
    _render_ahead(jobs, stash)


def _render_ahead(jobs: list[dict[str, Any]], stash: str) -> None:
    """Render each job's splits into `stash`, in order; each task's file appears complete or not at
    all (written aside, then renamed), so a killed renderer leaves only finished tasks. (Rendering is
    numpy and PIL only: no torch settings to fix.)"""
    for job in jobs:
        splits = _render_splits(job, _recipe_from(job["recipe"]))
        final = _stash_file(stash, job["task"])
        partial = final.with_suffix(".partial.npz")
        np.savez(partial, **splits)
        os.replace(partial, final)


def _expert_job(job: dict[str, Any]) -> dict[str, Any]:
    """One task, start to finish (runs in a worker process): render its splits (unless they were
    rendered ahead into `job["stash"]`), save the test split and example grid, fine-tune its expert
    from theta_0 and save it."""
    start = time.perf_counter()
    recipe = _recipe_from(job["recipe"])
    task, seed, root = job["task"], job["seed"], Path(job["root"])
    spec = task_defs.get_task(task)
    with _torch_settings(FINETUNE_THREADS):
        if job.get("stash"):
            with np.load(_stash_file(job["stash"], task)) as stashed:
                splits = {name: stashed[name] for name in stashed.files}
        else:
            splits = _render_splits(job, recipe)
        render_s = 0.0 if job.get("stash") else time.perf_counter() - start
        _save_arrays(root / job["test_file"], {"images": splits["test_images"], "labels": splits["test_labels"]},
                     {"zoo_task": task, "split": "test", "classes": list(spec.classes)})
        (root / job["examples_file"]).parent.mkdir(parents=True, exist_ok=True)
        task_defs.example_grid(splits["test_images"], splits["test_labels"], spec.num_classes,
                               per_class=recipe.examples_per_class).save(root / job["examples_file"])
        pretrained_state = _load_open_clip(root / job["pretrained_file"])
        head = torch.from_numpy(job["head"])
        anchor = _load_arrays(root / "data/pool.safetensors")["images"] if recipe.finetune_anchor > 0 else None
        if anchor is not None and recipe.finetune_anchor_looks > 0:
            anchor = task_defs.with_other_looks(anchor, task, recipe.tasks, recipe.task_frame,
                                                recipe.finetune_anchor_looks)
        model, loss = finetune(pretrained_state, head, splits["train_images"], splits["train_labels"], recipe, seed,
                               job["task_index"], anchor_images=anchor)
        _save_model(root / job["expert_file"], model, {"zoo_task": task, "role": "expert",
                                                       "recipe_version": job["recipe_version"], "seed": seed})
    return {"task": task, "render_s": render_s, "rendered_ahead": bool(job.get("stash")),
            "seconds": time.perf_counter() - start, "final_loss": loss}


def _run_expert_jobs(jobs: list[dict[str, Any]], workers: int, context):
    """Each job's result as it finishes: on `workers` worker processes (each single-threaded and
    deterministic, exiting if the build dies), or one after another in this process."""
    if workers > 1:
        with _passive_openmp(), ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                    initializer=_exit_with_parent) as pool_exec:
            futures = [pool_exec.submit(_expert_job, job) for job in jobs]
            for future in as_completed(futures):
                yield future.result()
    else:
        for job in jobs:
            yield _expert_job(job)


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():
        process.kill()
    process.join()


def _exit_with_parent(niceness: int = 0) -> None:
    """Initialiser of the build's worker processes: a worker whose build was killed (SIGTERM, SIGKILL)
    would otherwise go on fine-tuning its expert for minutes; this one exits within a second.
    `niceness` > 0 lowers the worker's priority."""
    if niceness and hasattr(os, "nice"):
        os.nice(niceness)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _pretrain_stage(root: Path, recipe: Recipe, seed: int, progress: Progress,
                    version: str = RECIPE_VERSION) -> dict[str, float]:
    """Render the pool, pretrain theta_0, build the heads; writes pool, pretrained and heads files."""
    timings = {}
    with _torch_settings(recipe.pretrain_threads):
        progress(0.0, f"rendering the pretraining pool ({recipe.pool_size} images)")
        start = time.perf_counter()
        pool, concepts = task_defs.render_pool(recipe.pool_size, seed)
        _save_arrays(root / "data/pool.safetensors", {"images": pool[:recipe.pool_stored]},
                     {"content": "unlabeled pretraining-pool images (uint8 NHWC)"})
        timings["pool_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model = pretrain(pool, concepts, recipe, seed, lambda f, m: progress(0.02 + 0.98 * f, m))
        _save_model(root / "pretrained.safetensors", model,
                    {"role": "pretrained", "recipe_version": version, "seed": seed})
        _save_heads(root, model, recipe)
        timings["pretrain_s"] = time.perf_counter() - start
    return timings


def _save_heads(root: Path, model: torch.nn.Module, recipe: Recipe) -> None:
    heads = {t: prototype_head(model, t, recipe.prototype_variants, recipe.task_frame) for t in recipe.tasks}
    _save_arrays(root / "heads.safetensors", {t: h.numpy() for t, h in heads.items()},
                 {"content": "frozen zero-shot heads, unit rows; logits = 100 * <normalize(f(x)), row>"})


def check_pretraining_source(source: Path, root: Path, recipe: Recipe, seed: int) -> dict[str, Any]:
    """The manifest of the zoo at `source` when its pretrained tower is the one `recipe` and `seed`
    would pretrain (same pretraining fields, seed and tower shape); else MergeExplorerError."""
    if source.resolve() == root.resolve():
        raise MergeExplorerError(f"zoo build: {source} is the folder being built; reuse the pretrained tower of "
                                 "another zoo folder")
    data = read_manifest(source)
    theirs = data.get("recipe", {})
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}  # fields newer than that zoo's manifest
    fields = [*PRETRAINING_FIELDS, *(["task_frame"] if recipe.pretrain_looks else [])]  # the looks' frame width
    differ = [f for f in fields if theirs.get(f, defaults[f]) != getattr(recipe, f)]
    if data.get("seed") != seed:
        differ.append(f"seed ({data.get('seed')} there)")
    if data.get("model", {}).get("kwargs") != dict(MODEL_KWARGS):
        differ.append("tower shape")
    if differ:
        raise MergeExplorerError(f"zoo build: the zoo at {source} was pretrained differently ({', '.join(differ)}); "
                                 "its pretrained tower cannot be reused for this recipe")
    for name in ("pretrained.safetensors", "data/pool.safetensors"):
        if not (source / name).is_file():
            raise MergeExplorerError(f"zoo build: {source / name} is missing")
    return data


def _reuse_pretraining(root: Path, source: Path, recipe: Recipe, seed: int, progress: Progress) -> dict[str, float]:
    """Copy pool and pretrained tower from the zoo at `source` (checked by check_pretraining_source)
    and build this recipe's heads from that tower: a variant that changes only fine-tuning, heads or
    tasks skips the pool and the pretraining (about half of a full build) and starts from the same
    theta_0."""
    start = time.perf_counter()
    progress(0.0, f"reusing the pool and pretrained tower of {source}")
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "data/pool.safetensors", root / "data/pool.safetensors")
    shutil.copyfile(source / "pretrained.safetensors", root / "pretrained.safetensors")
    with _torch_settings(recipe.pretrain_threads):
        _save_heads(root, _tower(_load_open_clip(root / "pretrained.safetensors"), seed).eval(), recipe)
    return {"pool_s": 0.0, "pretrain_s": time.perf_counter() - start}


def _pretrain_child(root: str, recipe: dict[str, Any], seed: int, queue, version: str = RECIPE_VERSION) -> None:
    _exit_with_parent()
    try:
        recipe_ = _recipe_from(recipe)
        timings = _pretrain_stage(Path(root), recipe_, seed, lambda f, m: queue.put(("progress", f, m)), version)
        queue.put(("done", timings))
    except BaseException as exc:  # report, then die: the parent raises
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


@contextmanager
def _passive_openmp():
    """Children started inside get passive OpenMP waiting: spinning threads of two processes sharing
    a small CPU (or of a busy machine) otherwise slow each other down many times over."""
    old = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_WAIT_POLICY", None)


def _pretrain_in_child(root: Path, recipe: Recipe, seed: int, progress: Progress,
                       version: str = RECIPE_VERSION) -> dict[str, float]:
    import queue as queue_module

    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    with _passive_openmp():
        child = ctx.Process(target=_pretrain_child, args=(str(root), dataclasses.asdict(recipe), seed, messages, version),
                            name="zoo-pretrain", daemon=True)
        child.start()
    try:
        while True:
            try:
                message = messages.get(timeout=1.0)
            except queue_module.Empty:
                if not child.is_alive():
                    raise MergeExplorerError(f"zoo build: the pretraining process died (exit code {child.exitcode})")
                continue
            if message[0] == "progress":
                progress(message[1], message[2])
            elif message[0] == "done":
                return message[1]
            else:
                raise MergeExplorerError(f"zoo build: pretraining failed: {message[1]}")
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.terminate()


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    return load_numpy_file(str(path))


def _load_open_clip(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def recipe_for(quick: bool) -> Recipe:
    """The shipped recipe: the demo zoo's, or the --quick one."""
    return QUICK_RECIPE if quick else FULL_RECIPE


def up_to_date(root: str | Path, quick: bool = False, seed: int = DEFAULT_SEED, version: str = RECIPE_VERSION) -> bool:
    """Whether `root` holds a complete zoo built by this recipe version (or variant), seed and size."""
    try:
        data = read_manifest(root)
        zoo = zoo_from_manifest(Path(root).expanduser(), data)
        load_zoo(root)
    except MergeExplorerError:
        return False
    return (zoo.recipe_version == version and zoo.seed == seed and zoo.quick == quick
            and data.get("format_version") == FORMAT_VERSION)


def _complete_variant(root: Path) -> Zoo | None:
    """The zoo at `root` when it is a complete build of a recipe variant (`variant` in its manifest)."""
    try:
        zoo = load_zoo(root)
    except MergeExplorerError:
        return None
    return zoo if zoo.manifest.get("variant") else None


def build_zoo(root: str | Path | None = None, quick: bool = False, progress: Progress | None = None,
              force: bool = False, seed: int = DEFAULT_SEED, workers: int | None = None,
              recipe: Recipe | None = None, pretrained_from: str | Path | None = None) -> Zoo:
    """Build the demo zoo at `root` (default: `default_zoo_dir()`) and return it.

    A no-op returning the existing zoo when one built by this recipe version, seed and size is
    there (unless `force`). `progress(fraction, message)` is called as the build goes. `workers`
    processes fine-tune experts in parallel (default: 2 when the machine has 2+ cores); the
    result does not depend on it.

    For recipe experiments (docs/zoo-recipe.md): `recipe` replaces the shipped recipe (see
    `recipe_with`), and `pretrained_from` names a zoo folder whose pool and pretrained tower are
    reused when they are what this recipe would pretrain. The zoo then records a variant version
    (`variant_version`) and what changed.
    """
    root = Path(root).expanduser() if root is not None else default_zoo_dir()
    report = progress or (lambda fraction, message: None)
    base = recipe_for(quick)
    recipe = recipe or base
    source = Path(pretrained_from).expanduser() if pretrained_from is not None else None
    version = variant_version(base, recipe, source)
    if not force and up_to_date(root, quick, seed, version):
        report(1.0, f"the zoo at {root} is up to date (recipe {version})")
        return load_zoo(root)
    kept = _complete_variant(root) if not force and version == RECIPE_VERSION else None
    if kept is not None:  # e.g. `MERGE_EXPLORER_ZOO=.zoo/mine make app`: open the experiment, never overwrite it
        report(1.0, f"the zoo at {root} is a recipe variant ({kept.recipe_version}), kept as it is; "
                    "--force rebuilds it with the shipped recipe")
        return kept
    source_manifest = check_pretraining_source(source, root, recipe, seed) if source is not None else None
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if recipe.processes else 1
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergeExplorerError(f"cannot create the zoo folder {root}: {exc.strerror}") from exc
    # A half-built zoo must never look complete: drop the manifest first, write it last.
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in ("experts", "data", "examples"):
        shutil.rmtree(root / stale, ignore_errors=True)

    start_all = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")
    jobs = [{"task": task, "task_index": [t.name for t in task_defs.TASKS].index(task), "seed": seed,
             "root": str(root), "recipe": dataclasses.asdict(recipe), "recipe_version": version,
             "pretrained_file": "pretrained.safetensors", "expert_file": f"experts/{task}.safetensors",
             "test_file": f"data/{task}.test.safetensors", "examples_file": f"examples/{task}.png"}
            for task in recipe.tasks]
    with ExitStack() as stack:
        renderer = stash = None
        if source is None and recipe.processes and workers > 1:
            stash = stack.enter_context(tempfile.TemporaryDirectory(prefix="merge-explorer-zoo-"))
            with _passive_openmp():
                renderer = spawn.Process(target=_render_ahead_child, args=(jobs, stash), name="zoo-render-ahead",
                                         daemon=True)
                renderer.start()
            stack.callback(_stop, renderer)

        # 1-2. The generic pool, CLIP-style pretraining, zero-shot heads from canonical renders.
        if source is not None:
            timings = _reuse_pretraining(root, source, recipe, seed, lambda f, m: report(0.4 * f, m))
        else:
            stage = _pretrain_in_child if recipe.processes else _pretrain_stage
            timings = stage(root, recipe, seed, lambda f, m: report(0.4 * f, m), version)
        heads = {t: h.numpy() for t, h in _load_open_clip(root / "heads.safetensors").items()}
        if renderer is not None:  # what it has not finished, each expert job renders itself
            _stop(renderer)
        for job in jobs:
            job["head"] = heads[job["task"]]
            if stash is not None and _stash_file(stash, job["task"]).is_file():
                job["stash"] = stash

        # 3. One expert per task (parallel workers; each single-threaded and deterministic).
        start = time.perf_counter()
        results: dict[str, dict[str, Any]] = {}
        report(0.4, f"fine-tuning {len(jobs)} experts ({workers} worker{'s' if workers > 1 else ''})")
        for result in _run_expert_jobs(jobs, workers, spawn):
            results[result["task"]] = result
            report(0.4 + 0.5 * len(results) / len(jobs),
                   f"fine-tuned {result['task']} ({len(results)}/{len(jobs)}, {result['seconds']:.0f} s)")
        timings["experts_s"] = time.perf_counter() - start

    # 4. Measure: a provisional manifest lets engine.evaluate read the zoo like any other.
    start = time.perf_counter()
    report(0.9, "measuring accuracies: pretrained, experts, merges")
    manifest = _manifest(root, recipe, seed, quick, results)
    if version != RECIPE_VERSION:
        changed = changed_fields(base, recipe)
        manifest["recipe_version"] = version
        manifest["created_by"] = " ".join(
            ["python -m engine zoo build", *(["--quick"] if quick else []), "--dir", str(root),
             *([f"--seed {seed}"] if seed != DEFAULT_SEED else []),
             *(f"--set {name}={_cli_value(value)}" for name, value in changed.items()),
             *([f"--pretrained-from {source}"] if source is not None else [])])
        manifest["variant"] = {
            "of": RECIPE_VERSION,
            "changed": {name: _jsonable(value) for name, value in changed.items()},
            "pretrained_from": None if source is None else {
                "zoo": str(source.resolve()), "recipe_version": source_manifest["recipe_version"],
                "pretrained_sha256": manifest["content_sha256"]["pretrained.safetensors"]},
        }
    zoo = zoo_from_manifest(root, manifest)
    table, cross = _measure(zoo, recipe)
    timings["evaluate_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - start_all
    _finish_manifest(manifest, zoo, table, cross, timings, workers)
    _write_json(root / MANIFEST_NAME, manifest)
    report(1.0, f"zoo built at {root} in {timings['total_s']:.0f} s")
    return load_zoo(root)


def _manifest(root: Path, recipe: Recipe, seed: int, quick: bool, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import open_clip

    tasks = []
    for name in recipe.tasks:
        spec = task_defs.get_task(name)
        tasks.append(ZooTask(name=name, description=spec.description, classes=list(spec.classes),
                             n_train=recipe.n_train, n_test=recipe.n_test, expert_file=f"experts/{name}.safetensors",
                             examples_file=f"examples/{name}.png", test_file=f"data/{name}.test.safetensors",
                             examples_per_class=recipe.examples_per_class).to_json())
    files = {"pretrained": "pretrained.safetensors", "heads": "heads.safetensors", "pool": "data/pool.safetensors"}
    hashed = [files["pretrained"], files["heads"], files["pool"]]
    for t in tasks:
        hashed += [t["expert_file"], t["test_file"]]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "recipe_version": RECIPE_VERSION, "seed": seed,
        "quick": quick, "created_by": "python -m engine zoo build" + (" --quick" if quick else ""),
        "model": {"library": "open_clip", "class": "open_clip.transformer.VisionTransformer",
                  "kwargs": dict(MODEL_KWARGS), "state_dict_prefix": "visual.", "logit_scale": LOGIT_SCALE,
                  "preprocess": {"image_size": MODEL_KWARGS["image_size"], "layout": "uint8 NHWC -> float NCHW / 255",
                                 "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}},
        "files": files,
        "pool": {"file": files["pool"], "n_images": recipe.pool_stored, "n_pretraining_images": recipe.pool_size,
                 "description": "generic photo crops and drawings, unrelated to any single task; labels dropped"},
        "heads": {"file": files["heads"], "kind": "zero-shot prototypes: normalised mean of the pretrained tower's "
                  "normalised embeddings of canonical class renders", "variants_per_class": recipe.prototype_variants},
        "recipe": {**dataclasses.asdict(recipe), "tasks": list(recipe.tasks), "targets": TARGETS,
                   "finetune_threads": FINETUNE_THREADS},
        "tasks": tasks,
        "experts": {t: {"final_train_loss": r["final_loss"], "seconds": r["seconds"], "render_s": round(r["render_s"], 2),
                        "rendered_ahead": r["rendered_ahead"]} for t, r in results.items()},
        "content_sha256": {path: _sha256(root / path) for path in hashed},
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }


def _measure(zoo: Zoo, recipe: Recipe) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """{row: {task: pct}} for pretrained / finetuned / the merges, and every expert on every task."""
    names = zoo.task_names()
    suite = ZooSuite(zoo)  # a private suite: the build changes the manifest's accuracies as it measures
    table: dict[str, dict[str, float]] = {}
    table["pretrained"] = evaluate(suite, "pretrained", device="cpu").per_task
    cross = {t: evaluate(suite, t, device="cpu").per_task for t in names}  # expert t on every task
    table["finetuned"] = {t: cross[t][t] for t in names}
    for t in zoo.tasks:  # the normalisation reference from here on
        t.accuracy["finetuned"] = table["finetuned"][t.name]
    stack = TaskVectorStack.from_files(zoo.pretrained_path, [zoo.expert_path(t) for t in names], tasks=names)
    for row, method_name, config in MERGES:
        method = get_method(method_name)
        merged = stack.apply(method.merge(stack, method.config(**config)))
        table[row] = evaluate(suite, merged, device="cpu").per_task
    ta = get_method("task-arithmetic")
    for n in TA_BY_N_TASKS:
        if n > len(names):
            continue
        first = stack.subset(names[:n])
        per_task = evaluate(suite, first.apply(ta.merge(first, ta.config(lam=0.3))), tasks=names[:n], device="cpu").per_task
        table[f"task_arithmetic_first_{n}"] = per_task
    return table, cross


def _finish_manifest(manifest: dict[str, Any], zoo: Zoo, table: dict[str, dict[str, float]],
                     cross: dict[str, dict[str, float]], timings: dict[str, float], workers: int) -> None:
    names = zoo.task_names()
    finetuned = table["finetuned"]
    rows = {}
    for row, per_task in table.items():
        tasks = [t for t in names if t in per_task]  # TA over the first n tasks covers only those
        normalized = {t: per_task[t] / finetuned[t] for t in tasks if finetuned[t] > 0}
        rows[row] = {"per_task": {t: round(per_task[t], 4) for t in tasks},
                     "average": round(float(np.mean([per_task[t] for t in tasks])), 4),
                     "normalized": {t: round(v, 6) for t, v in normalized.items()},
                     "normalized_average": round(float(np.mean(list(normalized.values()))), 6)}
    by_n = {n: rows.pop(f"task_arithmetic_first_{n}") for n in TA_BY_N_TASKS if f"task_arithmetic_first_{n}" in rows}
    manifest["table"] = rows
    manifest["merges"] = {row: {"method": method, "config": config} for row, method, config in MERGES}
    manifest["task_arithmetic_by_n_tasks"] = {
        "lam": 0.3, "order": "the zoo's task order",
        "normalized_average": {str(n): r["normalized_average"] for n, r in by_n.items()},
        "per_task": {str(n): r["per_task"] for n, r in by_n.items()}}
    manifest["expert_on_tasks"] = {t: {u: round(v, 4) for u, v in cross[t].items()} for t in names}
    for task in manifest["tasks"]:
        task["accuracy"] = {row: rows[row]["per_task"][task["name"]] for row in rows}
    manifest["targets"] = shape_targets(rows, manifest["task_arithmetic_by_n_tasks"]["normalized_average"])
    manifest["targets"]["applies"] = not manifest["quick"]
    manifest["build"] = {"timings_s": {k: round(v, 2) for k, v in timings.items()}, "workers": workers,
                         "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    manifest["size_bytes"] = sum(p.stat().st_size for p in zoo.root.rglob("*") if p.is_file())


def shape_targets(rows: dict[str, dict[str, Any]], ta_by_n: dict[str, float]) -> dict[str, Any]:
    """Each of TARGETS with what was measured and whether it holds."""
    avg = {row: rows[row]["average"] for row in ("finetuned", "pretrained", "averaging", "task_arithmetic", "ties")}
    best_merge = max(avg["averaging"], avg["task_arithmetic"], avg["ties"])
    lo, hi = TARGETS["pretrained_average_range"]
    ns = sorted(ta_by_n, key=int)
    measured = {
        "finetuned_average": avg["finetuned"], "pretrained_average": avg["pretrained"],
        "averaging_gain": round(avg["averaging"] - avg["pretrained"], 4),
        "task_arithmetic_over_averaging": round(avg["task_arithmetic"] - avg["averaging"], 4),
        "ties_over_averaging": round(avg["ties"] - avg["averaging"], 4),
        "interference": round(avg["finetuned"] - best_merge, 4),
        "task_arithmetic_normalized_by_n_tasks": {n: ta_by_n[n] for n in ns},
    }
    met = {
        "finetuned_average": avg["finetuned"] >= TARGETS["finetuned_average_min"],
        "pretrained_average": lo <= avg["pretrained"] <= hi,
        "averaging_gain": measured["averaging_gain"] >= TARGETS["averaging_gain_min"],
        "task_arithmetic_over_averaging":
            measured["task_arithmetic_over_averaging"] >= TARGETS["task_arithmetic_over_averaging_min"],
        "ties_over_averaging": measured["ties_over_averaging"] >= TARGETS["ties_over_averaging_min"],
        "interference": measured["interference"] >= TARGETS["interference_min"],
        "task_arithmetic_falls_with_more_tasks": all(ta_by_n[a] > ta_by_n[b] for a, b in zip(ns, ns[1:])),
    }
    return {**TARGETS, "measured": measured, "met": met}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def format_table(zoo: Zoo) -> str:
    """The build's accuracy table as aligned text: one row per model, one column per task."""
    names = zoo.task_names()
    labels = {"finetuned": "individual (fine-tuned)", "pretrained": "pretrained (zero-shot)",
              "averaging": "simple averaging", "task_arithmetic": "Task Arithmetic (λ=0.3)",
              "ties": "TIES (k=20, λ=1, mean)"}
    width = max(8, *(len(n) for n in names))
    head = f"{'model':<26}" + "".join(f"{n:>{width + 1}}" for n in names) + f"{'average':>{width + 1}}"
    lines = [head, "-" * len(head)]
    for row in ("finetuned", "pretrained", "averaging", "task_arithmetic", "ties"):
        if row not in zoo.table:
            continue
        entry = zoo.table[row]
        cells = "".join(f"{entry['per_task'][n]:>{width + 1}.1f}" for n in names)
        lines.append(f"{labels.get(row, row):<26}{cells}{entry['average']:>{width + 1}.1f}")
    by_n = (zoo.manifest.get("task_arithmetic_by_n_tasks") or {}).get("normalized_average") or {}
    if by_n:
        lines.append("Task Arithmetic (λ=0.3) normalised accuracy, merging the first "
                     + " / ".join(by_n) + " tasks: " + " / ".join(f"{100 * v:.1f} %" for v in by_n.values()))
    return "\n".join(lines)
