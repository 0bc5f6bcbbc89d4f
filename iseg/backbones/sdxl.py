"""Stable Diffusion XL: a UNet with two CLIP text encoders and added conditioning.

What differs from SD 1.x/2.x, and how the method follows it:

- Text: the prompt goes through both encoders (CLIP ViT-L and OpenCLIP ViT-bigG); their
  penultimate hidden states are concatenated along the feature axis, so a token position means
  the same in both and Cat-Cross scales the class tokens of both encoders at once. Both tokenizers
  share one BPE vocabulary; a text they split differently is refused rather than misread.
- Added conditioning: the second encoder's pooled embedding and the size/crop ids. The pooled
  vector travels as one extra row after the prompt's token rows (``encode_text``), so that one
  tensor goes through the forward recipe (CUDA graphs included); ``denoise`` splits it off. The
  size ids say the image was seen whole at the size the model gets (no crop).
- Attention: there is none at the latent's own resolution (the first level is convolution
  only): self-attention is read at latent/2, cross-attention at latent/2 and latent/4. The
  reference's layer and head tables name SD 2.1 layers and do not apply.
- Noise: z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps with the schedule's cumulative alphas, which is
  what SDXL's Euler scheduler feeds the UNet after ``scale_model_input`` at that timestep.
- The VAE overflows in float16 (``force_upcast`` in its config); it encodes in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..capture import AttentionLayer
from ..prompts import Prompt
from .base import Architecture, random_clip, random_vae, two_clip_encodings
from .unet import UNetBackbone

__all__ = ["SDXLBackbone"]


class SDXLBackbone(UNetBackbone):
    """A ``StableDiffusionXLPipeline`` (``tokenizer``/``tokenizer_2``, ``text_encoder``/``text_encoder_2``)."""

    def __init__(self, pipe):
        super().__init__(pipe)
        vae = pipe.vae
        if getattr(vae.config, "force_upcast", False) and next(vae.parameters()).dtype == torch.float16:
            vae.to(torch.float32)  # SDXL's VAE overflows to inf/NaN in float16

    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
    load_options = {}
    default_model = None  # no shipped SDXL-layout model to fall back to: no "auto" choice
    fallback_model = None
    architecture = Architecture("sdxl-arch", "sdxl-base architecture (random weights)")

    @classmethod
    def accepts(cls, pipe) -> bool:
        return cls.has_parts(pipe, cls.parts) and hasattr(pipe.unet, "down_blocks")

    # -- the published architecture, random weights -------------------------------------------
    @classmethod
    def full_size_components(cls, tokenizer) -> dict:
        """SDXL-base's UNet (2,567,463,684 parameters), VAE and two CLIP text encoders, random weights."""
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
        # a scheduler's tables are CPU tensors by design (diffusers copies them to the CPU), so they are
        # built on the CPU also when the models are made under a meta or CUDA device context
        with torch.device("cpu"):
            scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, timestep_spacing="leading")
        return dict(unet=unet, vae=random_vae(4, scaling_factor=0.13025, force_upcast=True),
                    text_encoder=random_clip(768, 12, 12, 3072),
                    text_encoder_2=random_clip(1280, 32, 20, 5120, projection=1280),
                    tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)

    @classmethod
    def full_size_pipeline(cls, tokenizer):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**cls.full_size_components(tokenizer))

    # -- the noisy forward pass ------------------------------------------------------------------
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alphas = self.pipe.scheduler.alphas_cumprod.to(z0.device, torch.float32)[t].view(-1, 1, 1, 1)
        return (alphas.sqrt() * z0.float() + (1 - alphas).sqrt() * noise.float()).to(z0.dtype)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor, module=None) -> None:
        hidden, pooled = embedding[:, :-1], embedding[:, -1, : self._pooled_dim]
        side = z_t.shape[-1] * self.latent_scale
        # original size, crop top-left, target size: the whole image, at the size the model sees
        time_ids = torch.tensor([side, side, 0, 0, side, side], device=z_t.device, dtype=hidden.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(z_t.shape[0], -1)}
        (self.denoiser if module is None else module)(
            z_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)

    @property
    def _pooled_dim(self) -> int:
        return self.pipe.text_encoder_2.config.projection_dim

    # -- attention layers ------------------------------------------------------------------------
    def reference_layers(self, kind: str, level: int, interactive: bool = False) -> Sequence[str] | None:
        return None  # the reference tables name SD 2.1 layers

    def reference_heads(self, kind: str, level: int, layers: Sequence[AttentionLayer]) -> tuple[int, ...] | None:
        return None

    # -- the prompt ------------------------------------------------------------------------------
    def encode_text(self, prompt: Prompt) -> torch.Tensor:
        hidden, first = two_clip_encodings(self.pipe, prompt, self.tokenizer, "SDXL")  # (1, T, D1 + D2)
        pooled = first[1]  # the second encoder's projected pooled output
        row = torch.zeros(1, 1, hidden.shape[-1], device=hidden.device)
        row[0, 0, : pooled.shape[-1]] = pooled[0]
        return torch.cat([hidden, row], dim=1)  # (1, T + 1, D1 + D2)

    def offload_text_encoder(self) -> None:
        self.pipe.text_encoder.to("cpu", torch.float32)
        self.pipe.text_encoder_2.to("cpu", torch.float32)

