"""A tiny, download-free "bring your own CLIP" suite for tests (helpers only, no tests here).

`build_clip_suite(root, layout=...)` writes a randomly initialised tiny open_clip CLIP ViT,
three fine-tuned "experts" (alpha, beta, gamma), three small test sets in the formats users
bring (PNG ImageFolder, HF-style parquet shards, JPEG ImageFolder with an odd-sized image) and a
`suite.toml` describing them.

An expert is the pretrained vision tower plus 4% seeded noise on every tensor but the projection,
then 15 Adam steps of zero-shot cross-entropy on a separate, unwritten draw of its own task's
images: enough signal that experts, pretrained model and merges give different predictions
(the random "pretrained" CLIP is near chance; values themselves are not meant to matter).

`layout="open_clip"` writes the open_clip files (tiny_clip.json + full-CLIP safetensors, experts
with `visual.*` keys); `layout="hf"` writes the same weights as a Hugging Face CLIPModel folder
and CLIPVisionModel expert folders (the FusionBench layout). Both layouts hold bit-identical
weights, so any evaluation gives identical numbers on either.

HF expert key prefixes: transformers 5 saves CLIPVisionModel keys without `vision_model.`
(alpha, beta); FusionBench's hub checkpoints were saved by transformers 4 with it (gamma), so
both spellings are exercised.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw

from engine.checkpoints import open_clip_to_canonical
from engine.clip_model import hf_config_from_open_clip_cfg, new_visual_tower, open_clip_to_hf_clip

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    # context_length 77: open_clip's default tokenize() length, so any tokenizer call fits.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
EXPERTS = ("alpha", "beta", "gamma")
ALPHA_CLASSES = ("circle", "square", "triangle")
BETA_CLASSES = ("red", "green", "blue", "yellow")
GAMMA_CLASSES = ("checks", "dots", "stripes")
LOGIT_SCALE = math.log(30.0)  # not open_clip's init value, so a dropped tensor would show
PERTURBATION = 0.04  # expert = pretrained + 4% (relative RMS) seeded noise per visual tensor
TRAIN_PER_CLASS = 8  # images per class of the (unwritten) set each expert is tuned on
TUNE_STEPS = 15  # full-batch Adam steps per expert
TUNE_LR = 1e-3
IMAGE_PX = 40
ODD_SIZE = (50, 30)  # one gamma image, to exercise resizing
_LAYOUTS = ("open_clip", "hf")


def tiny_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The pretrained tiny CLIP's open_clip state dict (random init, fixed seed)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = CLIP(**json.loads(json.dumps(TINY_CLIP_CFG)))
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def expert_visual_state(
    pretrained: dict[str, torch.Tensor],
    index: int,
    seed: int = 0,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Expert `index`'s open_clip `visual.*` tensors: pretrained + seeded relative noise.

    Every visual tensor is perturbed except `visual.proj`, which stays the pretrained one (HF
    CLIPVisionModel experts carry no projection, so both layouts must agree on it). With
    `train` = (pixels [n,3,H,W], labels [n], normalised class text embeddings [c, d]) a few
    full-batch Adam steps of zero-shot cross-entropy then give the expert some real signal.
    """
    gen = torch.Generator().manual_seed(10_000 * (seed + 1) + index)
    out = {}
    for key in sorted(k for k in pretrained if k.startswith("visual.")):
        tensor = pretrained[key]
        if key != "visual.proj":
            rms = tensor.float().pow(2).mean().sqrt().clamp_min(0.02)  # LN biases start at 0
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            tensor = (tensor + PERTURBATION * rms * noise).to(tensor.dtype)
        out[key] = tensor.contiguous()
    if train is not None:
        out = _tune(out, pretrained["logit_scale"], *train)
    return out


def _tune(
    visual: dict[str, torch.Tensor],
    logit_scale: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
) -> dict[str, torch.Tensor]:
    tower = new_visual_tower(TINY_CLIP_CFG)
    tower.load_state_dict({k.removeprefix("visual."): v for k, v in visual.items()})
    tower.proj.requires_grad_(False)
    params = [p for p in tower.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=TUNE_LR)
    for _ in range(TUNE_STEPS):
        features = torch.nn.functional.normalize(tower(pixels), dim=-1)
        loss = torch.nn.functional.cross_entropy(logit_scale.exp() * features @ text.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"visual." + k: v.detach().clone().contiguous() for k, v in tower.state_dict().items()}


