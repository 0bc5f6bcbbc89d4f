"""The shapes world: seeded synthetic images of coloured shapes with exact masks and captions.

Every integer seed gives one sample, the same on every machine: a 64x64 RGB image with a
gradient-and-noise background and 1 to 3 non-overlapping shapes of different classes and colours,
its per-pixel class mask (0 = background, k = ``CLASSES[k-1]``) and a caption such as
"a red circle and a blue star".

Splits are disjoint seed ranges (``SPLITS``): train [0, 1e6), val [1e6, 1e6 + 10k),
test [2e6, 2e6 + 10k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "COLORS", "SPLITS", "SIZE", "Sample", "sample", "vocabulary", "caption_for"]

CLASSES = ("circle", "square", "triangle", "star", "heart", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 200, 210),
}
SPLITS = {
    "train": range(0, 1_000_000),
    "val": range(1_000_000, 1_010_000),
    "test": range(2_000_000, 2_010_000),
}
SIZE = 64


@dataclass(frozen=True)
class Sample:
    """One image of the shapes world."""

    seed: int
    image: Image.Image  # RGB, SIZE x SIZE
    mask: np.ndarray  # (SIZE, SIZE) uint8; 0 = background, k = CLASSES[k-1]
    classes: tuple[str, ...]  # shape names present, in caption order
    colors: tuple[str, ...]  # their colours, same order
    caption: str

    @property
    def labels(self) -> tuple[int, ...]:
        """Label ids of the classes present (1-based, caption order)."""
        return tuple(CLASSES.index(c) + 1 for c in self.classes)


def vocabulary() -> list[str]:
    """Every word a caption or a shapes prompt may use."""
    return ["a", "and", *CLASSES, *COLORS]


def caption_for(classes, colors=None) -> str:
    """ "a red circle and a blue star"; without colours "a circle and a star"."""
    if colors is None:
        return " and ".join(f"a {c}" for c in classes)
    return " and ".join(f"a {col} {c}" for c, col in zip(classes, colors))


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points):
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if kind == "square":
        s = r * 0.8
        return rot([(-s, -s), (s, -s), (s, s), (-s, s)])
    if kind == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if kind == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return rot(pts)
    if kind == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17 + r * 0.1))
        return rot(pts)
    if kind == "cross":
        a, b = r, r * 0.35
        return rot([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    raise ValueError(kind)


def _background(rng: np.random.Generator) -> np.ndarray:
    # muted colours so that objects stand out; a gradient at a random angle plus fine noise
    c0 = rng.uniform(40, 200, 3)
    c1 = np.clip(c0 + rng.uniform(-60, 60, 3), 0, 255)
    grey = c0.mean()
    c0 = 0.5 * c0 + 0.5 * grey
    c1 = 0.5 * c1 + 0.5 * c1.mean()
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta), 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    img = img + rng.normal(0, rng.uniform(2, 10), (SIZE, SIZE, 1))
    return img


def sample(seed: int) -> Sample:
    """The sample of one integer seed (any integer, negative ones included)."""
    rng = np.random.default_rng(int(seed) % 2**64)
    count = int(rng.integers(1, 4))
    classes = [CLASSES[i] for i in rng.choice(len(CLASSES), count, replace=False)]
    color_names = list(COLORS)
    colors = [color_names[i] for i in rng.choice(len(color_names), count, replace=False)]
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _attempt in range(200):
            r = float(rng.uniform(8, 15)) if count > 1 else float(rng.uniform(10, 20))
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
            if all(math.hypot(cx - x, cy - y) > r + rr + 2 for x, y, rr in placed):
                placed.append((float(cx), float(cy), r))
                break
        else:  # no room: shrink the scene to what fits
            break
    classes, colors = classes[: len(placed)], colors[: len(placed)]

    canvas = Image.fromarray(np.clip(_background(rng), 0, 255).astype(np.uint8), "RGB")
    mask_img = Image.new("L", (SIZE, SIZE), 0)
    draw, mdraw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask_img)
    for (cx, cy, r), name, col in zip(placed, classes, colors):
        label = CLASSES.index(name) + 1
        shade = np.clip(np.array(COLORS[col]) + rng.normal(0, 8, 3), 0, 255).astype(int)
        angle = float(rng.uniform(-0.4, 0.4))
        if name == "circle":
            box = [cx - r, cy - r, cx + r, cy + r]
            draw.ellipse(box, fill=tuple(shade))
            mdraw.ellipse(box, fill=label)
        else:
            pts = _polygon(name, cx, cy, r, angle)
            draw.polygon(pts, fill=tuple(shade))
            mdraw.polygon(pts, fill=label)
    order = rng.permutation(len(classes))
    classes = tuple(classes[i] for i in order)
    colors = tuple(colors[i] for i in order)
    return Sample(
        seed=int(seed),
        image=canvas,
        mask=np.asarray(mask_img, dtype=np.uint8).copy(),
        classes=classes,
        colors=colors,
        caption=caption_for(classes, colors),
    )
