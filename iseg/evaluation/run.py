"""Evaluate iSeg on a dataset: weakly supervised pseudo-masks or open-vocabulary segmentation.

    iseg eval --task wsss --dataset shapes --split test --limit 500 --out runs/shapes
    iseg eval --task wsss --dataset voc --root VOCdevkit/VOC2012 --split train --out runs/voc-wsss
    iseg eval --task ovs --dataset voc --root VOCdevkit/VOC2012 --split val --labels labels.json --out runs/voc-ovs
    accelerate launch --multi_gpu --num_processes 8 -m iseg eval ...   # shards images over 8 processes

- ``wsss``: image-level labels are the classes present in the ground truth (method.md §8); the
  pseudo-masks are written as palette PNGs (``OUT/masks/<id>.png``, pixel value = dataset label).
- ``ovs``: the classes of every image come from ``--labels FILE`` (JSON ``{id: [names]}`` or CSV
  ``id,name;name``) or from a label predictor (``--label-method``, see ``iseg.labels``).

The confusion matrix of every image is stored as it is made (``OUT/records/*.jsonl``). A run that
stops resumes where it stopped with the same command (``run.json`` records every option that
changes the numbers, and a resume with another is refused, naming it); ``--restart`` discards
the earlier run, deleting only its own files. Under several processes every process
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
import numbers
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import labels as L
from ..commands.files import check_folder, stale_temporaries, write_atomic, write_json, write_text
from ..commands.options import add_set_option, command_options
from ..labels import DEFAULT_CLIP, clip_available, read_labels_file
from ..loading import DEFAULT_MODEL, load_model, resolve_device
from ..presets import Settings, make_settings, parse_overrides
from ..segmenter import ISeg
from ..viz import label_png
from .datasets import DatasetError, SegmentationDataset, dataset_names, open_dataset
from .label_thresholds import label_scores
from .metrics import confusion, iou_per_class, miou

__all__ = [
    "DEFAULT_PRESETS", "default_preset", "default_model", "read_label_file", "evaluate_dataset", "load_records",
    "image_scores", "format_results", "RunMismatchError",
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


# run.json keys that do not change the numbers: a resume may differ in them (run.json keeps the last)
_NOT_COMPARED = ("save_masks",)
# what a run writes into its folder; --restart deletes these and nothing else
_RUN_FILES = ("run.json", "metrics.json", "results.md")


def default_preset(dataset: str, task: str) -> str:
    """The preset of method.md for a dataset and task (the shapes model's own preset for shapes)."""
    return DEFAULT_PRESETS[(dataset, task)]


def default_model(dataset: str) -> str:
    return "shapes" if dataset == "shapes" else DEFAULT_MODEL


def default_split(dataset: str, task: str) -> str:
    return DEFAULT_SPLITS.get((dataset, task), "val")


# -- image-level labels --------------------------------------------------------------------------
def read_label_file(path, dataset: SegmentationDataset) -> dict[str, tuple[str, ...]]:
    """Image-level labels from JSON (``{id: [names]}``) or CSV (``id,name;name`` per row), checked
    against the dataset's classes and returned in its label order (``iseg.labels.read_labels_file``)."""
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
    # only the parts a run writes: other files put there are not records (and --restart keeps them)
    for path in sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec and "hist" in rec:
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
def _ground_truth(items) -> list[tuple[str, ...]]:
    return [it.classes for it in items]


def _classes_source(task: str, dataset: SegmentationDataset, labels, label_method: str | None, seg=None, clip=None):
    """``(name, function(items) -> class lists)`` for the task. The options are checked (and a labels
    file read, a CLIP model loaded) now; the label methods themselves are ``iseg.labels.predict_labels``'s."""
    if task == "wsss":
        if labels is not None or label_method not in (None, "gt"):
            raise ValueError("--task wsss uses the ground-truth image labels; --labels and --label-method are for --task ovs")
        return "gt", _ground_truth
    method = label_method or ("file" if labels is not None else None)
    if method is None:
        raise ValueError("--task ovs needs image labels: --label-method attention|clip|file (with --labels FILE), "
                         "or gt for an oracle run")
    if method == "gt":
        return "gt-oracle", _ground_truth
    if method not in L.METHODS:
        raise ValueError(f"unknown label method {method!r}; methods: {', '.join(L.METHODS)}, gt")
    table = None
    if method == "file":
        if labels is None:
            raise ValueError("--label-method file needs --labels FILE")
        table = read_label_file(labels, dataset) if not isinstance(labels, Mapping) else {
            str(k): tuple(v) for k, v in labels.items()}
    elif labels is not None:
        raise ValueError(f"--labels is for --label-method file, not {method!r}")
    if method == "clip" and not isinstance(clip, L.ClipTagger):
        clip = L.load_clip(clip or DEFAULT_CLIP)  # once for the whole run
    vocabulary = list(dataset.class_names)

    def predicted(items):
        return L.predict_labels([it.image for it in items], vocabulary, method, seg=seg, clip=clip, labels_file=table,
                                ids=[it.id for it in items])

    return method, predicted


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
    restart: bool = False,
) -> dict:
    """Run ``seg`` over ``dataset`` and return the metrics (also written to ``out`` when given).

    ``state`` is an ``accelerate.PartialState`` (or anything with ``process_index``,
    ``num_processes``, ``is_main_process`` and ``wait_for_everyone``); None means one process.
    Settings are ``seg.settings``. For ``ovs`` the classes of each image come from ``labels`` (a
    file or a mapping), or ``label_method``: ``attention``, ``clip`` (``clip``: a ``ClipTagger`` or
    a model id), ``file`` or ``gt`` (an oracle). ``classes_source`` replaces all of these:
    ``(name, function(items) -> class lists)``.

    ``out/run.json`` records everything that changes the numbers (settings, model, dtype, device,
    compiled forward passes, label source and file, CLIP model, dataset, split, limit, image ids):
    a run resumes only when all of them match, else ``RunMismatchError`` names what differs.
    With ``save_masks``, images recorded earlier without a mask are computed again. ``restart``
    discards an earlier run in ``out`` first, after everything else has been checked, and deletes
    only the files that run made (a folder without its ``run.json`` is refused).
    """
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    ids = _image_ids(dataset, task, limit, out, world)
    source_name, classes_for = classes_source or _classes_source(task, dataset, labels, label_method, seg, clip)
    save_masks = (task == "wsss") if save_masks is None else save_masks
    manifest = _manifest(seg, dataset, task, labels, source_name, clip, model_name, limit, ids, save_masks)
    out = Path(out) if out is not None else None
    done = _open_run(out, manifest, ids, restart, save_masks, state) if out is not None else {}
    mine, todo = _my_batches(ids, seg.settings.batch_size, rank, world, done, out if save_masks else None)
    wall, computed = _compute(seg, dataset, mine, todo, classes_for, done, out, save_masks, rank, world, progress)
    if out is None:
        return _metrics({i: done[i] for i in ids}, dataset, manifest, wall, computed, world)
    return _finish_run(out, ids, dataset, manifest, wall, computed, world, state)


