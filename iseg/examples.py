"""Example inputs that suit the model at hand: a shapes-world image, or a photo for Stable Diffusion."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["example"]

_PHOTOS = Path(__file__).resolve().parent.parent / "data" / "photos"


def example(pipe, index: int = 0):
    """``(image, classes)`` to try: a test-split shapes image for the shapes model, else a photo.

    Photos come from ``data/photos`` of a checkout; without them every model gets shapes images.
    """
    from PIL import Image

    from .shapes import SPLITS, sample

    name = getattr(pipe, "iseg_model_name", "")
    photos = sorted(_PHOTOS.glob("*.jpg")) if _PHOTOS.is_dir() else []
    if name != "shapes" and photos:
        table = json.loads((_PHOTOS / "classes.json").read_text())
        path = photos[index % len(photos)]
        return Image.open(path).convert("RGB"), table[path.name]
    s = sample(SPLITS["test"].start + index)
    return s.image, list(s.classes)
