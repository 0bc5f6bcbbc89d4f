"""Interactive prompts (method.md §7): segment what a user points at, strokes, boxes or describes.

One forward pass per image (with the empty prompt) is cached; every further point, line or box on
the same image reuses its self-attention and costs only the refinement. A text prompt needs the
cross-attention of its own words, so each new description runs the UNet once more (also cached).
The cache is keyed on the image's bytes, the prompt's tokens and every setting that acts before
decoding, so a pass is never reused for other settings.

    seg = iseg.ISeg(iseg.load_pipeline("shapes"))
    r = seg.segment_prompt(image, points=[(30, 40)])       # (x, y) in image pixels
    r.mask                                                  # (H, W) bool
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import refine as R
from .images import Geometry, load_image, to_original
from .masks import minmax
from .presets import PRESETS, Settings
from .prompts import Prompt

__all__ = [
    "PromptResult", "point_cells", "line_cells", "box_cells", "segment_prompt", "interactive_defaults", "text_prompt",
]

KINDS = ("points", "line", "box", "text")


@dataclass
class PromptResult:
    """What ``ISeg.segment_prompt`` returns."""

    mask: np.ndarray  # (H, W) bool at the image's size
    score: np.ndarray  # (H, W) float in [0, 1], the final map the mask thresholds
    maps: np.ndarray  # (iterations + 1, h, w) combined map after each refinement step
    initial: np.ndarray  # (h, w) the initial map on the attention grid (columns averaged)
    kind: str
    image: np.ndarray  # (H, W, 3) uint8
    settings: Settings

    def overlay(self, alpha: float = 0.5):
        from .viz import overlay

        return overlay(self.image, self.mask.astype(np.int64), alpha=alpha)


def _grid_side(geometry: Geometry) -> tuple[float, float]:
    """How many image pixels the model's square spans along y and x (the padded side with "pad")."""
    if geometry.aspect == "pad":
        return float(geometry.side), float(geometry.side)
    return float(geometry.height), float(geometry.width)


def _check_xy(p, geometry: Geometry, what: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in p)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an (x, y) pair of pixel coordinates, got {p!r}") from None
    # the right and bottom edges belong to the image: a click on the border is on the last cell
    if not (0 <= x <= geometry.width and 0 <= y <= geometry.height) or not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{what} {p!r} lies outside the {geometry.width}x{geometry.height} image "
                         f"(x must be in [0, {geometry.width}], y in [0, {geometry.height}])")
    return x, y


def _cell(x: float, y: float, geometry: Geometry, side: int) -> int:
    span_y, span_x = _grid_side(geometry)
    return min(side - 1, int(side * y / span_y)) * side + min(side - 1, int(side * x / span_x))


def point_cells(points, geometry: Geometry, side: int) -> list[int]:
    """Grid cell of every point, ``(x, y)`` pairs in image pixels (one column each)."""
    if points is None or len(points) == 0:
        raise ValueError("points is empty; give at least one (x, y) pair")
    if len(points) == 2 and all(isinstance(v, (int, float, np.integer, np.floating)) for v in points):
        points = [points]  # one bare (x, y) pair
    return [_cell(*_check_xy(p, geometry, f"point {i}"), geometry, side) for i, p in enumerate(points)]


def line_cells(line, geometry: Geometry, side: int) -> list[int]:
    """Every distinct grid cell a stroke through ``line``'s (x, y) points passes, in order."""
    if line is None or len(line) == 0:
        raise ValueError("the line is empty; give the stroke as a list of (x, y) points")
    pts = [_check_xy(p, geometry, f"line point {i}") for i, p in enumerate(line)]
    span_y, span_x = _grid_side(geometry)
    step = 0.25 * min(span_x, span_y) / side  # a quarter of a cell: no cell is skipped
    cells: list[int] = []
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] or pts):
        count = max(1, int(math.ceil(math.hypot(x1 - x0, y1 - y0) / step)))
        for k in range(count + 1):
            t = k / count
            c = _cell(x0 + t * (x1 - x0), y0 + t * (y1 - y0), geometry, side)
            if c not in cells:
                cells.append(c)
    return cells


