"""Train the shapes model from scratch: ``iseg train-shapes --out FOLDER``.

Stages (each resumable from ``--workdir/checkpoint.pt``):
1. data: ``--images`` training samples of the shapes world, rendered once (in parallel);
2. vae: the autoencoder on pixels (MSE + a small KL term); latents = posterior means;
3. denoiser (``--family unet``: a UNet with one CLIP and the epsilon-prediction loss; the MM-DiT
   family: diffusers' joint-attention transformer with two CLIPs and the rectified-flow velocity
   loss) and text encoders, 10% caption dropout, colour words dropped from 30% of captions
   (``--colour-drop``), and auxiliary attention losses that stand in for the word-region binding
   Stable Diffusion learned from billions of images (``--ground``, ``--group``, ``--vocab``; only
   for t < 600). On an MM-DiT they act on the two parts of each joint attention that iSeg reads
   (image queries over the text keys, and over the image keys):
   - grounding: for every class word and its colour word, 1 - the share of the token's spatially
     normalised cross-attention inside its object, plus 0.2 x a BCE between the max-normalised
     map and the object mask, on every cross-attention layer;
   - grouping: for every query pixel of the finest self-attention (the latent's grid), 1 - the
     attention mass inside its own group (its object, or the background; by area fraction per
     cell, or with ``--group-target hard`` the group covering most of the cell), every group of
     an image weighted equally;
   - vocabulary: a second pass under a class-list prompt ("a star and a circle", present and
     absent classes in random order): each listed word wins its own object's pixels;
   - shape head (``--shape-head``, MM-DiT only): a linear classifier, used in training and then
     thrown away, reads every image token that leaves a block whose output feeds another block's
     attention, and names the shape of the object the token lies on. It makes the tokens carry
     their object's shape, which a patch token cannot see by itself (a UNet's convolutions can):
     the queries of the next blocks then have something for the shape words to bind to.
The trained pipeline is written in diffusers layout (fp16 weights) to ``--out``.
iSeg itself stays training-free: nothing is trained at segmentation time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import re
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import registry
from ..backbones import FAMILIES as BACKBONES
from ..backbones.base import flow_matching_noise
from ..capture import attention_layers, capture_attention
from ..commands.files import check_folder, write_atomic, write_text
from ..commands.options import CommandError, device_option, overwrite_option
from ..loading import WEIGHTS_SHA256, weights_sha256
from ..registry import shipped_models
from .model import (
    FAMILIES,
    LATENT_SIDES,
    MAX_LENGTH,
    MMDIT,
    UNET,
    count_parameters,
    fitting_weights,
    inner_unet_weights,
    make_flow_scheduler,
    make_mmdit,
    make_projected_text_encoder,
    make_scheduler,
    make_text_encoder,
    make_tokenizer,
    make_unet,
    make_vae,
    patch1_weights,
)
from .world import CLASSES, SIZE, SPLITS, caption_for, sample

MAX_OBJECTS = 3


# -- data ----------------------------------------------------------------------------------------
def _render(seeds):
    images = np.zeros((len(seeds), SIZE, SIZE, 3), np.uint8)
    masks = np.zeros((len(seeds), SIZE, SIZE), np.uint8)
    info = []
    for i, s in enumerate(seeds):
        x = sample(int(s))
        images[i] = np.asarray(x.image)
        masks[i] = x.mask
        info.append((x.classes, x.colors))
    return images, masks, info


def render_dataset(count: int, workers: int, first_seed: int = SPLITS["train"].start):
    """Render ``count`` training samples; returns images, masks and (classes, colours) per image."""
    seeds = np.arange(first_seed, first_seed + count)
    chunks = np.array_split(seeds, max(1, min(len(seeds) // 500, workers * 8)))
    parts = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(tqdm(pool.map(_render, chunks), total=len(chunks), desc="render", unit="chunk"))
    else:
        parts = [_render(c) for c in tqdm(chunks, desc="render", unit="chunk")]
    images = np.concatenate([p[0] for p in parts])
    masks = np.concatenate([p[1] for p in parts])
    info = [i for p in parts for i in p[2]]
    return images, masks, info


def tokenize_captions(tokenizer, info, with_colors: bool):
    """Token ids ``(N, L)`` and, per token, which object (1..3) it names (0: none)."""
    texts = [caption_for(c, col if with_colors else None) for c, col in info]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")["input_ids"]
    owner = torch.zeros_like(ids)
    for n, (classes, _) in enumerate(info):
        pos = 1  # after the start token; captions are "a [colour] shape and a [colour] shape ..."
        for k in range(len(classes)):
            words = 3 if with_colors else 2
            for j in range(1, words):  # colour and shape words, not "a"
                owner[n, pos + j] = k + 1
            pos += words + 1  # the words and "and"
    return ids, owner


def object_masks(masks: torch.Tensor, info) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8 masks of each caption object (zeros where an image has fewer)."""
    labels = torch.zeros(len(info), MAX_OBJECTS, dtype=torch.uint8)
    for n, (classes, _) in enumerate(info):
        for k, c in enumerate(classes):
            labels[n, k] = CLASSES.index(c) + 1
    return ((masks[:, None] == labels[:, :, None, None]) & (labels[:, :, None, None] > 0)).to(torch.uint8)


# -- attention losses ----------------------------------------------------------------------------
def grounding_loss(cross: dict[str, torch.Tensor], owner: torch.Tensor, objects: torch.Tensor, valid: torch.Tensor):
    """Token-to-object binding loss, averaged over layers and the owned tokens of valid samples.

    ``cross[name]`` is ``(B, n, L)`` head-mean attention; ``owner`` ``(B, L)``; ``objects``
    ``(B, 3, H, W)`` float; ``valid`` ``(B,)`` bool.
    """
    onehot = F.one_hot(owner, MAX_OBJECTS + 1)[..., 1:].float()  # (B, L, 3)
    tokens = onehot.sum(-1) * valid[:, None].float()  # (B, L) which tokens count
    if tokens.sum() == 0:
        return next(iter(cross.values())).sum() * 0
    losses = []
    for a in cross.values():
        r = math.isqrt(a.shape[1])
        m = F.adaptive_avg_pool2d(objects, r).flatten(2)  # (B, 3, n) object fraction per cell
        target = torch.einsum("bkn,blk->bln", m, onehot)  # (B, L, n) the owned object's mask
        a_t = a.transpose(1, 2)  # (B, L, n)
        share = (a_t / a_t.sum(-1, keepdim=True).clamp_min(1e-8) * target).sum(-1)
        peak = (a_t / a_t.amax(-1, keepdim=True).clamp_min(1e-8)).clamp(1e-4, 1 - 1e-4)
        tgt = target.clamp(0, 1)  # written out: F.binary_cross_entropy refuses to run under autocast
        bce = -(tgt * peak.float().log() + (1 - tgt) * (1 - peak.float()).log()).mean(-1)
        per_token = (1 - share) + 0.2 * bce
        losses.append((per_token * tokens).sum() / tokens.sum())
    return torch.stack(losses).mean()


