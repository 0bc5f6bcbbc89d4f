"""Step 1: load a model (hub id, local folder, or a model we ship) as a ``LoadedModel``.

A ``LoadedModel`` is the diffusers pipeline (``.pipe``) with what iseg knows about it: its name,
default preset, closed vocabulary and label thresholds (from ``iseg.registry``). The families are
those of ``iseg.backbones.FAMILIES``; each family's backbone says which pipelines it reads, which of
their parts are left out when loading (``Backbone.load_options``) and what ``"auto"`` picks for it.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import registry
from .backbones import FAMILIES, family_of
from .backbones.base import config_value
from .registry import ModelEntry, register_model, shipped_models

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_FAMILY",
    "auto_models",
    "LoadedModel",
    "ModelNotAvailableError",
    "UnsupportedPipelineError",
    "ModelFolderError",
    "check_components",
    "PIPELINES",
    "shipped_models",
    "register_model",
    "resolve_device",
    "resolve_dtype",
    "load_model",
    "load_pipeline",
]

#: the family ``load_model("auto")`` picks from when no family is given, and whose full-size model
#: is ``load_model()``'s default
DEFAULT_FAMILY = "sd"
DEFAULT_MODEL = FAMILIES[DEFAULT_FAMILY][0].default_model


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
        """The model family: the name its backbone is registered under in ``iseg.backbones.FAMILIES``
        (``"sd"`` for Stable Diffusion 1.x/2.x), ``None`` where iseg has none."""
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

    def example_truth(self, index: int = 0):
        """The exact mask of ``example(index)`` where the model's plug-in has one (the shapes models'
        test images): ``(H, W)`` int64, 0 background, ``k`` the example's ``classes[k - 1]``; else ``None``."""
        make = self._plugin("example_truth")
        return None if make is None else make(index)

    # the pipeline's parts, for code written against a diffusers pipeline
    unet = property(lambda self: self.pipe.unet)

    @property
    def denoiser(self):
        """The network that denoises (the first of its family's ``Backbone.parts``)."""
        family = self.family
        if family is None:
            raise AttributeError(f"iseg has no backbone for a {type(self.pipe).__name__}, so no denoiser to name")
        return getattr(self.pipe, FAMILIES[family][0].parts[0])

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


# the names a dtype is given by: torch's own ("float16", "torch.float16") and the usual short ones
DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``dtype`` as a floating ``torch.dtype`` (None: float16 on CUDA, else float32); a name such as
    ``"float16"``, ``"torch.bfloat16"`` or ``"fp32"`` is read as that dtype. Anything else is a
    ValueError naming the choices (never ignored)."""
    if dtype is None:
        return _default_dtype(device)
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not a dtype name; use float16, bfloat16 or float32 "
                             "(or torch.float16, ...)")
        return DTYPE_NAMES[key]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype or its name (e.g. torch.float16 or 'float16'), got "
                        f"{type(dtype).__name__} {dtype!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype {dtype} cannot run a diffusion model; use torch.float16, torch.bfloat16 or torch.float32")
    return dtype


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


class ModelFolderError(ValueError):
    """A model folder is malformed, incomplete, or its parts do not fit each other."""


# the diffusers pipeline classes iseg reads, by the ``_class_name`` of their model_index.json
PIPELINES = {name: family for family, (_, names) in FAMILIES.items() for name in names}


def _model_index(source: str, local_only: bool) -> dict | None:
    """The model_index.json of a local folder or of a hub repository (cache first), or ``None``."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache  # only when a model is loaded

    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / "model_index.json"
        return _read_index(path) if path.is_file() else None
    cached = try_to_load_from_cache(source, "model_index.json")
    if isinstance(cached, str):
        return _read_index(Path(cached))
    if local_only:
        return None
    return _read_index(Path(hf_hub_download(source, "model_index.json")))


