"""Which classes of a vocabulary are in an image: image-level labels for open-vocabulary runs.

``predict_labels(images, vocabulary, method=...)`` returns one list of class names per image:

- ``"attention"``: training-free, no extra model. The vocabulary goes into as few prompts as the
  77-token window allows; every prompt is segmented as usual (one forward pass, Cat-Cross,
  refinement, labels), and a class is kept when it wins at least ``min_share`` of the image's
  pixels (foreground in the refined segmentation, and more raw cross-attention there than the
  prompt's other classes) and its raw cross-attention peak is at least ``min_peak`` times the
  strongest class's.
  The thresholds of the shapes model were chosen on its validation split
  (``python -m iseg.labels --split val``); other models use the generic defaults below.
- ``"clip"``: a CLIP model through transformers (default ``openai/clip-vit-base-patch16``); image
  against prompt-ensembled class names, softmax over the vocabulary, and every class whose
  probability is at least ``relative_threshold`` times the best one's (a multi-label rule in the
  spirit of the CLIP tagger the paper uses).
- ``"file"``: labels from a JSON (``{id: [names]}``) or CSV (``id,name;name``) file, keyed by image id.

Every method keeps at least ``min_labels`` classes (default 1: the best-scoring one), because a
segmentation needs a class and the datasets of method.md have one in every image.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .prompts import PromptTooLongError, UnknownWordError, check_class_names

__all__ = [
    "METHODS", "AttentionThresholds", "chunk_vocabulary", "attention_evidence",
    "select_by_evidence", "known_vocabulary", "choose_thresholds", "choose_thresholds_by_miou", "attention_thresholds", "raw_class_maps", "ClipTagger", "load_clip", "CLIP_TEMPLATES", "DEFAULT_CLIP",
    "read_labels_file", "predict_labels", "label_scores",
]

METHODS = ("attention", "clip", "file")
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


@dataclass(frozen=True)
class AttentionThresholds:
    """Decision rule of the ``attention`` method (see the module docstring)."""

    min_share: float = 0.01
    min_peak: float = 0.5
    min_labels: int = 1


def attention_thresholds(seg) -> AttentionThresholds:
    """The attention thresholds for ``seg``'s model: the shapes model's own (chosen on its
    validation split, ``python -m iseg.labels``), else the generic defaults."""
    if getattr(seg.pipe, "iseg_default_preset", None) == "shapes":
        from .shapes.preset import LABEL_THRESHOLDS

        return AttentionThresholds(**LABEL_THRESHOLDS)
    return AttentionThresholds()


# -- attention ---------------------------------------------------------------------------------
def known_vocabulary(seg, vocabulary: Sequence[str], settings=None) -> tuple[str, ...]:
    """The names of ``vocabulary`` that ``seg``'s tokenizer knows, with a warning naming the others.

    A word the tokenizer does not know becomes its unknown (end-of-text) token, whose attention
    says nothing about the image; such a name is never predicted present. Refused when no name
    is left.
    """
    import warnings

    names = check_class_names(vocabulary)
    s = settings or seg.settings
    known, unknown = [], []
    for name in names:
        try:
            seg.prompt_for([name], s)
            known.append(name)
        except UnknownWordError:
            unknown.append(name)
        except PromptTooLongError:
            known.append(name)  # chunk_vocabulary reports it
    if unknown and not known:
        raise UnknownWordError(f"none of the vocabulary's {len(names)} names is known to the {seg.model_name!r} "
                               f"model's tokenizer (e.g. {unknown[:5]}); no label can be predicted", unknown)
    if unknown:
        warnings.warn(f"{len(unknown)} vocabulary name(s) have words the {seg.model_name!r} model's tokenizer does "
                      f"not know and are never predicted: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}",
                      stacklevel=3)
    return tuple(known)


def chunk_vocabulary(seg, vocabulary: Sequence[str], **overrides) -> list[tuple[str, ...]]:
    """Split ``vocabulary`` into consecutive groups that each fit one prompt of ``seg``'s settings.

    Every class lands in exactly one group, in vocabulary order; a name too long to fit even alone
    raises ``PromptTooLongError``.
    """
    names = check_class_names(vocabulary)  # also refuses a class listed twice
    s = seg.with_settings(**overrides)
    names = known_vocabulary(seg, names, s)
    chunks: list[tuple[str, ...]] = []
    current: list[str] = []
    for name in names:
        try:
            seg.prompt_for(current + [name], s)
            current.append(name)
        except PromptTooLongError:
            if not current:
                raise
            chunks.append(tuple(current))
            current = [name]
            seg.prompt_for(current, s)  # a single name that does not fit raises here
    chunks.append(tuple(current))
    return chunks


def raw_class_maps(obs) -> torch.Tensor:
    """``(C, g, g)`` head-mean cross-attention probability of each class's tokens on the
    self-attention grid, the resolutions mixed with the observation's weights. Unlike the maps the
    method refines, these are not normalised per class, so classes can be compared."""
    import torch.nn.functional as F

    from .refine import class_maps

    total = float(sum(obs.weights.values())) or 1.0
    mixed = 0
    for r, w in obs.weights.items():
        a = obs.cross[r].float()  # (r*r, T)
        probs = class_maps(a, obs.prompt.spans).T.reshape(-1, 1, r, r)
        if r != obs.grid:
            probs = F.interpolate(probs, size=(obs.grid, obs.grid), mode="bilinear", align_corners=False)
        mixed = mixed + (w / total) * probs[:, 0]
    return mixed


def attention_evidence(seg, images, vocabulary: Sequence[str], progress: bool = False, **overrides) -> list[dict]:
    """Per image, ``{class: {"share": ..., "peak": ..., "relative_peak": ...}}`` for the vocabulary.

    Each prompt (``chunk_vocabulary``) is segmented as usual. ``share``: the fraction of the
    image's pixels that the refined segmentation calls foreground and where this class draws the
    most raw cross-attention among its prompt's classes (evidence against background and against
    the other classes); ``peak``: the class's highest raw cross-attention probability
    (``raw_class_maps``); ``relative_peak``: ``peak`` over the image's highest class peak.
    """
    from tqdm.auto import tqdm

    from .images import to_original
    from .segmenter import _as_list

    items = _as_list(images)[0]
    evidence: list[dict] = [{} for _ in items]
    chunks = chunk_vocabulary(seg, vocabulary, **overrides)
    batch = seg.with_settings(**overrides).batch_size
    with tqdm(total=len(items) * len(chunks), desc="labels", unit="img", disable=not progress) as bar:
        for chunk in chunks:
            for start in range(0, len(items), batch):
                part = items[start : start + batch]
                observed = seg.observe(part, list(chunk), progress=False, **overrides)
                for k, (obs, result) in enumerate(zip(observed, seg.decode_batch(observed))):
                    foreground = torch.from_numpy(result.labels > 0)
                    raw = raw_class_maps(obs)
                    winner = to_original(raw, obs.geometry, obs.size).argmax(0)
                    for c, name in enumerate(chunk):
                        evidence[start + k][name] = {"share": float(((winner == c) & foreground).float().mean()),
                                                     "peak": float(raw[c].max())}
                bar.update(len(part))
    for ev in evidence:
        top = max(v["peak"] for v in ev.values()) or 1.0
        for v in ev.values():
            v["relative_peak"] = v["peak"] / top
    return evidence


def _score(v: dict) -> float:
    return v["share"] * v["relative_peak"]


def select_by_evidence(evidence: Mapping[str, dict], thresholds: AttentionThresholds) -> list[str]:
    """The classes of one image's evidence that pass both thresholds, at least ``min_labels`` of them."""
    keep = [c for c, v in evidence.items() if v["share"] >= thresholds.min_share and v["relative_peak"] >= thresholds.min_peak]
    if len(keep) < thresholds.min_labels:
        ranked = sorted(evidence, key=lambda c: _score(evidence[c]), reverse=True)
        keep += [c for c in ranked if c not in keep][: thresholds.min_labels - len(keep)]
    order = list(evidence)
    return sorted(keep, key=order.index)


