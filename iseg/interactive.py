"""Interactive prompts (method document §7): segment what a user points at, strokes, boxes or describes.

A ``PromptSession`` runs one forward pass per image (with the empty prompt); every further point,
line or box on the same image reuses its self-attention and costs only the refinement. A text
prompt needs the cross-attention of its own words, so each new description runs the model once
more (also kept). Passes are keyed on the prompt's tokens and every setting that acts before
decoding, so a pass is never reused for other settings.

    seg = iseg.ISeg(iseg.load_model("shapes"))
    session = seg.prompt_session(image)
    r = session.segment(points=[(30, 40)])        # (x, y) in image pixels
    r.mask                                        # (H, W) bool
    seg.segment_prompt(image, box=(5, 5, 40, 40))  # the same, with the session kept by ``seg``
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import refine as R
from . import viz
from .images import Geometry, load_image, to_original
from .masks import minmax
from .presets import Settings, find_preset, make_settings
from .prompts import Prompt, token_ids

__all__ = [
    "PromptResult", "PromptSession", "point_cells", "line_cells", "box_cells", "interactive_defaults", "text_prompt",
    "empty_prompt", "prompt_result",
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

    def overlay(self, alpha: float = viz.OVERLAY_ALPHA):
        return viz.overlay(self.image, self.mask.astype(np.int64), alpha=alpha)


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


INTERACTIVE_FIELDS = ("lam", "iterations", "clamp_max", "threshold", "clustering")


def interactive_defaults(seg) -> dict:
    """The refinement settings ``segment_prompt`` uses unless told otherwise.

    The ``interactive`` preset (the reference demo's lam 0.1, N 50, threshold 0.5), or the
    model's own ``<preset>-interactive`` preset where it registers one (the shapes model does:
    its values were chosen on validation images, see its model card). A field given to ``ISeg`` by
    hand (``ISeg(model, lam=5)``) is read from ``seg.settings`` instead.
    """
    base = find_preset("interactive")
    own = find_preset(f"{seg.preset}-interactive") if seg.preset else None
    preset = own if own is not None else base
    hand_set = getattr(seg, "hand_set", frozenset())
    return {k: getattr(seg.settings, k) if k in hand_set else preset.get(k, base.get(k, getattr(Settings(), k)))
            for k in INTERACTIVE_FIELDS}


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


class PromptSession:
    """One image prepared for interactive prompts, in the manner of segment-anything's predictor.

        session = seg.prompt_session(image)        # one forward pass, with the empty prompt
        session.segment(points=[(30, 40)])         # cheap: refinement only
        session.segment(box=(10, 10, 50, 40))
        session.segment(text="star")               # one more pass for the description's words

    Coordinates are ``(x, y)`` in image pixels; ``box`` is ``(x0, y0, x1, y1)``. Several points
    (or descriptions separated by ';') are combined. Refinement uses ``interactive_defaults(seg)``
    unless overridden, at the session or per call. Passes are kept per prompt and per setting
    that acts before decoding, so a pass is never reused for other settings.
    """

    _KEEP = 4  # forward passes kept per session (an SD 2.1 pass holds about 64 MB of self-attention)

    def __init__(self, seg, image, observe: bool = True, **overrides):
        self.seg = seg
        self.image = load_image(image)  # (H, W, 3) float32
        self.settings = seg.with_settings(**{**interactive_defaults(seg), **overrides})
        self._passes: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        # points, lines and boxes are read with the prompt of no words: tokenised once per session
        self._empty = empty_prompt(seg.backbone.tokenizer)
        if observe:
            self.observation(self._empty, self.settings)

    @staticmethod
    def image_key(arr: np.ndarray) -> str:
        """What identifies an image: its bytes, shape and type."""
        return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest() + str(arr.shape) + str(arr.dtype)

    def observation(self, prompt: Prompt, s: Settings):
        """The image's forward pass with ``prompt`` under ``s`` (run once, then kept)."""
        # keyed also on the model's device and precision: moving the model makes a new pass
        key = (prompt.input_ids, s.forward_key(), str(self.seg.device), str(self.seg.backbone.dtype))
        with self._lock:
            if key in self._passes:
                self._passes.move_to_end(key)
                return self._passes[key]
        obs = self.seg.observe_prompt(self.image, prompt, s)
        with self._lock:
            self._passes[key] = obs
            while len(self._passes) > self._KEEP:
                self._passes.popitem(last=False)
        return obs

    def segment(self, *, points=None, line=None, box=None, text=None, **overrides) -> PromptResult:
        """Segment one object from points, a line, a box or text descriptions (exactly one kind)."""
        given = {k: v for k, v in dict(points=points, line=line, box=box, text=text).items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"give exactly one kind of prompt ({', '.join(KINDS)}); got {sorted(given) or 'none'}")
        kind, value = next(iter(given.items()))
        s = make_settings(None, base=self.settings, **overrides) if overrides else self.settings
        # points, lines and boxes always use the pass with the empty prompt (the self-attention depends
        # on the prompt a little), so a result never depends on which prompts came before it
        prompt = text_prompt(self.seg, value, s) if kind == "text" else self._empty
        obs = self.observation(prompt, s)
        return prompt_result(obs, prompt, kind, value, s)


def empty_prompt(tokenizer) -> Prompt:
    """The prompt of no words: what points, lines and boxes are read with."""
    ids = token_ids(tokenizer, "", padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return Prompt(text="", classes=(), input_ids=tuple(ids), spans=())


def prompt_result(obs, prompt: Prompt, kind: str, value, s: Settings) -> PromptResult:
    """Refine the columns a prompt selects on an observation into one mask."""
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
