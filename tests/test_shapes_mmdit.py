"""The shipped shapes MM-DiT (``data/models/shapes-mmdit``): an SD3 pipeline the project trained, its
preset chosen on validation by the UNet's rule, and floors under what its model card reports."""

import json

import numpy as np
import pytest

import iseg
from iseg.shapes.evaluate import choose_label_rule, evaluate
from iseg.shapes.preset import MMDIT_PRESET, MMDIT_RAW_BG_POWER

FOLDER = iseg.shipped_models().get("shapes-mmdit")


@pytest.fixture(scope="module")
def mmdit():
    return iseg.load_model("shapes-mmdit", device="cpu", verbose=False)


def _reports():
    return [json.loads((FOLDER / f"preset-validation-{s}.json").read_text()) for s in "ab"]


def test_it_is_an_sd3_pipeline_of_at_most_25_mb(mmdit):
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, size
    assert mmdit.family == "sd3" and type(mmdit.pipe).__name__ == "StableDiffusion3Pipeline"
    assert mmdit.pipe.text_encoder_3 is None and mmdit.preset == "shapes-mmdit"
    info = json.loads((FOLDER / "training.json").read_text())
    assert info["family"] == "sd3" and info["parameters"]["transformer"] == sum(
        p.numel() for p in mmdit.pipe.transformer.parameters())
    assert (FOLDER / "README.md").is_file() and (FOLDER / "loss.png").is_file()


def test_the_preset_is_what_the_rule_picks_from_the_shipped_validation_tables():
    a, b = _reports()
    assert (a["split"], a["count"], b["split"], b["count"]) == ("val", 500, "val", 1000)
    assert b["first_seed"] == a["first_seed"] + 500  # two disjoint sets
    t = str(MMDIT_PRESET["timestep"])
    chosen = choose_label_rule([r["timesteps"][t]["miou_by_bg_power"] for r in (a, b)])
    assert (chosen["bg_power"], chosen["lam"], chosen["iterations"]) == (
        MMDIT_PRESET["bg_power"], MMDIT_PRESET["lam"], MMDIT_PRESET["iterations"])


def test_the_raw_rule_is_the_best_raw_bg_power_on_validation():
    a, _ = _reports()
    table = a["timesteps"][str(MMDIT_PRESET["timestep"])]["miou_by_bg_power"]
    raw = {float(p): row[str(MMDIT_PRESET["lam"])]["0"] for p, row in table.items()}
    assert len(raw) >= 10 and max(raw) >= 4 * MMDIT_RAW_BG_POWER
    assert max(raw, key=raw.get) == MMDIT_RAW_BG_POWER
