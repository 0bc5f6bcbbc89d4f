"""Example inputs that suit the model at hand: a shapes-world image, or a photo for Stable Diffusion."""

from __future__ import annotations

import json

from PIL import Image

from ..loading import LoadedModel
from ..registry import data_path
from ..segmenter import ISeg
from ..shapes.world import SPLITS, sample

__all__ = ["example"]


def example(model, index: int = 0):
    """``(image, classes)`` to try with ``model`` (a ``LoadedModel``, a pipeline or an ``ISeg``):
    the model's own examples where its plug-in has them (the shapes model: test-split images),
    else a photo shipped with iseg (``data_path('photos')``), else a shapes image.
    """
    model = model.model if isinstance(model, ISeg) else LoadedModel.of(model)
    own = model.example(index)
    if own is not None:
        return own
    try:
        folder = data_path("photos")
    except FileNotFoundError:  # an installation without the photos
        folder = None
    photos = sorted(folder.glob("*.jpg")) if folder is not None else []
    if photos:
        table = json.loads((folder / "classes.json").read_text())
        path = photos[index % len(photos)]
        return Image.open(path).convert("RGB"), table[path.name]
    s = sample(SPLITS["test"].start + index)
    return s.image, list(s.classes)
