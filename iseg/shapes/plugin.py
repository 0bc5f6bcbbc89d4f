"""The shapes model's plug-in for ``iseg.registry``: its presets, vocabulary, label thresholds and
example images. Imported when the shapes model is first used, not when ``iseg`` is imported."""

from __future__ import annotations

import numpy as np

from .dataset import ShapesDataset
from .model import EXTRA_WORDS
from .preset import LABEL_THRESHOLDS, RAW_BG_POWER, SHAPES_INTERACTIVE, SHAPES_PRESET
from .world import CLASSES, SPLITS, sample, vocabulary

__all__ = ["PRESETS", "KNOWN_WORDS", "LABEL_THRESHOLDS", "RAW_BG_POWER", "DATASETS", "example", "example_truth"]

PRESETS = {"shapes": SHAPES_PRESET, "shapes-interactive": SHAPES_INTERACTIVE}

DATASETS = {"shapes": ShapesDataset}

# the words the model was trained on: pieces of any other word mean nothing to it
KNOWN_WORDS = frozenset(vocabulary()) | frozenset(EXTRA_WORDS)


def example(index: int = 0):
    """``(image, classes)`` of a test-split shapes image."""
    s = sample(SPLITS["test"].start + index)
    return s.image, list(s.classes)


def example_truth(index: int = 0):
    """The exact mask of ``example(index)``: ``(H, W)`` int64, 0 background, ``k`` its ``classes[k - 1]``
    (the convention of a ``SegmentationResult``'s ``labels``)."""
    s = sample(SPLITS["test"].start + index)
    truth = np.zeros(s.mask.shape, dtype=np.int64)
    for k, name in enumerate(s.classes, start=1):
        truth[s.mask == CLASSES.index(name) + 1] = k
    return truth
