"""Hostile and careless input to the library (issue 15): every case gets a clear error or the
right answer, never a traceback from deep inside torch or Pillow, a hang or a silent wrong result.

The tables are (input, expected exception, regex of its message); add a row for every new case.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import iseg
from iseg import refine as R
from iseg.images import load_image
from iseg.labels import predict_labels
from iseg.prompts import UnknownWordError, check_class_names, make_prompt
from iseg.shapes import sample


@pytest.fixture(scope="module")
def seg(shapes_pipe):
    return iseg.ISeg(shapes_pipe)


def _count_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def _png_header_only(path, width, height):
    """A PNG that declares ``width x height`` 1-bit pixels (Pillow checks the size on open)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


# -- ISeg settings that need the model --------------------------------------------------------------
SETTINGS = [
    (dict(image_size=1024), ValueError, r"image_size=1024 does not suit the 'shapes' model: it was trained on 64x64"
                                        r" images; give a multiple of 8 from 16 to 128"),
    (dict(image_size=8), ValueError, r"image_size=8 .*from 16 to 128"),
    (dict(image_size=60), ValueError, r"multiple of 8"),
    (dict(self_image_size=256), ValueError, r"self_image_size=256 does not suit the 'shapes' model: .* from 16 to 128"
                                            r", or self_image_size=None for image_size's pass"),
    (dict(self_image_size=100), ValueError, r"self_image_size=100 .*multiple of 8"),
]


@pytest.mark.parametrize("overrides, error, match", SETTINGS)
def test_settings_refused_by_the_model(shapes_pipe, overrides, error, match):
    with pytest.raises(error, match=match):
        iseg.ISeg(shapes_pipe, **overrides)
    seg = iseg.ISeg(shapes_pipe)
    calls, handle = _count_unet_calls(shapes_pipe)
    try:
        with pytest.raises(error, match=match):
            seg.segment(sample(0).image, ["square"], **overrides)
        with pytest.raises(error, match=match):
            seg.segment_prompt(sample(0).image, points=[(5, 5)], **overrides)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("call", ["segment", "segment_prompt"])
def test_all_zero_cross_weights_fail_before_the_forward_pass(shapes_pipe, call):
    seg = iseg.ISeg(shapes_pipe)
    calls, handle = _count_unet_calls(shapes_pipe)
    try:
        with pytest.raises(ValueError, match="cross_weights"):
            if call == "segment":
                seg.segment(sample(0).image, ["square"], cross_weights={16: 0.0, 8: 0.0})
            else:
                seg.segment_prompt(sample(0).image, text="square", cross_weights={16: 0.0, 8: 0.0})
    finally:
        handle.remove()
    assert not calls
    obs = seg.observe(sample(0).image, ["square"])[0]
    with pytest.raises(ValueError, match="cross_weights"):
        seg.decode(obs, cross_weights={16: 0.0})


# -- what segment is given ------------------------------------------------------------------------
SEGMENT = [
    (dict(images=sample(0).image, classes=[]), ValueError, "class list is empty"),
    (dict(images=sample(0).image, classes="square"), TypeError, "not one string"),
    (dict(images=sample(0).image, classes=["square", "Square"]), ValueError, "duplicate"),
    (dict(images=sample(0).image, classes=[" "]), ValueError, "empty class name"),
    (dict(images=None, classes=["square"]), TypeError, "unsupported image type NoneType"),
    (dict(images=[], classes=["square"]), ValueError, "no images given"),
    (dict(images=[sample(0).image] * 2, classes=[["square"]] * 3), ValueError, "3 class lists for 2 images"),
    (dict(images=sample(0).image), TypeError, "give the classes"),
    (dict(images=sample(0).image, classes=["square"], vocabulary=["square"]), TypeError, "not both"),
    (dict(images=np.zeros((64, 64, 5), np.uint8), classes=["square"]), ValueError, "channels"),
    (dict(images=np.asarray(sample(0).image).astype(np.float32), classes=["square"]), ValueError, r"float images must lie in \[0, 1\]"),
    (dict(images=sample(0).image, classes=["square"], lamda=1), ValueError, "did you mean 'lam'"),
    (dict(images=sample(0).image, classes=["square"], cross_weights={5: 1.0}), ValueError, "resolution"),
    (dict(images=sample(0).image, classes=["square"], self_heads=(9,)), ValueError, "self_heads .* out of range"),
]


