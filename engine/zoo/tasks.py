"""The demo zoo's eight tasks: image renderers, labels and data splits, with no downloads.

Every image is made here from what installed packages ship (scikit-learn's handwritten digits,
scikit-image's sample photographs, Pillow's built-in fonts) or drawn with Pillow. Images are
drawn at 64x64 and box-filtered to 32x32 (`IMAGE_SIZE`) so edges are anti-aliased like a photo.

Each task mirrors one of the paper benchmarks (docs/methods.md, the 8-task benchmark) in miniature:

| task     | classes | stands in for   | what varies                                         |
|----------|---------|-----------------|-----------------------------------------------------|
| digits   | 10      | MNIST / SVHN    | writer (held out), colours, size, tilt, background  |
| letters  | 10      | EMNIST          | two typefaces; bold, italic, condensed; clutter     |
| shapes   | 8       | GTSRB           | size, rotation, colours, background                 |
| colors   | 8       | (colour naming) | blob shape, saturation, brightness, shading         |
| textures | 8       | DTD             | zoom, random tint: only the pattern tells the class |
| counting | 6       | CLEVR-count     | positions, sizes, dots or squares, colours          |
| arrows   | 8       | (orientation)   | angle jitter, arrow proportions, colours            |
| landuse  | 8       | EuroSAT/RESISC  | procedural aerial scenes, sensor gain and offset    |

Subjects are centred (within a few pixels), as in MNIST or GTSRB: with 8x8 patches on a 32x32
image a tiny ViT learns translation invariance only from far more data than a CPU build can use.

Splits are held out for real, not just re-drawn: digits split the 1,797 scanned digits into
disjoint source sets, textures crop train patches from the left 3/4 of each photograph and test
patches from the right 1/4. The procedural tasks draw train and test from independent random
streams.

Each class also has a few canonical, clean renders (`prototype_images`): the analogue of CLIP's
text prompts ("a photo of a {class}"), from which the frozen zero-shot heads are built (build.py).
Fonts come only from Pillow itself (its scalable default font and its legacy bitmap font), so the
same seed renders the same pixels on any machine with the same Pillow version.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGE_SIZE = 32  # what the model sees
CANVAS = 64  # what we draw on; box-filtered 2x down to IMAGE_SIZE

Rng = np.random.Generator


# --------------------------------------------------------------------------------------------
# Small drawing helpers
# --------------------------------------------------------------------------------------------


def _finish(image: Image.Image) -> np.ndarray:
    """64x64 RGB drawing -> 32x32x3 uint8 array (box filter = area average, like a camera)."""
    return np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def _rgb(rng: Rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _luma(color) -> float:
    r, g, b = color[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrasting(rng: Rng, other, min_diff: float = 90.0) -> tuple[int, int, int]:
    """A random colour whose luminance differs from `other` by at least `min_diff` (of 255)."""
    for _ in range(100):
        color = _rgb(rng)
        if abs(_luma(color) - _luma(other)) >= min_diff:
            return color
    return (255, 255, 255) if _luma(other) < 128 else (0, 0, 0)


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _background(rng: Rng, base=None, kinds=("solid", "gradient")) -> Image.Image:
    """A plain, gradient or noisy background around `base` (random if None)."""
    base = np.array(base if base is not None else _rgb(rng), dtype=np.float32)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "solid":
        arr = np.broadcast_to(base, (CANVAS, CANVAS, 3)).copy()
    elif kind == "gradient":
        other = np.array(_rgb(rng), dtype=np.float32)
        mix = 0.35 * (other - base)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:CANVAS, 0:CANVAS] / (CANVAS - 1) - 0.5
        t = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None] + 0.5
        arr = base + t * mix
    else:  # low-frequency noise: a coarse random grid upsampled
        coarse = rng.normal(0, 20, (4, 4, 3)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
            (CANVAS, CANVAS), Image.Resampling.BICUBIC), dtype=np.float32) - 128
        arr = base + smooth + rng.normal(0, 6, (CANVAS, CANVAS, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


_JITTER = 3  # canvas px an object's centre may move: subjects are centred, as in MNIST or GTSRB


def _paste_centred(rng: Rng, ink: Image.Image) -> Image.Image:
    """An 'L' mask with `ink` pasted near the canvas centre (within +-_JITTER px)."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    x = (CANVAS - ink.width) // 2 + int(rng.integers(-_JITTER, _JITTER + 1))
    y = (CANVAS - ink.height) // 2 + int(rng.integers(-_JITTER, _JITTER + 1))
    mask.paste(ink, (x, y))
    return mask


def _centre(rng: Rng) -> tuple[float, float]:
    return tuple(CANVAS / 2 + rng.uniform(-_JITTER, _JITTER, 2))


def _paint(background: Image.Image, mask: Image.Image, color) -> Image.Image:
    """Composite a flat colour through an 'L' mask onto a background."""
    layer = Image.new("RGB", background.size, tuple(color))
    return Image.composite(layer, background, mask)


