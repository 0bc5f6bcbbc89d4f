"""Which classes of a vocabulary are in an image: image-level labels for open-vocabulary runs.

``predict_labels(images, vocabulary, method=...)`` returns one list of class names per image:

- ``"attention"``: training-free, no extra model. The vocabulary goes into as few prompts as the
  77-token window allows; every prompt is segmented as usual (one forward pass, Cat-Cross,
  refinement, labels), and a class is kept when it wins at least ``min_share`` of the image's
  pixels (foreground in the refined segmentation, and more raw cross-attention there than the
  prompt's other classes) and its raw cross-attention peak is at least ``min_peak`` times the
  strongest class's.
  A model's plug-in may bring its own thresholds (the shapes model's were chosen on its
  validation split with ``iseg labels``); other models use the generic defaults.
- ``"clip"``: a CLIP model through transformers (default ``openai/clip-vit-base-patch16``); image
  against prompt-ensembled class names, softmax over the vocabulary, and every class whose
  probability is at least ``relative_threshold`` times the best one's (a multi-label rule in the
  spirit of the CLIP tagger the paper uses).
- ``"file"``: labels from a JSON (``{id: [names]}``) or CSV (``id,name;name``) file, keyed by image id.

Every method keeps at least ``min_labels`` classes (default 1: the best-scoring one), because a
segmentation needs a class and the datasets of the paper have one in every image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..images import as_image_list
from ..prompts import check_class_names
from .attention import (
    AttentionThresholds,
    attention_evidence,
    attention_thresholds,
    chunk_vocabulary,
    known_vocabulary,
    raw_class_maps,
    select_by_evidence,
)
from .clip import CLIP_TEMPLATES, DEFAULT_CLIP, ClipTagger, clip_available, load_clip
from .files import image_id, read_labels_file

__all__ = [
    "METHODS", "AttentionThresholds", "chunk_vocabulary", "attention_evidence", "select_by_evidence",
    "known_vocabulary", "attention_thresholds", "raw_class_maps",
    "ClipTagger", "load_clip", "clip_available", "CLIP_TEMPLATES", "DEFAULT_CLIP", "read_labels_file",
    "predict_labels",
]

METHODS = ("attention", "clip", "file")


def predict_labels(images, vocabulary: Sequence[str], method: str = "attention", *, seg=None, clip=None,
                   labels_file=None, ids: Sequence[str] | None = None, thresholds: AttentionThresholds | None = None,
                   progress: bool = False, **overrides) -> list[list[str]]:
    """One list of class names (a subset of ``vocabulary``, in its order) per image.

    ``seg``: the ``ISeg`` for ``attention``; ``clip``: a ``ClipTagger`` or a model id/folder for
    ``clip`` (default ``openai/clip-vit-base-patch16``); ``labels_file`` (a file, or a table
    ``{id: names}`` already read) and ``ids`` (default: the images' file names without extension)
    for ``file``. ``overrides`` change ``seg``'s settings.
    """
    vocabulary = list(check_class_names(vocabulary))
    items, many = as_image_list(images)
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
        table = labels_file if isinstance(labels_file, Mapping) else read_labels_file(labels_file, vocabulary)
        keys = list(ids) if ids is not None else [image_id(item, i) for i, item in enumerate(items)]
        if len(keys) != len(items):
            raise ValueError(f"got {len(keys)} ids for {len(items)} images")
        missing = [k for k in keys if k not in table]
        if missing:
            where = "" if isinstance(labels_file, Mapping) else f" file {labels_file}"
            raise ValueError(f"the labels{where} has no entry for image(s) {missing[:5]}; it must list every image")
        return [list(table[k]) for k in keys]
    raise ValueError(f"unknown label method {method!r}; methods: {', '.join(METHODS)}")
