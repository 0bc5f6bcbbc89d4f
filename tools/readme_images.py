"""Make the README's pictures again: docs/quickstart.png and docs/refinement.gif.

    python tools/readme_images.py            # writes both into docs/

Both come from notebook 00's example (the shapes model, test image 8) with the library's own
drawing functions, so they look as the course does: ``result.show()`` (image, labels with the
legend, each class's map with the colour bar) and the GIF of the mask after every refinement step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import iseg
    from iseg.course.examples import example
    from iseg.viz import iteration_frames, save_gif

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    model = iseg.load_model("shapes", device="cpu", verbose=False)
    seg = iseg.ISeg(model)
    image, classes = example(model, 8)
    result = seg.segment(image, classes)
    args.out.mkdir(parents=True, exist_ok=True)
    fig = result.show()
    fig.savefig(args.out / "quickstart.png", dpi=100)
    save_gif(iteration_frames(result), args.out / "refinement.gif", min_side=192)
    print(f"wrote {args.out / 'quickstart.png'} ({fig.bbox.width:.0f} px wide) and {args.out / 'refinement.gif'}")


if __name__ == "__main__":
    main()
