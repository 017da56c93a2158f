"""MINGLE: mixtures of null-space-gated low-rank experts for test-time continual merging.

Qiu et al., NeurIPS 2025 (arXiv 2505.11883); docs/methods.md, MINGLE, describes what this module
does step by step, including the details that are easy to get wrong.

Per selected linear layer l and task t:

    expert   Δ_t = W_l(θ_t) − W_l(θ_0), projected off the top-ρ block of Σ_{i<t} B_i A_i,
             then B_t = U_r, A_t = diag(S_r) V_rᵀ (rank-r SVD), frozen for good;
    gate     g_t(x) = w_tᵀ x + b_t, a raw scalar, averaged over tokens (and the batch);
    layer    h = (W_0 + Σ_{i≤t} ḡ_i B_i A_i) x + b_0 — biases, LayerNorms, embeddings stay at θ_0;
    adapt    only (w_t, b_t) train: distillation from θ_t on a few unlabelled seed images,
             with the weight gradient projected off earlier tasks' input subspaces, relaxed per
             direction by λ_p = exp(−γ S_p);
    protect  after adaptation, U_l ← QR([U_l | top-k of Σ x xᵀ]) over the seed set's tokens.

The maths lives in small pure functions (`effective_rank`, `project_out_previous`,
`low_rank_expert`, `relaxed_projection`, `top_subspace`, `accumulate_basis`) that the unit tests
check on tiny matrices; `GatedLinear` / `SplitQKVAttention` / `MingleEncoder` put them into a real
open_clip `VisionTransformer`; `Mingle` runs one continual step. The protocol (orders, evaluation,
metrics) is in engine/continual.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..tasks import load_canonical, vision_tower
from .base import MethodSpec, param, validate_config
from .registry import register

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# Which linears of each block get experts and gates (docs/methods.md, MINGLE). Names are the canonical
# (HF CLIPVisionModel) ones; q, k and v are separate even though open_clip fuses them.
LAYER_SETS: dict[str, tuple[str, ...]] = {
    "all": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),  # MINGLE
    "qkv-fc1": ("q_proj", "k_proj", "v_proj", "fc1"),  # MINGLE*, as the paper's parameter counts say
    "attn-fc1": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1"),  # "MINGLE* (code)": `[attn, fc1]`
}
_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class MingleConfig:
    rank: int = param(64, "Rank r of each low-rank expert B·A (truncated SVD of the projected task delta); "
                      "capped at the layer's smaller dimension.", label="expert rank r", min=1, max=4096, step=1,
                      flag="--rank")
    gamma: float = param(1.0, "Relaxation strength γ: projection strength per protected direction is "
                         "exp(−γ·S); γ = 0 is the hard null-space projection.", label="γ (relaxation)", min=0.0,
                         max=100.0, step=0.5, flag="--gamma")
    beta: float = param(0.99, "EMA decay β of each protected direction's gradient alignment S.", label="β (EMA)",
                        min=0.0, max=1.0, step=0.01, flag="--beta")
    subspace_k: int = param(3, "Input directions kept per task per layer for the null space (top-k of the "
                            "uncentered input second moment).", label="subspace k", min=0, max=4096, step=1,
                            flag="--subspace-k")
    steps: int = param(50, "Adaptation steps (Adam) per task.", label="steps", min=0, max=100000, step=10,
                       flag="--steps")
    seeds_per_class: int = param(5, "Unlabelled seed images drawn per class from the task's test split.",
                                 label="seeds per class", min=1, max=10000, step=1, flag="--seeds-per-class")
    batch_size: int = param(16, "Adaptation batch size (cycling, shuffled loader over the seed set).",
                            label="batch size", min=1, max=4096, step=1, flag="--batch-size")
    lr: float = param(1e-4, "Adam learning rate for the newest gate (default betas, no weight decay).",
                      label="learning rate", min=0.0, max=1.0, flag="--lr")
    temperature: float = param(2.0, "Distillation temperature T_kd (soft-target CE, no T² factor).",
                               label="T_kd", min=1e-3, max=100.0, flag="--temperature")
    layers: str = param("all", "Linears with experts: all six per block (MINGLE), q/k/v + fc1 (MINGLE*), or "
                        "q/k/v/out + fc1 (the official code's MINGLE* by substring match).", label="layers",
                        choices=tuple(LAYER_SETS), flag="--layers")
    projection: bool = param(True, "Project the new gate's weight gradient off earlier tasks' input subspaces "
                             "(off = no null-space constraint).", label="null-space projection",
                             flag="--projection")
    static: bool = param(False, "MINGLE-static: projected experts with a fixed coefficient, no adaptation.",
                         label="static", flag="--static")
    static_coef: float = param(0.3, "Fixed expert coefficient of the static variant.", label="static coefficient",
                               min=-10.0, max=10.0, step=0.05, flag="--static-coef")
    batch_reduce: bool = param(True, "Average gates over the batch as well as over tokens (one merged matrix "
                               "per batch, as all reported numbers); off = per-image routing.",
                               label="batch-reduce gates", flag="--batch-reduce")
    gate_init_std: float = param(0.01, "Std of the new gate's weight init (official code 0.01; 0 = Algorithm 1's "
                                 "zero init). The bias starts at 0.", label="gate init std", min=0.0, max=1.0,
                                 flag="--gate-init-std")
    eval_batch_size: int = param(128, "Evaluation batch size; routing is per batch, so this changes results "
                                 "slightly.", label="eval batch size", min=1, max=100000, step=1,
                                 flag="--eval-batch-size")
    seed: int = param(0, "Seed for gate init, seed-image selection and the adaptation loader.", label="seed",
                      min=0, max=2**31 - 1, step=1, flag="--seed")


# ---------------------------------------------------------------------------------------------
# The maths, as pure functions on tensors
# ---------------------------------------------------------------------------------------------


def effective_rank(singular_values: torch.Tensor) -> int:
    """ρ = ⌊exp(H)⌋, H the entropy of s / Σ s (docs/methods.md, MINGLE; the paper's α).

    xlogy makes 0·log 0 = 0, so exactly-zero singular values do not turn H into NaN. An all-zero
    spectrum has no dominant subspace: ρ = 0.
    """
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0
    p = s / total
    entropy = -torch.special.xlogy(p, p).sum()
    # A tiny epsilon so that H = log n (a flat spectrum) gives n, not n − 1 from rounding.
    return int(math.floor(math.exp(float(entropy)) + 1e-9))


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, s, Vᵀ) of b @ a from QRs of the factors, in float64; b (m, q), a (q, n).

    b @ a = Q_b (R_b R_aᵀ) Q_aᵀ with b = Q_b R_b and aᵀ = Q_a R_a, so the SVD of the small R_b R_aᵀ
    gives the exact nonzero spectrum in O((m + n) q²) instead of O(m n min(m, n)). For MINGLE the
    previous experts' sum Σ B_i A_i has q = T·r columns, far fewer than a ViT-B layer's 768 or 3072.
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    us, s, vsh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ us, s, (qa @ vsh.T).T


def project_out_previous(delta: torch.Tensor, previous: torch.Tensor | None, *,
                         factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Δ − U_ρ (U_ρᵀ Δ V_ρ) V_ρᵀ with (U, s, V) the SVD of the previous experts' sum (docs/methods.md, MINGLE).

    Only the ρ×ρ block of C = Uᵀ Δ V is removed (the part of Δ in *both* top-ρ subspaces); the
    official code's `.diag().fill_(0)` is a no-op, so the diagonal is NOT zeroed.
    The sum is given densely (`previous`) or as its factors (B_all, A_all) with previous = B_all A_all,
    which is the same SVD, exactly and much faster (`svd_of_product`).
    """
    if factors is not None:
        u, s, vh = svd_of_product(*factors)
    elif previous is None:
        return delta
    else:
        u, s, vh = torch.linalg.svd(previous.double(), full_matrices=False)
    rho = effective_rank(s)
    if rho == 0:
        return delta
    u_r, v_r = u[:, :rho], vh[:rho].T
    d = delta.double()
    return (d - u_r @ (u_r.T @ d @ v_r) @ v_r.T).to(delta.dtype)


def low_rank_expert(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B = U_r (orthonormal columns) and A = diag(S_r) V_rᵀ, so B·A is the rank-r truncation."""
    r = min(int(rank), *delta.shape)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    b = u[:, :r]
    a = s[:r, None] * vh[:r]
    return b.to(delta.dtype).contiguous(), a.to(delta.dtype).contiguous()


def relaxed_projection(grad: torch.Tensor, basis: torch.Tensor, score: torch.Tensor, *, beta: float,
                       gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of adaptive relaxation (docs/methods.md, MINGLE). Returns (projected gradient, updated S).

    grad (..., d_in); basis U (d_in, m) orthonormal; score S (m,). The alignment r_p is taken on the
    *un-projected* gradient, the EMA is updated *before* λ_p = exp(−γ S_p) is formed, and the
    relaxed projector I − U diag(λ) Uᵀ is applied in factored form.
    """
    if basis.shape[1] == 0:
        return grad, score
    g = grad.reshape(-1, grad.shape[-1])
    coeff = g @ basis  # (rows, m)
    alignment = coeff.abs().mean(0) / (g.norm() + 1e-12)  # one row in MINGLE: |<g, u_p>| / ||g||
    score = beta * score + (1.0 - beta) * alignment
    strength = torch.exp(-gamma * score)
    projected = g - (coeff * strength) @ basis.T
    return projected.reshape(grad.shape), score


def top_subspace(second_moment: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left singular vectors of the (PSD) uncentered second moment Σ x xᵀ, as (d_in, k).

    For a symmetric PSD matrix these are its top eigenvectors, so `eigh` (about twice as fast as an
    SVD: 3.7 s vs 7.8 s for ViT-B's 3072-wide fc2 input on 2 CPU cores) gives the same subspace.
    """
    k = min(int(k), second_moment.shape[0])
    if k <= 0:
        return second_moment.new_zeros(second_moment.shape[0], 0)
    _, vectors = torch.linalg.eigh(second_moment.double())  # ascending eigenvalues
    return vectors[:, -k:].flip(-1).to(second_moment.dtype).contiguous()


def accumulate_basis(previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """U ← Q of QR([U_prev | Ũ_t]) (docs/methods.md, MINGLE), capped at d_in columns (then U spans everything)."""
    stacked = torch.cat([previous, new], dim=1)
    q, _ = torch.linalg.qr(stacked.double())
    return q[:, : min(stacked.shape[1], stacked.shape[0])].to(new.dtype).contiguous()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """−mean_b Σ_c softmax(z_ft/T)_c · log_softmax(z_m/T)_c: soft-target CE, no T² (docs/methods.md, MINGLE)."""
    target = F.softmax(teacher_logits / temperature, dim=-1)
    return -(target * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# Modules: a gated linear layer and an attention block with q, k, v as separate linears
# ---------------------------------------------------------------------------------------------


class GatedLinear(nn.Module):
    """h = (W_0 + Σ_i ḡ_i B_i A_i) x + b_0 with one raw linear scalar gate per expert (docs/methods.md, MINGLE).

    W_0, b_0 and the experts are buffers (never trained). Gates of earlier tasks are frozen buffers;
    only the newest gate (`gate_w`, `gate_b`) is a Parameter. Inputs are batch-first (N, L, d_in).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "") -> None:
        super().__init__()
        self.name = name
        d_out, d_in = weight.shape
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("expert_b", torch.zeros(0, d_out, 0))  # (T, d_out, r)
        self.register_buffer("expert_a", torch.zeros(0, 0, d_in))  # (T, r, d_in)
        self.register_buffer("frozen_w", torch.zeros(0, d_in))  # gates of tasks < t
        self.register_buffer("frozen_b", torch.zeros(0))
        self.register_parameter("gate_w", None)  # newest gate, (1, d_in)
        self.register_parameter("gate_b", None)  # (1,)
        self.static_coef: float | None = None  # MINGLE-static: every gate is this constant
        self.batch_reduce = True

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def num_experts(self) -> int:
        return self.expert_b.shape[0]

    def expert_sum(self) -> torch.Tensor | None:
        """Σ_i B_i A_i, unweighted (what the next expert is projected against)."""
        if self.num_experts == 0:
            return None
        return torch.einsum("tor,tri->oi", self.expert_b, self.expert_a)

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B_all, A_all) with B_all A_all = Σ_i B_i A_i: [B_1 … B_T] (d_out, T·r) and [A_1; …; A_T] (T·r, d_in)."""
        if self.num_experts == 0:
            return None
        t, d_out, r = self.expert_b.shape
        return self.expert_b.permute(1, 0, 2).reshape(d_out, t * r), self.expert_a.reshape(t * r, -1)

    def add_expert(self, b: torch.Tensor, a: torch.Tensor, *, init_std: float = 0.01,
                   generator: torch.Generator | None = None) -> None:
        """Append a frozen expert and start its gate; the previous newest gate joins the frozen rows."""
        if self.gate_w is not None:
            self.frozen_w = torch.cat([self.frozen_w, self.gate_w.detach().clone()], 0)
            self.frozen_b = torch.cat([self.frozen_b, self.gate_b.detach().clone()], 0)
        r = b.shape[1]
        if self.num_experts and self.expert_b.shape[2] != r:
            raise ConfigError(f"{self.name}: expert rank {r} differs from earlier experts' {self.expert_b.shape[2]}")
        if self.num_experts == 0:
            self.expert_b = b[None].float().clone()
            self.expert_a = a[None].float().clone()
        else:
            self.expert_b = torch.cat([self.expert_b, b[None].float()], 0)
            self.expert_a = torch.cat([self.expert_a, a[None].float()], 0)
        # Drawn on the CPU generator whatever the device, so a seed gives the same gates on CPU and GPU.
        w = torch.randn(1, self.in_features, generator=generator) * init_std if init_std > 0 else \
            torch.zeros(1, self.in_features)
        self.gate_w = nn.Parameter(w.to(self.weight.device))
        self.gate_b = nn.Parameter(torch.zeros(1, device=self.weight.device))

    def gate_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All gates as (T, d_in), (T,): frozen rows, then the trainable newest one."""
        if self.gate_w is None:
            return self.frozen_w, self.frozen_b
        return torch.cat([self.frozen_w, self.gate_w], 0), torch.cat([self.frozen_b, self.gate_b], 0)

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """Raw per-token gate outputs g_i(x) for every expert: (..., T)."""
        w, b = self.gate_weights()
        return x @ w.T + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_experts == 0:
            return F.linear(x, self.weight, self.bias)
        if self.static_coef is not None:
            coef = torch.full((self.num_experts,), float(self.static_coef), device=x.device)
            return F.linear(x, self.weight + torch.einsum("t,tor,tri->oi", coef, self.expert_b, self.expert_a),
                            self.bias)
        if self.batch_reduce:
            # The gate is linear, so the mean of per-token outputs is the gate of the mean input.
            g = self.gate_values(x.reshape(-1, x.shape[-1]).mean(0))  # (T,)
            delta = torch.einsum("t,tor,tri->oi", g, self.expert_b, self.expert_a)
            return F.linear(x, self.weight + delta, self.bias)
        # Per-image routing: ḡ per sample, applied through the factors (no per-sample matrices).
        g = self.gate_values(x.mean(1))  # (N, T)
        low = torch.einsum("nli,tri->ntlr", x, self.expert_a)
        out = torch.einsum("ntlr,tor,nt->nlo", low, self.expert_b, g)
        return F.linear(x, self.weight, self.bias) + out


class SplitQKVAttention(nn.Module):
    """Drop-in for open_clip's `nn.MultiheadAttention` with q, k, v as three separate linears.

    open_clip fuses q, k, v into one `in_proj_weight` [3w, w] (rows q;k;v). MINGLE gives each its
    own expert and gate, i.e. three different merged matrices computed from three different gate
    values, which a fused projection cannot express. So the fused weight is split into three
    `GatedLinear`s (the same split engine/checkpoints.py makes for canonical names) and attention is
    recomputed from their outputs exactly as `nn.MultiheadAttention` does: heads of size w/H, softmax
    of q kᵀ / √(w/H), then `out_proj`. With no experts (or all gates 0) it matches the original block
    to float rounding (tests/test_mingle.py checks this).
    """

    def __init__(self, q_proj: GatedLinear, k_proj: GatedLinear, v_proj: GatedLinear, out_proj: GatedLinear,
                 num_heads: int, batch_first: bool = True) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads = num_heads
        self.batch_first = batch_first

    @classmethod
    def from_multihead(cls, attn: nn.MultiheadAttention, prefix: str = "") -> "SplitQKVAttention":
        w = attn.embed_dim
        if not attn._qkv_same_embed_dim:
            raise ConfigError(f"{prefix}: attention with separate k/v dimensions is not a CLIP ViT block")
        weight, bias = attn.in_proj_weight.detach(), attn.in_proj_bias
        parts = []
        for i, which in enumerate(("q_proj", "k_proj", "v_proj")):
            b = None if bias is None else bias.detach()[i * w:(i + 1) * w]
            parts.append(GatedLinear(weight[i * w:(i + 1) * w], b, f"{prefix}.{which}"))
        out = GatedLinear(attn.out_proj.weight.detach(), attn.out_proj.bias, f"{prefix}.out_proj")
        return cls(*parts, out, attn.num_heads, attn.batch_first)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, **_: object) -> tuple[torch.Tensor, None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, l_q, width = query.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, L, w) -> (N, H, L, w/H)
            return t.reshape(n, t.shape[1], heads, width // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # nn.MultiheadAttention: True = masked out; SDPA: True = attend. Use an additive mask.
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(n, l_q, width))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def canonical_linear_names(num_layers: int, which: Sequence[str]) -> list[str]:
    """Canonical names (no `.weight`) of the selected linears, block by block."""
    names = []
    for i in range(num_layers):
        for short in which:
            group = "self_attn" if short in _ATTN else "mlp"
            names.append(f"encoder.layers.{i}.{group}.{short}")
    return names


class MingleEncoder(nn.Module):
    """An open_clip `VisionTransformer` at θ_0 whose attention and MLP linears are `GatedLinear`s.

    `linears[canonical name]` gives every linear of every block (all six, so names line up with the
    checkpoints); only those in `selected` ever receive experts (docs/methods.md, MINGLE). Everything that
    is not an expert or a gate stays at θ_0 for the whole run.
    """

    def __init__(self, visual: nn.Module, layers: str = "all") -> None:
        super().__init__()
        if layers not in LAYER_SETS:
            raise ConfigError(f"unknown layer set {layers!r}: use one of {', '.join(LAYER_SETS)}")
        self.visual = visual
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.linears: dict[str, GatedLinear] = {}
        for i, block in enumerate(visual.transformer.resblocks):
            if not isinstance(block.attn, nn.MultiheadAttention):
                raise ConfigError("MINGLE needs open_clip ResidualAttentionBlocks with nn.MultiheadAttention "
                                  f"(block {i} has {type(block.attn).__name__})")
            prefix = f"encoder.layers.{i}"
            block.attn = SplitQKVAttention.from_multihead(block.attn, f"{prefix}.self_attn")
            fc1 = GatedLinear(block.mlp.c_fc.weight, block.mlp.c_fc.bias, f"{prefix}.mlp.fc1")
            fc2 = GatedLinear(block.mlp.c_proj.weight, block.mlp.c_proj.bias, f"{prefix}.mlp.fc2")
            block.mlp.c_fc, block.mlp.c_proj = fc1, fc2
            for short in _ATTN:
                self.linears[f"{prefix}.self_attn.{short}"] = getattr(block.attn, short)
            self.linears[f"{prefix}.mlp.fc1"] = fc1
            self.linears[f"{prefix}.mlp.fc2"] = fc2
        self.selected = canonical_linear_names(len(visual.transformer.resblocks), LAYER_SETS[layers])

    @classmethod
    def from_state_dict(cls, encoder: "EncoderFactory | Mapping", theta0: Mapping[str, torch.Tensor],
                        layers: str = "all") -> "MingleEncoder":
        return cls(encoder_factory(encoder)(theta0), layers)

    def gated(self) -> list[GatedLinear]:
        return [self.linears[n] for n in self.selected]

    def trainable_gates(self) -> list[nn.Parameter]:
        return [p for m in self.gated() for p in (m.gate_w, m.gate_b) if p is not None]

    def set_batch_reduce(self, flag: bool) -> None:
        for m in self.linears.values():
            m.batch_reduce = flag

    def set_static(self, coef: float | None) -> None:
        for m in self.linears.values():
            m.static_coef = coef

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


# ---------------------------------------------------------------------------------------------
# One continual step
# ---------------------------------------------------------------------------------------------

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # image features (N, D) -> logits (N, C)


def _cycling_batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled batches of indices that cycle over the seed set (a new permutation per pass)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]


