"""Step 1: load a model (hub id, local folder, or a model we ship) as a ``LoadedModel``.

A ``LoadedModel`` is the diffusers pipeline (``.pipe``) with what iseg knows about it: its name,
default preset, closed vocabulary and label thresholds (from ``iseg.registry``). The families are
those of ``iseg.backbones.FAMILIES``: the Stable Diffusion 1.x/2.x UNet (SD 1.4/1.5/2.0/2.1(-base)
and the project's own shapes model), SDXL, SD3 (loaded without its T5 encoder) and FLUX.1.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import registry
from .backbones import FAMILIES, family_of
from .registry import ModelEntry, register_model, shipped_models

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelNotAvailableError",
    "UnsupportedPipelineError",
    "PIPELINES",
    "shipped_models",
    "register_model",
    "resolve_device",
    "load_model",
    "load_pipeline",
]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"


# the LoadedModel of each pipeline load_model made, while the pipeline lives
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ModelNotAvailableError(OSError):
    """The weights of a model cannot be found here."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A loaded diffusers pipeline and what iseg knows about the model.

    ``ISeg`` takes one (or a bare pipeline, which gets its class name and no preset). The
    pipeline's parts are readable here too (``model.unet``, ``model.vae``, ...), and calling the
    model calls the pipeline (text-to-image generation).
    """

    pipe: object
    name: str
    entry: ModelEntry | None = None  # the registry entry of a named model

    @classmethod
    def of(cls, model) -> LoadedModel:
        """``model`` itself; for a pipeline that ``load_model`` loaded, the ``LoadedModel`` it
        returned (so ``ISeg(model.pipe)`` keeps the name and preset); any other pipeline wrapped
        with its class name and no preset."""
        if isinstance(model, LoadedModel):
            return model
        try:
            known = _LOADED.get(model)
        except TypeError:  # not weak-referenceable, so not a pipeline load_model made
            known = None
        return known if known is not None else cls(model, type(model).__name__)

    @property
    def family(self) -> str | None:
        """The model family (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``; see ``iseg.backbones.FAMILIES``)."""
        return family_of(self.pipe)

    @property
    def preset(self) -> str | None:
        return self.entry.preset if self.entry is not None else None

    @property
    def card(self) -> Path | None:
        return self.entry.card if self.entry is not None else None

    def _plugin(self, attribute: str, default=None):
        module = registry.plugin(self.entry.name) if self.entry is not None else None
        return getattr(module, attribute, default)

    @property
    def known_words(self) -> frozenset[str] | None:
        """The model's closed word list where it has one (the shapes model's vocabulary), else
        ``None``: a byte-level tokenizer splits any word into pieces, and for a model trained on a
        few words, pieces of a word it never saw mean nothing."""
        words = self._plugin("KNOWN_WORDS")
        return None if words is None else frozenset(w.lower() for w in words)

    @property
    def raw_bg_power(self) -> float | None:
        """The background power at which this model's raw (N = 0) maps are labelled best, where
        its plug-in measured one (the shapes model: chosen on validation), else ``None``."""
        return self._plugin("RAW_BG_POWER")

    @property
    def measured(self) -> bool:
        """Whether this project trained and measured the model (a shipped model with a model card:
        ``shapes``, ``shapes-mmdit``). Quality claims (IoU above a bound, words peaking on their
        objects) are checked only where this is true; on another model, e.g. random weights or a
        model nobody measured here, such checks say so and skip."""
        return self.entry is not None and self.entry.plugin is not None and self.card is not None

    @property
    def label_thresholds(self) -> Mapping | None:
        """Thresholds for ``iseg.labels``' attention method chosen for this model, if any."""
        return self._plugin("LABEL_THRESHOLDS")

    def example(self, index: int = 0):
        """``(image, classes)`` from the model's plug-in, or ``None`` when it has no examples."""
        make = self._plugin("example")
        return None if make is None else make(index)

    # the pipeline's parts, for code written against a diffusers pipeline
    unet = property(lambda self: self.pipe.unet)
    # the network that denoises: the UNet of SD and SDXL, the transformer of SD3 and FLUX
    denoiser = property(lambda self: getattr(self.pipe, "unet", None) or self.pipe.transformer)
    vae = property(lambda self: self.pipe.vae)
    text_encoder = property(lambda self: self.pipe.text_encoder)
    tokenizer = property(lambda self: self.pipe.tokenizer)
    scheduler = property(lambda self: self.pipe.scheduler)
    device = property(lambda self: self.pipe.device)
    dtype = property(lambda self: self.pipe.dtype)

    @property
    def components(self) -> dict:
        return self.pipe.components

    def to(self, *args, **kwargs) -> LoadedModel:
        """Move the pipeline (``pipe.to``); returns this model."""
        self.pipe.to(*args, **kwargs)
        return self

    def __call__(self, *args, **kwargs):
        return self.pipe(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"LoadedModel(name={self.name!r}, family={self.family!r}, preset={self.preset!r}, "
                f"pipeline={type(self.pipe).__name__})")


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
        "     load_model once online); later runs use the cache, also with HF_HUB_OFFLINE=1;\n"
        "  2. pass a local folder in diffusers layout (model_index.json, unet/, vae/, text_encoder/,\n"
        "     tokenizer/, scheduler/), e.g. load_model('/path/to/stable-diffusion-2-1-base');\n"
        f"  3. use the model shipped with iseg, which runs on a CPU: load_model({shipped[0]!r})."
    )


