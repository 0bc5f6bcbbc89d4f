"""What the authors' computation (the ``*-reference`` presets) changes, measured where it can be
without real weights: on the tiny SD-shaped pipeline of the tests (random weights, so only the
size of a change means something, not its direction) and on the shapes world (a trained model).

    PYTHONPATH=. python bench/reference_effects.py [--images 8] [--shapes 40] [--out bench/reference-effects-cpu.json]

Each row isolates one difference: the same observation decoded two ways, or the same image and
prompt kind read with the default and with the reference rule, everything else equal.
docs/method.md ("What the `*-reference` presets reproduce") quotes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import iseg  # noqa: E402
from iseg.decode import decode  # noqa: E402

SETS = {
    "wsss-voc": [["aeroplane", "dog"], ["dining table", "person", "potted plant"], ["cat", "tv monitor"]],
    "wsss-coco": [["person", "fire hydrant", "dog"], ["traffic light", "car"], ["couch", "tv", "cat"]],
    "ovs-voc": [["aeroplane", "dog"], ["potted plant", "tv monitor"], ["bus", "person"]],
    "ovs-context": [["aeroplane", "grass", "sky"], ["computer", "keyboard", "person"], ["bag", "tv monitor"]],
    "ovs-coco": [["person", "fire hydrant", "dog"], ["airplane", "car"], ["baseball bat", "person"]],
}


def _agree(a, b) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def _image(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 0.3) + 0.1 * rng.standard_normal((h, w, 3))
    for _ in range(3):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        img[y : y + rng.integers(8, 20), x : x + rng.integers(8, 20)] = rng.random(3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def tiny(images: int) -> dict:
    from tiny import tiny_pipeline

    pipe = tiny_pipeline()
    out = {}
    for name, sets in SETS.items():
        default, ref = iseg.ISeg(pipe, preset=name), iseg.ISeg(pipe, preset=f"{name}-reference")
        whole, half, prompt = [], [], []
        for i in range(images):
            classes = sets[i % len(sets)]
            img = _image(i)
            a = default.segment(img, classes)
            obs = ref.observe(img, classes)[0]
            b = decode([obs])[0]
            # the same reference observation in float32: what float16 alone changes
            b32 = decode([replace(obs, settings=replace(obs.settings, reference=None))])[0]
            # labels in the caller's class order, so that label k means the same class in both
            order = [0] + [b.given_classes.index(c) + 1 for c in a.classes]
            lut = np.argsort(order)
            whole.append(_agree(a.labels, lut[b.labels]))
            prompt.append(_agree(a.labels, lut[b32.labels]))
            half.append(_agree(b.labels, b32.labels))
        out[name] = {"default_vs_reference": float(np.mean(whole)), "prompt_words_tokens_only": float(np.mean(prompt)),
                     "float16_only": float(np.mean(half))}
        print(name, out[name], flush=True)
    return out


def shapes(count: int) -> dict:
    import torch

    from iseg import reference as REF
    from iseg import refine as R
    from iseg.shapes import CLASSES, SPLITS, sample

    pipe = iseg.load_model("shapes", device="cpu", verbose=False)
    seg = iseg.ISeg(pipe)
    samples, seed = [], SPLITS["test"].start
    while len(samples) < count:
        s = sample(seed)
        if s.classes:
            samples.append(s)
        seed += 1
    obs = seg.observe([s.image for s in samples], [list(s.classes) for s in samples], progress=False)
    moved, agree, iou32, iou16 = [], [], [], []
    for s, o in zip(samples, obs):
        x = R.aggregate_cross_attention({r: a[None] for r, a in o.cross.items()}, o.weights, o.grid)
        c32 = R.kl_cluster(x)[0]
        c16 = REF.kl_cluster_half(x)[0].float()
        # clusters as ids (pixels of one cluster share one vector); each float16 cluster is matched
        # to the float32 cluster it overlaps most, and a pixel moved when it is not in that one
        id32 = torch.unique(c32, dim=0, return_inverse=True)[1]
        id16 = torch.unique(c16, dim=0, return_inverse=True)[1]
        joint = torch.zeros(int(id16.max()) + 1, int(id32.max()) + 1)
        joint.index_put_((id16, id32), torch.ones(len(id16)), accumulate=True)
        moved.append(1 - float(joint.amax(1).sum() / len(id16)))
        r32 = decode([o])[0]
        r16 = decode([replace(o, settings=replace(o.settings, reference="wsss-voc"))])[0]
        agree.append(_agree(r32.labels, r16.labels))
        gt = s.mask
        for res, bucket in ((r32, iou32), (r16, iou16)):
            pred = np.zeros_like(gt)
            for k, name in enumerate(res.classes, start=1):
                pred[res.labels == k] = CLASSES.index(name) + 1
            ious = [((pred == c) & (gt == c)).sum() / max(1, ((pred == c) | (gt == c)).sum())
                    for c in np.unique(gt)]
            bucket.append(float(np.mean(ious)))
    out = {"images": count, "pixels_changing_cluster_float16": float(np.mean(moved)),
           "max_pixels_changing_cluster_float16": float(np.max(moved)),
           "labels_agree_float16_vs_float32": float(np.mean(agree)),
           "mean_iou_float32": float(np.mean(iou32)), "mean_iou_float16": float(np.mean(iou16))}
    print("shapes", out, flush=True)

    # interactive rules, refinement settings equal (the shapes model's own): boxes and points
    from iseg.interactive import interactive_defaults

    own = interactive_defaults(seg)
    ref_seg = iseg.ISeg(pipe, reference="interactive", **own)
    box_default, box_ref, box_agree, pt_default, pt_ref, pt_agree, cells = [], [], [], [], [], [], []
    for s in samples[: max(1, count // 2)]:
        for name in s.classes:
            gt = s.mask == CLASSES.index(name) + 1
            ys, xs = np.nonzero(gt)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)  # the object pixel nearest its centroid
            point = [(xs[k] + 0.5, ys[k] + 0.5)]
            a = seg.segment_prompt(s.image, box=box)
            b = ref_seg.segment_prompt(s.image, box=box, **own)
            side = int(a.maps.shape[-1])
            geometry = iseg.images.Geometry(*gt.shape, "stretch")
            cells.append((int(iseg.interactive.box_cells(box, geometry, side).sum()),
                          int(REF.box_cells(box, geometry, side).sum())))
            box_default.append(float((a.mask & gt).sum() / max(1, (a.mask | gt).sum())))
            box_ref.append(float((b.mask & gt).sum() / max(1, (b.mask | gt).sum())))
            box_agree.append(_agree(a.mask, b.mask))
            a = seg.segment_prompt(s.image, points=point)
            b = ref_seg.segment_prompt(s.image, points=point, **own)
            pt_default.append(float((a.mask & gt).sum() / max(1, (a.mask | gt).sum())))
            pt_ref.append(float((b.mask & gt).sum() / max(1, (b.mask | gt).sum())))
            pt_agree.append(_agree(a.mask, b.mask))
    out["interactive"] = {
        "objects": len(box_agree), "refinement": {k: v for k, v in own.items()},
        "box_cells_default_vs_reference": [int(np.sum([c[0] for c in cells])), int(np.sum([c[1] for c in cells]))],
        "box_iou_default": float(np.mean(box_default)), "box_iou_reference": float(np.mean(box_ref)),
        "box_mask_agree": float(np.mean(box_agree)),
        "point_iou_default": float(np.mean(pt_default)), "point_iou_reference": float(np.mean(pt_ref)),
        "point_mask_agree": float(np.mean(pt_agree)),
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=9, help="synthetic images per preset on the tiny model")
    p.add_argument("--shapes", type=int, default=40, help="shapes test images")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    result = {"tiny_sd_random_weights": tiny(args.images), "shapes": shapes(args.shapes)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        if args.out.exists():
            raise SystemExit(f"{args.out} exists; give another --out")
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
