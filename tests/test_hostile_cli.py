"""Hostile and careless input to the settings, ``iseg segment`` and ``iseg eval`` (issue 15 §3).

Every refusal must be one ``iseg: error: ...`` / ``iseg eval: error: ...`` line that names the
option, with exit status 2 and no traceback; nothing a user made is replaced or deleted unasked.
To keep a case from coming back, add a row to a table below.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iseg.commands import main as cli
from iseg.commands import segment as segment_command
from iseg.evaluation import run as ev
from iseg.labels import read_labels_file
from iseg.presets import _RULES, Settings, SettingsError, make_settings, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
CUDA = pytest.importorskip("torch").cuda.is_available()


def _one_error_line(err: str, prog: str) -> str:
    """The single error line of a refused command; fails on a traceback or on several error lines."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _eval_error_line(err: str) -> str:
    """The error line of a refused ``iseg eval``: ``iseg eval: error:`` when its options cannot be
    parsed, ``iseg: error:`` when a value is refused."""
    return _one_error_line(err, "iseg eval" if "iseg eval: error:" in err else "iseg")


# -- settings ----------------------------------------------------------------------------------------
def test_every_setting_has_a_rule():
    # a new Settings field must get a type and range rule in iseg.presets._RULES
    assert set(_RULES) == {f.name for f in fields(Settings)}


REFUSED_SETTINGS = [
    (dict(lam="a"), r"setting lam must be a finite number >= 0, got 'a'"),
    (dict(lam=math.inf), r"setting lam must be a finite number >= 0, got inf"),
    (dict(lam=math.nan), r"setting lam .* got nan"),
    (dict(lam=-1), r"setting lam must be a finite number >= 0, got -1"),
    (dict(gamma=math.inf), r"setting gamma must be a finite number > 0"),
    (dict(gamma=0), r"setting gamma must be a finite number > 0"),
    (dict(clamp_max=0), r"setting clamp_max must be null or a finite number > 0, got 0"),
    (dict(clamp_max=-1.0), r"setting clamp_max"),
    (dict(timestep=999.7), r"setting timestep must be an integer in \[0, 999\], got 999.7"),
    (dict(timestep=1000), r"setting timestep must be an integer in \[0, 999\], got 1000"),
    (dict(timestep="100"), r"setting timestep must be an integer"),
    (dict(iterations=True), r"setting iterations must be an integer in \[0, 1000\], got True"),
    (dict(iterations=10**6), r"setting iterations must be an integer in \[0, 1000\], got 1000000"),
    (dict(iterations=-1), r"setting iterations"),
    (dict(cluster_rounds=10**7), r"setting cluster_rounds must be an integer in \[1, 1000\]"),
    (dict(cluster_rounds=0), r"setting cluster_rounds"),
    (dict(seed=1.5), r"setting seed must be an integer in \[0, 2\*\*64\), got 1.5"),
    (dict(seed=-1), r"setting seed"),
    (dict(seed=2**64), r"setting seed"),
    (dict(batch_size=0), r"setting batch_size must be an integer >= 1, got 0"),
    (dict(batch_size=2.0), r"setting batch_size must be an integer >= 1, got 2.0"),
    (dict(image_size=4), r"setting image_size must be an integer in \[8, 4096\]"),
    (dict(image_size=512.0), r"setting image_size"),
    (dict(self_resolution=0), r"setting self_resolution must be an integer >= 1"),
    (dict(threshold=1.0), r"setting threshold must be a number in \(0, 1\)"),
    (dict(threshold=True), r"setting threshold"),
    (dict(bg_power=0), r"setting bg_power"),
    (dict(clustering="maybe"), r"setting clustering must be true or false \(also yes/no, 1/0\), got 'maybe'"),
    (dict(clustering=2), r"setting clustering"),
    (dict(clustering=None), r"setting clustering"),
    (dict(return_self_attention="on please"), r"setting return_self_attention"),
    (dict(aspect="crop"), r"setting aspect must be 'stretch' or 'pad', got 'crop'"),
    (dict(background=1), r"setting background must be 'power' or 'threshold'"),
    (dict(prompt_prefix=3), r"setting prompt_prefix must be text, got 3"),
    (dict(background_words="sky"), r"setting background_words must be a list of words, not one string 'sky'"),
    (dict(extra_words=["ok", 3]), r"setting extra_words must be a list of words"),
    (dict(cross_weights={16: 0, 8: 0}), r"setting cross_weights: the weights must not all be 0"),
    (dict(cross_weights={}), r"setting cross_weights must be null or a map"),
    (dict(cross_weights="16:1"), r"setting cross_weights must be null or a map .* got '16:1'"),
    (dict(cross_weights={16: -1}), r"setting cross_weights must be non-negative numbers as weights, got -1"),
    (dict(cross_weights={16: math.inf}), r"setting cross_weights must be non-negative numbers"),
    (dict(cross_weights={0: 1}), r"setting cross_weights: resolutions must be positive integers such as 16, got 0"),
    (dict(cross_weights={"x": 1}), r"resolutions must be positive integers such as 16, got 'x'"),
    (dict(cross_weights={1.5: 1}), r"resolutions must be positive integers"),
    (dict(cross_weights={16: 1, "16": 1}), r"setting cross_weights names a resolution twice"),
    (dict(cross_layers="some"), r"setting cross_layers must be 'auto' or 'all'"),
    (dict(cross_layers=[]), r"setting cross_layers must be 'auto', 'all' or a non-empty list of layer names"),
    (dict(self_layers=[1, 2]), r"setting self_layers must be 'auto', 'all' or a non-empty list"),
    (dict(cross_heads="reference"), r"setting cross_heads must be 'reference-voc'"),
    (dict(cross_heads={16: [-1]}), r"setting cross_heads must be a non-empty list of head positions"),
    (dict(cross_heads=[1, 2]), r"setting cross_heads must be null, 'reference-voc' or a map"),
    (dict(self_heads="reference-voc"), r"setting self_heads must be 'reference'"),
    (dict(self_heads=[]), r"setting self_heads must be a non-empty list of head positions"),
    (dict(self_heads=[True]), r"setting self_heads"),
]


