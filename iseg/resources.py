"""Files that ship with iseg: result tables, sample images and photos, found in any installation.

A wheel carries them inside the package (``iseg/_data/...``, see ``pyproject.toml``); a checkout
(an editable install) keeps them in ``data/``. ``data_path("results", "colour_binding.json")``
finds the file in either, so a notebook reads the same file on Colab (pip-installed) and here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIRS", "data_path"]

_PACKAGE = Path(__file__).resolve().parent
#: where shipped data files are looked for, in order: inside the installed package, then a checkout's data/
DATA_DIRS = (_PACKAGE / "_data", _PACKAGE.parent / "data")


def data_path(*parts: str) -> Path:
    """The path of a shipped data file or folder, e.g. ``data_path("results", "colour_binding.json")``
    or ``data_path("photos")``; ``FileNotFoundError`` names where it was looked for."""
    if not parts:
        raise TypeError("data_path needs the parts of a path under data/, e.g. data_path('results', 'x.json')")
    for base in DATA_DIRS:
        candidate = base.joinpath(*parts)
        if candidate.exists():
            return candidate
    tried = ", ".join(str(base.joinpath(*parts)) for base in DATA_DIRS)
    raise FileNotFoundError(f"{'/'.join(parts)} is not among iseg's shipped data files (looked in {tried})")
