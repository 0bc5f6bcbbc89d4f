"""The ``clip`` label method: a CLIP model through transformers (default
``openai/clip-vit-base-patch16``) scores the image against prompt-ensembled class names; softmax
over the vocabulary, and every class whose probability is at least ``relative_threshold`` times the
best one's is kept (a multi-label rule in the spirit of the CLIP tagger the paper uses)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import as_image_list, read_pixels, to_uint8
from ..loading import ModelNotAvailableError, hub_offline, resolve_device
from ..prompts import check_class_names, tokenize

__all__ = ["DEFAULT_CLIP", "CLIP_TEMPLATES", "ClipTagger", "load_clip", "clip_available"]

DEFAULT_CLIP = "openai/clip-vit-base-patch16"

# Our own short ensemble of photo-style templates; averaging text embeddings over templates makes
# the class embedding less sensitive to any one phrasing.
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of a {}.",
    "a picture showing a {}.",
    "a drawing of a {}.",
)


class ClipTagger:
    """Multi-label tagging with a CLIP model: ``tagger(images, vocabulary) -> class lists``."""

    def __init__(self, model, tokenizer, image_processor, templates: Sequence[str] = CLIP_TEMPLATES,
                 relative_threshold: float = 0.3, min_labels: int = 1):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.templates = tuple(templates)
        self.relative_threshold = relative_threshold
        self.min_labels = min_labels
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_features(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """``(C, D)`` unit class embeddings, averaged over the templates."""
        key = tuple(vocabulary)
        if key not in self._text_cache:
            feats = []
            for name in key:
                tok = tokenize(self.tokenizer, [t.format(name) for t in self.templates], padding=True,
                               truncation=True, return_tensors="pt").to(self.device)
                f = _unit(_features(self.model.get_text_features(**tok)))
                feats.append(_unit(f.mean(0)))
            self._text_cache[key] = torch.stack(feats)
        return self._text_cache[key]

    @torch.no_grad()
    def probabilities(self, images, vocabulary: Sequence[str]) -> np.ndarray:
        """``(N, C)`` softmax over the vocabulary of CLIP's scaled cosine similarities."""
        items = as_image_list(images)[0]
        pil = [Image.fromarray(to_uint8(read_pixels(i))) for i in items]
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        img = _unit(_features(self.model.get_image_features(pixel_values=pixels))).float()
        logits = self.model.logit_scale.exp().float() * img @ self.text_features(vocabulary).float().T
        return logits.softmax(-1).cpu().numpy()

    def select(self, probs: np.ndarray, vocabulary: Sequence[str]) -> list[str]:
        """Classes with probability >= ``relative_threshold`` x the best, at least ``min_labels``."""
        order = np.argsort(-probs, kind="stable")
        keep = {int(i) for i in np.nonzero(probs >= self.relative_threshold * probs.max())[0]}
        keep |= {int(i) for i in order[: self.min_labels]}
        return [vocabulary[i] for i in sorted(keep)]

    def __call__(self, images, vocabulary: Sequence[str]) -> list[list[str]]:
        vocabulary = list(check_class_names(vocabulary))
        return [self.select(p, vocabulary) for p in self.probabilities(images, vocabulary)]


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output with pooler_output; older versions a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def load_clip(model: str | os.PathLike = DEFAULT_CLIP, device=None, **options) -> ClipTagger:
    """A ``ClipTagger`` from a hub id or a local folder; missing weights give the same clear error
    as ``load_model`` (with ``HF_HUB_OFFLINE=1`` only the local cache is read)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel  # only when CLIP is asked for
    from transformers.utils import logging as tlog

    name = os.fspath(model)
    local = Path(name).expanduser()
    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        if local.exists() or name.startswith((".", "/", "~")):
            if not (local / "config.json").is_file():
                raise ModelNotAvailableError(f"cannot load CLIP model {name!r}: {local} is not a transformers "
                                             "model folder (no config.json)")
        errors = []
        for local_only in ((True,) if hub_offline() or local.exists() else (True, False)):
            try:
                clip = CLIPModel.from_pretrained(name, local_files_only=local_only)
                tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
                processor = CLIPImageProcessor.from_pretrained(name, local_files_only=local_only)
                break
            except (OSError, ValueError) as err:
                errors.append(err)
        else:
            raise ModelNotAvailableError(
                f"cannot load CLIP model {name!r}: {errors[-1]}\n"
                "Ways out:\n"
                f"  1. download it once online (`hf download {name if name.count('/') == 1 else DEFAULT_CLIP}`);\n"
                "     later runs use the cache, also with HF_HUB_OFFLINE=1;\n"
                "  2. pass a local folder saved with CLIPModel.save_pretrained (+ tokenizer, image processor);\n"
                "  3. use label_method='attention', which needs no extra model, or labels from a file."
            ) from None
    finally:
        tlog.set_verbosity(level)
    return ClipTagger(clip.to(resolve_device(device)), tokenizer, processor, **options)


def clip_available(model: str = DEFAULT_CLIP) -> bool:
    """Whether ``load_clip(model)`` would work without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if Path(model).expanduser().is_dir():
            return (Path(model).expanduser() / "config.json").is_file()
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means: not available offline
        return False