def label_scores(predicted: Sequence[Sequence[str]], truth: Sequence[Sequence[str]]) -> dict:
    """Precision, recall and F1 over (image, class) pairs."""
    tp = sum(len(set(p) & set(t)) for p, t in zip(predicted, truth))
    n_pred = sum(len(p) for p in predicted)
    n_true = sum(len(t) for t in truth)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "correct": tp, "predicted": n_pred, "ground_truth": n_true}


def _threshold_grid(evidence: Sequence[Mapping[str, dict]], min_labels: int, shares: int = 100) -> list[AttentionThresholds]:
    values = np.array([v["share"] for ev in evidence for v in ev.values()])
    share_grid = np.unique(np.concatenate([[0.0], np.quantile(values, np.linspace(0, 0.99, shares))]))
    return [AttentionThresholds(float(ms), float(mp), min_labels) for ms in share_grid for mp in np.linspace(0, 1, 41)]


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
    from tqdm.auto import tqdm

    from .metrics import miou

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


# -- CLIP ----------------------------------------------------------------------------------------
# Our own short ensemble of photo-style templates; averaging text embeddings over templates makes
# the class embedding less sensitive to any one phrasing.
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of a {}.",
    "a picture showing a {}.",
    "a drawing of a {}.",
)


class ClipTagger:
    """Multi-label tagging with a CLIP model: ``tagger(images, vocabulary) -> class lists``."""

    def __init__(self, model, tokenizer, image_processor, templates: Sequence[str] = CLIP_TEMPLATES,
                 relative_threshold: float = 0.3, min_labels: int = 1):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.templates = tuple(templates)
        self.relative_threshold = relative_threshold
        self.min_labels = min_labels
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_features(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """``(C, D)`` unit class embeddings, averaged over the templates."""
        key = tuple(vocabulary)
        if key not in self._text_cache:
            feats = []
            for name in key:
                tok = self.tokenizer([t.format(name) for t in self.templates], padding=True, truncation=True,
                                     return_tensors="pt").to(self.device)
                f = _unit(_features(self.model.get_text_features(**tok)))
                feats.append(_unit(f.mean(0)))
            self._text_cache[key] = torch.stack(feats)
        return self._text_cache[key]

    @torch.no_grad()
    def probabilities(self, images, vocabulary: Sequence[str]) -> np.ndarray:
        """``(N, C)`` softmax over the vocabulary of CLIP's scaled cosine similarities."""
        from PIL import Image

        from .images import read_pixels, to_uint8
        from .segmenter import _as_list

        items = _as_list(images)[0]
        pil = [Image.fromarray(to_uint8(read_pixels(i))) for i in items]
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        img = _unit(_features(self.model.get_image_features(pixel_values=pixels))).float()
        logits = self.model.logit_scale.exp().float() * img @ self.text_features(vocabulary).float().T
        return logits.softmax(-1).cpu().numpy()

    def select(self, probs: np.ndarray, vocabulary: Sequence[str]) -> list[str]:
        """Classes with probability >= ``relative_threshold`` x the best, at least ``min_labels``."""
        order = np.argsort(-probs, kind="stable")
        keep = {int(i) for i in np.nonzero(probs >= self.relative_threshold * probs.max())[0]}
        keep |= {int(i) for i in order[: self.min_labels]}
        return [vocabulary[i] for i in sorted(keep)]

    def __call__(self, images, vocabulary: Sequence[str]) -> list[list[str]]:
        vocabulary = list(check_class_names(vocabulary))
        return [self.select(p, vocabulary) for p in self.probabilities(images, vocabulary)]


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output with pooler_output; older versions a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def load_clip(model: str | os.PathLike = DEFAULT_CLIP, device=None, **options) -> ClipTagger:
    """A ``ClipTagger`` from a hub id or a local folder; missing weights give the same clear error
    as ``load_pipeline`` (with ``HF_HUB_OFFLINE=1`` only the local cache is read)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    from transformers.utils import logging as tlog

    from .loading import ModelNotAvailableError, _offline, resolve_device

    name = os.fspath(model)
    local = Path(name).expanduser()
    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        if local.exists() or name.startswith((".", "/", "~")):
            if not (local / "config.json").is_file():
                raise ModelNotAvailableError(f"cannot load CLIP model {name!r}: {local} is not a transformers "
                                             "model folder (no config.json)")
        errors = []
        for local_only in ((True,) if _offline() or local.exists() else (True, False)):
            try:
                clip = CLIPModel.from_pretrained(name, local_files_only=local_only)
                tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
                processor = CLIPImageProcessor.from_pretrained(name, local_files_only=local_only)
                break
            except (OSError, ValueError) as err:
                errors.append(err)
        else:
            raise ModelNotAvailableError(
                f"cannot load CLIP model {name!r}: {errors[-1]}\n"
                "Ways out:\n"
                f"  1. download it once online (`hf download {name if name.count('/') == 1 else DEFAULT_CLIP}`);\n"
                "     later runs use the cache, also with HF_HUB_OFFLINE=1;\n"
                "  2. pass a local folder saved with CLIPModel.save_pretrained (+ tokenizer, image processor);\n"
                "  3. use label_method='attention', which needs no extra model, or labels from a file."
            ) from None
    finally:
        tlog.set_verbosity(level)
    return ClipTagger(clip.to(resolve_device(device)), tokenizer, processor, **options)


def clip_available(model: str = DEFAULT_CLIP) -> bool:
    """Whether ``load_clip(model)`` would work without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if Path(model).expanduser().is_dir():
            return (Path(model).expanduser() / "config.json").is_file()
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means: not available offline
        return False


# -- files ---------------------------------------------------------------------------------------
def read_labels_file(path, vocabulary: Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """``{image id: class names}`` from JSON (``{id: [names]}``) or CSV (``id,name;name`` rows).

    With a vocabulary, every name must belong to it (an unknown name is an error naming the image
    and the closest class) and the names come back in vocabulary order.
    """
    import difflib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # Excel and Notepad start UTF-8 files with a byte-order mark
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"labels file {path} is not UTF-8 text (byte {data[err.start]:#04x} on line {line}); "
                         "save it as UTF-8 (in Excel: CSV UTF-8)") from None
    if path.suffix.lower() == ".json":
        def no_repeats(pairs):
            seen = set()
            for k, _ in pairs:
                if k in seen:
                    raise ValueError(f"labels file {path} lists image {k!r} twice; give each image once")
                seen.add(k)
            return dict(pairs)

        try:
            raw = json.loads(text, object_pairs_hook=no_repeats)
        except json.JSONDecodeError as err:
            raise ValueError(f"labels file {path} is not valid JSON: {err}") from None
        if not isinstance(raw, Mapping):
            raise ValueError(f"labels file {path} must hold an object {{image id: [class names]}}")
        table = {str(k): v for k, v in raw.items()}
    else:
        table = {}
        first_line = {}
        for line, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or row[0].startswith("#") or row[0].strip() in ("id", "image"):
                continue
            key = row[0].strip()
            if key in table:  # two rows for one image are more likely a mistake than meant to be merged
                raise ValueError(f"labels file {path} lists image {key!r} twice (lines {first_line[key]} and {line}); "
                                 "give each image one row, its classes separated by ';'")
            first_line[key] = line
            table[key] = [n.strip() for cell in row[1:] for n in cell.split(";") if n.strip()]
    out = {}
    for key, names in table.items():
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"labels file {path}: the labels of {key!r} must be a list of class names, got {names!r}")
        if vocabulary is not None:
            for n in names:
                if n not in vocabulary:
                    close = difflib.get_close_matches(n, list(vocabulary), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"labels file {path}, image {key!r}: {n!r} is not in the vocabulary{hint}")
            names = [c for c in vocabulary if c in set(names)]
        out[key] = tuple(dict.fromkeys(names))
    return out


