"""Architecture of the shapes model: diffusers/transformers components built from small configs.

The layout is Stable Diffusion's in miniature, so method.md applies unchanged: a KL autoencoder
(64x64 RGB -> 16x16x4 latent, or 32x32x4 as shipped), a CLIP text encoder with a word-level CLIP tokenizer,
and a ``UNet2DConditionModel`` with self- and cross-attention at every level (16x16 and 8x8, or
32x32, 16x16 and 8x8).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .world import SIZE, vocabulary

__all__ = ["MAX_LENGTH", "EXTRA_WORDS", "make_tokenizer", "build_word_bpe", "make_vae", "make_text_encoder", "make_unet",
           "make_scheduler", "inner_unet_weights", "LATENT_SIDES", "count_parameters", "FAMILIES", "UNET", "MMDIT", "make_mmdit",
           "make_projected_text_encoder", "make_flow_scheduler", "MMDIT_WIDTH", "patch1_weights", "fitting_weights"]

#: the denoiser families ``iseg train-shapes --family`` builds: a UNet (SD 1.x/2.x layout) or an
#: MM-DiT (joint attention over image and text tokens, rectified flow); the second value names the
#: MM-DiT family as ``iseg.backbones.FAMILIES`` does
FAMILIES = ("unet", "sd3")
UNET, MMDIT = FAMILIES

MAX_LENGTH = 24  # tokens; the longest caption has 13 with its start and end tokens
EXTRA_WORDS = ("background", "other", "object", "an", "the", "of", "photo")


_VOCAB_DIR = Path(__file__).parent / "vocab"


def make_tokenizer(max_length: int = MAX_LENGTH):
    """The shapes model's CLIP tokenizer, in which every word of the shapes world is one token.

    Its vocabulary and merges live in ``iseg/shapes/vocab`` (made once by ``build_word_bpe``), so
    every training run and the shipped model agree on token ids.
    """
    from transformers import CLIPTokenizer

    vocab = json.loads((_VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (_VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    for w in sorted(set(vocabulary()) | set(EXTRA_WORDS)):
        if len(tok(w, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"word {w!r} is not a single token; rebuild iseg/shapes/vocab with build_word_bpe()")
    return tok


def build_word_bpe(folder: Path = _VOCAB_DIR) -> None:
    """Train a byte-level BPE on the word list until every word is one token; write its files.

    The byte alphabet is kept, so unknown words fall apart into byte tokens rather than failing.
    (Tie-breaking in the trainer is not stable across runs, which is why the result is stored.)
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = sorted(set(vocabulary()) | set(EXTRA_WORDS))
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    bpe.train_from_iterator(words, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


LATENT_SIDES = (16, 32)


def _check_latent_side(latent_side: int) -> None:
    if latent_side not in LATENT_SIDES:
        raise ValueError(f"latent_side must be one of {LATENT_SIDES}, got {latent_side!r}")


def make_vae(latent_side: int = 16):
    """64x64 RGB -> ``latent_side`` x ``latent_side`` x 4 (16: three blocks; 32: two blocks)."""
    from diffusers import AutoencoderKL

    _check_latent_side(latent_side)
    channels = (32, 64, 64) if latent_side == 16 else (32, 64)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=16, sample_size=SIZE,
        scaling_factor=1.0,  # set from the latents' spread after the VAE is trained
    )


def make_text_encoder(vocab_size: int, max_length: int = MAX_LENGTH):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def make_unet(latent_side: int = 16):
    """Self- and cross-attention at every level: 16x16 and 8x8 (latent 16), or 32x32, 16x16 and 8x8
    (latent 32; its two inner levels have the latent-16 model's widths, see ``inner_unet_weights``)."""
    from diffusers import UNet2DConditionModel

    _check_latent_side(latent_side)
    channels = (64, 128) if latent_side == 16 else (32, 64, 128)
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=16, cross_attention_dim=64, attention_head_dim=4,
        time_embedding_dim=256,  # the latent-16 model's width (4 x 64), kept so its weights can seed a latent-32 one
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
    )


def inner_unet_weights(small: dict, large: torch.nn.Module) -> dict:
    """Weights of a latent-16 UNet placed on the two inner levels of a latent-32 one.

    Its down block i becomes down block i + 1, up blocks keep their index (counted from the
    coarsest), the middle block and time embedding are shared; only tensors whose shapes agree
    are taken. Returns the state dict to load with ``strict=False``.
    """
    target = large.state_dict()
    out = {}
    for key, value in small.items():
        if key.startswith("down_blocks."):
            i, rest = key[len("down_blocks."):].split(".", 1)
            key = f"down_blocks.{int(i) + 1}.{rest}"
        elif not key.startswith(("up_blocks.", "mid_block.", "time_embedding.")):
            continue  # conv_in, conv_out and their norms belong to the new outer level
        out[key] = value
    return fitting_weights(out, target)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


