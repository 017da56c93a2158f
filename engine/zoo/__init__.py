"""The demo zoo: a tiny CLIP ViT pretrained and fine-tuned on 8 rendered tasks, built offline.

`python -m engine zoo build` (engine.zoo.build.build_zoo) makes it, a no-op when it is up to date;
`load_zoo()` reads it.
See tasks.py for the data, build.py for the recipe and manifest.py for the on-disk layout.
"""
from .manifest import MANIFEST_NAME, Zoo, ZooTask, default_zoo_dir, load_zoo

__all__ = ["MANIFEST_NAME", "Zoo", "ZooTask", "default_zoo_dir", "load_zoo"]
