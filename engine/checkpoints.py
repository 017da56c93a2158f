"""Load, validate, normalise and save CLIP ViT vision-tower checkpoints (docs/checkpoints.md).

Every merge method works on one naming, the *canonical* one: Hugging Face `CLIPVisionModel` key
names without the `vision_model.` prefix, plus `visual_projection.weight` ([out_dim, width]).
open_clip and HF files are mapped onto it without instantiating any model class, so merging code
never sees a format difference and per-module statistics are comparable across sources.

Checkpoints are read lazily: `open_checkpoint` only parses headers (safetensors) or memory-maps
(PyTorch zip files), and `CheckpointReader.tensor` reads one tensor at a time, so memory does not
grow with the number of experts. Nothing is ever unpickled with `weights_only=False`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import safetensors
import safetensors.torch
import torch

from engine.errors import CheckpointError

CANONICAL_FORMAT = "canonical"  # keys already canonical (e.g. our own merged outputs)
OPEN_CLIP_FORMAT = "open_clip"
HF_FORMAT = "hf_clip_vision"

METADATA_KEY = "merge_explorer"  # the one safetensors metadata entry we write (a JSON string)

ACCEPTED = (
    "expected a .safetensors, .pt, .pth or .bin state dict, or a Hugging Face model directory "
    "with model.safetensors or pytorch_model.bin (optionally sharded with an .index.json)"
)

# Files looked for, in order, when a directory is given (docs/checkpoints.md; the open_clip names are what
# open_clip's hub export writes).
_DIRECTORY_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")

# --------------------------------------------------------------------------------------------
# The open_clip <-> canonical mapping: the table of docs/checkpoints.md, in one place, used by the
# reader and by both eager conversions. `{i}` is a layer index, `{p}` weight|bias, `{qkv}` q|k|v.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    open_clip: str  # name under open_clip's `visual.` prefix
    canonical: str  # HF CLIPVisionModel name without `vision_model.`
    op: str = "copy"  # "copy" | "qkv" (fused q;k;v along dim 0) | "transpose"


_RULES = (
    _Rule("conv1.weight", "embeddings.patch_embedding.weight"),
    _Rule("class_embedding", "embeddings.class_embedding"),
    _Rule("positional_embedding", "embeddings.position_embedding.weight"),
    _Rule("ln_pre.{p}", "pre_layrnorm.{p}"),  # sic: HF's misspelling is real
    _Rule("transformer.resblocks.{i}.ln_1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    _Rule("transformer.resblocks.{i}.ln_2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    # in_proj_weight [3w, w] / in_proj_bias [3w] stack q;k;v in that order along dim 0.
    _Rule(
        "transformer.resblocks.{i}.attn.in_proj_{p}",
        "encoder.layers.{i}.self_attn.{qkv}_proj.{p}",
        "qkv",
    ),
    _Rule(
        "transformer.resblocks.{i}.attn.out_proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}"
    ),
    _Rule("transformer.resblocks.{i}.mlp.c_fc.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    _Rule("transformer.resblocks.{i}.mlp.c_proj.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    _Rule("ln_post.{p}", "post_layernorm.{p}"),
    # open_clip's proj is [width, out_dim]; an nn.Linear weight is [out_dim, width].
    _Rule("proj", "visual_projection.weight", "transpose"),
)
QKV = ("q", "k", "v")
_FIELDS = {"i": r"\d+", "p": "weight|bias", "qkv": "q|k|v"}


def key_pattern(template: str) -> re.Pattern[str]:
    """A regex for a key template: `{i}` a layer index, `{p}` weight|bias, `{qkv}` q|k|v (named groups)."""
    pattern = re.escape(template)
    for field, alternatives in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>{alternatives})")
    return re.compile(pattern)


_COMPILED = tuple((rule, key_pattern(rule.open_clip), key_pattern(rule.canonical)) for rule in _RULES)


def _match_open_clip(name: str) -> tuple[_Rule, dict[str, str]] | None:
    for rule, open_clip_re, _ in _COMPILED:
        if m := open_clip_re.fullmatch(name):
            return rule, m.groupdict()
    return None


def _match_canonical(name: str) -> tuple[_Rule, dict[str, str]] | None:
    for rule, _, canonical_re in _COMPILED:
        if m := canonical_re.fullmatch(name):
            return rule, m.groupdict()
    return None


@dataclass(frozen=True)
class _Entry:
    """Where one canonical tensor comes from: a raw key and how to transform it."""

    raw_key: str
    op: str = "copy"
    part: int = 0  # for "qkv": 0, 1, 2 = q, k, v


def _plan_open_clip(keys: Sequence[str], label: str) -> tuple[dict[str, _Entry], list[str]]:
    """Map open_clip keys to canonical names; keys outside the vision tower are dropped."""
    # The tower's prefix is whatever precedes conv1.weight: `visual.`, `model.visual.`
    # (task_vectors ImageEncoder saves) or nothing for a bare tower.
    anchors = [k for k in keys if k == "conv1.weight" or k.endswith(".conv1.weight")]
    if len(anchors) != 1:
        found = "no" if not anchors else f"{len(anchors)}"
        raise CheckpointError(
            f"{label}: open_clip layout with {found} vision tower(s) (looked for one "
            f"'visual.conv1.weight'); pass a checkpoint with exactly one CLIP image encoder"
        )
    prefix = anchors[0][: -len("conv1.weight")]
    plan: dict[str, _Entry] = {}
    dropped: list[str] = []
    for key in keys:
        if not key.startswith(prefix):
            dropped.append(key)  # text leftovers: token_embedding, ln_final, logit_scale, ...
            continue
        match = _match_open_clip(key[len(prefix) :])
        if match is None:
            raise CheckpointError(
                f"{label}: open_clip tensor '{key}' has no counterpart in the CLIP ViT layout "
                f"(docs/checkpoints.md); only standard ViT image towers can be merged"
            )
        rule, fields = match
        if rule.op == "qkv":
            for part, which in enumerate(QKV):
                plan[rule.canonical.format(qkv=which, **fields)] = _Entry(key, "qkv", part)
        else:
            plan[rule.canonical.format(**fields)] = _Entry(key, rule.op)
    return plan, sorted(dropped)


_HF_TEXT = ("text_model.", "text_projection.", "logit_scale")


def _plan_hf(keys: Sequence[str], label: str) -> tuple[dict[str, _Entry], list[str]]:
    """Map HF CLIPVisionModel / CLIPModel keys (with or without `vision_model.`) to canonical."""
    plan: dict[str, _Entry] = {}
    dropped: list[str] = []
    for key in keys:
        if key.endswith("embeddings.position_ids"):
            continue  # int64 index buffer in older saves, not a weight
        if key.startswith(_HF_TEXT):
            dropped.append(key)
            continue
        # transformers < 5 saves `vision_model.` prefixes, >= 5 does not.
        name = key.removeprefix("vision_model.")
        if _match_canonical(name) is None:
            raise CheckpointError(
                f"{label}: tensor '{key}' is not part of a CLIP ViT vision tower "
                f"(docs/checkpoints.md); only CLIPVisionModel / CLIPModel weights can be merged"
            )
        if name in plan:
            raise CheckpointError(
                f"{label}: tensor '{name}' appears both with and without the 'vision_model.' "
                f"prefix; keep one copy"
            )
        plan[name] = _Entry(key)
    return plan, sorted(dropped)


def _plan(keys: Sequence[str], label: str) -> tuple[str, dict[str, _Entry], list[str]]:
    """Detect the layout from key patterns (docs/checkpoints.md) and map it to canonical names."""
    is_open_clip = any("in_proj_weight" in k or "resblocks" in k for k in keys)
    is_hf = any("self_attn.q_proj" in k for k in keys)
    if is_open_clip and is_hf:
        raise CheckpointError(
            f"{label}: mixes open_clip ('in_proj_weight') and HF ('self_attn.q_proj') key layouts; "
            f"pass one model per file"
        )
    if is_open_clip:
        plan, dropped = _plan_open_clip(keys, label)
        fmt = OPEN_CLIP_FORMAT
    elif is_hf:
        plan, dropped = _plan_hf(keys, label)
        fmt = HF_FORMAT
    else:
        example = sorted(keys)[0] if keys else "(none)"
        raise CheckpointError(
            f"{label}: unrecognised key layout (e.g. '{example}'); expected open_clip "
            f"('visual.transformer.resblocks.*') or HF CLIP ('vision_model.encoder.layers.*') names"
        )
    if not plan:
        raise CheckpointError(f"{label}: contains no vision-tower tensors; {ACCEPTED}")
    return fmt, plan, dropped


# --------------------------------------------------------------------------------------------
# Raw sources: per-key metadata without reading data, and per-key (row-sliced) reads.
# --------------------------------------------------------------------------------------------


class _Source(Protocol):
    def keys(self) -> list[str]: ...
    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]: ...
    def read(self, key: str, rows: slice | None = None) -> torch.Tensor: ...


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _safe_open(file: Path) -> Any:
    try:
        return safetensors.safe_open(str(file), framework="pt")
    except Exception as exc:  # SafetensorError, OSError: the file is the user's problem, not ours
        raise CheckpointError(
            f"{file}: truncated or corrupt safetensors file ({_first_line(exc)}); "
            f"re-download or re-export it"
        ) from exc


class _SafetensorsSource:
    """One or more memory-mapped safetensors files (shards) seen as one key space."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.handles = [_safe_open(f) for f in files]
        self.metadata: dict[str, str] = self.handles[0].metadata() or {}
        self._by_key: dict[str, Any] = {}
        for file, handle in zip(files, self.handles):
            for key in handle.keys():
                if key in self._by_key:
                    raise CheckpointError(f"{file}: tensor '{key}' is also in another shard")
                self._by_key[key] = handle

    def keys(self) -> list[str]:
        return list(self._by_key)

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        view = self._by_key[key].get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
        if dtype is None:
            raise CheckpointError(
                f"tensor '{key}' has unsupported safetensors dtype {view.get_dtype()}"
            )
        return tuple(view.get_shape()), dtype

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        if rows is None:
            return self._by_key[key].get_tensor(key)
        return self._by_key[key].get_slice(key)[rows]  # reads only those rows