def box_cells(box, geometry: Geometry, side: int) -> np.ndarray:
    """``(side*side,)`` 0/1 map of the cells inside ``box = (x0, y0, x1, y1)`` (image pixels)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}") from None
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"degenerate box {box!r}: needs x1 > x0 and y1 > y0")
    _check_xy((x0, y0), geometry, "box corner")
    if x1 > geometry.width or y1 > geometry.height:
        raise ValueError(f"box {box!r} reaches outside the {geometry.width}x{geometry.height} image")
    span_y, span_x = _grid_side(geometry)
    r0, r1 = int(side * y0 / span_y), min(side - 1, int(math.ceil(side * y1 / span_y)) - 1)
    c0, c1 = int(side * x0 / span_x), min(side - 1, int(math.ceil(side * x1 / span_x)) - 1)
    grid = np.zeros((side, side), np.float32)
    grid[r0 : max(r0, r1) + 1, c0 : max(c0, c1) + 1] = 1
    return grid.reshape(-1)


def _descriptions(text) -> list[str]:
    parts = [text] if isinstance(text, str) else list(text)
    out = [" ".join(p.split()) for item in parts for p in str(item).split(";")]
    out = [p for p in out if p]
    if not out:
        raise ValueError("the text prompt is empty; describe what to segment, several descriptions separated by ';'")
    return out


def _empty_prompt(tokenizer) -> Prompt:
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True)["input_ids"]
    return Prompt(text="", classes=(), input_ids=tuple(ids), spans=())


def forward_key(seg, arr: np.ndarray, prompt: Prompt, s: Settings) -> tuple:
    """What a cached forward pass must match: the image's bytes, the prompt's tokens, every
    setting that acts before decoding (``iseg.segmenter.FORWARD_FIELDS``) and the model's
    device and dtype."""
    from .segmenter import FORWARD_FIELDS

    digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest() + str(arr.shape) + str(arr.dtype)
    fields = tuple((name, repr(getattr(s, name))) for name in FORWARD_FIELDS)
    model = (str(seg.device), str(next(seg.pipe.unet.parameters()).dtype), id(seg.pipe.unet))
    return digest, prompt.input_ids, fields, model


def _observation(seg, arr: np.ndarray, prompt: Prompt, s: Settings):
    # points, lines and boxes always use the pass with the empty prompt (the self-attention depends
    # on the prompt a little), so a result never depends on which prompts came before it
    key = forward_key(seg, arr, prompt, s)
    cache = seg._prompt_cache
    with seg._lock:
        if key in cache:
            cache[key] = cache.pop(key)  # most recently used last
            return cache[key]
    size = seg.image_size(s)
    seg.plan(size // seg.vae_scale, s)  # bad layer or weight settings fail before the UNet runs
    obs = seg._observe_batch([arr], [prompt], s, size, names=["image"])[0]
    with seg._lock:
        cache[key] = obs
        while len(cache) > 16:  # keep the last few passes only
            cache.pop(next(iter(cache)))
    return obs


INTERACTIVE_FIELDS = ("lam", "iterations", "clamp_max", "threshold", "clustering")


def interactive_defaults(seg) -> dict:
    """The refinement settings ``segment_prompt`` uses unless told otherwise.

    The ``interactive`` preset (the reference demo's lam 0.1, N 50, threshold 0.5), or the
    model's own ``<preset>-interactive`` preset where it registers one (the shapes model does:
    its values were chosen on validation images, see its model card).
    """
    own = PRESETS.get(f"{seg.preset}-interactive") if seg.preset else None
    preset = own if own is not None else PRESETS["interactive"]
    return {k: preset.get(k, PRESETS["interactive"].get(k, getattr(Settings(), k))) for k in INTERACTIVE_FIELDS}


def text_prompt(seg, text, settings: Settings | None = None) -> Prompt:
    """The prompt of a text query: its descriptions in the model's own prompt template.

    The descriptions take the place of class names in ``prompt_prefix`` + names joined by
    ``prompt_joiner`` (no extra or background words); every token of each description is a class
    token. A model reads a prompt shaped like its training captions best: the shapes model,
    trained on "a red circle and a blue star", finds a lone "cross" far less well (mean IoU 0.63
    against 0.78 on 30 validation images). A description that repeats the template's last word
    ("a circle" after the prefix "a") loses the repeat. ``prompt_prefix=""`` gives the reference
    demo's bare descriptions.
    """
    s = settings or seg.settings
    descriptions = _descriptions(text)
    words = s.prompt_prefix.split()
    if words:
        descriptions = [_drop_repeat(d, words[-1]) for d in descriptions]
    template = replace(s, extra_words=(), background_words=())
    return seg.prompt_for(descriptions, template)


def _drop_repeat(description: str, word: str) -> str:
    head, _, rest = description.partition(" ")
    return rest if rest and head.lower() == word.lower() else description


def segment_prompt(seg, image, *, points=None, line=None, box=None, text=None, **overrides) -> PromptResult:
    """Segment one object from points, a line, a box or text descriptions (exactly one kind).

    Coordinates are ``(x, y)`` in image pixels; ``box`` is ``(x0, y0, x1, y1)``. Several points
    (or descriptions separated by ';') are combined. Refinement uses the ``interactive`` preset's
    ``lam``, ``iterations``, ``clamp_max`` and ``threshold`` (or the model's own interactive
    preset, see ``interactive_defaults``) unless overridden. Text descriptions are placed in the
    model's prompt template (``text_prompt``).
    """
    given = {k: v for k, v in dict(points=points, line=line, box=box, text=text).items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one kind of prompt ({', '.join(KINDS)}); got {sorted(given) or 'none'}")
    kind, value = next(iter(given.items()))
    s = seg.with_settings(**{**interactive_defaults(seg), **overrides})
    arr = load_image(image)
    if kind == "text":
        prompt = text_prompt(seg, value, s)
    else:
        prompt = _empty_prompt(seg.pipe.tokenizer)
    obs = _observation(seg, arr, prompt, s)
    side, geometry = obs.grid, obs.geometry
    n = side * side
    device = obs.self_attention.device
    if kind == "text":
        x = R.aggregate_cross_attention({r: a[None] for r, a in obs.cross.items()}, obs.weights, side)[0]
        cols = R.class_maps(x, prompt.spans)  # (n, K)
        cols = minmax(cols.T.reshape(-1, side, side)).reshape(-1, n).T
    elif kind == "box":
        cols = torch.from_numpy(box_cells(value, geometry, side)).to(device)[:, None]
    else:
        cells = point_cells(value, geometry, side) if kind == "points" else line_cells(value, geometry, side)
        cols = torch.zeros(n, len(cells), device=device)
        cols[cells, torch.arange(len(cells))] = 1
    P = R.entropy_reduce(obs.self_attention.float(), s.lam, s.clamp_max)
    steps = R.refine(cols.float(), P, s.iterations)  # (N+1, n, K)
    # a column that is the same on every cell (a box over the whole image) stays constant under
    # P (rows sum to 1), and nrm maps a constant to 0: it asks for everything, so it is 1 everywhere
    whole = (cols.amin(0) == cols.amax(0)) & (cols.amax(0) > 0)
    if whole.any():
        steps[..., whole] = 1.0
    steps = steps / steps.amax(-2, keepdim=True).clamp_min(torch.finfo(steps.dtype).tiny)
    combined = steps.mean(-1)
    combined = combined / combined.amax(-1, keepdim=True).clamp_min(torch.finfo(combined.dtype).tiny)
    maps = combined.reshape(-1, side, side)
    score = to_original(maps[-1], geometry, obs.size).clamp(0, 1)
    initial = cols.float().mean(-1).reshape(side, side)
    return PromptResult(
        mask=(score > s.threshold).cpu().numpy(),
        score=score.cpu().numpy(),
        maps=maps.cpu().numpy(),
        initial=initial.cpu().numpy(),
        kind=kind,
        image=obs.image,
        settings=s,
    )
