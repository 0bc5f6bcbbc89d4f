import json
from pathlib import Path

import numpy as np
from PIL import Image

from iseg.cli import main

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
