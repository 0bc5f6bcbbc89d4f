"""iseg: training-free segmentation from Stable Diffusion's attention (the iSeg method).

    import iseg
    model = iseg.load_model("shapes")            # or a hub id / local SD folder
    result = iseg.ISeg(model).segment(image, ["circle", "star"])
"""

from .capture import (
    AttentionLayer,
    AttentionStore,
    CaptureProcessor,
    attention_layers,
    capture_attention,
    select_layers,
)
from .loading import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelNotAvailableError,
    load_model,
    load_pipeline,
    register_model,
    shipped_models,
)
from .numerics import NonFiniteError
from .presets import PRESETS, Settings, SettingsError, make_settings, preset_names, register_preset
from .prompts import PromptTooLongError, build_prompt, class_token_spans
from .registry import data_path
from .results import Observation, SegmentationResult
from .segmenter import ISeg

__version__ = "0.1.0"  # tests/test_course_api.py checks that it equals pyproject.toml's version

__all__ = [
    "AttentionLayer",
    "AttentionStore",
    "CaptureProcessor",
    "DEFAULT_MODEL",
    "ISeg",
    "LoadedModel",
    "Observation",
    "ModelNotAvailableError",
    "NonFiniteError",
    "PRESETS",
    "PromptTooLongError",
    "SegmentationResult",
    "Settings",
    "SettingsError",
    "attention_layers",
    "build_prompt",
    "capture_attention",
    "class_token_spans",
    "data_path",
    "load_model",
    "load_pipeline",
    "make_settings",
    "preset_names",
    "register_model",
    "register_preset",
    "select_layers",
    "shipped_models",
]
