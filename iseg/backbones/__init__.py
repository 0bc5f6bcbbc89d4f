"""What a model family must provide to the method, and the families iseg has.

The method needs five things from a model: encode an image to the latent its denoiser sees, noise
that latent at a timestep, run one denoiser pass (during which ``iseg.capture`` records the
attention of chosen layers through the attention-processor API), name its cross- and
self-attention layers with their resolutions and heads, and build the prompt embedding with
Cat-Cross. ``Backbone`` is that contract; ``UNetBackbone`` (SD 1.x/2.x) is its first
implementation and holds the reference layer and head tables; ``SDXLBackbone`` reads SDXL.

    backbone = backbone_for(pipe)
    z0 = backbone.encode(pixels)              # (B, C, h, w)
    z_t = backbone.add_noise(z0, noise, t)
    with capture_attention(backbone.denoiser, layers) as store:
        backbone.denoise(z_t, t, embedding)
"""

from __future__ import annotations

from .base import Backbone
from .sdxl import SDXLBackbone
from .unet import UNetBackbone

__all__ = ["Backbone", "UNetBackbone", "SDXLBackbone", "FAMILIES", "backbone_for", "family_of"]

# family name -> (backbone, the diffusers pipeline classes it reads), most specific first
FAMILIES = {
    "sdxl": (SDXLBackbone, ("StableDiffusionXLPipeline",)),
    "sd": (UNetBackbone, ("StableDiffusionPipeline",)),
}


def family_of(pipe) -> str | None:
    """The family name of a pipeline (``"sd"``, ``"sdxl"``), or ``None`` when iseg has no backbone for it."""
    for name, (backbone, _) in FAMILIES.items():
        if backbone.accepts(pipe):
            return name
    return None


def backbone_for(pipe) -> Backbone:
    """The backbone of a diffusers pipeline; a ``TypeError`` names what is missing."""
    family = family_of(pipe)
    if family is not None:
        return FAMILIES[family][0](pipe)
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, part, None) is None]
    if missing:
        raise TypeError(f"the pipeline has no {missing[0]}; iSeg needs a Stable-Diffusion-style pipeline")
    supported = ", ".join(c for _, classes in FAMILIES.values() for c in classes)
    raise TypeError(f"iSeg has no backbone for a {type(pipe.unet).__name__} denoiser; supported pipelines: {supported}")
