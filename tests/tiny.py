"""Tiny Stable-Diffusion-shaped pipelines built from configs, for tests that must run on a CPU.

The tokenizer is the real CLIP BPE tokenizer (vocabulary from OpenAI's MIT-licensed
``bpe_simple_vocab_16e6.txt.gz``, see ``tests/data/clip_bpe/LICENSE``), so multi-token class names
split exactly as they do in Stable Diffusion.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
BPE = DATA / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


def _byte_alphabet() -> list[str]:
    # CLIP's byte-level alphabet: printable bytes stand for themselves, the others are shifted
    # above 255; the vocabulary lists the printable ones first, in this order.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_clip_vocab(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(BPE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@lru_cache(maxsize=1)
def clip_tokenizer_dir() -> Path:
    import tempfile

    return write_clip_vocab(Path(tempfile.mkdtemp(prefix="iseg-clip-")))


def clip_tokenizer():
    from transformers import CLIPTokenizer

    d = clip_tokenizer_dir()
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split()) for m in (d / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_components(seed: int = 0, sd_layout: bool = True):
    """VAE (x2 down), CLIP text encoder (hidden 32) and a UNet on a 16x16 latent (32x32 images).

    With ``sd_layout`` the UNet has SD's block structure (4 levels, 2 layers per block), so the
    reference layer names of method.md exist; otherwise a 2-level UNet with other names.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    if sd_layout:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=4, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler)


def tiny_pipeline(seed: int = 0, sd_layout: bool = True):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed, sd_layout), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_sdxl_pipeline(seed: int = 0):
    """An SDXL-shaped pipeline: two CLIP text encoders (hidden 32 each, the second with a
    projection), added text/time conditioning, and a UNet whose first level has no attention
    (like SDXL's), on a 16x16 latent (32x32 images)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                  projection_dim=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
        norm_num_groups=4, cross_attention_dim=64, attention_head_dim=(2, 4, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config)),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def flow_vae(latent_channels: int):
    """The tiny VAE of the flow-matching families (x2 down, with SD3's shift and scale factors):
    16 latent channels as SD3, 4 as FLUX packs them here."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = False):
    """An SD3-shaped pipeline (MM-DiT): two CLIP text encoders with projections (hidden 32 each),
    no T5 (``text_encoder_3=None``: diffusers then appends zeros for its tokens; ``with_t5``: a tiny
    T5 encoder of width 64 and a 64-token window, as SD3.5 ships with its T5-XXL), a 16-channel VAE
    (x2 down, with a shift factor) and a 2-layer ``SD3Transformer2DModel`` with patch 2 on a 16x16
    latent (32x32 images, an 8x8 token grid), under a flow-matching Euler scheduler."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                  projection_dim=32)
    # joint_attention_dim = the two CLIP widths side by side (32 + 32): without T5 the pipeline pads
    # the CLIP features to it and appends that many zero features per T5 token
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=32,
    )
    vae = flow_vae(16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**config)), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    if with_t5:  # its width is joint_attention_dim, so its features enter the joint attention unpadded
        from transformers import T5Config, T5EncoderModel

        tokenizer_3 = t5_tokenizer()
        pipe.register_modules(tokenizer_3=tokenizer_3, text_encoder_3=T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=64, d_ff=37, d_kv=8, num_layers=2, num_heads=2)).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


# words of the prompts the tests build (the reference prompt's prefix, joiner, extra and background
# words, and class names); every one is a single "▁word" piece of the tiny T5 vocabulary
T5_WORDS = ("a photograph of and other object background ground land grass tree building wall sky lake water "
            "river sea railway cat dog person bird car horse sheep cow bus train boat chair table plant bottle "
            "sofa aeroplane bicycle tv monitor dining").split()
# pieces that are not whole words: names built from them split into several T5 tokens, as
# "motorbike" and "potted" would in T5's own vocabulary
T5_PIECES = ("moto", "r", "bi", "ke", "pot", "ted", "zebra")


def t5_tokenizer(max_length: int = 64):
    """A T5 (sentencepiece Unigram) tokenizer with a tiny vocabulary, built from scratch.

    There is no sentencepiece model file offline (diffusers' own Flux tests download
    ``hf-internal-testing/tiny-random-t5``), so this builds transformers' ``T5Tokenizer`` (backed by
    a ``tokenizers`` Unigram model, as ``T5TokenizerFast`` was) from a vocabulary list: T5's layout
    (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, pieces, then the sentinels), ``▁``-prefixed whole words,
    a few sub-word pieces and every letter and punctuation mark as a fallback, so that words split
    into pieces with a leading ``▁`` like T5's, no start token, ``</s>`` at the end. ``max_length``
    is the window (the pipeline's ``max_sequence_length``; 512 for FLUX.1, shorter here).
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [("▁" + w, -1.0) for w in T5_WORDS]
    vocab += [("▁" + p, -2.0) for p in T5_PIECES] + [(p, -2.0) for p in T5_PIECES]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz,.-'"]
    seen, unique = set(), []
    for piece, score in vocab:
        if piece not in seen:
            seen.add(piece)
            unique.append((piece, score))
    for i in range(7, -1, -1):
        unique.append((f"<extra_id_{i}>", 0.0))
    return T5Tokenizer(vocab=unique, extra_ids=8, model_max_length=max_length)


def tiny_flux_pipeline(seed: int = 0):
    """A FLUX.1-shaped pipeline, as diffusers' own Flux pipeline tests build it: a CLIP text encoder
    (hidden 32; only its pooled output is used), a T5 encoder (d_model 32) whose token embeddings
    the transformer reads, a 4-channel VAE (x2 down, with FLUX's shift and scale factors), and a
    ``FluxTransformer2DModel`` with one double-stream and one single-stream block (2 heads of 16,
    RoPE axes 4 + 4 + 8, guidance embedding as FLUX.1-dev) over packed 2x2 latent patches
    (in_channels = 4 latent channels x 4). ``default_sample_size`` is 16 latent cells (32x32
    images, a 16x16 latent, an 8x8 token grid); FLUX.1's is 128. The T5 window is 64 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    tokenizer_2 = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8)).eval()
    vae = flow_vae(4)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
