"""Auxiliary images for Resolving Interference: unlabeled, and never the tasks' own data.

Three sources, mirroring the paper's auxiliary-source ablation (docs/methods.md, RI) in miniature:

* ``pool``   the demo zoo's unlabeled pretraining pool: the images θ_0 was pretrained on, with the
             labels dropped. The stand-in for ImageNet (the paper's default): broad, natural for θ_0,
             and not the tasks' train or test splits. Only a suite that has a pool offers it.
* ``render`` procedural drawings unrelated to the tasks: multi-octave value-noise fields under a
             random two-colour map, crossed by random smooth strokes. The stand-in for the paper's
             rendered "Shapes21k" source.
* ``noise``  i.i.d. Gaussian pixels (mean 127.5, std 64 of 255, clipped), which after the CLIP
             normalisation are roughly unit Gaussian: the paper's control (+0.4 for TSV-M on B/32-8).

Every source returns `n` images as a (n, size, size, 3) uint8 array and is a pure function of
(source, n, seed): the "fixed, seeded auxiliary stream" whose θ_0 outputs RI computes once and
reuses for every expert (docs/methods.md, RI).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError

IMAGE_SIZE = 32  # the demo zoo's input size, the default when no size is given

AUX_SOURCES = ("pool", "render", "noise")


def noise_images(n: int, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    pixels = rng.normal(127.5, 64.0, size=(n, size, size, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _value_noise(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, size, size) fractal value noise in [0, 1]: bilinear-upsampled random grids, 4 octaves."""
    field = np.zeros((n, size, size))
    weight_sum = 0.0
    coords = np.linspace(0, 1, size)
    for octave, cells in enumerate((2, 4, 8, 16)):
        grid = rng.random((n, cells + 1, cells + 1))
        pos = coords * cells
        i0 = np.minimum(pos.astype(int), cells - 1)
        frac = pos - i0
        rows = grid[:, i0, :] * (1 - frac)[None, :, None] + grid[:, i0 + 1, :] * frac[None, :, None]
        layer = rows[:, :, i0] * (1 - frac)[None, None, :] + rows[:, :, i0 + 1] * frac[None, None, :]
        weight = 0.5 ** octave
        field += weight * layer
        weight_sum += weight
    field /= weight_sum
    lo = field.min(axis=(1, 2), keepdims=True)
    hi = field.max(axis=(1, 2), keepdims=True)
    return (field - lo) / np.maximum(hi - lo, 1e-6)


def render_images(n: int, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Value-noise fields in random two-colour maps with 1-3 random smooth strokes each."""
    rng = np.random.default_rng([seed, 1])
    field = _value_noise(rng, n, size)[..., None]  # (n, s, s, 1)
    low = rng.integers(0, 256, size=(n, 1, 1, 3)).astype(float)
    high = rng.integers(0, 256, size=(n, 1, 1, 3)).astype(float)
    images = low + (high - low) * field
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    t = np.linspace(0, 1, 48)
    for i in range(n):
        for _ in range(int(rng.integers(1, 4))):
            # A quadratic Bézier stroke: three random control points, random colour and width.
            p0, p1, p2 = rng.uniform(-0.1 * size, 1.1 * size, size=(3, 2))
            curve = ((1 - t) ** 2)[:, None] * p0 + (2 * (1 - t) * t)[:, None] * p1 + (t ** 2)[:, None] * p2
            d2 = ((xx[None] - curve[:, 0, None, None]) ** 2 + (yy[None] - curve[:, 1, None, None]) ** 2).min(0)
            width = rng.uniform(0.6, 2.0)
            alpha = np.clip(width + 0.5 - np.sqrt(d2), 0, 1)[..., None]  # anti-aliased edge
            color = rng.integers(0, 256, size=3).astype(float)
            images[i] = images[i] * (1 - alpha) + color * alpha
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def pool_images(suite: Any, n: int, seed: int) -> np.ndarray:
    """`n` images drawn without replacement (with, if the pool is smaller) from the suite's pretraining pool."""
    pool = np.asarray(suite.pool_images())
    if pool.ndim != 4 or pool.shape[-1] != 3:
        raise ConfigError(f"{suite.label}: the pretraining pool has shape {pool.shape}, expected (N, H, W, 3) images")
    rng = np.random.default_rng([seed, 0])
    index = rng.choice(len(pool), size=n, replace=n > len(pool))
    return pool[index]


def aux_images(source: str, n: int, seed: int = 0, *, suite: Any = None, size: int | None = None) -> np.ndarray:
    """The fixed, seeded auxiliary stream: (n, size, size, 3) uint8 images from `source`."""
    if source not in AUX_SOURCES:
        raise ConfigError(f"auxiliary source must be one of {', '.join(AUX_SOURCES)}, got {source!r}")
    if n < 1:
        raise ConfigError(f"the auxiliary stream needs at least one image, got n={n}")
    if source == "pool":
        if suite is None or not hasattr(suite, "pool_images"):
            raise ConfigError("--aux pool needs the demo zoo (its unlabeled pretraining pool); use render or noise "
                              "for other checkpoints")
        return pool_images(suite, n, seed)
    size = size or IMAGE_SIZE
    return render_images(n, seed, size) if source == "render" else noise_images(n, seed, size)
