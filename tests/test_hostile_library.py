"""Hostile and careless input to the library (issue 15): every case gets a clear error or the
right answer, never a traceback from deep inside torch or Pillow, a hang or a silent wrong result.

The tables are (input, expected exception, regex of its message); add a row for every new case.
"""

from __future__ import annotations

import json
import os
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
from iseg.prompts import PromptTooLongError, UnknownWordError, check_class_names, make_prompt
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
    assert seg.forward.chunk_size(seg.plan(), seg.settings.batch_size) < 10000  # 10000 64x64 images' self-attention would not fit the budget
    images = [sample(i).image for i in range(7)]
    # chunks of 3 give what batch_size=3 gives (a batch of 1 can round differently on a CPU)
    expected = [r.labels for r in iseg.ISeg(shapes_pipe, batch_size=3).segment(images, ["square", "circle"])]
    monkeypatch.setattr(iseg.forward.NoisyForward, "_FORWARD_BYTES", 3 * 4 * 1024**2 * 7)  # three images of 3 layers + 4 heads
    assert seg.forward.chunk_size(seg.plan(), seg.settings.batch_size) == 3
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


# -- second pass (issue 32): prompts, dtypes, model folders, datasets -------------------------------------
SECOND_PROMPTS = [
    (dict(text=b"circle"), TypeError, r"got bytes b'circle'; decode it first"),
    (dict(text=["circle", 5]), TypeError, r"5 is a int"),
    (dict(text=5), TypeError, r"text must be a description"),
    (dict(points=(True, False)), ValueError, r"point 0 must be an \(x, y\) pair of pixel coordinates, got True"),
    (dict(points=[(1, 2), (True, 3)]), ValueError, r"point 1 must be an \(x, y\) pair"),
    (dict(points="12"), ValueError, r"points must be a list of \(x, y\) pairs"),
    (dict(points=np.full((10, 2), 70.0)), ValueError, r"point 0 .* lies outside the 64x64 image"),
    (dict(box=(0, 0, True, 5)), ValueError, r"box must be \(x0, y0, x1, y1\)"),
    (dict(line=[(1, 1), (False, 2)]), ValueError, r"line point 1 must be an \(x, y\) pair"),
    # what is wrong with a long text prompt is its length (the shapes model reads 24 tokens), not a "duplicate class"
    (dict(text="; ".join(["star"] * 200)), PromptTooLongError,
     r"^the text prompt, 200 descriptions \(parts separated by ';'\), is \d+ tokens long in the model's prompt, but "
     r"the text encoder reads 24; give fewer or shorter descriptions, each once \('star' repeated\)$"),
    (dict(text=["star", "circle", "heart", "cross", "square", "triangle"] * 30), PromptTooLongError,
     r"the text prompt, 180 descriptions .* but the text encoder reads 24.*'circle', 'cross', 'heart', 'square', "
     r"'star' and 1 more repeated"),
    (dict(text=" ".join(["star"] * 40)), PromptTooLongError, r"^the text prompt, 1 description, is 43 tokens long"),
    (dict(text="star; circle; Star"), ValueError, r"^the text prompt repeats the description\(s\) 'star'; give each once"),
]


@pytest.mark.parametrize("prompt, error, match", SECOND_PROMPTS)
def test_prompts_of_the_wrong_type_are_refused(seg, prompt, error, match):
    with pytest.raises(error, match=match):
        seg.segment_prompt(sample(0).image, **prompt)


