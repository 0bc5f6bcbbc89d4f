"""The models iseg knows by short name: a plain mapping, with no import side effects.

An entry names a model's folder (shipped with iseg, or anywhere), its default preset and its
plug-in: a module that may define ``PRESETS`` (preset name -> setting overrides), ``KNOWN_WORDS``
(a closed vocabulary), ``LABEL_THRESHOLDS`` (for ``iseg.labels``' attention method) and
``example(index) -> (image, classes)``. A plug-in is imported the first time one of these is asked
for, not when ``iseg`` is imported, so a model family's code loads only when that model is used.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

__all__ = ["ModelEntry", "MODELS", "MODEL_DIRS", "register_model", "shipped_models", "plugin", "model_presets",
           "DATA_DIRS", "data_path"]

_PACKAGE = Path(__file__).resolve().parent
# a non-editable install carries shipped models inside the package; a checkout keeps them in data/
MODEL_DIRS = (_PACKAGE / "_models", _PACKAGE.parent / "data" / "models")


@dataclass(frozen=True)
class ModelEntry:
    """What iseg knows about a named model before loading it."""

    name: str
    preset: str | None = None  # ISeg's default preset for the model
    folder: Path | None = None  # None: a folder called ``name`` in MODEL_DIRS
    plugin: str | None = None  # module path of the model's plug-in (see the module docstring)

    def candidates(self) -> list[Path]:
        return [self.folder] if self.folder is not None else [d / self.name for d in MODEL_DIRS]

    @property
    def card(self) -> Path | None:
        """The model card (README.md of the model folder), where the folder is present."""
        for folder in self.candidates():
            if (folder / "README.md").is_file():
                return folder / "README.md"
        return None


MODELS: dict[str, ModelEntry] = {
    "shapes": ModelEntry("shapes", preset="shapes", plugin="iseg.shapes.plugin"),
    "shapes-mmdit": ModelEntry("shapes-mmdit", preset="shapes-mmdit", plugin="iseg.shapes.mmdit_plugin"),
}


def register_model(name: str, folder: str | os.PathLike | None = None, preset: str | None = None,
                   plugin: str | None = None) -> None:
    """Make ``load_model(name)`` load a model folder; ``preset`` becomes ``ISeg``'s default for it."""
    MODELS[name] = ModelEntry(name, preset=preset, folder=None if folder is None else Path(folder), plugin=plugin)
    with _PRESETS_LOCK:
        _PRESETS_SEEN.clear()


def shipped_models() -> dict[str, Path]:
    """Short names of the registered models whose folders are present here, with their folders."""
    found = {}
    for name, entry in MODELS.items():
        for folder in entry.candidates():
            if (folder / "model_index.json").is_file():
                found[name] = folder
                break
    return found


def plugin(name: str | None) -> ModuleType | None:
    """The plug-in module of a registered model, imported now; ``None`` when it has none."""
    entry = MODELS.get(name) if name is not None else None
    if entry is None or entry.plugin is None:
        return None
    return importlib.import_module(entry.plugin)


_PRESETS_SEEN: dict[str, dict] = {}
_PRESETS_LOCK = threading.Lock()


def model_presets() -> dict[str, dict]:
    """The presets that registered models' plug-ins bring (``PRESETS`` of each plug-in)."""
    with _PRESETS_LOCK:  # filled once; another thread never sees it half filled
        if not _PRESETS_SEEN:
            found = {}
            for name in MODELS:
                found.update(getattr(plugin(name), "PRESETS", {}))
            _PRESETS_SEEN.update(found)
        return dict(_PRESETS_SEEN)


# -- files that ship with iseg: result tables, sample images and photos ---------------------------------
# A wheel carries them inside the package (iseg/_data/..., see pyproject.toml); a checkout (an editable
# install) keeps them in data/. data_path finds the file in either, so a notebook reads the same file on
# Colab (pip-installed) and here.
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
