import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iseg.commands import main as cli
from iseg.commands.main import main

ROOT = Path(__file__).resolve().parents[1]


def test_segment_writes_labels_overlay_gif_and_json(tmp_path):
    samples = sorted((ROOT / "data" / "samples").glob("*.png"))[:2]
    rc = main(["segment", *map(str, samples), "--classes-file", str(ROOT / "data" / "samples" / "classes.json"),
               "--model", "shapes", "--out", str(tmp_path), "--set", "iterations=3"])
    assert rc == 0
    table = json.loads((ROOT / "data" / "samples" / "classes.json").read_text())
    for path in samples:
        labels = Image.open(tmp_path / f"{path.stem}.labels.png")
        assert labels.mode == "P" and labels.size == (64, 64)
        values = set(np.unique(np.asarray(labels)).tolist())
        assert values <= set(range(len(table[path.name]) + 1)) and len(values) > 1
        assert Image.open(tmp_path / f"{path.stem}.overlay.png").mode == "RGB"
        gif = Image.open(tmp_path / f"{path.stem}.iterations.gif")
        assert gif.n_frames == 4  # iterations 0..3
        record = json.loads((tmp_path / f"{path.stem}.json").read_text())
        assert record["classes"] == table[path.name]
        assert record["settings"]["iterations"] == 3 and record["model"] == "shapes"
        assert record["timing"]["wall_s"] > 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["segment", str(tmp_path / "missing.png"), "--classes", "square", "--model", "shapes",
                 "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["segment", str(img), "--classes", "square", "--model", "shapes", "--out", str(tmp_path),
                 "--set", "lamda=0.1"]) == 2
    assert "did you mean 'lam'" in capsys.readouterr().err


# -- one command line: every subcommand, its help and its refusals ------------------------------------
COMMANDS = [c[0] for c in cli.COMMANDS]
# the least each command needs, so that the bad option is the only mistake on the line
REQUIRED = {"segment": ["x.png"], "eval": ["--dataset", "shapes", "--out", "run"], "train-shapes": ["--out", "model"]}
# the shared conventions: where a command runs the method it takes --model, --preset and --set
RUNS_THE_METHOD = {"segment", "eval", "labels", "bench", "eval-shapes"}
WRITES_FILES_IT_REPLACES = {"segment", "labels", "bench", "train-shapes", "eval-shapes"}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


def test_the_commands():
    assert COMMANDS == ["segment", "eval", "labels", "bench", "train-shapes", "eval-shapes"]


def test_top_level_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, _, help_line, _ in cli.COMMANDS:
        assert re.search(rf"^ +{re.escape(name)} +{re.escape(help_line)}$", out, re.M), name


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_naming_its_options(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: iseg {name} ")
    options = _long_options(_subparser(name))
    assert {"--help", "--out", "--device"} <= options
    assert all(o == o.lower() and "_" not in o for o in options), options  # kebab-case
    if name in RUNS_THE_METHOD:
        assert {"--model", "--preset", "--set"} <= options
    if name in WRITES_FILES_IT_REPLACES:
        assert "--overwrite" in options
    for option in options:
        assert re.search(rf"{re.escape(option)}\b", out), f"{name} --help does not name {option}"


def test_every_command_has_one_name():
    # `iseg COMMAND` is the only name: no second console script, no `python -m iseg.<module>`
    pyproject = (ROOT / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert [line.split("=")[0].strip() for line in scripts.strip().splitlines()] == ["iseg"]
    package = ROOT / "iseg"
    assert sorted(str(p.relative_to(package)) for p in package.rglob("__main__.py")) == ["__main__.py"]
    runnable = [str(p.relative_to(package)) for p in package.rglob("*.py")
                if p.name != "__main__.py" and re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M)]
    assert runnable == []


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_option_exits_2_with_one_line(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, *REQUIRED.get(name, []), "--no-such-option"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert lines == [f"iseg {name}: error: unrecognized arguments: --no-such-option"], err


@pytest.mark.parametrize("argv, message", [
    (["labels", "--count", "0"], r"--count must be at least 1"),
    (["labels", "--min-peak", "0.5"], r"--min-peak needs --min-share"),
    (["labels", "--set", "lamda=1"], r"--set: .*did you mean 'lam'"),
    (["labels", "--out", "{existing}"], r"--out .*notes.json already exists; pass --overwrite"),
    (["bench", "--out", "{tmp}"], r"--out .* is a folder"),
    (["bench", "--repeats", "0"], r"--repeats and --batch-sizes must be at least 1"),
    (["bench", "--preset", "shape"], r"--preset: unknown preset 'shape'"),
    (["bench", "--device", "gpu"], r"--device: device 'gpu' is not a device name"),
    (["eval-shapes", "--out", "{existing}"], r"--out .*notes.json already exists; pass --overwrite"),
    (["eval-shapes", "--choose", "{tmp}/none.json"], r"--choose .*none.json does not exist"),
    (["train-shapes", "--out", "{tmp}"], r"--out .* already holds files; pass --overwrite"),
    (["train-shapes", "--out", "{existing}"], r"--out .*notes.json is a file, not a folder"),
    (["train-shapes", "--out", "{tmp}/new", "--device", "gpu"], r"--device: device 'gpu'"),
])
def test_commands_refuse_bad_values_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    existing = tmp_path / "notes.json"
    existing.write_text("mine")
    argv = [a.replace("{existing}", str(existing)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("iseg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert existing.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]  # nothing written


@pytest.mark.parametrize("name", ["labels", "bench", "train-shapes", "eval-shapes", "eval"])
def test_python_dash_m_iseg_runs_the_command(tmp_path, name):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "iseg", name, *REQUIRED.get(name, []), "--no-such-option"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == f"iseg {name}: error: unrecognized arguments: --no-such-option"