def _torch_load(file: Path) -> Any:
    """torch.load with weights_only=True, memory-mapped when the file format allows it."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (pre-zipfile) files cannot be memory-mapped; they are loaded whole.
            return torch.load(file, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(
                f"{file}: truncated or corrupt PyTorch file ({_first_line(exc)})"
            ) from exc
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it pickles '{found.group(1)}')" if found else ""
        raise CheckpointError(
            f"{file}: contains pickled Python objects, e.g. a whole nn.Module as task_vectors "
            f"saves{what}, which are unsafe to load (they can run arbitrary code); convert it "
            f"offline to a state dict or .safetensors (docs/checkpoints.md)"
        ) from exc
    except Exception as exc:  # RuntimeError, EOFError, KeyError...: torch's way of saying "corrupt"
        raise CheckpointError(
            f"{file}: truncated or corrupt PyTorch file ({_first_line(exc)}); "
            f"re-download or re-export it"
        ) from exc


class _TorchSource:
    """One or more `torch.save`d state dicts (memory-mapped when possible)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self.skipped: list[str] = []  # non-tensor entries (e.g. an epoch counter)
        for file in files:
            obj = _torch_load(file)
            if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
                obj = obj["state_dict"]  # training checkpoints wrap the weights
            if not isinstance(obj, Mapping):
                raise CheckpointError(
                    f"{file}: holds a {type(obj).__name__}, not a state dict; save "
                    f"model.state_dict() instead"
                )
            for key, value in obj.items():
                if not isinstance(value, torch.Tensor):
                    self.skipped.append(str(key))
                elif key in self._tensors:
                    raise CheckpointError(f"{file}: tensor '{key}' is also in another shard")
                else:
                    self._tensors[str(key)] = value

    def keys(self) -> list[str]:
        return list(self._tensors)

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        tensor = self._tensors[key]
        return tuple(tensor.shape), tensor.dtype

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        tensor = self._tensors[key] if rows is None else self._tensors[key][rows]
        # A copy: the caller owns it, and in-place edits never touch the mapped file's pages.
        return tensor.clone()


