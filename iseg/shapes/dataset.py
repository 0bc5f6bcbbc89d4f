"""The shapes world as a segmentation dataset (``open_dataset("shapes")``, ``iseg eval --dataset shapes``)."""

from __future__ import annotations

import numpy as np

from ..evaluation.datasets import DatasetError, Item, SegmentationDataset
from .world import CLASSES, SPLITS, sample

__all__ = ["ShapesDataset"]


class ShapesDataset(SegmentationDataset):
    """The shapes world (``iseg.shapes``): ``count`` images of a split, made on the fly."""

    name = "shapes"
    class_names = tuple(CLASSES)
    needs_root = False  # made on the fly

    def __init__(self, root=None, split: str = "test", count: int | None = None):
        if split not in SPLITS:
            raise DatasetError(f"shapes: split must be one of {sorted(SPLITS)}, got {split!r}")
        self.root, self.split = None, split
        seeds = SPLITS[split]
        # 10,000 per split unless asked; the full training range is a million seeds
        self.ids = [str(s) for s in seeds[: count if count is not None else 10_000]]

    def load(self, id: str) -> Item:
        rec = sample(int(id))
        label = rec.mask.astype(np.uint8)
        return Item(id=id, image=rec.image, label=label, classes=self.classes_in(label))
