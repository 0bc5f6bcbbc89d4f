"""How often the shapes model binds a prompt's colours to its shapes when it generates.

    python bench/colour_binding.py --seeds 50          # writes data/results/colour_binding.json

For each seed, ``iseg.course.explore.generate`` draws "a red star and a blue circle" (30 DDIM steps,
guidance 4, the notebooks' call) and ``seg.segment(image, ["star", "circle"])`` labels it with the
shapes preset. A seed *drew both colours* when it has more than 50 red and more than 50 blue pixels
(the colour tests of notebook 06); it *bound them* when most red pixels are labelled "star" and most
blue pixels "circle". Notebook 06 prints the counts from the JSON this script writes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROMPT = "a red star and a blue circle"
CLASSES = ["star", "circle"]
OUT = Path(__file__).resolve().parent.parent / "data" / "results" / "colour_binding.json"


def colour_masks(image) -> tuple[np.ndarray, np.ndarray]:
    """Red and blue pixels of a generated image (the thresholds notebook 06 uses)."""
    rgb = np.asarray(image).astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110)
    blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 110) & (rgb[..., 1] < 150)
    return red, blue


def measure(seg, seed: int) -> dict:
    from iseg.course.explore import generate

    image = generate(seg.model.pipe, PROMPT, seed=seed)
    labels = seg.segment(image, CLASSES).labels
    red, blue = colour_masks(image)
    row = {"seed": seed, "red_pixels": int(red.sum()), "blue_pixels": int(blue.sum())}
    row["both_colours"] = row["red_pixels"] > 50 and row["blue_pixels"] > 50
    row["star_on_red"] = round(float((labels[red] == 1).mean()), 3) if red.any() else 0.0
    row["circle_on_blue"] = round(float((labels[blue] == 2).mean()), 3) if blue.any() else 0.0
    row["bound"] = row["both_colours"] and row["star_on_red"] > 0.5 and row["circle_on_blue"] > 0.5
    return row


def main(argv=None):
    import iseg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=50, help="seeds 0 .. SEEDS-1")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    seg = iseg.ISeg(iseg.load_model("shapes", device="cpu"))
    t0 = time.perf_counter()
    rows = [measure(seg, s) for s in range(args.seeds)]
    drew = [r for r in rows if r["both_colours"]]
    report = {
        "prompt": PROMPT, "classes": CLASSES, "model": "shapes", "preset": seg.preset,
        "generation": {"steps": 30, "guidance": 4.0}, "seeds": args.seeds,
        "drew_both_colours": len(drew), "bound": sum(r["bound"] for r in drew),
        "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['bound']} of {report['drew_both_colours']} seeds that drew both colours bound them "
          f"('star' on red, 'circle' on blue); {args.seeds} seeds in {report['seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
