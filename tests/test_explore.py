"""Every notebook widget calls a view's ``update``; changing a value must change the figure's data."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import iseg  # noqa: E402
from iseg import explore  # noqa: E402
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
