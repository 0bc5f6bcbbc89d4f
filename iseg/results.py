"""What the method produces: an ``Observation`` per forward pass, a ``SegmentationResult`` per
decoded image, a ``Trace`` of every attention layer for looking inside the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import viz
from .images import Geometry, to_original
from .masks import maps_to_labels, minmax
from .presets import Settings
from .prompts import Prompt

__all__ = ["Observation", "SegmentationResult", "Trace"]


@dataclass
class Observation:
    """What one noisy forward pass gives for one image; ``iseg.decode.decode`` turns it into masks."""

    cross: dict[int, torch.Tensor]  # {r: (r*r, T)} head-mean cross-attention
    self_attention: torch.Tensor  # (n, n) head-mean self-attention, rows = query pixels
    prompt: Prompt
    image: np.ndarray  # (H, W, 3) uint8
    geometry: Geometry
    size: int  # side of the square whose pass gave the self-attention (the maps go back to the image through it)
    grid: int  # side of the self-attention grid
    weights: dict[int, float]  # the plan's resolution weights
    settings: Settings
    forward_s: float = 0.0


@dataclass
class SegmentationResult:
    """What ``ISeg.segment`` returns for one image."""

    labels: np.ndarray  # (H, W) int64 at the original size; 0 = background, k = classes[k-1]
    classes: tuple[str, ...]
    maps: np.ndarray  # (iterations + 1, C, h, w) refined class maps on the attention grid
    initial: np.ndarray  # (C, h, w) Cat-Cross class maps M before any normalisation
    prompt: str
    token_spans: tuple[tuple[int, ...], ...]
    image: np.ndarray  # (H, W, 3) uint8, the input as read
    settings: Settings
    geometry: Geometry
    size: int  # side of the square whose pass gave the self-attention (the maps go back to the image through it)
    self_attention: np.ndarray | None = None  # (n, n) when return_self_attention=True
    timing: dict = field(default_factory=dict)
    # the caller's name of each of ``classes`` where the prompt used another word (the
    # ``*-reference`` presets prompt with the authors' words, in their order); empty otherwise
    names: tuple[str, ...] = ()

    @property
    def given_classes(self) -> tuple[str, ...]:
        """The caller's names of ``classes``, in the order of the labels (label k = ``given_classes[k-1]``)."""
        return self.names or self.classes

    @property
    def iterations(self) -> int:
        return self.maps.shape[0] - 1

    def scores(self, iteration: int = -1) -> np.ndarray:
        """``(C, H, W)`` class maps of one iteration at the original size, min-max normalised."""
        last = len(self.maps) - 1
        if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) or not -last - 1 <= iteration <= last:
            raise IndexError(f"iteration must be 0..{last} (this result ran {last} refinement iterations; -1 is the "
                             f"last), got {iteration!r}")
        maps = torch.from_numpy(self.maps[iteration])
        return minmax(to_original(maps, self.geometry, self.size)).numpy()

    def labels_at(self, iteration: int, bg_power: float | None = None) -> np.ndarray:
        """The label map after ``iteration`` refinement steps (0 = raw Cat-Cross maps), by the
        settings' background rule, or with another ``bg_power`` (raw maps are peaked and have
        their own best power: ``LoadedModel.raw_bg_power``)."""
        s = self.settings
        scores = torch.from_numpy(self.scores(iteration))
        power = s.bg_power if bg_power is None else bg_power
        return maps_to_labels(scores, s.background, power, s.threshold).numpy()

    def mask(self, name: str) -> np.ndarray:
        """Boolean mask of one class at the original size."""
        if name in self.classes:
            return self.labels == self.classes.index(name) + 1
        if name in self.given_classes:
            return self.labels == self.given_classes.index(name) + 1
        raise ValueError(f"{name!r} is not one of this result's classes {list(self.classes)}")

    def overlay(self, alpha: float = viz.OVERLAY_ALPHA, iteration: int | None = None):
        """The image with the label map drawn over it, as a PIL image."""
        labels = self.labels if iteration is None else self.labels_at(iteration)
        return viz.overlay(self.image, labels, alpha=alpha)

    def show(self, **kwargs):
        """Plot image, overlay and per-class maps with matplotlib."""
        return viz.show_result(self, **kwargs)


@dataclass
class Trace:
    """Every captured attention layer of one forward pass, with the prompt that produced it."""

    store: object  # AttentionStore
    prompt: Prompt
    image: np.ndarray
    geometry: Geometry
    size: int
    latent_side: int
    settings: Settings

    def layers(self, kind: str | None = None):
        return [self.store.layers[n] for n in self.store.names(kind)]

    def token_map(self, name: str, token: int, head: int | None = None) -> np.ndarray:
        """``(r, r)`` cross-attention of one layer to one token position: ``head`` None or -1 for the mean
        of the heads (the explore views' "-1 mean"), else one head ``0..heads-1``."""
        cross = self.store.names("cross")
        if name not in cross:
            kind = "a self-attention layer" if name in self.store.names("self") else "not a captured layer"
            raise KeyError(f"{name!r} is {kind}; token maps are read from the cross-attention layers: {cross}"
                           + ("" if cross else " (none: trace with kind='cross' or None)"))
        a = self.store.mean(name) if head is None else self.store.heads(name)
        if head is not None:
            if not isinstance(head, (int, np.integer)) or not -1 <= head < a.shape[1]:
                raise IndexError(f"head must be one of 0..{a.shape[1] - 1} of layer {name!r} (or None for their "
                                 f"mean), got {head!r}")
            a = a[:, head] if head >= 0 else a.mean(1)
        if not isinstance(token, (int, np.integer)) or not 0 <= token < a.shape[-1]:
            raise IndexError(f"token must be a position 0..{a.shape[-1] - 1} of the prompt (its {a.shape[-1]} tokens; "
                             f"the classes' are {dict(zip(self.prompt.classes, self.prompt.spans))}), got {token!r}")
        r = math.isqrt(a.shape[-2])
        return a[0, :, token].reshape(r, r).cpu().numpy()

    def class_map(self, name: str, cls: str, head: int | None = None) -> np.ndarray:
        """Mean over a class's tokens of ``token_map``."""
        if cls not in self.prompt.classes:
            raise ValueError(f"class {cls!r} is not in this trace's prompt; its classes: {list(self.prompt.classes)}")
        span = self.prompt.spans[self.prompt.classes.index(cls)]
        return np.mean([self.token_map(name, i, head) for i in span], axis=0)
