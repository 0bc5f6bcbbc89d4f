"""``iseg labels``: choose the shapes model's thresholds for the ``attention`` label method on a
split of the shapes world, or score fixed thresholds (the shipped values are ``LABEL_THRESHOLDS``
in ``iseg/shapes/preset.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..commands.files import write_text
from ..commands.options import (
    CommandError,
    add_set_option,
    device_option,
    output_file,
    overwrite_option,
    settings_overrides,
)
from ..evaluation.label_thresholds import choose_thresholds, choose_thresholds_by_miou, label_scores
from ..evaluation.metrics import confusion
from ..labels import (
    AttentionThresholds,
    attention_evidence,
    select_by_evidence,
)
from ..loading import load_model
from ..segmenter import ISeg
from .evaluate import NUM_LABELS, to_dataset_labels
from .world import CLASSES, SPLITS, sample

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``iseg labels``."""
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
    if args.count < 1:
        raise CommandError(f"--count must be at least 1 (the number of images), got {args.count}")
    if args.min_peak is not None and args.min_share is None:
        raise CommandError("--min-peak needs --min-share (fixed thresholds to score)")
    overrides = settings_overrides(args.set, args.preset)
    device = device_option(args.device)
    out = output_file(args.out, args.overwrite)
    seg = ISeg(load_model(args.model, device=device, verbose=False), preset=args.preset, **overrides)
    recs = [sample(s) for s in SPLITS[args.split][: args.count]]
    truth = [[c for c in CLASSES if c in r.classes] for r in recs]
    evidence = attention_evidence(seg, [r.image for r in recs], CLASSES, progress=True)
    if args.min_share is None and args.objective == "miou":
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
        write_text(out, json.dumps({"thresholds": th.__dict__, "scores": score, "evidence": evidence}, indent=1))
    return 0
