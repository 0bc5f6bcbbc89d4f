"""The ``attention`` label method: which classes of a vocabulary the model's own attention finds.

The vocabulary goes into as few prompts as the prompt window allows; every prompt is segmented as
usual, and a class is kept when it wins at least ``min_share`` of the image's pixels (foreground
in the refined segmentation, and more raw cross-attention there than the prompt's other classes)
and its raw cross-attention peak is at least ``min_peak`` times the strongest class's.
``iseg.evaluation.label_thresholds`` picks the two thresholds on labelled images.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..images import as_image_list, to_original
from ..prompts import PromptTooLongError, UnknownWordError, check_class_names
from ..refine import class_maps

__all__ = [
    "AttentionThresholds", "attention_thresholds", "known_vocabulary", "chunk_vocabulary", "raw_class_maps",
    "attention_evidence", "select_by_evidence",
]


@dataclass(frozen=True)
class AttentionThresholds:
    """Decision rule of the ``attention`` method (see the module docstring)."""

    min_share: float = 0.01
    min_peak: float = 0.5
    min_labels: int = 1


def attention_thresholds(seg) -> AttentionThresholds:
    """The attention thresholds for ``seg``'s model: the model's own where its plug-in brings them
    (the shapes model's were chosen on its validation split, ``iseg.shapes.calibrate``), else the
    generic defaults."""
    own = seg.model.label_thresholds
    return AttentionThresholds(**own) if own is not None else AttentionThresholds()


def known_vocabulary(seg, vocabulary: Sequence[str], settings=None) -> tuple[str, ...]:
    """The names of ``vocabulary`` that ``seg``'s tokenizer knows, with a warning naming the others.

    A word the tokenizer does not know becomes its unknown (end-of-text) token, whose attention
    says nothing about the image; such a name is never predicted present. Refused when no name
    is left.
    """
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
        raise UnknownWordError(f"none of the vocabulary's {len(names)} names is known to the {seg.model.name!r} "
                               f"model's tokenizer (e.g. {unknown[:5]}); no label can be predicted", unknown)
    if unknown:
        warnings.warn(f"{len(unknown)} vocabulary name(s) have words the {seg.model.name!r} model's tokenizer does "
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
    items = as_image_list(images)[0]
    evidence: list[dict] = [{} for _ in items]
    chunks = chunk_vocabulary(seg, vocabulary, **overrides)
    batch = seg.with_settings(**overrides).batch_size
    with tqdm(total=len(items) * len(chunks), desc="labels", unit="img", disable=not progress) as bar:
        for chunk in chunks:
            for start in range(0, len(items), batch):
                part = items[start : start + batch]
                observed = seg.observe(part, list(chunk), progress=False, **overrides)
                for k, (obs, result) in enumerate(zip(observed, seg.decode(observed))):
                    raw = raw_class_maps(obs)
                    foreground = torch.from_numpy(result.labels > 0).to(raw.device)  # labels are numpy, raw on the model's device
                    winner = to_original(raw, obs.geometry, obs.size).argmax(0)
                    # class c of the prompt (a -reference preset reorders the classes and names them its way)
                    for c, name in enumerate(obs.prompt.names or chunk):
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


