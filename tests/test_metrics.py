"""mIoU from a confusion matrix, on hand-computed cases, in both conventions."""

import numpy as np
import pytest

from iseg.evaluation.metrics import confusion, iou_per_class, miou


def test_confusion_counts_and_ignore():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    h = confusion(pred, gt, 3)
    assert h.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # the 255 pixel is ignored


def test_iou_and_both_conventions():
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 0, FN 1 -> 0;
    # class 3 never occurs nor is predicted -> undefined
    h = np.zeros((4, 4), np.int64)
    h[0, 0], h[0, 1], h[1, 1], h[2, 0] = 1, 1, 2, 1
    iou = iou_per_class(h)
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and np.isnan(iou[3])
    assert miou(h, "present") == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert miou(h, "defined") == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # a class only predicted (absent from the ground truth) counts in "defined" only
    h[0, 3] = 1
    assert miou(h, "present") == pytest.approx((1 / 4 + 2 / 3 + 0) / 3)
    assert miou(h, "defined") == pytest.approx((1 / 4 + 2 / 3 + 0 + 0) / 4)


def test_bad_labels_are_errors():
    with pytest.raises(ValueError, match="ground-truth"):
        confusion(np.zeros(3), np.array([0, 5, 1]), 3)
    with pytest.raises(ValueError, match="predicted"):
        confusion(np.array([0, 3, 1]), np.zeros(3), 3)
    with pytest.raises(ValueError, match="convention"):
        miou(np.eye(2), "mean")