def grouping_loss(selfs: dict[str, torch.Tensor], objects: torch.Tensor, valid: torch.Tensor, hard: bool = False):
    """Self-attention grouping loss: every pixel should attend inside its own object (or background).

    Groups are the objects' (and the background's) area fractions per attention cell, or with
    ``hard`` each cell belongs wholly to the group covering most of it. Hard groups ask for a
    block-diagonal attention: a boundary cell then attends to one group only, so propagating
    class maps along it does not leak across the boundary at every iteration.
    """
    if valid.sum() == 0:
        return next(iter(selfs.values())).sum() * 0
    losses = []
    for a in selfs.values():
        r = math.isqrt(a.shape[1])
        m = F.adaptive_avg_pool2d(objects, r).flatten(2)  # (B, 3, n)
        groups = torch.cat([(1 - m.sum(1, keepdim=True)).clamp_min(0), m], 1)  # (B, 4, n) background first
        if hard:
            groups = F.one_hot(groups.argmax(1), groups.shape[1]).transpose(1, 2).to(groups.dtype)
        mass = a @ groups.transpose(1, 2)  # (B, n, 4): attention mass of each query inside each group
        miss = (1 - mass).transpose(1, 2)  # (B, 4, n)
        weight = groups.sum(-1)  # (B, 4) group sizes
        per_group = (groups * miss).sum(-1) / weight.clamp_min(1e-6)
        present = (weight > 0.5).float() * valid[:, None].float()
        losses.append((per_group * present).sum() / present.sum().clamp_min(1))
    return torch.stack(losses).mean()


def token_classes(labels: torch.Tensor, side: int, purity: float = 0.6) -> torch.Tensor:
    """The class index (0..K-1) of the object under each cell of a ``side x side`` token grid,
    ``(B, side * side)`` long; -1 where background or no class covers ``purity`` of the cell.
    ``labels`` is ``(B, H, W)`` (0 background, k = class k - 1)."""
    onehot = F.one_hot(labels.long(), len(CLASSES) + 1).permute(0, 3, 1, 2).float()
    frac = F.adaptive_avg_pool2d(onehot, side).flatten(2)  # (B, K + 1, n)
    best, cls = frac.max(1)
    return torch.where((cls > 0) & (best >= purity), cls - 1, torch.full_like(cls, -1))


class ShapeHead(torch.nn.Module):
    """Training-only linear classifiers of the object shape under each image token, one per block
    output that feeds a later block's attention (not part of the shipped model)."""

    def __init__(self, width: int, blocks: int):
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(width, len(CLASSES)) for _ in range(blocks)])

    def forward(self, states: list[torch.Tensor], target: torch.Tensor):
        """Mean cross-entropy over heads and labelled tokens, and the heads' mean accuracy."""
        y = target.flatten()
        losses, hits = [], []
        for head, h in zip(self.heads, states):
            logits = head(h.float()).reshape(-1, len(CLASSES))
            losses.append(F.cross_entropy(logits, y, ignore_index=-1))
            hits.append((logits.argmax(1) == y)[y >= 0].float().mean())
        return torch.stack(losses).mean(), torch.stack(hits).mean()


def vocabulary_prompts(tokenizer, labels: torch.Tensor, gen: torch.Generator):
    """Prompts that list classes as label prediction does ("a circle and a star and a heart"):
    every class present in the image plus a random non-empty set of absent ones, in random order.

    ``labels`` is ``(B, K)`` bool (class k present). Returns token ids ``(B, L)`` and the position
    of each class's word ``(B, K)`` (-1 where the class is not in the prompt).
    """
    texts, positions = [], torch.full(labels.shape, -1, dtype=torch.long)
    for b, present in enumerate(labels.tolist()):
        absent = [k for k, p in enumerate(present) if not p]
        keep = [k for k, p in enumerate(present) if p]
        if absent:
            count = int(torch.randint(1, len(absent) + 1, (1,), generator=gen))
            order = torch.randperm(len(absent), generator=gen)[:count].tolist()
            keep += [absent[i] for i in order]
        keep = [keep[i] for i in torch.randperm(len(keep), generator=gen).tolist()]
        texts.append(caption_for([CLASSES[k] for k in keep]))
        for j, k in enumerate(keep):
            positions[b, k] = 2 + 3 * j  # start token, then "a shape and" per class
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")["input_ids"]
    return ids, positions


def vocabulary_loss(cross: dict[str, torch.Tensor], positions: torch.Tensor, class_masks: torch.Tensor):
    """Make a class word win its own pixels against the other listed classes, and absent classes
    draw no attention: the behaviour label prediction reads (``iseg.labels``).

    ``cross[name]`` ``(B, n, L)``; ``positions`` ``(B, K)`` token of each class (-1: not listed);
    ``class_masks`` ``(B, K, H, W)`` float. Per layer: cross-entropy, at object pixels, of the
    attention renormalised over the listed class words against the pixel's class fractions, plus
    the share of the listed words' attention that goes to absent ones.
    """
    listed = positions >= 0  # (B, K)
    index = positions.clamp_min(0)
    losses = []
    for a in cross.values():
        r = math.isqrt(a.shape[1])
        p = torch.gather(a, 2, index[:, None, :].expand(-1, a.shape[1], -1)).float() * listed[:, None].float()  # (B, n, K)
        q = p / p.sum(-1, keepdim=True).clamp_min(1e-8)
        frac = F.adaptive_avg_pool2d(class_masks, r).flatten(2).transpose(1, 2)  # (B, n, K)
        on_object = frac.sum(-1)  # (B, n)
        ce = -(frac * q.clamp_min(1e-6).log()).sum(-1)
        ce = (ce * on_object).sum() / on_object.sum().clamp_min(1e-6)
        present = (class_masks.flatten(2).amax(-1) > 0).float() * listed.float()  # (B, K)
        absent_share = (p * (listed.float() - present)[:, None]).sum((1, 2)) / p.sum((1, 2)).clamp_min(1e-8)
        losses.append(ce + absent_share.mean())
    return torch.stack(losses).mean()


# -- training ------------------------------------------------------------------------------------
def _save(path: Path, state: dict):
    write_atomic(path, lambda tmp: torch.save(state, tmp))


#: the timesteps of the shapes models' noise schedules (num_train_timesteps; training draws t from 0 .. 999)
NUM_TIMESTEPS = 1000

# what a checkpoint's "args" may hold besides plain data: the paths of runs saved before they were text
_SAFE_GLOBALS = [PosixPath, PurePosixPath, WindowsPath, PureWindowsPath]


