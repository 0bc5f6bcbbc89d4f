"""Folders of tiny random-weight pipelines of every family, for running the notebooks on them."""

from __future__ import annotations

import json
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

#: a file beside a tiny pipeline's model_index.json: the pipeline attributes it was built with that
#: ``save_pretrained`` does not keep (``FluxPipeline`` sets ``default_sample_size = 128`` latent
#: cells on every load: the tiny FLUX would run at 256x256 px, 4,096 tokens, instead of 32x32)
SIZES_FILE = "tiny_sizes.json"


def save_family_models(folder: Path, families=tuple(BUILDERS)) -> dict[str, Path]:
    """``{tag: folder}`` with each family's tiny pipeline saved in diffusers layout (``save_pretrained``)."""
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    made = {}
    for tag in families:
        target = Path(folder) / f"tiny-{tag}"
        if not (target / "model_index.json").is_file():
            pipe = BUILDERS[tag]()
            pipe.save_pretrained(target)
            sizes = {"default_sample_size": pipe.default_sample_size} if hasattr(pipe, "default_sample_size") else {}
            (target / SIZES_FILE).write_text(json.dumps(sizes))
        made[tag] = target
    return made


def install_tiny_sizes() -> None:
    """In a notebook kernel (``tests/fake_cuda_site`` with ISEG_TINY_SIZES=1): a pipeline that
    ``iseg.load_model`` loads from a folder with a ``tiny_sizes.json`` gets those attributes back
    before iseg reads them, so that the tiny FLUX runs at the size ``tests/tiny.py`` built it for,
    as it does in the unit tests. Any other model is untouched."""
    import iseg.loading as loading

    finish = loading._finish

    def finish_at_tiny_size(pipe, device, name, *args, **kwargs):
        try:
            sizes = json.loads((Path(name) / SIZES_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            sizes = {}
        for key, value in sizes.items():
            setattr(pipe, key, value)
        return finish(pipe, device, name, *args, **kwargs)

    loading._finish = finish_at_tiny_size


if __name__ == "__main__":
    for tag, path in save_family_models(Path(sys.argv[1])).items():
        print(tag, path)
