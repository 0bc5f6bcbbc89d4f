"""Segmentation metrics: a confusion matrix accumulated over a whole set, and mIoU from it.

Two conventions (method.md §8):
- ``"present"`` (the iSeg reference): average IoU over the classes that occur in the ground truth;
- ``"defined"`` (mmsegmentation, used by CLIP-based peers): average over classes whose IoU is
  defined (union > 0), i.e. also classes that were only predicted.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IGNORE", "confusion", "iou_per_class", "miou"]

IGNORE = 255


def confusion(pred, gt, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts, rows = ground truth, columns = prediction.

    Pixels whose ground truth is ``ignore`` are skipped; predictions outside ``[0, num_classes)``
    are an error, as are ground-truth labels out of range other than ``ignore``.
    """
    pred = np.asarray(pred).astype(np.int64).ravel()
    gt = np.asarray(gt).astype(np.int64).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in size: {np.shape(pred)} vs {np.shape(gt)}")
    keep = gt != ignore
    pred, gt = pred[keep], gt[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth labels must lie in [0, {num_classes}) or be {ignore}; got {gt.min()}..{gt.max()}")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes}); got {pred.min()}..{pred.max()}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(hist: np.ndarray) -> np.ndarray:
    """IoU of every class, ``TP / (TP + FP + FN)``; NaN where the union is empty."""
    hist = np.asarray(hist, dtype=np.float64)
    tp = np.diag(hist)
    union = hist.sum(0) + hist.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def miou(hist: np.ndarray, convention: str = "present") -> float:
    """Mean IoU (0..1) of a confusion matrix under one of the two conventions."""
    iou = iou_per_class(hist)
    if convention == "present":
        mask = np.asarray(hist).sum(1) > 0
    elif convention == "defined":
        mask = ~np.isnan(iou)
    else:
        raise ValueError(f"convention must be 'present' or 'defined', got {convention!r}")
    if not mask.any():
        return float("nan")
    return float(np.nanmean(np.where(mask, iou, np.nan)))
