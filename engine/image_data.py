"""Test images on disk: ImageFolder trees and parquet shards, a stratified subset, decoded in batches.

Two layouts are read (docs/suites.md):

- **ImageFolder**: one sub-folder per class; the sorted folder names give the label order.
- **parquet**: a folder of `.parquet` shards (the layout of the Hugging Face datasets that
  FusionBench users have on disk) with an `image` column (encoded bytes, or a struct with `bytes`)
  and an integer `label` column. Shards are read in sorted file order.

Labels are known before anything is decoded (folder names, or the `label` column alone), so a
seeded, class-stratified `limit` picks its images first and only those are decoded. Decoding and
the geometric part of CLIP's eval preprocessing (resize, centre crop, RGB) run in DataLoader worker
processes; the result is kept as uint8 [N, 3, H, W], 4x smaller than float32, and turned into the
model's float input one batch at a time (`TestSplit.batches`).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class ImageRef:
    """Where one image lives: a file, or row `row` of a parquet shard."""

    path: Path
    row: int | None = None

    def describe(self) -> str:
        return str(self.path) if self.row is None else f"{self.path} (row {self.row})"


@dataclass
class ImageListing:
    """Every image of one test split with its label, before anything is decoded."""

    refs: list[ImageRef]
    labels: np.ndarray  # int64 [N]
    layout: str  # "imagefolder" | "parquet"
    class_folders: list[str] | None = None  # ImageFolder only: sorted sub-folder names = label order

    @property
    def num_labels(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def list_images(root: Path, label: str) -> ImageListing:
    """The images under `root` (ImageFolder or parquet shards); ConfigError naming `label` otherwise."""
    if not root.is_dir():
        raise ConfigError(f"{label}: no such folder {root}")
    shards = sorted(p for p in root.iterdir() if p.is_file() and p.suffix == ".parquet")
    if shards:
        return _list_parquet(shards, label)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(f"{label}: {root} holds neither class sub-folders (ImageFolder) nor .parquet shards")
    refs, labels = [], []
    for index, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        refs += [ImageRef(p) for p in files]
        labels += [index] * len(files)
    if not refs:
        raise ConfigError(f"{label}: the class folders under {root} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageListing(refs, np.asarray(labels, dtype=np.int64), "imagefolder", [f.name for f in folders])


def _list_parquet(shards: Sequence[Path], label: str) -> ImageListing:
    import pyarrow.parquet as pq

    refs, labels = [], []
    for shard in shards:
        try:
            schema = pq.read_schema(shard)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise ConfigError(f"{label}: {shard} is not a readable parquet file ({_first_line(exc)})") from None
        missing = [c for c in ("image", "label") if c not in schema.names]
        if missing:
            raise ConfigError(f"{label}: {shard} has no '{missing[0]}' column (columns: {', '.join(schema.names)}); "
                              "expected an 'image' column and an integer 'label' column")
        column = pq.read_table(shard, columns=["label"]).column("label").to_numpy(zero_copy_only=False)
        if column.dtype.kind not in "iu":
            raise ConfigError(f"{label}: {shard}: the 'label' column holds {column.dtype}, not integers")
        refs += [ImageRef(shard, row) for row in range(len(column))]
        labels.append(column.astype(np.int64))
    labels_array = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if len(labels_array) and labels_array.min() < 0:
        raise ConfigError(f"{label}: negative labels in {shards[0].parent}")
    return ImageListing(refs, labels_array, "parquet")


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most `limit` images keeping each class's share (largest remainders), in file order.

    Seeded, so the same (labels, limit, seed) always picks the same images.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (limit / n)
    take = np.floor(exact).astype(np.int64)
    remainder = limit - int(take.sum())
    order = np.lexsort((classes, -(exact - take)))  # largest remainder first, ties by class id
    take[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _DecodeDataset(torch.utils.data.Dataset):
    """Decode + geometric preprocessing of one image -> uint8 HWC (no torch ops: safe in forked workers)."""

    def __init__(self, refs: Sequence[ImageRef], geometry: Callable[[Any], Any]) -> None:
        self.refs = list(refs)
        self.geometry = geometry
        self._tables: dict[Path, Any] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def _bytes(self, ref: ImageRef) -> bytes:
        import pyarrow.parquet as pq

        table = self._tables.get(ref.path)
        if table is None:
            table = self._tables[ref.path] = pq.read_table(ref.path, columns=["image"]).column("image")
        cell = table[ref.row].as_py()
        if isinstance(cell, dict):
            cell = cell.get("bytes")
        if not isinstance(cell, (bytes, bytearray)):
            raise ValueError("the 'image' cell holds neither encoded bytes nor a struct with 'bytes'")
        return bytes(cell)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | str]:
        ref = self.refs[index]
        try:
            source = ref.path if ref.row is None else io.BytesIO(self._bytes(ref))
            with Image.open(source) as image:
                image.load()
                out = self.geometry(image.convert("RGB"))
            return index, np.asarray(out, dtype=np.uint8).copy()
        except Exception as exc:  # report, do not crash the worker: the parent raises one line
            return index, f"{ref.describe()}: unreadable image ({_first_line(exc)})"


def _collate(items):
    return items  # plain Python objects: workers never run torch ops


def decode_workers(n_images: int) -> int:
    """Worker processes for decoding: none for a handful of images (start-up would dominate)."""
    env = os.environ.get("MERGE_EXPLORER_DECODE_WORKERS")
    if env is not None:
        return max(0, int(env))
    return 0 if n_images < 256 else min(8, max(1, (os.cpu_count() or 2) - 1))


def decode_images(refs: Sequence[ImageRef], geometry: Callable[[Any], Any], *, label: str,
                  progress: Callable[[float, str], None] | None = None) -> torch.Tensor:
    """uint8 [N, 3, H, W]: each image decoded, converted to RGB and passed through `geometry` (PIL -> PIL)."""
    dataset = _DecodeDataset(refs, geometry)
    workers = decode_workers(len(refs))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=_collate,
                                         shuffle=False)
    out: torch.Tensor | None = None
    done = 0
    for batch in loader:
        for index, array in batch:
            if isinstance(array, str):
                raise ConfigError(f"{label}: {array}")
            if out is None:
                out = torch.empty((len(refs), 3, array.shape[0], array.shape[1]), dtype=torch.uint8)
            if array.shape[:2] != tuple(out.shape[2:]):
                raise ConfigError(f"{label}: {refs[index].describe()} came out {array.shape[:2]} after preprocessing, "
                                  f"expected {tuple(out.shape[2:])}")
            out[index] = torch.from_numpy(array).permute(2, 0, 1)
        done += len(batch)
        if progress is not None:
            progress(done / len(refs), f"decoded {done}/{len(refs)} images")
    if out is None:
        raise ConfigError(f"{label}: no images to decode")
    return out


# --------------------------------------------------------------------------------------------
# A decoded split, model-ready one batch at a time
# --------------------------------------------------------------------------------------------


@dataclass
class TestSplit:
    """One task's test images and labels.

    `images` are uint8 [N, 3, H, W] to be normalised with `mean`/`std` (CLIP suites), or already
    model-ready float [N, 3, H, W] when `mean` is None (the demo zoo keeps its tensors that way).
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "TestSplit":
        device = torch.device(device)
        if self.images.device == device:
            return self
        pin = device.type == "cuda"
        images = (self.images.pin_memory() if pin else self.images).to(device, non_blocking=pin)
        return TestSplit(images, self.labels.to(device), self.mean, self.std)

    def model_ready(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Float32 model input for images[start:stop] (open_clip's ToTensor + Normalize, same op order)."""
        x = self.images[start:stop]
        if self.mean is None:
            return x
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.model_ready(start, start + batch_size), self.labels[start:start + batch_size]

    def tensor(self) -> torch.Tensor:
        """All images model-ready at once (small splits: MINGLE seed sets, continual evaluation)."""
        return self.model_ready()