@pytest.mark.parametrize("kwargs, error, match", SEGMENT)
def test_segment_refuses_bad_input_before_the_unet(seg, shapes_pipe, kwargs, error, match):
    calls, handle = _count_unet_calls(shapes_pipe)
    try:
        with pytest.raises(error, match=match):
            seg.segment(**kwargs)
    finally:
        handle.remove()
    assert not calls


def test_iseg_needs_a_pipeline():
    with pytest.raises(TypeError, match="no unet"):
        iseg.ISeg(object())


# -- words the model does not know ------------------------------------------------------------------
UNKNOWN = [
    (["dog"], r"class 'dog' \(word\(s\) \['dog'\]\): the 'shapes' model's tokenizer does not know"),
    (["square", "\N{GRINNING FACE}"], r"class '\N{GRINNING FACE}'.*'shapes' model's tokenizer does not know"),
    ([","], r"class ','.*does not know"),
    (["red dog"], r"class 'red dog' \(word\(s\) \['dog'\]\)"),
]


@pytest.mark.parametrize("classes, match", UNKNOWN)
def test_unknown_words_are_refused_with_the_word_and_the_model(seg, classes, match):
    with pytest.raises(UnknownWordError, match=match):
        seg.segment(sample(0).image, classes)
    with pytest.raises(UnknownWordError, match=match.replace("class ", "class ")):
        seg.segment_prompt(sample(0).image, text=";".join(classes))


def test_unknown_prompt_words_are_refused(seg):
    with pytest.raises(UnknownWordError, match=r"prompt 'a photograph of square' has word\(s\) \['photograph'\]"):
        seg.segment(sample(0).image, ["square"], prompt_prefix="a photograph of")


def test_unknown_vocabulary_names_are_never_predicted(seg):
    s = next(sample(i) for i in range(100) if list(sample(i).classes) == ["square"])
    vocabulary = ["square", "circle", "dog", "cat", "\N{GRINNING FACE}", "red dog", "a,b"]
    with pytest.warns(UserWarning, match=r"5 vocabulary name\(s\).*'dog', 'cat'"):
        labels = predict_labels(s.image, vocabulary, seg=seg)
    assert set(labels[0]) <= {"square", "circle"}
    with pytest.raises(UnknownWordError, match="none of the vocabulary's 2 names"):
        predict_labels(s.image, ["dog", "cat"], seg=seg)


# -- class names that are words of the prompt -------------------------------------------------------
def test_classes_named_like_prompt_words_get_their_own_tokens(seg, tokenizer):
    # shapes: "a square and a and" -> [start, a, square, and, a, and, end]: the class "and" is
    # position 5, not the joiner's "and" at 3
    assert seg.prompt_for(["square", "and"]).spans == ((2,), (5,))
    assert seg.prompt_for(["a", "and"]).spans == ((2,), (5,))
    assert seg.prompt_for(["and", "square"]).spans == ((2,), (5,))
    # SD's prefix: "a photograph of photograph and of and cat and ..." -> 4, 6, 8
    names = ["photograph", "of", "cat"]
    text = iseg.build_prompt(names)
    prompt = make_prompt(tokenizer, text, names, iseg.prompts.class_offsets(names))
    assert prompt.spans == ((4,), (6,), (8,))
    assert [tokenizer.convert_ids_to_tokens(prompt.input_ids[s[0]]) for s in prompt.spans] == ["photograph</w>", "of</w>", "cat</w>"]