def _image_id(item, index: int) -> str:
    if isinstance(item, (str, Path)):
        return Path(item).stem
    raise ValueError(f"image {index} is not a file path: give ids=[...] to look its labels up in the file")


# -- one interface -------------------------------------------------------------------------------
def predict_labels(images, vocabulary: Sequence[str], method: str = "attention", *, seg=None, clip=None,
                   labels_file=None, ids: Sequence[str] | None = None, thresholds: AttentionThresholds | None = None,
                   progress: bool = False, **overrides) -> list[list[str]]:
    """One list of class names (a subset of ``vocabulary``, in its order) per image.

    ``seg``: the ``ISeg`` for ``attention``; ``clip``: a ``ClipTagger`` or a model id/folder for
    ``clip`` (default ``openai/clip-vit-base-patch16``); ``labels_file`` and ``ids`` (default: the
    images' file names without extension) for ``file``. ``overrides`` change ``seg``'s settings.
    """
    from .segmenter import _as_list

    vocabulary = list(check_class_names(vocabulary))
    items, many = _as_list(images)
    if not items:
        raise ValueError("no images given")
    if method == "attention":
        if seg is None:
            raise ValueError("method='attention' needs seg=ISeg(pipe)")
        th = thresholds or attention_thresholds(seg)
        return [select_by_evidence(ev, th) for ev in attention_evidence(seg, items, vocabulary, progress, **overrides)]
    if method == "clip":
        tagger = clip if isinstance(clip, ClipTagger) else load_clip(clip or DEFAULT_CLIP)
        return tagger(items, vocabulary)
    if method == "file":
        if labels_file is None:
            raise ValueError("method='file' needs labels_file=PATH")
        table = read_labels_file(labels_file, vocabulary)
        keys = list(ids) if ids is not None else [_image_id(item, i) for i, item in enumerate(items)]
        if len(keys) != len(items):
            raise ValueError(f"got {len(keys)} ids for {len(items)} images")
        missing = [k for k in keys if k not in table]
        if missing:
            raise ValueError(f"labels file {labels_file} has no entry for image(s) {missing[:5]}")
        return [list(table[k]) for k in keys]
    raise ValueError(f"unknown label method {method!r}; methods: {', '.join(METHODS)}")


