"""MINGLE's per-task cost on a ViT-B/32-sized tower (random weights), against the paper's ≈ 10 s/task.

The paper reports 78 s for 8 tasks (9.8 s per task) on a GPU with CLIP ViT-B/32 (docs/methods.md, reference numbers):
experts by SVD for every selected linear, the teacher's logits on the seed set, 50 Adam steps of
batch 16 on the newest gates, and the null-space subspaces. This script times exactly that
(engine.methods.mingle.Mingle.step) on an open_clip VisionTransformer of ViT-B/32's shape (224 px,
patch 32, width 768, 12 layers, 12 heads, output 512) with random weights, random task vectors
(θ_t = θ_0 + noise) and random seed images, so it needs no checkpoint. Accuracy means nothing here;
only time does.

Baseline, same process and device: the same number of forward + backward passes through the plain
(un-gated) tower, i.e. what any test-time adaptation of this model costs before MINGLE's experts,
gates and projections; the ratio is MINGLE's overhead on top of it.

    python benchmarks/mingle_vitb32.py --device cuda            # the real measurement (a GPU)
    python benchmarks/mingle_vitb32.py --device cpu --tasks 2 --steps 2 --classes 4 --seeds-per-class 2
                                                                # a smoke run on a CPU (minutes per full task)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.checkpoints import open_clip_to_canonical  # noqa: E402
from engine.device import resolve_device  # noqa: E402
from engine.methods.mingle import Mingle, MingleConfig, build_encoder  # noqa: E402

VIT_B32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512)
PAPER_S_PER_TASK = 78.0 / 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_theta0(seed: int) -> dict[str, torch.Tensor]:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    canonical, _ = open_clip_to_canonical(VisionTransformer(**VIT_B32).state_dict())
    return {k: v.float() for k, v in canonical.items()}


def random_expert(theta0: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """θ_0 + a dense random change of ~2 % of each matrix's RMS (full rank, as a real fine-tune's)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in theta0.items():
        if v.is_floating_point() and v.ndim == 2:
            out[k] = v + scale * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=gen)
        else:
            out[k] = v
    return out


def plain_adaptation_seconds(theta0, images, head, steps: int, batch: int, device: torch.device) -> float:
    """`steps` forward+backward passes of the plain tower at `batch` (the cost floor of any TTA)."""
    encoder = build_encoder(VIT_B32, theta0).to(device)
    for p in encoder.parameters():
        p.requires_grad_(True)
    sync(device)
    start = time.perf_counter()
    for s in range(steps):
        idx = torch.arange(s * batch, (s + 1) * batch, device=device) % len(images)
        loss = head(encoder(images[idx])).logsumexp(-1).mean()
        loss.backward()
    sync(device)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--tasks", type=int, default=8, help="tasks merged one after another (paper: 8)")
    parser.add_argument("--steps", type=int, default=50, help="adaptation steps per task (50)")
    parser.add_argument("--classes", type=int, default=10, help="classes per task (the seed set is classes × seeds)")
    parser.add_argument("--seeds-per-class", type=int, default=5)
    parser.add_argument("--layers", default="all", choices=("all", "qkv-fc1", "attn-fc1"))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    theta0 = random_theta0(0)
    gen = torch.Generator().manual_seed(1)
    n_seed = args.classes * args.seeds_per_class
    heads = [torch.nn.functional.normalize(torch.randn(args.classes, VIT_B32["output_dim"], generator=gen), dim=-1)
             .to(device) for _ in range(args.tasks)]
    images = [torch.randn(n_seed, 3, 224, 224, generator=gen) for _ in range(args.tasks)]

    def head_fn(weights):
        return lambda f: 100.0 * torch.nn.functional.normalize(f, dim=-1) @ weights.T

    config = MingleConfig(steps=args.steps, layers=args.layers, rank=args.rank)
    mingle = Mingle(VIT_B32, config, device=device)
    mingle.init(theta0)
    print(f"MINGLE on a random ViT-B/32-sized tower ({sum(v.numel() for v in theta0.values()) / 1e6:.1f} M "
          f"parameters), device {device}, {args.tasks} tasks, {args.steps} steps of batch {config.batch_size}, "
          f"seed set {n_seed} images, layers {args.layers}, r = {args.rank}")
    print(f"{'task':<6}{'experts':>9}{'teacher':>9}{'adapt':>9}{'subspace':>10}{'total s':>9}")
    per_task = []
    for t in range(args.tasks):
        expert = random_expert(theta0, seed=100 + t)
        sync(device)
        start = time.perf_counter()
        mingle.step(f"task{t + 1}", expert, images[t], head_fn(heads[t]))
        sync(device)
        per_task.append(time.perf_counter() - start)
        s = mingle.logs[-1].seconds
        print(f"{t + 1:<6}{s.get('experts', 0):9.2f}{s.get('teacher', 0):9.2f}{s.get('adapt', 0):9.2f}"
              f"{s.get('subspaces', 0):10.2f}{per_task[-1]:9.2f}")
        del expert

    plain = plain_adaptation_seconds(theta0, images[-1].to(device), head_fn(heads[-1]), args.steps,
                                     config.batch_size, device)
    adapt = statistics.mean(log.seconds.get("adapt", 0.0) for log in mingle.logs)
    mean = statistics.mean(per_task)
    print(f"per task: mean {mean:.2f} s (first {per_task[0]:.2f} s, last {per_task[-1]:.2f} s); "
          f"paper ≈ {PAPER_S_PER_TASK:.1f} s/task -> ours / paper = {mean / PAPER_S_PER_TASK:.2f}")
    print(f"baseline: {args.steps} plain forward+backward steps of the un-gated tower: {plain:.2f} s; "
          f"MINGLE's adaptation phase / baseline = {adapt / plain:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