def test_many_clicks_are_one_column_per_cell_fast_and_the_same_answer(seg):
    import time

    image = sample(3).image
    clicks = np.random.default_rng(0).uniform(0, 64, (100_000, 2))
    cells = iseg.interactive.point_cells(clicks, iseg.images.Geometry(64, 64, "stretch"), 32)
    assert len(cells) == len(set(cells)) <= 32 * 32
    t0 = time.perf_counter()
    many = seg.segment_prompt(image, points=clicks)
    assert time.perf_counter() - t0 < 30  # was a 2.4 GB allocation after 54 s
    # clicks on the same cells give the same mask as those cells clicked once each
    centres = [((c % 32 + 0.5) * 2, (c // 32 + 0.5) * 2) for c in cells]
    once = seg.segment_prompt(image, points=centres)
    np.testing.assert_allclose(many.score, once.score, atol=1e-6)
    # twice the same click is the same prompt as once
    a = seg.segment_prompt(image, points=[(20, 20), (40, 40)])
    b = seg.segment_prompt(image, points=[(20, 20), (40, 40), (20.3, 20.1), (40, 40)])
    np.testing.assert_array_equal(a.mask, b.mask)


def test_refinement_in_chunks_equals_all_columns_at_once(monkeypatch):
    from iseg import interactive

    torch.manual_seed(0)
    n = 36
    P = R.entropy_reduce(torch.softmax(torch.randn(n, n) * 3, -1), 0.1, None)
    cols = torch.zeros(n, 11)
    cols[torch.randint(0, n, (11,)), torch.arange(11)] = 1
    cols[:, 4] = 1  # a column over every cell
    steps = R.refine(cols, P, 5)
    steps[..., 4] = 1.0
    expected = (steps / steps.amax(-2, keepdim=True)).mean(-1)
    monkeypatch.setattr(interactive, "REFINE_CHUNK_BYTES", 6 * n * 4 * 3)  # 3 columns a chunk
    torch.testing.assert_close(interactive.refined_mean(cols, P, 5), expected)


def test_long_strokes_are_followed_quickly():
    import time

    from iseg.interactive import line_cells

    geometry = iseg.images.Geometry(64, 64, "stretch")
    t0 = time.perf_counter()
    cells = line_cells(np.random.default_rng(1).uniform(0, 64, (20_000, 2)), geometry, 32)
    assert time.perf_counter() - t0 < 5 and sorted(cells) == list(range(32 * 32))
    assert line_cells([(0, 0), (63.9, 0)], geometry, 32) == list(range(32))  # the top row, in stroke order
    assert line_cells([(10, 10)], geometry, 32) == [5 * 32 + 5]


def test_empty_extra_words_are_refused():
    from iseg.presets import SettingsError

    for words in (["other object", ""], ["  "], ("background", "\t")):
        with pytest.raises(SettingsError, match=r"setting extra_words: an empty word"):
            iseg.make_settings(None, extra_words=words)
    with pytest.raises(SettingsError, match=r"setting background_words: an empty word"):
        iseg.make_settings(None, background_words=["sky", ""])
    with pytest.raises(SettingsError, match=r"setting extra_words must be a list of words in order, not a set"):
        iseg.make_settings(None, extra_words={"other object", "background"})  # a set's order changes between runs


@pytest.mark.parametrize("given, expected", [
    ("float16", torch.float16), ("torch.float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16),
    ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16), ("float32", torch.float32), (torch.float32, torch.float32),
    (None, torch.float32),
])
def test_dtype_names_are_read_as_dtypes(given, expected):
    from iseg.loading import resolve_dtype

    assert resolve_dtype(given, torch.device("cpu")) == expected


@pytest.mark.parametrize("given, error, match", [
    ("float8", ValueError, r"dtype 'float8' is not a dtype name; use float16, bfloat16 or float32"),
    (3, TypeError, r"dtype must be a torch dtype or its name"),
    (torch.int8, ValueError, r"dtype torch.int8 cannot run a diffusion model"),
])
def test_bad_dtypes_are_refused_before_loading(given, error, match):
    with pytest.raises(error, match=match):
        iseg.load_model("shapes", device="cpu", dtype=given, verbose=False)


def test_a_dtype_given_by_name_is_used():
    model = iseg.load_model("shapes", device="cpu", dtype="bfloat16", verbose=False)
    assert model.dtype == torch.bfloat16 and model.pipe.unet.dtype == torch.bfloat16


def test_the_shipped_folder_by_path_is_the_shipped_model():
    folder = iseg.shipped_models()["shapes"]
    for given in (folder, str(folder), folder / "unet" / ".."):
        model = iseg.load_model(given, device="cpu", verbose=False)
        assert (model.name, model.preset) == ("shapes", "shapes") and model.known_words
    r = iseg.ISeg(iseg.load_model(folder, device="cpu", verbose=False)).segment(sample(5).image, list(sample(5).classes))
    assert r.labels.shape == (64, 64)


@pytest.mark.parametrize("shipped", ["shapes", "shapes-mmdit"])
def test_a_copied_shapes_folder_gets_the_shapes_preset(tmp_path, shipped):
    import shutil

    folder = tmp_path / "m1"  # what `iseg train-shapes --out` makes: a folder with its training.json
    shutil.copytree(iseg.shipped_models()[shipped], folder)
    model = iseg.load_model(folder, device="cpu", verbose=False)
    assert (model.name, model.preset) == (str(folder), shipped) and model.known_words
    s = sample(5)
    assert iseg.ISeg(model).segment(s.image, list(s.classes)).labels.shape == (64, 64)
    from iseg.prompts import UnknownWordError

    (folder / "training.json").unlink()  # a copy that lost it: still known by its tokenizer's vocabulary
    model = iseg.load_model(folder, device="cpu", verbose=False)
    assert (model.name, model.preset) == (str(folder), shipped)
    assert iseg.ISeg(model).segment(s.image, list(s.classes)).labels.shape == (64, 64)
    tokenizer = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = "circle</w>", "square</w>"   # another vocabulary (two words' ids swapped): no longer the shapes world's,
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps(tokenizer))   # so the SD preset's words fail
    with pytest.raises(UnknownWordError, match=r"preset=.*--preset"):
        iseg.ISeg(iseg.load_model(folder, device="cpu", verbose=False)).segment(s.image, list(s.classes))


def test_a_text_encoder_copied_from_the_other_shapes_model_is_named_before_loading(tmp_path, monkeypatch):
    """The MM-DiT's text encoder has the UNet model's sizes: copied over it, it loads without a word and the
    class words' embeddings mean nothing to the UNet. training.json's SHA-256 of each weights file names it."""
    import shutil

    from iseg import loading

    folder = tmp_path / "mixed"
    shutil.copytree(iseg.shipped_models()["shapes"], folder)
    shutil.copy(iseg.shipped_models()["shapes-mmdit"] / "text_encoder" / "model.safetensors",
                folder / "text_encoder" / "model.safetensors")
    built = []
    import diffusers

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", lambda *a, **k: built.append(a))
    with pytest.raises(loading.ModelFolderError, match=r"text_encoder/model\.safetensors is not the file this model was "
                                                    r"trained with .*Copy the model folder again.*weights_sha256"):
        iseg.load_model(folder, device="cpu", verbose=False)
    assert built == []   # named before anything was built
    monkeypatch.undo()
    # what the record prevents: without it the mixed folder loads, and the masks are another model's
    info = json.loads((folder / "training.json").read_text())
    del info["weights_sha256"]
    (folder / "training.json").write_text(json.dumps(info))
    s = sample(5)
    mixed = iseg.ISeg(iseg.load_model(folder, device="cpu", verbose=False)).segment(s.image, list(s.classes))
    own = iseg.ISeg(iseg.load_model("shapes", device="cpu", verbose=False)).segment(s.image, list(s.classes))
    assert not np.allclose(mixed.initial, own.initial, atol=1e-3)


@pytest.mark.parametrize("model, kwargs, message", [
    ("shapes", dict(preset="shapes-mmdit"), r"preset 'shapes-mmdit' was chosen for the 'shapes-mmdit' model, and this is "
                                            r"the 'shapes' model \(sd\): leave preset out \(its own preset, 'shapes'"),
    ("shapes", dict(preset="shapes-mmdit-interactive"), r"preset 'shapes-mmdit-interactive' was chosen for the "
                                                        r"'shapes-mmdit' model"),
    ("shapes-mmdit", dict(preset="shapes"), r"preset 'shapes' was chosen for the 'shapes' model, and this is the "
                                            r"'shapes-mmdit' model \(sd3\)"),
    ("shapes", dict(image_size=96), r"image_size=96 asks for attention layers this model does not have: .*\[16\] for a "
                                    r"48x48 latent; available: \[12, 24, 48\]\. With these settings the sizes that work "
                                    r"are image_size=32 or 64"),
])
def test_a_preset_or_size_the_model_cannot_follow_is_refused_when_the_segmenter_is_made(model, kwargs, message):
    """Before, these were accepted and failed at the first image with a layer message naming neither."""
    with pytest.raises(iseg.presets.SettingsError, match=message):
        iseg.ISeg(iseg.load_model(model, device="cpu", verbose=False), **kwargs)


def test_a_size_given_per_call_is_checked_before_the_image_is_read():
    seg = iseg.ISeg(iseg.load_model("shapes", device="cpu", verbose=False))
    with pytest.raises(iseg.presets.SettingsError, match=r"image_size=48 asks for .* image_size=32 or 64"):
        seg.segment("no such file.png", ["circle"], image_size=48)   # the settings fail first, not the missing file
    assert seg.segment(sample(3).image, ["circle"], image_size=32).labels.shape == (64, 64)


def test_train_shapes_records_the_sha256_of_every_weights_file():
    """The shipped models carry the record the loader checks (``iseg train-shapes`` writes it), and it is right."""
    import hashlib

    for name in ("shapes", "shapes-mmdit"):
        folder = iseg.shipped_models()[name]
        recorded = json.loads((folder / "training.json").read_text())["weights_sha256"]
        files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.safetensors"))
        assert sorted(recorded) == files and len(files) >= 3
        for f in files:
            assert recorded[f] == hashlib.sha256((folder / f).read_bytes()).hexdigest(), f


@pytest.mark.parametrize("given, close", [("SHAPES", "shapes"), (" shapes", "shapes"), ("Shapes-MMDiT ", "shapes-mmdit"),
                                          ("AUTO", "auto")])
def test_a_shipped_name_in_another_case_or_with_spaces_is_suggested_before_any_hub_lookup(monkeypatch, given, close):
    from iseg import loading

    looked_up = []
    monkeypatch.setattr(loading, "_from_pretrained", lambda *a, **k: looked_up.append(a))
    with pytest.raises(loading.ModelNotAvailableError, match=rf"no model has that name; did you mean '{close}'\?"):
        iseg.load_model(given, device="cpu", verbose=False)
    assert not looked_up


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import tiny

    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny.tiny_pipeline(seed=0, sd_layout=True).save_pretrained(folder)
    return folder


def _edited(tiny_folder, tmp_path, edit):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    edit(folder)
    return folder


def _config(folder, part, file="config.json", **changes):
    path = folder / part / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _unet(folder, **changes):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    UNet2DConditionModel.from_config({**unet.config, **changes}).save_pretrained(folder / "unet")


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


MODEL_FOLDERS = [
    (lambda f: (f / "model_index.json").write_text("[1, 2]"), r"model_index.json holds a JSON list; it must be a JSON object"),
    (lambda f: _config(f, "", "model_index.json", _class_name=["StableDiffusionPipeline"]),
     r"_class_name must be the pipeline class's name, such as \"StableDiffusionPipeline\", got \['StableDiffusionPipeline'\]"),
    (lambda f: (f / "model_index.json").write_text("{"), r"model_index.json is not valid JSON"),
    (lambda f: _config(f, "", "model_index.json", unet="diffusers"), r"component 'unet' must be \[library, class\]"),
    (lambda f: __import__("shutil").rmtree(f / "tokenizer"), r"has no tokenizer/ folder, which its model_index.json lists"),
    (lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors", -1000),
     r"unet/diffusion_pytorch_model.safetensors holds \d+ bytes of tensors but its header needs \d+; the file is damaged"),
    (lambda f: _truncate(f / "text_encoder" / "model.safetensors", 0), r"text_encoder/model.safetensors is 0 bytes long"),
    (lambda f: _truncate(f / "vae" / "diffusion_pytorch_model.safetensors", 20), r"vae/diffusion_pytorch_model.safetensors declares"),
    (lambda f: _unet(f, cross_attention_dim=48),
     r"the UNet's cross-attention takes 48-wide text states \(cross_attention_dim\) but the text encoder gives 32"),
    (lambda f: _unet(f, in_channels=8), r"the unet takes 8 input channels but the VAE makes 4-channel latents"),
    (lambda f: _config(f, "unet", sample_size=0), r"unet/config.json has sample_size 0; it must be the latent side"),
    (lambda f: _config(f, "unet", sample_size=None), r"unet/config.json has sample_size None"),
    (lambda f: _config(f, "tokenizer", "tokenizer_config.json", model_max_length=200),
     r"tokenizer/tokenizer_config.json pads prompts to 200 tokens \(model_max_length\) but text_encoder has 77 "
     r"positions \(max_position_embeddings\): every prompt would fail.*set \"model_max_length\": 77 in that file"),
    (lambda f: _config(f, "text_encoder", vocab_size=1000),
     r"text_encoder/config.json says vocab_size 1000, but .*model.safetensors holds 49408 token embeddings"),
    (lambda f: (f / "model_index.json").write_text(json.dumps({k: v for k, v in json.loads((f / "model_index.json").read_text()).items()
                                                              if k != "_class_name"})), r"model_index.json has no _class_name"),
    (lambda f: (f / "model_index.json").write_bytes(b"\xef\xbb\xbf" + (f / "model_index.json").read_bytes()),
     r"model_index.json starts with a byte-order mark"),
    (lambda f: (f / "unet" / "config.json").write_text("[]"), r"unet/config.json holds a JSON list, not the object of settings"),
    (lambda f: (f / "tokenizer" / "tokenizer_config.json").write_text(""), r"tokenizer/tokenizer_config.json is not valid JSON"),
    (lambda f: __import__("shutil").copy(f / "vae" / "diffusion_pytorch_model.safetensors",
                                         f / "unet" / "diffusion_pytorch_model.safetensors"),
     r"tensors of the unet \(e.g. '.*'\) are missing from unet/diffusion_pytorch_model.safetensors; the file holds "
     r"the weights of another part"),
    (lambda f: _config(f, "tokenizer", "tokenizer_config.json", model_max_length=0),
     r"tokenizer/tokenizer_config.json has model_max_length 0; it must be a whole number > 0"),
    (lambda f: _config(f, "tokenizer", "tokenizer_config.json", model_max_length=-5),
     r"tokenizer/tokenizer_config.json has model_max_length -5"),
    (lambda f: _config(f, "tokenizer", "tokenizer_config.json", model_max_length=2),
     r"tokenizer/tokenizer_config.json has model_max_length 2, too short for any prompt"),
    # what diffusers or transformers refuse while building a part: the part and its files named
    (lambda f: _config(f, "text_encoder", hidden_act="nope"),
     r"the text_encoder of the model folder .* could not be loaded: KeyError: 'nope'\. Check .*text_encoder's "
     r"config.json, or copy that folder"),
    (lambda f: _config(f, "scheduler", "scheduler_config.json", beta_schedule="nope"),
     r"the scheduler of the model folder .* could not be loaded: NotImplementedError: .*scheduler_config.json"),
    (lambda f: _config(f, "vae", latent_channels=8),
     r"the vae of the model folder .* could not be loaded \(a config.json does not match the weights next to it\)"),
]


@pytest.mark.parametrize("edit, match", MODEL_FOLDERS, ids=[
    "index-list", "class-name-list", "index-not-json", "component-not-pair", "no-tokenizer", "truncated-unet",
    "empty-text-encoder", "cut-header", "cross-attention-width", "latent-channels", "sample-size-0", "sample-size-null",
    "tokenizer-window", "vocabulary", "no-class-name", "index-bom", "config-list", "tokenizer-config-empty",
    "swapped-weights", "tokenizer-length-0", "tokenizer-length-negative", "tokenizer-length-2", "text-encoder-activation",
    "scheduler-beta-schedule", "vae-config-latents"])
def test_malformed_model_folders_get_a_clear_error_at_load_time(tiny_folder, tmp_path, edit, match):
    from iseg.loading import ModelFolderError

    folder = _edited(tiny_folder, tmp_path, edit)
    with pytest.raises(ModelFolderError, match=match):
        iseg.load_model(folder, device="cpu", verbose=False)


def _index(folder, **entries):
    _config(folder, "", "model_index.json", **entries)


def _text_encoder(folder, **changes):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(folder / "text_encoder").to_dict()
    CLIPTextModel(CLIPTextConfig(**{**config, **changes})).save_pretrained(folder / "text_encoder")


def _sharded(folder):
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    index = {"metadata": {}, "weight_map": {"encoder.conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "decoder.conv_in.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    weights.rename(folder / "vae" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (folder / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def _drop_key(path, key):
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != key}))


# model_index.json entries and part folders that diffusers and transformers refuse with messages of their own
# (about a .bin file, ignore_mismatched_sizes, or a validation error): each named by file, problem and fix
MODEL_PARTS = [
    (lambda f: _index(f, _class_name="NoSuchPipeline"),
     r"model_index.json: _class_name 'NoSuchPipeline' is not a diffusers pipeline class; set it to the pipeline the "
     r"weights are for: .*StableDiffusionPipeline"),
    (lambda f: _index(f, _class_name="StableDiffusionXLPipeline"),
     r"model_index.json: a StableDiffusionXLPipeline needs a text_encoder_2, but model_index.json has no entry for it "
     r"\(the parts it lists are those of a StableDiffusionPipeline: is _class_name right\?\)\. Set \"text_encoder_2\": "
     r"\[\"transformers\", \"CLIPTextModelWithProjection\"\]"),
    (lambda f: _index(f, _class_name="FluxPipeline"), r"a FluxPipeline needs a transformer, but model_index.json has no entry"),
    (lambda f: _index(f, unet=[None, None]),
     r"model_index.json: a StableDiffusionPipeline needs a unet, but model_index.json has \[null, null\]\. Set \"unet\": "
     r"\[\"diffusers\", \"UNet2DConditionModel\"\] with the unet/ folder beside it"),
    (lambda f: _index(f, tokenizer=[None, None]), r"needs a tokenizer, but model_index.json has \[null, null\]"),
    (lambda f: _index(f, scheduler=None), r"needs a scheduler, but model_index.json has null\. Set \"scheduler\": "
                                          r"\[\"diffusers\", \"DDIMScheduler\"\]"),
    (lambda f: _index(f, unet=["transformers", "CLIPTextModel"]),
     r"model_index.json: unet is \[\"transformers\", \"CLIPTextModel\"\], a text encoder, but a StableDiffusionPipeline's "
     r"unet is a UNet \(\[\"diffusers\", \"UNet2DConditionModel\"\]\); fix the entry"),
    (lambda f: _index(f, text_encoder=["diffusers", "UNet2DConditionModel"]),
     r"text_encoder is \[\"diffusers\", \"UNet2DConditionModel\"\], a UNet, but .*text_encoder is a text encoder"),
    (lambda f: _index(f, vae=["diffusers", "UNet2DConditionModel"]), r"vae is .*, a UNet, but .*'s vae is an autoencoder"),
    (lambda f: _index(f, scheduler=["diffusers", "AutoencoderKL"]), r"scheduler is .*, an autoencoder, but .* is a scheduler"),
    (lambda f: _index(f, tokenizer=["transformers", "CLIPTextModel"]), r"tokenizer is .*, a text encoder, but .* is a tokenizer"),
    (lambda f: _index(f, unet=["diffusers", "NoSuchModel"]),
     r"unet is \[\"diffusers\", \"NoSuchModel\"\], but diffusers has no class 'NoSuchModel'; a StableDiffusionPipeline's "
     r"unet is \[\"diffusers\", \"UNet2DConditionModel\"\]"),
    (lambda f: _index(f, unet=["transformers", "UNet2DConditionModel"]), r"but transformers has no class 'UNet2DConditionModel'"),
    (lambda f: _index(f, unet=["os", "system"]), r"unet is \[\"os\", \"system\"\], but 'os' is not a library iseg loads"),
    (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
     r"vae/diffusion_pytorch_model.safetensors is missing: the weights of the vae; copy it"),
    (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").rename(f / "vae" / "diffusion_pytorch_model.fp16.safetensors"),
     r"vae/diffusion_pytorch_model.safetensors is missing: the weights of the vae; it holds "
     r"diffusion_pytorch_model.fp16.safetensors, .*rename the weights to diffusion_pytorch_model.safetensors"),
    (lambda f: (f / "text_encoder" / "model.safetensors").unlink(), r"text_encoder/model.safetensors is missing"),
    (_sharded, r"vae/diffusion_pytorch_model.safetensors.index.json lists the shard\(s\) "
               r"diffusion_pytorch_model-00002-of-00002.safetensors, which are not in"),
    (lambda f: (f / "vae" / "config.json").unlink(), r"vae/config.json is missing: the vae's settings"),
    (lambda f: (f / "text_encoder" / "config.json").unlink(), r"text_encoder/config.json is missing"),
    (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(), r"scheduler/scheduler_config.json is missing"),
    (lambda f: (f / "tokenizer" / "tokenizer_config.json").unlink(), r"tokenizer/tokenizer_config.json is missing"),
    (lambda f: (f / "tokenizer" / "tokenizer.json").unlink(),
     r"tokenizer has no vocabulary \(tokenizer.json, or vocab.json and merges.txt.*\): the tokenizer would know no words"),
    (lambda f: _drop_key(f / "tokenizer" / "tokenizer_config.json", "model_max_length"),
     r"tokenizer/tokenizer_config.json sets no model_max_length, .*set \"model_max_length\": 77 there"),
    (lambda f: _config(f, "text_encoder", max_position_embeddings=16),
     r"text_encoder/config.json says max_position_embeddings 16, but .*text_encoder/model.safetensors holds 77 "
     r"positions \(.*position_embedding.weight is 77x32\): the config and the weights come from different models"),
    (lambda f: _config(f, "text_encoder", max_position_embeddings=200), r"says max_position_embeddings 200, but .* holds 77"),
    (lambda f: _config(f, "text_encoder", hidden_size=64), r"says hidden_size 64, but .* holds 32-wide embeddings"),
    (lambda f: _text_encoder(f, max_position_embeddings=16),
     r"tokenizer/tokenizer_config.json pads prompts to 77 tokens \(model_max_length\) but text_encoder has 16 "
     r"positions .*set \"model_max_length\": 16 in that file"),
    # the second pass's own probes: hangs at load time and failures on the first image
    (lambda f: _config(f, "scheduler", "scheduler_config.json", num_train_timesteps=10**9),
     r"scheduler/scheduler_config.json has num_train_timesteps 1,000,000,000; no model is trained on more than 100,000"),
    (lambda f: _config(f, "text_encoder", num_hidden_layers=10**6),
     r"text_encoder/config.json says num_hidden_layers 1000000, but .*model.safetensors holds 2 layers"),
    (lambda f: _config(f, "unet", sample_size=100_000), r"unet/config.json has sample_size 100000; .*at most 512 here"),
    (lambda f: _config(f, "vae", scaling_factor=-1), r"vae/config.json has scaling_factor -1; it must be a finite number > 0"),
    (lambda f: ((f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
                os.symlink(f / "gone", f / "unet" / "diffusion_pytorch_model.safetensors")),
     r"unet/diffusion_pytorch_model.safetensors is a symbolic link to .*gone, which does not exist"),
    (lambda f: ((f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
                (f / "unet" / "diffusion_pytorch_model.safetensors").mkdir()),
     r"unet/diffusion_pytorch_model.safetensors is a folder, not the weights file of the unet"),
    (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").rename(f / "unet" / "diffusion_pytorch_model.bin"),
     r"unet/diffusion_pytorch_model.bin is a safetensors file with a .bin name: .*Rename it to "
     r"diffusion_pytorch_model.safetensors"),
    (lambda f: ((f / "text_encoder" / "model.safetensors").unlink(),
                (f / "text_encoder" / "pytorch_model.bin").write_bytes(b"<html>not found</html>")),
     r"text_encoder/pytorch_model.bin is not a PyTorch weights file \(it starts with b'<html>no', not a zip archive or "
     r"a pickle\): the weights of the text_encoder are damaged"),
]


@pytest.mark.parametrize("edit, match", MODEL_PARTS, ids=[
    "class-not-a-pipeline", "class-sdxl-on-sd-parts", "class-flux-on-sd-parts", "unet-null", "tokenizer-null",
    "scheduler-null", "unet-as-text-encoder", "text-encoder-as-unet", "vae-as-unet", "scheduler-as-vae",
    "tokenizer-as-model", "unknown-class", "class-of-another-library", "unknown-library", "vae-weights-missing",
    "vae-weights-as-variant", "text-encoder-weights-missing", "missing-shard", "vae-config-missing",
    "text-encoder-config-missing", "scheduler-config-missing", "tokenizer-config-missing", "no-vocabulary",
    "no-model-max-length", "config-positions-16", "config-positions-200", "config-width", "encoder-of-16-positions",
    "timesteps-1e9", "layers-1e6", "sample-size-huge", "scaling-negative", "weights-dangling-link", "weights-folder",
    "safetensors-named-bin", "bin-not-pytorch"])
def test_model_parts_are_checked_at_load_time_naming_file_problem_and_fix(tiny_folder, tmp_path, edit, match,
                                                                          monkeypatch):
    import diffusers

    from iseg.loading import ModelFolderError

    folder = _edited(tiny_folder, tmp_path, edit)
    loaded = []  # nothing heavy runs before the check: no part is built
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(cls) or pytest.fail("loaded before the check")))
    with pytest.raises(ModelFolderError, match=match):
        iseg.load_model(folder, device="cpu", verbose=False)
    assert loaded == []


def test_a_pipeline_of_another_family_is_named_as_unsupported(tiny_folder, tmp_path):
    from iseg.loading import UnsupportedPipelineError

    folder = _edited(tiny_folder, tmp_path, lambda f: _index(f, _class_name="KandinskyPipeline"))
    with pytest.raises(UnsupportedPipelineError, match=r"is a KandinskyPipeline; iseg reads .*StableDiffusionPipeline"):
        iseg.load_model(folder, device="cpu", verbose=False)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_a_schedule_of_no_steps_is_refused_at_load_time(tiny_folder, tmp_path, steps):
    from iseg.loading import ModelFolderError

    folder = _edited(tiny_folder, tmp_path, lambda f: _config(f, "scheduler", "scheduler_config.json",
                                                              num_train_timesteps=steps))
    with pytest.raises(ModelFolderError, match=r"scheduler/scheduler_config.json has num_train_timesteps"):
        iseg.load_model(folder, device="cpu", verbose=False)


def test_a_timestep_past_the_schedule_is_refused_when_the_segmenter_is_made(tiny_folder, tmp_path):
    folder = _edited(tiny_folder, tmp_path, lambda f: _config(f, "scheduler", "scheduler_config.json",
                                                              num_train_timesteps=5))
    model = iseg.load_model(folder, device="cpu", verbose=False)
    match = r"timestep=100 .*scheduler/scheduler_config.json has num_train_timesteps 5"
    with pytest.raises(ValueError, match=match):
        iseg.ISeg(model)
    seg = iseg.ISeg(model, timestep=4)
    with pytest.raises(ValueError, match=match):
        seg.with_settings(timestep=100)


def test_a_sound_tiny_folder_loads(tiny_folder):
    model = iseg.load_model(tiny_folder, device="cpu", verbose=False)
    assert model.family == "sd" and model.preset is None


def test_a_folder_in_sd_1_5_layout_with_its_safety_checker_entries_loads(tiny_folder, tmp_path):
    """SD 1.5's model_index.json lists its safety checker under the library "stable_diffusion" and a
    feature extractor: parts iSeg does not use, which the part checks must let through."""
    def sd15(f):
        _index(f, safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"])
        for part, file in (("safety_checker", "config.json"), ("feature_extractor", "preprocessor_config.json")):
            (f / part).mkdir()
            (f / part / file).write_text(json.dumps({"crop_size": 32, "size": 32} if part == "feature_extractor" else {}))

    model = iseg.load_model(_edited(tiny_folder, tmp_path, sd15), device="cpu", verbose=False)
    assert model.family == "sd" and model.pipe.safety_checker is None


# -- datasets ----------------------------------------------------------------------------------------
def _voc_with(tmp_path, image: Image.Image, label: np.ndarray, exif=None, label_image=None):
    from iseg.viz import label_png

    base = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    image.save(base / "JPEGImages" / "a.jpg", quality=95, **({"exif": exif} if exif is not None else {}))
    lab = label_image if label_image is not None else label_png(label)
    # PNG holds no signed 32-bit or float pixels; such a "label.png" is a TIFF under that name
    lab.save(base / "SegmentationClass" / "a.png", format="TIFF" if lab.mode in ("I", "F") else "PNG")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_bytes("\ufeffa\n".encode("utf-8"))
    from iseg.evaluation.datasets import open_dataset

    return open_dataset("voc", base, "val")


def test_dataset_images_with_an_exif_orientation_stay_on_their_labels_grid(tmp_path, seg):
    s = sample(7)
    image = s.image.crop((0, 0, 64, 48))  # not square: a turned image would not even fit its label
    label = s.mask[:48].astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to show"
    plain = _voc_with(tmp_path / "plain", image, label).load("a")
    turned = _voc_with(tmp_path / "tagged", image, label, exif=exif.tobytes())
    assert turned.ids == ["a"]  # the list's byte-order mark is not part of the name
    item = turned.load("a")
    assert item.image.size == (64, 48) and item.label.shape == (48, 64)
    np.testing.assert_array_equal(np.asarray(item.image), np.asarray(plain.image))
    classes = list(s.classes)
    tagged_result = seg.segment(item.image, classes)
    plain_result = seg.segment(plain.image, classes)
    np.testing.assert_array_equal(tagged_result.labels, plain_result.labels)


@pytest.mark.parametrize("make, match", [
    (lambda lab: Image.fromarray(lab > 0).convert("1"), r"is a 1-bit \(black and white\) mask"),
    (lambda lab: Image.fromarray(lab.astype(np.int32) - 3, mode="I"), r"holds values \[-3\b.*\] outside 0..20"),
    (lambda lab: Image.fromarray(lab.astype(np.float32) + 0.5, mode="F"), r"holds fractional values such as 0.5"),
])
def test_label_files_that_are_not_index_maps_are_refused(tmp_path, make, match):
    s = sample(7)
    label = s.mask.astype(np.uint8)
    dataset = _voc_with(tmp_path, s.image, label, label_image=make(label))
    from iseg.evaluation.datasets import DatasetError

    with pytest.raises(DatasetError, match=match):
        dataset.load("a")


def test_32_bit_label_files_with_class_ids_are_read(tmp_path):
    s = sample(7)
    label = s.mask.astype(np.uint8)
    dataset = _voc_with(tmp_path, s.image, label, label_image=Image.fromarray(label.astype(np.int32), mode="I"))
    np.testing.assert_array_equal(dataset.load("a").label, label)


def test_dataset_lists_and_splits_that_cannot_be_meant_are_refused(tmp_path):
    from iseg.evaluation.datasets import DatasetError, open_dataset

    s = sample(7)
    _voc_with(tmp_path, s.image, s.mask.astype(np.uint8))
    base = tmp_path / "VOC2012"
    for split in ("../../etc", "a/b", "", ".hidden"):
        with pytest.raises(DatasetError, match=r"is not a split name"):
            open_dataset("voc", base, split)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match=r"names 'a' more than once"):
        open_dataset("voc", base, "val")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_bytes(b"a\xff\n")
    with pytest.raises(DatasetError, match=r"is not UTF-8 text"):
        open_dataset("voc", base, "val")


@pytest.mark.parametrize("model, error, match", [
    ("", ValueError, "model is empty"),
    ("   ", ValueError, "model is empty"),
    (None, TypeError, "model must be a hub id, a folder or a shipped model's name, got NoneType"),
    (3, TypeError, "got int 3"),
])
def test_load_model_names_a_model_argument_that_is_no_model(model, error, match):
    with pytest.raises(error, match=match):
        iseg.load_model(model, device="cpu", verbose=False)


def test_make_settings_refuses_a_base_that_is_not_settings():
    with pytest.raises(iseg.SettingsError, match=r"base must be a Settings .* got dict; give single values as keyword"):
        iseg.make_settings(base={"lam": 1})
    assert iseg.make_settings(base=iseg.make_settings(lam=0.5), iterations=3).lam == 0.5


def test_iseg_of_none_says_a_loaded_model_is_needed():
    with pytest.raises(TypeError, match=r"ISeg takes a loaded model, got None"):
        iseg.ISeg(None)


@pytest.mark.parametrize("name, near", [("shape", "shapes"), ("shapes-mmdi", "shapes-mmdit"), ("shpaes", "shapes")])
def test_a_misspelt_shipped_name_is_refused_before_any_hub_lookup(tmp_path, monkeypatch, name, near):
    from iseg import loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "_load_hub", lambda *a, **k: pytest.fail("looked the name up on the hub"))
    with pytest.raises(iseg.ModelNotAvailableError, match=rf"did you mean {near!r}"):
        iseg.load_model(name, device="cpu", verbose=False)


@pytest.mark.parametrize("inside, message", [
    ("model_index.json", r"model_index.json is a file, not a model folder; give the folder that holds model_index.json \(.*shapes\)"),
    ("unet", r"unet is the unet/ part of the model folder .*shapes; give that folder"),
])
def test_a_file_or_part_of_a_model_folder_names_the_folder_to_give(inside, message):
    folder = iseg.shipped_models()["shapes"]
    with pytest.raises(iseg.ModelNotAvailableError, match=message):
        iseg.load_model(folder / inside, device="cpu", verbose=False)


def test_trace_reads_name_the_layer_class_token_or_head_that_is_not_there():
    """Before: a TypeError from the error message itself ('AttentionStore' object is not iterable), a bare
    tuple.index ValueError and a bare IndexError from inside torch."""
    seg = iseg.ISeg(iseg.load_model("shapes", device="cpu", verbose=False))
    s = sample(3)
    trace = seg.trace(s.image, list(s.classes), kind="cross")
    name = trace.layers("cross")[0].name
    with pytest.raises(KeyError, match=r"'nope' is not a captured layer; token maps are read from the cross-attention "
                                       r"layers: \['down_blocks"):
        trace.token_map("nope", 0)
    with pytest.raises(KeyError, match=r"'nope' was not captured; captured: \['down_blocks"):
        trace.store.mean("nope")
    with pytest.raises(IndexError, match=r"token must be a position 0\.\.23 of the prompt .*got 99"):
        trace.token_map(name, 99)
    with pytest.raises(IndexError, match=r"head must be one of 0\.\.3 of layer .*got 7"):
        trace.token_map(name, 2, head=7)
    with pytest.raises(ValueError, match=r"class 'dog' is not in this trace's prompt; its classes: \['circle'"):
        trace.class_map(name, "dog")
    both = seg.trace(s.image, list(s.classes))
    self_layer = both.layers("self")[0].name
    with pytest.raises(KeyError, match=r"is a self-attention layer; token maps are read from the cross-attention"):
        both.token_map(self_layer, 2)
    assert trace.token_map(name, 2, head=-1) == pytest.approx(trace.token_map(name, 2))   # -1: the heads' mean


@pytest.mark.parametrize("call, error, message", [
    (lambda r: r.labels_at(2, bg_power=-1), ValueError, r"power \(bg_power\) must be a finite number > 0, got -1"),
    (lambda r: r.labels_at(2, bg_power=0), ValueError, r"must be a finite number > 0, got 0"),
    (lambda r: r.labels_at(2, bg_power=float("nan")), ValueError, r"must be a finite number > 0, got nan"),
    (lambda r: r.labels_at(99), IndexError, r"iteration must be 0\.\.5 \(this result ran 5 refinement iterations"),
    (lambda r: r.scores(-7), IndexError, r"iteration must be 0\.\.5"),
    (lambda r: r.overlay(alpha=5), ValueError, r"alpha must be a number from 0 .* to 1 .*got 5"),
    (lambda r: r.overlay(alpha=-1), ValueError, r"alpha must be .*got -1"),
    (lambda r: iseg.maps_to_labels(torch.rand(2, 8, 8), "threshold", threshold=1.5), ValueError,
     r"threshold must be a number in \(0, 1\), got 1\.5"),
])
def test_label_rules_and_views_refuse_values_that_would_silently_give_background_or_garbage(call, error, message):
    """Every pixel background (bg_power <= 0 or NaN, a threshold above 1) or wrapped uint8 colours (alpha 5)."""
    r = iseg.ISeg(iseg.load_model("shapes", device="cpu", verbose=False)).segment(sample(3).image, list(sample(3).classes))
    with pytest.raises(error, match=message):
        call(r)


def test_a_tensor_batch_of_one_gives_a_list_as_an_array_batch_of_one_does(tiny_pipe):
    seg = iseg.ISeg(tiny_pipe)
    size = seg.plan().image_size
    batch = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    tensors = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    for one in (batch[:1], tensors[:1]):
        got = seg.segment(one, ["cat"])
        assert isinstance(got, list) and len(got) == 1   # a loader's last batch of one loops like any other
    a, b = seg.segment(batch[:1], ["cat"])[0], seg.segment(tensors[:1], ["cat"])[0]
    np.testing.assert_array_equal(a.labels, b.labels)


def test_a_nan_box_is_named_as_not_a_number_and_float16_on_a_cpu_loads_without_diffusers_false_warning(capfd):
    model = iseg.load_model("shapes", device="cpu", dtype="float16", verbose=False)
    err = capfd.readouterr().err
    assert "cannot run with `cpu` device" not in err, err   # it runs: finite maps, as float32's (test_numerics)
    seg = iseg.ISeg(model)
    with pytest.raises(ValueError, match=r"box \(0, 0, nan, 10\) has a coordinate that is not a finite number"):
        seg.segment_prompt(sample(3).image, box=(0, 0, float("nan"), 10))


def test_an_animated_gif_warns_that_only_its_first_frame_is_segmented(tmp_path):
    from iseg.images import load_image

    frames = [Image.new("RGB", (64, 64), c) for c in ((200, 0, 0), (0, 0, 200))]
    path = tmp_path / "two.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match=r"two\.gif has 2 frames; iSeg segments the first one only"):
        arr = load_image(path)
    assert arr[0, 0, 0] > 0.5 and arr[0, 0, 2] < 0.5   # the first, red frame


def test_the_plan_check_blames_what_was_given_and_leaves_trace_free():
    """Review findings on the check of the plan: trace reads every layer, so any size the model means is
    fine there; a preset that fits is not blamed for a size given with it; a two-pass setting is told which
    pass's size to change; the sizes listed follow the model's size step (4 for the MM-DiT)."""
    import diffusers

    shapes, mmdit = (iseg.load_model(n, device="cpu", verbose=False) for n in ("shapes", "shapes-mmdit"))
    s = sample(3)
    trace = iseg.ISeg(shapes).trace(s.image, list(s.classes), kind="self", image_size=128)   # as its docstring says
    assert trace.latent_side == 64
    bare = diffusers.StableDiffusionPipeline.from_pretrained(iseg.shipped_models()["shapes"])   # no registry entry
    with pytest.raises(iseg.presets.SettingsError, match=r"^image_size=128 asks for .* sizes that work are image_size=32 or 64$"):
        iseg.ISeg(bare, preset="shapes", image_size=128)
    assert iseg.ISeg(bare, preset="shapes").settings.cross_weights is not None
    with pytest.raises(iseg.presets.SettingsError, match=r"self_resolution=16, image_size=64 asks for .* no self-attention "
                                                         r"at resolution\(s\) \[16\].* sizes that work are self_image_size=64$"):
        iseg.ISeg(mmdit, self_resolution=16, image_size=64)
    with pytest.raises(iseg.presets.SettingsError, match=r"sizes that work are image_size=36$"):
        iseg.ISeg(mmdit, cross_weights={9: 1.0}, self_image_size=None, self_resolution=9)


def test_compare_view_gives_a_model_its_own_example_when_it_lacks_the_first_models_words(tiny_pipe):
    from iseg.course.explore import CompareView

    shapes = iseg.ISeg(iseg.load_model("shapes", device="cpu", verbose=False))
    view = CompareView({"photo model": iseg.ISeg(tiny_pipe), "shapes": shapes}, index=8, max_iterations=2)
    assert view.result("shapes", 8).classes == ("circle", "square", "cross")   # not the photo's words
    assert view.result("photo model", 8).classes != view.result("shapes", 8).classes
