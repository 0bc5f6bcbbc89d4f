"""The segmenter: one noisy forward pass per image, then Cat-Cross maps, Ent-Self and refinement.

    pipe = iseg.load_pipeline("shapes")
    seg = iseg.ISeg(pipe)
    result = seg.segment("cat.png", ["cat", "dog"])
    result.labels            # (H, W) int, 0 = background, k = k-th class
"""

from __future__ import annotations

import math
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import refine as R
from .capture import AttentionLayer, capture_attention, select_layers
from .images import Geometry, load_image, prepare, read_pixels, to_original, to_uint8
from .masks import maps_to_labels, minmax
from .presets import Settings, make_settings
from .prompts import Prompt, build_prompt, cat_cross, check_class_names, class_offsets, encode_prompt, make_prompt

__all__ = ["ISeg", "Observation", "SegmentationResult", "Trace"]

# Layers the reference reads on SD 1.x/2.x UNets, by downsampling level below the latent (method.md §3).
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


@dataclass
class SegmentationResult:
    """What ``ISeg.segment`` returns for one image."""

    labels: np.ndarray  # (H, W) int64 at the original size; 0 = background, k = classes[k-1]
    classes: tuple[str, ...]
    maps: np.ndarray  # (iterations + 1, C, h, w) refined class maps on the attention grid
    initial: np.ndarray  # (C, h, w) Cat-Cross class maps M before any normalisation
    prompt: str
    token_spans: tuple[tuple[int, ...], ...]
    image: np.ndarray  # (H, W, 3) uint8, the input as read
    settings: Settings
    geometry: Geometry
    size: int  # side of the square the model saw
    self_attention: np.ndarray | None = None  # (n, n) when return_self_attention=True
    timing: dict = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        return self.maps.shape[0] - 1

    def scores(self, iteration: int = -1) -> np.ndarray:
        """``(C, H, W)`` class maps of one iteration at the original size, min-max normalised."""
        maps = torch.from_numpy(self.maps[iteration])
        return minmax(to_original(maps, self.geometry, self.size)).numpy()

    def labels_at(self, iteration: int) -> np.ndarray:
        """The label map after ``iteration`` refinement steps (0 = raw Cat-Cross maps)."""
        s = self.settings
        scores = torch.from_numpy(self.scores(iteration))
        return maps_to_labels(scores, s.background, s.bg_power, s.threshold).numpy()

    def mask(self, name: str) -> np.ndarray:
        """Boolean mask of one class at the original size."""
        if name not in self.classes:
            raise ValueError(f"{name!r} is not one of this result's classes {list(self.classes)}")
        return self.labels == self.classes.index(name) + 1

    def overlay(self, alpha: float = 0.5, iteration: int | None = None):
        """The image with the label map drawn over it, as a PIL image."""
        from .viz import overlay

        labels = self.labels if iteration is None else self.labels_at(iteration)
        return overlay(self.image, labels, alpha=alpha)

    def show(self, **kwargs):
        """Plot image, overlay and per-class maps with matplotlib."""
        from .viz import show_result

        return show_result(self, **kwargs)


@dataclass
class Observation:
    """What one noisy forward pass gives for one image; ``ISeg.decode`` turns it into masks."""

    cross: dict[int, torch.Tensor]  # {r: (r*r, T)} head-mean cross-attention
    self_attention: torch.Tensor  # (n, n) head-mean self-attention, rows = query pixels
    prompt: Prompt
    image: np.ndarray  # (H, W, 3) uint8
    geometry: Geometry
    size: int
    grid: int  # side of the self-attention grid
    weights: dict[int, float]
    settings: Settings
    forward_s: float = 0.0


