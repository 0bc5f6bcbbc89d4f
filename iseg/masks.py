"""Step 6 of the method: from refined class maps to a label map (method.md §6)."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch

__all__ = ["BACKGROUND_RULES", "minmax", "maps_to_labels", "power_rule_threshold", "pool_labels"]

BACKGROUND_RULES = ("power", "threshold")


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Scale every map of ``(..., C, H, W)`` to [0, 1]; a constant map becomes 0."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1), 0)


def power_rule_threshold(power: float = 2.0) -> float:
    """The foreground threshold the power rule implies: the ``m`` where ``(1 - m)**power = m``."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if (1 - mid) ** power > mid:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _number(value) -> float | None:
    """``value`` as a float where it is one number (a 0-d tensor or array too), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Real):
        return float(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0 and not value.dtype == bool:
        return float(value)
    return None


def maps_to_labels(
    maps: torch.Tensor,
    background: str = "power",
    power: float = 2.0,
    threshold: float = 0.45,
) -> torch.Tensor:
    """Turn ``(..., C, H, W)`` class maps in [0, 1] into ``(..., H, W)`` int64 labels.

    Label 0 is background and ``k`` the k-th class (1-based).

    - ``"power"`` (VOC and Context): background score ``(1 - max_c map_c) ** power``, label =
      argmax over [background, classes]. With ``power=2`` a pixel is foreground when its best
      map exceeds about 0.382.
    - ``"threshold"`` (COCO): maps below ``threshold`` are set to 0, label = 1 + argmax, and pixels
      whose maps are all 0 are background.
    """
    if background not in BACKGROUND_RULES:
        raise ValueError(f"background must be one of {BACKGROUND_RULES}, got {background!r}")
    if maps.ndim < 3:
        raise ValueError(f"maps_to_labels needs (..., C, H, W) maps, got shape {tuple(maps.shape)}")
    # the settings' own ranges (``make_settings``): outside them every pixel would silently be background
    given = _number(power if background == "power" else threshold)
    if background == "power" and not (given is not None and math.isfinite(given) and given > 0):
        raise ValueError(f"power (bg_power) must be a finite number > 0, got {power!r}; the presets use 1 to 32")
    if background == "threshold" and not (given is not None and 0 < given < 1):
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}; the COCO presets use 0.45 to 0.5")
    if background == "power":
        bg = (1 - maps.amax(dim=-3, keepdim=True)).clamp_min(0) ** power
        return torch.cat([bg, maps], dim=-3).argmax(dim=-3)
    kept = torch.where(maps >= threshold, maps, torch.zeros_like(maps))
    labels = kept.argmax(dim=-3) + 1
    return torch.where(kept.amax(dim=-3) > 0, labels, torch.zeros_like(labels))


def pool_labels(labels, side: int) -> torch.Tensor:
    """A label map ``(H, W)`` on a ``side x side`` attention grid: each cell takes the label that
    covers most of it (ties to the smaller label). ``H`` and ``W`` must be multiples of ``side``."""
    labels = torch.as_tensor(labels).long()
    height, width = labels.shape
    if height % side or width % side:
        raise ValueError(f"a {height}x{width} label map does not tile a {side}x{side} grid")
    count = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, count).permute(2, 0, 1).float()[None]  # (1, K, H, W)
    cover = torch.nn.functional.adaptive_avg_pool2d(onehot, side)[0]  # (K, side, side)
    return cover.argmax(0)
