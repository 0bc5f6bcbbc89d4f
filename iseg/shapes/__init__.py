"""The shapes world and the project's own small diffusion model trained on it.

``CLASSES``, ``SPLITS`` and ``sample(seed)`` are the data generator; the model trained by
``iseg train-shapes`` ships as ``load_model("shapes")`` with its preset ``shapes``. The model
plugs into iseg through ``iseg.registry`` (its plug-in is ``iseg.shapes.plugin``); importing this
package registers nothing.
"""

from .world import CLASSES, COLORS, SIZE, SPLITS, Sample, caption_for, sample, vocabulary

__all__ = ["CLASSES", "COLORS", "SIZE", "SPLITS", "Sample", "caption_for", "sample", "vocabulary"]
