"""Stable Diffusion 3 (MM-DiT): a 16-channel VAE, three text encoders and an ``SD3Transformer2DModel``.

What differs from SD 1.x/2.x, and how the method follows it:

- Denoiser: a transformer over latent patches (``patch_size`` latent cells a side). Each block's
  joint attention runs image and text tokens through one softmax; there is no separate cross-
  and self-attention module. Capture splits it (``JointCaptureProcessor``): the image queries'
  probabilities over the text keys, renormalised over those keys, are the cross-attention map
  (layer ``transformer_blocks.{i}.attn:text``); over the image keys, renormalised likewise, the
  self-attention map (``transformer_blocks.{i}.attn:image``). Text queries are not read. SD 3.5's
  image-only ``attn2`` modules are not read.
- Resolutions: every layer sits on the one patch grid, latent_side / patch_size a side (level
  log2(patch_size)); cross-attention defaults to weight 1 there (``default_cross_weights``) and
  self-attention is read there. The reference's layer and head tables name SD 2.1 layers and do
  not apply.
- Text: CLIP ViT-L and OpenCLIP ViT-bigG penultimate hidden states concatenated on the feature
  axis (77 rows), zero-padded to the T5 width, then the T5 tokens appended along the sequence
  (``max_sequence_length`` rows), exactly as ``StableDiffusion3Pipeline.encode_prompt``. T5 is
  optional: without ``text_encoder_3`` (how ``load_model`` and the tests build SD3 here: it is
  off by default, it is 4.7B parameters) diffusers appends zeros for the T5 part and so does this.
  Class tokens are positions in the CLIP window (the first 77 rows): Cat-Cross scales those rows
  only, never the T5 rows, which are not class tokens. Both CLIP tokenizers share one BPE
  vocabulary; a text they split differently is refused rather than misread.
- Pooled conditioning: both encoders' projected pooled outputs, concatenated. It travels as one
  extra row after the token rows (``encode_text``), as with SDXL, so that one tensor goes through
  the forward recipe; ``denoise`` splits it off.
- Noise: rectified flow, z_t = (1 - sigma) z0 + sigma eps with sigma = t / 1000 for the
  ``timestep`` setting t (0..999), without the scheduler's resolution shift (sigma is what the
  setting says); the transformer gets the float timestep 1000 sigma = t, as the pipeline passes
  ``scheduler.timesteps`` (= sigmas * 1000) to it.
- Latents: z0 = (mean - shift_factor) * scaling_factor, the inverse of the pipeline's decoding.
"""

from __future__ import annotations

import math

import torch

from ..capture import AttentionLayer, SplitCaptureProcessor, split_heads
from ..prompts import Prompt, token_ids
from .base import (
    Architecture,
    Backbone,
    config_value,
    flow_matching_noise,
    layer_numbers,
    random_clip,
    random_vae,
    two_clip_encodings,
)

__all__ = ["SD3Backbone", "JointCaptureProcessor", "joint_attention_layers"]


