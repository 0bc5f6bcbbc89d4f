"""Pictures of what iSeg computes: palettes, overlays, heat maps, per-iteration grids, GIFs."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import numpy as np
from PIL import Image

from .backbones import layer_order, layer_title
from .images import to_uint8

__all__ = ["MAP_CMAP", "OVERLAY_ALPHA", "MAX_FIGURE_PX", "fit_figsize", "panels_per_row", "layer_order", "layer_title", "layer_grid",
           "palette", "colorize", "overlay", "label_png", "label_legend", "iteration_frames",
           "iteration_grid", "save_gif", "show_result", "plot_class_iou", "show_predictions", "plot_label_evidence",
           "compare_grid", "plot_iteration_curves"]

# Maps are shown in a perceptually uniform colour map: equal steps in value look like equal steps
# in colour, which "jet" does not give (its bright bands read as edges that are not in the data).
MAP_CMAP = "viridis"


#: the widest figure the library makes, in pixels at matplotlib's 100 dpi: the output area of a
#: notebook in JupyterLab at 1400x1000 with the file browser open is 968 px wide
MAX_FIGURE_PX = 960


def panels_per_row(panels: int, most: int = 5) -> int:
    """How many panels of a figure share a row: all of them up to ``most``, else as evenly as
    rows of at most ``most`` allow (a figure scaled to ``MAX_FIGURE_PX`` keeps panels readable)."""
    rows = -(-panels // most)
    return max(1, -(-panels // rows))


def fit_figsize(width: float, height: float, dpi: float = 100.0, max_px: int = MAX_FIGURE_PX) -> tuple[float, float]:
    """``(width, height)`` in inches scaled down, keeping the aspect, so the figure is at most
    ``max_px`` pixels wide (legend and colour bar included, as they sit inside the figure)."""
    scale = min(1.0, max_px / (width * dpi))
    return width * scale, height * scale


def layer_grid(trace, classes: Sequence[str] | None = None, kind: str = "cross", shared_scale: bool = True,
               panel: float = 1.5, max_columns: int | None = None):
    """Each class word's map in every captured layer of ``trace`` (``ISeg.trace``): a row per class,
    a column per layer, columns titled by layer name and resolution and ordered down, mid, up.

    Layers of several resolutions are drawn at one size (a coarse map is enlarged; the titles give
    each grid ``r``). ``shared_scale``: one colour scale for every panel (values comparable), else
    each panel's own (the colour bar then reads "each panel: its own scale"). Rows wrap so the
    figure fits ``MAX_FIGURE_PX``. Returns the figure.
    """
    import matplotlib.pyplot as plt

    if kind != "cross":
        raise ValueError("layer_grid draws the class words' cross-attention maps (kind='cross')")
    classes = list(trace.prompt.classes if classes is None else classes)
    layers = sorted(trace.layers(kind), key=lambda layer: layer_order(layer.name))
    if not layers:
        raise ValueError(f"the trace holds no {kind}-attention layers; trace with kind={kind!r} or None")
    maps = {(c, layer.name): trace.class_map(layer.name, c) for c in classes for layer in layers}
    fit = max(1, int((MAX_FIGURE_PX / 100 - 1.2) // panel) - 1)
    per_row = min(len(layers), max_columns or fit)
    blocks = -(-len(layers) // per_row)  # rows of layers; each holds a row per class
    rows = blocks * len(classes)
    width, height = fit_figsize(panel * (per_row + 1) + 1.2, panel * rows + (0.7 if rows == 1 else 0.4))
    with plt.ioff():
        fig, axes = plt.subplots(rows, per_row + 1, figsize=(width, height), squeeze=False, layout="constrained")
    top = max(float(m.max()) for m in maps.values())
    im = None
    for b in range(blocks):
        chunk = layers[b * per_row:(b + 1) * per_row]
        for ci, c in enumerate(classes):
            row = b * len(classes) + ci
            axes[row, 0].imshow(trace.image)
            axes[row, 0].set_ylabel(c, fontsize=8)
            for col, layer in enumerate(chunk, start=1):
                m = maps[c, layer.name]
                im = axes[row, col].imshow(m, cmap=MAP_CMAP, vmin=0, vmax=top if shared_scale else float(m.max()))
                if ci == 0:
                    axes[row, col].set_title(f"{layer_title(layer.name)}\nr={m.shape[0]}", fontsize=7)
            for col in range(len(chunk) + 1, per_row + 1):
                axes[row, col].axis("off")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    label = "attention to the word" if shared_scale else "each panel: its own scale (0 to its max)"
    # small type: with one class the bar is one panel high, and a 10 pt label would run past its ends
    fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), fraction=0.02).set_label(label, fontsize=7 if rows == 1 else 8)
    return fig


def palette(count: int = 256) -> np.ndarray:
    """The PASCAL VOC colour palette, ``(count, 3)`` uint8: 0 black, 1 dark red, 2 green, ..., 255 cream."""
    out = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out[:count]


def colorize(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` labels to an ``(H, W, 3)`` uint8 picture in the VOC palette."""
    return palette()[np.asarray(labels).astype(np.int64) % 256]


