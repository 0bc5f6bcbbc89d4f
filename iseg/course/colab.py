"""Google Colab: the first cell of every notebook installs iseg there and turns on ipympl's widgets.

On Colab ``import iseg`` fails until iseg is installed, so the install cannot be a library call; it
is the cell ``FIRST_CELL`` (every notebook starts with it, ``tests/test_colab.py`` checks that):

    import sys
    if "google.colab" in sys.modules:  # on Colab only: install iseg, let ipympl's figures draw
        %pip install -q "iseg-attention @ git+https://github.com/...@v0.1.0"
        from google.colab import output
        output.enable_custom_widget_manager()

Anywhere else (JupyterLab, Voila, CI) it does nothing. ``setup()`` does the same from Python once
iseg is importable (a Colab runtime where it is already installed). The repository and the tag
follow ``REPOSITORY`` and ``iseg.__version__``, so the install cell and the version agree.
"""

from __future__ import annotations

import subprocess
import sys

from .. import __version__

__all__ = ["REPOSITORY", "install_spec", "first_cell", "on_colab", "setup"]

#: where iseg is published. NOTE: no public address was known when this was written; set this (and
#: run ``python -c "import iseg.course.colab as c; print(c.first_cell())"`` into the notebooks' first
#: cells) to the repository's real address before publishing the Colab badges.
REPOSITORY = "https://github.com/iseg-attention/iseg"


def install_spec(version: str | None = None) -> str:
    """What ``pip install`` is given on Colab: this version's tag of the repository."""
    return f"iseg-attention @ git+{REPOSITORY}@v{version or __version__}"


def first_cell(version: str | None = None) -> str:
    """The source of the Colab lines that open every notebook's first code cell."""
    return (
        "import sys\n\n"
        'if "google.colab" in sys.modules:  # on Colab only: install iseg, let ipympl\'s figures draw\n'
        f'    %pip install -q "{install_spec(version)}"\n'
        "    from google.colab import output\n"
        "    output.enable_custom_widget_manager()\n"
    )


def on_colab() -> bool:
    """Whether this Python runs in a Google Colab runtime."""
    return "google.colab" in sys.modules


def setup(install: bool = False) -> bool:
    """On Colab: optionally ``pip install`` this version of iseg, then enable the custom widget
    manager that ipympl's live figures need (``%matplotlib widget``). Elsewhere: nothing.
    Returns whether it ran on Colab."""
    if not on_colab():
        return False
    if install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", install_spec()], check=True)
    from google.colab import output  # only importable on Colab

    output.enable_custom_widget_manager()
    return True