class JointCaptureProcessor(SplitCaptureProcessor):
    """A joint (MM-DiT) attention processor that returns what ``JointAttnProcessor2_0`` returns
    and records the image queries' attention, split by key (``SplitCaptureProcessor``).

    The output is computed on the same SDPA path as diffusers' processor. The keys are
    ``[image; text]``; the scale is the module's. An ``attention_mask`` (the pipeline passes
    none) is not applied, as diffusers' processor does not apply it either."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                        attn.to_v(hidden_states))
        n_image = query.shape[2]
        if encoder_hidden_states is not None:
            q_text, k_text, v_text = split_heads(
                attn, attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states), attn.norm_added_q, attn.norm_added_k)
            query = torch.cat([query, q_text], dim=2)
            key = torch.cat([key, k_text], dim=2)
            value = torch.cat([value, v_text], dim=2)

        self.record(query[:, :, :n_image], key, n_image, attn.scale)

        hidden_states = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * value.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1] :]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def joint_attention_layers(transformer) -> list[AttentionLayer]:
    """The two maps of every joint attention module of an MM-DiT (``SD3Transformer2DModel``):
    ``transformer_blocks.{i}.attn:text`` (cross) and ``transformer_blocks.{i}.attn:image`` (self),
    both recorded by one ``JointCaptureProcessor``.

    All sit on the patch grid, ``level = log2(patch_size)`` below the latent. Image-only attention
    modules (SD 3.5's ``attn2``) are not listed."""
    patch = int(transformer.config.patch_size)
    level = round(math.log2(patch))
    if 2**level != patch:
        raise ValueError(f"patch_size {patch} is not a power of two; the layer level cannot express it")
    modules = dict(transformer.named_modules())
    layers = []
    for key in transformer.attn_processors:
        name = key.removesuffix(".processor")
        module = modules[name]
        if not name.startswith("transformer_blocks.") or getattr(module, "add_k_proj", None) is None:
            continue
        for suffix, kind in ((":text", "cross"), (":image", "self")):
            layers.append(AttentionLayer(name=name + suffix, kind=kind, level=level, heads=int(module.heads),
                                         module=name, processor=JointCaptureProcessor))
    return layers


class SD3Backbone(Backbone):
    """A ``StableDiffusion3Pipeline``: ``transformer``, ``vae``, ``text_encoder``/``text_encoder_2``
    (CLIP with projection), optional ``text_encoder_3`` (T5), ``tokenizer``.. ``tokenizer_3`` and a
    flow-matching ``scheduler``."""

    #: the T5 rows after the CLIP rows, as ``encode_prompt``'s default
    max_sequence_length = 256

    def __init__(self, pipe):
        super().__init__(pipe, pipe.transformer, pipe.tokenizer)

    parts = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
    # the T5 encoder (4.7B parameters) is left out: diffusers then uses zeros for its tokens, and the
    # class tokens iSeg reads are CLIP tokens
    load_options = {"text_encoder_3": None, "tokenizer_3": None}
    default_model = "stabilityai/stable-diffusion-3-medium-diffusers"
    fallback_model = "shapes-mmdit"
    architecture = Architecture("sd3-arch", "sd3-medium architecture (random weights)")

    @classmethod
    def accepts(cls, pipe) -> bool:
        if not cls.has_parts(pipe, cls.parts):
            return False
        transformer = pipe.transformer
        return hasattr(transformer, "transformer_blocks") and hasattr(transformer, "context_embedder") \
            and hasattr(transformer.config, "joint_attention_dim") and hasattr(transformer.config, "patch_size") \
            and not hasattr(transformer, "single_transformer_blocks")  # FLUX's transformer has these too

    @classmethod
    def check_text_widths(cls, pipe, widths, fail) -> None:
        joint = config_value(pipe.transformer, "joint_attention_dim")
        if isinstance(joint, int) and joint < sum(widths):
            fail(f"the transformer's text width is {joint} (joint_attention_dim) but its two CLIP text encoders "
                 f"give {sum(widths)}")
        pooled = config_value(pipe.transformer, "pooled_projection_dim")
        projections = [config_value(e, "projection_dim") for e in (pipe.text_encoder, pipe.text_encoder_2)]
        if isinstance(pooled, int) and None not in projections and pooled != sum(projections):
            fail(f"the transformer takes {pooled}-wide pooled text (pooled_projection_dim) but the text encoders' "
                 f"projections give {sum(projections)}")

    # -- the published architecture, random weights -------------------------------------------
    @classmethod
    def full_size_components(cls, tokenizer) -> dict:
        """SD3-medium's MM-DiT (2,028,328,000 parameters), VAE and two CLIP text encoders, random
        weights; no T5 (iseg leaves it off by default)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192,
        )
        vae = random_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        with torch.device("cpu"):  # a scheduler's tables are CPU tensors, also under a meta device context
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        return dict(transformer=transformer, vae=vae, text_encoder=random_clip(768, 12, 12, 3072, projection=768),
                    text_encoder_2=random_clip(1280, 32, 20, 5120, projection=1280), text_encoder_3=None,
                    tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=None, scheduler=scheduler)

    @classmethod
    def full_size_pipeline(cls, tokenizer):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(**cls.full_size_components(tokenizer))

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.denoiser.config.patch_size)

    @property
    def native_size(self) -> int:
        return self.config_sample_side() * self.latent_scale

    def size_step(self) -> int:
        return self.latent_scale * self.patch_size

    # -- the noisy forward pass ------------------------------------------------------------------
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow_matching_noise(z0, noise, t)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor, module=None) -> None:
        hidden, pooled = embedding[:, :-1], embedding[:, -1, : self._pooled_dim]
        timestep = t.float()  # the pipeline passes its float32 timesteps, sigma * 1000
        (self.denoiser if module is None else module)(
            hidden_states=z_t, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=timestep,
            return_dict=False)

    @property
    def _pooled_dim(self) -> int:
        return self.pipe.text_encoder.config.projection_dim + self.pipe.text_encoder_2.config.projection_dim

    # -- attention layers ------------------------------------------------------------------------
    @classmethod
    def layers_of(cls, denoiser) -> list[AttentionLayer] | None:
        config = getattr(denoiser, "config", None)
        if not hasattr(denoiser, "transformer_blocks") or not hasattr(config, "patch_size") \
                or hasattr(denoiser, "single_transformer_blocks"):  # FLUX's transformer has blocks too
            return None
        return joint_attention_layers(denoiser)

    @classmethod
    def layer_order(cls, name: str) -> tuple | None:
        return (0, layer_numbers(name)) if name.startswith("transformer_blocks.") else None

    @classmethod
    def layer_title(cls, name: str) -> str | None:
        return f"block {layer_numbers(name)[0]}" if name.startswith("transformer_blocks.") else None

    def default_self_resolution(self, latent_side: int) -> int:
        return math.ceil(latent_side / self.patch_size)

    def default_cross_weights(self, latent_side: int) -> dict[int, float]:
        return {math.ceil(latent_side / self.patch_size): 1.0}  # every joint layer sits on the patch grid

    # -- the prompt ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompt: Prompt) -> torch.Tensor:
        clip, first = two_clip_encodings(self.pipe, prompt, self.tokenizer, "SD3")  # (1, 77, D1 + D2)
        device = clip.device
        pooled = torch.cat(first, dim=-1)  # (1, P1 + P2): both encoders project
        t5 = self._t5(prompt.text, device)  # (1, max_sequence_length, joint_attention_dim)
        width = t5.shape[-1]
        if clip.shape[-1] > width or pooled.shape[-1] > width:
            raise ValueError(f"the CLIP features ({clip.shape[-1]}) or pooled vector ({pooled.shape[-1]}) are wider "
                             f"than the transformer's joint_attention_dim ({width})")
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        row = torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))[:, None]
        return torch.cat([clip, t5, row], dim=1)  # (1, 77 + max_sequence_length + 1, joint_attention_dim)

    def _t5(self, text: str, device) -> torch.Tensor:
        width = self.denoiser.config.joint_attention_dim
        encoder = getattr(self.pipe, "text_encoder_3", None)
        if encoder is None:  # as diffusers: zeros in place of the T5 tokens
            return torch.zeros(1, self.max_sequence_length, width, device=device)
        ids = token_ids(self.pipe.tokenizer_3, text, padding="max_length", max_length=self.max_sequence_length,
                        truncation=True, add_special_tokens=True)
        out = encoder(torch.tensor([ids], device=next(encoder.parameters()).device))[0]
        return out.to(device, torch.float32)

    def offload_text_encoder(self) -> None:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(self.pipe, name, None)
            if encoder is not None:
                encoder.to("cpu", torch.float32)