@pytest.mark.parametrize("kwargs, message", REFUSED_SETTINGS, ids=[str(k) for k, _ in REFUSED_SETTINGS])
def test_bad_settings_are_refused_naming_the_setting(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        make_settings(**kwargs)
    # both old ways of catching a bad setting still work
    assert issubclass(SettingsError, ValueError) and issubclass(SettingsError, TypeError)


ACCEPTED_SETTINGS = [
    (dict(clustering="no"), "clustering", False),
    (dict(clustering="False"), "clustering", False),
    (dict(clustering=" YES "), "clustering", True),
    (dict(clustering="0"), "clustering", False),
    (dict(clustering=1), "clustering", True),
    (dict(return_self_attention="true"), "return_self_attention", True),
    (dict(iterations=np.int64(3)), "iterations", 3),
    (dict(iterations=1000), "iterations", 1000),
    (dict(lam=1), "lam", 1.0),
    (dict(lam=np.float32(0.5)), "lam", 0.5),
    (dict(cross_weights={"16": 1, "8": 0}), "cross_weights", {16: 1.0, 8: 0.0}),
    (dict(cross_heads={"16": [0, 2]}), "cross_heads", {16: (0, 2)}),
    (dict(self_heads=[1, 2]), "self_heads", (1, 2)),
    (dict(background_words=["sky"]), "background_words", ("sky",)),
    (dict(cross_layers=["a.b"]), "cross_layers", ("a.b",)),
    (dict(clamp_max=None), "clamp_max", None),
]


@pytest.mark.parametrize("kwargs, name, value", ACCEPTED_SETTINGS, ids=[str(k) for k, _, _ in ACCEPTED_SETTINGS])
def test_unambiguous_values_are_converted(kwargs, name, value):
    got = getattr(make_settings(**kwargs), name)
    # maps are held read-only (Settings is hashable), equal to the dict they were given as
    assert got == value and (type(got) is type(value) or (isinstance(value, dict) and dict(got) == value))


def test_settings_as_recorded_are_json_booleans():
    s = make_settings("shapes", clustering="False")
    assert json.loads(json.dumps(s.as_dict()))["clustering"] is False


PARSED = [
    (["clustering=False"], {"clustering": False}),
    (["clustering=no"], {"clustering": False}),
    (["clustering=true"], {"clustering": True}),
    (["lam=0.5", "iterations=3"], {"lam": 0.5, "iterations": 3}),
    (['cross_weights={"16": 1}'], {"cross_weights": {16: 1.0}}),
    (["prompt_prefix=1"], {"prompt_prefix": "1"}),  # text settings take the text as typed
    (["prompt_joiner= and a "], {"prompt_joiner": " and a "}),
    (["image_size=null"], {"image_size": None}),
    (['background_words=["sky", "sea"]'], {"background_words": ("sky", "sea")}),
]


@pytest.mark.parametrize("items, expected", PARSED, ids=[" ".join(i) for i, _ in PARSED])
def test_set_values_are_read_per_setting(items, expected):
    assert parse_overrides(items) == expected


@pytest.mark.parametrize("items, message", [
    (["seed=1.5"], r"setting seed must be an integer"),
    (["clustering=maybe"], r"setting clustering must be true or false"),
    (["cross_weights=16:1"], r"setting cross_weights must be null or a map"),
    (["lam=NaN"], r"setting lam .* got nan"),
    (["lam=Infinity"], r"setting lam .* got inf"),
    (["lamda=0.1"], r"did you mean 'lam'"),
    (["lam"], r"--set expects KEY=VALUE"),
    (["=3"], r"--set expects KEY=VALUE"),
])
def test_set_values_that_cannot_be_meant_are_refused(items, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(items)


# -- iseg segment ------------------------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.png"
    Image.open(SAMPLES / "shapes_2009001.png").save(path)
    return path


def _classes_file(tmp_path, content: bytes) -> str:
    path = tmp_path / "classes.json"
    path.write_bytes(content)
    return str(path)


SEGMENT_REFUSALS = [
    (["--device", "gpu"], r"--device: device 'gpu' is not a device name; use one of cpu"),
    pytest.param(["--device", "cuda"], r"--device: device 'cuda': CUDA is not available here",
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
    (["--device", "cuda:99"], r"--device: device 'cuda:99': (CUDA is not available|this machine has \d+ CUDA)"),
    (["--device", "meta"], r"--device: device 'meta' is not supported by iseg"),
    (["--set", "seed=1.5"], r"--set: setting seed must be an integer"),
    (["--set", "cross_weights=16:1"], r"--set: setting cross_weights must be null or a map"),
    (["--set", 'cross_weights={"16": 0, "8": 0}'], r"--set: setting cross_weights: the weights must not all be 0"),
    (["--set", "clustering=perhaps"], r"--set: setting clustering must be true or false"),
    (["--set", "iterations=1000000"], r"--set: setting iterations must be an integer in \[0, 1000\]"),
    (["--set", "batch_size=0"], r"--set: setting batch_size"),
    (["--preset", "wsss-vocc"], r"--preset: unknown preset 'wsss-vocc' \(did you mean 'wsss-voc'\?\)"),
    (["--out", "{image}"], r"--out .*x.png is a file, not a folder"),
    (["--out", "{image}/sub"], r"--out .*x.png is a file, not a folder"),
    (["--classes-file", "{classes:not json}"], r"--classes-file .*classes.json is not valid JSON: .* line 1 column 1"),
    (["--classes-file", "{classes:\xff\xfe[]}"], r"--classes-file .*classes.json is not UTF-8 text \(bad byte at line 1\)"),
    (["--classes-file", "{classes:[\"x.png\"]}"], r"--classes-file .*classes.json must hold a JSON object"),
    (["--classes-file", "{classes:{\"x.png\": \"cat,dog\"}}"], r"'x.png' has the text 'cat,dog'; give a list such as \[\"cat\", \"dog\"\]"),
    (["--classes-file", "{classes:{\"x.png\": 3}}"], r"the classes of 'x.png' must be a list of names \(or one name\), got 3"),
    (["--classes-file", "{classes:{\"y.png\": [\"cat\"]}}"], r"--classes-file .* has no classes for x.png"),
    (["--classes-file", "{tmp}/none.json"], r"--classes-file .*none.json does not exist"),
    (["--classes", "cat", "--classes-file", "{tmp}/none.json"], r"one of the two"),
    (["--classes-file", "{classes:{\"x.png\": [\"a\"], \"x.png\": [\"b\"]}}"], r"lists 'x.png' twice"),
    (["--classes-file", "{classes:{\"x.png\": []}}"], r"'x.png': the class list is empty"),
    (["--classes-file", "{classes:{\"x.png\": [\"star\"], \"x\": [\"circle\"]}}"],
     r"--classes-file .*classes.json has 2 keys for the image x.png \('x.png', 'x'\); keep one of them"),
    (["--classes", ",".join(["square"] * 20)], r"duplicate class name\(s\) \['square'\] in \['square', .*'square', "
                                                r"\.\.\.\] \(20 names\); give each class once$"),
    (["--classes", "square,,circle"], r"--classes 'square,,circle': empty class name"),
    (["--classes", "square,Square"], r"--classes 'square,Square': duplicate class name"),
    (["{image}"], r"image .*x.png is given twice"),
    (["--set", "image_size=128"], r"image_size=128 asks for attention layers this model does not have: .*the "
                                  r"sizes that work are image_size=32 or 64"),
    (["--preset", "shapes-mmdit"], r"preset 'shapes-mmdit' was chosen for the 'shapes-mmdit' model"),
    (["{tmp}/missing.png"], r"image not found: .*missing.png"),
]


def _fill(argv, tmp_path, image):
    out = []
    for a in argv:
        if a.startswith("{classes:"):
            out.append(_classes_file(tmp_path, a[len("{classes:"):-1].encode("latin-1")))
        else:
            out.append(a.replace("{image}", str(image)).replace("{tmp}", str(tmp_path)))
    return out


@pytest.mark.parametrize("argv, message", SEGMENT_REFUSALS, ids=[" ".join(p.values[0]) if hasattr(p, "values") else
                                                                 " ".join(p[0]) for p in SEGMENT_REFUSALS])
def test_segment_refusals_are_one_line_naming_the_option(tmp_path, image, capsys, argv, message):
    argv = _fill(argv, tmp_path, image)
    more_images = [a for a in argv if not a.startswith("-")] if not argv[0].startswith("-") else []
    options = argv[len(more_images):]
    has_classes = any(a.startswith("--classes") for a in options)
    rc = cli.main(["segment", str(image), *more_images, *([] if has_classes else ["--classes", "square"]),
                   "--model", "shapes", "--out", str(tmp_path / "out"), *options])
    assert rc == 2
    import re

    assert re.search(message, _one_error_line(capsys.readouterr().err, "iseg")), message
    if "--out" not in argv:
        assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("names", [["x.png", "x.jpg"], ["a/x.png", "b/x.png"]])
def test_a_classes_file_key_that_names_several_images_is_refused(tmp_path, capsys, names):
    images = []
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(SAMPLES / "shapes_2009001.png").save(tmp_path / name)
        images.append(str(tmp_path / name))
    key = "x" if names[0].endswith(".png") and names[1].endswith(".jpg") else "x.png"
    classes = _classes_file(tmp_path, json.dumps({key: ["star"]}).encode())
    assert cli.main(["segment", *images, "--classes-file", classes, "--model", "shapes", "--out",
                     str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert f"the key '{key}' names 2 images" in line and "give each its own key" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given, names", [
    (["a.png", "b.png"], ["a", "b"]),
    (["x.png", "x.jpg"], ["x.png", "x.jpg"]),
    (["a/x.png", "b/x.png"], ["a__x.png", "b__x.png"]),
    (["a/x.png", "b/x.png", "x.jpg"], ["a__x.png", "b__x.png", "x.jpg"]),
    (["X.png", "x.jpg"], ["X.png", "x.jpg"]),  # one file on case-insensitive file systems
    (["p/a/x.png", "q/a/x.png"], ["p__a__x.png", "q__a__x.png"]),
    (["x.png", "x.png.png"], ["x", "x.png"]),
    # x.png's second name equals x.png.png's first: both move on
    (["x.png", "x.jpg", "x.png.png"], ["{parent}__x.png", "x.jpg", "x.png.png"]),
])
def test_output_names_are_distinct_and_deterministic(tmp_path, given, names):
    paths = [tmp_path / g for g in given]
    names = [n.replace("{parent}", tmp_path.name) for n in names]
    assert segment_command.output_names(paths) == names
    assert segment_command.output_names(paths[::-1]) == names[::-1]  # the same names whatever the order


def test_segment_keeps_every_result_and_replaces_only_when_asked(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    Image.open(SAMPLES / "shapes_2009001.png").save(a / "x.png")
    Image.open(SAMPLES / "shapes_2009002.png").save(b / "x.png")
    # a byte-order mark is accepted, and one string is one class (not the letters of "circle")
    classes = tmp_path / "classes.json"
    classes.write_bytes(b"\xef\xbb\xbf" + json.dumps({str(a / "x.png"): "circle", str(b / "x.png"): ["star"]}).encode())
    out = tmp_path / "out"
    common = ["--classes-file", str(classes), "--model", "shapes", "--out", str(out), "--set", "iterations=1"]
    assert cli.main(["segment", str(a / "x.png"), str(b / "x.png"), *common]) == 0
    for name, cls, source in (("a__x.png", ["circle"], a / "x.png"), ("b__x.png", ["star"], b / "x.png")):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["image"] == str(source) and record["classes"] == cls
        assert Image.open(out / f"{name}.iterations.gif").n_frames == 2
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 8

    # a rerun into the same folder is refused, naming what it would replace; nothing changes
    assert cli.main(["segment", str(a / "x.png"), str(b / "x.png"), *common]) == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert "a__x.png.labels.png" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # with --overwrite: a link planted in the folder is replaced, not written through, and the old
    # animations go with --no-gif
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "a__x.png.labels.png").unlink()
    (out / "a__x.png.labels.png").symlink_to(victim)
    assert cli.main(["segment", str(a / "x.png"), str(b / "x.png"), *common, "--overwrite", "--no-gif"]) == 0
    err = capsys.readouterr().err
    assert "replacing 8 earlier file(s)" in err and "a__x.png.iterations.gif" in err
    assert victim.read_text() == "keep me"
    labels = out / "a__x.png.labels.png"
    assert not labels.is_symlink() and Image.open(labels).mode == "P"
    plain = tmp_path / "plain.txt"
    plain.write_text("")  # results get the permissions of any new file, not a temporary file's 0600
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {plain.stat().st_mode & 0o777}
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in before if not n.endswith(".gif"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_word_the_model_lacks_for_the_second_image_is_refused_before_the_first_result(tmp_path, capsys):
    """The classes of every image are checked when the model is loaded, not while segmenting: the first image's
    results were written, and the fixed command was then refused as "already holds results"."""
    from iseg.shapes import sample

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.asarray(sample(3).image)).save(a)
    Image.fromarray(np.asarray(sample(4).image)).save(b)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"a.png": ["circle"], "b.png": ["dog"]}))
    out = tmp_path / "out"
    assert cli.main(["segment", str(a), str(b), "--classes-file", str(classes), "--model", "shapes", "--out", str(out),
                     "--device", "cpu", "--no-gif"]) == 2
    assert "'dog'" in _one_error_line(capsys.readouterr().err, "iseg")
    assert not out.exists()
    classes.write_text(json.dumps({"a.png": ["circle"], "b.png": ["square"]}))   # the fixed command runs
    assert cli.main(["segment", str(a), str(b), "--classes-file", str(classes), "--model", "shapes", "--out", str(out),
                     "--device", "cpu", "--no-gif"]) == 0
    assert sorted(p.name for p in out.glob("*.labels.png")) == ["a.labels.png", "b.labels.png"]