def _image_ids(dataset: SegmentationDataset, task: str, limit, out, world: int) -> list[str]:
    """The ids of the images to evaluate, after checking the task, ``limit`` and ``out``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be a whole number >= 1 (or None for every image), got {limit!r}")
    ids = list(dataset.ids[:limit] if limit is not None else dataset.ids)
    if not ids:
        raise DatasetError(f"{dataset.name}: no images to evaluate")
    if out is None and world > 1:
        raise ValueError("several processes need --out: their histograms are summed from the records there")
    return ids


def _dataset_facts(dataset: SegmentationDataset) -> dict:
    """Which images a run reads, as run.json records it."""
    return {"dataset": dataset.name, "split": dataset.split, "root": str(dataset.root) if dataset.root else None}


def _manifest(seg, dataset: SegmentationDataset, task: str, labels, source_name: str, clip, model_name, limit,
              ids: list[str], save_masks: bool) -> dict:
    """What ``run.json`` records: everything that changes the numbers, as it reads back from the file."""
    manifest = {
        "task": task, **_dataset_facts(dataset),
        "model": model_name or seg.model.name, "preset": seg.preset,
        "settings": seg.settings.as_dict(), "label_source": source_name,
        "labels_file": (hashlib.sha1(Path(labels).read_bytes()).hexdigest()[:16]
                        if labels is not None and not isinstance(labels, Mapping) else None),
        **_run_facts(seg, source_name, clip),
        "limit": limit, "images": len(ids), "ids": _digest(ids), "save_masks": bool(save_masks),
    }
    return json.loads(json.dumps(manifest))  # as it reads back from run.json (tuples become lists)


def _open_run(out: Path, manifest: dict, ids: list[str], restart: bool, save_masks: bool, state) -> dict[str, dict]:
    """Prepare the run folder (discarding an earlier run with ``restart``, refusing to resume one
    with other settings), write run.json, and return the records already there."""
    main_process = state is None or state.process_index == 0
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if restart:
        old_ids = _check_restart(out, manifest, ids)  # every process: all refuse alike
        _barrier(state)
        if main_process:
            _discard_run(out, old_ids)
        _barrier(state)
    previous = out / "run.json"
    if previous.is_file():
        old = _read_run(previous)
        if old is None:
            raise RunMismatchError(f"{previous} is not the record of an iseg eval run; use another --out")
        _refuse_other_run(out, manifest, old)
    out.mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(exist_ok=True)
    if save_masks:
        (out / "masks").mkdir(exist_ok=True)
    _barrier(state)
    if main_process:
        write_json(previous, manifest)  # never rewritten in place: a kill leaves the old or the new
    return load_records(out)


def _my_batches(ids: list[str], batch_size: int, rank: int, world: int, done: dict, masks_out: Path | None):
    """``(mine, todo)``: the batches of this process, and those of them still to compute.

    Batches are cut from the full id list whatever the number of processes, and process ``rank``
    takes every ``world``-th one. ``masks_out``: the run folder when masks are saved."""
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    mine = [b for k, b in enumerate(batches) if k % world == rank]
    complete = set(done)
    if masks_out is not None:
        # a resume asked for masks that an earlier run did not write: masks come only from a forward
        # pass, so those images are computed again (whole batches, so the numbers stay the same)
        complete &= {p.stem for p in (masks_out / "masks").glob("*.png")}
        unmasked = sum(1 for b in mine for i in b if i in done and i not in complete)
        if unmasked and rank == 0:
            print(f"iseg eval: {unmasked} image(s) recorded earlier have no mask in {masks_out / 'masks'}; "
                  "computing them again to write their masks", file=sys.stderr)
    return mine, [b for b in mine if not all(i in complete for i in b)]


def _compute(seg, dataset: SegmentationDataset, mine: list, todo: list, classes_for, done: dict, out: Path | None,
             save_masks: bool, rank: int, world: int, progress: bool) -> tuple[float, int]:
    """Segment the batches of ``todo``, adding their records to ``done`` (and to ``out/records``),
    with a progress bar showing the running mIoU. Returns the wall time and the images computed."""
    num_labels = dataset.num_labels
    hist = np.zeros((num_labels, num_labels), np.int64)
    for i in (i for b in mine if b not in todo for i in b):
        hist += _dense(done[i]["hist"], num_labels)
    record_file = None
    if out is not None:
        record_file = (out / "records" / f"part-{rank:03d}-{os.getpid()}-{time.time_ns()}.jsonl").open("a")
    masks = out / "masks" if save_masks and out is not None else None
    t_start = time.perf_counter()
    computed = 0
    bar = tqdm(total=sum(len(b) for b in mine), initial=sum(len(b) for b in mine) - sum(len(b) for b in todo),
               desc=f"iseg eval {dataset.name}" + (f" [{rank + 1}/{world}]" if world > 1 else ""), unit="img",
               disable=not progress or rank != 0)
    try:
        for batch in todo:
            records, batch_hist = _evaluate_batch(seg, dataset, batch, classes_for, masks)
            hist += batch_hist
            done.update((rec["id"], rec) for rec in records)
            if record_file is not None:
                # one write per batch: a kill leaves whole batches, or a cut line that is skipped
                record_file.write("\n".join(json.dumps(rec) for rec in records) + "\n")
                record_file.flush()
                os.fsync(record_file.fileno())
            computed += len(records)
            bar.update(len(records))
            bar.set_postfix(mIoU=f"{100 * miou(hist):.1f}")
    finally:
        bar.close()
        if record_file is not None:
            record_file.close()
    return time.perf_counter() - t_start, computed


def _evaluate_batch(seg, dataset: SegmentationDataset, batch: list[str], classes_for, masks: Path | None):
    """``(records, histogram)`` of one batch: its images segmented with their classes, each
    prediction compared with its label (and written to ``masks`` when given)."""
    t0 = time.perf_counter()
    items = [dataset.load(i) for i in batch]
    per_image = [tuple(c) for c in classes_for(items)]
    preds = _predict(seg, dataset, items, per_image)
    seconds = (time.perf_counter() - t0) / len(items)
    num_labels = dataset.num_labels
    hist = np.zeros((num_labels, num_labels), np.int64)
    records = []
    for k, item in enumerate(items):
        pred = preds.get(k, np.zeros_like(item.label))
        if pred.shape != item.label.shape:
            raise RuntimeError(f"prediction for {item.id} is {pred.shape}, its label {item.label.shape}")
        h = confusion(pred, item.label, num_labels)
        hist += h
        if masks is not None:
            write_atomic(masks / f"{item.id}.png", lambda p, m=pred: label_png(m).save(p, format="PNG"))
        records.append({"id": item.id, "hist": _sparse(h), "classes": list(per_image[k]),
                        "gt_classes": list(item.classes), "seconds": round(seconds, 5)})
    return records, hist


def _predict(seg, dataset: SegmentationDataset, items, per_image) -> dict[int, np.ndarray]:
    """``{k: dataset label map}`` for every image ``k`` that has classes (the others are all background)."""
    with_classes = [k for k, c in enumerate(per_image) if c]
    if not with_classes:
        return {}
    results = seg.segment([items[k].image for k in with_classes], [list(per_image[k]) for k in with_classes],
                          progress=False)
    # label k of a result is its given_classes[k-1] (a -reference preset reorders the classes)
    return {k: dataset.to_dataset_labels(res.labels, res.given_classes) for k, res in zip(with_classes, results)}


def _finish_run(out: Path, ids: list[str], dataset, manifest: dict, wall: float, computed: int, world: int,
                state) -> dict:
    """The metrics of every record in ``out`` (summed over the processes), written by the main process."""
    _barrier(state)
    metrics = None
    if state is None or state.process_index == 0:
        id_set = set(ids)
        records = {i: r for i, r in load_records(out).items() if i in id_set}
        missing = [i for i in ids if i not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} images have no record after the run (e.g. {missing[:3]})")
        metrics = _metrics(records, dataset, manifest, wall, computed, world)
        write_json(out / "metrics.json", metrics)
        write_text(out / "results.md", format_results(metrics))
    _barrier(state)
    if metrics is None:
        metrics = json.loads((out / "metrics.json").read_text())
    return metrics


def _run_facts(seg, source_name: str, clip) -> dict:
    """What changes a run's numbers besides its settings: the weights' dtype and device, compiled
    forward passes (they round differently), and the CLIP model that chose the labels."""
    clip_model = None
    if source_name == "clip":
        if clip is None or isinstance(clip, (str, os.PathLike)):
            clip_model = str(clip or DEFAULT_CLIP)
        else:
            clip_model = str(getattr(getattr(clip, "model", None), "name_or_path", type(clip).__name__))
    return {
        "dtype": str(seg.backbone.dtype).removeprefix("torch."),
        "device": seg.backbone.device.type,
        "compile": seg.forward.compiled,
        "compile_vae": seg.forward.encoder is not None,
        "clip_model": clip_model,
    }


def _read_run(path: Path) -> dict | None:
    """An iseg eval run.json, or None when the file is not one (then nothing is deleted)."""
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return run if isinstance(run, dict) and {"task", "dataset", "settings", "ids"} <= set(run) else None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(old: dict, new: dict) -> list[str]:
    """``["dtype (\"float32\" there, \"float16\" now)", "settings.lam (...)"]``: what keeps a run from resuming."""
    out = []
    for key, value in new.items():
        if key in _NOT_COMPARED or old.get(key) == value:
            continue
        if key == "settings" and isinstance(old.get(key), dict):
            for name in sorted(set(old[key]) | set(value)):
                if old[key].get(name) != value.get(name):
                    out.append(f"settings.{name} ({_short(old[key].get(name))} there, {_short(value.get(name))} now)")
        elif key == "ids":
            out.append("image ids (another list of images)")
        else:
            out.append(f"{key} ({_short(old.get(key))} there, {_short(value)} now)")
    return out


def _refuse_other_run(out: Path, manifest: dict, old: dict | None = None) -> None:
    """Refuse to resume the run in ``out`` when its run.json differs from ``manifest`` (compared on
    ``manifest``'s keys, so a partial manifest checks what is known before the model loads)."""
    differ = _differences(old if old is not None else _read_run(out / "run.json") or {}, manifest)
    if differ:
        raise RunMismatchError(f"{out} holds a run with other {'; '.join(differ)}. Resume it with the same "
                               "options, or pass --restart to discard that run, or use another --out")


def _known_before_loading(args, dataset: SegmentationDataset, model: str, preset: str, overrides: dict) -> dict:
    """The part of run.json that the options fix before any model is loaded."""
    known = {"task": args.task, **_dataset_facts(dataset), "model": model, "preset": preset,
             "settings": make_settings(preset, **overrides).as_dict(), "limit": args.limit,
             "save_masks": bool(args.save_masks)}
    if args.dtype:
        known["dtype"] = args.dtype
    return json.loads(json.dumps(known))


def _check_restart(out: Path, manifest: dict, ids: list[str]) -> set[str]:
    """The ids whose masks ``--restart`` may delete; refuses a folder that holds no run."""
    if not out.exists():
        return set()
    made = [name for name in ("records", "masks", *_RUN_FILES) if (out / name).exists()]
    if not made:
        return set()  # nothing a run makes is there: nothing to discard
    old = _read_run(out / "run.json")
    if old is None:
        raise ValueError(f"--restart: {out} holds {', '.join(made)} but no iseg eval run.json, so they are not "
                         "known to be a run's files; nothing was deleted. Choose another --out, or remove them yourself")
    old_ids = set(load_records(out))
    if all(old.get(k) == manifest[k] for k in ("dataset", "split", "root")):
        old_ids |= set(ids)  # a mask written just before a kill has no record yet
    return old_ids


def _discard_run(out: Path, ids: set[str]) -> None:
    """Delete what an iseg eval run wrote in ``out``: its record parts, the masks of its images, and
    run.json, metrics.json and results.md. Anything else there stays."""
    records = out / "records"
    for path in records.glob("part-*.jsonl") if records.is_dir() else []:
        path.unlink()
    masks = out / "masks"
    for i in ids if masks.is_dir() else []:
        (masks / f"{i}.png").unlink(missing_ok=True)
        for stale in stale_temporaries(masks / f"{i}.png"):  # a mask whose write was killed
            stale.unlink(missing_ok=True)
    for folder in (records, masks):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
        for stale in stale_temporaries(out / name):
            stale.unlink(missing_ok=True)


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
USER_ERRORS = (RunMismatchError, DatasetError)  # refusals: one line, exit status 2
INTERRUPT_HINT = "run the same command again to resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``iseg eval`` / ``iseg eval``."""
    p.add_argument("--task", choices=TASKS, default="wsss")
    p.add_argument("--dataset", choices=dataset_names(), required=True)
    p.add_argument("--root", type=Path, default=None, help="dataset folder (not needed for shapes)")
    p.add_argument("--split", default=None, help="default: train for VOC WSSS, test for shapes, else val")
    p.add_argument("--preset", default=None, help="default: the method.md preset for the dataset and task")
    p.add_argument("--model", default=None, help="hub id, folder or shipped name (default: SD 2.1-base; shapes for shapes)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--labels", type=Path, default=None, help="image-level labels for --task ovs (JSON or CSV)")
    p.add_argument("--label-method", choices=["attention", "clip", "file", "gt"], default=None,
                   help="how --task ovs finds each image's classes (default: file with --labels, else clip when "
                        "its weights are here, else attention); gt is an oracle")
    p.add_argument("--clip-model", default=None, help="CLIP hub id or folder for --label-method clip "
                   "(default openai/clip-vit-base-patch16)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split (N >= 1)")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder: metrics.json, results.md, masks/, records/ (an unfinished run there resumes)")
    p.add_argument("--save-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="write the predicted masks as palette PNGs (default: on for wsss)")
    p.add_argument("--restart", action="store_true",
                   help="discard the earlier run in --out (only the files it made; needs its run.json) and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", choices=["cuda-graph", "torch"], default=None,
                   help="faster forward passes (ISeg.compile): cuda-graph on a GPU, torch anywhere")
    p.add_argument("--compile-vae", action="store_true",
                   help="also torch.compile the VAE encoder (the largest cost at batch 8+ on a GPU)")
    add_set_option(p)
    knobs = p.add_argument_group("settings", "every iSeg setting (iseg.Settings); values are read as JSON where they parse")
    for f in fields(Settings):
        knobs.add_argument("--" + f.name.replace("_", "-"), dest="knob_" + f.name, default=None, metavar="VALUE")


def build_parser() -> argparse.ArgumentParser:
    """The ``iseg eval`` parser (the options of ``iseg eval``)."""
    parser = argparse.ArgumentParser(prog="iseg eval", formatter_class=argparse.RawDescriptionHelpFormatter)
    return command_options(parser, sys.modules[__name__], None)




def _overrides(args) -> dict:
    """Setting overrides from ``--set`` and the per-setting options, each error naming its option."""
    try:
        overrides = parse_overrides(args.set)
    except ValueError as err:
        raise ValueError(f"--set: {err}") from None
    for f in fields(Settings):
        value = getattr(args, "knob_" + f.name)
        if value is not None:
            try:
                overrides.update(parse_overrides([f"{f.name}={value}"]))
            except ValueError as err:
                raise ValueError(f"--{f.name.replace('_', '-')}: {err}") from None
    return overrides


def run(args) -> int:
    """``iseg eval``: every option is checked before anything is loaded or anything in --out is touched."""
    from accelerate import PartialState

    # every option is checked before anything is loaded or anything in --out is touched
    overrides = _overrides(args)
    split = args.split or default_split(args.dataset, args.task)
    preset = args.preset or default_preset(args.dataset, args.task)
    model = args.model or default_model(args.dataset)
    try:
        make_settings(preset, **overrides)
    except ValueError as err:
        raise ValueError(f"--preset: {err}") from None
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1 (the number of images to evaluate), got {args.limit}")
    check_folder(args.out, "--out")  # a file, a dangling link or a read-only folder: refused now, not after loading
    previous = args.out / "run.json"
    if previous.is_file() and _read_run(previous) is None and not args.restart:
        raise RunMismatchError(f"{previous} is not the record of an iseg eval run; use another --out")
    if args.restart and previous.exists() and _read_run(previous) is None:
        raise ValueError(f"--restart: {previous} is not an iseg eval run.json, so the files in {args.out} are not "
                         "known to be a run's; nothing was deleted. Choose another --out, or remove them yourself")
    if args.labels is not None and not args.labels.is_file():
        raise ValueError(f"--labels {args.labels} does not exist or is not a file")
    try:
        device = resolve_device(args.device) if args.device is not None else None
    except ValueError as err:
        raise ValueError(f"--device: {err}") from None
    state = PartialState(cpu=(device is not None and device.type == "cpu") or not torch.cuda.is_available())
    dataset = open_dataset(args.dataset, args.root, split)
    if args.task == "wsss" or args.labels is not None or args.label_method in ("gt", "file"):
        _classes_source(args.task, dataset, args.labels, args.label_method)  # the labels file read now, not after loading
    if previous.is_file() and not args.restart:  # another run's folder: refused before the model loads
        _refuse_other_run(args.out, _known_before_loading(args, dataset, model, preset, overrides))
    if state.distributed_type.name != "NO" and args.device is None:
        device = state.device
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_model(model, device=device, dtype=dtype, verbose=state.is_main_process)
    seg = ISeg(pipe, preset=preset, **overrides)
    if args.compile or args.compile_vae:
        try:
            seg.compile(args.compile, vae=args.compile_vae)
        except RuntimeError as err:  # CUDA graphs asked for on a CPU
            raise ValueError(f"--compile: {err}") from None
    if state.is_main_process:
        print(f"iseg eval: {args.task} on {dataset} with {seg}", file=sys.stderr)
    label_method = args.label_method
    if args.task == "ovs" and label_method is None and args.labels is None:
        label_method = "clip" if clip_available(args.clip_model or DEFAULT_CLIP) else "attention"
        if state.is_main_process:
            print(f"iseg eval: image labels from --label-method {label_method}", file=sys.stderr)
    metrics = evaluate_dataset(seg, dataset, args.task, args.out, labels=args.labels, label_method=label_method,
                               limit=args.limit, save_masks=args.save_masks, progress=not args.no_progress,
                               state=state, model_name=model, clip=args.clip_model, restart=args.restart)
    if state.is_main_process:
        print(format_results(metrics))
    return 0