def label_png(labels: np.ndarray) -> Image.Image:
    """A palette ("P" mode) PNG image whose pixel values are the labels, as VOC stores masks."""
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"palette PNGs hold labels 0..255, got {labels.min()}..{labels.max()}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette().reshape(-1).tolist())
    return img


def _rgb_uint8(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., :3]


#: how much of an overlay's colour is the label's own (the rest is the image). At 0.5 a blue object
#: labelled dark red looked purple, nearer another class's swatch than its own; from 0.75 every
#: object colour of the shapes world under every class colour is nearest its own legend swatch
#: (tests/test_viz.py), and 0.8 leaves a margin for photos.
OVERLAY_ALPHA = 0.8


def overlay(image, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The image with coloured labels blended over every non-background pixel; each class reads as
    its legend colour (``label_legend``) at the default ``alpha``; background pixels are the image."""
    if isinstance(alpha, bool) or not (isinstance(alpha, Real) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be a number from 0 (the image alone) to 1 (the label colours alone), got {alpha!r}")
    base = _rgb_uint8(image).astype(np.float32)
    labels = np.asarray(labels)
    if labels.shape != base.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {base.shape[:2]} differ in size")
    colour = colorize(labels).astype(np.float32)
    fg = (labels > 0)[..., None]
    out = np.where(fg, (1 - alpha) * base + alpha * colour, base)
    return Image.fromarray(out.round().astype(np.uint8))


def label_legend(where, classes: Sequence[str], background: bool = True, on_image: bool = True, **kwargs):
    """A legend naming the colour of every label of an overlay (0 background, k the k-th class).

    ``where`` is an axes (legend to its right) or a figure (legend outside, right; the figure
    should use ``layout="constrained"`` so that it makes room). ``on_image``: the labels are an
    ``overlay``, whose background shows the image (a hollow swatch); ``False`` for a ``colorize``d
    label map, whose background is black.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colours = palette(len(classes) + 1) / 255
    names = (["background"] if background else []) + list(classes)
    start = 0 if background else 1
    handles = [Patch(facecolor="none" if k == 0 and on_image else colours[k], edgecolor="grey",
                     label=f"{k}: {name}" + (" (the image)" if k == 0 and on_image else ""))
               for k, name in zip(range(start, len(classes) + 1), names)]
    if isinstance(where, Figure):
        # as many columns as it takes for the entries to fit the figure's height (a legend taller
        # than a short figure is cut off in the notebook)
        rows = max(1, int((where.get_figheight() * 72 - 8) // 14))
        options = dict(loc="outside right upper", fontsize=8, frameon=False, ncols=-(-len(handles) // rows))
    else:
        options = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, borderaxespad=0)
    options.update(kwargs)
    return where.legend(handles=handles, **options)


def iteration_frames(result, alpha: float = OVERLAY_ALPHA, iterations: Sequence[int] | None = None) -> list[Image.Image]:
    """One overlay per refinement iteration of a ``SegmentationResult``, each captioned."""
    from PIL import ImageDraw

    steps = range(result.iterations + 1) if iterations is None else iterations
    frames = []
    for i in steps:
        frame = result.overlay(alpha=alpha, iteration=i)
        # white with a dark edge: readable on light and dark images alike, and clear of the left border
        ImageDraw.Draw(frame).text((3, 2), f"iter {i}", fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
        frames.append(frame)
    return frames


def iteration_grid(result, steps: Sequence[int] = (0, 1, 2, 5, 10), cls: int = 0, size: float = 2.0):
    """A figure: labels after each of ``steps`` iterations (top) and class ``cls``'s map (bottom)."""
    import matplotlib.pyplot as plt

    steps = [n for n in steps if n <= result.iterations]
    fig, axes = plt.subplots(2, len(steps), figsize=fit_figsize(size * len(steps) + 1.6, 2.1 * size), squeeze=False,
                             layout="constrained")
    for col, n in enumerate(steps):
        axes[0, col].imshow(result.overlay(iteration=n))
        axes[0, col].set_title(f"N={n}", fontsize=9)
        im = axes[1, col].imshow(result.scores(n)[cls], cmap=MAP_CMAP, vmin=0, vmax=1)
    axes[1, 0].set_ylabel(f"{result.classes[cls]} map")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01)
    label_legend(fig, result.classes)
    return fig


def compare_grid(results, steps: Sequence[int] = (1, 2, 5), cls: int = 0, size: float = 2.0):
    """A figure comparing models on one image: a row per model (``results``: name ->
    ``SegmentationResult``), with class ``cls``'s raw cross-attention map (N = 0), its map after the
    last of ``steps``, and the labels after each of ``steps``."""
    import matplotlib.pyplot as plt

    results = dict(results)
    if not results:
        raise ValueError("compare_grid needs at least one result")
    last = max(steps)
    cols = 2 + len(steps)
    fig, axes = plt.subplots(len(results), cols, figsize=fit_figsize(size * cols + 1.6, size * len(results) + 0.3),
                             squeeze=False,
                             layout="constrained")
    im = None
    for row, (name, result) in enumerate(results.items()):
        if last > result.iterations:
            raise ValueError(f"{name}'s result has {result.iterations} iterations; steps ask for {last}")
        if not 0 <= cls < len(result.classes):
            raise ValueError(f"cls={cls} is not a class index of {name}'s result (classes {list(result.classes)})")
        name_cls = result.classes[cls]
        im = axes[row, 0].imshow(result.scores(0)[cls], cmap=MAP_CMAP, vmin=0, vmax=1)
        axes[row, 1].imshow(result.scores(last)[cls], cmap=MAP_CMAP, vmin=0, vmax=1)
        for col, n in enumerate(steps, start=2):
            axes[row, col].imshow(result.overlay(iteration=n))
        axes[row, 0].set_ylabel(name, fontsize=9)
        titles = [f"{name_cls}: cross-attn", f"{name_cls}: N={last}"] + [f"labels N={n}" for n in steps]
        for ax, title in zip(axes[row], titles):
            ax.set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[:, :2].ravel().tolist(), fraction=0.03, pad=0.01)
    label_legend(fig, next(iter(results.values())).classes)
    return fig


def plot_iteration_curves(curves, raw=None, ax=None):
    """mIoU against refinement iterations N, a line per model (``curves``: name -> {N: mIoU}); a
    star per model at N = 0 for its raw maps at their own label rule (``raw``: name -> mIoU)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    for name, curve in curves.items():
        ns = sorted(int(n) for n in curve)
        line, = ax.plot(ns, [curve[n] if n in curve else curve[str(n)] for n in ns], "o-", ms=3, label=name)
        if raw and name in raw:
            ax.plot([0], [raw[name]], "*", ms=11, color=line.get_color(), label=f"{name}, raw at its own rule")
    ax.set_xlabel("refinement iterations N")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def save_gif(frames: Sequence[Image.Image], path: str | Path, duration_ms: int = 250, min_side: int = 128) -> Path:
    """Write frames as a looping GIF (small images are enlarged so they are visible)."""
    if not frames:
        raise ValueError("no frames to write")
    w, h = frames[0].size
    scale = max(1, -(-min_side // min(w, h)))
    frames = [f.resize((w * scale, h * scale), Image.NEAREST) for f in frames]
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=duration_ms, loop=0)
    return path


def show_result(result, figsize_per: float = 2.4):
    """Image, overlay and each class's final map in one matplotlib figure; returns the figure.

    The panels wrap onto more rows where one row would be wider than ``MAX_FIGURE_PX``."""
    import matplotlib.pyplot as plt

    scores = result.scores()
    panels = 2 + len(result.classes)
    per_row = panels_per_row(panels)
    rows = -(-panels // per_row)
    fig, grid = plt.subplots(rows, per_row, figsize=fit_figsize(figsize_per * per_row + 1.8, (figsize_per + 0.3) * rows),
                             squeeze=False, layout="constrained")
    axes = list(grid.ravel())
    axes[0].imshow(result.image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(result.overlay())
    axes[1].set_title("labels", fontsize=9)
    im = None
    for ax, name, s in zip(axes[2:], result.classes, scores):
        im = ax.imshow(s, cmap=MAP_CMAP, vmin=0, vmax=1)
        ax.set_title(f"{name} map", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes[2:panels], fraction=0.03, pad=0.02)
    label_legend(fig, result.classes)
    return fig


def plot_class_iou(metrics: dict, ax=None, title: str | None = None):
    """Horizontal bars of the per-class IoU in an ``iseg eval`` metrics dict; classes absent from
    the ground truth and never predicted (IoU undefined) are left out. Returns the axes."""
    import matplotlib.pyplot as plt

    items = [(name, v) for name, v in metrics["iou_per_class"].items() if v is not None]
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 0.25 * len(items) + 0.8))
    names = [n for n, _ in items][::-1]
    values = [v for _, v in items][::-1]
    colours = palette(len(metrics["iou_per_class"]))
    index = {n: k for k, n in enumerate(metrics["iou_per_class"])}
    ax.barh(names, values, color=[colours[index[n]] / 255 if index[n] else (0.6, 0.6, 0.6) for n in names])
    ax.axvline(metrics["miou"], color="k", lw=1, ls="--", label=f"mIoU {metrics['miou']:.1f}")
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"{metrics['dataset']} {metrics['split']}: per-class IoU", fontsize=9)
    return ax


def show_predictions(dataset, run_dir, ids: Sequence[str], scores: dict | None = None, size: float = 2.0):
    """Image, ground truth and the saved pseudo-mask (``RUN/masks/<id>.png``) of each id, one row each."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig, axes = plt.subplots(len(ids), 3, figsize=fit_figsize(3 * size, size * len(ids)), squeeze=False)
    for row, i in zip(axes, ids):
        item = dataset.load(i)
        pred = np.array(Image.open(run_dir / "masks" / f"{i}.png"))
        gt = np.where(item.label == 255, 0, item.label)
        row[0].imshow(item.image)
        row[1].imshow(overlay(item.image, gt))
        row[2].imshow(overlay(item.image, pred))
        label = f"{i}" + (f"  mIoU {100 * scores[i]:.0f}" if scores and i in scores else "")
        row[0].set_title(label, fontsize=8)
        row[1].set_title("ground truth", fontsize=8)
        row[2].set_title("prediction", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return fig


def plot_label_evidence(evidence: dict, truth: Sequence[str] = (), chosen: Sequence[str] = (), thresholds=None, ax=None):
    """One image's evidence from ``iseg.labels.attention_evidence``: pixel share (bars) and relative
    peak (dots) per class; true classes in bold, chosen ones marked with a star. Returns the axes."""
    import matplotlib.pyplot as plt

    names = list(evidence)
    if ax is None:
        _, ax = plt.subplots(figsize=fit_figsize(0.6 * len(names) + 1.5, 2.4))
    x = np.arange(len(names))
    ax.bar(x, [evidence[c]["share"] for c in names], color="tab:blue", alpha=0.7, label="pixel share")
    ax2 = ax.twinx()
    ax2.plot(x, [evidence[c]["relative_peak"] for c in names], "o", color="tab:red", label="relative peak")
    ax2.set_ylim(0, 1.05)
    if thresholds is not None:
        ax.axhline(thresholds.min_share, color="tab:blue", lw=0.8, ls="--")
        ax2.axhline(thresholds.min_peak, color="tab:red", lw=0.8, ls="--")
    ax.set_xticks(x, [("* " if c in chosen else "") + c for c in names], rotation=45, ha="right", fontsize=8)
    for tick, c in zip(ax.get_xticklabels(), names):
        tick.set_fontweight("bold" if c in truth else "normal")
    ax.set_ylabel("pixel share", fontsize=8)
    ax2.set_ylabel("peak / best peak", fontsize=8)
    return ax
