"""Every notebook widget calls a view's ``update``; changing a value must change the figure's data."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import iseg  # noqa: E402
from iseg.course import explore  # noqa: E402
from iseg.course.examples import example  # noqa: E402
from iseg.shapes import SPLITS, sample  # noqa: E402


@pytest.fixture(scope="module")
def seg(shapes_pipe):
    return iseg.ISeg(shapes_pipe)


@pytest.fixture(scope="module")
def shape():
    return sample(SPLITS["test"].start + 2)


def _data(im):
    return np.array(im.get_array(), dtype=float).copy()


def test_example_view_index(seg):  # notebook 00
    view = explore.ExampleView(seg, index=0)
    before = _data(view.im_over)
    view.update(index=3)
    assert not np.array_equal(before, _data(view.im_over))
    assert view.widget().children  # the ipywidgets controls exist


def test_cross_attention_view_token_head_and_timestep(seg, shape):  # notebook 01
    view = explore.CrossAttentionView(seg, shape.image, shape.classes)
    first, second = view.tokens[1][1], view.tokens[2][1]  # 'a' and the first class word
    a = view.update(token=first).copy()
    b = view.update(token=second)
    assert not np.allclose(a, b, rtol=1e-3, atol=0)
    assert np.array_equal(_data(view.im), b)
    c = view.update(head=0)
    d = view.update(timestep=800)
    assert not np.allclose(c, d, rtol=1e-3, atol=0)


def test_self_attention_view_lam_and_click(seg, shape):  # notebook 02
    view = explore.SelfAttentionView(seg, shape.image, shape.classes, lam=0.0)
    p0 = _data(view.im_p)
    view.update(lam=0.5)
    assert not np.allclose(p0, _data(view.im_p))
    row_before = _data(view.im_row)
    h, w = view.obs.image.shape[:2]
    event = SimpleNamespace(inaxes=view.ax_img, xdata=w * 0.1, ydata=h * 0.9)
    view.on_click(event)
    assert view.pixel == (int(0.9 * view.side), int(0.1 * view.side))
    assert not np.allclose(row_before, _data(view.im_row))


def test_refinement_view_iterations(seg, shape):  # notebook 03
    view = explore.RefinementView(seg, shape.image, shape.classes)
    raw = view.update(iterations=0).copy()
    over_raw = _data(view.im_over)
    refined = view.update(iterations=10)
    assert not np.array_equal(raw, refined)
    assert not np.array_equal(over_raw, _data(view.im_over))
    # raw maps are labelled at the model's own raw rule (bg_power 5 on shapes), refined ones at the preset's
    r = view.result(view.state["lam"])
    assert seg.model.raw_bg_power == 5.0
    assert np.array_equal(raw, r.labels_at(0, 5.0)) and not np.array_equal(raw, r.labels_at(0))
    assert np.array_equal(refined, r.labels_at(10))
    view.update(iterations=0)
    assert "bg_power 5" in view.ax_over.get_title()


def test_gamma_view(seg, shape):  # notebook 04
    view = explore.GammaView(seg, shape.image, shape.classes)
    before = [_data(im) for im in view.im_maps]
    view.update(gamma=3.0)
    after = [_data(im) for im in view.im_maps]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_generation_view_seed(seg):  # notebook 05
    view = explore.GenerationView(seg, "a red star and a blue circle", ["star", "circle"], seed=0, steps=5)
    before = _data(view.im_img)
    view.update(seed=3)
    assert not np.array_equal(before, _data(view.im_img))


def test_lam_slider_keeps_every_preset_value():
    from iseg.presets import PRESETS

    pytest.importorskip("ipywidgets")
    for lam in [p["lam"] for p in PRESETS.values() if "lam" in p] + [30.0, 0.002]:
        assert explore.lam_slider(lam).value == pytest.approx(lam)
    assert explore.lam_slider(0.0).value == pytest.approx(1e-3)  # a log slider cannot show 0: its lowest value


def test_compare_view_iterations_and_image(seg):  # notebook 10
    other = iseg.ISeg(seg.model, lam=0.1)  # a second "model": the same weights, another preset value
    view = explore.CompareView({"preset": seg, "lam 0.1": other}, index=3, max_iterations=5)
    refined = view.update(iterations=5)
    pictures = [_data(im) for im in view.im_over]
    raw = view.update(iterations=0)
    assert all(not np.array_equal(a, _data(im)) for a, im in zip(pictures, view.im_over))
    image, classes = example(seg, 3)
    expected = seg.segment(image, classes, iterations=5)
    assert np.array_equal(refined["preset"], expected.labels)
    assert np.array_equal(raw["preset"], expected.labels_at(0, seg.model.raw_bg_power))  # raw at its own rule
    assert not np.array_equal(refined["preset"], refined["lam 0.1"])
    before = _data(view.im_map[0])
    view.update(index=4)
    assert not np.array_equal(before, _data(view.im_map[0]))
    assert view.axes[1, 0].get_title() == "lam 0.1: labels, N=0"
    with pytest.raises(ValueError, match="at least one model"):
        explore.CompareView({})


def test_compare_grid_and_iteration_curves(seg, shape):
    from iseg.shapes.evaluate import iteration_curve
    from iseg.viz import compare_grid, plot_iteration_curves

    r = seg.segment(shape.image, shape.classes, iterations=5)
    fig = compare_grid({"a": r, "b": r}, steps=(1, 5), cls=0)
    assert len(fig.axes) >= 8  # 2 rows x 4 panels (and a colour bar)
    assert np.array_equal(fig.axes[0].images[0].get_array(), r.scores(0)[0])
    assert fig.axes[1].get_title() == f"{r.classes[0]}: N=5"
    with pytest.raises(ValueError, match="cls=3 is not a class index"):
        compare_grid({"a": r}, steps=(1,), cls=3)
    with pytest.raises(ValueError, match="steps ask for 9"):
        compare_grid({"a": r}, steps=(9,))
    report = {"timesteps": {"100": {"miou": {"100.0": {"0": 30.0, "1": 80.0, "5": 85.0}},
                                    "miou_by_bg_power": {"5.0": {"100.0": {"0": 70.0, "1": 60.0}}}}}}
    curve, raw = iteration_curve(report, 100.0, 5.0)
    assert curve == {0: 30.0, 1: 80.0, 5: 85.0} and raw == 70.0
    assert iteration_curve(report, 100.0)[1] is None and iteration_curve(report, 100.0, 2.0)[1] is None
    ax = plot_iteration_curves({"m": {k: v for k, v in curve.items() if k > 0}}, {"m": raw})
    xs, ys = ax.lines[0].get_data()
    assert list(xs) == [1, 5] and list(ys) == [80.0, 85.0] and list(ax.lines[1].get_data()[1]) == [70.0]