def _read_index(path: Path) -> dict:
    """A model_index.json, checked to be what diffusers reads: a JSON object whose ``_class_name``
    is text and whose components are ``[library, class]`` pairs (or nulls)."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        raise ModelFolderError(f"{path} starts with a byte-order mark, which diffusers cannot read; save it as UTF-8 "
                               "without one")
    try:
        index = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{path} is not valid JSON ({err}); a diffusers model folder needs a model_index.json "
                               "such as {\"_class_name\": \"StableDiffusionPipeline\", \"unet\": [\"diffusers\", "
                               "\"UNet2DConditionModel\"], ...}") from None
    if not isinstance(index, dict):
        raise ModelFolderError(f"{path} holds a JSON {type(index).__name__}; it must be a JSON object "
                               "{\"_class_name\": ..., \"unet\": [\"diffusers\", \"UNet2DConditionModel\"], ...}")
    if "_class_name" not in index:
        raise ModelFolderError(f"{path} has no _class_name; add the pipeline class, such as "
                               "\"_class_name\": \"StableDiffusionPipeline\"")
    name = index["_class_name"]
    if not isinstance(name, str):
        raise ModelFolderError(f"{path}: _class_name must be the pipeline class's name, such as "
                               f"\"StableDiffusionPipeline\", got {name!r}")
    for key, value in index.items():
        if key.startswith("_") or value is None or isinstance(value, (bool, int, float)):
            continue  # settings such as requires_safety_checker
        if not isinstance(value, list) or len(value) != 2 or not all(v is None or isinstance(v, str) for v in value):
            raise ModelFolderError(f"{path}: component {key!r} must be [library, class] such as "
                                   f"[\"diffusers\", \"AutoencoderKL\"] (or [null, null]), got {value!r}")
    return index


def _components(index: dict) -> dict[str, tuple[str, str]]:
    """The components a model_index.json lists as present: name -> (library, class)."""
    return {k: tuple(v) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and None not in v}


def _check_folder_files(folder: Path, index: dict, classes: Mapping | None = None) -> None:
    """Every component that model_index.json lists has its subfolder, and every safetensors file
    there is whole (its header and the byte ranges it declares are all in the file). With the
    parts' ``classes`` (``_check_index_parts``): each part has the settings file and the weights
    file its library reads, and a text encoder's config fits its weights."""
    for part, (library, cls) in _components(index).items():
        sub = folder / part
        if not sub.is_dir():
            raise ModelFolderError(f"the model folder {folder} has no {part}/ folder, which its model_index.json "
                                   f"lists ({library} {cls}); copy the whole folder again")
        for config in sorted(sub.glob("*.json")):  # configs, tokenizer files: diffusers' errors would not name them
            problem = _json_problem(config)
            if problem:
                raise ModelFolderError(f"{config} {problem}; copy or download the model again")
        kind = _part_kind((classes or {}).get(part))
        if kind is not None:
            _check_part_files(sub, part, kind)
        for weights in sorted(sub.glob("*.safetensors")):
            problem = _safetensors_problem(weights)
            if problem:
                raise ModelFolderError(f"{weights} {problem}; the file is damaged or was cut short while copying. "
                                       "Copy or download the model again")
        if kind == "text encoder":
            _check_text_encoder_weights(sub)
    _check_recorded_weights(folder)
    listed = _components(index)
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if encoder in listed and tokenizer in listed and (folder / encoder / "config.json").is_file() \
                and (folder / tokenizer / "tokenizer_config.json").is_file():
            _check_window(folder, encoder, tokenizer)


def _check_window(folder: Path, encoder: str, tokenizer: str) -> None:
    """The tokenizer pads prompts to no more tokens than its text encoder has positions (read from
    the two config files, before anything is built; ``check_components`` checks built pipelines)."""
    config = json.loads((folder / encoder / "config.json").read_text(encoding="utf-8"))
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    positions = config.get("max_position_embeddings", nested.get("max_position_embeddings"))
    window = json.loads((folder / tokenizer / "tokenizer_config.json").read_text(encoding="utf-8")).get("model_max_length")
    if not _positive_int(positions):
        return  # T5 has no such limit
    where = f"{folder}: {tokenizer}/tokenizer_config.json"
    if window is None or (isinstance(window, (int, float)) and window >= 10**18):
        raise ModelFolderError(f"{where} sets no model_max_length, so prompts would be padded to no length, but "
                               f"{encoder} has {positions} positions; set \"model_max_length\": {positions} there")
    if _positive_int(window) and window > positions:
        raise ModelFolderError(f"{where} pads prompts to {window} tokens (model_max_length) but {encoder} has "
                               f"{positions} positions (max_position_embeddings): every prompt would fail inside the "
                               "text encoder. Its parts come from different models: use the folder of one model, or "
                               f"set \"model_max_length\": {positions} in that file")