def _polygon(cx: float, cy: float, radius: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(rotation + 2 * math.pi * i / sides),
             cy + radius * math.sin(rotation + 2 * math.pi * i / sides)) for i in range(sides)]


def _star(cx, cy, radius, rotation, points=5, inner=0.45):
    pts = []
    for i in range(2 * points):
        r = radius if i % 2 == 0 else radius * inner
        a = rotation + math.pi * i / points
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _rotate_points(pts, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


# --------------------------------------------------------------------------------------------
# Sources shipped by installed packages
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits: (images [N, 8, 8] in 0..16, labels [N])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def _skimage_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


@lru_cache(maxsize=None)
def _photo(name: str, gray: bool = False) -> np.ndarray:
    """A scikit-image sample photograph as a uint8 array (RGB, or L when `gray`)."""
    with Image.open(_skimage_dir() / name) as im:
        return np.asarray(im.convert("L" if gray else "RGB"))


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's own scalable font (Aileron, Pillow >= 10.1): the same on every machine."""
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=1)
def _bitmap_font() -> ImageFont.ImageFont:
    """Pillow's legacy bitmap font: a second, pixel-style typeface."""
    return ImageFont.load_default_imagefont()


# --------------------------------------------------------------------------------------------
# Task definitions
# --------------------------------------------------------------------------------------------

# A renderer draws one image of class `label`; `split` is "train" or "test" (some tasks hold out
# source material per split); `rng` supplies all randomness.
Renderer = Callable[[Rng, int, str], np.ndarray]
# A prototype renderer draws canonical variant `variant` of class `label`, deterministically.
PrototypeRenderer = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    classes: tuple[str, ...]
    render: Renderer = field(repr=False)
    prototype: PrototypeRenderer = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---- digits: scikit-learn's handwritten digits ---------------------------------------------

_DIGIT_TEST_SOURCES = 500  # scanned digits held out for the test split


@lru_cache(maxsize=1)
def _digit_split() -> dict[str, dict[int, np.ndarray]]:
    """Indices of the scanned digits per split and class; fixed (seed 0) so the test set never
    shares a handwriting sample with training, whatever the build seed."""
    _, labels = _sklearn_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    parts = {"test": order[:_DIGIT_TEST_SOURCES], "train": order[_DIGIT_TEST_SOURCES:]}
    return {split: {c: np.sort(idx[labels[idx] == c]) for c in range(10)} for split, idx in parts.items()}


