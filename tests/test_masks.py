import pytest
import torch

from iseg.masks import maps_to_labels, minmax, power_rule_threshold


def test_power_rule():
    maps = torch.tensor([[[0.9, 0.3, 0.5]], [[0.2, 0.35, 0.39]]])  # (C=2, 1, 3)
    labels = maps_to_labels(maps, "power")
    # pixel 0: class 1 (0.9 > 0.01); pixel 1: bg (0.49 > 0.35); pixel 2: bg 0.25 < 0.5 -> class 1
    assert labels.tolist() == [[1, 0, 1]]
    assert power_rule_threshold(2.0) == pytest.approx((3 - 5**0.5) / 2, abs=1e-9)


def test_threshold_rule():
    maps = torch.tensor([[[0.9, 0.3, 0.44]], [[0.5, 0.2, 0.46]]])
    labels = maps_to_labels(maps, "threshold", threshold=0.45)
    assert labels.tolist() == [[1, 0, 2]]


def test_minmax_and_errors():
    m = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    out = minmax(m)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="background"):
        maps_to_labels(m, "other")
