"""Dataset folders in the standard layouts, made from shapes-world images in a temp dir.

Shapes labels 1..6 are mapped to chosen classes of the target dataset (``MAPS``), and a 2-pixel
border is marked 255 (ignored), as VOC marks object outlines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from iseg.evaluation.datasets import COCO_CLASSES, CONTEXT_CLASSES, VOC_CLASSES
from iseg.shapes import CLASSES, sample
from iseg.viz import label_png

# shapes class k (1-based) -> a class name of each dataset
MAPS = {
    "voc": ("cat", "dog", "bird", "sheep", "cow", "horse"),
    "context": ("cat", "dog", "bird", "sky", "grass", "tree"),
    "coco": ("cat", "dog", "bird", "fire hydrant", "teddy bear", "toothbrush"),
}
TABLES = {"voc": VOC_CLASSES, "context": CONTEXT_CLASSES, "coco": COCO_CLASSES}


def relabel(mask: np.ndarray, kind: str) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for k, name in enumerate(MAPS[kind], start=1):
        lut[k] = TABLES[kind].index(name) + 1
    out = lut[mask]
    out[:2, :] = 255
    out[:, :2] = 255
    return out


def expected(seed: int, kind: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """The label array and present class names (dataset label order) a reader must return."""
    label = relabel(sample(seed).mask, kind)
    table = TABLES[kind]
    return label, tuple(table[v - 1] for v in np.unique(label) if 0 < v < 255)


def _write(image_path: Path, label_path: Path, seed: int, kind: str, palette: bool = True) -> None:
    s = sample(seed)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    s.image.save(image_path, quality=95)
    label = relabel(s.mask, kind)
    (label_png(label) if palette else Image.fromarray(label, mode="L")).save(label_path)


def make_voc(root: Path, seeds, split: str = "val", aug: bool = False) -> dict[str, int]:
    """``root/VOCdevkit/VOC2012`` with the given seeds; returns ``{id: seed}``."""
    base = root / "VOCdevkit" / "VOC2012"
    ids = {f"2007_{seed:06d}": seed for seed in seeds}
    folder = "SegmentationClassAug" if aug else "SegmentationClass"
    for i, seed in ids.items():
        _write(base / "JPEGImages" / f"{i}.jpg", base / folder / f"{i}.png", seed, "voc", palette=not aug)
    lst = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("\n".join(ids) + "\n")
    return ids


def make_context(root: Path, seeds, split: str = "val") -> dict[str, int]:
    base = root / "VOCdevkit" / "VOC2010"
    ids = {f"2008_{seed:06d}": seed for seed in seeds}
    for i, seed in ids.items():
        _write(base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClassContext" / f"{i}.png", seed, "context",
               palette=False)
    lst = base / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("\n".join(ids) + "\n")
    return ids


def make_coco2014(root: Path, seeds, split: str = "val") -> dict[str, int]:
    ids = {f"COCO_{split}2014_{seed:012d}": seed for seed in seeds}
    for i, seed in ids.items():
        _write(root / f"{split}2014" / f"{i}.jpg", root / "SegmentationClass" / f"{split}2014" / f"{i}.png", seed,
               "coco", palette=False)
    return ids


def make_coco164k(root: Path, seeds, split: str = "val") -> dict[str, int]:
    ids = {f"{seed:012d}": seed for seed in seeds}
    for i, seed in ids.items():
        _write(root / "images" / f"{split}2017" / f"{i}.jpg",
               root / "annotations" / f"{split}2017" / f"{i}_instanceTrainIds.png", seed, "coco", palette=False)
    return ids


assert len(CLASSES) == 6
