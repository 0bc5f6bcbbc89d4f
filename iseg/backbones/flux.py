"""FLUX.1 (``FluxPipeline``): a 16-channel VAE, CLIP (pooled only) and T5 text encoders, and a
``FluxTransformer2DModel`` over packed 2x2 latent patches.

What differs from SD3, and how the method follows it:

- Denoiser: double-stream blocks (``transformer_blocks.{i}``) run joint attention over image and
  text tokens like SD3's MM-DiT, but the joint sequence is ``[text; image]``; single-stream blocks
  (``single_transformer_blocks.{i}``) run one attention over the joined sequence ``[text; image]``
  with no separate context. Both give, from the image-query rows, a cross-attention map over the
  text keys (``...attn:text``) and a self-attention map over the image keys (``...attn:image``),
  each the joint softmax renormalised over those keys (``FluxCaptureProcessor``). Rotary position
  embeddings are applied to the queries and keys inside the processor; the maps are computed from
  the rotated ones, exactly as the attention sees them.
- Resolutions: the latent is packed into 2x2 patches (``FluxPipeline._pack_latents``); every
  layer sits on that grid, latent_side / 2 a side (level 1). Cross-attention defaults to weight 1
  there (``default_cross_weights``) and self-attention is read there. The reference's layer and
  head tables name SD 2.1 layers and do not apply.
- Text: the transformer reads T5's last hidden states, ``max_sequence_length`` rows (the
  pipeline's default 512, or the T5 tokenizer's ``model_max_length`` when smaller), computed
  without an attention mask as ``FluxPipeline.encode_prompt`` does. The class tokens are T5 tokens:
  ``tokenizer`` is the T5 tokenizer (``tokenizer_2``), so class spans index T5 rows, and Cat-Cross
  scales those rows only. CLIP gives only its pooled output (``pooled_projections``), which
  carries no class token and is not scaled.
- Pooled conditioning: travels as one extra row after the T5 rows (zero-padded to their width),
  as with SD3, so that one tensor goes through the forward recipe; ``denoise`` splits it off.
- Noise: rectified flow, z_t = (1 - sigma) z0 + sigma eps with sigma = t / 1000 for the
  ``timestep`` setting t, without the scheduler's resolution-dependent shift (``use_dynamic_shifting``
  moves the pipeline's sigmas; here sigma is what the setting says). The pipeline passes
  ``timestep / 1000`` = sigma to the transformer (which multiplies by 1000 itself), in the
  latents' dtype, and so does ``denoise``.
- Guidance: a guidance-distilled transformer (``guidance_embeds``, FLUX.1-dev) gets the guidance
  scale 3.5, the pipeline's default (``guidance_scale``); FLUX.1-schnell has none and gets none.
- Positions: image ids ``(0, row, col)`` of the packed grid (``FluxPipeline._prepare_latent_image_ids``)
  and all-zero text ids, as the pipeline makes them.
- Latents: z0 = (mean - shift_factor) * scaling_factor, the inverse of the pipeline's decoding.
- Sizes: the native size is the pipeline's default image side, ``default_sample_size`` (128
  latent cells; FLUX's transformer config has no sample size) times the VAE factor: 1024 for
  FLUX.1. Image sides must be multiples of the VAE factor times 2 (the packing).
"""

from __future__ import annotations

import copy

import torch

from ..capture import AttentionLayer, flux_attention_layers
from ..prompts import Prompt, token_ids
from .base import Backbone, flow_matching_noise

__all__ = ["FluxBackbone"]


