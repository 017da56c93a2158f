"""Zero-shot classification heads from class names, with open_clip's own machinery.

For each class every template is filled in, tokenised with the model's tokenizer and encoded by the
text tower; the normalised embeddings are averaged over templates and normalised again
(`open_clip.build_zero_shot_classifier`). A head is cached on disk, keyed by the text tower's content
hash, the class names and the templates, so it is built once per (model, task).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .cache import cache_path, touch, write_atomically


def zero_shot_head(clip, classes: Sequence[str], templates: Sequence[str], device: str | torch.device = "cpu"
                   ) -> torch.Tensor:
    """[len(classes), D] unit rows for a `engine.clip_model.LoadedClip`."""
    from safetensors.torch import load_file, save_file

    path = cache_path("heads", {"text": clip.text_sha256(), "classes": list(classes),
                                "templates": list(templates)}, ".safetensors")
    if path.is_file():
        try:
            head = load_file(str(path))["head"]
            if head.shape[0] == len(classes):
                touch(path)
                return head
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            pass
    head = build_head(clip, classes, templates, device)
    write_atomically(path, lambda tmp: save_file({"head": head}, str(tmp)))
    return head


def build_head(clip, classes: Sequence[str], templates: Sequence[str], device: str | torch.device = "cpu"
               ) -> torch.Tensor:
    from open_clip import build_zero_shot_classifier

    model = clip.model.to(device)
    with torch.inference_mode():
        weights = build_zero_shot_classifier(model, clip.tokenizer, list(classes), list(templates),
                                             num_classes_per_batch=10, device=device, use_tqdm=False)
    return weights.T.float().cpu().contiguous()  # open_clip returns [D, C]
