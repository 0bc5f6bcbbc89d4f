"""iseg: training-free segmentation from Stable Diffusion's attention (the iSeg method).

    import iseg
    pipe = iseg.load_pipeline("shapes")          # or a hub id / local SD folder
    result = iseg.ISeg(pipe).segment(image, ["circle", "star"])
"""

from . import shapes  # noqa: E402,F401  registers the shipped shapes model and its preset
from .capture import (
    AttentionLayer,
    AttentionStore,
    CaptureProcessor,
    attention_layers,
    capture_attention,
    select_layers,
)
from .loading import DEFAULT_MODEL, ModelNotAvailableError, load_pipeline, register_model, shipped_models
from .presets import PRESETS, Settings, SettingsError, make_settings, register_preset
from .prompts import PromptTooLongError, build_prompt, class_token_spans
from .segmenter import ISeg, SegmentationResult

__version__ = "0.1.0"

__all__ = [
    "AttentionLayer",
    "AttentionStore",
    "CaptureProcessor",
    "DEFAULT_MODEL",
    "ISeg",
    "ModelNotAvailableError",
    "PRESETS",
    "PromptTooLongError",
    "SegmentationResult",
    "Settings",
    "SettingsError",
    "attention_layers",
    "build_prompt",
    "capture_attention",
    "class_token_spans",
    "load_pipeline",
    "make_settings",
    "register_model",
    "register_preset",
    "select_layers",
    "shipped_models",
]
