"""Folders of tiny random-weight pipelines of every family, for running the notebooks on them."""

from __future__ import annotations

import sys
from pathlib import Path

import tiny

#: family tag -> builder of a tiny pipeline of that family (``tests/tiny.py``)
BUILDERS = {
    "sd": lambda: tiny.tiny_pipeline(seed=0, sd_layout=True),
    "sdxl": lambda: tiny.tiny_sdxl_pipeline(seed=0),
    "sd3": lambda: tiny.tiny_sd3_pipeline(seed=0),
    "flux": lambda: tiny.tiny_flux_pipeline(seed=0),
}


def save_family_models(folder: Path, families=tuple(BUILDERS)) -> dict[str, Path]:
    """``{tag: folder}`` with each family's tiny pipeline saved in diffusers layout (``save_pretrained``)."""
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    made = {}
    for tag in families:
        target = Path(folder) / f"tiny-{tag}"
        if not (target / "model_index.json").is_file():
            BUILDERS[tag]().save_pretrained(target)
        made[tag] = target
    return made


if __name__ == "__main__":
    for tag, path in save_family_models(Path(sys.argv[1])).items():
        print(tag, path)