class _DictSource:
    """An in-memory state dict, for the eager conversions."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(self._tensors[key].shape), self._tensors[key].dtype

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        return self._tensors[key] if rows is None else self._tensors[key][rows]


def _entry_spec(source: _Source, entry: _Entry) -> tuple[tuple[int, ...], torch.dtype]:
    shape, dtype = source.spec(entry.raw_key)
    if entry.op == "qkv":
        return (shape[0] // 3, *shape[1:]), dtype
    if entry.op == "transpose":
        return tuple(reversed(shape)), dtype
    return shape, dtype


def _entry_read(source: _Source, entry: _Entry) -> torch.Tensor:
    if entry.op == "qkv":
        rows = source.spec(entry.raw_key)[0][0] // 3
        return source.read(entry.raw_key, slice(entry.part * rows, (entry.part + 1) * rows))
    if entry.op == "transpose":
        return source.read(entry.raw_key).t().contiguous()
    return source.read(entry.raw_key)


def _check_plan_shapes(source: _Source, plan: Mapping[str, _Entry], label: str) -> None:
    """Fail at open time, not mid-merge, on tensors the mapping cannot split or transpose."""
    for entry in {e for e in plan.values() if e.op != "copy"}:
        shape, _ = source.spec(entry.raw_key)
        if entry.op == "qkv" and (not shape or shape[0] % 3):
            raise CheckpointError(
                f"{label}: tensor '{entry.raw_key}' has shape {shape}, whose first dimension "
                f"is not 3 x width (fused q;k;v, docs/checkpoints.md)"
            )
        if entry.op == "transpose" and len(shape) != 2:
            raise CheckpointError(
                f"{label}: tensor '{entry.raw_key}' has shape {shape} but a projection must be 2-D"
            )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class CheckpointReader:
    """Lazy, memory-mapped view of one checkpoint in canonical names. Reads one tensor at a time.

    Created by `open_checkpoint`. `keys`/`spec` touch metadata only, so all experts can be
    validated before any weight is read; `tensor` returns a fresh tensor the caller owns.
    """

    def __init__(
        self,
        path: Path,
        format: str,
        source: _Source,
        plan: Mapping[str, _Entry],
        dropped_keys: list[str],
        files: Sequence[Path],
    ) -> None:
        self.path = path
        self.format = format
        self.dropped_keys = dropped_keys
        self._source = source
        self._plan = dict(plan)
        self._files = list(files)
        self._sha256: str | None = None

    def keys(self) -> list[str]:
        """Canonical tensor names, sorted."""
        return sorted(self._plan)

    def __contains__(self, name: object) -> bool:
        return name in self._plan

    def __len__(self) -> int:
        return len(self._plan)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._plan[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor '{name}' (see .keys())") from None

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a canonical tensor, from the file header; no data is read."""
        return _entry_spec(self._source, self._entry(name))

    def tensor(self, name: str) -> torch.Tensor:
        """Read one canonical tensor (for open_clip q/k/v only that third of in_proj is read)."""
        return _entry_read(self._source, self._entry(name))

    def sha256(self) -> str:
        """Hex SHA-256 of the file on disk (of the shards' hashes, in name order, if sharded).

        Lazy and cached: hashing a large file takes seconds, and callers key caches on it.
        """
        if self._sha256 is None:
            hashes = [(f.name, _file_sha256(f)) for f in self._files]
            if len(hashes) == 1:
                self._sha256 = hashes[0][1]
            else:
                combined = "".join(f"{name}\0{digest}\n" for name, digest in sorted(hashes))
                self._sha256 = hashlib.sha256(combined.encode()).hexdigest()
        return self._sha256

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, format={self.format!r}, tensors={len(self)})"


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sharded_files(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Shard files named by an HF `*.index.json` (its weight_map), all of which must exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{index}: not a valid shard index with a 'weight_map' ({_first_line(exc)})"
        ) from exc
    files = [index.parent / shard for shard in shards]
    for file in files:
        if not file.is_file():
            raise CheckpointError(
                f"{index}: shard '{file.name}' listed in the index is missing; download all shards"
            )
    return files, weight_map