# -- images ------------------------------------------------------------------------------------------
def test_decompression_bomb_names_the_file(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ValueError, match=r"bomb\.png is too large to open safely .*MAX_IMAGE_PIXELS"):
        load_image(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_big_images_are_reduced_as_they_are_read(tmp_path):
    big = Image.new("1", (12000, 9000), 0)
    big.paste(1, (3000, 3000, 6000, 6000))
    big.save(tmp_path / "big.png")
    with pytest.warns(UserWarning, match=r"big\.png is 12000x9000 pixels; read at 4000x3000"):
        arr = load_image(tmp_path / "big.png")
    assert arr.shape == (3000, 4000, 3)
    assert arr[1500, 1500].tolist() == [1, 1, 1] and arr[500, 500].tolist() == [0, 0, 0]
    Image.new("RGB", (9000, 6000), (200, 10, 10)).save(tmp_path / "big.jpg", quality=90)
    with pytest.warns(UserWarning, match=r"9000x6000"):
        jpg = load_image(tmp_path / "big.jpg")
    assert max(jpg.shape[:2]) <= iseg.images.MAX_SIDE and jpg.shape[1] / jpg.shape[0] == pytest.approx(1.5, rel=0.01)
    assert abs(jpg[100, 100] * 255 - [200, 10, 10]).max() < 8


def test_big_8_bit_arrays_are_reduced_before_the_float_copy_and_map_back_at_full_size(seg):
    arr = np.zeros((600, 9000, 3), np.uint8)
    arr[:, :4500] = 255  # left half white
    pixels, geometry = iseg.images.prepare(arr, 64)
    assert geometry == iseg.images.Geometry(600, 9000, "stretch") and pixels.shape == (3, 64, 64)
    assert pixels[:, :, :31].min() > 0.999 and pixels[:, :, 33:].max() < 0.001
    result = seg.segment(arr, ["square"])
    assert result.labels.shape == (600, 9000)


def test_a_batch_reads_and_resizes_one_image_at_a_time(seg, monkeypatch):
    import iseg.segmenter as S

    order = []
    read, prep = S.read_pixels, S.prepare
    monkeypatch.setattr(S, "read_pixels", lambda *a, **k: (order.append("read"), read(*a, **k))[1])
    monkeypatch.setattr(S, "prepare", lambda *a, **k: (order.append("prepare"), prep(*a, **k))[1])
    seg.observe([sample(i).image for i in range(3)], ["square"])
    assert order == ["read", "prepare"] * 3


# -- batch size and memory ---------------------------------------------------------------------------
def test_huge_batch_size_is_run_in_chunks_with_the_same_results(shapes_pipe, monkeypatch, capsys):
    seg = iseg.ISeg(shapes_pipe, batch_size=10000)
    assert seg.forward_chunk() < 10000  # 10000 64x64 images' self-attention would not fit the budget
    images = [sample(i).image for i in range(7)]
    # chunks of 3 give what batch_size=3 gives (a batch of 1 can round differently on a CPU)
    expected = [r.labels for r in iseg.ISeg(shapes_pipe, batch_size=3).segment(images, ["square", "circle"])]
    monkeypatch.setattr(iseg.ISeg, "_FORWARD_BYTES", 3 * 4 * 1024**2 * 7)  # three images of 3 layers + 4 heads
    assert seg.forward_chunk() == 3
    sizes = []
    handle = shapes_pipe.unet.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        results = seg.segment(images, ["square", "circle"])
    finally:
        handle.remove()
    assert sizes == [3, 3, 1]
    assert all(np.array_equal(r.labels, e) for r, e in zip(results, expected))
    assert "iseg" in capsys.readouterr().err  # a progress bar when the images take several passes


# -- interactive prompts -----------------------------------------------------------------------------
BORDER = [
    dict(box=(0, 0, 64, 64)),
    dict(box=(0.5, 0.5, 63.5, 63.5)),  # covers every cell of the 32x32 grid too
    dict(points=[(0, 0)]),
    dict(points=[(64, 64)]),
    dict(points=(63.99, 0)),
    dict(line=[(0, 64), (64, 64)]),
    dict(box=(62, 0, 64, 64)),
]


@pytest.mark.parametrize("prompt", BORDER)
def test_prompts_at_the_border_give_finite_non_empty_masks(seg, prompt):
    r = seg.segment_prompt(sample(3).image, **prompt)
    assert np.isfinite(r.score).all() and r.mask.any()
    if "box" in prompt and prompt["box"][0] < 1:
        assert r.mask.all()  # a box over the whole image asks for all of it


PROMPTS = [
    (dict(points=[(64.5, 5)]), ValueError, r"outside the 64x64 image \(x must be in \[0, 64\]"),
    (dict(points=[(float("nan"), 5)]), ValueError, "outside"),
    (dict(points=[("a", 5)]), ValueError, r"\(x, y\) pair"),
    (dict(box=(0, 0, 65, 64)), ValueError, "reaches outside"),
    (dict(box=(5, 5)), ValueError, r"box must be \(x0, y0, x1, y1\)"),
    (dict(line=[(1, 1), (2,)]), ValueError, r"\(x, y\) pair"),
    (dict(text=""), ValueError, "text prompt is empty"),
    (dict(text="dog"), UnknownWordError, "'dog'"),
]


@pytest.mark.parametrize("prompt, error, match", PROMPTS)
def test_bad_interactive_prompts(seg, prompt, error, match):
    with pytest.raises(error, match=match):
        seg.segment_prompt(sample(0).image, **prompt)


def test_every_setting_is_classified_as_forward_or_decode():
    # a new Settings field must be put in one of the two lists, or segment_prompt's cache could
    # hand back a pass made with another value of it
    from dataclasses import fields

    from iseg.segmenter import DECODE_FIELDS, FORWARD_FIELDS

    assert not set(FORWARD_FIELDS) & set(DECODE_FIELDS)
    assert set(FORWARD_FIELDS) | set(DECODE_FIELDS) == {f.name for f in fields(iseg.Settings)}


NEW_FORWARD = [
    dict(timestep=300), dict(seed=7), dict(gamma=1.0), dict(image_size=32), dict(self_resolution=16),
    dict(self_image_size=128),
    dict(self_heads=(0,)), dict(self_layers=("up_blocks.2.attentions.0.transformer_blocks.0.attn1",)),
    dict(cross_weights={16: 1.0}), dict(cross_heads={8: (0, 1), 16: (2,)}),
    dict(cross_layers=("down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                       "mid_block.attentions.0.transformer_blocks.0.attn2")),
]


@pytest.mark.parametrize("change", NEW_FORWARD, ids=lambda d: next(iter(d)))
def test_segment_prompt_cache_runs_a_new_pass_for_new_forward_settings(shapes_pipe, change):
    image = sample(11).image
    cached = iseg.ISeg(shapes_pipe)
    for kind in (dict(text="square"), dict(points=[(20, 30)])):
        old = cached.segment_prompt(image, **kind)
        new = cached.segment_prompt(image, **kind, **change)
        fresh = iseg.ISeg(shapes_pipe).segment_prompt(image, **kind, **change)
        assert np.array_equal(new.score, fresh.score), "the cached pass of other settings was reused"
        if "text" in kind:  # every one of these changes what a text prompt reads
            assert not np.array_equal(new.maps, old.maps)


# -- the pure steps ----------------------------------------------------------------------------------
PURE = [
    (lambda: R.kl_cluster(torch.rand(1, 5, 3)), ValueError, "square map"),
    (lambda: R.kl_cluster(torch.rand(4, 3)), ValueError, r"\(B, n, T\)"),
    (lambda: R.kl_cluster(torch.rand(1, 4, 3), seeds=[4]), ValueError, r"seeds must be pixel indices in \[0, 4\)"),
    (lambda: R.kl_cluster(torch.rand(1, 4, 3), rounds=0), ValueError, "rounds must be an integer >= 1"),
    (lambda: R.kl_cluster(torch.rand(1, 4, 3), rounds=1.5), ValueError, "rounds"),
    (lambda: R.refine(torch.rand(4, 2), torch.rand(4, 4), -1), ValueError, "iterations"),
    (lambda: R.refine(torch.rand(4, 2), torch.rand(3, 3), 1), ValueError, "same n"),
    (lambda: R.entropy_reduce(torch.rand(3, 4), 0.1), ValueError, "square"),
    (lambda: R.entropy_reduce(torch.rand(3, 3), -1), ValueError, "lam must be >= 0"),
    (lambda: R.class_maps(torch.rand(1, 4, 3), []), ValueError, "at least one class"),
    (lambda: check_class_names("cat"), TypeError, "not one string"),
    (lambda: check_class_names(["cat", " cat "]), ValueError, "duplicate"),
    (lambda: check_class_names(["cat", 3]), TypeError, "must be strings"),
    (lambda: load_image(np.zeros((4, 4, 3), np.uint8)), ValueError, "at least 8x8"),
    (lambda: load_image(np.full((9, 9), np.nan, np.float32)), ValueError, "NaN"),
    (lambda: load_image("/nonexistent/x.png"), FileNotFoundError, r"/nonexistent/x\.png"),
]


@pytest.mark.parametrize("call, error, match", PURE)
def test_pure_functions_refuse_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
