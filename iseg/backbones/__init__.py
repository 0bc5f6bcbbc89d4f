"""What a model family must provide to the method, and the families iseg has.

The method needs five things from a model: encode an image to the latent its denoiser sees, noise
that latent at a timestep, run one denoiser pass (during which ``iseg.capture`` records the
attention of chosen layers through the attention-processor API), name its cross- and
self-attention layers with their resolutions and heads, and build the prompt embedding with
Cat-Cross. ``Backbone`` is that contract; ``UNetBackbone`` (SD 1.x/2.x) is its first
implementation and holds the reference layer and head tables; ``SDXLBackbone`` reads SDXL;
``SD3Backbone`` reads SD3's MM-DiT, whose joint attention gives both kinds of map;
``FluxBackbone`` reads FLUX.1's double- and single-stream blocks the same way.

    backbone = backbone_for(pipe)
    z0 = backbone.encode(pixels)              # (B, C, h, w)
    z_t = backbone.add_noise(z0, noise, t)
    with capture_attention(backbone.denoiser, layers) as store:
        backbone.denoise(z_t, t, embedding)
"""

from __future__ import annotations

from ..capture import LAYER_TABLES, register_layer_table
from .base import Architecture, Backbone, layer_numbers
from .flux import FluxBackbone
from .sd3 import SD3Backbone
from .sdxl import SDXLBackbone
from .unet import UNetBackbone

__all__ = ["Backbone", "Architecture", "UNetBackbone", "SDXLBackbone", "SD3Backbone", "FluxBackbone", "FAMILIES", "backbone_for",
           "family_of", "register_backbone", "unregister_backbone", "layer_order", "layer_title"]

# family name -> (backbone, the diffusers pipeline classes it reads), most specific first
FAMILIES: dict[str, tuple[type[Backbone], tuple[str, ...]]] = {}


def register_backbone(name: str, backbone: type[Backbone], pipelines: tuple[str, ...] = ()) -> type[Backbone]:
    """Add a model family: ``backbone`` (a ``Backbone`` subclass) reads every pipeline its
    ``accepts`` takes, before the families registered earlier, and names its denoiser's layers
    (``layers_of``) for ``iseg.capture``; ``pipelines`` are the pipeline class names it reads, for
    messages. Returns ``backbone``. ``unregister_backbone(name)`` takes it away again."""
    if not (isinstance(backbone, type) and issubclass(backbone, Backbone)):
        raise TypeError(f"register_backbone needs a Backbone subclass, got {backbone!r}")
    if name in FAMILIES:
        raise ValueError(f"a model family {name!r} is registered already ({FAMILIES[name][0].__name__}); "
                         "unregister_backbone it first")
    earlier = list(FAMILIES.items())
    FAMILIES.clear()
    FAMILIES.update([(name, (backbone, tuple(pipelines))), *earlier])
    register_layer_table(backbone.layers_of)
    return backbone


def unregister_backbone(name: str) -> None:
    """Remove the model family ``name`` that ``register_backbone`` added."""
    backbone, _ = FAMILIES.pop(name)
    if backbone.layers_of in LAYER_TABLES:
        LAYER_TABLES.remove(backbone.layers_of)


for _name, _backbone, _pipelines in (("sd", UNetBackbone, ("StableDiffusionPipeline",)),
                                     ("sd3", SD3Backbone, ("StableDiffusion3Pipeline",)),
                                     ("flux", FluxBackbone, ("FluxPipeline",)),
                                     ("sdxl", SDXLBackbone, ("StableDiffusionXLPipeline",))):
    register_backbone(_name, _backbone, _pipelines)


def layer_order(name: str) -> tuple:
    """Sort key that puts a denoiser's layers in the order the image passes them, as the family
    that names them says (a UNet's: down, mid, up; an MM-DiT's blocks by index); else by index."""
    for backbone, _ in FAMILIES.values():
        key = backbone.layer_order(name)
        if key is not None:
            return key
    return 3, layer_numbers(name)


def layer_title(name: str) -> str:
    """A short name for a plot's title, as the family that names the layer gives it: ``down 1.0``,
    ``mid``, ``up 2.1 t1``, ``block 3``, ``single 2``; else the name itself."""
    for backbone, _ in FAMILIES.values():
        title = backbone.layer_title(name)
        if title is not None:
            return title
    return name


def family_of(pipe) -> str | None:
    """The family name of a pipeline (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``), or ``None`` when iseg has no backbone for it."""
    for name, (backbone, _) in FAMILIES.items():
        if backbone.accepts(pipe):
            return name
    return None


def backbone_for(pipe) -> Backbone:
    """The backbone of a diffusers pipeline; a ``TypeError`` names what is missing."""
    family = family_of(pipe)
    if family is not None:
        return FAMILIES[family][0](pipe)
    denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    missing = [part for part in (denoiser, "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, part, None) is None]
    if missing:
        raise TypeError(f"the pipeline has no {missing[0]}; iSeg needs a Stable-Diffusion-style pipeline")
    supported = ", ".join(c for _, classes in FAMILIES.values() for c in classes)
    raise TypeError(f"iSeg has no backbone for a {type(getattr(pipe, denoiser)).__name__} denoiser; "
                    f"supported pipelines: {supported}")
