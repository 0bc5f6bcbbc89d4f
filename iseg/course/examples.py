"""Example inputs that suit the model at hand: a shapes-world image, or a photo for Stable Diffusion."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ..loading import LoadedModel
from ..registry import data_path
from ..segmenter import ISeg
from ..shapes.world import SPLITS, sample

__all__ = ["example", "example_truth", "example_ious"]


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


def example_truth(model, index: int = 0):
    """The exact mask of ``example(model, index)`` where there is one (the shapes models' examples are
    test images of a world drawn with its masks), ``(H, W)`` int64 with 0 background and ``k`` the
    example's ``classes[k - 1]``; ``None`` for a photo, which has no exact mask here."""
    model = model.model if isinstance(model, ISeg) else LoadedModel.of(model)
    return model.example_truth(index)


def example_ious(labels, truth) -> dict[int, float]:
    """``{k: IoU}`` of each class ``k`` of ``truth`` (``example_truth``) with ``labels == k`` (a
    result's ``labels``, the same classes in the same order): overlap over union, each ``(H, W)``."""
    labels, truth = np.asarray(labels), np.asarray(truth)
    if labels.shape != truth.shape:
        raise ValueError(f"labels {labels.shape} and the exact mask {truth.shape} differ in size; give the labels "
                         "of the same image at its own size (a result's .labels)")
    out = {}
    for k in (int(k) for k in np.unique(truth) if k > 0):
        pred, gt = labels == k, truth == k
        out[k] = float((pred & gt).sum() / (pred | gt).sum())
    return out