@dataclass
class StepLog:
    task: str
    losses: list[float]
    seconds: dict[str, float]


class Mingle:
    """The continual merger: `init(θ_0)`, then `step(task, θ_t, seed images, head)` once per task.

    `encoder` builds the plain vision encoder for a canonical state dict (a suite's `build_encoder`, or
    open_clip VisionTransformer kwargs); `head(features) -> logits` is task t's
    frozen head at logit scale 100, used for both student and teacher (docs/methods.md, MINGLE). Everything
    (encoder, experts, gates, subspaces) lives on `device`; checkpoints and seed images may arrive on
    the CPU and are moved there. Random draws use a CPU generator, so results do not depend on it.
    """

    def __init__(self, encoder: "EncoderFactory | Mapping", config: MingleConfig | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.config = config or MingleConfig()
        validate_config(self.config)
        self.device = torch.device(device)
        self.build_encoder = encoder_factory(encoder)
        self.encoder: MingleEncoder | None = None
        self.theta0: dict[str, torch.Tensor] | None = None
        self.bases: dict[str, torch.Tensor] = {}  # U_l: protected input directions per layer
        self.tasks: list[str] = []
        self.logs: list[StepLog] = []
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def init(self, theta0: Mapping[str, torch.Tensor]) -> None:
        self.theta0 = {k: v for k, v in theta0.items()}
        self.encoder = MingleEncoder.from_state_dict(self.build_encoder, self.theta0, self.config.layers)
        self.encoder.to(self.device)
        self.encoder.set_batch_reduce(self.config.batch_reduce)
        self.encoder.set_static(self.config.static_coef if self.config.static else None)
        self.bases = {n: torch.zeros(m.in_features, 0, device=self.device)
                      for n, m in zip(self.encoder.selected, self.encoder.gated())}
        self.tasks, self.logs = [], []

    # -- experts ---------------------------------------------------------------------------------
    def add_experts(self, theta_t: Mapping[str, torch.Tensor]) -> None:
        """Projected, rank-r experts for every selected linear (docs/methods.md, MINGLE), and new gates."""
        assert self.encoder is not None and self.theta0 is not None, "call init(theta0) first"
        for name in self.encoder.selected:
            layer = self.encoder.linears[name]
            key = f"{name}.weight"
            delta = theta_t[key].to(self.device).float() - self.theta0[key].to(self.device).float()
            delta = project_out_previous(delta, None, factors=layer.expert_factors())
            b, a = low_rank_expert(delta, self.config.rank)
            layer.add_expert(b, a, init_std=self.config.gate_init_std, generator=self.generator)

    # -- adaptation ------------------------------------------------------------------------------
    def adapt(self, seed_images: torch.Tensor, teacher_logits: torch.Tensor, head: LogitsFn) -> list[float]:
        """50 Adam steps on the newest gates, distilling the fine-tuned model's soft targets."""
        cfg, enc = self.config, self.encoder
        params = enc.trainable_gates()
        if cfg.static or cfg.steps == 0 or not params:
            return []
        optimiser = torch.optim.Adam(params, lr=cfg.lr)
        project = cfg.projection and len(self.tasks) > 0  # nothing is protected at t = 1
        scores = {n: torch.zeros(self.bases[n].shape[1], device=self.device) for n in enc.selected}  # reset per task
        batches = _cycling_batches(len(seed_images), cfg.batch_size, self.generator)
        losses = []
        for _ in range(cfg.steps):
            idx = next(batches).to(seed_images.device)
            loss = distillation_loss(head(enc(seed_images[idx])), teacher_logits[idx], cfg.temperature)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if project:
                with torch.no_grad():
                    for name, layer in zip(enc.selected, enc.gated()):
                        if layer.gate_w.grad is None:
                            continue
                        # Only the weight gradient is projected; the bias gradient never.
                        layer.gate_w.grad, scores[name] = relaxed_projection(
                            layer.gate_w.grad, self.bases[name], scores[name], beta=cfg.beta, gamma=cfg.gamma)
            optimiser.step()
            losses.append(float(loss.detach()))
        optimiser.zero_grad(set_to_none=True)
        return losses

    # -- null space ------------------------------------------------------------------------------
    @torch.no_grad()
    def update_subspaces(self, seed_images: torch.Tensor) -> None:
        """U_l ← QR([U_l | top-k of Σ_tokens x xᵀ]) on the *adapted* model's layer inputs."""
        cfg, enc = self.config, self.encoder
        if cfg.subspace_k == 0:
            return
        moments = {n: torch.zeros(m.in_features, m.in_features, device=self.device)
                   for n, m in zip(enc.selected, enc.gated())}

        def hook(name):
            def fn(module, inputs):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                moments[name] += x.T @ x  # uncentred, unnormalised, all tokens of all images
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in zip(enc.selected, enc.gated())]
        try:
            for start in range(0, len(seed_images), cfg.batch_size):
                enc(seed_images[start:start + cfg.batch_size])
        finally:
            for h in handles:
                h.remove()
        for name in enc.selected:
            self.bases[name] = accumulate_basis(self.bases[name], top_subspace(moments[name], cfg.subspace_k))

    # -- the whole step --------------------------------------------------------------------------
    def step(self, task: str, theta_t: Mapping[str, torch.Tensor], seed_images: torch.Tensor, head: LogitsFn,
             teacher: Callable[[torch.Tensor], torch.Tensor] | None = None) -> MingleEncoder:
        """Merge task t; returns the encoder (features = encoder(images)), ready to evaluate.

        `teacher(images) -> logits` defaults to θ_t's own encoder with the same head. The teacher is
        deterministic, so its logits on the seed set are computed once, not per batch.
        """
        seconds: dict[str, float] = {}
        seed_images = seed_images.to(self.device)
        clock = time.perf_counter()
        self.add_experts(theta_t)
        seconds["experts"] = time.perf_counter() - clock
        losses: list[float] = []
        if not self.config.static and self.config.steps > 0:
            clock = time.perf_counter()
            with torch.no_grad():
                if teacher is None:
                    teacher_encoder = self.build_encoder(theta_t).to(self.device)
                    teacher = lambda x: head(teacher_encoder(x))  # noqa: E731
                teacher_logits = torch.cat([teacher(seed_images[i:i + 256]) for i in range(0, len(seed_images), 256)])
            seconds["teacher"] = time.perf_counter() - clock
            clock = time.perf_counter()
            self.encoder.train()
            losses = self.adapt(seed_images, teacher_logits, head)
            self.encoder.eval()
            seconds["adapt"] = time.perf_counter() - clock
            clock = time.perf_counter()
            self.update_subspaces(seed_images)
            seconds["subspaces"] = time.perf_counter() - clock
        self.tasks.append(task)
        self.logs.append(StepLog(task, losses, seconds))
        return self.encoder


