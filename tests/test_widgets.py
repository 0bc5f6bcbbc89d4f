"""The interactive widget driven with synthetic mouse events."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import iseg  # noqa: E402
from iseg.course.widgets import PromptWidget  # noqa: E402
from iseg.shapes import CLASSES, sample  # noqa: E402


@pytest.fixture(scope="module")
def widget(shapes_pipe):
    s = next(sample(seed) for seed in range(100) if len(sample(seed).classes) >= 2)
    w = PromptWidget(iseg.ISeg(shapes_pipe), s.image)
    w.sample = s
    return w


def _event(w, x, y):
    return SimpleNamespace(inaxes=w.ax, xdata=x, ydata=y, button=1)


def _centre(mask):
    ys, xs = np.nonzero(mask)
    k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return xs[k] + 0.5, ys[k] + 0.5


def _mask(w):
    return np.asarray(w.mask_artist.get_array())[..., 3] > 0


def test_click_updates_the_mask(widget):
    widget.clear()
    widget.mode.value = "point"
    obj = widget.sample.mask == CLASSES.index(widget.sample.classes[0]) + 1
    assert not _mask(widget).any()
    widget.on_press(_event(widget, *_centre(obj)))
    shown = _mask(widget)
    assert shown.any() and (shown & obj).sum() / obj.sum() > 0.5
    widget.on_press(SimpleNamespace(inaxes=None, xdata=None, ydata=None, button=1))  # outside: ignored
    assert np.array_equal(shown, _mask(widget))


def test_box_drag_and_line_stroke(widget):
    widget.clear()
    second = widget.sample.mask == CLASSES.index(widget.sample.classes[1]) + 1
    ys, xs = np.nonzero(second)
    widget.mode.value = "box"
    widget.on_press(_event(widget, xs.min(), ys.min()))
    widget.on_release(_event(widget, xs.max(), ys.max()))
    assert (_mask(widget) & second).sum() / second.sum() > 0.5
    widget.clear()
    widget.mode.value = "line"
    cx, cy = _centre(second)
    widget.on_press(_event(widget, cx - 2, cy))
    widget.on_move(_event(widget, cx, cy))
    widget.on_release(_event(widget, cx + 2, cy))
    assert widget.result.kind == "line" and (_mask(widget) & second).any()


def test_text_and_sliders(widget):
    widget.clear()
    widget.mode.value = "text"
    widget.text.value = widget.sample.classes[0]
    widget.run()
    before = _mask(widget).sum()
    widget.threshold.value = 0.9  # a slider change re-runs the refinement
    assert _mask(widget).sum() <= before
    widget.text.value = ""
    assert widget.run() is None  # nothing to segment yet
    assert widget.show().children


def test_upload_replaces_the_image(widget):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(buf, format="PNG")
    widget._on_upload({"new": ({"name": "red.png", "content": memoryview(buf.getvalue())},)})
    assert widget.array.shape == (30, 40, 3) and widget.result is None
    assert np.asarray(widget.image_artist.get_array()).shape == (30, 40, 3)
    widget.mode.value = "point"
    widget.on_press(_event(widget, 20, 15))
    assert widget.result.mask.shape == (30, 40)
    widget.set_image(widget.sample.image)  # leave the shared widget as the other tests expect


def test_sliders_start_at_hand_set_values_outside_their_usual_range(shapes_pipe):
    w = PromptWidget(iseg.ISeg(shapes_pipe, iterations=200, threshold=0.99, lam=1000.0), sample(8).image)
    assert (w.iterations.value, w.threshold.value, w.lam.value) == (200, 0.99, 1000.0)


def test_the_text_placeholder_names_words_of_the_models_world(shapes_pipe):
    """(Run on the fake GPU too, by test_device_discipline; a photo model's placeholder: test_course_api.)"""
    w = PromptWidget(iseg.ISeg(shapes_pipe))
    assert w.status.value == "click the image, or type and press Segment"   # not "prompts cleared" before any
    from iseg.course.examples import example

    words = example(shapes_pipe, 0)[1][:2]   # the shapes world's words (example 0 has one object)
    assert w.text.placeholder == "; ".join(f"a {c}" for c in words) and all(c in CLASSES for c in words)
