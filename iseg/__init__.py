"""iseg: training-free segmentation from Stable Diffusion's attention (the iSeg method).

    import iseg
    model = iseg.load_model("shapes")            # or a hub id / local SD folder
    result = iseg.ISeg(model).segment(image, ["circle", "star"])

Every step of the method is here too, for following it by hand (notebook 01): ``build_prompt``
and ``class_token_spans`` (Cat-Cross prompts), ``cat_cross``, ``capture_attention``,
``aggregate_cross_attention``, ``kl_cluster``, ``class_maps``, ``entropy_reduce`` (Ent-Self),
``refine_maps`` (the iterative refinement, ``iseg.refine.refine``), ``minmax`` and ``maps_to_labels``; ``predict_labels`` finds an image's classes.
"""

import warnings

from . import capture as _capture
from . import loading as _loading
from . import presets as _presets
from .capture import AttentionLayer, AttentionStore, capture_attention
from .interactive import PromptSession
from .labels import predict_labels
from .loading import DEFAULT_MODEL, LoadedModel, ModelNotAvailableError, load_model, register_model, shipped_models
from .masks import maps_to_labels, minmax
from .numerics import NonFiniteError
from .presets import Settings, SettingsError, make_settings, preset_names, register_preset
from .prompts import PromptTooLongError, build_prompt, cat_cross, class_token_spans
from .refine import aggregate_cross_attention, class_maps, entropy_reduce, kl_cluster, refine_maps
from .registry import data_path
from .results import Observation, SegmentationResult, Trace
from .segmenter import ISeg

__version__ = "0.1.0"  # tests/test_course_api.py checks that it equals pyproject.toml's version

__all__ = [
    # loading a model
    "load_model", "LoadedModel", "register_model", "shipped_models", "DEFAULT_MODEL", "ModelNotAvailableError",
    # the method in one call, and its settings
    "ISeg", "Settings", "make_settings", "preset_names", "register_preset", "SettingsError",
    # the steps, in the order the method takes them
    "build_prompt", "class_token_spans", "cat_cross", "capture_attention", "AttentionStore", "AttentionLayer",
    "aggregate_cross_attention", "kl_cluster", "class_maps", "entropy_reduce", "refine_maps", "minmax", "maps_to_labels",
    # image-level labels, interactive prompts, results
    "predict_labels", "PromptSession", "SegmentationResult", "Observation", "Trace",
    # files and errors
    "data_path", "NonFiniteError", "PromptTooLongError",
]

# Names that ``iseg`` exported before and no longer does: each still works, from the module that
# owns it, and warns once. They are listed for removal in the README ("Public API", "Deprecated").
DEPRECATED = {
    "load_pipeline": (_loading.load_pipeline, "iseg.load_model (it returns the same LoadedModel)"),
    "select_layers": (_capture.select_layers, "iseg.capture.select_layers, or seg.backbone.attention_layers()"),
    "attention_layers": (_capture.attention_layers, "iseg.capture.attention_layers, or seg.backbone.attention_layers()"),
    "CaptureProcessor": (_capture.CaptureProcessor, "iseg.capture.CaptureProcessor (capture_attention installs it)"),
    "PRESETS": (_presets.PRESETS, "iseg.preset_names() and iseg.make_settings(name)"),
}
_warned: set[str] = set()


def __getattr__(name: str):
    if name not in DEPRECATED:
        raise AttributeError(f"module 'iseg' has no attribute {name!r}")
    value, instead = DEPRECATED[name]
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"iseg.{name} is deprecated and will be removed; use {instead}", DeprecationWarning, stacklevel=2)
    return value

