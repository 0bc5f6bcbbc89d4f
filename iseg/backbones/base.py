"""The contract between the method and a model family.

A family is one ``Backbone`` subclass: it says which pipelines it reads (``accepts``), names its
denoiser's attention layers with their kind, grid and heads and the processor class that records
each (``layers_of``; a processor of its own where its attention computes differently, e.g. one
softmax over image and text tokens, split by ``iseg.capture.SplitCaptureProcessor``), encodes
images to latents, noises them (``add_noise``), runs one denoiser pass (``denoise``) and builds the
conditioning whose class-token rows Cat-Cross scales (``encode_text``, ``cat_cross``). A new family
is added with ``iseg.backbones.register_backbone``; nothing outside its module names it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..capture import AttentionLayer
from ..numerics import check_scale
from ..prompts import Prompt, cat_cross, token_ids

__all__ = ["Backbone", "Architecture", "random_clip", "random_vae", "config_value", "posterior_mean", "vae_latents", "flow_matching_noise", "second_tokenizer_ids",
           "two_clip_encodings"]


def config_value(module, key: str):
    """``module.config[key]`` (a diffusers or transformers config), ``None`` where it has none."""
    config = getattr(module, "config", None)
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def layer_numbers(name: str) -> tuple[int, ...]:
    """The block and layer indices in a layer's name, in order: ``up_blocks.2.attentions.1...`` -> ``(2, 1, ...)``."""
    return tuple(int(part) for part in name.replace(":", ".").split(".") if part.isdigit())


def posterior_mean(vae, x: torch.Tensor) -> torch.Tensor:
    """The mean of the VAE's latent distribution (the reference encodes without sampling)."""
    return vae.encode(x).latent_dist.mean


