"""Choosing the thresholds of the ``attention`` label method on labelled images: label precision,
recall and F1 (``label_scores``), the thresholds with the best F1 (``choose_thresholds``) or the
best open-vocabulary mIoU (``choose_thresholds_by_miou``). ``iseg labels`` runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..labels.attention import AttentionThresholds, select_by_evidence
from .metrics import miou

__all__ = ["label_scores", "choose_thresholds", "choose_thresholds_by_miou"]


def label_scores(predicted: Sequence[Sequence[str]], truth: Sequence[Sequence[str]]) -> dict:
    """Precision, recall and F1 over (image, class) pairs."""
    tp = sum(len(set(p) & set(t)) for p, t in zip(predicted, truth))
    n_pred = sum(len(p) for p in predicted)
    n_true = sum(len(t) for t in truth)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "correct": tp, "predicted": n_pred, "ground_truth": n_true}


def _quantile_grid(values: np.ndarray, count: int, always) -> np.ndarray:
    return np.unique(np.concatenate([always, np.quantile(values, np.linspace(0, 0.99, count))]))


def _threshold_grid(evidence: Sequence[Mapping[str, dict]], min_labels: int, shares: int = 100,
                    peaks: int = 40) -> list[AttentionThresholds]:
    # Both axes follow the evidence's own quantiles: relative peaks of absent classes can sit orders
    # of magnitude under the image's strongest class, far below the first step of an even grid
    # (0.025), and a model's best cut may lie there. The even grid is kept as well, so the search
    # only ever gains candidates.
    if not any(evidence):
        raise ValueError("choosing label thresholds needs the evidence of at least one labelled image; got none")
    share_grid = _quantile_grid(np.array([v["share"] for ev in evidence for v in ev.values()]), shares, [0.0])
    peak_grid = _quantile_grid(np.array([v["relative_peak"] for ev in evidence for v in ev.values()]), peaks,
                               np.linspace(0, 1, 41))
    return [AttentionThresholds(float(ms), float(mp), min_labels) for ms in share_grid for mp in peak_grid]


def choose_thresholds(evidence: Sequence[Mapping[str, dict]], truth: Sequence[Sequence[str]],
                      min_labels: int = 1) -> tuple[AttentionThresholds, dict]:
    """The (min_share, min_peak) pair with the best label F1 on labelled images (a grid search)."""
    best = None
    for th in _threshold_grid(evidence, min_labels):
        score = label_scores([select_by_evidence(ev, th) for ev in evidence], truth)
        if best is None or score["f1"] > best[1]["f1"]:
            best = (th, score)
    return best


def choose_thresholds_by_miou(evidence: Sequence[Mapping[str, dict]], confusion_of, min_labels: int = 1,
                              progress: bool = False) -> tuple[AttentionThresholds, float]:
    """The (min_share, min_peak) pair whose predicted labels give the best open-vocabulary mIoU.

    A wrong label costs a segmentation far more than F1 counts it (a spurious class takes an
    object's pixels; a missed one loses them), so this searches the same grid as
    ``choose_thresholds`` for the best mIoU instead. ``confusion_of(i, classes)`` returns image
    ``i``'s confusion matrix when it is segmented with ``classes``; it is called once per distinct
    class list an image receives over the grid. Ties go to the first pair of the grid.
    """
    grid = _threshold_grid(evidence, min_labels, shares=25)
    totals: list = [0] * len(grid)
    for i, ev in enumerate(tqdm(evidence, desc="thresholds", unit="img", disable=not progress)):
        seen: dict[tuple[str, ...], np.ndarray] = {}
        for k, th in enumerate(grid):
            keep = tuple(select_by_evidence(ev, th))
            if keep not in seen:
                seen[keep] = np.asarray(confusion_of(i, list(keep)))
            totals[k] = totals[k] + seen[keep]
    scores = [miou(t) for t in totals]
    k = int(np.argmax(scores))
    return grid[k], 100 * float(scores[k])
