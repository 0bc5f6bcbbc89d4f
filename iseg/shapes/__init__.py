"""The shapes world and the project's own small diffusion model trained on it.

``CLASSES``, ``SPLITS`` and ``sample(seed)`` are the data generator; the model trained by
``python -m iseg.shapes.train`` ships as ``load_pipeline("shapes")`` with its preset ``shapes``.
"""

from ..loading import register_model
from ..presets import register_preset
from .preset import SHAPES_INTERACTIVE, SHAPES_PRESET
from .world import CLASSES, COLORS, SIZE, SPLITS, Sample, caption_for, sample, vocabulary

register_preset("shapes", **SHAPES_PRESET)
register_preset("shapes-interactive", **SHAPES_INTERACTIVE)
register_model("shapes", preset="shapes")

__all__ = ["CLASSES", "COLORS", "SIZE", "SPLITS", "Sample", "caption_for", "sample", "vocabulary"]
