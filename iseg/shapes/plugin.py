"""The shapes model's plug-in for ``iseg.registry``: its presets, vocabulary, label thresholds and
example images. Imported when the shapes model is first used, not when ``iseg`` is imported."""

from __future__ import annotations

from .dataset import ShapesDataset
from .model import EXTRA_WORDS
from .preset import LABEL_THRESHOLDS, RAW_BG_POWER, SHAPES_INTERACTIVE, SHAPES_PRESET
from .world import SPLITS, sample, vocabulary

__all__ = ["PRESETS", "KNOWN_WORDS", "LABEL_THRESHOLDS", "RAW_BG_POWER", "DATASETS", "example"]

PRESETS = {"shapes": SHAPES_PRESET, "shapes-interactive": SHAPES_INTERACTIVE}

DATASETS = {"shapes": ShapesDataset}

# the words the model was trained on: pieces of any other word mean nothing to it
KNOWN_WORDS = frozenset(vocabulary()) | frozenset(EXTRA_WORDS)


def example(index: int = 0):
    """``(image, classes)`` of a test-split shapes image."""
    s = sample(SPLITS["test"].start + index)
    return s.image, list(s.classes)