MMDIT_WIDTH = 128  # the transformer's width; also its joint_attention_dim: the two 64-wide CLIPs side by side


def make_projected_text_encoder(vocab_size: int, max_length: int = MAX_LENGTH):
    """The MM-DiT layout's CLIP: the shapes text encoder with a 64-wide projection of its pooled output."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64,
    ))


def make_mmdit(latent_side: int = 32, layers: int = 4, patch_size: int = 1):
    """diffusers' MM-DiT transformer on the 32x32 latent, 4 heads of 32. With patch size 1 its joint
    attention sits on a 32x32 grid (the grid of the UNet's finest, best-grouping level); patch size 2
    (a 16x16 grid) trains about eight times faster on a CPU, and its blocks can seed a patch-1 model
    (``--init-parts transformer``: every tensor whose shape fits)."""
    from diffusers import SD3Transformer2DModel

    _check_latent_side(latent_side)
    return SD3Transformer2DModel(
        sample_size=latent_side, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=32, num_attention_heads=MMDIT_WIDTH // 32, joint_attention_dim=MMDIT_WIDTH,
        caption_projection_dim=MMDIT_WIDTH, pooled_projection_dim=MMDIT_WIDTH, pos_embed_max_size=latent_side,
    )


def fitting_weights(have: dict, want: dict) -> dict:
    """The tensors of state dict ``have`` whose name and shape ``want`` (a state dict) also has."""
    return {k: v for k, v in have.items() if k in want and want[k].shape == v.shape}


def _token_positions(embed, patch_size: int, cells: int) -> torch.Tensor:
    """Where the sincos embedding of ``embed`` (a patch-``patch_size`` model's ``PatchEmbed``) puts
    the centre of each of ``cells`` latent cells along one side, in its own grid units."""
    tokens = cells // patch_size
    top = (embed.pos_embed_max_size - tokens) // 2  # diffusers crops the centre of the stored grid
    index = (torch.arange(cells, dtype=torch.float64) + 0.5) / patch_size - 0.5  # fractional token index
    return (top + index) / (embed.pos_embed_max_size / embed.base_size) / embed.interpolation_scale


def patch1_weights(source: torch.nn.Module, target: torch.nn.Module) -> dict:
    """The weights of a patch-``p`` MM-DiT (``make_mmdit``) carried over to a patch-1 one on the same
    latent (progressive resolution, as the published MM-DiTs were trained): returns a state dict for
    ``target.load_state_dict(..., strict=False)``.

    The blocks do not depend on the patch size and are taken as they are. The three parts that do
    are converted so that the new model starts where the old one was:
    - the patch embedding: a patch-1 token sees one latent cell; its kernel is the sum of the old
      p x p kernel, which is what the old one gave a patch whose cells are all equal;
    - the positions: each cell gets the sincos embedding of where its centre lay in the old grid
      (between the old token centres), not a grid of its own that the blocks never saw;
    - the output projection: each cell's velocity is the mean of the old p x p outputs."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    p = source.config.patch_size
    if target.config.patch_size != 1:
        raise ValueError(f"patch1_weights makes a patch-1 model, not patch {target.config.patch_size}")
    if source.config.sample_size != target.config.sample_size:
        raise ValueError(f"the models sit on different latents ({source.config.sample_size} vs {target.config.sample_size})")
    have, want = source.state_dict(), target.state_dict()
    out = fitting_weights(have, want)
    if p == 1:
        return out
    out["pos_embed.proj.weight"] = have["pos_embed.proj.weight"].sum(dim=(2, 3), keepdim=True)
    out["pos_embed.proj.bias"] = have["pos_embed.proj.bias"]
    c = target.config.out_channels
    width = have["proj_out.weight"].shape[1]
    # diffusers unpatchifies the last dimension as (p, p, channels)
    out["proj_out.weight"] = have["proj_out.weight"].reshape(p, p, c, width).mean(dim=(0, 1))
    out["proj_out.bias"] = have["proj_out.bias"].reshape(p, p, c).mean(dim=(0, 1))
    side = target.config.sample_size
    old = _token_positions(source.pos_embed, p, side)  # every cell of the latent, in the old grid's units
    stored = target.pos_embed.pos_embed_max_size
    first = (stored - side) // 2  # the new grid stores `stored` cells and crops the centre `side`
    step = old[1] - old[0]
    line = old[0] + (torch.arange(stored, dtype=torch.float64) - first) * step
    grid = torch.stack(torch.meshgrid(line, line, indexing="xy")).reshape(2, 1, stored, stored)
    out["pos_embed.pos_embed"] = get_2d_sincos_pos_embed_from_grid(
        want["pos_embed.pos_embed"].shape[-1], grid.float(), output_type="pt").float().unsqueeze(0)
    return out


def make_flow_scheduler():
    """The MM-DiT family's rectified-flow Euler scheduler without a resolution shift (iseg reads sigma = t / 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