def vae_latents(vae, pixels: torch.Tensor, device, encoding) -> torch.Tensor:
    """``(B, 3, S, S)`` images in [0, 1] -> ``(mean - shift_factor) * scaling_factor``, the latent
    every family here feeds its denoiser (SD's VAEs have no shift)."""
    x = (2 * pixels - 1).to(device, next(vae.parameters()).dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    check_scale("scaling_factor", vae.config.scaling_factor)
    if not math.isfinite(shift):
        check_scale("shift_factor", shift)
    return (encoding(vae, x) - shift) * vae.config.scaling_factor


def flow_matching_noise(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``z_t = (1 - s) z0 + s eps`` with ``s = t / 1000`` (SD3, FLUX; no resolution shift)."""
    sigma = (t.to(z0.device, torch.float32) / 1000).view(-1, 1, 1, 1)
    return ((1 - sigma) * z0.float() + sigma * noise.float()).to(z0.dtype)


def second_tokenizer_ids(prompt: Prompt, first, second, family: str) -> list[int]:
    """The prompt's ids under a second tokenizer of the same vocabulary (SDXL's and SD3's two
    CLIPs), padded to the first's window; refused where the two split the text differently, since
    the class token positions would then not match."""
    ids_1 = list(prompt.input_ids)
    ids_2 = token_ids(second, prompt.text, padding="max_length", max_length=len(ids_1), truncation=True)
    end_1, end_2 = _until_end(ids_1, first), _until_end(ids_2, second)
    if end_1 != end_2:
        raise ValueError(f"{family}'s two tokenizers split the prompt {prompt.text!r} differently "
                         f"({len(end_1)} and {len(end_2)} tokens); class token positions would not match")
    return ids_2


def two_clip_encodings(pipe, prompt: Prompt, tokenizer, family: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SDXL's and SD3's two CLIP encoders on one prompt: their penultimate hidden states
    concatenated on the features, ``(1, T, D1 + D2)`` in float32, and each encoder's first output
    (the projected pooled vector where the encoder has a projection)."""
    ids_2 = second_tokenizer_ids(prompt, tokenizer, pipe.tokenizer_2, family)
    hidden, first = [], []
    for encoder, ids in ((pipe.text_encoder, list(prompt.input_ids)), (pipe.text_encoder_2, ids_2)):
        device = next(encoder.parameters()).device
        out = encoder(torch.tensor([ids], device=device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # both families read the penultimate layer
        first.append(out[0])
    device = hidden[-1].device
    return torch.cat([h.to(device, torch.float32) for h in hidden], dim=-1), [o.to(device, torch.float32) for o in first]


def _until_end(ids: Sequence[int], tokenizer) -> list[int]:
    end = tokenizer.eos_token_id
    ids = list(ids)
    return ids[: ids.index(end) + 1] if end in ids else ids


@dataclass(frozen=True)
class Architecture:
    """A family's published full-size architecture, which ``Backbone.full_size_pipeline`` builds
    with random weights: ``iseg bench`` times it without downloading anything (timing does not
    depend on the weights)."""

    #: the ``iseg bench --model`` value that picks it
    key: str
    #: the model's name in bench's reports
    name: str
    #: the settings preset bench measures it with unless ``--preset`` says otherwise
    preset: str | None = None


def random_clip(hidden: int, layers: int, heads: int, intermediate: int, projection: int | None = None):
    """A CLIP text encoder of the given size with random weights and CLIP's 49,408-word vocabulary
    and 77 positions; with ``projection``, the variant with a projected pooled output."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act="gelu", projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def random_vae(latent_channels: int, **config):
    """The 1024-pixel, four-level VAE of the full-size latent-diffusion models, random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2,
                         sample_size=1024, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         **config)


class Backbone(ABC):
    """One model family as the method sees it (shapes in each method's docstring)."""

    #: the module whose attention processors capture is installed on (``set_attn_processor``)
    denoiser: torch.nn.Module
    #: the tokenizer of the text encoder (``model_max_length`` is the prompt window)
    tokenizer: object
    #: ``encoding(vae, x) -> latent`` the call ``encode`` makes; ``compile(vae=True)`` compiles it
    encoding: object
    #: the parts of the pipeline this family reads, its denoiser first (a loaded folder must have them)
    parts: tuple[str, ...] = ()
    #: latent cells per denoiser input token (the VAE's channels times this are the denoiser's)
    packed_cells = 1
    #: what ``from_pretrained`` of the family's pipeline gets from ``load_model``: parts left out
    load_options: Mapping = {}
    #: ``load_model("auto", family=...)``: the family's full-size model (a hub id), loaded where its
    #: weights are in the local cache and a GPU is present, ...
    default_model: str | None = None
    #: ... else this shipped model of the family; a family without both has no "auto" choice
    fallback_model: str | None = None
    #: the published architecture ``full_size_pipeline`` builds (``iseg bench``), if the family has one
    architecture: Architecture | None = None

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def latent_scale(self) -> int:
        """Image pixels per latent cell along one side (the VAE's factor)."""
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def config_sample_side(self) -> int:
        """The denoiser's configured latent side (``sample_size``, one number or a pair)."""
        sample = self.denoiser.config.sample_size
        return int(sample[0] if isinstance(sample, (list, tuple)) else sample)

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

    def __init__(self, pipe, denoiser, tokenizer):
        self.pipe = pipe
        self.denoiser = denoiser
        self.tokenizer = tokenizer
        self.encoding = posterior_mean
        self._layers: list[AttentionLayer] | None = None

    @classmethod
    @abstractmethod
    def accepts(cls, pipe) -> bool:
        """Whether this family reads ``pipe`` (``backbone_for`` asks each registered family)."""

    @staticmethod
    def has_parts(pipe, parts: Sequence[str]) -> bool:
        return all(getattr(pipe, p, None) is not None for p in parts)

    # -- the published architecture, random weights -------------------------------------------
    @classmethod
    def full_size_components(cls, tokenizer) -> dict:
        """The parts of the family's published ``architecture`` with random weights (no download),
        as the keyword arguments of its pipeline; ``tokenizer`` stands in for each of the family's
        tokenizers (timing does not depend on the vocabulary). Build them under
        ``torch.device("meta")`` to count parameters without memory."""
        raise NotImplementedError(f"{cls.__name__} has no published architecture to build")

    @classmethod
    def full_size_pipeline(cls, tokenizer):
        """The family's pipeline made of ``full_size_components(tokenizer)``."""
        raise NotImplementedError(f"{cls.__name__} has no published architecture to build")

    # -- checks of a loaded folder (``iseg.loading.check_components``) ----------------------------
    @classmethod
    def check_denoiser(cls, pipe, fail, refuse) -> None:
        """That the denoiser's configured ``sample_size`` is a latent side (``refuse(message)``
        otherwise) and that it takes the VAE's latents (``fail(message)``: parts of two models)."""
        name = cls.parts[0]
        denoiser = getattr(pipe, name)
        sample = config_value(denoiser, "sample_size")
        if not all(_whole(v) for v in (sample if isinstance(sample, (list, tuple)) else [sample])):
            refuse(f"{name}/config.json has sample_size {sample!r}; it must be the latent side, a whole number > 0 "
                   "(e.g. 64 for a 512-pixel model)")
        cls._check_latent_channels(pipe, fail)

    @classmethod
    def _check_latent_channels(cls, pipe, fail) -> None:
        latent, channels = config_value(pipe.vae, "latent_channels"), config_value(getattr(pipe, cls.parts[0]), "in_channels")
        if latent is not None and channels is not None and channels != latent * cls.packed_cells:
            packed = f" (x{cls.packed_cells} packed)" if cls.packed_cells != 1 else ""
            fail(f"the {cls.parts[0]} takes {channels} input channels but the VAE makes {latent}-channel latents{packed}")

    @classmethod
    def check_text_widths(cls, pipe, widths: Sequence[int], fail) -> None:
        """That the denoiser reads text as wide as the text encoders give it (``widths``: their
        ``hidden_size``s, in order); ``fail(message)`` otherwise. A family whose denoiser names no
        text width has nothing to check."""
        return None

    # -- the noisy forward pass ------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor, encoder=None) -> torch.Tensor:
        """``(B, 3, S, S)`` images in [0, 1] -> the latent ``z0`` the denoiser sees. ``encoder``
        replaces the VAE's encoding call (e.g. a compiled one) with the same signature."""
        latents = vae_latents(self.pipe.vae, pixels, self.device, self.encoding if encoder is None else encoder)
        return latents.to(self.dtype)  # a VAE kept in float32 (SDXL's) feeds a float16 denoiser

    @abstractmethod
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z_t`` from ``z0``, the noise and ``(B,)`` timesteps, by the model's schedule."""

    def noise_weights(self, timestep: int) -> tuple[float, float]:
        """``(a, b)`` with ``z_t = a z0 + b eps`` at ``timestep``, read off ``add_noise`` itself
        (so it holds for every family: ``sqrt(abar_t), sqrt(1 - abar_t)`` for SD's DDPM schedule,
        ``1 - s, s`` with ``s = t / 1000`` for the flow-matching families)."""
        t = torch.tensor([int(timestep)])
        one, zero = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
        a = float(self.add_noise(one, zero, t).flatten()[0])
        b = float(self.add_noise(zero, one, t).flatten()[0])
        return a, b

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's picture of latents ``z`` (as ``encode`` makes them): ``(B, 3, S, S)`` in
        [0, 1], float32 on the CPU (for plotting)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        param = next(vae.parameters())
        with torch.no_grad():
            x = vae.decode((z.to(param.device, param.dtype) / vae.config.scaling_factor) + shift).sample
        return ((x.float() + 1) / 2).clamp(0, 1).cpu()

    @abstractmethod
    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor, module=None) -> None:
        """One denoiser pass; what the method reads comes from the capture processors.
        ``module`` replaces the denoiser (e.g. a compiled one) with the same signature."""

    # -- attention layers ------------------------------------------------------------------------
    @classmethod
    def layers_of(cls, denoiser) -> list[AttentionLayer] | None:
        """Every attention map of ``denoiser``, with kind, level, heads and the processor class that
        records it (``AttentionLayer.processor``), in forward order; ``None`` when ``denoiser`` is
        not of this family. ``iseg.capture.attention_layers`` (and so layers given by name) asks
        every registered family."""
        return None

    def attention_layers(self) -> list[AttentionLayer]:
        """Every attention layer of the denoiser, with kind, level and heads."""
        if self._layers is None:
            layers = type(self).layers_of(self.denoiser)
            if layers is None:
                raise TypeError(f"{type(self).__name__} cannot name the layers of a {type(self.denoiser).__name__}")
            self._layers = list(layers)
        return list(self._layers)

    @classmethod
    def layer_order(cls, name: str) -> tuple | None:
        """A sort key that puts this family's layers in the order the image passes them (``None``:
        not a name of this family's)."""
        return None

    @classmethod
    def layer_title(cls, name: str) -> str | None:
        """A short title for a plot of the layer (``None``: not a name of this family's)."""
        return None

    @property
    def attention_kind(self) -> str:
        """``"separate"`` where every attention module is either cross- or self-attention (SD's
        UNet), ``"joint"`` where one attention runs image and text tokens through one softmax that
        capture splits into a cross and a self map (an MM-DiT's)."""
        return "joint" if any(layer.module and layer.module != layer.name for layer in self.attention_layers()) \
            else "separate"

    def default_self_resolution(self, latent_side: int) -> int:
        """The self-attention grid read when ``self_resolution`` is not set: the finest one the
        denoiser has (the latent side for SD's UNet)."""
        levels = [layer.level for layer in self.attention_layers() if layer.kind == "self"]
        return math.ceil(latent_side / 2 ** min(levels)) if levels else latent_side

    def default_cross_weights(self, latent_side: int) -> dict[int, float]:
        """The cross-attention resolution weights used when ``cross_weights`` is not set: the
        reference's ``{latent/4: 0.7, latent/2: 0.3}`` (method document §3)."""
        return {latent_side // 4: 0.7, latent_side // 2: 0.3}

    def reference_layers(self, kind: str, level: int, interactive: bool = False) -> Sequence[str] | None:
        """Layer names (prefixes) the reference reads for ``kind`` at downsampling ``level`` (with
        ``interactive``, those the authors' interactive demo reads); ``None`` where the family has
        no reference choice (then every layer there is read)."""
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

    def cat_cross(self, embedding: torch.Tensor, prompt: Prompt, gamma: float) -> torch.Tensor:
        """Cat-Cross on ``encode_text``'s embedding: the rows of the prompt's class tokens
        (``prompt.spans``, positions in ``prompt.input_ids``) scaled by ``gamma``; the rows a family
        adds after them (pooled vectors, a second encoder's tokens) carry no class token and stay."""
        return cat_cross(embedding, prompt.spans, gamma)

    def offload_text_encoder(self) -> None:
        """Keep the text encoder on the CPU in float32."""
        raise NotImplementedError(f"{type(self).__name__} cannot offload its text encoder")