def _train_batch(
    clip: CLIP, samples: list[Sample], classes: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, labels, class text embeddings) for tuning, via open_clip's eval transform."""
    size = TINY_CLIP_CFG["vision_cfg"]["image_size"]
    transform = image_transform_v2(PreprocessCfg(size=size), is_train=False)
    tokenizer = SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
    with torch.no_grad():
        text = clip.encode_text(tokenizer([f"a photo of a {c}." for c in classes]), normalize=True)
    pixels = torch.stack([transform(image) for _, _, image, _ in samples])
    labels = torch.tensor([label for _, label, _, _ in samples])
    return pixels, labels, text


def build_clip_suite(
    root: str | Path, *, layout: str = "open_clip", n_images_per_class: int = 6, seed: int = 0
) -> Path:
    """Write the tiny CLIP suite under `root` (created if needed); return `root/suite.toml`."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, not {layout!r}")
    threads = torch.get_num_threads()
    # One thread: the tiny tuning steps are ~20x faster than with 2 threads on a busy machine,
    # and the float results do not depend on the caller's thread count.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # random inits below; leave the caller's RNG be
            return _build(Path(root), layout, n_images_per_class, seed)
    finally:
        torch.set_num_threads(threads)


def _build(root: Path, layout: str, n_images_per_class: int, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pretrained = tiny_clip_state(seed)

    if layout == "open_clip":
        (root / "tiny_clip.json").write_text(json.dumps(TINY_CLIP_CFG, indent=2) + "\n")
        _save(pretrained, root / "clip" / "open_clip_model.safetensors")
        model_lines = [
            'open_clip = "tiny_clip.json"',
            'pretrained = "clip/open_clip_model.safetensors"',
        ]
    else:
        hf_dir = root / "clip-hf"
        _save(open_clip_to_hf_clip(pretrained), hf_dir / "model.safetensors")
        _write_json(hf_dir / "config.json", hf_config_from_open_clip_cfg(TINY_CLIP_CFG))
        model_lines = ['hf = "clip-hf"']

    # Test sets as written; experts are tuned on a disjoint "train" draw (another seed).
    _write_image_folder(root / "data" / "alpha" / "test", _alpha_images(n_images_per_class, seed))
    _write_beta(root / "data" / "beta", _beta_images(n_images_per_class, seed))
    _write_image_folder(root / "data" / "gamma" / "test", _gamma_images(n_images_per_class, seed))
    train_seed = seed + 1_000
    train_sets = {
        "alpha": (_alpha_images(TRAIN_PER_CLASS, train_seed), ALPHA_CLASSES),
        "beta": (_beta_images(TRAIN_PER_CLASS, train_seed), BETA_CLASSES),
        "gamma": (_gamma_images(TRAIN_PER_CLASS, train_seed), GAMMA_CLASSES),
    }

    expert_lines = []
    vision_config = {
        "architectures": ["CLIPVisionModel"],
        **hf_config_from_open_clip_cfg(TINY_CLIP_CFG)["vision_config"],
    }
    clip = CLIP(**json.loads(json.dumps(TINY_CLIP_CFG))).eval()
    clip.load_state_dict(pretrained)
    for index, name in enumerate(EXPERTS):
        train = _train_batch(clip, *train_sets[name])
        visual = expert_visual_state(pretrained, index, seed, train)
        if layout == "open_clip":
            _save(visual, root / "ft" / f"{name}.safetensors")
            expert_lines.append(f'{name} = "ft/{name}.safetensors"')
        else:
            canonical, _ = open_clip_to_canonical(visual)
            del canonical["visual_projection.weight"]  # CLIPVisionModel has no projection
            prefix = "vision_model." if name == "gamma" else ""  # transformers 4 vs 5 saves
            tensors = {prefix + k: v.clone() for k, v in canonical.items()}
            _save(tensors, root / "ft" / name / "model.safetensors")
            _write_json(root / "ft" / name / "config.json", vision_config)
            expert_lines.append(f'{name} = "ft/{name}"')

    beta_classes = ", ".join(f'"{c}"' for c in BETA_CLASSES)
    suite = root / "suite.toml"
    suite.write_text(
        "\n".join(
            [
                "[model]",
                *model_lines,
                "",
                "[experts]",
                *expert_lines,
                "",
                "[tasks.alpha]",
                'data = "data/alpha/test"',
                'templates = ["a photo of a {}.", "a drawing of a {}."]',
                "",
                "[tasks.beta]",
                'data = "data/beta"',
                f"classes = [{beta_classes}]",
                "",
                "[tasks.gamma]",
                'data = "data/gamma/test"',
                "limit = 6",
                "",
            ]
        )
    )
    return suite


# ------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _random_colour(rng: random.Random, low: int, high: int) -> tuple[int, int, int]:
    return tuple(rng.randint(low, high) for _ in range(3))  # type: ignore[return-value]


def _shape_image(kind: str, rng: random.Random) -> Image.Image:
    """A dark shape (circle / square / triangle) on a light background, jittered."""
    image = Image.new("RGB", (IMAGE_PX, IMAGE_PX), _random_colour(rng, 170, 255))
    draw = ImageDraw.Draw(image)
    half = rng.randint(9, 15)
    cx, cy = rng.randint(half + 2, IMAGE_PX - half - 3), rng.randint(half + 2, IMAGE_PX - half - 3)
    fill = _random_colour(rng, 0, 110)
    box = (cx - half, cy - half, cx + half, cy + half)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


Sample = tuple[str, int, Image.Image, bytes]  # (relative path, label, image, file bytes)


def _encoded(path: str, label: int, image: Image.Image, fmt: str) -> Sample:
    """The sample as its file will hold it (decoded back, so JPEG loss is included)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    data = buffer.getvalue()
    return path, label, Image.open(io.BytesIO(data)).convert("RGB"), data