class UnsupportedPipelineError(TypeError):
    """The weights are a diffusers pipeline that iseg has no backbone for."""


# the diffusers pipeline classes iseg reads, by the ``_class_name`` of their model_index.json
PIPELINES = {name: family for family, (_, names) in FAMILIES.items() for name in names}


def _model_index(source: str, local_only: bool) -> dict | None:
    """The model_index.json of a local folder or of a hub repository (cache first), or ``None``."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache  # only when a model is loaded

    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / "model_index.json"
        return json.loads(path.read_text()) if path.is_file() else None
    cached = try_to_load_from_cache(source, "model_index.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if local_only:
        return None
    return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())


def _pipeline_class(source: str, local_only: bool):
    import diffusers  # importing diffusers doubles the time of `import iseg`; only loading needs it

    index = _model_index(source, local_only) or {}
    name = index.get("_class_name", "StableDiffusionPipeline")
    if name not in PIPELINES:
        raise UnsupportedPipelineError(f"{source} is a {name}; iseg reads {', '.join(PIPELINES)} "
                                       f"(families: {', '.join(FAMILIES)})")
    with quiet_libraries():  # the pipeline's module imports transformers' image processors
        return getattr(diffusers, name)


@contextmanager
def quiet_libraries():
    """diffusers' and transformers' notices and progress bars off while iseg loads a model.

    They are not the user's concern: per-component loading bars, and transformers' notice that an
    image processor falls back to its PIL version without torchvision (segmentation never runs an
    image processor). Errors still show; both libraries' settings are put back afterwards.
    """
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def _from_pretrained(source: str, dtype: torch.dtype, local_only: bool):
    import diffusers

    cls = _pipeline_class(source, local_only)
    # SD 1.x/2.x pipelines carry a safety checker that segmentation never runs
    extra = dict(safety_checker=None, requires_safety_checker=False) if cls is diffusers.StableDiffusionPipeline else {}
    if cls is diffusers.StableDiffusion3Pipeline:
        # SD3's T5 encoder (4.7B parameters) is left out: diffusers then uses zeros for its tokens,
        # and the class tokens iSeg reads are CLIP tokens (see iseg.backbones.sd3)
        extra = dict(text_encoder_3=None, tokenizer_3=None)
    with quiet_libraries():  # keep notebooks free of per-component progress bars and notices
        return cls.from_pretrained(source, dtype=dtype, local_files_only=local_only, **extra)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks that nothing touches the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


#: what ``load_model("auto", family=...)`` looks for: the full-size model (its weights in the local
#: cache and a GPU), else the shipped shapes model of the same family
AUTO_MODELS = {
    "sd": (DEFAULT_MODEL, "shapes"),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "shapes-mmdit"),
}


def load_model(model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype: torch.dtype | None = None,
               verbose: bool = True, family: str | None = None) -> LoadedModel:
    """Load a model for iSeg and move it to ``device``; returns a ``LoadedModel``.

    ``model`` is a hub id (default: SD 2.1-base), a local folder in diffusers layout, a short name
    of a shipped model (``"shapes"``), or ``"auto"``: SD 2.1-base when its weights are in the local
    cache and a GPU is present, else the shapes model; ``"auto"`` with ``family="sd3"`` picks SD3-medium
    the same way, else the shapes MM-DiT (``"shapes-mmdit"``). ``device`` defaults to CUDA when present;
    ``dtype`` to float16 on CUDA and float32 elsewhere. Missing weights raise
    ``ModelNotAvailableError`` with the ways out; with ``HF_HUB_OFFLINE=1`` nothing touches the
    network.
    """
    device = resolve_device(device)
    dtype = dtype or _default_dtype(device)
    name = os.fspath(model)

    if family is not None and name != "auto":
        raise ValueError(f"family={family!r} only chooses what load_model('auto') loads; {name!r} names its model itself")
    if name == "auto":
        key = family or "sd"
        if key not in AUTO_MODELS:
            raise ValueError(f"load_model('auto') knows the families {sorted(AUTO_MODELS)}, not {family!r}")
        full, small = AUTO_MODELS[key]
        pipe = None
        if device.type == "cuda":
            try:
                pipe = _from_pretrained(full, dtype, local_only=True)
                name = full
            except Exception:  # noqa: BLE001 - anything missing means: fall back
                pipe = None
        if pipe is None:
            shipped = shipped_models()
            if small not in shipped:
                raise _unavailable("auto", f"neither {full} weights with a GPU nor the {small} model were found")
            name = small
        if verbose:
            why = "" if name != small else f" ({full} needs its weights in the cache and a GPU)"
            # ordinary output: which model runs is news, not a warning (a notebook shows stderr in red)
            print(f"iseg: model 'auto' -> {name}{why}")
        if pipe is not None:
            return _finish(pipe, device, name)

    shipped = shipped_models()
    if name in shipped:
        source = str(shipped[name])
        try:
            pipe = _from_pretrained(source, dtype, local_only=True)
        except (OSError, ValueError) as err:
            raise _unavailable(name, f"the shipped folder {source} is incomplete or corrupt ({err})") from err
        return _finish(pipe, device, name)
    if name in registry.MODELS:
        raise _unavailable(name, "it is registered but its folder is missing from this installation")

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise _unavailable(name, f"{path} exists but has no model_index.json (not a diffusers folder)")
        try:
            pipe = _from_pretrained(str(path), dtype, local_only=True)
        except (OSError, ValueError) as err:
            raise _unavailable(name, f"the folder {path} could not be loaded ({err})") from err
        return _finish(pipe, device, str(path))
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise _unavailable(name, f"no such folder: {path}")

    # a hub id: the local cache first, so that nothing waits on the network when it is not needed
    try:
        pipe = _from_pretrained(name, dtype, local_only=True)
    except UnsupportedPipelineError:
        raise
    except Exception as cache_err:  # noqa: BLE001
        if hub_offline():
            raise _unavailable(name, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set") from cache_err
        try:
            pipe = _from_pretrained(name, dtype, local_only=False)
        except UnsupportedPipelineError:
            raise
        except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors all mean the same here
            raise _unavailable(name, f"it is not in the local cache and downloading failed ({type(err).__name__}: {err})") from err
    return _finish(pipe, device, name)


def _finish(pipe, device, name: str) -> LoadedModel:
    if family_of(pipe) is None:
        raise UnsupportedPipelineError(f"{name}: iseg has no backbone for a {type(pipe).__name__}; "
                                       f"it reads {', '.join(PIPELINES)}")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    model = _LOADED[pipe] = LoadedModel(pipe, name, registry.MODELS.get(name))
    return model


def load_pipeline(model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype: torch.dtype | None = None,
                  verbose: bool = True, family: str | None = None) -> LoadedModel:
    """The older name of ``load_model``; it returns the same ``LoadedModel`` (``.pipe`` is the
    diffusers pipeline)."""
    return load_model(model, device=device, dtype=dtype, verbose=verbose, family=family)
