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
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import reference as REF
from . import refine as R
from . import viz
from .decode import check_refinement
from .forward import Cache
from .images import Geometry, load_image, to_original
from .masks import minmax
from .presets import Settings, find_preset, make_settings
from .prompts import Prompt, PromptTooLongError, token_ids

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


def _coordinate(v) -> float:
    # True and False are numbers to Python, never to a user giving pixel coordinates
    if isinstance(v, (bool, np.bool_, str, bytes)):
        raise TypeError(v)
    return float(v)


def _check_xy(p, geometry: Geometry, what: str) -> tuple[float, float]:
    try:
        x, y = (_coordinate(v) for v in p)
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


def _xy(points, geometry: Geometry, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of a list of ``(x, y)`` pairs as float64 arrays, every pair checked (an
    error names the first bad one); many pairs are checked at once."""
    arr = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 2 and not any(isinstance(v, (bool, np.bool_, str, bytes)) for v in arr.flat):
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            arr = None
    else:
        arr = None
    if arr is None:  # ragged, or not numbers: pair by pair, for the error naming the pair
        pairs = [_check_xy(p, geometry, f"{what} {i}") for i, p in enumerate(points)]
        arr = np.array(pairs, np.float64).reshape(-1, 2)
    x, y = arr[:, 0], arr[:, 1]
    bad = ~(np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x <= geometry.width) & (y >= 0) & (y <= geometry.height))
    if bad.any():
        i = int(np.argmax(bad))
        _check_xy(points[i], geometry, f"{what} {i}")  # raises, naming the pair
    return x, y


def _cells(x: np.ndarray, y: np.ndarray, geometry: Geometry, side: int) -> np.ndarray:
    span_y, span_x = _grid_side(geometry)
    rows = np.minimum(side - 1, np.floor(side * y / span_y).astype(np.int64))
    cols = np.minimum(side - 1, np.floor(side * x / span_x).astype(np.int64))
    return rows * side + cols


def _distinct(cells: np.ndarray) -> list[int]:
    _, first = np.unique(cells, return_index=True)
    return [int(c) for c in cells[np.sort(first)]]


def _pairs(value, what: str):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{what} must be a list of (x, y) pairs of pixel coordinates, got {value!r}")
    return value


def point_cells(points, geometry: Geometry, side: int) -> list[int]:
    """The distinct grid cells of the points, ``(x, y)`` pairs in image pixels, in the order first
    clicked (one column each: clicking a cell twice asks for the same thing once, so any number of
    clicks costs at most one column per cell)."""
    if points is None or len(_pairs(points, "points")) == 0:
        raise ValueError("points is empty; give at least one (x, y) pair")
    if len(points) == 2 and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                                for v in points):
        points = [points]  # one bare (x, y) pair
    x, y = _xy(points, geometry, "point")
    return _distinct(_cells(x, y, geometry, side))


#: samples of a stroke beyond which it is refused (a stroke across a 64-cell grid takes about 400)
MAX_LINE_SAMPLES = 20_000_000


def line_cells(line, geometry: Geometry, side: int) -> list[int]:
    """Every distinct grid cell a stroke through ``line``'s (x, y) points passes, in order."""
    if line is None or len(_pairs(line, "the line")) == 0:
        raise ValueError("the line is empty; give the stroke as a list of (x, y) points")
    x, y = _xy(line, geometry, "line point")
    if len(x) == 1:
        x, y = np.repeat(x, 2), np.repeat(y, 2)
    span_y, span_x = _grid_side(geometry)
    step = 0.25 * min(span_x, span_y) / side  # a quarter of a cell: no cell is skipped
    counts = np.maximum(1, np.ceil(np.hypot(np.diff(x), np.diff(y)) / step).astype(np.int64))
    total = int((counts + 1).sum())
    if total > MAX_LINE_SAMPLES:
        raise ValueError(f"the line is too long to follow: its {len(x)} points span {total:,} quarter-cell steps "
                         f"(at most {MAX_LINE_SAMPLES:,}); give a box, or fewer points")
    segment = np.repeat(np.arange(len(counts)), counts + 1)
    start = np.cumsum(counts + 1) - (counts + 1)
    t = (np.arange(total) - start[segment]) / counts[segment]
    xs = x[segment] + t * (x[segment + 1] - x[segment])
    ys = y[segment] + t * (y[segment + 1] - y[segment])
    return _distinct(_cells(xs, ys, geometry, side))


def box_cells(box, geometry: Geometry, side: int) -> np.ndarray:
    """``(side*side,)`` 0/1 map of the cells inside ``box = (x0, y0, x1, y1)`` (image pixels)."""
    try:
        x0, y0, x1, y1 = (_coordinate(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {box!r} has a coordinate that is not a finite number; give pixel positions")
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
    if isinstance(text, (bytes, bytearray)):
        raise TypeError(f"text must be a description (str) or a list of them, got bytes {bytes(text)!r}; "
                        "decode it first (text.decode())")
    if not isinstance(text, str) and not isinstance(text, (list, tuple)):
        raise TypeError(f"text must be a description (str) or a list of them, got {type(text).__name__} {text!r}")
    parts = [text] if isinstance(text, str) else list(text)
    wrong = [p for p in parts if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"text must be a description (str) or a list of them; {wrong[0]!r} is a "
                        f"{type(wrong[0]).__name__}")
    out = [" ".join(p.split()) for item in parts for p in item.split(";")]
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
    if seg.settings.reference == "interactive":  # the authors' demo (interactive-reference)
        own = find_preset("interactive-reference")
    preset = own if own is not None else base
    return {k: getattr(seg.settings, k) if k in seg.hand_set else preset.get(k, base.get(k, getattr(Settings(), k)))
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
    _check_repeats(seg.backbone.tokenizer, descriptions, s)
    if s.reference == "interactive":  # the demo's own template and token positions
        return REF.interactive_text_prompt(seg.backbone.tokenizer, descriptions, model=seg.model.name,
                                           known=seg.model.known_words)
    words = s.prompt_prefix.split()
    if words:
        descriptions = [_drop_repeat(d, words[-1]) for d in descriptions]
    # a dataset run's reference prompt is for class lists, not descriptions
    template = replace(s, extra_words=(), background_words=(), reference=None)
    return seg.prompt_for(descriptions, template)


def _check_repeats(tokenizer, descriptions: list[str], settings: Settings) -> None:
    """A text prompt that repeats a description is refused as such, and one too long for the text
    encoder as too long, before it is read as a class list (whose error would say "duplicate class
    name" and list every part)."""
    keys = [d.lower() for d in descriptions]
    repeated = sorted({k: d for d, k in reversed(list(zip(descriptions, keys))) if keys.count(k) > 1}.values(),
                      key=str.lower)  # each as first written
    window = getattr(tokenizer, "model_max_length", None)
    text = f"{settings.prompt_prefix} {settings.prompt_joiner.join(descriptions)}".strip()
    length = len(token_ids(tokenizer, text, truncation=False, verbose=False)) if isinstance(window, int) else 0
    if isinstance(window, int) and length > window:
        parts = f"{len(descriptions)} descriptions (parts separated by ';')" if len(descriptions) > 1 else "1 description"
        raise PromptTooLongError(f"the text prompt, {parts}, is {length} tokens long in the model's prompt, but the "
                                 f"text encoder reads {window}; give fewer or shorter descriptions"
                                 + (f", each once ({_listed(repeated)} repeated)" if repeated else ""))
    if repeated:
        raise ValueError(f"the text prompt repeats the description(s) {_listed(repeated)}; give each once (a repeat "
                         "adds nothing to the mask)")


def _listed(names: list[str], most: int = 5) -> str:
    shown = ", ".join(map(repr, names[:most]))
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


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
        self._passes = Cache(self._KEEP)
        # points, lines and boxes are read with the prompt of no words: tokenised once per session
        self._empty = empty_prompt(seg.backbone.tokenizer)
        if observe:
            self.observation(self._empty_for(self.settings), self.settings)

    def _empty_for(self, s: Settings) -> Prompt:
        # the authors' demo reads points, lines and boxes with " " and its start token scaled
        return REF.interactive_empty_prompt(self.seg.backbone.tokenizer) if s.reference == "interactive" else self._empty

    @staticmethod
    def image_key(arr: np.ndarray) -> str:
        """What identifies an image: its bytes, shape and type."""
        return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest() + str(arr.shape) + str(arr.dtype)

    def observation(self, prompt: Prompt, s: Settings):
        """The image's forward pass with ``prompt`` under ``s`` (run once, then kept)."""
        # keyed also on the model's device and precision: moving the model makes a new pass
        key = (prompt.input_ids, s.forward_key(), str(self.seg.backbone.device), str(self.seg.backbone.dtype))
        return self._passes.get(key, lambda: self.seg.observe(self.image, prompt, settings=s)[0])

    def segment(self, *, points=None, line=None, box=None, text=None, **overrides) -> PromptResult:
        """Segment one object from points, a line, a box or text descriptions (exactly one kind)."""
        given = {k: v for k, v in dict(points=points, line=line, box=box, text=text).items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"give exactly one kind of prompt ({', '.join(KINDS)}); got {sorted(given) or 'none'}")
        kind, value = next(iter(given.items()))
        s = make_settings(None, base=self.settings, **overrides) if overrides else self.settings
        # points, lines and boxes always use the pass with the empty prompt (the self-attention depends
        # on the prompt a little), so a result never depends on which prompts came before it
        prompt = text_prompt(self.seg, value, s) if kind == "text" else self._empty_for(s)
        obs = self.observation(prompt, s)
        return prompt_result(obs, prompt, kind, value, s)


#: bytes of refinement steps held at once: columns are refined in chunks of this size, so a line
#: through a thousand cells needs no more memory than a few columns
REFINE_CHUNK_BYTES = 64 * 2**20


def refined_mean(cols: torch.Tensor, P: torch.Tensor, iterations: int) -> torch.Tensor:
    """``(N+1, n)``: the mean over the ``K`` columns of ``cols`` ``(n, K)`` of each column refined
    (method §5) and max-normalised, after every step; computed a chunk of columns at a time."""
    n, count = cols.shape
    chunk = max(1, REFINE_CHUNK_BYTES // ((iterations + 1) * n * cols.element_size()))
    total = None
    for start in range(0, count, chunk):
        part = cols[:, start : start + chunk]
        steps = R.refine(part, P, iterations)  # (N+1, n, k)
        # a column that is the same on every cell (a box over the whole image) stays constant under
        # P (rows sum to 1), and nrm maps a constant to 0: it asks for everything, so it is 1 everywhere
        whole = (part.amin(0) == part.amax(0)) & (part.amax(0) > 0)
        if whole.any():
            steps[..., whole] = 1.0
        steps = steps / steps.amax(-2, keepdim=True).clamp_min(torch.finfo(steps.dtype).tiny)
        summed = steps.sum(-1)
        total = summed if total is None else total + summed
    return total / count


def empty_prompt(tokenizer) -> Prompt:
    """The prompt of no words: what points, lines and boxes are read with."""
    ids = token_ids(tokenizer, "", padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return Prompt(text="", classes=(), input_ids=tuple(ids), spans=())


def prompt_result(obs, prompt: Prompt, kind: str, value, s: Settings) -> PromptResult:
    """Refine the columns a prompt selects on an observation into one mask."""
    side, geometry = obs.grid, obs.geometry
    reference = s.reference == "interactive"
    n = side * side
    device = obs.self_attention.device
    if kind == "text":
        x = R.aggregate_cross_attention({r: a[None] for r, a in obs.cross.items()}, obs.weights, side)[0]
        cols = R.class_maps(x, prompt.spans)  # (n, K)
        cols = minmax(cols.T.reshape(-1, side, side)).reshape(-1, n).T
    elif kind == "box":
        cells = REF.box_cells(value, geometry, side) if reference else box_cells(value, geometry, side)
        cols = torch.from_numpy(cells).to(device)[:, None]
    else:
        if kind == "points":
            cells = point_cells(value, geometry, side)
        elif reference:  # the demo's line: the cells of its points only
            cells = REF.line_cells(point_cells(value, geometry, side))
        else:
            cells = line_cells(value, geometry, side)
        cols = torch.zeros(n, len(cells), device=device)
        cols[cells, torch.arange(len(cells))] = 1
    P = R.entropy_reduce(obs.self_attention.float(), s.lam, s.clamp_max)
    combined = refined_mean(cols.float(), P, s.iterations)
    combined = combined / combined.amax(-1, keepdim=True).clamp_min(torch.finfo(combined.dtype).tiny)
    maps = combined.reshape(-1, side, side)
    # the demo resizes the map from the attention grid straight to the image; iseg goes through
    # the processing size first, as the dataset runs do
    score = to_original(maps[-1], geometry, side if reference else obs.size).clamp(0, 1)
    initial = cols.float().mean(-1).reshape(side, side)
    check_refinement(cols.float(), [obs.self_attention], P, maps, s)
    return PromptResult(
        mask=(score > s.threshold).cpu().numpy(),
        score=score.cpu().numpy(),
        maps=maps.cpu().numpy(),
        initial=initial.cpu().numpy(),
        kind=kind,
        image=obs.image,
        settings=s,
    )
