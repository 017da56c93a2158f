"""Evaluation throughput of a ViT-B/32-sized CLIP suite: images/s of the engine's evaluation against
a plain open_clip loop, in the same process.

Nothing is downloaded: a randomly initialised open_clip `ViT-B-32-quickgelu` is written to a temporary
suite with one expert and an ImageFolder of random JPEG images (224 px after preprocessing, like the
real test sets). Timed:

- decode: the first evaluation, which decodes, resizes and crops every image (DataLoader workers)
  and caches them as uint8 tensors;
- engine: a steady-state `engine.evaluate.evaluate` over the cached images (on CUDA: fp16 autocast,
  channels-last, batches of 256);
- baseline: the plain loop a user would write: float32 `model.encode_image` on batches of 64 of the
  same preprocessed images, no autocast.

    python benchmarks/eval_throughput.py [--device cpu|cuda] [--images N] [--repeats R]

Target on an H100/H200-class GPU: ≥ 5,000 images/s for the engine's evaluation.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_suite(root: Path, n_images: int, n_classes: int = 10) -> Path:
    import open_clip
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
    model = open_clip.model.CLIP(**cfg)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    (root / "clip").mkdir(parents=True)
    save_file(state, str(root / "clip" / "open_clip_model.safetensors"))
    rng = np.random.default_rng(0)
    for i in range(n_images):
        folder = root / "data" / f"class{i % n_classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)  # resized and cropped to 224 by the engine
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    suite = root / "suite.toml"
    suite.write_text('[model]\nopen_clip = "ViT-B-32-quickgelu"\npretrained = "clip/open_clip_model.safetensors"\n'
                     '[experts]\nnoise = "clip/open_clip_model.safetensors"\n'
                     '[tasks.noise]\ndata = "data"\n')
    return suite


def baseline_images_per_s(suite, device: torch.device, limit: int, repeats: int) -> float:
    """float32 open_clip `encode_image` on batches of 64, images already decoded (same as the engine's)."""
    model = suite.clip.model.to(device).eval()
    split = suite.test_split("noise", limit)
    heads = suite.head("noise").to(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            for images, labels in split.batches(64):
                features = model.encode_image(images.to(device))
                features = features / features.norm(dim=-1, keepdim=True)
                (100.0 * features @ heads.T).argmax(-1).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return len(split) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None,
                        help="test images (default: 20000 on CUDA, 96 on the CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    args = parser.parse_args()
    device = torch.device(args.device)
    n = args.images or (20000 if device.type == "cuda" else 96)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MERGE_EXPLORER_CACHE"] = str(Path(tmp) / "cache")
        from engine.evaluate import evaluate
        from engine.suite_file import load_suite_file

        start = time.perf_counter()
        suite = load_suite_file(write_suite(Path(tmp), n))
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        evaluate(suite, "pretrained", device=device, limit=0)  # decode + cache + first forward
        first_s = time.perf_counter() - start
        best = float("inf")
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            evaluate(suite, "pretrained", device=device, limit=0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        engine_ips = n / best
        base_ips = baseline_images_per_s(suite, device, 0, args.repeats)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"ViT-B/32 evaluation throughput on {name}, {n} images of 224 px")
    print(f"  setup (random CLIP + images written, suite checked): {setup_s:.1f} s")
    print(f"  first evaluation (decode + preprocess + cache + forward): {first_s:.1f} s "
          f"({n / first_s:.0f} images/s)")
    print(f"  engine, steady state: {engine_ips:,.0f} images/s"
          + (" (fp16 autocast, channels-last, batch 256)" if device.type == "cuda" else " (float32, batch 256)"))
    print(f"  baseline loop (float32 encode_image, batch 64): {base_ips:,.0f} images/s")
    print(f"  ratio engine / baseline: {engine_ips / base_ips:.2f}x")
    if device.type == "cuda":
        print(f"  target ≥ 5,000 images/s: {'met' if engine_ips >= 5000 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
