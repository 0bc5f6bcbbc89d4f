"""Reading every kind of image input, and mapping maps back to the original pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from iseg.images import load_image, prepare, to_original


def test_modes_are_converted():
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 255
    assert load_image(Image.fromarray(rgb)).shape == (10, 12, 3)
    grey = load_image(Image.fromarray(np.full((10, 12), 128, np.uint8)))
    assert np.allclose(grey, 128 / 255)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white
    assert np.allclose(load_image(Image.fromarray(rgba, "RGBA")), 1.0)
    pal = Image.fromarray(rgb).convert("P")
    assert np.allclose(load_image(pal)[..., 0], 1.0)
    deep = Image.fromarray(np.full((10, 12), 65535, np.uint16))
    assert np.allclose(load_image(deep), 1.0)


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).shape == (20, 10, 3)


def test_arrays_and_tensors():
    assert load_image(np.full((9, 9), 0.5, np.float32)).shape == (9, 9, 3)
    assert np.allclose(load_image(np.full((9, 9, 3), 65535, np.uint16)), 1.0)
    t = torch.zeros(3, 9, 11)
    t[1] = 1.0
    arr = load_image(t)
    assert arr.shape == (9, 11, 3) and np.allclose(arr[..., 1], 1.0)


@pytest.mark.parametrize(
    "bad, error, match",
    [(np.zeros((1, 1, 3), np.uint8), ValueError, "1x1"),
     (np.full((9, 9, 3), np.nan, np.float32), ValueError, "NaN"),
     (np.zeros((9, 9, 5), np.uint8), ValueError, "5"),
     (np.full((9, 9, 3), 200.0), ValueError, r"\[0, 1\]"),
     ({"not": "an image"}, TypeError, "unsupported")],
)
def test_bad_inputs(bad, error, match):
    with pytest.raises(error, match=match):
        load_image(bad)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="corrupt"):
        load_image(broken)


@pytest.mark.parametrize("aspect", ["stretch", "pad"])
def test_maps_come_back_to_the_original_pixels(aspect):
    h, w = 30, 60
    arr = np.zeros((h, w, 3), np.float32)
    arr[:, : w // 2] = 1.0  # left half white
    x, geometry = prepare(arr, 32, aspect)
    assert x.shape == (3, 32, 32)
    # a map that marks the white pixels as the model sees them must map back onto the left half
    white = (x[0] > 0.5).float()
    back = to_original(white[None], geometry, 32)[0]
    assert back.shape == (h, w)
    assert (back[:, : w // 2 - 2] > 0.5).all() and (back[:, w // 2 + 2 :] < 0.5).all()
    if aspect == "pad":
        assert torch.allclose(x[:, 18:, :], torch.tensor(0.5))  # the padding sits below the image


def test_8_bit_sources_stay_uint8_and_prepare_the_same_pixels():
    from iseg.images import read_pixels

    rgb = np.random.RandomState(0).randint(0, 256, (20, 30, 3)).astype(np.uint8)
    for source in (rgb, Image.fromarray(rgb)):
        arr = read_pixels(source)
        assert arr.dtype == np.uint8 and np.array_equal(arr, rgb)
        t, g = prepare(arr, 16)
        ref, g_ref = prepare(load_image(source), 16)
        assert g == g_ref and torch.allclose(t, ref, atol=1e-6)
    grey = read_pixels(Image.fromarray(rgb[..., 0]))
    assert grey.shape == (20, 30, 3) and np.array_equal(grey[..., 2], rgb[..., 0])
    assert read_pixels(rgb.astype(np.float32) / 255).dtype == np.float32  # other sources: load_image
    with pytest.raises(ValueError, match="needs at least"):
        read_pixels(np.zeros((4, 30, 3), np.uint8))


def test_to_uint8_rounds_floats_and_copies_bytes():
    from iseg.images import to_uint8

    u8 = np.array([[[0, 128, 255]]], np.uint8)
    out = to_uint8(u8)
    assert out.dtype == np.uint8 and np.array_equal(out, u8) and out is not u8
    assert np.array_equal(to_uint8(np.array([[[0.0, 0.5, 1.0]]])), [[[0, 128, 255]]])  # 127.5 rounds to even: 128
    assert np.array_equal(to_uint8(np.array([[[-0.2, 1.3, 0.2]]])), [[[0, 255, 51]]])  # clipped first


def test_label_legend_names_every_label_colour():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iseg.viz import label_legend, palette

    fig, ax = plt.subplots(layout="constrained")
    legend = label_legend(fig, ["circle", "star"])
    # over an overlay the background shows the image: its swatch is hollow, the classes' are their colours
    assert [t.get_text() for t in legend.get_texts()] == ["0: background (the image)", "1: circle", "2: star"]
    assert legend.legend_handles[0].get_facecolor()[3] == 0
    colours = [tuple(round(c * 255) for c in h.get_facecolor()[:3]) for h in legend.legend_handles[1:]]
    assert colours == [tuple(int(v) for v in c) for c in palette(3)[1:]]
    # a colorized label map has a black background, shown as such
    plain = label_legend(fig, ["circle", "star"], on_image=False)
    assert [t.get_text() for t in plain.get_texts()] == ["0: background", "1: circle", "2: star"]
    colours = [tuple(round(c * 255) for c in h.get_facecolor()[:3]) for h in plain.legend_handles]
    assert colours == [tuple(int(v) for v in c) for c in palette(3)]
    assert [t.get_text() for t in label_legend(ax, ["star"], background=False).get_texts()] == ["1: star"]
    plt.close(fig)
