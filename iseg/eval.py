"""Evaluate iSeg on a dataset: weakly supervised pseudo-masks or open-vocabulary segmentation.

    iseg-eval --task wsss --dataset shapes --split test --limit 500 --out runs/shapes
    iseg-eval --task wsss --dataset voc --root VOCdevkit/VOC2012 --split train --out runs/voc-wsss
    iseg-eval --task ovs --dataset voc --root VOCdevkit/VOC2012 --split val --labels labels.json --out runs/voc-ovs
    accelerate launch --multi_gpu --num_processes 8 -m iseg.eval ...   # shards images over 8 processes

- ``wsss``: image-level labels are the classes present in the ground truth (method.md §8); the
  pseudo-masks are written as palette PNGs (``OUT/masks/<id>.png``, pixel value = dataset label).
- ``ovs``: the classes of every image come from ``--labels FILE`` (JSON ``{id: [names]}`` or CSV
  ``id,name;name``) or from a label predictor (``--label-method``, see ``iseg.labels``).

The confusion matrix of every image is stored as it is made (``OUT/records/*.jsonl``). A run that
stops resumes where it stopped with the same command; under several processes every process
takes every k-th batch and the histograms are summed at the end. Batches are cut from the full
image list the same way for any number of processes, so an image is always computed in the same
batch: one process, many processes and resumed runs give the same numbers exactly.
Outputs: ``metrics.json`` (mIoU in both conventions, per-class IoU, settings, model, timing,
counts) and ``results.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .datasets import DATASETS, DatasetError, SegmentationDataset, open_dataset
from .metrics import confusion, iou_per_class, miou
from .presets import Settings, parse_overrides
from .viz import label_png

__all__ = [
    "DEFAULT_PRESETS", "default_preset", "default_model", "read_label_file", "evaluate_dataset", "load_records",
    "image_scores", "format_results", "RunMismatchError", "main",
]

DEFAULT_PRESETS = {
    ("voc", "wsss"): "wsss-voc", ("voc", "ovs"): "ovs-voc",
    ("context", "wsss"): "ovs-context", ("context", "ovs"): "ovs-context",
    ("coco-object", "wsss"): "wsss-coco", ("coco-object", "ovs"): "ovs-coco",
    ("coco-object-164k", "wsss"): "wsss-coco", ("coco-object-164k", "ovs"): "ovs-coco",
    ("shapes", "wsss"): "shapes", ("shapes", "ovs"): "shapes",
}
DEFAULT_SPLITS = {("shapes", "wsss"): "test", ("shapes", "ovs"): "test", ("voc", "wsss"): "train"}
TASKS = ("wsss", "ovs")


class RunMismatchError(RuntimeError):
    """The output folder holds records of a run with other settings."""


def default_preset(dataset: str, task: str) -> str:
    """The preset of method.md for a dataset and task (the shapes model's own preset for shapes)."""
    return DEFAULT_PRESETS[(dataset, task)]


def default_model(dataset: str) -> str:
    from .loading import DEFAULT_MODEL

    return "shapes" if dataset == "shapes" else DEFAULT_MODEL


def default_split(dataset: str, task: str) -> str:
    return DEFAULT_SPLITS.get((dataset, task), "val")


# -- image-level labels --------------------------------------------------------------------------
def read_label_file(path, dataset: SegmentationDataset) -> dict[str, tuple[str, ...]]:
    """Image-level labels from JSON (``{id: [names]}``) or CSV (``id,name;name`` per row), checked
    against the dataset's classes and returned in its label order (``iseg.labels.read_labels_file``)."""
    from .labels import read_labels_file

    return read_labels_file(path, dataset.class_names)


# -- records: one JSON line per image, so a run can resume ---------------------------------------
def _sparse(hist: np.ndarray) -> list[list[int]]:
    g, p = np.nonzero(hist)
    return [[int(a), int(b), int(hist[a, b])] for a, b in zip(g, p)]


def _dense(entries, size: int) -> np.ndarray:
    hist = np.zeros((size, size), np.int64)
    for g, p, c in entries:
        hist[g, p] += c
    return hist


def load_records(out) -> dict[str, dict]:
    """Every finished image of a run folder, ``{id: record}``; a line cut short by a kill is skipped."""
    records = {}
    folder = Path(out) / "records"
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.setdefault(rec["id"], rec)
    return records


def image_scores(out, num_labels: int | None = None) -> dict[str, float]:
    """Per-image mIoU (present convention) of a finished run, for finding its worst images."""
    out = Path(out)
    if num_labels is None:
        num_labels = json.loads((out / "metrics.json").read_text())["num_labels"]
    return {i: miou(_dense(r["hist"], num_labels)) for i, r in load_records(out).items()}


def _digest(values) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# -- the evaluation --------------------------------------------------------------------------------
def _classes_source(task: str, dataset: SegmentationDataset, labels, label_method: str | None, seg=None, clip=None):
    """``(name, function(items) -> class lists)`` for the task."""
    from . import labels as L

    if task == "wsss":
        if labels is not None or label_method not in (None, "gt"):
            raise ValueError("--task wsss uses the ground-truth image labels; --labels and --label-method are for --task ovs")
        return "gt", lambda items: [it.classes for it in items]
    method = label_method or ("file" if labels is not None else None)
    if method is None:
        raise ValueError("--task ovs needs image labels: --label-method attention|clip|file (with --labels FILE), "
                         "or gt for an oracle run")
    if method == "gt":
        return "gt-oracle", lambda items: [it.classes for it in items]
    if method == "file":
        if labels is None:
            raise ValueError("--label-method file needs --labels FILE")
        table = read_label_file(labels, dataset) if not isinstance(labels, Mapping) else {
            str(k): tuple(v) for k, v in labels.items()}

        def from_table(items):
            missing = [it.id for it in items if it.id not in table]
            if missing:
                raise ValueError(f"the labels file has no entry for image(s) {missing[:5]}; it must list every image")
            return [table[it.id] for it in items]

        return "file", from_table
    if labels is not None:
        raise ValueError(f"--labels is for --label-method file, not {method!r}")
    vocabulary = list(dataset.class_names)
    if method == "attention":
        if seg is None:
            raise ValueError("label method 'attention' needs the segmenter")
        return "attention", lambda items: L.predict_labels([it.image for it in items], vocabulary, "attention", seg=seg)
    if method == "clip":
        tagger = clip if isinstance(clip, L.ClipTagger) else L.load_clip(clip or L.DEFAULT_CLIP)
        return "clip", lambda items: tagger([it.image for it in items], vocabulary)
    raise ValueError(f"unknown label method {method!r}; methods: attention, clip, file, gt")


def evaluate_dataset(
    seg,
    dataset: SegmentationDataset,
    task: str = "wsss",
    out=None,
    labels=None,
    label_method: str | None = None,
    limit: int | None = None,
    save_masks: bool | None = None,
    progress: bool = True,
    state=None,
    model_name: str | None = None,
    classes_source: tuple[str, Callable] | None = None,
    clip=None,
) -> dict:
    """Run ``seg`` over ``dataset`` and return the metrics (also written to ``out`` when given).

    ``state`` is an ``accelerate.PartialState`` (or anything with ``process_index``,
    ``num_processes``, ``is_main_process`` and ``wait_for_everyone``); None means one process.
    Settings are ``seg.settings``. For ``ovs`` the classes of each image come from ``labels`` (a
    file or a mapping), or ``label_method``: ``attention``, ``clip`` (``clip``: a ``ClipTagger`` or
    a model id), ``file`` or ``gt`` (an oracle). ``classes_source`` replaces all of these:
    ``(name, function(items) -> class lists)``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    main_process = rank == 0
    ids = list(dataset.ids[:limit] if limit is not None else dataset.ids)
    if not ids:
        raise DatasetError(f"{dataset.name}: no images to evaluate")
    if out is None and world > 1:
        raise ValueError("several processes need --out: their histograms are summed from the records there")
    source_name, classes_for = classes_source or _classes_source(task, dataset, labels, label_method, seg, clip)
    settings = seg.settings
    save_masks = (task == "wsss") if save_masks is None else save_masks
    num_labels = dataset.num_labels
    manifest = {
        "task": task, "dataset": dataset.name, "split": dataset.split,
        "root": str(dataset.root) if dataset.root else None,
        "model": model_name or getattr(seg.pipe, "iseg_model_name", None), "preset": seg.preset,
        "settings": settings.as_dict(), "label_source": source_name,
        "labels_file": _digest(Path(labels).read_text()) if labels is not None and not isinstance(labels, Mapping) else None,
        "images": len(ids), "ids": _digest(ids),
    }
    manifest = json.loads(json.dumps(manifest))  # as it reads back from run.json (tuples become lists)
    out = Path(out) if out is not None else None
    done: dict[str, dict] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "records").mkdir(exist_ok=True)
        if save_masks:
            (out / "masks").mkdir(exist_ok=True)
        previous = out / "run.json"
        if previous.is_file():
            old = json.loads(previous.read_text())
            differ = sorted(k for k in manifest if old.get(k) != manifest[k])
            if differ:
                raise RunMismatchError(f"{out} holds a run with other {', '.join(differ)}; use another --out, "
                                       "or --restart to discard that run")
        _barrier(state)
        if main_process and not previous.is_file():
            previous.write_text(json.dumps(manifest, indent=1))
        done = load_records(out)
    batch_size = settings.batch_size
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    mine = [b for k, b in enumerate(batches) if k % world == rank]
    todo = [b for b in mine if not all(i in done for i in b)]
    id_set = set(ids)
    hist = np.zeros((num_labels, num_labels), np.int64)
    for i in (i for b in mine if b not in todo for i in b):
        hist += _dense(done[i]["hist"], num_labels)
    record_file = None
    if out is not None:
        record_file = (out / "records" / f"part-{rank:03d}-{os.getpid()}-{time.time_ns()}.jsonl").open("a")
    t_start = time.perf_counter()
    computed = 0
    bar = tqdm(total=sum(len(b) for b in mine), initial=sum(len(b) for b in mine) - sum(len(b) for b in todo),
               desc=f"iseg-eval {dataset.name}" + (f" [{rank + 1}/{world}]" if world > 1 else ""), unit="img",
               disable=not progress or not main_process)
    try:
        for batch in todo:
            t0 = time.perf_counter()
            items = [dataset.load(i) for i in batch]
            per_image = [tuple(c) for c in classes_for(items)]
            with_classes = [k for k, c in enumerate(per_image) if c]
            preds: dict[int, np.ndarray] = {}
            if with_classes:
                results = seg.segment([items[k].image for k in with_classes], [list(per_image[k]) for k in with_classes],
                                      progress=False)
                for k, res in zip(with_classes, results):
                    preds[k] = dataset.to_dataset_labels(res.labels, per_image[k])
            lines = []
            seconds = (time.perf_counter() - t0) / len(items)
            for k, item in enumerate(items):
                pred = preds.get(k, np.zeros_like(item.label))
                if pred.shape != item.label.shape:
                    raise RuntimeError(f"prediction for {item.id} is {pred.shape}, its label {item.label.shape}")
                h = confusion(pred, item.label, num_labels)
                hist += h
                if save_masks and out is not None:
                    label_png(pred).save(out / "masks" / f"{item.id}.png")
                rec = {"id": item.id, "hist": _sparse(h), "classes": list(per_image[k]),
                       "gt_classes": list(item.classes), "seconds": round(seconds, 5)}
                done[item.id] = rec
                lines.append(json.dumps(rec))
            if record_file is not None:
                # one write per batch: a kill leaves whole batches, or a cut line that is skipped
                record_file.write("\n".join(lines) + "\n")
                record_file.flush()
                os.fsync(record_file.fileno())
            computed += len(items)
            bar.update(len(items))
            bar.set_postfix(mIoU=f"{100 * miou(hist):.1f}")
    finally:
        bar.close()
        if record_file is not None:
            record_file.close()
    wall = time.perf_counter() - t_start
    if out is None:
        return _metrics({i: done[i] for i in ids}, dataset, manifest, wall, computed, world)
    _barrier(state)
    metrics = None
    if main_process:
        records = {i: r for i, r in load_records(out).items() if i in id_set}
        missing = [i for i in ids if i not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} images have no record after the run (e.g. {missing[:3]})")
        metrics = _metrics(records, dataset, manifest, wall, computed, world)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (out / "results.md").write_text(format_results(metrics))
    _barrier(state)
    if metrics is None:
        metrics = json.loads((out / "metrics.json").read_text())
    return metrics


def _barrier(state) -> None:
    if state is not None and state.num_processes > 1:
        state.wait_for_everyone()


def _metrics(records: dict, dataset, manifest: dict, wall: float, computed: int, world: int) -> dict:
    n = dataset.num_labels
    hist = np.zeros((n, n), np.int64)
    for rec in records.values():
        hist += _dense(rec["hist"], n)
    iou = iou_per_class(hist)
    names = ("background",) + tuple(dataset.class_names)
    out = {k: v for k, v in manifest.items() if k != "ids"}
    out.update({
        "miou": round(100 * miou(hist, "present"), 4),
        "miou_defined": round(100 * miou(hist, "defined"), 4),
        "convention": "miou: classes present in the ground truth (iSeg reference); miou_defined: classes with "
                      "a defined IoU (mmsegmentation)",
        "iou_per_class": {c: (None if np.isnan(v) else round(100 * float(v), 4)) for c, v in zip(names, iou)},
        "num_labels": n,
        "counts": {
            "images": len(records),
            "images_without_classes": sum(1 for r in records.values() if not r["classes"]),
            "pixels": int(hist.sum()),
            "gt_pixels_per_class": {c: int(v) for c, v in zip(names, hist.sum(1))},
        },
        "timing": {
            "wall_s_this_run": round(wall, 3),
            "images_computed_by_main_process": computed,
            "processes": world,
            "seconds_per_image": round(float(np.mean([r["seconds"] for r in records.values()])), 5),
        },
    })
    if manifest["label_source"] not in ("gt", "gt-oracle"):
        from .labels import label_scores

        scores = label_scores([r["classes"] for r in records.values()], [r["gt_classes"] for r in records.values()])
        out["labels"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
    return out


def format_results(metrics: dict) -> str:
    """A markdown summary: the headline numbers and a per-class IoU table."""
    lines = [
        f"# iSeg {metrics['task']} on {metrics['dataset']} ({metrics['split']}, {metrics['counts']['images']} images)",
        "",
        f"model `{metrics['model']}`, preset `{metrics['preset']}`, labels from `{metrics['label_source']}`",
        "",
        "| metric | value |",
        "|---|---|",
        f"| mIoU (classes present in the ground truth) | {metrics['miou']:.2f} |",
        f"| mIoU (classes with a defined IoU) | {metrics['miou_defined']:.2f} |",
    ]
    if "labels" in metrics:
        lab = metrics["labels"]
        lines += [f"| label precision | {100 * lab['precision']:.1f} |", f"| label recall | {100 * lab['recall']:.1f} |",
                  f"| label F1 | {100 * lab['f1']:.1f} |"]
    lines += [f"| seconds per image | {metrics['timing']['seconds_per_image']:.4f} |", "", "| class | IoU |", "|---|---|"]
    for name, v in metrics["iou_per_class"].items():
        lines.append(f"| {name} | {'-' if v is None else f'{v:.2f}'} |")
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iseg-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="wsss")
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--root", type=Path, default=None, help="dataset folder (not needed for shapes)")
    p.add_argument("--split", default=None, help="default: train for VOC WSSS, test for shapes, else val")
    p.add_argument("--preset", default=None, help="default: the method.md preset for the dataset and task")
    p.add_argument("--model", default=None, help="hub id, folder or shipped name (default: SD 2.1-base; shapes for shapes)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--labels", type=Path, default=None, help="image-level labels for --task ovs (JSON or CSV)")
    p.add_argument("--label-method", choices=["attention", "clip", "file", "gt"], default=None,
                   help="how --task ovs finds each image's classes (default: file with --labels, else clip when "
                        "its weights are here, else attention); gt is an oracle")
    p.add_argument("--clip-model", default=None, help="CLIP hub id or folder for --label-method clip "
                   "(default openai/clip-vit-base-patch16)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    p.add_argument("--out", type=Path, required=True, help="run folder: metrics.json, results.md, masks/, records/")
    p.add_argument("--save-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="write the predicted masks as palette PNGs (default: on for wsss)")
    p.add_argument("--restart", action="store_true", help="discard the records of an earlier run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", choices=["cuda-graph", "torch"], default=None,
                   help="faster forward passes (ISeg.compile): cuda-graph on a GPU, torch anywhere")
    p.add_argument("--compile-vae", action="store_true",
                   help="also torch.compile the VAE encoder (the largest cost at batch 8+ on a GPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="setting overrides (JSON values)")
    knobs = p.add_argument_group("settings", "every iSeg setting (iseg.Settings); values are read as JSON where they parse")
    for f in fields(Settings):
        knobs.add_argument("--" + f.name.replace("_", "-"), dest="knob_" + f.name, default=None, metavar="VALUE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import shutil

    import torch
    from accelerate import PartialState

    from . import ISeg, load_pipeline

    state = PartialState(cpu=(args.device == "cpu") or not torch.cuda.is_available())
    overrides = parse_overrides(args.set)
    overrides.update(parse_overrides([f"{f.name}={getattr(args, 'knob_' + f.name)}" for f in fields(Settings)
                                      if getattr(args, "knob_" + f.name) is not None]))
    split = args.split or default_split(args.dataset, args.task)
    preset = args.preset or default_preset(args.dataset, args.task)
    model = args.model or default_model(args.dataset)
    try:
        dataset = open_dataset(args.dataset, args.root, split)
    except DatasetError as err:
        raise SystemExit(f"iseg-eval: {err}") from None
    if args.restart and state.is_main_process and args.out.exists():
        for name in ("records", "masks", "run.json", "metrics.json", "results.md"):
            target = args.out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    _barrier(state)
    device = args.device or (state.device if state.distributed_type.name != "NO" else None)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    from .loading import ModelNotAvailableError

    try:
        pipe = load_pipeline(model, device=device, dtype=dtype, verbose=state.is_main_process)
    except ModelNotAvailableError as err:
        raise SystemExit(f"iseg-eval: {err}") from None
    seg = ISeg(pipe, preset=preset, **overrides)
    if args.compile or args.compile_vae:
        try:
            seg.compile(args.compile, vae=args.compile_vae)
        except RuntimeError as err:  # CUDA graphs asked for on a CPU
            raise SystemExit(f"iseg-eval: {err}") from None
    if state.is_main_process:
        print(f"iseg-eval: {args.task} on {dataset} with {seg}", file=sys.stderr)
    label_method = args.label_method
    if args.task == "ovs" and label_method is None and args.labels is None:
        from .labels import DEFAULT_CLIP, clip_available

        label_method = "clip" if clip_available(args.clip_model or DEFAULT_CLIP) else "attention"
        if state.is_main_process:
            print(f"iseg-eval: image labels from --label-method {label_method}", file=sys.stderr)
    try:
        metrics = evaluate_dataset(seg, dataset, args.task, args.out, labels=args.labels, label_method=label_method,
                                   limit=args.limit, save_masks=args.save_masks, progress=not args.no_progress,
                                   state=state, model_name=model, clip=args.clip_model)
    except (RunMismatchError, DatasetError, ValueError, FileNotFoundError, ModelNotAvailableError) as err:
        raise SystemExit(f"iseg-eval: {err}") from None
    if state.is_main_process:
        print(format_results(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
