"""Tiny real checkpoints for tests: open_clip vision towers saved the way published ones are."""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file


def tiny_tower(seed: int = 0) -> open_clip.model.VisionTransformer:
    torch.manual_seed(seed)
    return open_clip.model.VisionTransformer(image_size=16, patch_size=8, width=16, layers=2, heads=2,
                                             mlp_ratio=2.0, output_dim=8)


def write_tiny_zoo_files(folder: Path, n_experts: int = 3, seed: int = 0) -> tuple[Path, list[Path]]:
    """pretrained.safetensors plus expert_i.safetensors (open_clip `visual.` keys), experts = base + noise."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {f"visual.{k}": v.detach().clone() for k, v in tiny_tower(seed).state_dict().items()}
    base_path = folder / "pretrained.safetensors"
    save_file(base, str(base_path))
    gen = torch.Generator().manual_seed(seed + 1)
    experts = []
    for i in range(n_experts):
        scale = 0.05 * (i + 1)
        tensors = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        path = folder / f"task{i + 1}.safetensors"
        save_file(tensors, str(path))
        experts.append(path)
    return base_path, experts