def load_checkpoint(path: Path, args) -> dict:
    """A train-shapes checkpoint, read as tensors and plain data only (``weights_only=True``: a
    crafted file cannot run code), and checked to be one of this command for the same kind of
    model; ``CommandError`` naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global)[^\n]*", str(err))
        if found is None:  # not a pickle of anything: text, or another format
            raise CommandError(f"--resume: {path} is not a readable checkpoint (not a torch file); delete it to "
                               "start over") from None
        what = f" ({found.group(0).strip().rstrip('.')})"
        raise CommandError(f"--resume: {path} holds more than tensors and plain data{what}, so it was not loaded: "
                           "it could run code. A train-shapes checkpoint never does; delete it to start over, or "
                           "point --workdir elsewhere") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CommandError(f"--resume: {path} is not a readable checkpoint (cut short or not a torch file: "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
                           "delete it to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict):
        raise CommandError(f"--resume: {path} is not a checkpoint of iseg train-shapes (no recorded options); "
                           "delete it to start over, or point --workdir elsewhere")
    saved = state["args"]
    for option in ("family", "latent_side", "layers", "patch_size"):
        there, here = saved.get(option, getattr(args, option)), getattr(args, option)
        if option in ("layers", "patch_size") and args.family != MMDIT:
            continue
        if there != here:
            flag = "--" + option.replace("_", "-")
            raise CommandError(f"--resume: {path} is a run with {flag} {there}, not {here}; resume it with "
                               f"{flag} {there}, or point --workdir elsewhere")
    changed = _changed_options(saved, args, RUN_OPTIONS)
    if changed:
        raise CommandError(
            f"--resume: {path} is a run with other settings: {'; '.join(changed)}. These fix the run's data, "
            "batches and schedule, so a resumed run must keep them: resume with the run's values, or point --workdir "
            "elsewhere to start a new run. What may change on resume: " + RESUMABLE_OPTIONS)
    for line in _changed_options(saved, args, CURRICULUM_OPTIONS):
        print(f"--resume: continuing with {line}")  # a curriculum step, said aloud rather than silently mixed
    return state


#: options that define a train-shapes run (its rendered data, batches, optimiser and noise schedule):
#: ``--resume`` refuses values other than the checkpoint's
RUN_OPTIONS = ("images", "seed", "batch_size", "vae_batch", "vae_lr", "vae_kl", "warmup", "ema", "group_target",
               "attn_loss_max_t", "colour_drop")
#: options a resumed run may change, as a curriculum (the shapes-mmdit recipe in its model card
#: raises and lowers --lr and switches on --shape-head and --vocab across resumes); each change is printed
CURRICULUM_OPTIONS = ("lr", "ground", "group", "vocab", "shape_head")
RESUMABLE_OPTIONS = ("the step counts (--vae-steps, --unet-steps, --time-limit), --lr and the loss weights (--ground, "
                     "--group, --vocab, --shape-head; a curriculum, printed when changed), --save-every, --log-every, "
                     "--threads, --workers, --device, --out and --overwrite")


def _changed_options(saved: dict, args, options) -> list[str]:
    """``"--flag NOW (the run started with THEN)"`` for each of ``options`` whose value differs
    from the checkpoint's recorded one (options a checkpoint did not record are not compared)."""
    changed = []
    for option in options:
        if option not in saved or not hasattr(args, option):
            continue
        there, here = saved[option], getattr(args, option)
        if there != here:
            changed.append(f"--{option.replace('_', '-')} {here} (the run started with {there})")
    return changed


#: the largest batches and depth train-shapes takes (a step of a larger batch does not fit any machine's memory)
MAX_BATCH = 4096
MAX_LAYERS = 64
DEFAULTS = {"batch_size": 128, "vae_batch": 64, "layers": 4}