def _locate(path: Path) -> tuple[str, list[Path], dict[str, str]]:
    """Resolve a user path to ("safetensors" | "torch", files, weight_map of a sharded index)."""
    if path.is_dir():
        for name in _DIRECTORY_FILES:
            if (path / name).is_file():
                return _locate(path / name)
        raise CheckpointError(f"{path}: directory holds no model weights; {ACCEPTED}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory; {ACCEPTED}")
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return ("safetensors", *_sharded_files(path))
    if name.endswith(".bin.index.json") or name.endswith(".pt.index.json"):
        return ("torch", *_sharded_files(path))
    if name.endswith(".safetensors"):
        return "safetensors", [path], {}
    if name.endswith(_TORCH_SUFFIXES):
        return "torch", [path], {}
    raise CheckpointError(f"{path}: unsupported file type '{path.suffix}'; {ACCEPTED}")


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a checkpoint lazily and map it to canonical names (docs/checkpoints.md).

    Accepts a .safetensors file, a .pt/.pth/.bin state dict (weights_only=True, optionally under
    a `state_dict` entry), or an HF model directory (single or sharded safetensors or
    pytorch_model.bin).
    Raises CheckpointError, naming the path, for anything else.
    """
    path = Path(path)
    kind, files, weight_map = _locate(path)
    source: _Source
    skipped: list[str] = []
    if kind == "safetensors":
        source = _SafetensorsSource(files)
        metadata = source.metadata
    else:
        source = _TorchSource(files)
        skipped, metadata = source.skipped, {}
    raw_keys = source.keys()
    present = set(raw_keys)
    for key, shard in weight_map.items():
        if key not in present:
            raise CheckpointError(
                f"{path}: tensor '{key}' listed in the index is not in shard '{shard}'; "
                f"re-download the shards"
            )
    if not raw_keys:
        raise CheckpointError(f"{path}: contains no tensors; {ACCEPTED}")
    fmt, plan, dropped = _plan(raw_keys, str(path))
    _check_plan_shapes(source, plan, str(path))
    if fmt == HF_FORMAT and METADATA_KEY in metadata:
        fmt = CANONICAL_FORMAT  # written by save_safetensors: same names, but our own output
    return CheckpointReader(path, fmt, source, plan, sorted(dropped + skipped), files)


def validate_compatible(readers: Sequence[CheckpointReader]) -> list[str]:
    """Check that every expert (readers[1:]) has the pretrained model's (readers[0]) tensors, shapes
    and dtypes; return the pretrained tensors that NO expert has.

    Those stay at θ_0 in a merge: FusionBench's experts are HF CLIPVisionModel folders without the
    visual projection, which then comes from the pretrained CLIP (callers report the list). A tensor
    that some experts have and others lack is an error. Metadata only, so a mismatched expert fails
    in milliseconds, before any heavy work (docs/checkpoints.md). Raises CheckpointError naming the
    first offending file and tensor.
    """
    if not readers:
        return []
    base = readers[0]
    base_keys = set(base.keys())
    experts = list(readers[1:])
    absent_everywhere = base_keys - set().union(*(set(r.keys()) for r in experts)) if experts else set()
    fix = f"all checkpoints must be fine-tuned from the same base model as {base.path}"
    for reader in experts:
        keys = set(reader.keys())
        if missing := sorted(base_keys - keys - absent_everywhere):
            raise CheckpointError(
                f"{reader.path}: is missing tensor '{missing[0]}' present in the pretrained "
                f"model; {fix}"
            )
        if extra := sorted(keys - base_keys):
            raise CheckpointError(
                f"{reader.path}: has extra tensor '{extra[0]}' not in the pretrained model; {fix}"
            )
        for name in sorted(keys):
            (shape, dtype), (base_shape, base_dtype) = reader.spec(name), base.spec(name)
            if shape != base_shape:
                raise CheckpointError(
                    f"{reader.path}: tensor '{name}' has shape {shape} but the pretrained model "
                    f"has {base_shape}; {fix}"
                )
            if dtype != base_dtype:
                raise CheckpointError(
                    f"{reader.path}: tensor '{name}' has dtype {dtype} but the pretrained model "
                    f"has {base_dtype}; convert the checkpoints to one dtype"
                )
    return sorted(absent_everywhere)


def check_finite(name: str, tensor: torch.Tensor, path: str | Path) -> None:
    """Raise if a tensor holds NaN or Inf: a diverged fine-tune would silently poison a merge."""
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise CheckpointError(
                f"{path}: tensor '{name}' contains NaN or Inf values ({bad} of {tensor.numel()} "
                f"entries); re-export the checkpoint or drop it from the merge"
            )


def _owned_cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().to("cpu").contiguous()
    # A view into a larger storage (e.g. q of a fused in_proj) would make safetensors refuse
    # shared memory or write the whole storage; give it its own.
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def save_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write canonical tensors and JSON metadata to `path` atomically.

    Writes a temp file in the same directory, fsyncs it and renames it over `path`, so a crash or
    error never leaves a half-written merge where a good file was. `metadata` (method,
    hyperparameters, source hashes, ...) is stored as one JSON string under "merge_explorer".
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: merged weights are saved as .safetensors; choose a path ending in "
            f".safetensors"
        )
    header = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True), "format": "pt"}
    prepared = {name: _owned_cpu_contiguous(tensor) for name, tensor in tensors.items()}
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot write here ({_first_line(exc)}); check that the directory exists "
            f"and is writable"
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        safetensors.torch.save_file(prepared, str(tmp), metadata=header)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a saved model should be readable
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"{path}: could not be written ({_first_line(exc)}); check free disk space"
            ) from exc
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; not possible on every platform, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata mapping `save_safetensors` stored in `path` ({} for files we did not write)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(
            f"{path}: not a .safetensors file; metadata is only stored in our .safetensors outputs"
        )
    raw = (_safe_open(path).metadata() or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(
            f"{path}: '{METADATA_KEY}' metadata is not valid JSON ({_first_line(exc)})"
        ) from exc


def open_clip_to_canonical(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Eager version of the reader's mapping: (canonical tensors, dropped keys).

    q/k/v are views of in_proj (no copy), like `torch.chunk`; `visual_projection.weight` is a
    transposed copy of `proj`.
    """
    source = _DictSource(tensors)
    keys = source.keys()
    if not any("in_proj_weight" in k or "resblocks" in k for k in keys):
        raise CheckpointError(
            "<state dict>: not an open_clip vision tower (no 'attn.in_proj_weight' keys)"
        )
    plan, dropped = _plan_open_clip(keys, "<state dict>")
    _check_plan_shapes(source, plan, "<state dict>")
    return {name: _entry_read(source, plan[name]) for name in sorted(plan)}, dropped


def canonical_to_open_clip(
    tensors: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Inverse mapping: canonical names -> open_clip VisionTransformer names (docs/checkpoints.md).

    q, k, v are concatenated back into `attn.in_proj_weight` / `in_proj_bias` and
    `visual_projection.weight` is transposed back into `proj`, so
    `model.visual.load_state_dict(canonical_to_open_clip(sd))` works with strict=True.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _match_canonical(name)
        if match is None:
            raise CheckpointError(
                f"<state dict>: tensor '{name}' is not a canonical vision-tower name"
            )
        rule, fields = match
        target = prefix + rule.open_clip.format(**fields)
        if rule.op == "qkv":
            fused.setdefault(target, {})[fields["qkv"]] = tensor
        elif rule.op == "transpose":
            out[target] = tensor.t().contiguous()
        else:
            out[target] = tensor
    for target, parts in fused.items():
        if set(parts) != set(QKV):
            raise CheckpointError(
                f"<state dict>: cannot rebuild '{target}': q, k and v projections must all be "
                f"present (got {', '.join(sorted(parts))})"
            )
        out[target] = torch.cat([parts[which] for which in QKV], dim=0)
    return out