@dataclass
class Trace:
    """Every captured attention layer of one forward pass, with the prompt that produced it."""

    store: object  # AttentionStore
    prompt: Prompt
    image: np.ndarray
    geometry: Geometry
    size: int
    latent_side: int
    settings: Settings

    def layers(self, kind: str | None = None):
        return [self.store.layers[n] for n in self.store.names(kind)]

    def token_map(self, name: str, token: int, head: int | None = None) -> np.ndarray:
        """``(r, r)`` cross-attention of one layer to one token position (head mean or one head)."""
        a = self.store.mean(name) if head is None else self.store.heads(name)[:, head]
        r = math.isqrt(a.shape[-2])
        return a[0, :, token].reshape(r, r).cpu().numpy()

    def class_map(self, name: str, cls: str, head: int | None = None) -> np.ndarray:
        """Mean over a class's tokens of ``token_map``."""
        span = self.prompt.spans[self.prompt.classes.index(cls)]
        return np.mean([self.token_map(name, i, head) for i in span], axis=0)


def _as_list(images):
    if isinstance(images, (list, tuple)):
        return list(images), True
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), True
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] > 1:
        return list(images), True
    return [images], False


# One lock per UNet, shared by every ISeg that uses it: capturing attention swaps the UNet's
# processors, so two forward passes on one UNet at once would read each other's attention.
_UNET_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _unet_lock(unet) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _UNET_LOCKS.get(unet)
        if lock is None:
            lock = _UNET_LOCKS[unet] = threading.RLock()
        return lock


# Settings that act before decoding: a forward pass (an ``Observation``) made with one value of
# any of them cannot stand for another (``segment_prompt`` keys its cache on them).
FORWARD_FIELDS = ("image_size", "aspect", "timestep", "seed", "gamma", "prompt_prefix", "prompt_joiner",
                  "extra_words", "background_words", "cross_weights", "cross_layers", "cross_heads",
                  "self_resolution", "self_layers", "self_heads")
# The others act only on the observation (``decode``) or on how the work is split.
DECODE_FIELDS = ("clustering", "cluster_rounds", "lam", "iterations", "clamp_max", "background", "bg_power",
                 "threshold", "batch_size", "return_self_attention")

# Image sizes ``ISeg`` accepts, as multiples of the model's native size: a model trained at one
# size means nothing far from it, and self-attention memory grows with the fourth power of the side.
SIZE_RANGE = (0.25, 2.0)