def test_overwrite_replaces_only_iseg_results_and_keeps_a_users_files_of_the_same_names(tmp_path, image, capsys):
    """--overwrite replaced (or, with --no-gif, deleted) any file named like a result: the user's notes in x.json,
    a PNG saved as x.iterations.gif."""
    out = tmp_path / "out"
    out.mkdir()
    notes, fake_gif = out / "x.json", out / "x.iterations.gif"
    for mine, content in ((notes, b'{"my": "tax records"}'), (fake_gif, b"\x89PNG\r\n\x1a\nnot a gif")):
        mine.write_bytes(content)
        others = [p for p in (notes, fake_gif) if p != mine]
        for p in others:
            p.unlink(missing_ok=True)
        rc = cli.main(["segment", str(image), "--classes", "square", "--model", "shapes", "--out", str(out),
                       "--overwrite", "--no-gif", "--device", "cpu"])
        assert rc == 2
        line = _one_error_line(capsys.readouterr().err, "iseg")
        assert f"--overwrite replaces only earlier iseg results, and {mine} is not one" in line, line
        assert mine.read_bytes() == content and sorted(p.name for p in out.iterdir()) == [mine.name]
    fake_gif.unlink()
    args = ["segment", str(image), "--classes", "square", "--model", "shapes", "--out", str(out), "--device", "cpu"]
    assert cli.main(args) == 0 and cli.main([*args, "--overwrite"]) == 0   # its own results are replaced


# -- iseg eval ---------------------------------------------------------------------------------------
EVAL = ["--dataset", "shapes", "--limit", "2", "--batch-size", "2", "--no-progress", "--device", "cpu"]

