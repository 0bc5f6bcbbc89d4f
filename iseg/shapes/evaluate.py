"""Measure iSeg on the shapes world: mIoU over (timestep, lam, iterations), word binding, grouping.

    iseg eval-shapes --split val --count 500 --timesteps 100 200 --out val.json
    iseg eval-shapes --choose val-a.json val-b.json      # the label rule (bg_power, lam, N) from reports

(``iseg eval --dataset shapes`` evaluates one preset the way the paper's datasets are evaluated;
this command sweeps the settings and measures what the model's attention does.)

- mIoU: background included, confusion matrix over every pixel of the set, averaged over classes
  present in the ground truth (method.md §8, the reference convention).
- class discrimination: over (image, class) pairs of images with 2+ objects, the share where the
  raw cross-attention class map is higher on average over its own object than over the image's
  other objects (0.5 = chance).
- grouping ratio: the self-attention mass an object pixel puts inside its own object, divided by
  the object's share of the image (1.0 = uniform attention); and the rows' entropy as a share of
  the maximum.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..commands.files import write_text
from ..commands.options import (
    CommandError,
    add_set_option,
    device_option,
    output_file,
    overwrite_option,
    settings_overrides,
)
from ..evaluation.metrics import confusion, iou_per_class, miou
from ..loading import load_model
from ..masks import maps_to_labels
from ..segmenter import ISeg
from .dataset import ShapesDataset
from .world import CLASSES, SPLITS, sample

__all__ = ["to_dataset_labels", "evaluate", "binding_stats", "choose_label_rule", "iteration_curve"]

NUM_LABELS = len(CLASSES) + 1


def to_dataset_labels(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Map labels of a result (k = k-th given class) to shapes-world labels (k = CLASSES[k-1])."""
    return ShapesDataset.to_dataset_labels(labels, classes, np.int64)


def _label_order(names) -> list[str]:
    return [c for c in CLASSES if c in names]


def _seeds(split: str, count: int, offset: int = 0) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    r = SPLITS[split]
    return list(r[offset : offset + count])


def binding_stats(obs, result, gt: np.ndarray) -> dict:
    """Discrimination pairs and grouping figures of one image (see the module docstring)."""
    out = {"disc_hits": 0, "disc_pairs": 0, "group_ratio_sum": 0.0, "group_pixels": 0, "entropy_sum": 0.0, "rows": 0}
    present = [c for c in result.classes if (gt == CLASSES.index(c) + 1).any()]
    if len(present) >= 2:
        scores = result.scores(0)
        for c in present:
            own = gt == CLASSES.index(c) + 1
            others = (gt > 0) & ~own
            m = scores[result.classes.index(c)]
            out["disc_hits"] += int(m[own].mean() > m[others].mean())
            out["disc_pairs"] += 1
    attn = obs.self_attention.double().cpu()
    n = attn.shape[-1]
    side = math.isqrt(n)
    ent = -(attn.clamp_min(1e-30).log() * attn).sum(-1) / math.log(n)
    out["entropy_sum"] += float(ent.sum())
    out["rows"] += n
    gt_t = torch.from_numpy(gt.astype(np.int64))
    for label in np.unique(gt):
        if label == 0:
            continue
        frac = F.adaptive_avg_pool2d((gt_t == int(label)).double()[None, None], side).flatten()  # (n,)
        share = float(frac.sum() / n)
        rows = frac >= 0.5
        if share <= 0 or not rows.any():
            continue
        mass = attn[rows] @ frac
        out["group_ratio_sum"] += float((mass / share).sum())
        out["group_pixels"] += int(rows.sum())
    return out


