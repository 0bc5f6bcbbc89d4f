"""Example inputs that suit the model at hand: a shapes-world image, or a photo for Stable Diffusion."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from .loading import LoadedModel
from .segmenter import ISeg
from .shapes.world import SPLITS, sample

__all__ = ["example"]

_PHOTOS = Path(__file__).resolve().parent.parent / "data" / "photos"


def example(model, index: int = 0):
    """``(image, classes)`` to try with ``model`` (a ``LoadedModel``, a pipeline or an ``ISeg``):
    the model's own examples where its plug-in has them (the shapes model: test-split images),
    else a photo from ``data/photos`` of a checkout, else a shapes image.
    """
    model = model.model if isinstance(model, ISeg) else LoadedModel.of(model)
    own = model.example(index)
    if own is not None:
        return own
    photos = sorted(_PHOTOS.glob("*.jpg")) if _PHOTOS.is_dir() else []
    if photos:
        table = json.loads((_PHOTOS / "classes.json").read_text())
        path = photos[index % len(photos)]
        return Image.open(path).convert("RGB"), table[path.name]
    s = sample(SPLITS["test"].start + index)
    return s.image, list(s.classes)