EVAL_REFUSALS = [
    (["--limit", "-5"], r"--limit must be at least 1 .* got -5"),
    (["--limit", "0"], r"--limit must be at least 1"),
    (["--batch-size", "0"], r"--batch-size: setting batch_size must be an integer >= 1, got 0"),
    (["--batch-size", "-3"], r"--batch-size: setting batch_size must be an integer >= 1, got -3"),
    (["--clustering", "maybe"], r"--clustering: setting clustering must be true or false"),
    (["--cross-weights", "16:1"], r"--cross-weights: setting cross_weights must be null or a map"),
    (["--cross-weights", '{"16": 0, "8": 0}'], r"--cross-weights: setting cross_weights: the weights must not all be 0"),
    (["--set", "seed=1.5"], r"--set: setting seed must be an integer"),
    (["--lam=-1"], r"--lam: setting lam must be a finite number >= 0, got -1"),
    (["--timestep", "999.7"], r"--timestep: setting timestep must be an integer"),
    (["--iterations", "true"], r"--iterations: setting iterations must be an integer"),
    (["--device", "gpu"], r"--device: device 'gpu' is not a device name"),
    pytest.param(["--device", "cuda"], r"--device: device 'cuda': CUDA is not available here",
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
    (["--preset", "shape"], r"--preset: unknown preset 'shape' \(did you mean 'shapes'\?\)"),
    (["--out", "{file}"], r"--out .*notes.txt is a file, not a folder"),
    (["--task", "ovs", "--labels", "{tmp}/none.json"], r"--labels .*none.json does not exist"),
    (["--compile", "cuda-graph"], r"--compile: CUDA graphs need"),
    # settings the model cannot follow: refused before the run's folder is made (it held run.json, and the fixed
    # command was then refused as "other settings")
    (["--image-size", "96"], r"image_size=96 asks for attention layers this model does not have: .*\[16\] for a "
                             r"48x48 latent.* the sizes that work are image_size=32 or 64"),
    (["--preset", "shapes-mmdit"], r"preset 'shapes-mmdit' was chosen for the 'shapes-mmdit' model, and this is the "
                                   r"'shapes' model \(sd\): leave preset out"),
]


@pytest.mark.parametrize("argv, message", EVAL_REFUSALS, ids=[" ".join(p.values[0]) if hasattr(p, "values") else
                                                              " ".join(p[0]) for p in EVAL_REFUSALS])
def test_eval_refusals_are_one_line_naming_the_option(tmp_path, capsys, argv, message):
    import re

    (tmp_path / "notes.txt").write_text("mine")
    argv = [a.replace("{file}", str(tmp_path / "notes.txt")).replace("{tmp}", str(tmp_path)) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    if CUDA and "--compile" in argv:
        pytest.skip("CUDA graphs work here")
    assert cli.main(["eval", *EVAL, *out, *argv]) == 2
    assert re.search(message, _eval_error_line(capsys.readouterr().err)), message
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished shapes run (2 images, clustering given as the text False)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(["eval", *EVAL, "--out", str(out), "--clustering", "False"]) == 0
    return out


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_boolean_text_is_recorded_as_a_boolean(finished_run):
    for name in ("metrics.json", "run.json"):
        assert json.loads((finished_run / name).read_text())["settings"]["clustering"] is False


def test_run_json_records_what_changes_the_numbers(finished_run):
    run = json.loads((finished_run / "run.json").read_text())
    assert (run["dtype"], run["device"], run["compile"], run["compile_vae"]) == ("float32", "cpu", None, False)
    assert (run["limit"], run["images"], run["save_masks"], run["clip_model"]) == (2, 2, True, None)
    assert (run["dataset"], run["split"], run["model"], run["label_source"]) == ("shapes", "test", "shapes", "gt")


@pytest.mark.parametrize("argv, differs", [
    (["--lam", "0.5"], "settings.lam"), (["--limit", "3"], "limit (2 there, 3 now)"),
    (["--dtype", "float16"], 'dtype ("float32" there, "float16" now)')])
def test_resuming_with_other_options_is_refused_before_the_model_loads(finished_run, capsys, monkeypatch, argv,
                                                                        differs):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the run folder was checked")

    monkeypatch.setattr(ev, "load_model", refuse)
    before = _snapshot(finished_run)
    i = EVAL.index("--limit")
    base = EVAL[:i] + EVAL[i + 2:] + ([] if "--limit" in argv else ["--limit", "2"])
    assert cli.main(["eval", *base, "--out", str(finished_run), "--clustering", "False", *argv]) == 2
    line = _eval_error_line(capsys.readouterr().err)
    assert differs in line and "--restart" in line
    assert _snapshot(finished_run) == before


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "bfloat16"], r'dtype \("float32" there, "bfloat16" now\)'),
    (["--iterations", "3"], r"settings.iterations \(5 there, 3 now\)"),
    (["--limit", "3"], r"limit \(2 there, 3 now\)"),
])
def test_a_resume_with_other_options_is_refused_naming_them(finished_run, capsys, argv, message):
    import re

    before = _snapshot(finished_run)
    # the last of two --limit options wins, as argparse reads them
    assert cli.main(["eval", *EVAL, "--out", str(finished_run), "--clustering", "False", *argv]) == 2
    line = _eval_error_line(capsys.readouterr().err)
    assert re.search(message, line) and "--restart" in line and "another --out" in line
    assert _snapshot(finished_run) == before


def test_restart_refuses_a_folder_without_a_run_and_deletes_nothing(tmp_path, capsys):
    folder = tmp_path / "thesis"
    (folder / "masks").mkdir(parents=True)
    (folder / "masks" / "figure.png").write_bytes(b"mine")
    (folder / "results.md").write_text("# my results")
    before = _snapshot(folder)
    assert cli.main(["eval", *EVAL, "--out", str(folder), "--restart"]) == 2
    line = _eval_error_line(capsys.readouterr().err)
    assert "--restart" in line and "no iseg eval run.json" in line and "nothing was deleted" in line
    assert _snapshot(folder) == before


def test_restart_with_a_bad_option_keeps_the_run(finished_run, capsys):
    before = _snapshot(finished_run)
    assert cli.main(["eval", *EVAL, "--out", str(finished_run), "--restart", "--lam=-1"]) == 2
    assert "--lam" in _eval_error_line(capsys.readouterr().err)
    assert _snapshot(finished_run) == before


