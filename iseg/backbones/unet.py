"""Stable Diffusion 1.x/2.x: a VAE, a CLIP text encoder and a ``UNet2DConditionModel``.

The reference implementation's layer and head choices live here: they name layers of this UNet
(method document §3) and only mean something on it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..capture import AttentionLayer
from ..prompts import Prompt, encode_prompt
from .base import Architecture, Backbone, config_value, layer_numbers

__all__ = ["UNetBackbone", "unet_attention_layers", "REFERENCE_CROSS", "REFERENCE_SELF", "REFERENCE_VOC_HEADS", "REFERENCE_SELF_HEADS",
           "SD2_HEADS"]

# Layers the reference reads on SD 1.x/2.x UNets, by downsampling level below the latent.
REFERENCE_CROSS = {
    2: ("down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"),
    1: ("down_blocks.1.attentions.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"),
}
REFERENCE_SELF = ("up_blocks.3.attentions.1",)
# Head positions of the reference VOC runs on the axis made by concatenating the heads of the
# layers above, in that order. They only mean something on SD 2.1-base.
REFERENCE_VOC_HEADS = {
    1: (22, 5, 21, 13, 8, 27, 28, 6, 25),
    2: (76, 1, 43, 17, 81, 6, 44, 27, 2, 8, 22, 20, 60, 78, 12, 83, 94, 47, 88, 96, 3, 33, 46, 52, 77, 93, 51,
        58, 0, 13, 14, 19, 34, 41, 59, 87, 16, 24, 28, 30, 32),
}
SD2_HEADS = {0: 5, 1: 10, 2: 20}  # heads per layer at each level on SD 2.x
REFERENCE_SELF_HEADS = (1, 2)


_STAGES = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def unet_attention_layers(unet) -> list[AttentionLayer]:
    """Every attention layer of a ``UNet2DConditionModel``, in forward order of its processor dict;
    each module is cross- or self-attention (``is_cross_attention``) and recorded by
    ``CaptureProcessor``, at the level of its block (down block i: i; the mid block: the deepest;
    up block i: the mirror of down block i)."""
    n_down = len(unet.down_blocks)
    n_up = len(unet.up_blocks)
    modules = dict(unet.named_modules())
    layers = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        module = modules[name]
        m = _BLOCK.match(name)
        if m is None:
            continue
        if m.group(3):
            level = n_down - 1
        elif m.group(1) == "down_blocks":
            level = int(m.group(2))
        else:
            level = n_up - 1 - int(m.group(2))
        kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        layers.append(AttentionLayer(name=name, kind=kind, level=level, heads=int(module.heads)))
    return layers


class UNetBackbone(Backbone):
    """A Stable-Diffusion-style pipeline: ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``
    and a ``UNet2DConditionModel`` (``pipe.unet``)."""

    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    # SD 1.x/2.x pipelines carry a safety checker that segmentation never runs
    load_options = {"safety_checker": None, "requires_safety_checker": False}
    default_model = "stabilityai/stable-diffusion-2-1-base"
    fallback_model = "shapes"
    # measured with the reference's VOC settings (bench/RESULTS.md)
    architecture = Architecture("sd21-arch", "sd21-base architecture (random weights)", preset="wsss-voc")

    def __init__(self, pipe):
        super().__init__(pipe, pipe.unet, pipe.tokenizer)

    @classmethod
    def accepts(cls, pipe) -> bool:
        return cls.has_parts(pipe, cls.parts) and hasattr(pipe.unet, "down_blocks")

    @classmethod
    def check_text_widths(cls, pipe, widths: Sequence[int], fail) -> None:
        cross, width = config_value(pipe.unet, "cross_attention_dim"), sum(widths)
        if isinstance(cross, int) and cross != width:
            encoders = "s give" if len(widths) > 1 else " gives"
            fail(f"the UNet's cross-attention takes {cross}-wide text states (cross_attention_dim) but the text "
                 f"encoder{encoders} {width}")

    # -- the published architecture, random weights -------------------------------------------
    @classmethod
    def full_size_components(cls, tokenizer) -> dict:
        """SD 2.1-base's UNet, VAE and OpenCLIP-H text encoder (23 of its 24 layers, as SD 2.x reads
        the penultimate one), random weights, and its DDIM scheduler."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
            use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
        ))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  steps_offset=1)
        return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                    safety_checker=None, feature_extractor=None)

    @classmethod
    def full_size_pipeline(cls, tokenizer):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**cls.full_size_components(tokenizer), requires_safety_checker=False)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def native_size(self) -> int:
        return self.config_sample_side() * self.latent_scale

    def size_step(self) -> int:
        # the VAE's factor times the UNet's downsampling: every level must halve an integer side
        return self.latent_scale * 2 ** max(0, len(self.denoiser.down_blocks) - 1)

    # -- the noisy forward pass ------------------------------------------------------------------
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.pipe.scheduler.add_noise(z0, noise, t)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor, module=None) -> None:
        (self.denoiser if module is None else module)(z_t, t, encoder_hidden_states=embedding, return_dict=False)

    # -- attention layers ------------------------------------------------------------------------
    @classmethod
    def layers_of(cls, denoiser) -> list[AttentionLayer] | None:
        return unet_attention_layers(denoiser) if hasattr(denoiser, "down_blocks") else None

    @classmethod
    def layer_order(cls, name: str) -> tuple | None:
        head = name.split(".", 1)[0]  # down, mid, up (``named_modules`` lists mid last)
        return (_STAGES[head], layer_numbers(name)) if head in _STAGES else None

    @classmethod
    def layer_title(cls, name: str) -> str | None:
        # ``down 1.0``, ``mid``, ``up 2.1`` (block . attention), ``t j`` for the j-th transformer block of several
        head, nums = name.split(".", 1)[0], layer_numbers(name)
        if head in ("down_blocks", "up_blocks"):
            base = f"{head[:-7]} {nums[0]}.{nums[1]}" if len(nums) >= 2 else head
            return base + (f" t{nums[2]}" if len(nums) >= 3 and nums[2] > 0 else "")
        if head == "mid_block":
            return "mid" + (f" t{nums[1]}" if len(nums) >= 2 and nums[1] > 0 else "")
        return None

    def reference_layers(self, kind: str, level: int, interactive: bool = False) -> Sequence[str] | None:
        if kind == "cross":
            names = REFERENCE_CROSS.get(level)
            if interactive and names:  # the demo reads only the up_blocks.2 layers where a level has them
                names = tuple(n for n in names if n.startswith("up_blocks.2.")) or names
            return names
        return REFERENCE_SELF if level == 0 else None

    def reference_heads(self, kind: str, level: int, layers: Sequence[AttentionLayer]) -> tuple[int, ...] | None:
        # the reference's head positions were chosen on SD 2.x's reference layers; anywhere else
        # (SD 1.x's 8 heads, another layer set) the same positions would pick other heads
        if kind == "cross":
            names = REFERENCE_CROSS.get(level)
            heads = REFERENCE_VOC_HEADS.get(level)
            same = names is not None and _covers(layers, names)
            ok = same and heads is not None and all(layer.heads == SD2_HEADS[level] for layer in layers)
            return heads if ok else None
        sd2 = [layer.name for layer in layers] == [n + ".transformer_blocks.0.attn1" for n in REFERENCE_SELF]
        return REFERENCE_SELF_HEADS if sd2 and level == 0 and all(layer.heads == SD2_HEADS[0] for layer in layers) else None

    # -- the prompt ------------------------------------------------------------------------------
    def encode_text(self, prompt: Prompt) -> torch.Tensor:
        encoder = self.pipe.text_encoder
        return encode_prompt(encoder, prompt.input_ids, next(encoder.parameters()).device)

    def offload_text_encoder(self) -> None:
        self.pipe.text_encoder.to("cpu", torch.float32)


def _covers(layers: Sequence[AttentionLayer], prefixes: Sequence[str]) -> bool:
    return all(any(layer.name == p or layer.name.startswith(p + ".") for p in prefixes) for layer in layers)
