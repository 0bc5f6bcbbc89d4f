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
from collections.abc import Mapping, Sequence

import torch

from ..capture import AttentionLayer, AttentionStore, SplitCaptureProcessor
from ..prompts import Prompt, token_ids
from .base import Backbone, flow_matching_noise, layer_numbers

__all__ = ["FluxBackbone", "FluxCaptureProcessor", "flux_attention_layers"]


class FluxCaptureProcessor(SplitCaptureProcessor):
    """An attention processor for FLUX's ``FluxAttention`` that returns what diffusers'
    ``FluxAttnProcessor`` returns and records the image queries' attention, split by key.

    The output runs diffusers' own code path: the same projections (``_get_qkv_projections``),
    RMS norms, rotary embedding (``apply_rotary_emb``) and ``dispatch_attention_fn`` with the
    replaced processor's attention backend. In a double-stream block the joint sequence is
    ``[text; image]`` (the text tokens first, unlike SD3); in a single-stream block the module gets
    that sequence already joined, with no separate context, so the text length comes from
    ``text_length``, which a forward pre-hook on the block sets from its ``encoder_hidden_states``
    (``attach`` registers it). The probabilities are taken from the rotated queries and keys, in
    float32, with the scale ``head_dim ** -0.5`` that the attention uses; the recording is
    ``SplitCaptureProcessor``'s (``layers``, ``heads``, ``per_head``, ``keep_grad``, ``accumulate``).
    An ``attention_mask`` (``FluxPipeline`` passes none) reaches the output, not the recorded maps."""

    text_first = True

    def __init__(self, store: AttentionStore, layers: Mapping[str, str],
                 heads: Mapping[str, Sequence[int] | None] | None = None, original=None, **options):
        super().__init__(store, layers, heads, original=original, **options)
        self.text_length: int | None = None
        # the attention backend of the processor this one replaces, so the output is computed alike
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
        elif self.text_length is not None:
            n_text = self.text_length
        else:
            raise RuntimeError(f"{sorted(self.layers.values())}: a single-stream FLUX attention module needs the "
                               "text length; install the processor with install_capture (or set text_length)")
        # (B, n, heads, head_dim) -> (B, heads, n, head_dim); image queries only
        n_image = query.shape[1] - n_text
        self.record(query[:, n_text:].transpose(1, 2), key.transpose(1, 2), n_image, scale=query.shape[-1] ** -0.5)

        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def attach(self, denoiser, target: str) -> list:
        """On a single-stream block (an attention module with no added projections), a forward
        pre-hook on the block that tells this processor the text length."""
        attn = denoiser.get_submodule(target)
        if getattr(attn, "added_kv_proj_dim", None) is not None:
            return []  # double-stream: the text comes as encoder_hidden_states
        block = denoiser.get_submodule(target.rpartition(".")[0])
        return [block.register_forward_pre_hook(_text_length_hook(self), with_kwargs=True)]


def _text_length_hook(processor: FluxCaptureProcessor):
    """A forward pre-hook for a FLUX single-stream block: its ``encoder_hidden_states`` (keyword,
    or second positional argument under gradient checkpointing) give the text length."""

    def hook(block, args, kwargs):
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        processor.text_length = None if context is None else int(context.shape[1])

    return hook


def flux_attention_layers(transformer) -> list[AttentionLayer]:
    """The two maps of every attention module of a ``FluxTransformer2DModel``: for each double-stream
    block ``transformer_blocks.{i}.attn:text`` (cross) and ``...:image`` (self), then the same for
    each single-stream block ``single_transformer_blocks.{i}.attn``, all recorded by a
    ``FluxCaptureProcessor`` per module.

    All sit on the grid of packed 2x2 latent patches (``FluxPipeline._pack_latents``), level 1
    below the latent: the transformer's own ``patch_size`` is 1, the packing is done outside it."""
    modules = dict(transformer.named_modules())
    layers = []
    for key in transformer.attn_processors:
        name = key.removesuffix(".processor")
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        for suffix, kind in ((":text", "cross"), (":image", "self")):
            layers.append(AttentionLayer(name=name + suffix, kind=kind, level=1, heads=int(modules[name].heads),
                                         module=name, processor=FluxCaptureProcessor))
    return layers



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

    parts = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
    packed_cells = 4  # the latent is packed 2x2 cells per token

    @classmethod
    def accepts(cls, pipe) -> bool:
        if not cls.has_parts(pipe, cls.parts):
            return False
        if not (hasattr(pipe, "_pack_latents") and hasattr(pipe, "_prepare_latent_image_ids")):
            return False
        transformer = pipe.transformer
        return hasattr(transformer, "transformer_blocks") and hasattr(transformer, "single_transformer_blocks") \
            and hasattr(transformer, "x_embedder") and hasattr(transformer.config, "joint_attention_dim") \
            and hasattr(transformer.config, "pooled_projection_dim")

    @classmethod
    def check_denoiser(cls, pipe, fail, refuse) -> None:
        cls._check_latent_channels(pipe, fail)  # the transformer's config has no sample_size

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
    @classmethod
    def layers_of(cls, denoiser) -> list[AttentionLayer] | None:
        if not (hasattr(denoiser, "transformer_blocks") and hasattr(denoiser, "single_transformer_blocks")):
            return None
        return flux_attention_layers(denoiser)

    @classmethod
    def layer_order(cls, name: str) -> tuple | None:
        head = name.split(".", 1)[0]  # the double-stream blocks, then the single-stream ones
        return ({"transformer_blocks": 0, "single_transformer_blocks": 3}[head], layer_numbers(name)) \
            if head in ("transformer_blocks", "single_transformer_blocks") else None

    @classmethod
    def layer_title(cls, name: str) -> str | None:
        head = name.split(".", 1)[0]
        titles = {"transformer_blocks": "block", "single_transformer_blocks": "single"}
        return f"{titles[head]} {layer_numbers(name)[0]}" if head in titles else None

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