def check_options(args) -> None:
    """The numbers of ``iseg train-shapes`` that torch would only refuse deep inside a stage."""
    whole = [("images", 1), ("workers", 1), ("vae_batch", 1), ("batch_size", 1), ("save_every", 1),
             ("log_every", 1), ("vae_steps", 0), ("unet_steps", 1), ("warmup", 1)]
    for name, low in whole:
        value = getattr(args, name)
        if value < low:
            raise CommandError(f"--{name.replace('_', '-')} must be a whole number >= {low}, got {value}")
    for name, most, why in (("batch_size", MAX_BATCH, "images per denoiser step"), ("vae_batch", MAX_BATCH,
                            "images per VAE step"), ("layers", MAX_LAYERS, f"transformer blocks of an {MMDIT} model")):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > most:  # torch would try to allocate terabytes, or build for hours
            raise CommandError(f"--{name.replace('_', '-')} {value} is more than {most:,} {why}; give at most {most:,} "
                               f"(the default is {DEFAULTS[name]})")
    if not 1 <= args.attn_loss_max_t <= NUM_TIMESTEPS:  # the training draws t from 0 .. NUM_TIMESTEPS - 1
        raise CommandError(f"--attn-loss-max-t {args.attn_loss_max_t} is outside the noise schedule's timesteps: the "
                           f"attention losses act for t < this, so give a whole number from 1 to {NUM_TIMESTEPS} "
                           "(to switch them off, set --ground, --group and --vocab to 0)")
    if args.images > SPLITS["train"].stop - SPLITS["train"].start:
        raise CommandError(f"--images {args.images}: the training split has {len(SPLITS['train']):,} images")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads must be at least 1 (or left out for torch's default), got {args.threads}")
    most = 4 * (os.cpu_count() or 1)  # more only thrashes; a million would exhaust the machine
    for name in ("threads", "workers"):
        value = getattr(args, name)
        if value is not None and value > most:
            raise CommandError(f"--{name} {value} is more than 4x this machine's {os.cpu_count()} CPUs; give at most {most}")
    if not 0 <= args.seed <= 2**63 - 4:  # the run seeds generators with seed + 1 .. seed + 3
        raise CommandError(f"--seed must be a whole number from 0 to 2**63 - 4, got {args.seed}")
    for name in ("lr", "vae_lr"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise CommandError(f"--{name.replace('_', '-')} is a learning rate, a finite number > 0; got {value}")
    if not 0 <= args.ema < 1:
        raise CommandError(f"--ema is a decay, a number in [0, 1); got {args.ema}")
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise CommandError(f"--time-limit is a number of seconds > 0; got {args.time_limit}")


def check_loss_weights(args) -> None:
    """Loss weights and the EMA decay must be finite numbers in range: a NaN or infinite weight
    trained a model of NaN weights and exited 0."""
    for name in ("ground", "group", "vocab", "shape_head", "vae_kl"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 <= value <= 1e6):
            raise CommandError(f"--{name.replace('_', '-')} is a loss weight, a finite number from 0 to 1e6; got {value}")
    if not (math.isfinite(args.ema) and 0 <= args.ema < 1):
        raise CommandError(f"--ema is a decay, a number in [0, 1); got {args.ema}")


def stop_if_not_finite(stage: str, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, parts: dict) -> None:
    """Stop the run before ``opt.step`` writes NaN into the weights (one host synchronisation per
    step): ``CommandError`` naming the step and the loss terms that are not finite."""
    if bool(torch.isfinite(loss + grad_norm)):
        return
    bad = [name for name, value in parts.items() if not math.isfinite(float(value.detach()))]
    what = f"the loss terms {', '.join(bad)} are" if bad else "the gradient norm is"
    raise CommandError(
        f"{stage} step {step}: {what} not finite (loss {float(loss.detach()):.4g}, gradient norm {float(grad_norm):.4g}); "
        "training stopped before the weights took NaN. The last checkpoint is intact: check the loss weights and "
        "--lr, and the dtype; resume with --resume after changing them")


def _log(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_vae(vae, images, args, device, ckpt, log_path, state):
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    if state.get("vae_opt"):
        opt.load_state_dict(state["vae_opt"])
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = state.get("vae_step", 0)
    for _ in range(start):  # replay the sampler so a resumed run sees the same batches
        torch.randint(0, len(images), (args.vae_batch,), generator=gen)
    bar = tqdm(range(start, args.vae_steps), desc="vae", initial=start, total=args.vae_steps)
    vae.train()
    for step in bar:
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=gen)
        x = images[idx].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / (x[0].numel())
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.stack([p.grad.norm() for p in vae.parameters() if p.grad is not None]).norm()
        stop_if_not_finite("vae", step, loss, norm, {"mse": mse, "kl": kl})
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            bar.set_postfix(mse=f"{mse.item():.4f}")
            _log(log_path, {"stage": "vae", "step": step, "mse": mse.item(), "kl": kl.item(), "time": time.time()})
        if (step + 1) % args.save_every == 0:
            state.update(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=step + 1)
            _save(ckpt, state)
    state.update(vae=vae.state_dict(), vae_opt=None, vae_step=args.vae_steps)
    _save(ckpt, state)
    vae.eval()


@torch.no_grad()
def encode_all(vae, images, device, batch=512):
    out = []
    for i in tqdm(range(0, len(images), batch), desc="encode", unit="batch"):
        x = images[i : i + batch].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out)


class UNetTask:
    """The UNet family's side of training: DDPM noise, epsilon prediction, one CLIP."""

    def __init__(self, unet, text_encoders):
        self.denoiser, self.text_encoders = unet, list(text_encoders)
        self.alphas = make_scheduler().alphas_cumprod
        layers = attention_layers(unet)
        self.cross_layers = [layer for layer in layers if layer.kind == "cross"]
        self.self_layers = [layer for layer in layers if layer.kind == "self" and layer.level == 0]

    def noisy(self, z0, noise, t):
        """``(z_t, target)`` for the loss at integer timesteps ``t``."""
        ab = self.alphas.to(z0.device)[t].view(-1, 1, 1, 1)
        return ab.sqrt() * z0 + (1 - ab).sqrt() * noise, noise

    def embed(self, ids):
        return self.text_encoders[0](ids)[0]

    def predict(self, z_t, t, cond):
        return self.denoiser(z_t, t, encoder_hidden_states=cond).sample


class MMDiTTask:
    """The MM-DiT family's side: rectified flow (z_t = (1 - s) z0 + s eps, s = t / 1000, velocity
    target eps - z0), two CLIPs whose penultimate states sit side by side and whose projected pooled
    outputs condition the blocks, and the zero rows diffusers appends in place of T5's tokens (the
    shipped model has no T5, so it is trained on exactly what ``iseg`` feeds it)."""

    backbone = BACKBONES[MMDIT][0]  # the MM-DiT family's backbone, which segments the trained model
    t5_rows = backbone.max_sequence_length  # what encode_text appends: the pipeline's default

    def __init__(self, transformer, text_encoders):
        self.denoiser, self.text_encoders = transformer, list(text_encoders)
        layers = self.backbone.layers_of(transformer)
        self.cross_layers = [layer for layer in layers if layer.kind == "cross"]
        self.self_layers = [layer for layer in layers if layer.kind == "self"]

    def noisy(self, z0, noise, t):
        return flow_matching_noise(z0, noise, t), noise - z0

    def embed(self, ids):
        outs = [encoder(ids, output_hidden_states=True) for encoder in self.text_encoders]
        hidden = torch.cat([o.hidden_states[-2] for o in outs], -1)
        width = self.denoiser.config.joint_attention_dim
        hidden = F.pad(hidden, (0, width - hidden.shape[-1]))
        t5 = hidden.new_zeros(len(ids), self.t5_rows, width)
        return torch.cat([hidden, t5], 1), torch.cat([o[0] for o in outs], -1)

    def token_blocks(self):
        """The blocks whose image-token output feeds a later block's attention (all but the last)."""
        return list(self.denoiser.transformer_blocks)[:-1]

    def predict(self, z_t, t, cond):
        hidden, pooled = cond
        return self.denoiser(hidden_states=z_t, encoder_hidden_states=hidden, pooled_projections=pooled,
                             timestep=t.float(), return_dict=False)[0]


class _DenoiserTraining:
    """The state of the denoiser stage (optimiser, EMA weights, the optional shape head) and its
    steps; ``train_unet`` runs them. Every random draw happens in the order of the first version
    of this loop, so a run and a resumed run see the same batches."""

    def __init__(self, task, tokenizer, captions, args, device, state, labels):
        self.task, self.tokenizer, self.args, self.device, self.state, self.labels = task, tokenizer, args, device, state, labels
        denoiser, encoders = task.denoiser, task.text_encoders
        self.params = list(denoiser.parameters()) + [p for e in encoders for p in e.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=1e-2)
        if state.get("unet_opt"):
            self.opt.load_state_dict(state["unet_opt"])
        ema = state.get("ema") or {k: v.detach().clone().float() for k, v in denoiser.state_dict().items()}
        self.ema = {k: v.to(device) for k, v in ema.items()}
        self.empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                               return_tensors="pt")["input_ids"][0]
        self.captions = captions
        self.window = captions[0][0].shape[1]  # the CLIP rows; an MM-DiT's text keys go on with the T5 rows
        self.gen = torch.Generator().manual_seed(args.seed + 2)
        self.vocab_gen = torch.Generator().manual_seed(args.seed + 3)
        self.vocab = getattr(args, "vocab", 0.0)
        if self.vocab > 0 and labels is None:
            raise ValueError("the vocabulary loss needs the label maps of the training images")
        self.shape_w = getattr(args, "shape_head", 0.0)
        self.head = self.head_opt = None
        self.hooks, self.token_states = [], []
        if self.shape_w > 0:
            self._add_shape_head()

    def _add_shape_head(self) -> None:
        blocks = self.task.token_blocks()
        self.head = ShapeHead(self.task.denoiser.inner_dim, len(blocks)).to(self.device)
        self.head_opt = torch.optim.AdamW(self.head.parameters(), lr=self.args.lr, weight_decay=1e-2)
        if self.state.get("shape_head"):
            self.head.load_state_dict(self.state["shape_head"])
            self.head_opt.load_state_dict(self.state["shape_head_opt"])
        # a block returns (text states, image states); keep the image tokens (cleared after each step)
        self.hooks = [b.register_forward_hook(lambda module, inputs, out: self.token_states.append(out[1]))
                      for b in blocks]

    def train_mode(self, on: bool) -> None:
        for module in (self.task.denoiser, *self.task.text_encoders):
            module.train(on)

    def save(self, ckpt: Path, steps_done: int) -> None:
        self.state.update(unet=self.task.denoiser.state_dict(), text_encoder=[e.state_dict() for e in self.task.text_encoders],
                          unet_opt=self.opt.state_dict(), ema={k: v.cpu() for k, v in self.ema.items()},
                          unet_step=steps_done)
        if self.head is not None:
            self.state.update(shape_head=self.head.state_dict(), shape_head_opt=self.head_opt.state_dict())
        _save(ckpt, self.state)

    def batch(self, latents, objects) -> dict:
        """One training batch: noisy latents, their targets, the caption tokens and who owns them."""
        args, device = self.args, self.device
        (ids_c, own_c), (ids_n, own_n) = self.captions
        idx, t, colour_drop, cap_drop, noise_seed = _draw(self.gen, len(latents), args.batch_size, args.colour_drop)
        idx, colour_drop, cap_drop = idx.to(latents.device), colour_drop.to(latents.device), cap_drop.to(latents.device)
        z0 = latents[idx].to(device)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(noise_seed)).to(device)
        t = t.to(device)
        z_t, target = self.task.noisy(z0, noise, t)
        ids = torch.where(colour_drop[:, None], ids_n[idx], ids_c[idx])
        owner = torch.where(colour_drop[:, None], own_n[idx], own_c[idx])
        ids = torch.where(cap_drop[:, None], self.empty[None].to(ids.device), ids).to(device)
        owner = torch.where(cap_drop[:, None], torch.zeros_like(owner), owner).to(device)
        low_t = t < args.attn_loss_max_t
        return dict(idx=idx, t=t, z_t=z_t, target=target, ids=ids, owner=owner, obj=objects[idx].to(device).float(),
                    low_t=low_t, valid=(~cap_drop).to(device) & low_t)

    def losses(self, b: dict) -> dict:
        """Every loss term of one batch, and their weighted sum ``loss``."""
        args, task, device = self.args, self.task, self.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with capture_attention(task.denoiser, task.cross_layers + task.self_layers, keep_grad=True) as store:
                pred = task.predict(b["z_t"], b["t"], task.embed(b["ids"]))
            mse = F.mse_loss(pred.float(), b["target"])
            shape_loss = shape_acc = mse * 0
            if self.head is not None and bool(b["low_t"].any()):
                low = torch.nonzero(b["low_t"]).flatten()
                side = math.isqrt(self.token_states[0].shape[1])
                target_cls = token_classes(self.labels[b["idx"].to(self.labels.device)[low.cpu()]].to(device), side)
                shape_loss, shape_acc = self.head([h[low] for h in self.token_states], target_cls)
            cross = {n: store.mean(n)[..., : self.window] for n in store.names("cross")}
            selfs = {n: store.mean(n) for n in store.names("self")}
            ground = grounding_loss(cross, b["owner"], b["obj"], b["valid"]) if args.ground > 0 else mse * 0
            group = (grouping_loss(selfs, b["obj"], b["valid"], hard=args.group_target == "hard") if args.group > 0
                     else mse * 0)
            vloss = self._vocabulary_loss(b, mse)
            loss = mse + args.ground * ground + args.group * group + self.vocab * vloss + self.shape_w * shape_loss
        return dict(loss=loss, mse=mse, ground=ground, group=group, vocab=vloss, shape=shape_loss, shape_acc=shape_acc)

    def _vocabulary_loss(self, b: dict, mse: torch.Tensor) -> torch.Tensor:
        """A second pass of the same noisy latents under a class-list prompt (attention only)."""
        valid = b["valid"]
        sub = torch.nonzero(valid).flatten()[: max(1, self.args.batch_size // 2)] if self.vocab > 0 else valid[:0]
        if not len(sub):
            return mse * 0
        lab = self.labels[b["idx"].to(self.labels.device)[sub.cpu()]].to(self.device).long()  # (b, H, W)
        masks = F.one_hot(lab, len(CLASSES) + 1)[..., 1:].permute(0, 3, 1, 2).float()  # (b, K, H, W)
        v_ids, v_pos = vocabulary_prompts(self.tokenizer, masks.flatten(2).amax(-1) > 0, self.vocab_gen)
        with capture_attention(self.task.denoiser, self.task.cross_layers, keep_grad=True) as vstore:
            self.task.predict(b["z_t"][sub], b["t"][sub], self.task.embed(v_ids.to(self.device)))
        return vocabulary_loss({n: vstore.mean(n) for n in vstore.names("cross")}, v_pos.to(self.device), masks)

    def optimise(self, parts: dict, step: int) -> None:
        """Backward, the finite check, the warm-up learning rate, the optimiser and EMA steps."""
        args = self.args
        self.opt.zero_grad(set_to_none=True)
        if self.head_opt is not None:
            self.head_opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.token_states.clear()  # the vocabulary pass appended its own; neither is needed past backward
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        stop_if_not_finite(args.family, step, parts["loss"], norm, {k: parts[k] for k in ("mse", "ground", "group",
                                                                                            "vocab", "shape")})
        if self.head_opt is not None:
            self.head_opt.step()
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for k, v in self.task.denoiser.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].mul_(decay).add_(v.float(), alpha=1 - decay)

    def log(self, bar, log_path: Path, parts: dict, step: int) -> None:
        rec = {"stage": self.args.family, "step": step, **{k: parts[k].item() for k in ("loss", "mse", "ground", "group")},
               "vocab": parts["vocab"].item(), "time": time.time()}
        if self.head is not None:
            rec.update(shape=parts["shape"].item(), shape_acc=parts["shape_acc"].item())
        bar.set_postfix(mse=f"{rec['mse']:.4f}", ground=f"{rec['ground']:.3f}", group=f"{rec['group']:.3f}",
                        vocab=f"{rec['vocab']:.3f}")
        _log(log_path, rec)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def train_unet(task, tokenizer, latents, objects, captions, args, device, ckpt, log_path, state,
               deadline=None, labels=None):
    """The denoiser stage (UNet or MM-DiT, as ``task``): its diffusion loss plus the attention losses."""
    run = _DenoiserTraining(task, tokenizer, captions, args, device, state, labels)
    start = state.get("unet_step", 0)
    for _ in range(start):  # replay the sampler so a resumed run sees the same batches
        _draw(run.gen, len(latents), args.batch_size, args.colour_drop)
    bar = tqdm(range(start, args.unet_steps), desc=args.family, initial=start, total=args.unet_steps)
    run.train_mode(True)
    for step in bar:
        parts = run.losses(run.batch(latents, objects))
        run.optimise(parts, step)
        if step % args.log_every == 0 or step == args.unet_steps - 1:
            run.log(bar, log_path, parts, step)
        stop = deadline is not None and time.time() > deadline
        if stop:
            print(f"time limit reached after {step + 1} {args.family} steps")
            args.unet_steps = step + 1
        if stop or (step + 1) % args.save_every == 0:
            run.save(ckpt, step + 1)
        if stop:
            break
    run.close()
    run.save(ckpt, args.unet_steps)
    run.train_mode(False)
    return run.ema


def _draw(gen, n, batch, colour_drop_p=0.3):
    idx = torch.randint(0, n, (batch,), generator=gen)
    t = torch.randint(0, NUM_TIMESTEPS, (batch,), generator=gen)
    colour_drop = torch.rand(batch, generator=gen) < colour_drop_p
    cap_drop = torch.rand(batch, generator=gen) < 0.1
    noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return idx, t, colour_drop, cap_drop, noise_seed


def plot_loss(log_path: Path, png_path: Path) -> None:
    """The loss curves of a run's ``loss.jsonl`` as a small PNG (the model card shows it): the VAE
    stage where the run trained one, and the denoiser stage's losses."""
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    vae = [r for r in rows if r["stage"] == "vae"]
    den = [r for r in rows if r["stage"] in FAMILIES]
    fig, axes = plt.subplots(1, 2 if vae else 1, figsize=(7 if vae else 4.5, 2.8), dpi=80, squeeze=False)
    axes = axes[0]
    if vae:
        axes[0].plot([r["step"] for r in vae], [r["mse"] for r in vae], lw=1)
        axes[0].set_yscale("log")
        axes[0].set_title("VAE reconstruction MSE", fontsize=9)
    target = "velocity MSE" if den and den[0]["stage"] == MMDIT else "epsilon MSE"
    for key, label in (("mse", target), ("ground", "grounding"), ("group", "grouping"), ("vocab", "vocabulary"),
                       ("shape", "shape head")):
        if den and any(r.get(key) for r in den):
            axes[-1].plot([r["step"] for r in den], [r.get(key, float("nan")) for r in den], lw=1, label=label)
    axes[-1].set_yscale("log")
    axes[-1].set_title(f"{den[0]['stage'] if den else 'denoiser'} + text encoders", fontsize=9)
    axes[-1].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def write_pipeline(out: Path, vae, text_encoders, tokenizer, denoiser, dtype=torch.float16):
    """Save in diffusers layout: a ``StableDiffusionPipeline`` (UNet) or a
    ``StableDiffusion3Pipeline`` (MM-DiT; its two CLIPs share the word-level tokenizer, no T5)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    if len(text_encoders) == 1:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizer, unet=denoiser,
                                       scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusion3Pipeline(transformer=denoiser, scheduler=make_flow_scheduler(), vae=vae,
                                        text_encoder=text_encoders[0], tokenizer=tokenizer,
                                        text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
                                        text_encoder_3=None, tokenizer_3=None)
    pipe.to("cpu", dtype)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)


INIT_PARTS = ("vae", "text_encoder", "unet", "unet-inner", "transformer")


def check_init_parts(parts, family: str, folder: Path | None = None) -> None:
    """``--init-parts`` names parts that exist, fit the family and, with ``folder``, are in it."""
    unknown = set(parts) - set(INIT_PARTS)
    if unknown:
        raise ValueError(f"unknown --init-parts {sorted(unknown)}; choose from {INIT_PARTS}")
    wrong = set(parts) & ({"unet", "unet-inner"} if family == MMDIT else {"transformer"})
    if wrong:
        raise ValueError(f"--init-parts {sorted(wrong)} do not fit a {family} model")
    if ({"unet", "transformer"} & set(parts)) and "vae" not in parts:
        raise ValueError("--init-parts unet/transformer needs the folder's VAE too (the denoiser was trained on its latents)")
    if folder is not None:
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"--init {folder} is not a model folder (it has no model_index.json)")
        for part in parts:
            sub = {"unet-inner": "unet"}.get(part, part)
            if not (folder / sub / "config.json").is_file():
                raise ValueError(f"--init {folder} has no {sub}/ (with its config.json) for --init-parts {part}")


def _load_init(folder: Path, vae, text_encoders, denoiser, parts=("vae", "text_encoder", "unet")):
    """Load parts of an existing model folder. ``unet-inner`` puts a latent-16 UNet on the inner
    levels of a latent-32 one (``inner_unet_weights``); without ``vae`` the VAE is trained anew.
    ``text_encoder`` seeds every text encoder of the new model from the folder's (first) one, so an
    MM-DiT can start from the UNet model's word embeddings (a missing projection starts afresh);
    from an MM-DiT's folder each encoder takes its own. ``transformer`` takes the blocks of an
    MM-DiT of any patch size (``patch1_weights``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    check_init_parts(parts, MMDIT if BACKBONES[MMDIT][0].layers_of(denoiser) else UNET)
    if "vae" in parts:
        vae.load_state_dict(AutoencoderKL.from_pretrained(folder, subfolder="vae").float().state_dict())
        vae.register_to_config(scaling_factor=AutoencoderKL.load_config(folder, subfolder="vae")["scaling_factor"])
    if "text_encoder" in parts:
        if len(text_encoders) > 1 and (folder / "text_encoder_2").is_dir():  # an MM-DiT's: encoder by encoder
            pairs = [(encoder, type(encoder).from_pretrained(folder / sub).float().state_dict())
                     for encoder, sub in zip(text_encoders, ("text_encoder", "text_encoder_2"))]
        else:  # the bare CLIP transformer goes into the projected model's text_model
            weights = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").float().state_dict()
            pairs = [(encoder.text_model if hasattr(encoder, "text_projection") else encoder, weights)
                     for encoder in text_encoders]
        for target, weights in pairs:
            missing, unexpected = target.load_state_dict(weights, strict=False)
            if unexpected or missing:
                raise ValueError(f"the text encoder of {folder} does not fit: missing {missing}, unexpected {unexpected}")
    if "unet" in parts:
        denoiser.load_state_dict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet").float().state_dict())
    if "transformer" in parts:
        source = type(denoiser).from_pretrained(folder, subfolder="transformer").float()  # an MM-DiT, as --init-parts checked
        target = denoiser.state_dict()
        if denoiser.config.patch_size == 1:  # a patch-2 model's blocks seed a patch-1 one (see patch1_weights)
            weights = patch1_weights(source, denoiser)
        else:
            weights = fitting_weights(source.state_dict(), target)
        denoiser.load_state_dict(weights, strict=False)
        print(f"--init transformer: {len(weights)} of {len(target)} tensors taken from {folder} "
              f"(patch size {source.config.patch_size} -> {denoiser.config.patch_size})")
    if "unet-inner" in parts:
        small = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").float().state_dict()
        weights = inner_unet_weights(small, denoiser)
        denoiser.load_state_dict(weights, strict=False)
        print(f"--init unet-inner: {len(weights)} of {len(denoiser.state_dict())} UNet tensors taken from {folder}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``iseg train-shapes``."""
    p.add_argument("--out", type=Path, required=True, help="model folder to write (diffusers layout)")
    overwrite_option(p, "the model that train-shapes wrote in --out earlier: its own files only (model_index.json, "
                        "the parts' folders, training.json, loss.png); an --out that holds other files, such as a "
                        "model card, is refused. --resume continues its own run")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoints and loss log (default: OUT.work)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--family", default="unet", choices=FAMILIES,
                   help=f"the denoiser: a UNet (SD 1.x/2.x layout) or an MM-DiT ({MMDIT}: joint attention, patch 1 "
                        "on a 32x32 latent)")
    p.add_argument("--layers", type=int, default=4, help=f"transformer blocks of an {MMDIT} model")
    p.add_argument("--patch-size", type=int, default=1, choices=[1, 2],
                   help=f"latent cells per token side of an {MMDIT} model (1: a 32x32 token grid; 2: 16x16, faster)")
    p.add_argument("--images", type=int, default=60_000, help="training images rendered once")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes that render the images")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--unet-steps", type=int, default=8000, help="denoiser training steps (at least 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--ground", type=float, default=0.3, help="weight of the grounding loss (0: off)")
    p.add_argument("--group", type=float, default=0.3, help="weight of the grouping loss (0: off)")
    p.add_argument("--group-target", default="soft", choices=["soft", "hard"],
                   help="grouping loss groups: area fractions per cell (soft) or the majority group per cell (hard)")
    p.add_argument("--vocab", type=float, default=0.0,
                   help="weight of the vocabulary loss (class-list prompts; 0: off), for label prediction")
    p.add_argument("--shape-head", type=float, default=0.0,
                   help=f"weight of the training-only shape classifier on an {MMDIT} model's image tokens (0: off)")
    p.add_argument("--attn-loss-max-t", type=int, default=600,
                   help="the attention losses act for timesteps t below this (1 to 1000)")
    p.add_argument("--colour-drop", type=float, default=0.3,
                   help="share of captions without their colour words: the shape words alone must then find their "
                        "objects (a model that can bind through the colour words learns that shortcut first)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50, help="steps between loss-log records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--resume", action="store_true",
                   help="continue from WORKDIR/checkpoint.pt; the run's data and schedule options must stay as they were "
                        "(the step counts, --lr and the loss weights may change)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from the weights of an existing model folder (fine-tuning)")
    p.add_argument("--init-parts", default=None,
                   help="which parts --init loads (default: vae,text_encoder,unet), of " + ", ".join(INIT_PARTS) + " (e.g. 'vae' to train a new UNet "
                        "on the same autoencoder; 'text_encoder,unet-inner' to grow a latent-16 model into a "
                        "latent-32 one, with a new VAE)")
    p.add_argument("--latent-side", type=int, default=16, choices=LATENT_SIDES,
                   help="latent grid: 16 (VAE /4, attention at 16x16 and 8x8) or 32 (VAE /2, attention at 32, 16, 8)")
    p.add_argument("--time-limit", type=float, default=None, help="stop the UNet stage after this many seconds")


#: what train-shapes writes into --out (``write_pipeline``'s diffusers layout, ``training.json`` and
#: ``loss.png``); ``--overwrite`` and ``--resume`` replace these files and nothing else
OWN_FILES = ("model_index.json", "training.json", "loss.png")
PART_FOLDERS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "transformer", "scheduler")
PART_FILES = ("config.json", "scheduler_config.json", "model.safetensors", "diffusion_pytorch_model.safetensors",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja")


def shipped_folder(path: Path) -> Path | None:
    """The folder of iseg's shipped models (``data/models`` of a checkout, ``iseg/_models`` of an
    install) that ``path`` is or lies in, else ``None``."""
    here = Path(os.path.abspath(path)).resolve()
    for folder in registry.MODEL_DIRS:
        folder = Path(folder).resolve()
        if here == folder or folder in here.parents:
            return folder
    return None


def own_files(out: Path) -> list[Path]:
    """The files of ``out`` that train-shapes writes (a model it wrote earlier)."""
    found = [out / name for name in OWN_FILES if (out / name).is_file()]
    for part in PART_FOLDERS:
        if (out / part).is_dir() and not (out / part).is_symlink():
            found += [out / part / name for name in PART_FILES if (out / part / name).is_file()]
    return found


def foreign_files(out: Path, workdir: Path) -> list[Path]:
    """What ``out`` holds besides train-shapes' own files and the run's work folder: a model card,
    reports, anything the user put there (a linked or empty folder too)."""
    own, work = set(own_files(out)), Path(os.path.abspath(workdir))
    found = []
    for place, folders, files in os.walk(out):
        place = Path(place)
        if Path(os.path.abspath(place)) == work:
            folders[:] = []
            continue
        for name in folders:
            folder = place / name
            ours = place == out and name in PART_FOLDERS
            if folder.is_symlink() or (not ours and Path(os.path.abspath(folder)) != work and not any(folder.iterdir())):
                found.append(folder)
        found += [place / f for f in files if place / f not in own]
    return sorted(found)


def check_out_folder(out: Path, workdir: Path, replace: bool) -> None:
    """``--out`` and ``--workdir`` are not iseg's shipped model folders, and an ``--out`` that holds
    files holds nothing but an earlier train-shapes model (which ``replace`` allows to replace):
    a model card or a report beside new weights would describe the old ones."""
    for option, folder in (("--out", out), ("--workdir", workdir)):
        shipped = shipped_folder(folder)
        if shipped is not None:
            where = "is" if Path(os.path.abspath(folder)).resolve() == shipped else "is inside"
            raise CommandError(f"{option} {folder} {where} {shipped}, the folder of the models that ship with iseg; "
                               f"train-shapes never writes there (it would replace or mix with a shipped model and "
                               f"its model card). Choose another {option}, e.g. {option} models/my-shapes"
                               + ("" if option == "--out" else ".work"))
    if not replace or not out.is_dir():
        return
    others = foreign_files(out, workdir)
    if others:
        names = ", ".join(str(p.relative_to(out)) for p in others[:5]) + (f" and {len(others) - 5} more"
                                                                          if len(others) > 5 else "")
        raise CommandError(f"--out {out} holds files or folders that train-shapes does not write ({names}): a model card or "
                           "report there would describe the old weights, and they are not train-shapes' to delete. "
                           "Move them out of the folder, or choose another --out (--overwrite replaces only "
                           "model_index.json, the parts' folders, training.json and loss.png)")


def clear_own_files(out: Path) -> None:
    """Remove the model train-shapes wrote in ``out`` earlier (its files only), so that no part of
    an earlier model (an MM-DiT's transformer/ beside a new UNet) stays with the new one."""
    for path in own_files(out):
        path.unlink()
    for part in PART_FOLDERS:
        if (out / part).is_dir() and not (out / part).is_symlink() and not any((out / part).iterdir()):
            (out / part).rmdir()


def _check_run(args) -> tuple[Path, Path, Path]:
    """``(workdir, checkpoint, loss log)`` after every check of ``iseg train-shapes``'s options that
    needs no rendering or model (the ``--init`` folder is resolved here too)."""
    if args.out.name in ("", ".", ".."):
        raise CommandError(f"--out {str(args.out)!r} does not name a model folder; give one such as models/my-shapes")
    try:
        check_folder(args.out, "--out")
    except ValueError as err:
        raise CommandError(str(err)) from None
    workdir = args.workdir or args.out.with_name(args.out.name + ".work")
    try:
        check_folder(workdir, "--workdir")
    except ValueError as err:
        raise CommandError(str(err)) from None
    if Path(os.path.abspath(workdir)).resolve() == Path(os.path.abspath(args.out)).resolve():
        raise CommandError(f"--workdir {workdir} is the --out folder itself: the model folder would carry the run's "
                           "checkpoint (tens of MB) and loss log; leave --workdir out (default: OUT.work) or give "
                           "another folder")
    holds_files = args.out.is_dir() and any(args.out.iterdir())
    check_out_folder(args.out, workdir, holds_files and (args.overwrite or args.resume))
    check_options(args)
    ckpt, log_path = workdir / "checkpoint.pt", workdir / "loss.jsonl"
    if ckpt.exists() and not ckpt.is_file():  # a run would fail at its first save, after the data was rendered
        raise CommandError(f"{ckpt} is a directory, not a checkpoint file; remove it, or point --workdir elsewhere")
    if holds_files and not (args.overwrite or args.resume):
        raise CommandError(f"--out {args.out} already holds files; pass --overwrite to replace the model there, "
                           "--resume to continue its run, or choose another --out")
    earlier = [p.name for p in (ckpt, log_path) if p.is_file()]
    if earlier and not (args.resume or args.overwrite):
        # a fresh run would replace them: an interrupted run's checkpoint is hours of training
        raise CommandError(f"--workdir {workdir} holds an earlier run's {' and '.join(earlier)}; pass --resume to "
                           "continue that run, --overwrite to start over and replace them, or give another --workdir")
    if holds_files and args.resume and not args.overwrite and not ckpt.is_file():
        # nothing to resume: the run would start over and write over the model in --out
        raise CommandError(f"--resume: {workdir} has no checkpoint.pt, so the run would start over and replace the "
                           f"model in --out {args.out}; pass --overwrite to do that, or give the run's --workdir")
    return workdir, ckpt, log_path


def _check_model_options(args) -> None:
    """``--init`` (a folder, or a shipped model's name: replaced by its folder), ``--init-parts``,
    ``--layers``, ``--shape-head``, the loss weights and ``--colour-drop``."""
    if args.init is not None and not args.init.is_dir():
        shipped = shipped_models()
        if str(args.init) in shipped:  # a shipped model by its name: its folder
            args.init = shipped[str(args.init)]
        else:
            close = next((n for n in sorted(shipped) if n == str(args.init).strip().lower()), None)
            hint = (f"; did you mean the shipped model {close!r} (folder {shipped[close]})?" if close else
                    f"; give a model folder, or a shipped model's name ({', '.join(sorted(shipped))})")
            raise CommandError(f"--init {str(args.init)!r} is not a model folder{hint}")
    if args.init is None and args.init_parts is not None:
        raise CommandError(f"--init-parts {args.init_parts} chooses the parts --init loads, but no --init is given; "
                           "add --init FOLDER (the model to start from), or leave --init-parts out to train every part "
                           "from scratch")
    if args.init_parts is None:
        args.init_parts = "vae,text_encoder,unet"
    if args.init is not None:
        try:
            check_init_parts([p.strip() for p in args.init_parts.split(",")], args.family, args.init)
        except ValueError as err:
            raise CommandError(str(err)) from None
    if args.layers < 1:
        raise CommandError(f"--layers must be at least 1 (transformer blocks), got {args.layers}")
    if args.shape_head != 0 and args.family != MMDIT:
        raise CommandError(f"--shape-head is for --family {MMDIT} (a UNet's convolutions see shape already); leave it at 0")
    if not math.isfinite(args.shape_head) or args.shape_head < 0:
        raise CommandError(f"--shape-head is a loss weight, a finite number 0 or more; got {args.shape_head}")
    check_loss_weights(args)
    if not 0 <= args.colour_drop <= 1:
        raise CommandError(f"--colour-drop is a share of captions, between 0 and 1; got {args.colour_drop}")


def _make_models(args, tokenizer, state: dict, init_parts: set[str]):
    """``(vae, text encoders, denoiser)`` of the family, from ``--init`` and the checkpoint."""
    vae = make_vae(args.latent_side)
    if args.family == MMDIT:
        text_encoders = [make_projected_text_encoder(len(tokenizer)) for _ in range(2)]
        denoiser = make_mmdit(args.latent_side, args.layers, args.patch_size)
    else:
        text_encoders, denoiser = [make_text_encoder(len(tokenizer))], make_unet(args.latent_side)
    if args.init is not None and "unet" not in state:
        try:
            _load_init(args.init, vae, text_encoders, denoiser, parts=init_parts)
        except ValueError as e:
            raise CommandError(str(e)) from None
        state.update(init=str(args.init))
        if "vae" in init_parts:
            state.update(vae=vae.state_dict(), vae_step=args.vae_steps)
    for name, module in (("vae", vae), ("unet", denoiser)):
        if state.get(name):
            module.load_state_dict(state[name])
    saved = state.get("text_encoder")
    for encoder, weights in zip(text_encoders, [saved] if isinstance(saved, dict) else saved or []):
        encoder.load_state_dict(weights)
    return vae, text_encoders, denoiser


def _latent_scale(args, state: dict, init_parts: set[str], latents: torch.Tensor) -> float:
    """The latent scale is part of the run: a resumed run must not recompute it (its VAE comes from
    the checkpoint, not from --init, so the config would say 1.0)."""
    if "scaling_factor" in state:
        return float(state["scaling_factor"])
    if "vae" in init_parts:
        from diffusers import AutoencoderKL

        return float(AutoencoderKL.load_config(args.init, subfolder="vae")["scaling_factor"])
    return float(1.0 / latents.std())


def _training_info(args, init_parts: set[str], elapsed: float, device, scale: float, vae, text_encoders,
                   denoiser) -> dict:
    """What ``training.json`` says of the run (the model card reads it)."""
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"
    return {
        "family": args.family, "vae_steps": 0 if "vae" in init_parts else args.vae_steps, "unet_steps": args.unet_steps, "batch_size": args.batch_size,
        "images": args.images, "latent_side": args.latent_side, "init_parts": sorted(init_parts), "ground": args.ground, "group": args.group, "group_target": args.group_target, "vocab": args.vocab, "shape_head": args.shape_head, "colour_drop": args.colour_drop, "seed": args.seed,
        "layers": args.layers if args.family == MMDIT else None,
        "patch_size": args.patch_size if args.family == MMDIT else None,
        "wall_time_s": round(elapsed, 1), "hardware": hardware, "torch": torch.__version__,
        "scaling_factor": scale, "init": str(args.init) if args.init else None, "lr": args.lr,
        "parameters": {"vae": count_parameters(vae),
                       "text_encoder": sum(count_parameters(e) for e in text_encoders),
                       "transformer" if args.family == MMDIT else "unet": count_parameters(denoiser)},
    }


def run(args) -> int:
    """``iseg train-shapes``: every stage resumable with ``--resume``."""
    workdir, ckpt, log_path = _check_run(args)
    state = load_checkpoint(ckpt, args) if args.resume and ckpt.is_file() else {}
    _check_model_options(args)
    device = device_option(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t_start = time.time()
    if not state:
        log_path.unlink(missing_ok=True)
    # plain data only (paths as text), so that the checkpoint loads with weights_only=True
    state.setdefault("args", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                     | {"workdir": str(workdir)})
    state.setdefault("elapsed", 0.0)

    images, masks, info = render_dataset(args.images, args.workers)
    images, masks = torch.from_numpy(images), torch.from_numpy(masks)
    tokenizer = make_tokenizer(MAX_LENGTH)
    init_parts = {p.strip() for p in args.init_parts.split(",")} if args.init is not None else set()
    vae, text_encoders, denoiser = _make_models(args, tokenizer, state, init_parts)
    vae.to(device)
    train_vae(vae, images, args, device, ckpt, log_path, state)
    latents = encode_all(vae, images, device)
    scale = state["scaling_factor"] = _latent_scale(args, state, init_parts, latents)
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    objects = object_masks(masks, info)
    captions = (tokenize_captions(tokenizer, info, True), tokenize_captions(tokenizer, info, False))
    denoiser.to(device)
    for encoder in text_encoders:
        encoder.to(device)
    if device.type == "cuda":  # the whole training set fits on the GPU; no host copies per step
        latents, objects = latents.to(device), objects.to(device)
        captions = tuple(tuple(x.to(device) for x in pair) for pair in captions)
    deadline = t_start + args.time_limit if args.time_limit else None
    task = (MMDiTTask if args.family == MMDIT else UNetTask)(denoiser, text_encoders)
    ema = train_unet(task, tokenizer, latents, objects, captions, args, device, ckpt, log_path, state, deadline,
                     labels=masks if args.vocab > 0 or args.shape_head > 0 else None)
    denoiser.load_state_dict({k: v.to(denoiser.dtype) for k, v in ema.items()})
    state["elapsed"] = state["elapsed"] + time.time() - t_start
    _save(ckpt, state)
    check_out_folder(args.out, workdir, True)  # again: files put there while it trained are kept, never replaced
    clear_own_files(args.out)
    write_pipeline(args.out, vae.cpu(), [e.cpu() for e in text_encoders], tokenizer, denoiser.cpu())
    info_out = _training_info(args, init_parts, state["elapsed"], device, scale, vae, text_encoders, denoiser)
    # the loader checks them: a part copied in from another shapes model loads silently otherwise
    info_out[WEIGHTS_SHA256] = weights_sha256(args.out)
    write_text(args.out / "training.json", json.dumps(info_out, indent=2))
    plot_loss(log_path, args.out / "loss.png")
    print(json.dumps(info_out, indent=2))
    return 0
