"""The shapes MM-DiT's plug-in for ``iseg.registry``: the shapes world's vocabulary, dataset and
examples (shared with the UNet's plug-in) and this model's own presets, raw rule and label
thresholds (``iseg.shapes.preset``)."""

from __future__ import annotations

from .plugin import DATASETS, KNOWN_WORDS, example, example_truth
from .preset import MMDIT_INTERACTIVE, MMDIT_LABEL_THRESHOLDS, MMDIT_PRESET, MMDIT_RAW_BG_POWER

__all__ = ["PRESETS", "KNOWN_WORDS", "LABEL_THRESHOLDS", "RAW_BG_POWER", "DATASETS", "example", "example_truth"]

PRESETS = {"shapes-mmdit": MMDIT_PRESET, "shapes-mmdit-interactive": MMDIT_INTERACTIVE}
LABEL_THRESHOLDS = MMDIT_LABEL_THRESHOLDS
RAW_BG_POWER = MMDIT_RAW_BG_POWER
