"""The sweeps the course notebooks plot, computed once and shipped as results files.

    python bench/course_sweeps.py                      # every sweep, shapes models (about 5 minutes on 2 cores)
    python bench/course_sweeps.py iterations gamma     # only these (names below)

Each sweep scores many shapes images (exact ground truth) and takes from 20 seconds to minutes on
a CPU, too long for a notebook's Run All; the notebooks read ``data/results/NAME.json`` (through
``iseg.data_path("results", NAME + ".json")``) and have a cell that reruns this script on demand.

- ``iterations`` (notebook 04): mIoU against N on 40 validation images, the preset's lam and 0.1;
  raw maps (N = 0) also at their own rule ``raw_bg_power``.
- ``gamma`` (notebook 05): mIoU of raw and refined maps against Cat-Cross's gamma, 40 validation images.
- ``clustering`` (notebook 05): KL clustering off and on, 20 validation images.
- ``prompts`` (notebook 07): point, box and text prompts on every object of the first 20
  multi-object test images.
- ``passes`` (notebook 10): the shapes MM-DiT with one pass against its preset's two, 20 validation images.
- ``families`` (notebook 10): both shapes models' mIoU against N on 40 validation images.
- ``raw_pass`` (notebook 08): the raw Cat-Cross masks (N = 0) at each shapes model's own label rule
  ``raw_bg_power``, scored as notebook 08 scores its refined masks (``evaluate_dataset``, WSSS, the
  first 100 test images, the MM-DiT's first 40): the whole metrics, per-class IoU included.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "data" / "results"


def _setup(name: str = "shapes"):
    import iseg

    model = iseg.load_model(name, device="cpu")
    return model, iseg.ISeg(model)


def _head(seg, model, **extra) -> dict:
    s = seg.settings
    return {"model": model.name, "preset": seg.preset, "timestep": s.timestep, "lam": s.lam,
            "iterations": s.iterations, "bg_power": s.bg_power, "raw_bg_power": model.raw_bg_power, **extra}


def iterations() -> dict:
    from iseg.shapes.evaluate import evaluate

    model, seg = _setup()
    s = seg.settings
    its = [0, 1, 2, 3, 4, 5, 10, 20]
    lams = [0.1, s.lam]
    report = evaluate(seg, "val", 40, timesteps=[s.timestep], lams=lams, iterations=its, progress=False,
                      bg_powers=[model.raw_bg_power])
    r = report["timesteps"][str(s.timestep)]
    return _head(seg, model, split="val", images=40, its=its, lams=lams,
                 curves={str(lam): {str(n): round(r["miou"][str(lam)][str(n)], 2) for n in its} for lam in lams},
                 raw_own_rule=round(r["miou_by_bg_power"][str(model.raw_bg_power)][str(lams[0])]["0"], 2))


def gamma() -> dict:
    from iseg.shapes.evaluate import evaluate

    model, seg = _setup()
    s = seg.settings
    n, lam, raw_power = s.iterations, str(s.lam), model.raw_bg_power
    rows = []
    for g in [1.0, 1.3, 1.6, 2.0, 2.5]:
        rep = evaluate(seg, "val", 40, timesteps=[s.timestep], lams=[s.lam], iterations=[0, n], progress=False,
                       gamma=g, bg_powers=[raw_power])
        r = rep["timesteps"][str(s.timestep)]
        rows.append({"gamma": g, "raw_own_rule": round(r["miou_by_bg_power"][str(raw_power)][lam]["0"], 2),
                     "refined": round(r["miou"][lam][str(n)], 2), "raw_preset_rule": round(r["miou"][lam]["0"], 2)})
    return _head(seg, model, split="val", images=40, rows=rows)


def clustering() -> dict:
    from iseg.shapes.evaluate import evaluate

    model, seg = _setup()
    s = seg.settings
    n, lam, raw_power = s.iterations, str(s.lam), model.raw_bg_power
    rows = []
    for on in (False, True):
        rep = evaluate(seg, "val", 20, timesteps=[s.timestep], lams=[s.lam], iterations=[0, n], progress=False,
                       bg_powers=[raw_power], clustering=on)
        r = rep["timesteps"][str(s.timestep)]
        rows.append({"clustering": on, "raw_own_rule": round(r["miou_by_bg_power"][str(raw_power)][lam]["0"], 2),
                     "refined": round(r["miou"][lam][str(n)], 2)})
    return _head(seg, model, split="val", images=20, rows=rows)


def prompts() -> dict:
    from iseg.shapes import CLASSES, SPLITS, sample

    model, seg = _setup()
    multi = [s for s in map(sample, SPLITS["test"][:60]) if len(s.classes) >= 2][:20]
    ious = {"point": [], "box": [], "text": []}
    for s in multi:
        for name in s.classes:
            gt = s.mask == CLASSES.index(name) + 1
            ys, xs = np.nonzero(gt)
            runs = {"point": dict(points=[(xs.mean() + 0.5, ys.mean() + 0.5)]),  # a click at the object's centroid
                    "box": dict(box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)), "text": dict(text=name)}
            for kind, prompt in runs.items():
                m = seg.segment_prompt(s.image, **prompt).mask
                ious[kind].append(round(float((m & gt).sum() / (m | gt).sum()), 4))
    return {"model": model.name, "preset": seg.preset, "split": "test", "images": len(multi), "ious": ious}


def passes() -> dict:
    from iseg.shapes.evaluate import evaluate

    model, seg = _setup("shapes-mmdit")
    s = seg.settings
    out = {}
    for name, size in (("one pass", None), ("two passes", s.self_image_size)):
        rep = evaluate(seg, "val", 20, timesteps=[s.timestep], lams=[s.lam], iterations=[s.iterations],
                       progress=False, self_image_size=size)
        out[name] = round(rep["timesteps"][str(s.timestep)]["miou"][str(s.lam)][str(s.iterations)], 2)
    return _head(seg, model, split="val", images=20, self_image_size=s.self_image_size, miou=out)


def families() -> dict:
    from iseg.shapes.evaluate import evaluate, iteration_curve

    rows = {}
    for name in ("shapes", "shapes-mmdit"):
        model, seg = _setup(name)
        s = seg.settings
        its = sorted({0, 1, 2, 3, 5, 10, s.iterations})
        report = evaluate(seg, "val", 40, timesteps=[s.timestep], lams=[s.lam], iterations=its, progress=False,
                          bg_powers=[model.raw_bg_power])
        curve, raw = iteration_curve(report, s.lam, model.raw_bg_power)
        rows[name] = _head(seg, model, curve={str(n): round(v, 2) for n, v in curve.items()},
                           raw_own_rule=None if raw is None else round(raw, 2))
    return {"split": "val", "images": 40, "models": rows}


def raw_pass() -> dict:
    import tempfile

    import iseg
    from iseg.evaluation.run import evaluate_dataset
    from iseg.shapes.dataset import ShapesDataset

    rows = {}
    for name, count in RAW_PASS_IMAGES.items():
        model, seg = _setup(name)
        dataset = ShapesDataset(split="test", count=count)
        with tempfile.TemporaryDirectory() as out:
            raw = evaluate_dataset(iseg.ISeg(model, iterations=0, bg_power=model.raw_bg_power), dataset, task="wsss",
                                   out=Path(out) / "raw", progress=False)
        rows[name] = _head(seg, model, metrics=raw)
    return {"split": "test", "task": "wsss", "models": rows}


# notebook 08's first test images per shapes model: each runs in about a minute on a 2-core CPU (the
# MM-DiT's two passes per image take about 2.5x the UNet's one)
RAW_PASS_IMAGES = {"shapes": 100, "shapes-mmdit": 40}


SWEEPS = {"iterations": iterations, "gamma": gamma, "clustering": clustering, "prompts": prompts,
          "passes": passes, "families": families, "raw_pass": raw_pass}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"sweeps to run, of {', '.join(SWEEPS)} (default: all)")
    p.add_argument("--out", type=Path, default=OUT, help="folder for NAME.json")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in SWEEPS]
    if unknown:
        p.error(f"unknown sweep(s) {', '.join(unknown)}; choose from {', '.join(SWEEPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(SWEEPS):
        t0 = time.perf_counter()
        report = SWEEPS[name]()
        report["seconds"] = round(time.perf_counter() - t0, 1)
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{name}: {report['seconds']} s -> {path}", flush=True)


if __name__ == "__main__":
    main()
