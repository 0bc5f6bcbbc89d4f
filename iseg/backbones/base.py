"""The contract between the method and a model family."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from ..capture import AttentionLayer
from ..prompts import Prompt

__all__ = ["Backbone"]


class Backbone(ABC):
    """One model family as the method sees it (shapes in each method's docstring)."""

    #: the module whose attention processors capture is installed on (``set_attn_processor``)
    denoiser: torch.nn.Module
    #: the tokenizer of the text encoder (``model_max_length`` is the prompt window)
    tokenizer: object
    #: ``encoding(vae, x) -> latent`` the call ``encode`` makes; ``compile(vae=True)`` compiles it
    encoding: object

    # -- sizes ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def latent_scale(self) -> int:
        """Image pixels per latent cell along one side (the VAE's factor)."""

    @property
    @abstractmethod
    def native_size(self) -> int:
        """The side of the images the model was trained on."""

    @abstractmethod
    def size_step(self) -> int:
        """Image sides must be multiples of this."""

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # -- the noisy forward pass ------------------------------------------------------------------
    @abstractmethod
    def encode(self, pixels: torch.Tensor, encoder=None) -> torch.Tensor:
        """``(B, 3, S, S)`` images in [0, 1] -> the latent ``z0`` the denoiser sees. ``encoder``
        replaces the VAE's encoding call (e.g. a compiled one) with the same signature."""

    @abstractmethod
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z_t`` from ``z0``, the noise and ``(B,)`` timesteps, by the model's schedule."""

    @abstractmethod
    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor, module=None) -> None:
        """One denoiser pass; what the method reads comes from the capture processors.
        ``module`` replaces the denoiser (e.g. a compiled one) with the same signature."""

    # -- attention layers ------------------------------------------------------------------------
    @abstractmethod
    def attention_layers(self) -> list[AttentionLayer]:
        """Every attention layer of the denoiser, with kind, level and heads."""

    def default_self_resolution(self, latent_side: int) -> int:
        """The self-attention grid read when ``self_resolution`` is not set: the finest one the
        denoiser has (the latent side for SD's UNet)."""
        levels = [layer.level for layer in self.attention_layers() if layer.kind == "self"]
        return math.ceil(latent_side / 2 ** min(levels)) if levels else latent_side

    def default_cross_weights(self, latent_side: int) -> dict[int, float]:
        """The cross-attention resolution weights used when ``cross_weights`` is not set: the
        reference's ``{latent/4: 0.7, latent/2: 0.3}`` (method document §3)."""
        return {latent_side // 4: 0.7, latent_side // 2: 0.3}

    def reference_layers(self, kind: str, level: int) -> Sequence[str] | None:
        """Layer names (prefixes) the reference reads for ``kind`` at downsampling ``level``;
        ``None`` where the family has no reference choice (then every layer there is read)."""
        return None

    def reference_heads(self, kind: str, level: int, layers: Sequence[AttentionLayer]) -> tuple[int, ...] | None:
        """Head positions the reference reads on ``layers`` (concatenated in order), or ``None``
        when the reference choice does not apply to them."""
        return None

    # -- the prompt ------------------------------------------------------------------------------
    @abstractmethod
    def encode_text(self, prompt: Prompt) -> torch.Tensor:
        """The embedding ``(1, rows, dim)`` the denoiser reads for one prompt: the text encoder's
        hidden states, one row per token position of ``prompt.input_ids`` (Cat-Cross scales the
        class tokens' rows), plus any rows a family needs after them (SDXL: its pooled embedding)."""

    def offload_text_encoder(self) -> None:
        """Keep the text encoder on the CPU in float32."""
        raise NotImplementedError(f"{type(self).__name__} cannot offload its text encoder")
