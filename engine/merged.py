"""A merged checkpoint with its provenance: one function for `merge --out` and the app's download.

The file is safetensors under canonical names; its metadata says what made it: the method and
hyperparameters, the tasks, the pretrained and expert files with their SHA-256, the tensors that
were merged and those kept at the pretrained values because no expert has them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .checkpoints import METADATA_KEY, save_safetensors
from .task_vectors import TaskVectorStack


def provenance(stack: TaskVectorStack, method, config) -> dict[str, Any]:
    """What made a merge of `stack`: method, settings, and the source files with their hashes."""
    readers = stack.sources.get("readers", [])
    experts = stack.sources.get("experts", [])
    return {
        "method": method.name,
        "hyperparameters": dataclasses.asdict(config),
        "tasks": list(stack.tasks),
        "base": {"path": stack.sources.get("base"), "sha256": readers[0].sha256() if readers else None},
        "experts": [{"task": t, "path": p, "sha256": r.sha256()}
                    for t, p, r in zip(stack.tasks, experts, readers[1:])],
        "merged_tensors": len(stack.names),
        "kept_from_base": list(stack.kept_from_base),
    }


def merge_with_provenance(stack: TaskVectorStack, method, config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(θ_0 + merged task vector as CPU tensors, provenance metadata)."""
    merged = stack.apply(method.merge(stack, config))
    return merged, provenance(stack, method, config)


def write_merged(path: str | Path, merged: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write atomically (engine.checkpoints.save_safetensors)."""
    return save_safetensors(path, merged, metadata)


def merged_bytes(stack: TaskVectorStack, method, config) -> bytes:
    """The same file as `merge --out` writes, as bytes (the app's download button)."""
    merged, metadata = merge_with_provenance(stack, method, config)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in merged.items()}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True), "format": "pt"}
    return safetensors.torch.save(tensors, metadata=header)