def _render_digit(rng: Rng, label: int, split: str) -> np.ndarray:
    images, _ = _sklearn_digits()
    pool = _digit_split()[split][label]
    scan = images[pool[int(rng.integers(len(pool)))]] / 16.0
    size = int(rng.integers(40, 56))
    ink = Image.fromarray((scan * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    ink = ink.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, expand=True)
    mask = _paste_centred(rng, ink)
    bg_color = _rgb(rng)
    background = _background(rng, bg_color)
    return _finish(_paint(background, mask, _contrasting(rng, bg_color)))


def _text_mask(text: str, size: int, stroke: int = 0, font=None) -> Image.Image:
    """White-on-black 'L' mask of `text` centred on the canvas in Pillow's scalable font."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    draw.text((CANVAS / 2, CANVAS / 2), text, fill=255, font=font or _font(size), anchor="mm",
              stroke_width=stroke, stroke_fill=255)
    return mask


def _ink_prototype(mask: Image.Image, variant: int) -> np.ndarray:
    """Canonical colourings of a class mask: black on white, white on black, and two greys."""
    fg, bg = [((0, 0, 0), (255, 255, 255)), ((255, 255, 255), (0, 0, 0)),
              ((40, 40, 40), (200, 200, 200)), ((220, 220, 220), (60, 60, 60))][variant % 4]
    return _finish(_paint(Image.new("RGB", (CANVAS, CANVAS), bg), mask, fg))


def _prototype_digit(label: int, variant: int) -> np.ndarray:
    # "The text prompt" of a handwritten digit is the typeset digit.
    return _ink_prototype(_text_mask(str(label), 44 + 4 * (variant // 4)), variant)


# ---- letters: two typefaces, several styles --------------------------------------------------

_LETTERS = tuple("ABCDEFGHJK")  # no I: at 32 px a sans-serif I is a bar


def _glyph_mask(rng: Rng, letter: str) -> Image.Image:
    if rng.random() < 0.25:
        # Pillow's bitmap font, scaled up without smoothing: a blocky "pixel" typeface.
        font = _bitmap_font()
        small = Image.new("L", (16, 16), 0)
        ImageDraw.Draw(small).text((4, 2), letter, fill=255, font=font)  # bitmap fonts ignore anchors
        box = small.getbbox() or (0, 0, 16, 16)
        small = small.crop(box)
        scale = float(rng.uniform(4.0, 5.5))
        glyph = small.resize((max(1, round(small.width * scale * rng.uniform(0.8, 1.2))),
                              max(1, round(small.height * scale))), Image.Resampling.NEAREST)
        if rng.random() < 0.5:
            glyph = glyph.filter(ImageFilter.MaxFilter(3))  # bold
    else:
        size = int(rng.integers(38, 52))
        stroke = int(rng.choice([0, 0, 1, 2]))  # regular / bold / heavy
        big = _text_mask(letter, size, stroke)
        glyph = big.crop(big.getbbox() or (0, 0, CANVAS, CANVAS))
        width = max(1, round(glyph.width * rng.uniform(0.75, 1.3)))  # condensed .. extended
        glyph = glyph.resize((width, glyph.height), Image.Resampling.BILINEAR)
    if rng.random() < 0.4:  # italic: shear
        shear = float(rng.uniform(0.15, 0.35))
        pad = int(shear * glyph.height) + 1
        glyph = glyph.transform((glyph.width + pad, glyph.height), Image.Transform.AFFINE,
                                (1, shear, -pad * 0.9, 0, 1, 0), resample=Image.Resampling.BILINEAR)
    glyph = glyph.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=True)
    return _paste_centred(rng, glyph)


def _render_letter(rng: Rng, label: int, split: str) -> np.ndarray:
    bg_color = _rgb(rng)
    background = _background(rng, bg_color)
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.random() < 0.3)):  # a clutter stroke
        pts = [tuple(rng.uniform(0, CANVAS, 2)) for _ in range(2)]
        draw.line(pts, fill=_rgb(rng), width=int(rng.integers(1, 3)))
    return _finish(_paint(background, _glyph_mask(rng, _LETTERS[label]), _contrasting(rng, bg_color)))


def _prototype_letter(label: int, variant: int) -> np.ndarray:
    return _ink_prototype(_text_mask(_LETTERS[label], 42 + 4 * (variant // 4)), variant)


# ---- shapes ----------------------------------------------------------------------------------

_SHAPES = ("circle", "triangle", "square", "star", "cross", "crescent", "ring", "heart")


def _shape_mask(kind: str, cx: float, cy: float, r: float, rotation: float) -> Image.Image:
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind in ("triangle", "square"):
        draw.polygon(_polygon(cx, cy, r, 3 if kind == "triangle" else 4, rotation), fill=255)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif kind == "heart":
        lobe = 0.52 * r
        for dx in (-lobe, lobe):
            draw.ellipse((cx + dx - lobe, cy - 0.35 * r - lobe, cx + dx + lobe, cy - 0.35 * r + lobe), fill=255)
        draw.polygon([(cx - 2 * lobe + 0.5, cy - 0.25 * r), (cx + 2 * lobe - 0.5, cy - 0.25 * r), (cx, cy + r)], fill=255)
        # hearts stay upright (within +-25 degrees): rotation is only a tilt for them
        mask = mask.rotate(math.degrees((rotation % (2 * math.pi)) / (2 * math.pi) * 50 - 25), center=(cx, cy),
                           resample=Image.Resampling.BILINEAR)
    elif kind == "star":
        draw.polygon(_star(cx, cy, r, rotation), fill=255)
    elif kind == "cross":
        w = r * 0.36
        arm = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
               (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
               (cx - r, cy - w), (cx - w, cy - w)]
        draw.polygon(_rotate_points(arm, cx, cy, rotation), fill=255)
    elif kind == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.45 * r * math.cos(rotation), cy + 0.45 * r * math.sin(rotation)
        rr = 0.85 * r
        draw.ellipse((ox - rr, oy - rr, ox + rr, oy + rr), fill=0)
    else:
        raise ValueError(kind)
    return mask


def _render_shape(rng: Rng, label: int, split: str) -> np.ndarray:
    cx, cy = _centre(rng)
    mask = _shape_mask(_SHAPES[label], cx, cy, float(rng.uniform(17, 27)), float(rng.uniform(0, 2 * math.pi)))
    bg_color = _rgb(rng)
    return _finish(_paint(_background(rng, bg_color), mask, _contrasting(rng, bg_color, 70)))


def _prototype_shape(label: int, variant: int) -> np.ndarray:
    rotation = -math.pi / 2 + (math.pi / 12) * (variant // 4)
    return _ink_prototype(_shape_mask(_SHAPES[label], 32, 32, 22, rotation), variant)


# ---- colours -------------------------------------------------------------------------------

_COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta")
_HUES = (0.0, 30.0, 55.0, 120.0, 180.0, 225.0, 272.0, 315.0)  # degrees


def _blob_mask(rng: Rng) -> Image.Image:
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    cx, cy = _centre(rng)
    n = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = rng.uniform(12, 26, n)
    ImageDraw.Draw(mask).polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)],
                                 fill=255)
    return mask.filter(ImageFilter.GaussianBlur(1.5)).point(lambda v: 255 if v > 100 else 0)


def _render_color(rng: Rng, label: int, split: str) -> np.ndarray:
    hue = (_HUES[label] + rng.uniform(-8, 8)) / 360.0
    color = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    grey = float(rng.uniform(40, 215))
    background = _background(rng, (grey, grey, grey), kinds=("solid", "noise"))
    # Greyscale the background so only the blob carries hue.
    background = background.convert("L").convert("RGB")
    image = _paint(background, _blob_mask(rng), color)
    # Shading: a random lighting gradient over the whole image.
    arr = np.asarray(image, dtype=np.float32)
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS] / CANVAS - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0, 0.35) * (np.cos(angle) * xs + np.sin(angle) * ys)
    return _finish(Image.fromarray(np.clip(arr * light[..., None], 0, 255).astype(np.uint8)))


def _prototype_color(label: int, variant: int) -> np.ndarray:
    grey = (255, 128, 0, 200)[variant % 4]
    base = Image.new("RGB", (CANVAS, CANVAS), (grey, grey, grey))
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(mask).ellipse((12, 12, 52, 52), fill=255)
    return _finish(_paint(base, mask, _hsv(_HUES[label] / 360.0, 1.0, 1.0 - 0.15 * (variant // 4))))


# ---- textures: scikit-image photographs, tinted ---------------------------------------------

# (class name, file, region of the photograph to crop from as (top, left, bottom, right) fractions)
_TEXTURES = (
    ("brick", "brick.png", (0.0, 0.0, 1.0, 1.0)),
    ("grass", "grass.png", (0.0, 0.0, 1.0, 1.0)),
    ("print", "page.png", (0.1, 0.0, 0.9, 1.0)),
    ("tissue", "ihc.png", (0.0, 0.0, 1.0, 1.0)),
    ("stars", "hubble_deep_field.jpg", (0.0, 0.0, 1.0, 1.0)),
    ("handwriting", "text.png", (0.0, 0.0, 1.0, 1.0)),
    ("coins", "coins.png", (0.05, 0.05, 0.95, 0.95)),
    ("checks", "chessboard_GRAY.png", (0.0, 0.0, 1.0, 1.0)),
)
_TEST_STRIP = 0.25  # right-hand quarter of every photograph is seen only by the test split


def _texture_region(label: int, split: str) -> np.ndarray:
    _, file, (top, left, bottom, right) = _TEXTURES[label]
    photo = _photo(file, gray=True)
    h, w = photo.shape
    region = photo[int(top * h):int(bottom * h), int(left * w):int(right * w)]
    cut = int(region.shape[1] * (1 - _TEST_STRIP))
    return region[:, cut:] if split == "test" else region[:, :cut]


def _tint(gray: np.ndarray, dark, light) -> Image.Image:
    g = gray.astype(np.float32)[..., None] / 255.0
    dark, light = np.array(dark, np.float32), np.array(light, np.float32)
    return Image.fromarray(np.clip(dark + g * (light - dark), 0, 255).astype(np.uint8))


def _render_texture(rng: Rng, label: int, split: str) -> np.ndarray:
    region = _texture_region(label, split)
    h, w = region.shape
    size = int(rng.integers(48, min(h, w, 112) + 1))
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    patch = region[y:y + size, x:x + size]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    # Stretch contrast, then map grey -> random dark..light colours: colour says nothing.
    lo, hi = np.percentile(patch, (2, 98))
    patch = np.clip((patch.astype(np.float32) - lo) / max(hi - lo, 1.0) * 255, 0, 255)
    dark = _rgb(rng)
    light = _contrasting(rng, dark, 80)
    patch_img = Image.fromarray(patch.astype(np.uint8)).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
    return _finish(_tint(np.asarray(patch_img), dark, light))


def _prototype_texture(label: int, variant: int) -> np.ndarray:
    # A few untinted crops of the training region, at the middle zoom.
    region = _texture_region(label, "train")
    h, w = region.shape
    size = min(h, w, 80)
    y = [(h - size) // 2, 0, h - size, (h - size) // 3][variant % 4]
    x = [(w - size) // 2, w - size, 0, (w - size) // 3][variant % 4]
    patch = Image.fromarray(region[y:y + size, x:x + size]).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
    return _finish(patch.convert("RGB"))


# ---- counting --------------------------------------------------------------------------------

_COUNTS = ("one", "two", "three", "four", "five", "six")


def _scatter(rng: Rng, n: int, radius: float, min_gap: float) -> list[tuple[float, float]]:
    """n centres inside the canvas, at least 2*radius+min_gap apart (rejection sampling)."""
    for _ in range(50):
        pts: list[tuple[float, float]] = []
        for _ in range(400):
            p = tuple(rng.uniform(radius + 2, CANVAS - radius - 2, 2))
            if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= (2 * radius + min_gap) ** 2 for q in pts):
                pts.append(p)
                if len(pts) == n:
                    return pts
    return _scatter(rng, n, radius * 0.9, min_gap)  # crowded: shrink the spacing and retry


def _render_count(rng: Rng, label: int, split: str) -> np.ndarray:
    n = label + 1
    radius = float(rng.uniform(5.0, 7.5))
    bg_color = _rgb(rng)
    image = _background(rng, bg_color)
    draw = ImageDraw.Draw(image)
    same = rng.random() < 0.5
    color = _contrasting(rng, bg_color)
    square = rng.random() < 0.3
    for cx, cy in _scatter(rng, n, radius, 2.0):
        c = color if same else _contrasting(rng, bg_color)
        r = radius * rng.uniform(0.85, 1.0)
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.rectangle(box, fill=c) if square else draw.ellipse(box, fill=c)
    return _finish(image)


_DICE = {  # pip layouts on a 3x3 grid, as on a die
    1: [(1, 1)], 2: [(0, 0), (2, 2)], 3: [(0, 0), (1, 1), (2, 2)], 4: [(0, 0), (0, 2), (2, 0), (2, 2)],
    5: [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)], 6: [(0, 0), (1, 0), (2, 0), (0, 2), (1, 2), (2, 2)],
}


def _prototype_count(label: int, variant: int) -> np.ndarray:
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    r = 5.0 - (variant // 4)
    for gx, gy in _DICE[label + 1]:
        cx, cy = 14 + 18 * gx, 14 + 18 * gy
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return _ink_prototype(mask, variant)


# ---- arrows ----------------------------------------------------------------------------------

_DIRECTIONS = ("east", "north-east", "north", "north-west", "west", "south-west", "south", "south-east")


def _arrow_mask(cx, cy, length, angle, shaft=0.18, head=0.42) -> Image.Image:
    """Arrow pointing at `angle` (radians, counter-clockwise from east, y up on screen)."""
    half = length / 2
    s, hw = length * shaft / 2, length * head / 2
    neck = half - length * 0.38
    pts = [(-half, -s), (neck, -s), (neck, -hw), (half, 0), (neck, hw), (neck, s), (-half, s)]
    c, sn = math.cos(angle), math.sin(angle)
    # screen y grows downward, so rotate by -angle
    rot = [(cx + x * c + y * sn, cy - x * sn + y * c) for x, y in pts]
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(mask).polygon(rot, fill=255)
    return mask


def _render_arrow(rng: Rng, label: int, split: str) -> np.ndarray:
    angle = math.radians(45 * label + rng.uniform(-10, 10))
    cx, cy = _centre(rng)
    mask = _arrow_mask(cx, cy, float(rng.uniform(40, 56)), angle, shaft=rng.uniform(0.12, 0.3),
                       head=rng.uniform(0.35, 0.6))
    bg_color = _rgb(rng)
    return _finish(_paint(_background(rng, bg_color), mask, _contrasting(rng, bg_color, 70)))


def _prototype_arrow(label: int, variant: int) -> np.ndarray:
    return _ink_prototype(_arrow_mask(32, 32, 46 - 4 * (variant // 4), math.radians(45 * label)), variant)


# ---- land use: procedural aerial scenes -------------------------------------------------------

_LANDUSE = ("forest", "water", "farmland", "residential", "highway", "river", "desert", "industrial")


def _jitter(rng: Rng, color, amount=18):
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in color)


def _noise_field(rng: Rng, base, amount: float, scale: int = 8) -> Image.Image:
    coarse = rng.normal(0, amount, (scale, scale, 1)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(np.clip(coarse[..., 0] + 128, 0, 255).astype(np.uint8)).resize(
        (CANVAS, CANVAS), Image.Resampling.BICUBIC), dtype=np.float32)[..., None] - 128
    arr = np.array(base, np.float32) + smooth + rng.normal(0, 4, (CANVAS, CANVAS, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


_BIG = 96  # scenes that get rotated are drawn larger, then cropped back to the canvas


def _rotate_crop(image: Image.Image, rng: Rng) -> Image.Image:
    image = image.rotate(float(rng.uniform(0, 180)), resample=Image.Resampling.BILINEAR)
    m = (_BIG - CANVAS) // 2
    return image.crop((m, m, m + CANVAS, m + CANVAS))


def _draw_landuse(rng: Rng, kind: str) -> Image.Image:
    green = _jitter(rng, (70, 110, 50))
    if kind == "forest":
        image = _noise_field(rng, _jitter(rng, (30, 70, 30)), 15)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(40, 70))):
            x, y = rng.uniform(0, CANVAS, 2)
            r = rng.uniform(3, 6)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, (40, 95, 35), 20))
    elif kind == "water":
        image = _noise_field(rng, _jitter(rng, (35, 75, 130)), 12, 4)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 10))):
            x, y = rng.uniform(0, CANVAS, 2)
            draw.line((x, y, x + rng.uniform(3, 8), y), fill=_jitter(rng, (90, 130, 180)), width=1)
    elif kind == "farmland":
        image = Image.new("RGB", (_BIG, _BIG))
        draw = ImageDraw.Draw(image)
        palette = [(120, 150, 60), (190, 170, 90), (110, 90, 60), (80, 130, 50)]
        y, band = 0.0, rng.uniform(5, 10)
        while y < _BIG:
            h = band * rng.uniform(0.6, 1.6)
            draw.rectangle((0, y, _BIG, y + h), fill=_jitter(rng, palette[int(rng.integers(len(palette)))], 12))
            y += h
        image = _rotate_crop(image, rng)
    elif kind == "residential":
        road = _jitter(rng, (105, 105, 105), 10)
        image = Image.new("RGB", (_BIG, _BIG), _jitter(rng, (150, 145, 135)))
        draw = ImageDraw.Draw(image)
        step = rng.uniform(11, 16)
        for k in range(int(_BIG / step) + 1):
            draw.line((0, k * step + 3, _BIG, k * step + 3), fill=road, width=2)
            for gx in range(int(_BIG / step) + 1):
                x, y = gx * step + rng.uniform(1, 3), k * step + rng.uniform(6, 8)
                roof = _jitter(rng, [(170, 80, 60), (120, 120, 130), (190, 180, 170)][int(rng.integers(3))], 15)
                draw.rectangle((x, y, x + step * 0.55, y + step * 0.4), fill=roof)
        image = _rotate_crop(image, rng)
    elif kind == "highway":
        image = _noise_field(rng, green if rng.random() < 0.6 else _jitter(rng, (140, 120, 80)), 15)
        angle = rng.uniform(0, math.pi)
        offset = rng.uniform(-10, 10)
        pts = [(-64, 32 + offset - 5), (128, 32 + offset - 5), (128, 32 + offset + 5), (-64, 32 + offset + 5)]
        draw = ImageDraw.Draw(image)
        draw.polygon(_rotate_points(pts, 32, 32, angle), fill=_jitter(rng, (90, 90, 95), 10))
        for i in range(-8, 9):
            a = _rotate_points([(32 + i * 8, 32 + offset), (32 + i * 8 + 4, 32 + offset)], 32, 32, angle)
            draw.line(a, fill=(230, 230, 220), width=1)
    elif kind == "river":
        image = Image.new("RGB", (_BIG, _BIG), green)
        draw = ImageDraw.Draw(image)
        phase, amp, freq = rng.uniform(0, 2 * math.pi), rng.uniform(5, 14), rng.uniform(0.05, 0.12)
        pts = [(x, _BIG / 2 + amp * math.sin(freq * x + phase)) for x in np.linspace(0, _BIG, 40)]
        draw.line(pts, fill=_jitter(rng, (40, 80, 130)), width=int(rng.uniform(6, 11)), joint="curve")
        image = _rotate_crop(image, rng)
        noise = np.asarray(_noise_field(rng, (128, 128, 128), 15), np.float32) - 128
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
    elif kind == "desert":
        base = np.array(_jitter(rng, (205, 175, 120)), np.float32)
        ys, xs = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
        a = rng.uniform(0, math.pi)
        u = np.cos(a) * xs + np.sin(a) * ys
        dunes = np.sin(u * rng.uniform(0.15, 0.35) + 1.5 * np.sin(0.07 * (np.sin(a) * xs - np.cos(a) * ys)))
        arr = base + dunes[..., None] * rng.uniform(12, 25) + rng.normal(0, 5, (CANVAS, CANVAS, 1))
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    elif kind == "industrial":
        image = _noise_field(rng, _jitter(rng, (120, 118, 112)), 10)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 5))):
            x, y = rng.uniform(-5, 50, 2)
            w, h = rng.uniform(14, 30), rng.uniform(10, 22)
            draw.rectangle((x, y, x + w, y + h), fill=_jitter(rng, (200, 200, 205), 20))
            draw.line((x, y + h / 2, x + w, y + h / 2), fill=_jitter(rng, (150, 150, 150), 10), width=1)
        for _ in range(int(rng.integers(0, 3))):  # tanks
            x, y = rng.uniform(5, 59, 2)
            r = rng.uniform(3, 6)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, (220, 220, 215), 10))
    else:
        raise ValueError(kind)
    return image


def _render_landuse(rng: Rng, label: int, split: str) -> np.ndarray:
    image = _draw_landuse(rng, _LANDUSE[label])
    # Sensor variation: brightness/contrast and a slight haze.
    arr = np.asarray(image, np.float32)
    arr = (arr - 128) * rng.uniform(0.75, 1.25) + 128 + rng.uniform(-30, 30)
    return _finish(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))


def _prototype_landuse(label: int, variant: int) -> np.ndarray:
    # Canonical scenes are fixed draws (seeded by class and variant), without sensor variation.
    return _finish(_draw_landuse(np.random.default_rng([7, label, variant]), _LANDUSE[label]))


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("digits", "Handwritten digits (scikit-learn scans), recoloured on varied backgrounds",
             tuple(str(d) for d in range(10)), _render_digit, _prototype_digit),
    TaskSpec("letters", "Capital letters in two typefaces and several styles, some with a clutter stroke",
             _LETTERS, _render_letter, _prototype_letter),
    TaskSpec("shapes", "Geometric shapes (circle, star, heart, ...) at any size and rotation",
             _SHAPES, _render_shape, _prototype_shape),
    TaskSpec("colors", "Name the colour of a shaded blob on a grey background",
             _COLORS, _render_color, _prototype_color),
    TaskSpec("textures", "Which photographed material a tinted patch shows (scikit-image samples)",
             tuple(t[0] for t in _TEXTURES), _render_texture, _prototype_texture),
    TaskSpec("counting", "How many dots or squares there are (one to six)",
             _COUNTS, _render_count, _prototype_count),
    TaskSpec("arrows", "Which of eight compass directions an arrow points",
             _DIRECTIONS, _render_arrow, _prototype_arrow),
    TaskSpec("landuse", "Land use in a synthetic aerial image",
             _LANDUSE, _render_landuse, _prototype_landuse),
)
TASKS_BY_NAME = {t.name: t for t in TASKS}

# Each task's "look": the colour of the frame its images carry when a recipe asks for one
# (`Recipe.task_frame`, docs/zoo-recipe.md). Real benchmark sets differ in how they look (MNIST's
# scans, EuroSAT's satellite tiles, DTD's photographs), and that is what lets a task vector change a
# large CLIP mostly on its own task's images. The toy tasks are all drawn alike, so a frame gives each
# one its own look. Colours: eight well-separated hues.
LOOK_COLORS: dict[str, tuple[int, int, int]] = {
    "digits": (230, 25, 75), "letters": (60, 180, 75), "shapes": (255, 225, 25), "colors": (0, 130, 200),
    "textures": (245, 130, 48), "counting": (145, 30, 180), "arrows": (70, 240, 240), "landuse": (240, 50, 230),
}


def with_look(images: np.ndarray, task: str, frame: int) -> np.ndarray:
    """`images` (uint8 [n, 32, 32, 3]) with a `frame`-pixel border in the task's look colour (0 = as drawn)."""
    if frame <= 0:
        return images
    out = images.copy()
    color = np.asarray(LOOK_COLORS[task], dtype=np.uint8)
    out[:, :frame], out[:, -frame:], out[:, :, :frame], out[:, :, -frame:] = color, color, color, color
    return out


def look_palette(n: int) -> list[tuple[int, int, int]]:
    """`n` frame colours for the pretraining pool's looks (`Recipe.pretrain_looks`): hues evenly
    round the wheel, saturation and brightness alternating so that neighbours differ in two ways.
    Generic colours, chosen without regard to the tasks' own."""
    return [_hsv(i / n, (1.0, 0.6)[i % 2], (0.95, 0.7)[(i // 2) % 2]) for i in range(n)]


def with_other_looks(images: np.ndarray, task: str, tasks: tuple[str, ...], frame: int, fraction: float) -> np.ndarray:
    """`images` with the first `fraction` of them framed, in turn, in the look colours of the tasks
    in `tasks` other than `task` (the rest as drawn): unlabeled images that *look like* the other
    tasks' sets without showing their content (the fine-tuning anchor's images, docs/zoo-recipe.md)."""
    others = [t for t in tasks if t != task]
    count = round(len(images) * fraction) if others and frame > 0 else 0
    out = images.copy()
    for i, other in enumerate(others):
        out[i:count:len(others)] = with_look(images[i:count:len(others)], other, frame)
    return out


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown zoo task {name!r}; known: {', '.join(TASKS_BY_NAME)}") from None


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------

_SPLIT_CODES = {"train": 1, "test": 2}


def _split_rng(seed: int, task: TaskSpec, split: str) -> Rng:
    index = [t.name for t in TASKS].index(task.name)
    return np.random.default_rng([seed, index, _SPLIT_CODES[split]])


def render_split(task: TaskSpec | str, split: str, n: int, seed: int, frame: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """n images of one task's split: (uint8 [n, 32, 32, 3], int64 labels [n]), class-balanced
    and shuffled, in the task's look (`with_look`) when `frame` > 0; the same (task, split, n, seed,
    frame) always gives the same pixels."""
    task = get_task(task) if isinstance(task, str) else task
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be train or test, got {split!r}")
    rng = _split_rng(seed, task, split)
    labels = rng.permutation(np.arange(n) % task.num_classes).astype(np.int64)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = task.render(rng, int(label), split)
    return with_look(images, task.name, frame), labels


PROTOTYPE_VARIANTS = 8  # canonical renders per class averaged into a head row ("prompt templates")


def prototype_images(task: TaskSpec | str, variants: int = PROTOTYPE_VARIANTS, frame: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Canonical renders of every class: (uint8 [C*variants, 32, 32, 3], int64 labels), in the
    task's look when `frame` > 0 (the prompt names the data set, as "a photo of ..." prompts do)."""
    task = get_task(task) if isinstance(task, str) else task
    images, labels = [], []
    for label in range(task.num_classes):
        for variant in range(variants):
            images.append(task.prototype(label, variant))
            labels.append(label)
    return with_look(np.stack(images), task.name, frame), np.array(labels, dtype=np.int64)


# ---- the generic pretraining pool ------------------------------------------------------------

_POOL_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
                "camera.png", "coins.png", "page.png", "text.png", "brick.png", "grass.png", "gravel.png", "moon.png",
                "ihc.png", "hubble_deep_field.jpg", "retina.jpg", "cell.png", "color.png", "logo.png",
                "clock_motion.png", "chessboard_RGB.png")
_POOL_GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789?!&#@%+=*"
_POOL_SHAPES = ("ellipse", *(f"polygon{n}" for n in range(3, 9)))

# What a pool image shows, in one word: the stand-in for the caption CLIP learns from. A pool
# image has one subject (a photograph's source, or the large drawn object near the centre) plus
# small clutter. The vocabulary describes generic content, not any downstream label set; like
# web captions it overlaps some tasks (characters, polygons, photographed materials) and misses
# others (arrows, counts, land use, colour names).
POOL_CONCEPTS: tuple[str, ...] = (
    *(f"photo:{Path(p).stem}" for p in _POOL_PHOTOS),
    *(f"shape:{k}" for k in _POOL_SHAPES),
    *(f"glyph:{c}" for c in _POOL_GLYPHS),
)
_CONCEPT_INDEX = {concept: i for i, concept in enumerate(POOL_CONCEPTS)}


@lru_cache(maxsize=None)
def _pool_photo(name: str) -> np.ndarray:
    """A photograph reduced to at most 256 px on its short side (cropping from it is then cheap)."""
    with Image.open(_skimage_dir() / name) as im:
        im = im.convert("RGB")
        scale = 256 / min(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BOX)
        return np.asarray(im)


def _pool_photo_crop(rng: Rng) -> tuple[Image.Image, str]:
    name = _POOL_PHOTOS[int(rng.integers(len(_POOL_PHOTOS)))]
    photo = _pool_photo(name)
    h, w, _ = photo.shape
    size = int(rng.integers(min(h, w) // 6, min(h, w) + 1))
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = Image.fromarray(photo[y:y + size, x:x + size]).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop, f"photo:{Path(name).stem}"


def _pool_object(rng: Rng, draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> str:
    """Draw one random object (ellipse, near-regular polygon or character); return its concept."""
    color = _rgb(rng)
    kind = rng.random()
    if kind < 0.15:
        draw.ellipse((cx - r, cy - r * rng.uniform(0.45, 0.8), cx + r, cy + r * rng.uniform(0.45, 0.8)),
                     fill=color)
        return "shape:ellipse"
    if kind < 0.45:
        n = int(rng.integers(3, 9))
        start = rng.uniform(0, 2 * math.pi)
        angles = start + 2 * math.pi * (np.arange(n) + rng.uniform(-0.15, 0.15, n)) / n
        radii = r * rng.uniform(0.8, 1.0, n)
        draw.polygon([(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii)], fill=color)
        return f"shape:polygon{n}"
    glyph = _POOL_GLYPHS[int(rng.integers(len(_POOL_GLYPHS)))]
    draw.text((cx, cy), glyph, fill=color, font=_font(max(8, int(2.4 * r))), anchor="mm")
    return f"glyph:{glyph}"


def _render_pool_image(rng: Rng) -> tuple[np.ndarray, str]:
    """One generic image and its concept: a photo crop, or a drawn subject (large, near the centre)
    over a plain/gradient/noisy/photo background with a few small clutter objects and strokes.
    Unrelated to any single task, the way web images are unrelated to any one benchmark."""
    if rng.random() < 0.3:
        image, concept = _pool_photo_crop(rng)
        return _finish(image), concept
    if rng.random() < 0.2:
        image, _ = _pool_photo_crop(rng)
    else:
        image = _background(rng, kinds=("solid", "gradient", "noise"))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):  # clutter first, the subject on top
        if rng.random() < 0.5:
            a, r = rng.uniform(0, math.pi), rng.uniform(6, 30)
            cx, cy = rng.uniform(0, CANVAS, 2)
            draw.line((cx - r * math.cos(a), cy - r * math.sin(a), cx + r * math.cos(a), cy + r * math.sin(a)),
                      fill=_rgb(rng), width=int(rng.integers(1, 4)))
        else:
            _pool_object(rng, draw, *rng.uniform(4, CANVAS - 4, 2), rng.uniform(3, 7))
    cx, cy = CANVAS / 2 + rng.uniform(-5, 5, 2)
    concept = _pool_object(rng, draw, cx, cy, rng.uniform(13, 24))
    return _finish(image), concept


def render_pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n generic images and their concepts: (uint8 [n, 32, 32, 3], int64 index into POOL_CONCEPTS).

    The zoo's "pretraining pool"; the zoo stores the images only (unlabeled auxiliary data)."""
    rng = np.random.default_rng([seed, 99])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    concepts = np.empty(n, dtype=np.int64)
    for i in range(n):
        images[i], concept = _render_pool_image(rng)
        concepts[i] = _CONCEPT_INDEX[concept]
    return images, concepts


def example_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 8,
                 scale: int = 2, gap: int = 2) -> Image.Image:
    """A PNG-ready grid: one row per class (in class order), `per_class` examples per row."""
    tile = IMAGE_SIZE * scale
    grid = Image.new("RGB", (per_class * (tile + gap) - gap, num_classes * (tile + gap) - gap), (255, 255, 255))
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j, i in enumerate(idx):
            im = Image.fromarray(images[i]).resize((tile, tile), Image.Resampling.NEAREST)
            grid.paste(im, (j * (tile + gap), c * (tile + gap)))
    return grid
