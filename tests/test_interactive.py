"""Interactive prompts (method.md §7): grid cells, cached forward passes, accuracy on shapes."""

import numpy as np
import pytest

import iseg
from iseg.images import Geometry
from iseg.interactive import box_cells, line_cells, point_cells
from iseg.shapes import CLASSES, SPLITS, sample

G = Geometry(64, 64, "stretch")


def test_point_cells_follow_floor_of_grid_coordinates():
    # (x, y) = (10, 20) on a 64x64 image and a 16x16 grid -> row 5, column 2
    assert point_cells([(10, 20)], G, 16) == [5 * 16 + 2]
    assert point_cells((63.9, 0), G, 16) == [15]  # one bare pair is one point
    wide = Geometry(32, 128, "stretch")
    assert point_cells([(127, 31)], wide, 16) == [15 * 16 + 15]
    padded = Geometry(32, 128, "pad")  # the square is 128x128: the image fills the top quarter
    assert point_cells([(127, 31)], padded, 16) == [3 * 16 + 15]


def test_line_cells_visit_every_cell_once_in_order():
    cells = line_cells([(0, 2), (63, 2)], G, 16)
    assert cells == list(range(16))  # a horizontal stroke along row 0
    assert line_cells([(5, 5)], G, 16) == [16 + 1]


def test_box_cells():
    grid = box_cells((8, 4, 24, 12), G, 16).reshape(16, 16)
    assert grid.sum() == 4 * 2 and grid[1:3, 2:6].all()


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(points=[(70, 5)]), "outside the 64x64 image"),
     (dict(points=[]), "points is empty"),
     (dict(line=[]), "line is empty"),
     (dict(box=(10, 10, 10, 20)), "degenerate box"),
     (dict(box=(10, 10, 80, 20)), "outside"),
     (dict(text=" ; "), "text prompt is empty"),
     (dict(points=[(5, 5)], box=(0, 0, 10, 10)), "exactly one kind"),
     ({}, "exactly one kind")],
)
def test_bad_prompts(shapes_pipe, kwargs, match):
    seg = iseg.ISeg(shapes_pipe)
    with pytest.raises(ValueError, match=match):
        seg.segment_prompt(sample(0).image, **kwargs)


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)  # the object pixel nearest its centroid
    return xs[k] + 0.5, ys[k] + 0.5


def test_unet_runs_once_for_several_prompts_on_one_image(shapes_pipe):
    seg = iseg.ISeg(shapes_pipe)
    s = next(sample(seed) for seed in range(100) if len(sample(seed).classes) >= 2)
    first = s.mask == CLASSES.index(s.classes[0]) + 1
    second = s.mask == CLASSES.index(s.classes[1]) + 1
    ys, xs = np.nonzero(second)
    calls = []
    hook = shapes_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        a = seg.segment_prompt(s.image, points=[_centroid(first)])
        b = seg.segment_prompt(s.image, points=[_centroid(first), _centroid(second)])
        c = seg.segment_prompt(s.image, box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        d = seg.segment_prompt(s.image, line=[(5, 50), (60, 50)])
    finally:
        hook.remove()
    assert len(calls) == 1
    assert a.mask.shape == (64, 64) and a.mask.dtype == bool
    assert a.maps.shape == (6, 32, 32)  # the shapes model's interactive preset: 5 iterations, on the 32x32 latent grid
    assert a.mask[first].mean() > 0.5 and c.mask[second].mean() > 0.5  # each prompt selects its own object
    assert b.mask[first].mean() > 0.3 and b.mask[second].mean() > 0.3  # two points: both objects
    assert b.initial.max() == 0.5 and d.initial.sum() > 0


def _fixed_multi_object(count: int = 20) -> list:
    out, seed = [], SPLITS["test"].start
    while len(out) < count:
        s = sample(seed)
        if len(s.classes) >= 2:
            out.append(s)
        seed += 1
    return out


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_accuracy_on_20_multi_object_shapes_images(shapes_pipe):
    # every object of 20 fixed multi-object test images (49 objects). Measured on this project's CPU
    # with the shapes model's interactive preset: text mean IoU 0.820, IoU > 0.5 on 91.8% of objects
    # (0.577 / 59.2% with bare words and the demo's lam 0.1, N 50); point 0.888, box 0.888 (0.795,
    # 0.774). Bars: text >= 0.75 and >= 85%; points and boxes at least their earlier level.
    seg = iseg.ISeg(shapes_pipe)
    ious = {"point": [], "box": [], "text": []}
    for s in _fixed_multi_object():
        for name in s.classes:
            gt = s.mask == CLASSES.index(name) + 1
            ys, xs = np.nonzero(gt)
            ious["point"].append(_iou(seg.segment_prompt(s.image, points=[_centroid(gt)]).mask, gt))
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            ious["box"].append(_iou(seg.segment_prompt(s.image, box=box).mask, gt))
            ious["text"].append(_iou(seg.segment_prompt(s.image, text=name).mask, gt))
    assert len(ious["text"]) == 49
    means = {k: float(np.mean(v)) for k, v in ious.items()}
    hits = {k: float(np.mean(np.array(v) > 0.5)) for k, v in ious.items()}
    assert means["text"] >= 0.75 and hits["text"] >= 0.85, (means, hits)
    assert means["point"] >= 0.79 and means["box"] >= 0.77, means


def test_text_prompts_use_the_model_prompt_template(shapes_pipe, tiny_pipe):
    from iseg.interactive import interactive_defaults, text_prompt

    seg = iseg.ISeg(shapes_pipe)
    p = text_prompt(seg, "cross")
    assert p.text == "a cross" and p.classes == ("cross",)
    assert shapes_pipe.tokenizer.convert_ids_to_tokens([p.input_ids[i] for i in p.spans[0]]) == ["cross</w>"]
    # an article the template already has is not repeated; several descriptions share one prompt
    two = text_prompt(seg, "a circle; red star")
    assert two.text == "a circle and a red star" and two.classes == ("circle", "red star")
    assert [len(span) for span in two.spans] == [1, 2]
    # no prefix: the reference demo's bare descriptions
    assert text_prompt(seg, "cross", seg.with_settings(prompt_prefix="")).text == "cross"
    # the shapes model's own interactive values; any other model gets the reference demo's
    assert interactive_defaults(seg) == dict(lam=100.0, iterations=5, clamp_max=None, threshold=0.7, clustering=False)
    sd_like = iseg.ISeg(tiny_pipe)
    assert interactive_defaults(sd_like) == dict(lam=0.1, iterations=50, clamp_max=1.0, threshold=0.5, clustering=False)
    # what the user gave ISeg by hand wins over the interactive preset; the rest stays the preset's
    mine = iseg.ISeg(shapes_pipe, lam=5.0, iterations=3)
    assert interactive_defaults(mine) == dict(lam=5.0, iterations=3, clamp_max=None, threshold=0.7, clustering=False)
    assert mine.prompt_session(sample(8).image).settings.lam == 5.0
    assert iseg.ISeg(shapes_pipe, preset="shapes").hand_set == frozenset()
    # the checked value, and the current one when settings are replaced later
    assert interactive_defaults(iseg.ISeg(shapes_pipe, clustering="no"))["clustering"] is False
    mine.settings = mine.with_settings(lam=1.0)
    assert interactive_defaults(mine)["lam"] == 1.0
    assert seg.segment_prompt(sample(8).image, text="cross", iterations=2).maps.shape[0] == 3  # overrides win
