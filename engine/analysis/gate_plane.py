"""MINGLE's null-space gating on real activations, reduced to a plane: what the MINGLE lesson shows.

MINGLE runs (the engine's own `Mingle`, with the given config) over the earlier tasks of an order;
then the newest task's experts and gate are added and one distillation gradient of that gate is
taken on its seed images, exactly as the first adaptation step would. The lesson shows, for one
gated linear layer:

- the layer's inputs (one point per token) on each task's seed images, projected on the two main
  directions of the earlier tasks' inputs (an uncentred PCA: the same second moment MINGLE takes
  its protected directions from);
- the protected directions U of that layer after the earlier tasks;
- the new gate's gradient before projection, after the hard projection (γ = 0: nothing along U
  survives) and after the relaxed projection for a grid of γ. The relaxed one is what
  `relaxed_projection` applies at the last of the config's adaptation steps if the gradient kept
  this direction for all of them (the alignment score S is an average over steps, so a single step
  would hardly relax anything).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from ..continual import task_seed, select_seed_indices
from ..errors import ConfigError
from ..methods.mingle import Mingle, MingleConfig, distillation_loss, relaxed_projection

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # the γ grid the lesson's slider moves over
DEFAULT_LAYER = "encoder.layers.1.mlp.fc1"
POINTS_PER_TASK = 300


@dataclass
class GatePlane:
    layer: str
    earlier: list[str]
    new: str
    clouds: dict[str, list[list[float]]]     # task -> [[x, y]] of sampled tokens' inputs
    protected: list[list[float]]             # protected directions, projected on the plane
    raw: list[float]                         # the new gate's descent direction (−gradient), on the plane
    hard: list[float]                        # after the hard projection (γ = 0)
    relaxed: dict[str, list[float]]          # γ -> after the relaxed projection
    kept_along_protected: list[list[float]]  # [direction][γ]: share of the update along it that survives
    kept_norm: dict[str, float]              # γ -> ‖projected‖ / ‖raw‖ in the full input space
    arrow_scale: float                       # arrows are unit vectors × this, so they read next to the clouds
    input_dim: int = 0                       # numbers per input vector of the layer (the plane shows 2)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gate_plane(source, order: Sequence[str], *, layer: str = DEFAULT_LAYER, config: MingleConfig | None = None,
               points_per_task: int = POINTS_PER_TASK, seed: int = 0, limit: int | None = None,
               device: str | torch.device = "cpu", progress=None) -> GatePlane:
    """The plane view of MINGLE's gate projection for the last task of `order` (≥ 2 tasks)."""
    order = list(order)
    if len(order) < 2:
        raise ConfigError("the gate lesson needs at least two tasks: earlier ones to protect and a new one")
    config = config or MingleConfig()
    mingle = Mingle(source.build_encoder, config, device=device)
    mingle.init(source.theta0())
    if layer not in mingle.encoder.selected:
        raise ConfigError(f"{layer} has no gate with layers={config.layers!r}; pick one of "
                          f"{', '.join(mingle.encoder.selected)}")
    seeds = {}
    for task in order:
        images, labels = source.test_set(task, limit)
        idx = select_seed_indices(labels, config.seeds_per_class, task_seed(seed, task))
        seeds[task] = images[idx].to(mingle.device)
    *earlier, new = order
    for i, task in enumerate(earlier):
        if progress is not None:
            progress(i / len(order), f"MINGLE step {i + 1}: merging {task}")
        mingle.step(task, source.theta(task), seeds[task], source.logits_fn(task))

    gated = mingle.encoder.linears[layer]
    inputs = _layer_inputs(mingle, gated, seeds)
    basis = mingle.bases[layer].float().cpu()  # (d_in, m), orthonormal columns
    if progress is not None:
        progress((len(order) - 1) / len(order), f"the new gate of {new}: its first gradient")
    gradient = _first_gate_gradient(mingle, gated, new, source, seeds[new])

    earlier_tokens = torch.cat([inputs[t] for t in earlier])
    _, _, vh = torch.linalg.svd(earlier_tokens.double(), full_matrices=False)
    plane = vh[:2].T.float()  # (d_in, 2): the uncentred principal directions of earlier inputs
    generator = torch.Generator().manual_seed(seed)
    clouds = {}
    for task, x in inputs.items():
        pick = torch.randperm(len(x), generator=generator)[:points_per_task]
        clouds[task] = (x[pick] @ plane).tolist()
    radius = float((earlier_tokens @ plane).norm(dim=1).median())

    descent = -gradient
    relaxed_full = {}
    for gamma in GAMMAS:
        score = torch.zeros(basis.shape[1])
        projected = descent
        for _ in range(max(1, config.steps)):  # the score after the config's steps at this alignment
            projected, score = relaxed_projection(descent, basis, score, beta=config.beta, gamma=gamma)
        relaxed_full[f"{gamma:g}"] = projected
    length = descent.norm().clamp(min=1e-12)

    def on_plane(v: torch.Tensor) -> list[float]:
        """`v` in the plane, in units of the unprojected update's length."""
        return (v @ plane / length).tolist()

    along = descent @ basis
    shown = min(basis.shape[1], 3)
    kept_along = [[float((v @ basis[:, j]) / along[j]) if abs(float(along[j])) > 1e-12 else 1.0
                   for v in relaxed_full.values()] for j in range(shown)]
    return GatePlane(
        layer=layer, earlier=list(earlier), new=new, clouds=clouds,
        protected=[(basis[:, j] @ plane).tolist() for j in range(basis.shape[1])],
        raw=on_plane(descent), hard=on_plane(relaxed_full["0"]),  # GAMMAS starts at 0: the hard projection
        relaxed={g: on_plane(v) for g, v in relaxed_full.items()},
        kept_along_protected=kept_along,
        kept_norm={g: float(v.norm() / length) for g, v in relaxed_full.items()},
        arrow_scale=radius, input_dim=int(basis.shape[0]), config=asdict(config))


@torch.no_grad()
def _layer_inputs(mingle: Mingle, gated, seeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every token's input to `gated` on each task's seed images, (tokens, d_in) on the CPU."""
    captured: list[torch.Tensor] = []
    handle = gated.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    out = {}
    try:
        for task, images in seeds.items():
            captured.clear()
            mingle.encoder(images)
            out[task] = torch.cat(captured).float().cpu()
    finally:
        handle.remove()
    return out


def _first_gate_gradient(mingle: Mingle, gated, task: str, source, seed_images: torch.Tensor) -> torch.Tensor:
    """d(distillation loss)/d(new gate weight) of `gated` on the first batch, as `Mingle.adapt` takes it."""
    mingle.add_experts(source.theta(task))
    head = source.logits_fn(task)
    batch = seed_images[:mingle.config.batch_size]
    with torch.no_grad():
        teacher = source.build_encoder(source.theta(task)).to(mingle.device)
        target = head(teacher(batch))
    mingle.encoder.train()
    loss = distillation_loss(head(mingle.encoder(batch)), target, mingle.config.temperature)
    loss.backward()
    mingle.encoder.eval()
    return gated.gate_w.grad.detach().reshape(-1).float().cpu()
