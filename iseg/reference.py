"""The authors' computation, for comparing with the paper's tables (the ``*-reference`` presets).

The default presets compute the method as ``docs/method.md`` writes it and fix the defects of
the authors' code. The paper's numbers, though, come from that code. A preset named
``<preset>-reference`` (``wsss-voc-reference``, ``wsss-coco-reference``, ``ovs-voc-reference``,
``ovs-context-reference``, ``ovs-coco-reference``, ``interactive-reference``) sets
``Settings.reference`` and then computes what the authors' code computes on the same model:

- **Class words.** A class given under the dataset's name is prompted with the authors' word
  (VOC ``aeroplane`` -> ``plane``; COCO ``person`` -> ``people``, ``motorcycle`` -> ``motorbike``,
  ``airplane`` -> ``plane``, ``couch`` -> ``sofa``, ``tv`` -> ``tv monitor``; Context
  ``aeroplane`` -> ``plane``, ``potted plant`` -> ``plant``, ``tv monitor`` -> ``monitor``,
  ``computer`` -> ``laptop``, ``bedclothes`` -> ``bedding``). Names outside the authors' table
  pass through unchanged.
- **Class order.** Classes enter the prompt in the order of the authors' table (Context: the 20
  VOC classes first); names outside the table follow, in the order given.
- **Prompt text**, byte for byte: dataset runs (``wsss-*``) end in ``"... and other object and
  background, " + bg`` (COCO's ``bg`` ends in ``", "``); the open-vocabulary runs (``ovs-*``)
  lack the ``", "`` before the background words (``"...and backgroundground, land, ..."``).
- **Class tokens, defects included.** The authors' table gives every name a token count and the
  tokens that stand for it (only the last word of ``potted plant``, ``tv monitor``,
  ``traffic light``, ``fire hydrant``, ``baseball bat``, ``baseball glove``, ``tennis racket``,
  ``wine glass``). Positions start at 4 and advance by count + 1 per class, from the table, not
  the tokenizer. ``fire hydrant`` is counted 2 but is 3 CLIP tokens: it selects the first
  sub-word of "hydrant", and every later class selects the token just before its own (its
  last token, or the "and" before a one-word class). Cat-Cross scales exactly these tokens, and
  the class map is their mean. A name outside the table counts its real tokens and selects
  them all (from the table's running position, so a defect before it shifts it too).
- **float16** (dataset runs): the attention maps as stored, the 0.7/0.3 mixing, the KL
  clustering (distances computed as the authors' ``kl_dis``: both sides cast to float16, 1e-5
  added, logs and sums in float16; only exact zeros floored at 1e-6), the cluster means and the
  class maps are float16, emulated with torch's float16 arithmetic (also on the CPU). Refinement
  and labels run in float32, as theirs do.
- **Interactive demo** (``interactive-reference``): points, lines and boxes are read from the
  pass with the prompt ``" "`` whose token 0 (the start token) is scaled by gamma (1.6); a line
  is the distinct cells of its points (the demo's mouse positions, nothing between them); a box
  covers cells ``[y0*side//H, y1*side//H)`` x ``[x0*side//W, x1*side//W)`` (end exclusive);
  a text prompt is ``"a photography of " + " and ".join(descriptions) + " and other object and
  background"`` whose description positions advance by the *current* description's token count
  (the demo's defect), read from the half-resolution grid of the UNet's second-to-last up block
  alone (``UNetBackbone.reference_layers(..., interactive=True)``); the final
  map goes from the attention grid straight to the image size; foreground is where it exceeds 0.4.

Use them to reproduce or compare against the paper; use the default presets for anything else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import refine as R
from .prompts import Prompt, PromptTooLongError, UnknownWordError, _unknown_error, check_class_names, token_ids

__all__ = [
    "REFERENCE_KINDS", "DATASET_KINDS", "TABLES", "WORDS", "BACKGROUND", "reference_words", "reference_prompt",
    "prompt_text", "token_positions", "mix_half", "kl_distance_half", "kl_cluster_half", "class_maps_half",
    "interactive_empty_prompt", "interactive_text_prompt", "box_cells", "line_cells", "INTERACTIVE_THRESHOLD",
]

DATASET_KINDS = ("wsss-voc", "wsss-coco", "ovs-voc", "ovs-context", "ovs-coco")
REFERENCE_KINDS = DATASET_KINDS + ("interactive",)

# The authors' tables: (word, token count, selected offsets) in the order of their class ids.
_ONE = (1, (0,))
_BOTH = (2, (0, 1))
_LAST = (2, (1,))
VOC_TABLE = tuple((w, *spec) for w, spec in [
    ("plane", _ONE), ("bicycle", _ONE), ("bird", _ONE), ("boat", _ONE), ("bottle", _ONE), ("bus", _ONE),
    ("car", _ONE), ("cat", _ONE), ("chair", _ONE), ("cow", _ONE), ("dining table", _BOTH), ("dog", _ONE),
    ("horse", _ONE), ("motorbike", _ONE), ("person", _ONE), ("potted plant", _LAST), ("sheep", _ONE),
    ("sofa", _ONE), ("train", _ONE), ("tv monitor", _LAST),
])
_COCO_TWO = {"traffic light": _LAST, "fire hydrant": _LAST, "stop sign": _BOTH, "parking meter": _BOTH,
             "sports ball": _BOTH, "baseball bat": _LAST, "baseball glove": _LAST, "surfboard": _BOTH,
             "tennis racket": _LAST, "wine glass": _LAST, "hot dog": _BOTH, "potted plant": _LAST,
             "dining table": _BOTH, "tv monitor": _LAST, "cell phone": _BOTH, "teddy bear": _BOTH,
             "hair drier": _BOTH}
COCO_TABLE = tuple((w, *_COCO_TWO.get(w, _ONE)) for w in (
    "people", "bicycle", "car", "motorbike", "plane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "potted plant", "bed", "dining table", "toilet", "tv monitor", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
))
CONTEXT_TABLE = tuple((w, *_ONE) for w in (
    "plane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog", "horse",
    "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor", "bag", "bed", "bench", "book",
    "building", "cabinet", "ceiling", "cloth", "laptop", "cup", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "keyboard", "light", "mountain", "mouse", "curtain", "platform", "sign", "plate", "road",
    "rock", "shelves", "sidewalk", "sky", "snow", "bedding", "track", "tree", "truck", "wall", "water", "window",
    "wood",
))
TABLES = {"voc": VOC_TABLE, "coco": COCO_TABLE, "context": CONTEXT_TABLE}

# dataset name -> the authors' word (names equal to a word map to themselves)
WORDS = {
    "voc": {"aeroplane": "plane"},
    "coco": {"person": "people", "motorcycle": "motorbike", "airplane": "plane", "couch": "sofa", "tv": "tv monitor"},
    "context": {"aeroplane": "plane", "airplane": "plane", "potted plant": "plant", "tv monitor": "monitor",
                "computer": "laptop", "bedclothes": "bedding"},
}

# the open-vocabulary VOC run reads its tagger's words (buses, people, table, plant, monitor) as the
# table's classes; they map the same way here
TAGGER_WORDS = {"ovs-voc": {"airplane": "plane", "buses": "bus", "people": "person", "table": "dining table",
                            "plant": "potted plant", "monitor": "tv monitor"}}

# the first line of the authors' background strings (the rest is lost to a string-continuation slip)
BACKGROUND = {
    "voc": "ground, land, grass, tree, building, wall, sky, lake, water",
    "coco": "ground, land, grass, tree, building, wall, sky, lake, water, river, sea, railway, ",
    "context": "",
}

INTERACTIVE_THRESHOLD = 0.4  # the demo labels a pixel foreground where its map beats a constant 0.4
PROMPT_START = 4  # "<start> a photograph of": the first class token


def _dataset(kind: str) -> str:
    if kind not in DATASET_KINDS:
        raise ValueError(f"no reference dataset run {kind!r}; runs: {DATASET_KINDS}")
    return kind.split("-", 1)[1]


def reference_words(kind: str, classes: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(words, names)``: the authors' word of every class, in the authors' order, and the
    caller's name of each (``names[i]`` is what ``words[i]`` was given as)."""
    dataset = _dataset(kind)
    names = check_class_names(classes)
    order = {w: i for i, (w, _, _) in enumerate(TABLES[dataset])}
    words = {**WORDS[dataset], **TAGGER_WORDS.get(kind, {})}
    mapped = []
    for k, name in enumerate(names):
        key = name.lower()
        word = words.get(key, key if key in order else name)
        mapped.append((order.get(word, len(order) + k), word, name))
    seen: dict[str, str] = {}
    for _, word, name in mapped:
        if word in seen:
            raise ValueError(f"classes {seen[word]!r} and {name!r} are both the authors' {word!r} in {kind}; give it once")
        seen[word] = name
    mapped.sort(key=lambda m: m[0])
    return tuple(m[1] for m in mapped), tuple(m[2] for m in mapped)