def evaluate(
    seg,
    split: str = "test",
    count: int = 500,
    timesteps: Sequence[int] = (100,),
    lams: Sequence[float] = (0.0, 0.015, 0.1),
    iterations: Sequence[int] = (0, 1, 2, 5, 10, 20),
    offset: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    bg_powers: Sequence[float] = (),
    **overrides,
) -> dict:
    """mIoU for every (timestep, lam, N) and binding figures, on ``count`` images of ``split``.

    With ``bg_powers``, also every (bg_power, lam, N) under the power background rule, from the
    same forward pass and refinement (``miou_by_bg_power``): how the preset's label rule is chosen.
    """
    seeds = _seeds(split, count, offset)
    samples = [sample(s) for s in seeds]
    report = {"split": split, "count": len(seeds), "first_seed": seeds[0], "convention": "present",
              "settings": {k: v for k, v in overrides.items()}, "timesteps": {}}
    t0 = time.perf_counter()
    for t in timesteps:
        hists = {(lam, n): np.zeros((NUM_LABELS, NUM_LABELS), np.int64) for lam in lams for n in iterations}
        by_power = {(p, lam, n): np.zeros((NUM_LABELS, NUM_LABELS), np.int64)
                    for p in bg_powers for lam in lams for n in iterations}
        stats = {}
        bar = tqdm(total=len(samples), desc=f"eval t={t}", disable=not progress)
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            # image-level labels in label order, as every dataset reader gives them (iseg.evaluation.datasets)
            obs = seg.observe([s.image for s in chunk], [_label_order(s.classes) for s in chunk], progress=False,
                              timestep=t, **overrides)
            for o, s in zip(obs, chunk):
                _count_image(seg, o, s, lams, iterations, bg_powers, overrides, hists, by_power, stats)
            bar.update(len(chunk))
        bar.close()
        report["timesteps"][str(t)] = _timestep_report(hists, by_power, stats, lams, iterations, bg_powers)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _count_image(seg, o, s, lams, iterations, bg_powers, overrides, hists: dict, by_power: dict, stats: dict) -> None:
    """Add one observed image to the confusion matrices of every (lam, N) and (bg_power, lam, N),
    and its binding figures (at the first lam) to ``stats``."""
    for li, lam in enumerate(lams):
        result = seg.decode(o, lam=lam, iterations=max(iterations), **overrides)
        rule = result.settings
        for n in iterations:
            scores = torch.from_numpy(result.scores(n))  # upsampled once for every rule below
            pred = maps_to_labels(scores, rule.background, rule.bg_power, rule.threshold).numpy()
            hists[(lam, n)] += confusion(to_dataset_labels(pred, result.classes), s.mask, NUM_LABELS)
            for p in bg_powers:
                pred = to_dataset_labels(maps_to_labels(scores, "power", p).numpy(), result.classes)
                by_power[(p, lam, n)] += confusion(pred, s.mask, NUM_LABELS)
        if li == 0:
            for k, v in binding_stats(o, result, s.mask).items():
                stats[k] = stats.get(k, 0) + v


def _timestep_report(hists: dict, by_power: dict, stats: dict, lams, iterations, bg_powers) -> dict:
    """One timestep's part of the ``evaluate`` report."""
    table = {str(lam): {str(n): round(100 * miou(hists[(lam, n)]), 2) for n in iterations} for lam in lams}
    per_class = {str(lam): {str(n): [round(100 * float(x), 2) for x in iou_per_class(hists[(lam, n)])]
                            for n in iterations} for lam in lams}
    out = {
        "miou": table,
        "iou_per_class": per_class,
        "discrimination": stats["disc_hits"] / max(1, stats["disc_pairs"]),
        "discrimination_pairs": stats["disc_pairs"],
        "grouping_ratio": stats["group_ratio_sum"] / max(1, stats["group_pixels"]),
        "self_entropy": stats["entropy_sum"] / max(1, stats["rows"]),
    }
    if bg_powers:
        out["miou_by_bg_power"] = {
            str(p): {str(lam): {str(n): round(100 * miou(by_power[(p, lam, n)]), 3) for n in iterations}
                     for lam in lams} for p in bg_powers}
    return out


def iteration_curve(report: dict, lam: float, raw_bg_power: float | None = None, timestep: int | None = None):
    """``({N: mIoU}, raw)`` from an ``evaluate`` report: the curve at ``lam`` under the settings'
    label rule, and the raw maps (N = 0) under their own rule ``raw_bg_power`` (``None`` where the
    report was made without that power in ``bg_powers``, or none is given)."""
    t = str(timestep) if timestep is not None else next(iter(report["timesteps"]))
    r = report["timesteps"][t]
    curve = {int(n): v for n, v in r["miou"][str(lam)].items()}
    raw = None
    if raw_bg_power is not None:
        table = r.get("miou_by_bg_power", {}).get(str(float(raw_bg_power)))
        raw = None if table is None else table[str(lam)].get("0")
    return curve, raw


def format_table(report: dict) -> str:
    """A markdown table of mIoU by (timestep, lam) rows and iteration columns."""
    lines = []
    for t, r in report["timesteps"].items():
        its = list(next(iter(r["miou"].values())))
        lines.append(f"t = {t}: discrimination {r['discrimination']:.3f}, grouping ratio {r['grouping_ratio']:.2f}, "
                     f"self-attention entropy {100 * r['self_entropy']:.1f}% of max")
        lines.append("")
        lines.append("| lam | " + " | ".join(f"N={n}" for n in its) + " |")
        lines.append("|---|" + "---|" * len(its))
        for lam, row in r["miou"].items():
            lines.append(f"| {lam} | " + " | ".join(f"{row[n]:.1f}" for n in its) + " |")
        lines.append("")
        if "miou_by_bg_power" in r:
            lines.append("| bg_power | lam | " + " | ".join(f"N={n}" for n in its) + " |")
            lines.append("|---|---|" + "---|" * len(its))
            for p, by_lam in r["miou_by_bg_power"].items():
                for lam, row in by_lam.items():
                    lines.append(f"| {p} | {lam} | " + " | ".join(f"{row[n]:.2f}" for n in its) + " |")
            lines.append("")
    return "\n".join(lines)