class ISeg:
    """Training-free segmentation with a Stable-Diffusion-style pipeline (the iSeg method).

    ``ISeg(pipe, preset=None, **overrides)``: ``preset`` names one of ``iseg.PRESETS``
    (``wsss-voc``, ``wsss-coco``, ``ovs-voc``, ``ovs-context``, ``ovs-coco``, ``interactive``, and
    presets of shipped models such as ``shapes``); overrides are any ``Settings`` field. Without a
    preset, a shipped model's own preset is used, else the reference defaults.

    Threads: one ``ISeg`` (or several on one pipeline) may be called from several threads, e.g.
    a web server's pool. Forward passes on one UNet run one at a time under a lock (capturing
    attention swaps the UNet's attention processors, and the caches of prompts, noise and
    interactive passes are shared); decoding (clustering, refinement, labels) runs in parallel.
    Results equal those of sequential calls.

    Sizes: ``image_size`` must be a multiple of the VAE and UNet downsampling and lie within
    ``SIZE_RANGE`` times the model's native size. ``batch_size`` images are segmented together,
    but a forward pass never holds more images than a memory budget allows (see ``forward_chunk``).
    """

    def __init__(self, pipe, preset: str | None = None, **overrides):
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise TypeError(f"the pipeline has no {part}; iSeg needs a Stable-Diffusion-style pipeline")
        self.pipe = pipe
        if preset is None:
            preset = getattr(pipe, "iseg_default_preset", None)
        self.preset = preset
        self.settings = make_settings(preset, **overrides)
        self._embeddings: dict[tuple[int, ...], torch.Tensor] = {}
        self._plans: dict[tuple, dict] = {}
        self._prompt_cache: dict = {}  # forward passes kept for interactive prompts
        self._fast = None  # a CUDA-graph or torch.compile forward (see ``compile``)
        self._noise: dict[tuple, torch.Tensor] = {}  # the seed's noise, on the device
        self._encode = None  # a torch.compile'd VAE encoder (see ``compile``)
        self._lock = _unet_lock(pipe.unet)
        self.image_size()  # a size this model cannot mean is refused now, not at the first image

    # -- model facts ---------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return getattr(self.pipe, "iseg_model_name", None) or type(self.pipe).__name__

    @property
    def device(self) -> torch.device:
        # the first parameter's, not diffusers' ``unet.device``: that walks every submodule on each
        # call (6 ms per image on an H200 when called per image, measured with bench/profile_segment.py)
        return _first_parameter(self.pipe.unet).device

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def known_words(self) -> frozenset[str] | None:
        """The model's closed word list, where it has one (``pipe.iseg_known_words``; the shapes
        model's vocabulary), else ``None``: a byte-level tokenizer splits any word into pieces, and
        for a model trained on a few words, pieces of a word it never saw mean nothing."""
        words = getattr(self.pipe, "iseg_known_words", None)
        if words is None and getattr(self.pipe, "iseg_default_preset", None) == "shapes":
            from .shapes.model import EXTRA_WORDS
            from .shapes.world import vocabulary

            words = frozenset(vocabulary()) | frozenset(EXTRA_WORDS)
        return None if words is None else frozenset(w.lower() for w in words)

    @property
    def native_size(self) -> int:
        """The side of the images the model was trained on (UNet sample size times the VAE factor)."""
        sample = self.pipe.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * self.vae_scale

    def size_step(self) -> int:
        """``image_size`` must be a multiple of this: the VAE's factor times the UNet's downsampling."""
        blocks = getattr(self.pipe.unet, "down_blocks", None)
        levels = max(0, len(blocks) - 1) if blocks is not None else 0
        return self.vae_scale * 2**levels

    def image_size(self, settings: Settings | None = None) -> int:
        """The side of the square the model sees: ``settings.image_size``, checked, or the native size."""
        s = settings or self.settings
        if s.image_size is None:
            return self.native_size
        size, native, step = s.image_size, self.native_size, self.size_step()
        lo = max(step, math.ceil(native * SIZE_RANGE[0] / step) * step)
        hi = int(native * SIZE_RANGE[1]) // step * step
        if not (lo <= size <= hi and size % step == 0):
            raise ValueError(
                f"image_size={size} does not suit the {self.model_name!r} model: it was trained on {native}x{native} "
                f"images; give a multiple of {step} from {lo} to {hi}, or image_size=None for {native}")
        return size

    def with_settings(self, **overrides) -> Settings:
        return make_settings(None, base=self.settings, **overrides) if overrides else self.settings

    # -- prompts -------------------------------------------------------------------------------
    def prompt_for(self, classes: Sequence[str], settings: Settings | None = None) -> Prompt:
        s = settings or self.settings
        names = check_class_names(classes)
        text = build_prompt(names, s.prompt_prefix, s.extra_words, s.background_words, s.prompt_joiner)
        offsets = class_offsets(names, s.prompt_prefix, s.prompt_joiner)
        return make_prompt(self.pipe.tokenizer, text, names, offsets, model=self.model_name, known=self.known_words)

    def embedding(self, prompt: Prompt, gamma: float) -> torch.Tensor:
        """Cat-Cross text embedding ``(1, window, dim)``; the encoder's output is cached per prompt."""
        with self._lock:
            return self._embedding(prompt, gamma)

    def _embedding(self, prompt: Prompt, gamma: float) -> torch.Tensor:
        key = prompt.input_ids
        if key in self._embeddings:
            self._embeddings[key] = self._embeddings.pop(key)  # most recently used last
        else:
            self._embeddings[key] = encode_prompt(self.pipe.text_encoder, key, _first_parameter(self.pipe.text_encoder).device)
            while len(self._embeddings) > 256:  # a dataset run has one prompt per class set
                self._embeddings.pop(next(iter(self._embeddings)))
        return cat_cross(self._embeddings[key], prompt.spans, gamma).to(self.device, _first_parameter(self.pipe.unet).dtype)

    # -- speed and memory ----------------------------------------------------------------------
    def compile(self, method: str | None = "cuda-graph", *, vae: bool | Mapping = False, **compile_kwargs) -> ISeg:
        """Launch the noisy forward pass faster; the maps stay the same (see ``iseg.fast``).

        ``"cuda-graph"``: record the forward with capture once per input shape, then replay it
        (CUDA only; the first call of each batch size pays for the recording). ``"torch"``:
        ``torch.compile(unet, **compile_kwargs)`` with the capture processors installed (e.g.
        ``mode="max-autotune-no-cudagraphs"``); the first call compiles. ``None``: the plain path.

        ``vae=True`` also runs the VAE encoder through ``torch.compile`` (one compilation per
        batch size; a dict gives ``torch.compile`` arguments): at batch 8 or more on a GPU the
        encoder, not the UNet, is the largest cost. In float16 its kernels round in another order,
        so a few pixels can change label (bench/RESULTS.md: 139 of 1.2 million on 300 images).
        """
        from .fast import make_fast_forward, require_cuda

        if not isinstance(vae, (bool, Mapping)):
            raise TypeError(f"vae must be True, False or a dict of torch.compile arguments, got {vae!r}")
        fast = None if method is None else make_fast_forward(method, **compile_kwargs)
        if method == "cuda-graph":
            require_cuda(self.device)  # refused now, not at the first segment call
        with self._lock:  # not while another thread's forward pass runs on the UNet
            if self._fast is not None:
                self._fast.release(self.pipe.unet)
            self._fast = fast
        vae_kwargs = {"dynamic": False, **(vae if isinstance(vae, Mapping) else {})}
        self._encode = torch.compile(_posterior_mean, **vae_kwargs) if vae is not False else None
        return self

    def offload_text_encoder(self) -> ISeg:
        """Keep the text encoder on the CPU in float32; prompt embeddings are cached and moved over.

        Saves its weights' GPU memory (about 0.7 GB for SD 2.1 in fp16) at the cost of encoding
        each new prompt on the CPU.
        """
        with self._lock:
            self.pipe.text_encoder.to("cpu", torch.float32)
            self._embeddings.clear()
        return self

    # -- which layers to read ------------------------------------------------------------------
    def plan(self, latent_side: int, settings: Settings | None = None) -> dict:
        """Which layers and heads the settings read for a latent of ``latent_side``."""
        s = settings or self.settings
        key = (latent_side, s.cross_weights and tuple(sorted(s.cross_weights.items())), str(s.cross_layers),
               str(s.cross_heads), s.self_resolution, str(s.self_layers), str(s.self_heads))
        with self._lock:
            if key not in self._plans:
                self._plans[key] = self._make_plan(latent_side, s)
            return self._plans[key]

    def _make_plan(self, latent_side: int, s: Settings) -> dict:
        unet = self.pipe.unet
        weights = dict(s.cross_weights) if s.cross_weights is not None else {latent_side // 4: 0.7, latent_side // 2: 0.3}
        weights = {int(r): float(w) for r, w in weights.items() if w != 0}
        if not weights:
            raise ValueError(f"cross_weights {dict(s.cross_weights)!r} gives every resolution weight 0; "
                             "give at least one resolution a positive weight, e.g. {%d: 1.0}" % (latent_side // 4 or 1))
        cross: dict[int, list[AttentionLayer]] = {}
        reference_used = True
        for r in weights:
            if isinstance(s.cross_layers, tuple | list):
                cross[r] = select_layers(unet, "cross", [r], latent_side, names=s.cross_layers)
                reference_used = False
                continue
            level = round(math.log2(latent_side / r)) if r > 0 else -1
            everything = select_layers(unet, "cross", [r], latent_side)
            names = REFERENCE_CROSS.get(level)
            ref = None
            if s.cross_layers == "auto" and names and latent_side / 2**level == r:
                try:
                    ref = select_layers(unet, "cross", [r], latent_side, names=names)
                except ValueError:
                    ref = None
            cross[r] = ref if ref is not None else everything
            reference_used = reference_used and ref is not None
        cross_heads = self._cross_heads(s, cross, latent_side, reference_used)

        self_r = s.self_resolution or latent_side
        if isinstance(s.self_layers, tuple | list):
            self_layers = select_layers(unet, "self", [self_r], latent_side, names=s.self_layers)
        else:
            self_layers = select_layers(unet, "self", [self_r], latent_side)
            if s.self_layers == "auto" and self_r == latent_side:
                try:
                    self_layers = select_layers(unet, "self", [self_r], latent_side, names=REFERENCE_SELF)
                except ValueError:  # not an SD-shaped UNet: every self-attention layer at that resolution
                    pass
        self_heads = s.self_heads
        if self_heads == "reference":
            sd2 = [layer.name for layer in self_layers] == [n + ".transformer_blocks.0.attn1" for n in REFERENCE_SELF]
            sd2 = sd2 and all(layer.heads == SD2_HEADS[0] for layer in self_layers)
            self_heads = REFERENCE_SELF_HEADS if sd2 else None
        heads = dict(cross_heads)
        if self_heads is not None:
            heads.update({layer.name: tuple(self_heads) for layer in self_layers})
        for layer in self_layers:
            for h in heads.get(layer.name, ()):
                if not -layer.heads <= h < layer.heads:
                    raise ValueError(f"self_heads {tuple(self_heads)} out of range: {layer.name} has {layer.heads} heads")
        return {"weights": weights, "cross": cross, "self": self_layers, "self_resolution": self_r, "heads": heads}

    def _cross_heads(self, s: Settings, cross, latent_side: int, reference_used: bool) -> dict[str, tuple[int, ...]]:
        spec = s.cross_heads
        if spec is None:
            return {}
        if spec == "reference-voc":
            levels = {r: round(math.log2(latent_side / r)) for r in cross}
            ok = reference_used and all(
                level in REFERENCE_VOC_HEADS and all(layer.heads == SD2_HEADS[level] for layer in cross[r])
                for r, level in levels.items()
            )
            if not ok:
                warnings.warn("cross_heads='reference-voc' only applies to SD 2.1-base; averaging all heads instead",
                              stacklevel=4)
                return {}
            spec = {r: REFERENCE_VOC_HEADS[level] for r, level in levels.items()}
        out: dict[str, list[int]] = {}
        for r, positions in spec.items():
            r = int(r)
            if r not in cross:
                raise ValueError(f"cross_heads names resolution {r}, which cross_weights does not read ({sorted(cross)})")
            layers = cross[r]
            offsets, total = [], 0
            for layer in layers:
                offsets.append(total)
                total += layer.heads
            for p in positions:
                if not 0 <= p < total:
                    raise ValueError(f"cross head position {p} out of range: r={r} has {total} heads over {len(layers)} layers")
                i = max(k for k, o in enumerate(offsets) if o <= p)
                out.setdefault(layers[i].name, []).append(p - offsets[i])
        # a layer none of whose heads is chosen is not read at all
        for r in spec:
            cross[int(r)] = [layer for layer in cross[int(r)] if layer.name in out]
        return {name: tuple(h) for name, h in out.items()}

    # -- the forward pass ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior-mean latents ``z0`` of ``(B, 3, S, S)`` images in [0, 1] (method.md §1)."""
        vae = self.pipe.vae
        x = (2 * pixels - 1).to(self.device, _first_parameter(vae).dtype)
        z0 = (self._encode or _posterior_mean)(vae, x)
        return z0 * vae.config.scaling_factor

    def noisy_latents(self, z0: torch.Tensor, settings: Settings | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_t`` with the same noise, drawn from ``seed``, for every image: batches equal single calls."""
        s = settings or self.settings
        # every image gets the same draw (a CPU generator, so any device gives the same noise);
        # kept on the device so a batch costs no host-to-device copy, which would wait for the VAE
        key = (s.seed, tuple(z0.shape[1:]), z0.device, z0.dtype)
        with self._lock:
            noise = self._noise.get(key)
            if noise is None:
                draw = torch.randn(z0.shape[1:], generator=torch.Generator("cpu").manual_seed(s.seed), dtype=torch.float32)
                self._noise.clear()  # one entry is all a run needs
                noise = self._noise[key] = draw.to(z0.device, z0.dtype)
        noise = noise.expand_as(z0)
        t = torch.full((z0.shape[0],), s.timestep, dtype=torch.long, device=z0.device)
        return self.pipe.scheduler.add_noise(z0, noise, t), t

    @torch.no_grad()
    def attend(self, pixels: torch.Tensor, embeddings: torch.Tensor, settings: Settings | None = None,
               self_attention: bool = True):
        """One noisy UNet forward pass; returns ``({r: cross (B, r*r, T)}, self (B, n, n) or None)``."""
        with self._lock:
            return self._attend(pixels, embeddings, settings or self.settings, self_attention)

    def _attend(self, pixels, embeddings, s: Settings, self_attention: bool):
        z0 = self.encode_images(pixels)
        latent_side = z0.shape[-1]
        plan = self.plan(latent_side, s)
        layers = [layer for group in plan["cross"].values() for layer in group]
        if self_attention:
            layers += plan["self"]
        z_t, t = self.noisy_latents(z0, s)
        if self._fast is not None:
            # the store belongs to the graph or compiled module; by_resolution returns new tensors
            store = self._fast(self.pipe.unet, layers, plan["heads"], z_t, t, embeddings)
            return store.by_resolution("cross"), (
                store.by_resolution("self").get(plan["self_resolution"]) if self_attention else None)
        with capture_attention(self.pipe.unet, layers, heads=plan["heads"]) as store:
            self.pipe.unet(z_t, t, encoder_hidden_states=embeddings, return_dict=False)
        cross = store.by_resolution("cross")
        attn_self = store.by_resolution("self").get(plan["self_resolution"]) if self_attention else None
        store.clear()
        return cross, attn_self

    @torch.no_grad()
    def trace(self, image, classes, kind: str | None = None, per_head: bool = True, **overrides) -> Trace:
        """One forward pass with every attention layer (of ``kind``, or all) captured per head.

        For looking inside the model (the notebooks); ``segment`` reads only the layers it needs.
        """
        from .capture import attention_layers

        s = self.with_settings(**overrides)
        size = self.image_size(s)
        prompt = self.prompt_for(check_class_names(classes), s)
        arr = load_image(image)
        pixels, geometry = prepare(arr, size, s.aspect)
        layers = [layer for layer in attention_layers(self.pipe.unet) if kind is None or layer.kind == kind]
        with self._lock:
            z0 = self.encode_images(pixels[None])
            z_t, t = self.noisy_latents(z0, s)
            embedding = self.embedding(prompt, s.gamma)
            with capture_attention(self.pipe.unet, layers, per_head=per_head) as store:
                self.pipe.unet(z_t, t, encoder_hidden_states=embedding, return_dict=False)
        return Trace(store=store, prompt=prompt, image=to_uint8(arr), geometry=geometry,
                     size=size, latent_side=z0.shape[-1], settings=s)

    # -- the method ----------------------------------------------------------------------------
    def observe(self, images, classes, progress: bool | None = None, **overrides) -> list[Observation]:
        """Run the noisy forward pass on every image and keep what the method reads from it.

        Returns one ``Observation`` per image (cross-attention per resolution, the self-attention,
        the prompt). ``decode`` turns it into a result for any post-forward settings, so sliders on
        ``lam``, ``iterations`` or the background rule never re-run the UNet.
        """
        return [obs for batch in self._batches(images, classes, progress, overrides) for obs in batch]

    def segment(self, images, classes=None, progress: bool | None = None, *, vocabulary=None,
                label_method: str = "attention", **overrides):
        """Segment one image or a list of images into ``classes``.

        ``classes`` is one list of names for every image, or one list per image. Without
        ``classes``, give a ``vocabulary``: the classes of every image are first predicted from it
        with ``iseg.labels.predict_labels(method=label_method)`` (``attention`` or ``clip``), which
        is open-vocabulary segmentation. Returns a ``SegmentationResult`` for one image, a list of
        them for a list of images. ``overrides`` change any setting for this call only.
        """
        many = _as_list(images)[1]
        if classes is None:
            if vocabulary is None:
                raise TypeError("give the classes to segment (classes=[...]) or a vocabulary to predict them from")
            from .labels import predict_labels

            classes = predict_labels(_as_list(images)[0], vocabulary, label_method, seg=self, **overrides)
        elif vocabulary is not None:
            raise TypeError("give classes or a vocabulary, not both")
        # decode batch by batch: a batch's attention maps are freed before the next forward pass
        results = [r for batch in self._batches(images, classes, progress, overrides)
                   for r in self.decode_batch(batch, **overrides)]
        return results if many else results[0]

    def _batches(self, images, classes, progress, overrides):
        s = self.with_settings(**overrides)
        items = _as_list(images)[0]
        if not items:
            raise ValueError("no images given")
        per_image = self._classes_per_image(classes, len(items))
        size = self.image_size(s)
        prompts = [self.prompt_for(c, s) for c in per_image]
        step = self.forward_chunk(s, size)
        show = progress if progress is not None else len(items) > step
        with tqdm(total=len(items), desc="iseg", unit="img", disable=not show) as bar:
            for start in range(0, len(items), step):
                chunk = range(start, min(start + step, len(items)))
                yield self._observe_batch([items[i] for i in chunk], [prompts[i] for i in chunk], s, size,
                                          names=[_name_of(items[i], i) for i in chunk])
                bar.update(len(chunk))

    # bytes that the attention captured in one forward pass may take (the self-attention matrices,
    # per head while they are averaged); on a GPU, half of its memory
    _FORWARD_BYTES = 2 * 2**30

    def forward_chunk(self, settings: Settings | None = None, size: int | None = None) -> int:
        """How many images one forward pass takes: ``batch_size``, or fewer where the captured
        self-attention of that many images would pass the memory budget (a ``batch_size`` of
        10000 is run in chunks, with the same results)."""
        s = settings or self.settings
        size = size or self.image_size(s)
        plan = self.plan(size // self.vae_scale, s)  # also checks the layer and head settings now
        n = plan["self_resolution"] ** 2
        heads = max([layer.heads for layer in plan["self"]] + [1])
        per_image = 4 * n * n * (heads + len(plan["self"]))  # one layer's heads at a time, every layer's mean
        budget = self._FORWARD_BYTES
        if self.device.type == "cuda":
            budget = max(budget, torch.cuda.get_device_properties(self.device).total_memory // 2)
        return max(1, min(s.batch_size, budget // per_image))

    @staticmethod
    def _classes_per_image(classes, count: int) -> list[tuple[str, ...]]:
        if isinstance(classes, str):
            raise TypeError(f"classes must be a list of names, not one string {classes!r}; e.g. ['cat', 'dog']")
        classes = list(classes)
        if classes and all(isinstance(c, (list, tuple)) for c in classes):
            if len(classes) != count:
                raise ValueError(f"got {len(classes)} class lists for {count} images; give one list per image or one for all")
            return [check_class_names(c) for c in classes]
        return [check_class_names(classes)] * count

    def _observe_batch(self, items, prompts: list[Prompt], s: Settings, size: int, names) -> list[Observation]:
        t0 = time.perf_counter()
        arrays, prepared = [], []
        for item, name in zip(items, names):
            # read and resize one image at a time: only 8-bit copies of the batch stay on the host
            arr = read_pixels(item, name)
            prepared.append(prepare(arr, size, s.aspect, device=self.device))
            arrays.append(to_uint8(arr))
            del arr
        pixels = torch.stack([p[0] for p in prepared])
        embeddings = torch.cat([self.embedding(p, s.gamma) for p in prompts])
        cross, attn_self = self.attend(pixels, embeddings, s)
        plan = self.plan(size // self.vae_scale, s)
        per = (time.perf_counter() - t0) / len(items)
        return [
            Observation(
                cross={r: a[b] for r, a in cross.items()},
                self_attention=attn_self[b],
                prompt=prompt,
                image=arr,
                geometry=geometry,
                size=size,
                grid=plan["self_resolution"],
                weights=plan["weights"],
                settings=s,
                forward_s=per,
            )
            for b, (prompt, arr, (_, geometry)) in enumerate(zip(prompts, arrays, prepared))
        ]

    def decode(self, obs: Observation, **overrides) -> SegmentationResult:
        """From one ``Observation`` to a ``SegmentationResult``: method.md §4 to §6.

        Only settings that act after the forward pass matter here (clustering, ``cross_weights``
        among the captured resolutions, ``lam``, ``iterations``, ``clamp_max``, the background rule).
        """
        return self.decode_batch([obs], **overrides)[0]

    # self-attention matrices refined together at most (bytes of float32), so that a batch of
    # 4096-pixel maps does not multiply the memory the refinement needs
    _DECODE_BYTES = 512 * 2**20

    def decode_batch(self, observations: Sequence[Observation], **overrides) -> list[SegmentationResult]:
        """``decode`` for several observations: those that share settings, class count, attention
        grid and image geometry are refined as one batch, with one copy to the host per batch."""
        groups: dict[tuple, list[int]] = {}
        settings = {}
        for i, obs in enumerate(observations):
            key = id(obs.settings)
            if key not in settings:
                settings[key] = make_settings(None, base=obs.settings, **overrides) if overrides else obs.settings
            groups.setdefault((key, len(obs.prompt.classes), obs.grid, obs.geometry, obs.size), []).append(i)
        results: list[SegmentationResult | None] = [None] * len(observations)
        for (key, _, grid, _, _), members in groups.items():
            chunk = max(1, self._DECODE_BYTES // (4 * grid**4))
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                for i, result in zip(part, self._decode_group([observations[i] for i in part], settings[key])):
                    results[i] = result
        return results

    def _decode_group(self, group: list[Observation], s: Settings) -> list[SegmentationResult]:
        t0 = time.perf_counter()
        first = group[0]
        weights = first.weights if s.cross_weights is None else {int(r): float(w) for r, w in s.cross_weights.items() if w}
        if not weights:
            raise ValueError(f"cross_weights {dict(s.cross_weights)!r} gives every resolution weight 0; "
                             "give at least one resolution a positive weight")
        grid, classes, count = first.grid, len(first.prompt.classes), len(group)
        cross = {r: torch.stack([o.cross[r] for o in group]) for r in weights if r in first.cross}
        x = R.aggregate_cross_attention(cross, weights, grid)  # (B, n, T)
        if s.clustering:
            x = R.kl_cluster(x, rounds=s.cluster_rounds)
        m = torch.stack([R.class_maps(x[b], o.prompt.spans) for b, o in enumerate(group)])  # (B, n, C)
        P = R.entropy_reduce(torch.stack([o.self_attention for o in group]), s.lam, s.clamp_max)
        steps = R.refine(m, P, s.iterations)  # (B, N+1, n, C)
        del P
        maps = steps.transpose(-1, -2).reshape(count, s.iterations + 1, classes, grid, grid)
        scores = minmax(to_original(maps[:, -1], first.geometry, first.size))
        labels = maps_to_labels(scores, s.background, s.bg_power, s.threshold).cpu().numpy()
        maps_np = maps.float().cpu().numpy()
        initial = m.transpose(1, 2).reshape(count, classes, grid, grid).float().cpu().numpy()
        refine_s = (time.perf_counter() - t0) / count
        return [
            SegmentationResult(
                labels=labels[b],
                classes=obs.prompt.classes,
                maps=maps_np[b],
                initial=initial[b],
                prompt=obs.prompt.text,
                token_spans=obs.prompt.spans,
                image=obs.image,
                settings=s,
                geometry=obs.geometry,
                size=obs.size,
                self_attention=obs.self_attention.cpu().numpy() if s.return_self_attention else None,
                timing={"forward_s": obs.forward_s, "refine_s": refine_s, "total_s": obs.forward_s + refine_s},
            )
            for b, obs in enumerate(group)
        ]

    def segment_prompt(self, image, *, points=None, line=None, box=None, text=None, **overrides):
        """Segment what the user points at, strokes, boxes or describes (method.md §7).

        See ``iseg.interactive.segment_prompt``; the image's forward pass is cached, so further
        points, lines and boxes on the same image do not run the UNet again.
        """
        from .interactive import segment_prompt

        return segment_prompt(self, image, points=points, line=line, box=box, text=text, **overrides)

    def __repr__(self) -> str:
        return f"ISeg(model={self.model_name!r}, preset={self.preset!r}, iterations={self.settings.iterations}, lam={self.settings.lam})"


def _posterior_mean(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.encode(x).latent_dist.mean


def _first_parameter(module: torch.nn.Module) -> torch.nn.Parameter:
    return next(module.parameters())


def _name_of(item, index: int) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    return f"image {index}"