EncoderFactory = Callable[[Mapping[str, torch.Tensor]], nn.Module]


def encoder_factory(encoder: "EncoderFactory | Mapping") -> EncoderFactory:
    """canonical state -> plain encoder: a suite's `build_encoder`, or built from VisionTransformer kwargs."""
    if callable(encoder):
        return encoder
    kwargs = dict(encoder)
    return lambda state: build_encoder(kwargs, state)


def build_encoder(model_config: Mapping, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain open_clip VisionTransformer (from its kwargs) holding a canonical state dict, in eval mode."""
    visual = vision_tower(model_config)
    load_canonical(visual, state)
    for p in visual.parameters():
        p.requires_grad_(False)
    return visual


class MingleContinual:
    """`Mingle` behind the continual interface: `encoder` is what `Mingle` takes (a suite's
    `build_encoder`, or VisionTransformer kwargs)."""

    name = "mingle"

    def __init__(self, config: MingleConfig | None = None, *, encoder: EncoderFactory | Mapping | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.config = config or MingleConfig()
        if encoder is None:
            raise ConfigError("MINGLE needs the suite's encoder (suite.build_encoder) to build its gated model")
        self.mingle = Mingle(encoder, self.config, device=device)

    def init(self, theta0: Mapping[str, torch.Tensor]) -> None:
        self.mingle.init(theta0)

    def step(self, task, theta_t, seed_images, head) -> nn.Module:
        return self.mingle.step(task, theta_t, seed_images, head)


METHOD = register(MethodSpec(
    name="mingle", label="MINGLE",
    summary="Low-rank experts per task with test-time-trained gates, kept out of earlier tasks' input subspaces.",
    family="continual", Config=MingleConfig, continual=MingleContinual))