def choose_label_rule(tables: Sequence[dict], min_iterations: int = 5, max_iterations: int = 10,
                      tolerance: float = 0.0) -> dict:
    """The shapes preset's rule for (bg_power, lam, N), applied to validation tables.

    ``tables``: one ``miou_by_bg_power`` table (``{bg_power: {lam: {N: mIoU}}}``, every N from 0 up)
    per validation set. A setting is admissible at N when, on every set, mIoU falls by at most
    ``tolerance`` from each N to the next between 0 and N (the shapes-world issue: iterations
    must not hurt up to the preset's N). The default allows no fall at all: a curve that already
    dips on validation, however little, is a coin flip on images it has not seen. Among
    admissible ones, the highest mean mIoU at N wins, compared to two decimals; ties go to the
    smaller lam, then the smaller N.
    """
    best = None
    for p, by_lam in tables[0].items():
        for lam in by_lam:
            rows = [{int(n): v for n, v in t[p][lam].items()} for t in tables]
            for n in range(min_iterations, max_iterations + 1):
                if not all(all(k in row for k in range(n + 1)) for row in rows):
                    break
                if any(row[k + 1] < row[k] - tolerance for row in rows for k in range(n)):
                    break
                mean = sum(row[n] for row in rows) / len(rows)
                key = (round(mean, 2), -float(lam), -n)
                if best is None or key > best[0]:
                    best = (key, dict(bg_power=float(p), lam=float(lam), iterations=n, miou=round(mean, 3)))
    if best is None:
        raise ValueError(f"no setting keeps mIoU from falling through N = {min_iterations} on every table")
    return best[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``iseg eval-shapes``."""
    p.add_argument("--model", default="shapes", help="the shapes model or a folder trained like it (default: shapes)")
    p.add_argument("--preset", default="shapes", help="settings preset (default: shapes)")
    add_set_option(p)
    p.add_argument("--device", default="cpu", help="cpu (default, where the shipped tables were made) or cuda")
    p.add_argument("--split", default="val", choices=sorted(SPLITS), help="shapes split (default: val)")
    p.add_argument("--count", type=int, default=500, help="number of images (default: 500)")
    p.add_argument("--offset", type=int, default=0, help="skip this many images of the split first")
    p.add_argument("--timesteps", type=int, nargs="+", default=[100], help="timesteps to measure (default: 100)")
    p.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.015, 0.1], help="entropy weights lam to tabulate")
    p.add_argument("--iterations", type=int, nargs="+", default=[0, 1, 2, 5, 10, 20],
                   help="refinement iterations N to tabulate")
    p.add_argument("--bg-powers", type=float, nargs="*", default=[],
                   help="also tabulate mIoU under the power background rule with each of these powers")
    p.add_argument("--random-init", action="store_true",
                   help="replace the UNet and text encoder by randomly initialised ones (seed 0): the untrained baseline")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write: the report")
    overwrite_option(p, "an existing --out file")
    p.add_argument("--choose", type=Path, nargs="+", metavar="REPORT",
                   help="instead of evaluating: apply choose_label_rule to these reports (made with --bg-powers "
                        "and every N from 0) and print the chosen bg_power, lam and N")


def run(args) -> int:
    """``iseg eval-shapes``."""
    if args.choose:
        for path in args.choose:
            if not path.is_file():
                raise CommandError(f"--choose {path} does not exist or is not a file")
        reports = [json.loads(path.read_text()) for path in args.choose]
        shared = [t for t in reports[0]["timesteps"] if all(t in r["timesteps"] for r in reports)]
        if not shared:
            raise CommandError("the --choose reports have no timestep in common")
        for t in shared:  # a timestep only some reports measured cannot be chosen on all of them
            tables = [r["timesteps"][t]["miou_by_bg_power"] for r in reports]
            try:
                print(f"t = {t}:", json.dumps(choose_label_rule(tables)))
            except ValueError as err:
                print(f"t = {t}: {err}")
        return 0
    if args.count < 1 or args.offset < 0:
        raise CommandError(f"--count must be at least 1 and --offset at least 0, got {args.count} and {args.offset}")
    overrides = settings_overrides(args.set, args.preset)
    device = device_option(args.device)
    out = output_file(args.out, args.overwrite)
    pipe = load_model(args.model, device=device)
    if args.random_init:
        torch.manual_seed(0)  # the same architecture as the loaded model, freshly initialised
        pipe.unet.load_state_dict(type(pipe.unet).from_config(pipe.unet.config).state_dict())
        pipe.text_encoder.load_state_dict(type(pipe.text_encoder)(pipe.text_encoder.config).state_dict())
    seg = ISeg(pipe, preset=args.preset)
    report = evaluate(seg, args.split, args.count, args.timesteps, args.lams, args.iterations, args.offset,
                      bg_powers=args.bg_powers, **overrides)
    report["model"] = args.model + (" (random init)" if args.random_init else "")
    text = format_table(report)
    print(text)
    if out:
        write_text(out, json.dumps(report, indent=1))
    return 0