def _alpha_images(n: int, seed: int) -> list[Sample]:
    rng = random.Random(f"alpha-{seed}")
    return [
        _encoded(f"{cls}/{cls}_{i:03d}.png", label, _shape_image(cls, rng), "PNG")
        for label, cls in enumerate(ALPHA_CLASSES)
        for i in range(n)
    ]


_BETA_RGB = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 50, 220),
    "yellow": (235, 220, 30),
}


def _colour_image(rgb: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """A noisy solid-colour square."""
    noise = rng.normal(0.0, 18.0, size=(IMAGE_PX, IMAGE_PX, 3))
    pixels = np.clip(np.asarray(rgb, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _beta_images(n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng([seed, 2])
    return [  # classes interleaved, so both shards hold every class
        _encoded(f"{cls}_{i:03d}.png", label, _colour_image(_BETA_RGB[cls], rng), "PNG")
        for i in range(n)
        for label, cls in enumerate(BETA_CLASSES)
    ]


def _write_beta(folder: Path, samples: list[Sample]) -> None:
    """Two parquet shards as HF `datasets` writes them: image {bytes, path}, label int64."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(path, data, label) for path, label, _, data in samples]
    features = {
        "image": {"_type": "Image"},
        "label": {"names": list(BETA_CLASSES), "_type": "ClassLabel"},
    }
    schema = pa.schema(
        [
            pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            pa.field("label", pa.int64()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    shards = 2
    per_shard = math.ceil(len(rows) / shards)
    for shard in range(shards):
        part = rows[shard * per_shard : (shard + 1) * per_shard]
        table = pa.table(
            {
                "image": [{"bytes": data, "path": path} for path, data, _ in part],
                "label": [label for _, _, label in part],
            },
            schema=schema,
        )
        pq.write_table(table, folder / f"test-{shard:05d}-of-{shards:05d}.parquet")


def _texture_image(kind: str, rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Stripes / dots / checks in two random colours, with a random period and phase."""
    width, height = size
    fg, bg = _random_colour(rng, 0, 120), _random_colour(rng, 140, 255)
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    period = rng.randint(6, 10)
    phase = rng.randrange(period)
    if kind == "stripes":
        for x in range(-period + phase, width, period):
            draw.rectangle((x, 0, x + period // 2 - 1, height), fill=fg)
    elif kind == "dots":
        radius = max(1, period // 4)
        for y in range(phase, height + period, period):
            for x in range(phase, width + period, period):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fg)
    else:
        for y in range(0, height, period):
            for x in range(0, width, period):
                if ((x + y) // period) % 2 == 0:
                    draw.rectangle((x, y, x + period - 1, y + period - 1), fill=fg)
    return image


def _gamma_images(n: int, seed: int) -> list[Sample]:
    rng = random.Random(f"gamma-{seed}")
    out = []
    for label, cls in enumerate(GAMMA_CLASSES):
        for i in range(n):
            odd = label == 0 and i == 0  # the first file: inside any small limit
            image = _texture_image(cls, rng, ODD_SIZE if odd else (IMAGE_PX, IMAGE_PX))
            out.append(_encoded(f"{cls}/{cls}_{i:03d}.jpg", label, image, "JPEG"))
    return out


def _write_image_folder(folder: Path, samples: list[Sample]) -> None:
    for path, _, _, data in samples:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
