"""What a model family must provide to the method, and the families iseg has.

The method needs five things from a model: encode an image to the latent its denoiser sees, noise
that latent at a timestep, run one denoiser pass (during which ``iseg.capture`` records the
attention of chosen layers through the attention-processor API), name its cross- and
self-attention layers with their resolutions and heads, and build the prompt embedding with
Cat-Cross. ``Backbone`` is that contract; ``UNetBackbone`` (SD 1.x/2.x) is its first
implementation and holds the reference layer and head tables.

    backbone = backbone_for(pipe)
    z0 = backbone.encode(pixels)              # (B, C, h, w)
    z_t = backbone.add_noise(z0, noise, t)
    with capture_attention(backbone.denoiser, layers) as store:
        backbone.denoise(z_t, t, embedding)
"""

from __future__ import annotations

from .base import Backbone
from .unet import UNetBackbone

__all__ = ["Backbone", "UNetBackbone", "backbone_for"]


def backbone_for(pipe) -> Backbone:
    """The backbone of a diffusers pipeline; a ``TypeError`` names what is missing."""
    if UNetBackbone.accepts(pipe):
        return UNetBackbone(pipe)
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, part, None) is None]
    if missing:
        raise TypeError(f"the pipeline has no {missing[0]}; iSeg needs a Stable-Diffusion-style pipeline")
    raise TypeError(f"iSeg has no backbone for a {type(pipe.unet).__name__} denoiser; it reads SD 1.x/2.x UNets")
