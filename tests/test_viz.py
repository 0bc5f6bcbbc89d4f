"""Figures a learner can read (issue #30): every class of an overlay reads as its own legend colour,
every figure the library makes fits a 968 px notebook output area with its legend and colour bar
inside, and layer columns are titled by name and ordered down, mid, up."""

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import iseg  # noqa: E402
from iseg import viz
from iseg.course import explore  # noqa: E402
from iseg.shapes import CLASSES, SPLITS, sample  # noqa: E402


@pytest.fixture(scope="module")
def seg(shapes_pipe):
    return iseg.ISeg(shapes_pipe)


def _multi_object(count):
    found, i = [], SPLITS["test"].start
    while len(found) < count:
        s = sample(i)
        if len(s.classes) >= 2:
            found.append(s)
        i += 1
    return found


def test_overlay_colours_are_nearest_their_own_legend_swatch():
    swatches = viz.palette(len(CLASSES) + 1).astype(float)
    checked = 0
    for s in _multi_object(40):
        # label k = the k-th class of the image, as segment numbers them; the legend shows swatch k
        labels = np.zeros(s.mask.shape, np.int64)
        for k, name in enumerate(s.classes, start=1):
            labels[s.mask == CLASSES.index(name) + 1] = k
        drawn = np.asarray(viz.overlay(s.image, labels)).astype(float)
        legend = swatches[: len(s.classes) + 1]
        for k in range(1, len(s.classes) + 1):
            pixels = drawn[labels == k]
            nearest = ((pixels[:, None, :] - legend[None]) ** 2).sum(-1).argmin(1)
            assert (nearest == k).mean() > 0.99, (s.classes, k, (nearest == k).mean())
            checked += 1
    assert checked > 80
    # the old blend (alpha 0.5) fails this: a blue square labelled dark red read as the purple swatch
    blue = np.full((4, 4, 3), (40, 80, 220), np.uint8)
    old = np.asarray(viz.overlay(blue, np.ones((4, 4), np.int64), alpha=0.5)).astype(float)[0, 0]
    assert ((swatches[:6] - old) ** 2).sum(-1).argmin() != 1


def _inside(fig):
    """Every legend, colour bar and title inside the figure's pixels; the figure within 968 px."""
    fig.canvas.draw()
    width, height = fig.bbox.width, fig.bbox.height
    assert width <= 968, f"figure is {width:.0f} px wide"
    renderer = fig.canvas.get_renderer()
    parts = list(fig.legends) + [a for ax in fig.axes for a in ([ax.get_legend()] if ax.get_legend() else [])]
    parts += [ax for ax in fig.axes] + [ax.title for ax in fig.axes if ax.get_title()]
    for part in parts:
        box = part.get_window_extent(renderer)
        assert box.x0 >= -2 and box.x1 <= width + 2 and box.y0 >= -2 and box.y1 <= height + 2, (type(part), box, width)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_library_figures_fit_968_px_with_legend_and_colour_bar(seg):
    import matplotlib.pyplot as plt

    s = _multi_object(1)[0]
    many = ["circle", "square", "triangle", "star", "heart", "cross"]
    result = seg.segment(s.image, many)
    _inside(viz.show_result(result))
    _inside(viz.iteration_grid(result, steps=(0, 1, 2, 3, 4, 5)))
    _inside(viz.compare_grid({"a": result, "b": result}, steps=(1, 2, 3, 4, 5)))
    trace = seg.trace(s.image, list(s.classes), kind="cross")
    _inside(viz.layer_grid(trace))
    for view in (explore.SelfAttentionView(seg, s.image, list(s.classes)), explore.GammaView(seg, s.image, many),
                 explore.RefinementView(seg, s.image, list(s.classes)), explore.ExampleView(seg, 1)):
        _inside(view.fig)
    plt.close("all")


def test_layer_columns_are_named_and_ordered_down_mid_up(seg):
    s = _multi_object(1)[0]
    trace = seg.trace(s.image, list(s.classes), kind="cross")
    fig = viz.layer_grid(trace, shared_scale=False)
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_title()]
    stages = [t.split()[0] for t in titles]
    assert stages == sorted(stages, key=["down", "mid", "up"].index) and {"down", "mid", "up"} <= set(stages)
    assert titles[0] == "down 0.0" and "mid" in titles
    assert all("r=" in ax.get_title() for ax in fig.axes if ax.get_title())  # each column says its grid
    assert fig.axes[-1].get_ylabel() == "each panel: its own scale (0 to its max)"
    assert viz.layer_title("transformer_blocks.3.attn:text") == "block 3"
    assert viz.layer_title("up_blocks.2.attentions.1.transformer_blocks.4.attn2") == "up 2.1 t4"