def _check_part_files(sub: Path, part: str, kind: str) -> None:
    """The files the library of a ``kind`` of part reads from its folder ``sub`` are there: its
    settings, a tokenizer's vocabulary, a model's weights (whole, in one file or in shards)."""
    settings = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}.get(kind, "config.json")
    if not (sub / settings).is_file():
        raise ModelFolderError(f"{sub / settings} is missing: the {part}'s settings, which "
                               f"{'transformers' if kind in ('tokenizer', 'text encoder') else 'diffusers'} reads to "
                               f"build it; copy it from the model's source again")
    if kind == "tokenizer":
        if not ((sub / "tokenizer.json").is_file() or (sub / "vocab.json").is_file() or any(sub.glob("*.model"))):
            raise ModelFolderError(f"{sub} has no vocabulary (tokenizer.json, or vocab.json and merges.txt, or a "
                                   "SentencePiece .model file): the tokenizer would know no words. Copy the tokenizer "
                                   "folder from the model's source again")
        return
    if kind == "scheduler":
        return
    stem = "model" if kind == "text encoder" else "diffusion_pytorch_model"
    names = [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
    names += ["pytorch_model.bin", "pytorch_model.bin.index.json"] if kind == "text encoder" else [
        f"{stem}.bin", f"{stem}.bin.index.json"]
    for name in names:
        if (sub / name).is_symlink() and not (sub / name).exists():
            raise ModelFolderError(f"{sub / name} is a symbolic link to {os.readlink(sub / name)}, which does not "
                                   f"exist: the weights of the {part} are elsewhere or gone; copy them again")
        if (sub / name).is_dir():
            raise ModelFolderError(f"{sub / name} is a folder, not the weights file of the {part}; copy the file again")
    found = [name for name in names if (sub / name).is_file()]
    if not found:
        others = sorted(p.name for p in sub.iterdir() if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt"))
        why = (f"; it holds {', '.join(others)}, which is not read under that name (a variant such as .fp16, or a "
               f"renamed file): rename the weights to {names[0]}" if others else "; copy it from the model's source again")
        raise ModelFolderError(f"{sub / names[0]} is missing: the weights of the {part}{why}")
    if found[0].endswith(".bin"):
        _check_pickled_weights(sub / found[0], part)
    if found[0].endswith(".index.json"):
        shards = json.loads((sub / found[0]).read_text(encoding="utf-8")).get("weight_map", {})
        missing = sorted({f for f in shards.values() if isinstance(f, str) and not (sub / f).is_file()})
        if missing or not isinstance(shards, dict):
            raise ModelFolderError(f"{sub / found[0]} lists the shard(s) {', '.join(missing) or '(none)'}, which are "
                                   f"not in {sub}; copy the whole {part}/ folder again")


#: the key of ``training.json`` under which ``iseg train-shapes`` records each weights file's SHA-256
WEIGHTS_SHA256 = "weights_sha256"


def weights_sha256(folder: Path) -> dict[str, str]:
    """``{"part/file.safetensors": sha256 hex}`` for every weights file in the parts' folders."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.glob("*/*.safetensors"))}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_recorded_weights(folder: Path) -> None:
    """A model trained here (``training.json`` records its weights' SHA-256) still has its own weights.
    A part copied in from another shapes model (the MM-DiT's text encoder over the UNet model's) has the
    same configuration and loads without a complaint, then gives masks that mean nothing."""
    try:
        recorded = json.loads((folder / "training.json").read_text(encoding="utf-8")).get(WEIGHTS_SHA256)
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(recorded, dict):
        return
    changed = sorted(name for name, digest in recorded.items() if isinstance(name, str)
                     and (folder / name).is_file() and _sha256(folder / name) != digest)
    if changed:
        raise ModelFolderError(
            f"{folder}: {', '.join(changed)} {'is not the file' if len(changed) == 1 else 'are not the files'} this "
            f"model was trained with (training.json records each weights file's SHA-256); a part of another model "
            f"was copied over it? Copy the model folder again. If you changed the part on purpose, delete "
            f"\"{WEIGHTS_SHA256}\" from training.json")


def _check_pickled_weights(path: Path, part: str) -> None:
    """A ``.bin`` weights file is a PyTorch file (a zip archive, or an older bare pickle): anything else,
    such as a safetensors file given a .bin name, fails deep inside torch.load with an unpickling error."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return
    size = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if head[8:9] == b"{" and 0 < size < path.stat().st_size:
        raise ModelFolderError(f"{path} is a safetensors file with a .bin name: the weights of the {part} are read by "
                               f"their name, and a .bin is taken for a PyTorch pickle. Rename it to "
                               f"{path.with_suffix('.safetensors').name}")
    raise ModelFolderError(f"{path} is not a PyTorch weights file (it starts with {head[:8]!r}, not a zip archive or "
                           f"a pickle): the weights of the {part} are damaged or of another format; copy them from "
                           f"the model's source again")


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """The shape of each tensor that a (sound) safetensors file's header declares."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _check_text_encoder_weights(sub: Path) -> None:
    """A CLIP text encoder's config.json (positions, vocabulary, width) fits its weights: transformers
    refuses the mismatch with a message about ``ignore_mismatched_sizes`` that names neither."""
    weights = sub / "model.safetensors"
    if not weights.is_file():
        return  # shards or a .bin: transformers checks those as it loads them
    config = json.loads((sub / "config.json").read_text(encoding="utf-8"))
    shapes = _safetensors_shapes(weights)
    for suffix, key, axis, meaning in (("position_embedding.weight", "max_position_embeddings", 0, "positions"),
                                       ("token_embedding.weight", "vocab_size", 0, "token embeddings"),
                                       ("token_embedding.weight", "hidden_size", 1, "-wide embeddings")):
        shape = next((v for k, v in shapes.items() if k.endswith(suffix)), None)
        said = config.get(key, config.get("text_config", {}).get(key) if isinstance(config.get("text_config"), dict)
                          else None)
        if not isinstance(shape, list) or len(shape) != 2 or not isinstance(said, int) or said == shape[axis]:
            continue
        tensor = next(k for k, v in shapes.items() if k.endswith(suffix))
        holds = f"{shape[axis]}{meaning}" if meaning.startswith("-") else f"{shape[axis]} {meaning}"
        raise ModelFolderError(f"{sub / 'config.json'} says {key} {said}, but {weights} holds {holds} ({tensor} is "
                               f"{shape[0]}x{shape[1]}): the config and the weights come from different models. Put "
                               f"back the config.json that came with the weights ({key} {shape[axis]})")
    layers = {int(m.group(1)) for k in shapes for m in [re.search(r"encoder\.layers\.(\d+)\.", k)] if m}
    said = config.get("num_hidden_layers")
    if layers and isinstance(said, int) and not isinstance(said, bool) and said != max(layers) + 1:
        raise ModelFolderError(f"{sub / 'config.json'} says num_hidden_layers {said}, but {weights} holds "
                               f"{max(layers) + 1} layers: the config and the weights come from different models. Put "
                               f"back the config.json that came with the weights (num_hidden_layers {max(layers) + 1})")


def _json_problem(path: Path) -> str | None:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        return "starts with a byte-order mark, which diffusers and transformers cannot read"
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except json.JSONDecodeError as err:
        return f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    if path.name.endswith("config.json") and not isinstance(value, dict):
        return f"holds a JSON {type(value).__name__}, not the object of settings a config is"
    # settings that diffusers and transformers take without complaint and fail on much later
    positive = {"scheduler_config.json": ("num_train_timesteps", "the length of the noise schedule the model was "
                                          "trained with (1000 for Stable Diffusion)"),
                "tokenizer_config.json": ("model_max_length", "the number of tokens prompts are padded to (77 for CLIP)")}
    if isinstance(value, dict) and path.name in positive and positive[path.name][0] in value:
        key, meaning = positive[path.name]
        if not _positive_int(value[key]):
            return f"has {key} {value[key]!r}; it must be a whole number > 0, {meaning}"
        if key == "num_train_timesteps" and value[key] > MAX_TIMESTEPS:  # diffusers would build a schedule that long
            return (f"has {key} {value[key]:,}; no model is trained on more than {MAX_TIMESTEPS:,} steps, and building "
                    f"that schedule would not end. It is {meaning}")
    if isinstance(value, dict) and path.name == "config.json":
        side = value.get("sample_size")
        sides = side if isinstance(side, list) else [side]
        denoiser = path.parent.name in ("unet", "transformer")  # a VAE's sample_size is in pixels
        if denoiser and any(isinstance(v, int) and v > MAX_LATENT_SIDE for v in sides):  # an image would take terabytes
            return (f"has sample_size {side!r}; it is the latent side the model was trained on (64 for a 512-pixel "
                    f"Stable Diffusion), at most {MAX_LATENT_SIDE} here")
        if path.parent.name == "vae" and "scaling_factor" in value:
            scale = value["scaling_factor"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
                return (f"has scaling_factor {scale!r}; it must be a finite number > 0, the factor of the VAE's "
                        "latents (0.18215 for Stable Diffusion 1.x/2.x)")
    return None


#: the most train timesteps and the largest latent side a model folder may declare (SD: 1000 and 64-128)
MAX_TIMESTEPS = 100_000
MAX_LATENT_SIDE = 512


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read (``None`` when its header and sizes are sound)."""
    size = path.stat().st_size
    if size < 8:
        return f"is {size} bytes long: empty, not a safetensors file"
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > size - 8 or length > 100 * 2**20:
            return f"declares a {length}-byte header but holds {size} bytes"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "has a header that is not valid JSON"
    if not isinstance(header, dict):
        return "has a header that is not a JSON object"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    data = size - 8 - length
    if ends and max(ends) > data:
        return f"holds {data} bytes of tensors but its header needs {max(ends)}"
    return None


def _pipeline_class(source: str, local_only: bool):
    import diffusers  # importing diffusers doubles the time of `import iseg`; only loading needs it

    index = _model_index(source, local_only) or {}
    folder = Path(source).expanduser()
    name = index.get("_class_name", "StableDiffusionPipeline")
    where = folder / "model_index.json" if folder.is_dir() else f"the model_index.json of {source}"
    if name not in PIPELINES:
        with quiet_libraries():
            try:
                known = getattr(diffusers, name, None) if name.isidentifier() else None
            except Exception:  # noqa: BLE001 - diffusers imports a pipeline's module lazily; a broken one is not ours
                known = None
        if not (isinstance(known, type) and issubclass(known, diffusers.DiffusionPipeline)):
            raise ModelFolderError(f"{where}: _class_name {name!r} is not a diffusers pipeline class; set it to the "
                                   f"pipeline the weights are for: {', '.join(PIPELINES)} (StableDiffusionPipeline "
                                   "for SD 1.x/2.x)")
        raise UnsupportedPipelineError(f"{source} is a {name}; iseg reads {', '.join(PIPELINES)} "
                                       f"(families: {', '.join(FAMILIES)})")
    with quiet_libraries():  # the pipeline's module imports transformers' image processors
        cls = getattr(diffusers, name)
    if index:
        parts = _check_index_parts(where, index, cls)
        if folder.is_dir():
            _check_folder_files(folder, index, parts)
    return cls


#: what each kind of part is called in messages, and an example of its [library, class] entry
_SCHEDULER_EXAMPLE = ("diffusers", "DDIMScheduler")


def _part_kind(cls) -> str | None:
    """What a component class is: ``"scheduler"``, ``"tokenizer"``, ``"text encoder"``,
    ``"autoencoder"``, ``"UNet"``, ``"transformer"``, or ``None`` for anything else."""
    import diffusers
    import transformers

    if not isinstance(cls, type):
        return None
    if issubclass(cls, enum.Enum) or issubclass(cls, diffusers.SchedulerMixin):  # SD's annotation is an enum of them
        return "scheduler"
    if issubclass(cls, transformers.PreTrainedTokenizerBase):
        return "tokenizer"
    if issubclass(cls, transformers.PreTrainedModel):
        return "text encoder"
    if issubclass(cls, diffusers.ModelMixin):
        for key, kind in ((".autoencoders.", "autoencoder"), (".unets.", "UNet"), (".transformers.", "transformer")):
            if key in cls.__module__:
                return kind
        return "diffusers model"
    return None


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _expected_entry(cls) -> tuple[str, str]:
    """The ``[library, class]`` entry of a pipeline's part whose annotation is ``cls``."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return _SCHEDULER_EXAMPLE
    return cls.__module__.split(".")[0], cls.__name__


def _required_parts(pipeline: type) -> list[str]:
    """The parts iSeg needs of a pipeline class: those its family's backbone reads
    (``Backbone.parts``), the denoiser, VAE and scheduler first, then text encoders and tokenizers
    (diffusers calls some of these optional; parts a family leaves out when loading, see
    ``Backbone.load_options``, are not among them)."""
    keys = inspect.signature(pipeline.__init__).parameters
    parts = FAMILIES[PIPELINES[pipeline.__name__]][0].parts
    first = [parts[0], *(part for part in ("vae", "scheduler") if part in parts)]
    return [part for part in first + [p for p in parts if p not in first] if part in keys]


def _check_index_parts(where, index: dict, pipeline: type) -> dict[str, type]:
    """Every part iSeg needs is listed in model_index.json as a class of its library and of the
    kind the pipeline takes there (a UNet where the UNet goes); the classes of the listed parts.
    ``ModelFolderError`` naming the entry, what it should be, and how to set it, otherwise."""
    import diffusers

    annotations = {k: p.annotation for k, p in inspect.signature(pipeline.__init__).parameters.items()}
    required = _required_parts(pipeline)
    listed = _components(index)
    classes = {}
    for part in required:
        library, name = _expected_entry(annotations[part])
        example = json.dumps([library, name])
        if part not in listed:
            said = "no entry for it" if part not in index else json.dumps(index[part])
            fits = [other for other, family in PIPELINES.items() if other != pipeline.__name__
                    and all(p in listed for p in _required_parts(getattr(diffusers, other)))]
            hint = (f" (the parts it lists are those of a {fits[0]}: is _class_name right?)" if fits else "")
            raise ModelFolderError(f"{where}: a {pipeline.__name__} needs a {part}, but model_index.json has {said}"
                                   f"{hint}. Set \"{part}\": {example} with the {part}/ folder beside it, or copy the "
                                   "whole model folder again")
    for part, (library, name) in listed.items():
        if part not in required:
            continue  # a part iSeg does not use (a safety checker, listed as ["stable_diffusion", ...]): diffusers' own
        expected = annotations[part]
        entry = json.dumps([library, name])
        example = json.dumps(list(_expected_entry(expected)))
        if library not in ("diffusers", "transformers"):
            raise ModelFolderError(f"{where}: {part} is {entry}, but {library!r} is not a library iseg loads model "
                                   f"parts from (diffusers, transformers); a {pipeline.__name__}'s {part} is {example}")
        with quiet_libraries():
            try:
                cls = getattr(importlib.import_module(library), name, None) if name.isidentifier() else None
            except Exception:  # noqa: BLE001 - a lazily imported module that fails is a class iseg cannot use
                cls = None
        if not isinstance(cls, type):
            raise ModelFolderError(f"{where}: {part} is {entry}, but {library} has no class {name!r}; a "
                                   f"{pipeline.__name__}'s {part} is {example}. Fix the entry, or copy the model "
                                   "folder again")
        want, got = _part_kind(expected), _part_kind(cls)
        if want is not None and got != want:
            raise ModelFolderError(f"{where}: {part} is {entry}, {_a(got) if got else 'not a model part'}, but a "
                                   f"{pipeline.__name__}'s {part} is {_a(want)} ({example}); fix the entry (were two "
                                   "entries swapped?), or copy the model folder again")
        classes[part] = cls
    return classes


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

    cls = _pipeline_class(source, local_only)
    # the family's parts that segmentation never runs are left out (``Backbone.load_options``)
    extra = next((dict(backbone.load_options) for backbone, names in FAMILIES.values() if cls.__name__ in names), {})
    with quiet_libraries():  # keep notebooks free of per-component progress bars and notices
        return cls.from_pretrained(source, dtype=dtype, local_files_only=local_only, **extra)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks that nothing touches the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def auto_models() -> dict[str, tuple[str, str]]:
    """What ``load_model("auto", family=...)`` looks for, by family: the full-size model (its weights
    in the local cache and a GPU), else the shipped model of the same family, as each registered
    backbone declares them (``Backbone.default_model``, ``Backbone.fallback_model``)."""
    return {name: (backbone.default_model, backbone.fallback_model) for name, (backbone, _) in FAMILIES.items()
            if backbone.default_model and backbone.fallback_model}


def load_model(model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype: torch.dtype | str | None = None,
               verbose: bool = True, family: str | None = None) -> LoadedModel:
    """Load a model for iSeg and move it to ``device``; returns a ``LoadedModel``.

    ``model`` is a hub id (default: ``DEFAULT_MODEL``, SD 2.1-base), a local folder in diffusers
    layout, a short name of a shipped model (``"shapes"``), or ``"auto"``: the full-size model of
    ``family`` (default ``DEFAULT_FAMILY``) when its weights are in the local cache and a GPU is
    present, else the shipped model of that family (``auto_models()``: ``"shapes"`` for SD 1.x/2.x,
    ``"shapes-mmdit"`` for the MM-DiT family). ``device`` defaults to CUDA when present;
    ``dtype`` (a torch dtype or its name, ``"float16"``) to float16 on CUDA and float32 elsewhere. Missing weights raise
    ``ModelNotAvailableError`` with the ways out; with ``HF_HUB_OFFLINE=1`` nothing touches the
    network.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = _model_name(model)
    if family is not None and name != "auto":
        raise ValueError(f"family={family!r} only chooses what load_model('auto') loads; {name!r} names its model itself")
    if name == "auto":
        pipe, name = _choose_auto(family, device, dtype, verbose)
        if pipe is not None:
            return _finish(pipe, device, name)

    shipped = shipped_models()
    if name in shipped:
        return _finish(_load_shipped(name, shipped[name], dtype), device, name)
    if name in registry.MODELS:
        raise _unavailable(name, "it is registered but its folder is missing from this installation")
    path = Path(name).expanduser()
    _refuse_near_names(name, path, shipped)
    if path.exists():
        return _load_folder(name, path, shipped, device, dtype)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise _unavailable(name, f"no such folder: {path}")
    return _finish(_load_hub(name, dtype), device, name)


def _model_name(model) -> str:
    """``load_model``'s ``model`` as text: a ``TypeError`` for anything but text or a path, a
    ``ValueError`` for an empty name."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a hub id, a folder or a shipped model's name, got {type(model).__name__} "
                        f"{model!r}")
    name = os.fspath(model)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not name.strip():
        raise ValueError("model is empty; give a hub id, a folder, a shipped model's name or 'auto'")
    return name


def _choose_auto(family: str | None, device: torch.device, dtype: torch.dtype, verbose: bool) -> tuple[object, str]:
    """What ``load_model("auto")`` loads for ``family``: ``(pipeline, hub id)`` of the full-size
    model where its weights are cached and ``device`` is a GPU, else ``(None, shipped name)`` of
    the family's shipped model, which the caller loads; says which when ``verbose``."""
    key = family or DEFAULT_FAMILY
    choices = auto_models()
    if key not in choices:
        raise ValueError(f"load_model('auto') knows the families {sorted(choices)}, not {family!r}")
    full, small = choices[key]
    pipe, name = None, small
    if device.type == "cuda":
        try:
            pipe, name = _from_pretrained(full, dtype, local_only=True), full
        except Exception:  # noqa: BLE001 - anything missing means: fall back
            pipe, name = None, small
    if pipe is None and small not in shipped_models():
        raise _unavailable("auto", f"neither {full} weights with a GPU nor the {small} model were found")
    if verbose:
        why = "" if name != small else f" ({full} needs its weights in the cache and a GPU)"
        # ordinary output: which model runs is news, not a warning (a notebook shows stderr in red)
        print(f"iseg: model 'auto' -> {name}{why}")
    return pipe, name


def _load_shipped(name: str, folder: Path, dtype: torch.dtype):
    """The pipeline of the shipped model ``name`` from its ``folder``."""
    source = str(folder)
    try:
        return _from_pretrained(source, dtype, local_only=True)
    except ModelFolderError:
        raise
    except (OSError, ValueError) as err:
        raise _unavailable(name, f"the shipped folder {source} is incomplete or corrupt ({err})") from err


def _refuse_near_names(name: str, path: Path, shipped: Mapping) -> None:
    """A name that is a model's name but for case or spaces (``"SHAPES"``), and no folder, is
    refused before any hub lookup: it is no hub id."""
    names = sorted({*shipped, *registry.MODELS, "auto"})
    close = next((n for n in names if n.lower() == name.strip().lower()), None)
    if close is None and "/" not in name and "\\" not in name:
        # a one-word name one letter or so from a model's name ("shape") is a typo, not a hub id
        # (hub ids of pipelines are owner/name): no lookup that retries for half a minute
        close = next(iter(difflib.get_close_matches(name.strip().lower(), names, n=1, cutoff=0.8)), None)
    if close is not None and not path.exists():
        raise _unavailable(name, f"no model has that name; did you mean {close!r}? (model names are exact: lower "
                                 "case, no spaces)")


def _load_folder(name: str, path: Path, shipped: Mapping, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model in the local folder ``path``: a shipped model's folder given by its path is that
    model (with its preset and vocabulary), a copy of a shapes-world folder gets the shapes entry."""
    if not (path / "model_index.json").is_file():
        parent = path.parent if (path.parent / "model_index.json").is_file() else None
        if path.is_file():
            why = f"{path} is a file, not a model folder; give the folder that holds model_index.json" + (
                f" ({parent})" if parent else "")
        elif (path / "model_index.json").exists():
            why = f"{path / 'model_index.json'} is not a file (a folder?); it must be the model's JSON index"
        elif parent:
            why = f"{path} is the {path.name}/ part of the model folder {parent}; give that folder"
        else:
            why = f"{path} exists but has no model_index.json (not a diffusers folder)"
        raise _unavailable(name, why)
    known = next((n for n, folder in shipped.items() if _same_folder(folder, path)), None)
    try:
        pipe = _from_pretrained(str(path), dtype, local_only=True)
    except (ModelFolderError, UnsupportedPipelineError):
        raise
    except Exception as err:  # noqa: BLE001 - diffusers and transformers raise many kinds for a bad folder
        raise _folder_error(path, err) from err
    return _finish(pipe, device, known or str(path), None if known else _shapes_entry(path, pipe))


def _folder_error(path: Path, err: Exception) -> ModelFolderError:
    """The ``ModelFolderError`` for a folder whose pipeline failed to build with ``err``: it names
    the part that fails (``_failing_part``), its error's first line and the settings file to check."""
    part, cause = _failing_part(path)
    cause = cause or err
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    hint = (" (a config.json does not match the weights next to it)"
            if "mismatch" in str(cause).lower() or "expected shape" in str(cause).lower() else "")
    if part is None:
        return ModelFolderError(f"the model folder {path} could not be loaded{hint}: {type(err).__name__}: {first}")
    settings = "scheduler_config.json" if part.startswith("scheduler") else (
        "tokenizer_config.json and the vocabulary" if part.startswith("tokenizer") else "config.json")
    return ModelFolderError(f"the {part} of the model folder {path} could not be loaded{hint}: "
                            f"{type(cause).__name__}: {first}. Check {path / part}'s {settings}, or copy that "
                            "folder from the model's source again")


def _load_hub(name: str, dtype: torch.dtype):
    """The pipeline of the hub id ``name``: the local cache first, so that nothing waits on the
    network when it is not needed; then a download, unless HF_HUB_OFFLINE is set."""
    try:
        return _from_pretrained(name, dtype, local_only=True)
    except (ModelFolderError, UnsupportedPipelineError):
        raise
    except Exception as cache_err:  # noqa: BLE001
        if hub_offline():
            raise _unavailable(name, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set") from cache_err
        try:
            return _from_pretrained(name, dtype, local_only=False)
        except UnsupportedPipelineError:
            raise
        except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors all mean the same here
            raise _unavailable(name, f"it is not in the local cache and downloading failed ({type(err).__name__}: "
                                     f"{err})") from err


def _failing_part(folder: Path) -> tuple[str | None, Exception | None]:
    """Which part of a model folder fails to load, and its error, loading the parts one by one
    (only after the pipeline failed: diffusers' error does not say which part it was building)."""
    try:
        index = _read_index(folder / "model_index.json")
        import diffusers

        classes = _check_index_parts(folder / "model_index.json", index, getattr(diffusers, index["_class_name"]))
    except Exception:  # noqa: BLE001 - no better answer than the pipeline's own error
        return None, None
    for part, cls in classes.items():
        try:
            with quiet_libraries():
                if _part_kind(cls) == "scheduler":
                    cls.from_pretrained(folder, subfolder=part)
                else:  # a tokenizer or a model (in float32: which dtype does not decide whether it loads)
                    cls.from_pretrained(folder / part)
        except Exception as err:  # noqa: BLE001 - the error of the part that fails is the one to show
            return part, err
    return None, None


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def _shapes_entry(path: Path, pipe) -> ModelEntry | None:
    """The registry entry of the shipped shapes model of ``pipe``'s family (the first shipped folder
    with a ``training.json`` whose pipeline is of that family), with ``path`` as its folder, when ``path`` holds a shapes-world
    model: ``iseg train-shapes --out`` writes its ``training.json`` (the training's settings, with
    ``unet_steps`` and ``latent_side``), which a copy of a shipped shapes folder carries too. Such a
    folder gets the shapes preset and vocabulary; ``None`` for any other folder. A copy that lost its
    ``training.json`` is known by its tokenizer, whose vocabulary is the shapes world's: read as any
    other model, it would get a preset whose prompt has words that vocabulary lacks."""
    try:
        info = json.loads((path / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    marked = isinstance(info, dict) and {"unet_steps", "latent_side"} <= info.keys()
    if not marked and not _has_shapes_vocabulary(path):
        return None
    family = family_of(pipe)
    for name, folder in shipped_models().items():
        try:
            shipped_class = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            continue
        if (folder / "training.json").is_file() and PIPELINES.get(shipped_class) == family:
            return replace(registry.MODELS[name], folder=path)
    return None


def _tokenizer_vocabulary(folder: Path) -> dict | None:
    try:
        vocab = json.loads((folder / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return vocab if isinstance(vocab, dict) else None


def _has_shapes_vocabulary(path: Path) -> bool:
    """Whether the folder's tokenizer knows exactly the words of a shipped shapes model's tokenizer."""
    vocab = _tokenizer_vocabulary(path)
    return vocab is not None and any(vocab == _tokenizer_vocabulary(folder) for folder in shipped_models().values())


def _finish(pipe, device, name: str, entry: ModelEntry | None = None) -> LoadedModel:
    check_components(pipe, name)
    _check_weights_filled(pipe, name)
    with quiet_libraries():  # diffusers warns that float16 "cannot run" on a CPU; iseg's pass does (numerics.py)
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    model = _LOADED[pipe] = LoadedModel(pipe, name, entry or registry.MODELS.get(name))
    return model


def _check_weights_filled(pipe, name: str) -> None:
    """Every tensor of every part holds data: a weights file of another part or model (the VAE's
    copied over the UNet's) loads without an error but leaves the tensors it lacks on the meta
    device, which fails later inside ``.to()`` with a message about meta tensors. ``ModelFolderError``
    naming the part and its weights file instead."""
    for part, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        empty = [key for key, tensor in tensors if tensor.is_meta]
        if not empty:
            continue
        folder = _config(module, "_name_or_path")  # the part's own folder, where diffusers or transformers read it
        files = sorted(p.name for p in Path(folder).glob("*.safetensors")) if folder and Path(folder).is_dir() else []
        where = f"{part}/{files[0]}" if len(files) == 1 else f"the weights in {part}/"
        raise ModelFolderError(f"{name}: {len(empty)} of the {len(tensors)} tensors of the {part} (e.g. {empty[0]!r}) "
                               f"are missing from {where}; the file holds the weights of another part or model "
                               "(were weight files swapped or copied over each other?). Copy the model folder again")


_config = config_value


def check_components(pipe, name: str = "the model") -> None:
    """Check that a pipeline's parts fit each other, so that a mismatched folder fails here, naming
    the parts and their sizes, and not inside torch on the first image: the denoiser's latent
    channels and the VAE's, its text width and the text encoders', its sample size (what the
    family's backbone checks), and each tokenizer against its text encoder's positions and
    vocabulary. ``ModelFolderError`` otherwise; ``UnsupportedPipelineError`` for a pipeline of no
    family iseg has."""
    family = family_of(pipe)
    if family is None:
        raise UnsupportedPipelineError(f"{name}: iseg has no backbone for a {type(pipe).__name__}; "
                                       f"it reads {', '.join(PIPELINES)}")
    backbone = FAMILIES[family][0]
    required = list(backbone.parts)
    missing = [part for part in required if getattr(pipe, part, None) is None]
    if missing:
        raise ModelFolderError(f"{name} has no {', '.join(missing)}; iSeg needs every part of a {type(pipe).__name__} "
                               f"({', '.join(required)})")
    steps = _config(pipe.scheduler, "num_train_timesteps")
    if not _positive_int(steps):
        raise ModelFolderError(f"{name}: scheduler/scheduler_config.json has num_train_timesteps {steps!r}; it must "
                               "be the length of the noise schedule the model was trained with, a whole number > 0 "
                               "(1000 for Stable Diffusion)")

    def fail(message: str):
        raise ModelFolderError(f"{name}: {message}; its parts come from different models. Use the folder of one model")

    def refuse(message: str):
        raise ModelFolderError(f"{name}: {message}")

    backbone.check_denoiser(pipe, fail, refuse)
    widths = _check_text_encoders(pipe, name, fail)
    if None not in widths:
        backbone.check_text_widths(pipe, widths, fail)


def _check_text_encoders(pipe, name: str, fail) -> list:
    """Each tokenizer against its text encoder; returns the encoders' widths (``hidden_size``)."""
    encoders = [(pipe.text_encoder, pipe.tokenizer, "text_encoder", "tokenizer")]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append((pipe.text_encoder_2, pipe.tokenizer_2, "text_encoder_2", "tokenizer_2"))
    for encoder, tokenizer, encoder_name, tokenizer_name in encoders:
        positions = _config(encoder, "max_position_embeddings")
        window = getattr(tokenizer, "model_max_length", None)
        if isinstance(window, int) and window <= 0:
            raise ModelFolderError(f"{name}: {tokenizer_name}/tokenizer_config.json has model_max_length {window}; "
                                   "it must be a whole number > 0, the number of tokens prompts are padded to")
        if isinstance(window, int) and window < 3:
            raise ModelFolderError(f"{name}: {tokenizer_name}/tokenizer_config.json has model_max_length {window}, "
                                   "too short for any prompt (a start token, one word and an end token need 3); "
                                   "set it to the text encoder's positions (max_position_embeddings) or copy the "
                                   "tokenizer folder that came with the model again")
        if positions is not None and isinstance(window, int) and window > positions:  # T5 has no such limit
            if window >= 10**18:  # transformers' stand-in for "no limit": tokenizer_config.json sets none
                raise ModelFolderError(f"{name}: {tokenizer_name}/tokenizer_config.json sets no model_max_length, so "
                                       f"prompts would be padded to no length, but {encoder_name} has {positions} "
                                       f"positions; set \"model_max_length\": {positions} there")
            raise ModelFolderError(f"{name}: {tokenizer_name}/tokenizer_config.json pads prompts to {window} tokens "
                                   f"(model_max_length) but {encoder_name} has {positions} positions "
                                   f"(max_position_embeddings): every prompt would fail inside the text encoder. "
                                   f"Its parts come from different models: use the folder of "
                                   f"one model, or set \"model_max_length\": {positions} in that file")
        vocab = _config(encoder, "vocab_size")
        if vocab is not None and len(tokenizer) > vocab:
            fail(f"{tokenizer_name} has {len(tokenizer)} tokens but {encoder_name} embeds {vocab} (vocab_size)")
    return [_config(e, "hidden_size") for e, *_ in encoders]


def load_pipeline(model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype: torch.dtype | None = None,
                  verbose: bool = True, family: str | None = None) -> LoadedModel:
    """The older name of ``load_model``; it returns the same ``LoadedModel`` (``.pipe`` is the
    diffusers pipeline)."""
    return load_model(model, device=device, dtype=dtype, verbose=verbose, family=family)