def prompt_text(kind: str, words: Sequence[str]) -> str:
    """The authors' prompt for ``words`` (already their words, in their order), byte for byte."""
    dataset = _dataset(kind)
    names = " and ".join(words)
    if kind.startswith("wsss"):
        return f"a photograph of {names} and other object and background, {BACKGROUND[dataset]}"
    return f"a photograph of {names} and other object and background{BACKGROUND[dataset]}"


def token_positions(tokenizer, kind: str, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token positions the authors select for every word: from their table's counts, starting
    at 4, each class ``count + 1`` after the previous one (defects included, see the module)."""
    table = {w: (count, sel) for w, count, sel in TABLES[_dataset(kind)]}
    spans, start = [], PROMPT_START
    for word in words:
        if word in table:
            count, sel = table[word]
        else:  # outside their table: its real tokens, all of them
            count = len(token_ids(tokenizer, word, add_special_tokens=False, truncation=False))
            sel = tuple(range(count))
        spans.append(tuple(start + s for s in sel))
        start += count + 1
    return tuple(spans)


def reference_prompt(tokenizer, kind: str, classes: Sequence[str], model: str | None = None, known=None) -> Prompt:
    """The ``Prompt`` the authors' run ``kind`` makes for ``classes`` (dataset names or their words):
    their words in their order (``classes``), the caller's names (``names``), their text and
    their token positions (``spans``, which Cat-Cross scales and class maps average)."""
    words, names = reference_words(kind, classes)
    _check_start(tokenizer, kind)
    text = prompt_text(kind, words)
    return _checked_prompt(tokenizer, text, words, names, token_positions(tokenizer, kind, words), model, known)


def _check_start(tokenizer, kind: str, prefix: str = "a photograph of") -> None:
    # the authors' positions start at 4: a start token and three words, as CLIP (SD 1.x/2.x) splits them
    ids = token_ids(tokenizer, prefix, add_special_tokens=True, truncation=False)
    if len(ids) < PROMPT_START or list(ids[:PROMPT_START]) != list(
            token_ids(tokenizer, prefix + " cat", add_special_tokens=True, truncation=False)[:PROMPT_START]) or (
            ids[0] != getattr(tokenizer, "bos_token_id", None)):
        raise ValueError(f"the {kind}-reference preset reproduces the authors' Stable Diffusion 1.x/2.x runs, whose "
                         f"token positions assume CLIP's tokenizer (a start token, then {prefix!r} as 3 tokens); this "
                         "model's tokenizer splits the prompt otherwise. Use the default presets for this model")


def _checked_prompt(tokenizer, text, words, names, spans, model, known) -> Prompt:
    ids = token_ids(tokenizer, text, add_special_tokens=True, truncation=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if (unk is not None and unk in ids[1:-1]) or (known is not None and any(w.lower() not in known for w in text.split())):
        problem = _unknown_error(tokenizer, text, words, model, known)
        if problem is not None:
            raise problem
        raise UnknownWordError(f"the prompt {text!r} has words the model's tokenizer does not know")
    window = tokenizer.model_max_length
    outside = [w for w, span in zip(words, spans) if span and span[-1] >= window - 1]
    if outside:
        raise PromptTooLongError(
            f"the authors' prompt {text!r} is {len(ids)} tokens long but the text encoder reads {window}; "
            f"class(es) {outside} fall outside the window (the authors' code would fail or read the end "
            "token). Segment fewer classes per image")
    padded = token_ids(tokenizer, text, padding="max_length", max_length=window, truncation=True)
    return Prompt(text=text, classes=tuple(words), input_ids=tuple(padded), spans=tuple(spans),
                  names=tuple(names) if tuple(names) != tuple(words) else ())


# -- float16, as the authors' pipeline keeps it ----------------------------------------------------
def mix_half(cross, weights, size: int) -> torch.Tensor:
    """``aggregate_cross_attention`` in float16: every map cast to float16, normalised to sum 1,
    upsampled and weighted in float16, the resolutions summed in float16. ``(B, size*size, T)``."""
    terms = []
    for r, w in weights.items():
        a = cross[r].half()
        batch, n, tokens = a.shape
        if n != r * r:
            raise ValueError(f"cross-attention at r={r} must have {r * r} query pixels, got {n}")
        grid = (a / a.sum(dim=-2, keepdim=True)).transpose(1, 2).reshape(batch, tokens, r, r)
        if r != size:
            grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        terms.append((w * grid).reshape(batch, tokens, size * size).transpose(1, 2))
    return torch.stack(terms).sum(0)


def kl_distance_half(anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The authors' ``kl_dis``: ``(K, T)`` anchors x ``(n, T)`` vectors -> ``(K, n)``, in float16.

    Both sides are cast to float16 and 1e-5 is added (in float16); with ``q = log a - log x``
    the distance is ``0.5 * sum a*q - 0.5 * sum x*q``, every step rounded to float16."""
    a = anchor.half() + 1e-5
    b = x.half() + 1e-5
    a, b = a.unsqueeze(-2), b.unsqueeze(-3)
    quotient = torch.log(a) - torch.log(b)
    return torch.sum(a * quotient, dim=-1) * 0.5 + (-torch.sum(b * quotient, dim=-1) * 0.5)


def kl_cluster_half(x: torch.Tensor, rounds: int = 20) -> torch.Tensor:
    """The clustering step as the authors' float16 pipeline computes it, for ``(B, n, T)`` maps.

    Exact zeros become 1e-6 (float16); 36 seeds on the 6x6 grid (step 11 on 64x64);
    every round assigns each pixel to its nearest prototype by ``kl_distance_half`` (ties to the
    lower index) and replaces the prototypes by their members' float16 means (clusters with no
    members dropped). Finally every vector becomes its cluster's float16 sum divided by its
    float16 member count. Returns float16 ``(B, n, T)``."""
    if x.ndim != 3:
        raise ValueError(f"kl_cluster_half needs (B, n, T) vectors, got shape {tuple(x.shape)}")
    n = x.shape[1]
    size = math.isqrt(n)
    if size * size != n:
        raise ValueError(f"kl_cluster_half needs a square map, got {n} pixels")
    # the authors' 6x6 seed grid, step 11 on 64x64 (scaled to other sides, as refine.kl_cluster does)
    step = max(1, size * 11 // 64)
    coords = [min(i * step, size - 1) for i in range(6)]
    seeds = torch.tensor([y * size + c for y in coords for c in coords], device=x.device)
    out = []
    for item in x.half():
        item = torch.where(item == 0, torch.tensor(1e-6, dtype=torch.float16, device=item.device), item)
        prototypes = item[seeds]
        assign = None
        for _ in range(int(rounds)):
            assign = kl_distance_half(prototypes, item).argmin(0)
            prototypes = torch.stack([item[assign == k].mean(0) for k in assign.unique()])
        mixed = torch.empty_like(item)
        for k in assign.unique():
            members = assign == k
            total = item[members].sum(0)  # float16, accumulated as the GPU does and rounded
            mixed[members] = total / torch.tensor(float(members.sum()), dtype=torch.float16)
        out.append(mixed)
    return torch.stack(out)


def class_maps_half(x: torch.Tensor, spans) -> torch.Tensor:
    """The class maps as float16 means over the selected tokens, then float32 (as the authors'
    refinement reads them)."""
    return R.class_maps(x.half(), spans).float()


# -- the interactive demo --------------------------------------------------------------------------
def interactive_empty_prompt(tokenizer) -> Prompt:
    """The demo's prompt for points, lines and boxes: ``" "`` with token 0 (the start token)
    selected, so that Cat-Cross scales the start token's embedding by gamma."""
    ids = token_ids(tokenizer, " ", padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return Prompt(text=" ", classes=(), input_ids=tuple(ids), spans=((0,),))


def interactive_text_prompt(tokenizer, descriptions: Sequence[str], model: str | None = None, known=None) -> Prompt:
    """The demo's text prompt: ``"a photography of d1 and d2 and other object and background"``;
    description ``i`` selects all its tokens from a start that advances by 1 + the token count
    of description ``i`` itself, not of the one before it (the demo's defect: wrong tokens when
    descriptions differ in length)."""
    descriptions = check_class_names(descriptions)
    _check_start(tokenizer, "interactive", "a photography of")
    counts = [len(token_ids(tokenizer, d, add_special_tokens=False, truncation=False)) for d in descriptions]
    spans, start = [], PROMPT_START
    for i, count in enumerate(counts):
        if i > 0:
            start = start + 1 + count
        spans.append(tuple(range(start, start + count)))
    text = f"a photography of {' and '.join(descriptions)} and other object and background"
    return _checked_prompt(tokenizer, text, descriptions, descriptions, spans, model, known)


def _grid_spans(geometry) -> tuple[float, float]:
    if geometry.aspect == "pad":
        return float(geometry.side), float(geometry.side)
    return float(geometry.height), float(geometry.width)


def box_cells(box, geometry, side: int):
    """The demo's box: cells ``[floor(y0*side/H), floor(y1*side/H))`` x the same along x, as a
    ``(side*side,)`` float32 numpy 0/1 map (corners in either order, as the demo sorts them)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {box!r} has a coordinate that is not a finite number")
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    span_y, span_x = _grid_spans(geometry)
    if x0 < 0 or y0 < 0 or x1 > geometry.width or y1 > geometry.height:
        raise ValueError(f"box {box!r} reaches outside the {geometry.width}x{geometry.height} image")
    r0, r1 = math.floor(y0 * side / span_y), math.floor(y1 * side / span_y)
    c0, c1 = math.floor(x0 * side / span_x), math.floor(x1 * side / span_x)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"box {box!r} covers no cell of the {side}x{side} grid under the demo's rule "
                         "[y0*side//H, y1*side//H); draw a larger box")
    grid = np.zeros((side, side), np.float32)
    grid[r0:r1, c0:c1] = 1
    return grid.reshape(-1)


def line_cells(cells: Sequence[int]) -> list[int]:
    """The demo's line: the distinct cells of its points, in cell order (nothing between them)."""
    return sorted(set(cells))
