"""Command line: ``iseg segment IMAGE... --classes cat,dog --out DIR``.

Writes, per image, the label map as a palette PNG (``NAME.labels.png``, pixel value = label),
an overlay (``NAME.overlay.png``), the per-iteration animation (``NAME.iterations.gif``) and a
JSON file with the prompt, the classes, the settings and the timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["main"]


def _classes_for(images: list[Path], classes: str | None, classes_file: Path | None) -> list[list[str]]:
    if (classes is None) == (classes_file is None):
        raise SystemExit("give the class names with --classes a,b,c or --classes-file FILE.json (one of the two)")
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
        return [names] * len(images)
    table = json.loads(Path(classes_file).read_text())
    out = []
    for img in images:
        key = next((k for k in (str(img), img.name, img.stem) if k in table), None)
        if key is None:
            raise SystemExit(f"{classes_file} has no classes for {img.name} (keys are file names)")
        out.append(list(table[key]))
    return out


def segment_command(args) -> int:
    from . import ISeg, load_pipeline
    from .presets import parse_overrides
    from .viz import iteration_frames, label_png, save_gif

    images = [Path(p) for p in args.images]
    per_image = _classes_for(images, args.classes, args.classes_file)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device=args.device)
    seg = ISeg(pipe, preset=args.preset, **parse_overrides(args.set))
    print(f"iseg: {seg}", file=sys.stderr)
    for path, names in tqdm(list(zip(images, per_image)), desc="segment", unit="img"):
        t0 = time.perf_counter()
        result = seg.segment(path, names)
        stem = out / path.stem
        label_png(result.labels).save(f"{stem}.labels.png")
        result.overlay().save(f"{stem}.overlay.png")
        if args.gif:
            save_gif(iteration_frames(result), f"{stem}.iterations.gif")
        record = {
            "image": str(path),
            "model": getattr(pipe, "iseg_model_name", None),
            "preset": seg.preset,
            "classes": list(result.classes),
            "labels": {str(i + 1): c for i, c in enumerate(result.classes)},
            "prompt": result.prompt,
            "token_spans": [list(s) for s in result.token_spans],
            "pixels": {c: int((result.labels == i + 1).sum()) for i, c in enumerate(result.classes)},
            "settings": result.settings.as_dict(),
            "timing": dict(result.timing, wall_s=time.perf_counter() - t0),
        }
        Path(f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(f"iseg: wrote {len(images)} result(s) to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iseg", description="Training-free segmentation with the iSeg method.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment images into named classes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("images", nargs="+", help="image files")
    s.add_argument("--classes", help="comma-separated class names for every image, e.g. cat,dog")
    s.add_argument("--classes-file", type=Path, help="JSON file {image file name: [class, ...]}")
    s.add_argument("--model", default="auto", help="hub id, local folder, 'shapes' or 'auto' (default)")
    s.add_argument("--preset", default=None, help="wsss-voc, wsss-coco, ovs-voc, ovs-context, ovs-coco, interactive, shapes")
    s.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override settings, e.g. --set lam=0.1 iterations=5")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    s.add_argument("--out", default="iseg-out", help="output folder (default: iseg-out)")
    s.add_argument("--no-gif", dest="gif", action="store_false", help="skip the per-iteration animation")
    s.set_defaults(func=segment_command)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"iseg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