class FluxBackbone(Backbone):
    """A ``FluxPipeline``: ``transformer``, ``vae``, ``text_encoder`` (CLIP, pooled output only),
    ``text_encoder_2`` (T5), ``tokenizer`` and ``tokenizer_2``, and a flow-matching ``scheduler``."""

    #: the T5 rows, as ``FluxPipeline.__call__``'s default (also the most it accepts)
    max_sequence_length = 512
    #: the embedded guidance scale of a guidance-distilled transformer, as ``FluxPipeline.__call__``'s default
    guidance_scale = 3.5
    #: the pipeline's default latent side when it has none (``FluxPipeline.default_sample_size``)
    default_sample_size = 128

    def __init__(self, pipe):
        tokenizer = pipe.tokenizer_2
        window = min(int(tokenizer.model_max_length), self.max_sequence_length)
        if window != tokenizer.model_max_length:  # a copy with the pipeline's window, the pipeline's own untouched
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.model_max_length = window
        # the T5 tokenizer: class token spans index the T5 rows the transformer reads
        super().__init__(pipe, pipe.transformer, tokenizer)
        self._ids: dict[tuple, tuple] = {}

    @classmethod
    def accepts(cls, pipe) -> bool:
        if not cls.has_parts(pipe, ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                    "scheduler")):
            return False
        if not (hasattr(pipe, "_pack_latents") and hasattr(pipe, "_prepare_latent_image_ids")):
            return False
        transformer = pipe.transformer
        return hasattr(transformer, "transformer_blocks") and hasattr(transformer, "single_transformer_blocks") \
            and hasattr(transformer, "x_embedder") and hasattr(transformer.config, "joint_attention_dim") \
            and hasattr(transformer.config, "pooled_projection_dim")

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def native_size(self) -> int:
        return int(getattr(self.pipe, "default_sample_size", None) or self.default_sample_size) * self.latent_scale

    def size_step(self) -> int:
        return self.latent_scale * 2  # the latent is packed into 2x2 patches

    # -- the noisy forward pass ------------------------------------------------------------------
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow_matching_noise(z0, noise, t)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor, module=None) -> None:
        batch, _, height, width = z_t.shape
        hidden, pooled = embedding[:, :-1], embedding[:, -1, : self._pooled_dim]
        packed = self.pipe._pack_latents(z_t, batch, z_t.shape[1], height, width)
        img_ids, txt_ids, guidance = self._positions(height // 2, width // 2, hidden.shape[1], batch, packed)
        timestep = t.to(packed.dtype) / 1000  # the pipeline passes sigma; the transformer multiplies by 1000
        (self.denoiser if module is None else module)(
            hidden_states=packed, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=timestep,
            img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)

    def _positions(self, rows: int, cols: int, n_text: int, batch: int, like: torch.Tensor):
        """Image ids, text ids and the guidance vector, made once per shape: no host-to-device copy
        in later passes (a CUDA graph forbids one)."""
        key = (rows, cols, n_text, batch, like.device, like.dtype)
        if key not in self._ids:
            img_ids = self.pipe._prepare_latent_image_ids(batch, rows, cols, like.device, like.dtype)
            txt_ids = torch.zeros(n_text, 3, device=like.device, dtype=like.dtype)
            guidance = None
            if getattr(self.denoiser.config, "guidance_embeds", False):
                guidance = torch.full([1], self.guidance_scale, device=like.device, dtype=torch.float32).expand(batch)
            if len(self._ids) > 16:
                self._ids.clear()
            self._ids[key] = (img_ids, txt_ids, guidance)
        return self._ids[key]

    @property
    def _pooled_dim(self) -> int:
        return int(self.denoiser.config.pooled_projection_dim)

    # -- attention layers ------------------------------------------------------------------------
    def attention_layers(self) -> list[AttentionLayer]:
        if self._layers is None:
            self._layers = flux_attention_layers(self.denoiser)
        return list(self._layers)

    def default_self_resolution(self, latent_side: int) -> int:
        return latent_side // 2

    def default_cross_weights(self, latent_side: int) -> dict[int, float]:
        return {latent_side // 2: 1.0}  # every layer sits on the packed grid

    # -- the prompt ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompt: Prompt) -> torch.Tensor:
        t5 = self.pipe.text_encoder_2
        ids = torch.tensor([list(prompt.input_ids)], device=next(t5.parameters()).device)
        hidden = t5(ids, output_hidden_states=False)[0]  # (1, window, d_model), no attention mask, as the pipeline
        clip, clip_tok = self.pipe.text_encoder, self.pipe.tokenizer
        clip_ids = token_ids(clip_tok, prompt.text, padding="max_length", max_length=clip_tok.model_max_length,
                             truncation=True)
        pooled = clip(torch.tensor([clip_ids], device=next(clip.parameters()).device),
                      output_hidden_states=False).pooler_output  # (1, hidden): the pipeline reads only this
        device = hidden.device
        hidden, pooled = hidden.to(torch.float32), pooled.to(device, torch.float32)
        width = hidden.shape[-1]
        if pooled.shape[-1] > width:
            raise ValueError(f"the pooled CLIP vector ({pooled.shape[-1]}) is wider than the T5 rows ({width}); "
                             "it cannot travel as an extra row")
        row = torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))[:, None]
        return torch.cat([hidden, row], dim=1)  # (1, window + 1, d_model)

    def offload_text_encoder(self) -> None:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self.pipe, name, None)
            if encoder is not None:
                encoder.to("cpu", torch.float32)