def test_restart_deletes_only_what_the_run_made(tmp_path, finished_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("mine")
    (run / "masks" / "figure.png").write_bytes(b"mine")
    (run / "records" / "my-notes.jsonl").write_text("{}")
    old_parts = sorted(p.name for p in (run / "records").glob("part-*.jsonl"))
    assert cli.main(["eval", *EVAL, "--out", str(run), "--restart", "--iterations", "2"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "masks" / "figure.png").read_bytes() == b"mine"
    assert (run / "records" / "my-notes.jsonl").read_text() == "{}"
    new_parts = sorted(p.name for p in (run / "records").glob("part-*.jsonl"))
    assert len(new_parts) == 1 and not set(new_parts) & set(old_parts)
    assert json.loads((run / "run.json").read_text())["settings"]["iterations"] == 2
    assert sorted(p.name for p in (run / "masks").iterdir()) == ["2000000.png", "2000001.png", "figure.png"]


def test_save_masks_on_a_resumed_run_writes_every_mask(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["eval", *EVAL, "--out", str(out), "--no-save-masks"]) == 0
    assert not (out / "masks").exists()
    first = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", *EVAL, "--out", str(out), "--save-masks"]) == 0
    assert "2 image(s) recorded earlier have no mask" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["2000000.png", "2000001.png"]
    again = json.loads((out / "metrics.json").read_text())
    assert again["miou"] == first["miou"] and again["counts"] == first["counts"]
    assert json.loads((out / "run.json").read_text())["save_masks"] is True


# -- labels files ------------------------------------------------------------------------------------
VOCAB = ["circle", "square", "star"]


@pytest.mark.parametrize("name, content, expected", [
    ("l.csv", b"\xef\xbb\xbfid,labels\r\n1,star;circle\r\n2,square\r\n", {"1": ("circle", "star"), "2": ("square",)}),
    ("l.csv", b"\xef\xbb\xbf1,star\n", {"1": ("star",)}),  # no header: the BOM must not become part of the id
    ("l.json", b'\xef\xbb\xbf{"1": ["star"]}', {"1": ("star",)}),
])
def test_labels_files_with_a_byte_order_mark_are_read(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    assert read_labels_file(path, VOCAB) == expected


@pytest.mark.parametrize("name, content, message", [
    ("l.csv", b"1,star\n2,sq\xe9are\n", r"l.csv is not UTF-8 text \(byte 0xe9 on line 2\)"),
    ("l.json", b'{"1": ["st\xffar"]}', r"l.json is not UTF-8 text \(byte 0xff on line 1\)"),
    ("l.csv", b"id,labels\n1,star\n2,circle\n1,square\n", r"lists image '1' twice \(lines 2 and 4\)"),
    ("l.json", b'{"1": ["star"], "1": ["circle"]}', r"lists image '1' twice"),
])
def test_bad_labels_files_are_refused_naming_file_and_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_labels_file(path, VOCAB)


def test_the_library_names_a_bad_device():
    import iseg

    with pytest.raises(ValueError, match="device 'gpu' is not a device name; use one of cpu"):
        iseg.loading.load_pipeline("shapes", device="gpu", verbose=False)


# -- no traceback from the installed commands --------------------------------------------------------
@pytest.mark.parametrize("argv, prog", [
    (["-m", "iseg", "segment", "{image}", "--classes", "square", "--device", "gpu"], "iseg"),
    (["-m", "iseg", "eval", "--dataset", "shapes", "--limit", "-5", "--out", "{tmp}/run"], "iseg"),
])
def test_commands_exit_2_without_a_traceback(tmp_path, image, argv, prog):
    argv = [a.replace("{image}", str(image)).replace("{tmp}", str(tmp_path)) for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    _one_error_line(done.stderr, prog)


def test_segment_never_writes_over_an_input_image(tmp_path, capsys):
    # x.png's label map is x.labels.png: when that is also an image being segmented, even
    # --overwrite must not replace it
    folder = tmp_path / "o"
    folder.mkdir()
    Image.open(SAMPLES / "shapes_2009001.png").save(folder / "x.png")
    Image.open(SAMPLES / "shapes_2009002.png").save(folder / "x.labels.png")
    before = (folder / "x.labels.png").read_bytes()
    argv = ["segment", str(folder / "x.png"), str(folder / "x.labels.png"), "--classes", "circle", "--model", "shapes",
            "--out", str(folder), "--overwrite"]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert "over the input image" in line and "x.labels.png" in line
    assert (folder / "x.labels.png").read_bytes() == before


# -- second pass (issue 32): the CLI's new surfaces ------------------------------------------------------
def test_names_that_differ_only_in_case_get_distinct_outputs_at_once(tmp_path):
    # X.png and x.png were once a loop that never ended (folders cannot tell them apart)
    paths = [tmp_path / "X.png", tmp_path / "x.png", tmp_path / "y.png"]
    assert segment_command.output_names(paths) == ["X-1", "x-2", "y"]
    assert segment_command.output_names(paths[::-1]) == ["y", "x-2", "X-1"]
    nested = [tmp_path / "a" / "X.png", tmp_path / "a" / "x.png", tmp_path / "b" / "X.png", tmp_path / "b" / "x.png"]
    names = segment_command.output_names(nested)
    assert len({n.casefold() for n in names}) == 4


@pytest.mark.parametrize("name, message", [
    ("\ufeffx.png", r"image not found: '\\ufeffx.png' \(its name holds invisible characters; did you mean x.png\?\)"),
    ("\ufeffy.png", r"image not found: '\\ufeffy.png' \(its name holds invisible characters, shown escaped\)"),
])
def test_an_image_name_with_a_byte_order_mark_is_shown_escaped(tmp_path, image, capsys, monkeypatch, name, message):
    import re

    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["segment", name, "--classes", "square", "--model", "shapes", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, "iseg"))


def _no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(segment_command, "load_model", refuse)


def test_segment_refuses_names_too_long_for_the_file_system_before_the_model_loads(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    # NAME.iterations.gif of a 245-character file name is 256 bytes: refused at once (240 characters work)
    longer = tmp_path / ("n" * 241 + ".png")
    Image.open(SAMPLES / "shapes_2009001.png").save(longer)
    capsys.readouterr()
    assert cli.main(["segment", str(longer), "--classes", "square", "--model", "shapes", "--out", str(tmp_path / "o2")]) == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert "bytes long" in line and "allows 255" in line
    assert not (tmp_path / "o2").exists()


def test_segment_writes_results_of_a_240_character_name(tmp_path, capsys):
    long = tmp_path / ("n" * 236 + ".png")
    Image.open(SAMPLES / "shapes_2009001.png").save(long)
    out = tmp_path / "out"
    assert cli.main(["segment", str(long), "--classes", "square", "--model", "shapes", "--out", str(out)]) == 0
    assert sorted(p.name[236:] for p in out.iterdir()) == [".iterations.gif", ".json", ".labels.png", ".overlay.png"]


@pytest.mark.parametrize("make, message", [
    (lambda t: os.symlink(t / "nowhere", t / "out"), r"--out .*out is a symbolic link to .*nowhere, which does not exist"),
    (lambda t: (t / "ro").mkdir(mode=0o555), r"--out .*: the folder .*ro is not writable"),
])
def test_segment_checks_the_output_folder_before_the_model_loads(tmp_path, image, capsys, monkeypatch, make, message):
    import re

    if os.geteuid() == 0 and "ro" in message:
        pytest.skip("root writes anywhere")
    _no_model(monkeypatch)
    make(tmp_path)
    out = tmp_path / "out" if (tmp_path / "out").is_symlink() else tmp_path / "ro" / "sub"
    assert cli.main(["segment", str(image), "--classes", "square", "--model", "shapes", "--out", str(out)]) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, "iseg"))


def test_a_write_killed_midway_leaves_nothing_behind_after_the_next_run(tmp_path, image, capsys):
    from iseg.commands.files import stale_temporaries, write_atomic

    out = tmp_path / "out"
    out.mkdir()
    # what kill -9 between creating the temporary file and renaming it leaves: a hidden 0-byte file
    stale = out / ".x.labels.png.k2j4h5g1.png"
    stale.write_bytes(b"")
    mine = out / ".notes.txt"
    mine.write_text("not ours")
    assert stale_temporaries(out / "x.labels.png") == [stale]
    assert cli.main(["segment", str(image), "--classes", "square", "--model", "shapes", "--out", str(out)]) == 0
    assert not stale.exists() and mine.read_text() == "not ours"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".notes.txt"]

    def fail(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    before = (out / "x.json").read_text()
    with pytest.raises(RuntimeError):
        write_atomic(out / "x.json", fail)
    assert (out / "x.json").read_text() == before  # the old file, whole
    assert not stale_temporaries(out / "x.json")


def test_run_json_is_replaced_whole_never_rewritten_in_place(tmp_path, monkeypatch):
    # a kill while run.json is written must leave the old record (else the run can neither resume nor restart)
    out = tmp_path / "run"
    argv = ["--dataset", "shapes", "--limit", "2", "--batch-size", "2", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert cli.main(["eval", *argv]) == 0
    before = (out / "run.json").read_text()
    inode = (out / "run.json").stat().st_ino

    from iseg.commands import files as safe_files

    def killed(target, save):
        raise KeyboardInterrupt  # as if killed inside the write

    monkeypatch.setattr(safe_files, "write_atomic", killed)
    monkeypatch.setattr(ev, "write_json", lambda target, value: killed(target, None))
    assert cli.main(["eval", *argv]) == 130
    assert (out / "run.json").read_text() == before
    monkeypatch.undo()
    assert cli.main(["eval", *argv]) == 0  # it resumes
    assert (out / "run.json").stat().st_ino != inode  # replaced by a rename, not written through


def _train(tmp_path, *extra):
    return cli.main(["train-shapes", "--out", str(tmp_path / "m"), "--images", "8", "--workers", "1", "--device", "cpu", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--images", "0"], r"--images must be a whole number >= 1, got 0"),
    (["--images", "2000000"], r"--images 2000000: the training split has 1,000,000 images"),
    (["--batch-size", "0"], r"--batch-size must be a whole number >= 1, got 0"),
    (["--vae-batch", "-2"], r"--vae-batch must be a whole number >= 1"),
    (["--save-every", "0"], r"--save-every must be a whole number >= 1, got 0"),
    (["--log-every", "0"], r"--log-every must be a whole number >= 1"),
    (["--warmup", "0"], r"--warmup must be a whole number >= 1"),
    (["--unet-steps", "-1"], r"--unet-steps must be a whole number >= 1"),
    (["--unet-steps", "0"], r"--unet-steps must be a whole number >= 1, got 0"),
    (["--attn-loss-max-t", "5000"], r"--attn-loss-max-t 5000 is outside the noise schedule's timesteps: .* from 1 to 1000"),
    (["--attn-loss-max-t", "-5"], r"--attn-loss-max-t -5 is outside the noise schedule's timesteps"),
    (["--attn-loss-max-t", "0"], r"--attn-loss-max-t 0 is outside .*set --ground, --group and --vocab to 0"),
    (["--threads", "-1"], r"--threads must be at least 1"),
    (["--threads", "0"], r"--threads must be at least 1"),
    (["--threads", "100000"], r"--threads 100000 is more than 4x this machine's \d+ CPUs"),
    (["--workers", "1000000"], r"--workers 1000000 is more than 4x this machine's \d+ CPUs"),
    (["--seed", str(10**20)], r"--seed must be a whole number from 0 to 2\*\*63 - 4, got 100000000000000000000"),
    (["--seed", "-1"], r"--seed must be a whole number"),
    (["--lr", "0"], r"--lr is a learning rate"),
    (["--vae-lr", "inf"], r"--vae-lr is a learning rate"),
    (["--ema", "1"], r"--ema is a decay"),
    (["--init-parts", "vae"], r"--init-parts vae chooses the parts --init loads, but no --init is given"),
    (["--time-limit", "-5"], r"--time-limit is a number of seconds"),
    # the second pass's probes: a batch of 10**9 hung (or failed after minutes on a 12 TB allocation), and so did
    # 10**8 transformer blocks
    (["--batch-size", str(10**9)], r"--batch-size 1000000000 is more than 4,096 images per denoiser step; give at most"),
    (["--vae-batch", str(10**9)], r"--vae-batch 1000000000 is more than 4,096 images per VAE step"),
    (["--family", "sd3", "--layers", str(10**8)], r"--layers 100000000 is more than 64 transformer blocks .*default is 4"),
])
def test_train_shapes_numbers_are_checked_naming_the_option(tmp_path, capsys, extra, message):
    import re

    assert _train(tmp_path, *extra) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, "iseg"))
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.work").exists()


def test_train_shapes_seed_as_a_float_is_one_error_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "iseg", "train-shapes", "--out", str(tmp_path / "m"), "--seed", "1e20"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "argument --seed: invalid int value: '1e20'" in done.stderr
    assert not (tmp_path / "m.work").exists()


@pytest.fixture
def finished_model(tmp_path):
    """An --out that holds a finished model (its files stand in for one), and its empty work folder."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (model / "training.json").write_text("{}")
    return model


def _unchanged(model: Path) -> bool:
    return sorted(p.name for p in model.iterdir()) == ["model_index.json", "training.json"]


def test_resume_without_a_checkpoint_never_replaces_a_finished_model(tmp_path, finished_model, capsys):
    assert _train(tmp_path, "--resume") == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert "has no checkpoint.pt, so the run would start over and replace the model" in line and "--overwrite" in line
    assert _unchanged(finished_model) and not (tmp_path / "m.work").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("write, message", [
    (lambda p: __import__("torch").save({"args": {}, "x": _RunsCode()}, p),
     r"checkpoint.pt holds more than tensors and plain data \(unsupported GLOBAL posix.system.*\), so it was not loaded"),
    (lambda p: p.write_bytes(b""), r"checkpoint.pt is not a readable checkpoint"),
    (lambda p: (__import__("torch").save({"args": {}, "w": __import__("torch").zeros(1000)}, p),
                p.write_bytes(p.read_bytes()[:700])), r"checkpoint.pt is not a readable checkpoint \(cut short"),
    (lambda p: __import__("torch").save(__import__("torch").zeros(3), p), r"checkpoint.pt is not a checkpoint of iseg train-shapes"),
    (lambda p: p.write_text("not a checkpoint"), r"checkpoint.pt is not a readable checkpoint"),
    (lambda p: __import__("torch").save({"args": {"family": "sd3"}}, p),
     r"checkpoint.pt is a run with --family sd3, not unet; resume it with --family sd3"),
], ids=["pickle-runs-code", "empty", "truncated", "foreign", "text", "other-family"])
def test_resume_refuses_checkpoints_that_are_not_ours_naming_the_file(tmp_path, finished_model, capsys, monkeypatch,
                                                                      write, message):
    import re

    work = tmp_path / "m.work"
    work.mkdir()
    write(work / "checkpoint.pt")
    before = (work / "checkpoint.pt").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert _train(tmp_path, "--resume") == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, "iseg"))
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran
    assert _unchanged(finished_model) and (work / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pt"]


def _checkpoint_of(tmp_path, *argv):
    """WORKDIR/checkpoint.pt of a run started with ``_train(tmp_path, *argv)`` (its recorded options only)."""
    import argparse

    import torch

    from iseg.shapes.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "m"), "--images", "8", "--workers", "1", "--device", "cpu", *argv])
    work = tmp_path / "m.work"
    work.mkdir()
    torch.save({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, work / "checkpoint.pt")


def test_resume_with_other_run_options_is_refused_listing_them(tmp_path, capsys):
    import re

    _checkpoint_of(tmp_path, "--lr", "3e-4")
    assert _train(tmp_path, "--resume", "--images", "16", "--seed", "3", "--ground", "0.5", "--unet-steps", "9") == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert re.search(r"checkpoint.pt is a run with other settings: --images 16 \(the run started with 8\); --seed 3 "
                     r"\(the run started with 0\)\. .*What may change on resume: the step counts", line)
    assert "--ground" not in line.split("What may change")[0]  # a loss weight is a curriculum step, not refused
    assert sorted(p.name for p in (tmp_path / "m.work").iterdir()) == ["checkpoint.pt"]


def test_resume_says_which_curriculum_options_changed(tmp_path):
    import argparse
    import contextlib
    import io

    import torch

    from iseg.shapes.train import load_checkpoint

    _checkpoint_of(tmp_path)
    path = tmp_path / "m.work" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)["args"]
    args = argparse.Namespace(**{**saved, "lr": 1e-3, "unet_steps": 5, "save_every": 7})
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        load_checkpoint(path, args)
    assert buffer.getvalue() == "--resume: continuing with --lr 0.001 (the run started with 0.0003)\n"


@pytest.mark.parametrize("extra", [["--resume"], []])
def test_a_checkpoint_that_is_a_directory_is_refused_before_training(tmp_path, capsys, extra):
    (tmp_path / "m.work" / "checkpoint.pt").mkdir(parents=True)
    assert _train(tmp_path, *extra) == 2
    assert "checkpoint.pt is a directory, not a checkpoint file" in _one_error_line(capsys.readouterr().err,
                                                                                     "iseg")
    assert sorted(p.name for p in (tmp_path / "m.work").iterdir()) == ["checkpoint.pt"]
    assert not (tmp_path / "m").exists()


def test_train_shapes_init_takes_a_shipped_models_name(tmp_path, capsys, monkeypatch):
    import iseg
    from iseg.commands.options import CommandError
    from iseg.shapes import train

    seen = []

    def stop(args):  # the checks after --init's: stop the run there
        raise CommandError("stopped before training")

    monkeypatch.setattr(train, "check_init_parts", lambda parts, family, folder: seen.append(folder))
    monkeypatch.setattr(train, "check_loss_weights", stop)
    assert _train(tmp_path, "--init", "shapes", "--init-parts", "vae") == 2
    assert "stopped before training" in _one_error_line(capsys.readouterr().err, "iseg")
    assert seen == [iseg.shipped_models()["shapes"]]
    assert _train(tmp_path, "--init", "SHAPES") == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert "--init 'SHAPES' is not a model folder; did you mean the shipped model 'shapes' (folder " in line


def test_train_shapes_refuses_a_dangling_link_as_out(tmp_path, capsys):
    os.symlink(tmp_path / "gone", tmp_path / "m")
    assert _train(tmp_path) == 2
    assert "is a symbolic link to" in _one_error_line(capsys.readouterr().err, "iseg")
    assert not (tmp_path / "m.work").exists()


@pytest.mark.parametrize("content, message", [
    (b"not an image", r"image .*bad.png cannot be read as an image"),
    (None, r"image .*bad.png cannot be read as an image"),  # a PNG cut short
    ("tiny", r"image .*bad.png is 4x4 pixels; iSeg needs at least 8x8"),
])
def test_segment_reads_every_image_header_before_the_model_loads(tmp_path, image, capsys, monkeypatch, content, message):
    import re

    _no_model(monkeypatch)
    bad = tmp_path / "bad.png"
    if content is None:
        bad.write_bytes(image.read_bytes()[:-30])
    elif content == "tiny":
        Image.new("RGB", (4, 4)).save(bad)
    else:
        bad.write_bytes(content)
    out = tmp_path / "out"
    assert cli.main(["segment", str(image), str(bad), "--classes", "square", "--model", "shapes", "--out", str(out)]) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, "iseg"))
    assert not out.exists()


def test_segment_reads_a_long_thin_image(tmp_path, capsys):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (9000, 12), (200, 30, 30)).save(strip)
    out = tmp_path / "out"
    assert cli.main(["segment", str(strip), "--classes", "square", "--model", "shapes", "--out", str(out),
                     "--no-gif"]) == 0
    assert Image.open(out / "strip.labels.png").size == (9000, 12)


@pytest.mark.parametrize("prepare, argv, message", [
    (lambda t: os.symlink(t / "gone", t / "run"), [], r"--out .*run is a symbolic link to .*gone, which does not exist"),
    (lambda t: ((t / "run").mkdir(), (t / "run" / "run.json").write_text("")), [],
     r"run.json is not the record of an iseg eval run; use another --out"),
    (lambda t: ((t / "run").mkdir(), (t / "run" / "run.json").write_text("{")), ["--restart"],
     r"--restart: .*run.json is not an iseg eval run.json.*nothing was deleted"),
    (lambda t: None, ["--task", "wsss", "--labels", "{labels}"], r"--task wsss uses the ground-truth image labels"),
    (lambda t: None, ["--task", "ovs", "--labels", "{labels}"], r"not a shapes class|has no entry|is not"),
])
def test_eval_checks_its_inputs_before_the_model_loads(tmp_path, capsys, monkeypatch, prepare, argv, message):
    import re

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(ev, "load_model", refuse)
    prepare(tmp_path)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"2000000": ["dog"]}))
    argv = [a.replace("{labels}", str(labels)) for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(["eval", *EVAL, "--out", str(tmp_path / "run"), *argv]) == 2
    assert re.search(message, _eval_error_line(capsys.readouterr().err)), message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing deleted


@pytest.mark.parametrize("extra, message", [
    (["--init", "{tmp}"], r"--init .* is not a model folder \(it has no model_index.json\)"),
    (["--init", "{shapes}", "--init-parts", "vae,unet,bogus"], r"unknown --init-parts \['bogus'\]"),
    (["--init", "{shapes}", "--init-parts", "transformer"], r"--init-parts \['transformer'\] do not fit a unet model"),
    (["--init", "{shapes}", "--init-parts", "unet"], r"needs the folder's VAE too"),
    (["--init", "{shapes}", "--init-parts", "vae,text_encoder", "--family", "sd3", "--init", "{empty_model}"],
     r"has no vae/ \(with its config.json\)"),
])
def test_train_shapes_checks_init_before_rendering(tmp_path, capsys, extra, message):
    import re

    import iseg

    empty_model = tmp_path / "empty"
    empty_model.mkdir()
    (empty_model / "model_index.json").write_text("{}")
    extra = [a.replace("{tmp}", str(tmp_path)).replace("{shapes}", str(iseg.shipped_models()["shapes"]))
             .replace("{empty_model}", str(empty_model)) for a in extra]
    assert _train(tmp_path, *extra) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err, "iseg"))
    assert not (tmp_path / "m.work").exists()


def test_an_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, image, capsys, monkeypatch):
    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["segment", str(image), "--classes", "square", "--model", "shapes", "--out", ""]) == 2
    assert "--out is empty" in _one_error_line(capsys.readouterr().err, "iseg")
    assert _train(tmp_path, "--out", "") == 2  # the last --out wins
    assert "does not name a model folder" in _one_error_line(capsys.readouterr().err, "iseg")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_restart_also_removes_what_killed_writes_of_the_run_left(tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "shapes", "--limit", "2", "--batch-size", "2", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert cli.main(["eval", *argv]) == 0
    mask = sorted((out / "masks").glob("*.png"))[0]
    stale = [out / "masks" / f".{mask.name}.a1b2c3d4.png", out / ".run.json.zz9y8x7w.json"]
    for path in stale:
        path.write_bytes(b"")
    mine = out / "masks" / "mine.txt"
    mine.write_text("keep")
    assert cli.main(["eval", *argv, "--restart"]) == 0
    assert not any(p.exists() for p in stale) and mine.read_text() == "keep"


def test_checkpoints_of_earlier_runs_with_paths_still_load(tmp_path):
    import argparse

    import torch

    from iseg.commands.options import CommandError
    from iseg.shapes.train import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    # runs before weights_only=True recorded their options with Path objects
    torch.save({"args": {"out": Path("m"), "init": Path("/x"), "family": "unet", "latent_side": 16},
                "vae": {"w": torch.ones(2)}, "vae_step": 3}, path)
    options = dict(family="unet", latent_side=16, layers=4, patch_size=1)
    state = load_checkpoint(path, argparse.Namespace(**options))
    assert state["vae_step"] == 3 and state["args"]["out"] == Path("m") and state["vae"]["w"].sum() == 2
    with pytest.raises(CommandError, match=r"is a run with --latent-side 16, not 32; resume it with --latent-side 16"):
        load_checkpoint(path, argparse.Namespace(**{**options, "latent_side": 32}))


@pytest.mark.parametrize("command", [["bench", "--model", "shapes", "--batch-sizes", "1", "--repeats", "1"],
                                     ["eval-shapes", "--count", "1"], ["labels", "--count", "1"]])
def test_commands_writing_one_file_check_its_folder_before_any_work(tmp_path, capsys, command):
    os.symlink(tmp_path / "gone", tmp_path / "results")
    rc = cli.main([*command, "--device", "cpu", "--out", str(tmp_path / "results" / "r.json")])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert "results is a symbolic link to" in line and "which does not exist" in line


# -- train-shapes never writes into the shipped models, and --overwrite replaces only its own files ----------
def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("option", ["--out", "--workdir"])
@pytest.mark.parametrize("where", ["shapes", "shapes-mmdit", "shapes/unet", ".", "new-model"])
def test_train_shapes_refuses_the_shipped_model_folders(tmp_path, capsys, option, where):
    import re

    models = ROOT / "data" / "models"
    before = _tree(models)
    folder = models / where
    argv = ["--out", str(folder), "--overwrite"] if option == "--out" else ["--workdir", str(folder)]
    # --images 0 is refused later: without the shipped-folder check that is the error (and nothing is written)
    assert cli.main(["train-shapes", *argv, "--images", "0", "--workers", "1", "--device", "cpu"]
                    + (["--out", str(tmp_path / "m")] if option == "--workdir" else [])) == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert re.search(rf"{option} .* (is|is inside) {re.escape(str(models.resolve()))}, the folder of the models that "
                     rf"ship with iseg; .*Choose another {option}", line), line
    assert _tree(models) == before and not (tmp_path / "m").exists()


def test_train_shapes_refuses_an_installed_packages_models_folder(tmp_path, capsys, monkeypatch):
    from iseg import registry

    installed = tmp_path / "site-packages" / "iseg" / "_models"
    (installed / "shapes").mkdir(parents=True)
    monkeypatch.setattr(registry, "MODEL_DIRS", (installed, ROOT / "data" / "models"))
    link = tmp_path / "link"  # a link into it is the same folder
    os.symlink(installed / "shapes", link)
    for out in (installed / "shapes", link):
        assert _train(tmp_path, "--out", str(out), "--overwrite", "--images", "0") == 2
        line = _one_error_line(capsys.readouterr().err, "iseg")
        assert f"is {installed.resolve() / 'shapes'}" not in line and f"{installed.resolve()}, the folder of" in line
    assert list((installed / "shapes").iterdir()) == [] and not (tmp_path / "shapes.work").exists()


def test_overwrite_refuses_an_out_that_holds_a_model_card_and_keeps_everything(tmp_path, capsys):
    import shutil

    out = tmp_path / "m"
    shutil.copytree(ROOT / "data" / "models" / "shapes", out)  # a copy of a model, with its card and reports
    (out / "notes").mkdir()
    (out / "unet" / "mine.txt").write_text("mine")
    before = _tree(out)
    for flag in ("--overwrite", "--resume"):
        assert _train(tmp_path, flag, "--images", "0") == 2
        line = _one_error_line(capsys.readouterr().err, "iseg")
        assert (f"--out {out} holds files or folders that train-shapes does not write (README.md, loss.jsonl, notes, "
                "preset-validation-a.json, preset-validation-b.json and 2 more): a model card") in line
        assert "Move them out of the folder, or choose another --out" in line
    assert _tree(out) == before and not (tmp_path / "m.work").exists()


def test_overwrite_replaces_every_file_of_the_earlier_model_and_nothing_else(tmp_path):
    """An MM-DiT model in --out replaced by a UNet one: no transformer/ or text_encoder_2/ of the old
    model stays beside the new weights; the work folder inside --out is the run's own."""
    import shutil

    import iseg

    out = tmp_path / "m"
    shipped = ROOT / "data" / "models" / "shapes-mmdit"
    out.mkdir()
    for part in ("model_index.json", "training.json", "loss.png", "transformer", "text_encoder_2", "tokenizer_2",
                 "vae", "scheduler"):
        (shutil.copytree if (shipped / part).is_dir() else shutil.copy)(shipped / part, out / part)
    assert _train(tmp_path, "--overwrite", "--vae-steps", "1", "--vae-batch", "2", "--unet-steps", "1",
                  "--batch-size", "2", "--threads", "1", "--workdir", str(out / "work")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "model_index.json", "scheduler", "text_encoder",
                                                     "tokenizer", "training.json", "unet", "vae", "work"]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((out / "training.json").read_text())["family"] == "unet"
    assert iseg.load_model(str(out), device="cpu").family == "sd"


@pytest.mark.parametrize("command", ["segment", "eval"])
def test_results_are_never_written_into_the_shipped_models_folder(tmp_path, image, capsys, monkeypatch, command):
    """``--out data/models/shapes`` wrote NAME.json, NAME.labels.png and NAME.overlay.png beside the
    shipped model's weights; refused before the model loads (checked on a stand-in for the folder)."""
    import re

    from iseg import registry

    models = tmp_path / "models"
    (models / "shapes").mkdir(parents=True)
    monkeypatch.setattr(registry, "MODEL_DIRS", (models,))
    before = sorted(p.name for p in models.rglob("*"))
    if command == "segment":
        argv = ["segment", str(image), "--classes", "square", "--model", "shapes", "--out", str(models / "shapes")]
    else:
        argv = ["eval", *EVAL, "--out", str(models / "shapes" / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err, "iseg") if command == "segment" else _eval_error_line(err)
    assert re.search(r"--out .* is inside .*models, the folder of the models that ship with iseg; .*Choose another --out", line), line
    assert sorted(p.name for p in models.rglob("*")) == before


def test_a_fresh_run_never_replaces_an_earlier_runs_checkpoint(tmp_path, capsys):
    """A run killed during training leaves m.work/checkpoint.pt and no model; the same command again
    without --resume started over and wrote over hours of training."""
    work = tmp_path / "m.work"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(b"an earlier run")
    (work / "loss.jsonl").write_text('{"step": 1}\n')
    assert _train(tmp_path) == 2
    line = _one_error_line(capsys.readouterr().err, "iseg")
    assert "holds an earlier run's checkpoint.pt and loss.jsonl; pass --resume to continue" in line, line
    assert (work / "checkpoint.pt").read_bytes() == b"an earlier run"
    assert (work / "loss.jsonl").read_text() == '{"step": 1}\n' and not (tmp_path / "m").exists()


def test_the_work_folder_cannot_be_the_model_folder(tmp_path, capsys):
    assert _train(tmp_path, "--workdir", str(tmp_path / "m")) == 2
    assert "is the --out folder itself" in _one_error_line(capsys.readouterr().err, "iseg")
    assert not (tmp_path / "m").exists()