# -- choosing the shapes model's thresholds: ``iseg labels`` -----------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``iseg labels``."""
    from .cli import add_set_option, overwrite_option
    from .shapes import SPLITS

    p.add_argument("--model", default="shapes", help="the shapes model or a folder trained like it (default: shapes)")
    p.add_argument("--preset", default="shapes", help="settings preset of the segmentation (default: shapes)")
    add_set_option(p)
    p.add_argument("--device", default="cpu", help="cpu (default, where the shipped thresholds were chosen) or cuda")
    p.add_argument("--split", default="val", choices=sorted(SPLITS), help="shapes split (default: val)")
    p.add_argument("--count", type=int, default=500, help="number of images of the split (default: 500)")
    p.add_argument("--min-share", type=float, default=None, help="score these thresholds instead of choosing")
    p.add_argument("--min-peak", type=float, default=None, help="with --min-share (default 0)")
    p.add_argument("--objective", default="f1", choices=["f1", "miou"],
                   help="choose the thresholds for the best label F1, or for the best open-vocabulary mIoU")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write: the evidence and the scores")
    overwrite_option(p, "an existing --out file")


def run(args) -> int:
    """Choose the attention thresholds on shapes images and report label scores."""
    from .cli import CommandError, device_option, output_file, settings_overrides
    from .loading import load_pipeline
    from .segmenter import ISeg
    from .shapes import CLASSES, SPLITS, sample

    if args.count < 1:
        raise CommandError(f"--count must be at least 1 (the number of images), got {args.count}")
    if args.min_peak is not None and args.min_share is None:
        raise CommandError("--min-peak needs --min-share (fixed thresholds to score)")
    overrides = settings_overrides(args.set, args.preset)
    device = device_option(args.device)
    out = output_file(args.out, args.overwrite)
    seg = ISeg(load_pipeline(args.model, device=device, verbose=False), preset=args.preset, **overrides)
    recs = [sample(s) for s in SPLITS[args.split][: args.count]]
    truth = [[c for c in CLASSES if c in r.classes] for r in recs]
    evidence = attention_evidence(seg, [r.image for r in recs], CLASSES, progress=True)
    if args.min_share is None and args.objective == "miou":
        from .metrics import confusion
        from .shapes.evaluate import NUM_LABELS, to_dataset_labels

        def confusion_of(i, classes):
            result = seg.segment(recs[i].image, classes)
            return confusion(to_dataset_labels(result.labels, result.classes), recs[i].mask, NUM_LABELS)

        th, best = choose_thresholds_by_miou(evidence, confusion_of, progress=True)
        score = label_scores([select_by_evidence(ev, th) for ev in evidence], truth)
        print(f"open-vocabulary mIoU at these thresholds: {best:.2f}")
    elif args.min_share is None:
        th, score = choose_thresholds(evidence, truth)
    else:
        th = AttentionThresholds(args.min_share, args.min_peak if args.min_peak is not None else 0.0)
        score = label_scores([select_by_evidence(ev, th) for ev in evidence], truth)
    print(f"{args.split} ({len(recs)} images): min_share={th.min_share:.4f} min_peak={th.min_peak:.3f} "
          f"precision {score['precision']:.3f} recall {score['recall']:.3f} F1 {score['f1']:.3f}")
    if out:
        out.write_text(json.dumps({"thresholds": th.__dict__, "scores": score, "evidence": evidence}, indent=1))
    return 0


def main(argv=None) -> int:
    """``python -m iseg.labels``: the same as ``iseg labels``."""
    from .cli import main as iseg_main

    return iseg_main(["labels", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
