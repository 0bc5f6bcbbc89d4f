"""Step 1: load a Stable-Diffusion-style pipeline (hub id, local folder, or a model we ship).

Everything iSeg needs is a pipeline with ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``
and a ``UNet2DConditionModel``: SD 1.4/1.5/2.0/2.1(-base) and the project's own shapes model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MODEL",
    "ModelNotAvailableError",
    "shipped_models",
    "register_model",
    "resolve_device",
    "load_pipeline",
]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
_PACKAGE = Path(__file__).resolve().parent
# a non-editable install carries shipped models inside the package; a checkout keeps them in data/
_MODEL_DIRS = (_PACKAGE / "_models", _PACKAGE.parent / "data" / "models")
_REGISTRY: dict[str, dict] = {}


class ModelNotAvailableError(OSError):
    """The weights of a model cannot be found here."""


def register_model(name: str, folder: str | os.PathLike | None = None, preset: str | None = None) -> None:
    """Make ``load_pipeline(name)`` load a model folder; ``preset`` becomes ``ISeg``'s default for it."""
    _REGISTRY[name] = {"folder": None if folder is None else Path(folder), "preset": preset}


def shipped_models() -> dict[str, Path]:
    """Short names of the models this installation ships, with their folders."""
    found = {}
    for name, entry in _REGISTRY.items():
        folder = entry["folder"]
        candidates = [folder] if folder is not None else [d / name for d in _MODEL_DIRS]
        for c in candidates:
            if (c / "model_index.json").is_file():
                found[name] = c
                break
    return found


def resolve_device(device=None) -> torch.device:
    """``device`` as a ``torch.device`` (None: CUDA when present, else the CPU), checked to exist
    here: a ValueError names the device and the ones that can be used, instead of failing later
    inside torch."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usable = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if _mps_available() else [])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name; use one of {', '.join(usable)}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: CUDA is not available here (no GPU that torch can use); use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {device!r}: Apple's MPS is not available here; use {' or '.join(usable)}")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported by iseg; use one of {', '.join(usable)}")
    return dev


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _unavailable(model: str, reason: str) -> ModelNotAvailableError:
    shipped = sorted(shipped_models()) or ["shapes"]
    hub_id = model if model.count("/") == 1 and not Path(model).exists() else DEFAULT_MODEL
    return ModelNotAvailableError(
        f"cannot load model {model!r}: {reason}\n"
        "Three ways out:\n"
        f"  1. connect to the internet once and download it (`hf download {hub_id}`, or call\n"
        "     load_pipeline once online); later runs use the cache, also with HF_HUB_OFFLINE=1;\n"
        "  2. pass a local folder in diffusers layout (model_index.json, unet/, vae/, text_encoder/,\n"
        "     tokenizer/, scheduler/), e.g. load_pipeline('/path/to/stable-diffusion-2-1-base');\n"
        f"  3. use the model shipped with iseg, which runs on a CPU: load_pipeline({shipped[0]!r})."
    )


def _from_pretrained(source: str, dtype: torch.dtype, local_only: bool):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # keep notebooks free of per-component progress bars and notices
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        return StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local_only,
        )
    finally:
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_pipeline(model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype: torch.dtype | None = None, verbose: bool = True):
    """Load a pipeline for iSeg and move it to ``device``.

    ``model`` is a hub id (default: SD 2.1-base), a local folder in diffusers layout, a short name
    of a shipped model (``"shapes"``), or ``"auto"``: SD 2.1-base when its weights are in the local
    cache and a GPU is present, else the shapes model. ``device`` defaults to CUDA when present;
    ``dtype`` to float16 on CUDA and float32 elsewhere. Missing weights raise
    ``ModelNotAvailableError`` with the ways out; with ``HF_HUB_OFFLINE=1`` nothing touches the
    network.
    """
    device = resolve_device(device)
    dtype = dtype or _default_dtype(device)
    name = os.fspath(model)
    preset = None

    if name == "auto":
        pipe = None
        if device.type == "cuda":
            try:
                pipe = _from_pretrained(DEFAULT_MODEL, dtype, local_only=True)
                name = DEFAULT_MODEL
            except Exception:  # noqa: BLE001 - anything missing means: fall back
                pipe = None
        if pipe is None:
            shipped = shipped_models()
            if "shapes" not in shipped:
                raise _unavailable("auto", "neither SD 2.1-base weights with a GPU nor the shapes model were found")
            name = "shapes"
        if verbose:
            why = "" if name != "shapes" else " (SD 2.1-base needs its weights in the cache and a GPU)"
            print(f"iseg: model 'auto' -> {name}{why}", file=sys.stderr)
        if pipe is not None:
            return _finish(pipe, device, name, preset)

    shipped = shipped_models()
    if name in shipped:
        preset = _REGISTRY[name]["preset"]
        source = str(shipped[name])
        try:
            pipe = _from_pretrained(source, dtype, local_only=True)
        except (OSError, ValueError) as err:
            raise _unavailable(name, f"the shipped folder {source} is incomplete or corrupt ({err})") from err
        return _finish(pipe, device, name, preset)
    if name in _REGISTRY:
        raise _unavailable(name, "it is registered but its folder is missing from this installation")

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise _unavailable(name, f"{path} exists but has no model_index.json (not a diffusers folder)")
        try:
            pipe = _from_pretrained(str(path), dtype, local_only=True)
        except (OSError, ValueError) as err:
            raise _unavailable(name, f"the folder {path} could not be loaded ({err})") from err
        return _finish(pipe, device, str(path), preset)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise _unavailable(name, f"no such folder: {path}")

    # a hub id: the local cache first, so that nothing waits on the network when it is not needed
    try:
        pipe = _from_pretrained(name, dtype, local_only=True)
    except Exception as cache_err:  # noqa: BLE001
        if _offline():
            raise _unavailable(name, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set") from cache_err
        try:
            pipe = _from_pretrained(name, dtype, local_only=False)
        except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors all mean the same here
            raise _unavailable(name, f"it is not in the local cache and downloading failed ({type(err).__name__}: {err})") from err
    return _finish(pipe, device, name, preset)


def _finish(pipe, device, name: str, preset: str | None):
    from diffusers import UNet2DConditionModel

    if not isinstance(pipe.unet, UNet2DConditionModel):
        raise TypeError(f"{name}: iSeg needs a UNet2DConditionModel, got {type(pipe.unet).__name__}")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.iseg_model_name = name
    pipe.iseg_default_preset = preset
    return pipe
