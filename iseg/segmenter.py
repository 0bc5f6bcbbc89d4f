"""The segmenter: one noisy forward pass per image, then Cat-Cross maps, Ent-Self and refinement.

    model = iseg.load_model("shapes")
    seg = iseg.ISeg(model)
    result = seg.segment("cat.png", ["cat", "dog"])
    result.labels            # (H, W) int, 0 = background, k = k-th class

``ISeg`` is a thin façade: the model family's ``Backbone`` (``iseg.backbones``) does the model's
work, ``iseg.plan`` says which layers and heads to read, ``iseg.forward`` runs the pass with
capture, and ``iseg.decode`` turns observations into masks without touching the model.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from os import PathLike
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import decode as D
from .backbones import backbone_for
from .forward import CompiledForward, LayerPlan, NoisyForward, make_plan
from .images import as_image_list, image_name, load_image, prepare, read_pixels, to_uint8
from .interactive import PromptResult, PromptSession
from .labels import predict_labels
from .loading import LoadedModel
from .presets import DECODE_FIELDS, FORWARD_FIELDS, Settings, make_settings
from .prompts import Prompt, build_prompt, check_class_names, class_offsets, make_prompt
from .reference import DATASET_KINDS, reference_prompt
from .results import Observation, SegmentationResult, Trace

__all__ = ["ISeg", "Observation", "SegmentationResult", "Trace", "FORWARD_FIELDS", "DECODE_FIELDS", "SIZE_RANGE"]

# One lock per denoiser, shared by every ISeg that uses it: capturing attention swaps the
# denoiser's processors, so two forward passes on one model at once would read each other's attention.
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _denoiser_lock(module) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


# Image sizes ``ISeg`` accepts, as multiples of the model's native size: a model trained at one
# size means nothing far from it, and self-attention memory grows with the fourth power of the side.
SIZE_RANGE = (0.25, 2.0)


class PassPlans(NamedTuple):
    """What ``ISeg.pass_plans`` returns: the settings and plan of the pass that gives the
    cross-attention and of the one that gives the self-attention (the same pass unless
    ``self_image_size`` asks for a second), and the side of the second pass's square."""

    cross_settings: Settings
    self_settings: Settings
    cross_plan: LayerPlan
    self_plan: LayerPlan
    self_size: int


class ISeg:
    """Training-free segmentation with a diffusion model's attention (the iSeg method).

    ``ISeg(model, preset=None, **overrides)``: ``model`` is what ``iseg.load_model`` returns (or a
    bare Stable-Diffusion-style pipeline); ``preset`` names a preset (``wsss-voc``, ``wsss-coco``,
    ``ovs-voc``, ``ovs-context``, ``ovs-coco``, ``interactive``, their ``-reference`` twins, which compute what
    the authors' code computes for comparing with the paper (``iseg.reference``), and presets of
    shipped models such as ``shapes``; see ``iseg.presets.preset_names()``); overrides are any
    ``Settings`` field.
    Without a preset, a shipped model's own preset is used, else the reference defaults.

    Threads: one ``ISeg`` (or several on one model) may be called from several threads, e.g. a
    web server's pool. Forward passes on one denoiser run one at a time under a lock shared by every
    ``ISeg`` of that model (capturing attention swaps its attention processors; each ``ISeg``'s
    caches of prompt embeddings, plans and noise are read and written under it too);
    decoding (clustering, refinement, labels) runs in parallel. Results equal those of
    sequential calls.

    Sizes: ``image_size`` (and ``self_image_size``, where a second pass gives the self-attention)
    must be a multiple of ``size_step()`` and lie within ``SIZE_RANGE`` times the model's native
    size. ``batch_size`` images are segmented together, but a forward pass never holds more images
    than a memory budget allows (see ``forward_chunk``).
    """

    def __init__(self, model, preset: str | None = None, **overrides):
        if isinstance(model, (str, PathLike)):
            raise TypeError(f"ISeg takes a loaded model, not its name: ISeg(iseg.load_model({str(model)!r}))")
        self.model = LoadedModel.of(model)
        self.backbone = backbone_for(self.model.pipe)
        self.preset = preset if preset is not None else self.model.preset
        self.settings = make_settings(self.preset, **overrides)
        # the fields the caller set by hand: interactive prompts take these from ``self.settings``
        # too, instead of from the interactive preset
        self.hand_set = frozenset(overrides)
        self.forward = NoisyForward(self.backbone)
        self._lock = _denoiser_lock(self.backbone.denoiser)
        self._embeddings: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._plans: OrderedDict[tuple, LayerPlan] = OrderedDict()
        self._sessions: OrderedDict[tuple, PromptSession] = OrderedDict()  # for segment_prompt
        self.image_size()  # a size this model cannot mean is refused now, not at the first image
        self.self_image_size()
        self._checked_timestep(self.settings)

    # -- model facts ---------------------------------------------------------------------------
    @property
    def pipe(self):
        """The diffusers pipeline."""
        return self.model.pipe

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def device(self) -> torch.device:
        # the first parameter's, not diffusers' ``module.device``: that walks every submodule on each
        # call (6 ms per image on an H200 when called per image, measured with bench/profile_segment.py)
        return self.backbone.device

    @property
    def vae_scale(self) -> int:
        return self.backbone.latent_scale

    @property
    def known_words(self) -> frozenset[str] | None:
        """The model's closed word list where it has one (see ``LoadedModel.known_words``)."""
        return self.model.known_words

    @property
    def native_size(self) -> int:
        """The side of the images the model was trained on."""
        return self.backbone.native_size

    def size_step(self) -> int:
        """``image_size`` must be a multiple of this: the VAE's factor times the denoiser's downsampling."""
        return self.backbone.size_step()

    def image_size(self, settings: Settings | None = None) -> int:
        """The side of the square the model sees: ``settings.image_size``, checked, or the native size."""
        s = settings or self.settings
        return self.native_size if s.image_size is None else self._checked_size("image_size", s.image_size)

    def self_image_size(self, settings: Settings | None = None) -> int:
        """The side of the square whose pass gives the self-attention: ``settings.self_image_size``,
        checked, or ``image_size`` (one pass gives both attentions)."""
        s = settings or self.settings
        if s.self_image_size is None:
            return self.image_size(s)
        return self._checked_size("self_image_size", s.self_image_size)

    def _checked_size(self, name: str, size: int) -> int:
        native, step = self.native_size, self.size_step()
        lo = max(step, math.ceil(native * SIZE_RANGE[0] / step) * step)
        hi = int(native * SIZE_RANGE[1]) // step * step
        if not (lo <= size <= hi and size % step == 0):
            none = f"{name}=None for {native}" if name == "image_size" else f"{name}=None for image_size's pass"
            raise ValueError(
                f"{name}={size} does not suit the {self.model_name!r} model: it was trained on {native}x{native} "
                f"images; give a multiple of {step} from {lo} to {hi}, or {none}")
        return size

    def _checked_timestep(self, s: Settings) -> Settings:
        """``s``, its ``timestep`` checked against the scheduler's ``num_train_timesteps`` (a
        ValueError naming both, instead of an IndexError inside diffusers at the first image)."""
        config = getattr(getattr(self.pipe, "scheduler", None), "config", None)
        steps = config.get("num_train_timesteps") if isinstance(config, Mapping) else None
        if isinstance(steps, int) and not isinstance(steps, bool) and s.timestep >= steps:
            raise ValueError(f"timestep={s.timestep} is past the {self.model_name!r} model's noise schedule: its "
                             f"scheduler/scheduler_config.json has num_train_timesteps {steps}, so the timestep "
                             f"must be below {steps}; give a smaller timestep or fix that file")
        return s

    def with_settings(self, **overrides) -> Settings:
        return self._checked_timestep(make_settings(None, base=self.settings, **overrides)) if overrides else self.settings

    # -- prompts -------------------------------------------------------------------------------
    def prompt_for(self, classes: Sequence[str], settings: Settings | None = None) -> Prompt:
        s = settings or self.settings
        if s.reference in DATASET_KINDS:  # the authors' words, order, text and token positions
            return reference_prompt(self.backbone.tokenizer, s.reference, classes, model=self.model_name,
                                    known=self.known_words)
        names = check_class_names(classes)
        text = build_prompt(names, s.prompt_prefix, s.extra_words, s.background_words, s.prompt_joiner)
        offsets = class_offsets(names, s.prompt_prefix, s.prompt_joiner)
        return make_prompt(self.backbone.tokenizer, text, names, offsets, model=self.model_name, known=self.known_words)

    def embedding(self, prompt: Prompt, gamma: float) -> torch.Tensor:
        """Cat-Cross text embedding ``(1, window, dim)``; the encoder's output is cached per prompt."""
        with self._lock:
            key = prompt.input_ids
            if key in self._embeddings:
                self._embeddings.move_to_end(key)
            else:
                self._embeddings[key] = self.backbone.encode_text(prompt)
                while len(self._embeddings) > 256:  # a dataset run has one prompt per class set
                    self._embeddings.popitem(last=False)
            hidden = self._embeddings[key]
        return self.backbone.cat_cross(hidden, prompt, gamma).to(self.device, self.backbone.dtype)

    # -- speed and memory ----------------------------------------------------------------------
    def compile(self, method: str | None = "cuda-graph", *, vae: bool | Mapping = False, **compile_kwargs) -> ISeg:
        """Launch the noisy forward pass faster; the maps stay the same (see ``iseg.forward``).

        ``"cuda-graph"``: record the forward with capture once per input shape, then replay it
        (CUDA only; the first call of each batch size pays for the recording). ``"torch"``:
        ``torch.compile`` of the denoiser with the capture processors installed (e.g.
        ``mode="max-autotune-no-cudagraphs"``); the first call compiles. ``None``: the plain path.

        ``vae=True`` also runs the VAE encoder through ``torch.compile`` (one compilation per
        batch size; a dict gives ``torch.compile`` arguments): at batch 8 or more on a GPU the
        encoder, not the denoiser, is the largest cost. In float16 its kernels round in another order,
        so a few pixels can change label (bench/RESULTS.md: 139 of 1.2 million on 300 images).
        """
        with self._lock:  # not while another thread's forward pass runs on the denoiser
            self.forward.set_launch(method, vae, **compile_kwargs)
        return self

    @property
    def compiled(self) -> str | None:
        """The launch method in use (``"cuda-graph"``, ``"torch"``) or ``None`` for the plain path."""
        launcher = self.forward.launcher
        if launcher is None:
            return None
        return "torch" if isinstance(launcher, CompiledForward) else "cuda-graph"

    def offload_text_encoder(self) -> ISeg:
        """Keep the text encoder on the CPU in float32; prompt embeddings are cached and moved over.

        Saves its weights' GPU memory (about 0.7 GB for SD 2.1 in fp16) at the cost of encoding
        each new prompt on the CPU.
        """
        with self._lock:
            self.backbone.offload_text_encoder()
            self._embeddings.clear()
        return self

    # -- which layers to read ------------------------------------------------------------------
    def plan(self, latent_side: int, settings: Settings | None = None) -> LayerPlan:
        """Which layers and heads the settings read for a latent of ``latent_side`` (``iseg.plan``)."""
        s = settings or self.settings
        key = (latent_side, s)  # Settings is hashable; a plan is cheap, so the few kept are enough
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
            else:
                self._plans[key] = make_plan(self.backbone, latent_side, s)
                while len(self._plans) > 64:
                    self._plans.popitem(last=False)
            return self._plans[key]

    # -- the forward pass ----------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``z0`` of ``(B, 3, S, S)`` images in [0, 1] (method document §1)."""
        return self.forward.encode(pixels)

    def noisy_latents(self, z0: torch.Tensor, settings: Settings | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, t)`` with the same noise, drawn from ``seed``, for every image: batches equal single calls."""
        s = settings or self.settings
        with self._lock:
            return self.forward.noisy(z0, s.seed, s.timestep)

    def noise_weights(self, settings: Settings | None = None) -> tuple[float, float]:
        """``(a, b)`` with ``z_t = a z0 + b eps`` at the settings' ``timestep``, by the backbone's noise
        schedule (``sqrt(abar_t), sqrt(1 - abar_t)`` for DDPM, ``1 - t/1000, t/1000`` for rectified flow)."""
        s = settings or self.settings
        return self.backbone.noise_weights(s.timestep)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """What the VAE makes of latents ``z`` (from ``encode_images`` or ``noisy_latents``):
        ``(B, 3, S, S)`` images in [0, 1] on the CPU, ready to plot."""
        with self._lock:
            return self.backbone.decode_latents(z)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that denoises, where attention is captured (the backbone's ``denoiser``).
        ``capture_attention(seg.denoiser, layers)`` around ``seg.denoise(...)`` records its attention."""
        return self.backbone.denoiser

    @property
    def attention_kind(self) -> str:
        """``"separate"`` where the denoiser has cross- and self-attention modules of its own,
        ``"joint"`` where one attention runs image and text tokens through one softmax that capture
        splits into a cross and a self part (the backbone's ``attention_kind``)."""
        return self.backbone.attention_kind

    @torch.no_grad()
    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor) -> None:
        """One pass of the denoiser over ``z_t`` at ``t`` with the text ``embedding`` (from
        ``embedding``), as the family's pipeline makes it; the noise prediction is thrown away.
        Run it inside ``capture_attention(seg.denoiser, ...)`` to read the attention."""
        with self._lock:
            self.backbone.denoise(z_t.to(self.device), t.to(self.device), embedding.to(self.device))

    @property
    def raw_bg_power(self) -> float:
        """The background power for raw (N = 0) maps: the model's own measured one
        (``LoadedModel.raw_bg_power``), else the settings' ``bg_power``. Never ``None``, so
        ``ISeg(model, iterations=0, bg_power=seg.raw_bg_power)`` works for every model."""
        power = self.model.raw_bg_power
        return self.settings.bg_power if power is None else power

    def attend(self, pixels: torch.Tensor, embeddings: torch.Tensor, settings: Settings | None = None,
               self_attention: bool = True, cross_attention: bool = True):
        """One noisy forward pass; returns ``({r: cross (B, r*r, T)} or {}, self (B, n, n) or None)``."""
        s = settings or self.settings
        plan = self.plan(pixels.shape[-1] // self.vae_scale, s)
        with self._lock:
            return self.forward.run(pixels, embeddings, plan, s.seed, s.timestep, self_attention, cross_attention)

    def trace(self, image, classes, kind: str | None = None, per_head: bool = True, **overrides) -> Trace:
        """One forward pass with every attention layer (of ``kind``, or all) captured per head.

        For looking inside the model (the notebooks); ``segment`` reads only the layers it needs.
        The pass is at ``image_size``: ``self_image_size`` does not apply here (to look at what a
        second pass's self-attention sees, trace with ``image_size`` set to that size).
        """
        if kind not in (None, "cross", "self"):
            raise ValueError(f"kind must be 'cross', 'self' or None (every layer), got {kind!r}")
        s = self.with_settings(**overrides)
        size = self.image_size(s)
        prompt = self.prompt_for(classes, s)
        arr = load_image(image)
        pixels, geometry = prepare(arr, size, s.aspect)
        layers = [layer for layer in self.backbone.attention_layers() if kind is None or layer.kind == kind]
        embedding = self.embedding(prompt, s.gamma)
        with self._lock:
            store, latent_side = self.forward.trace(pixels[None], embedding, layers, s.seed, s.timestep, per_head)
        return Trace(store=store, prompt=prompt, image=to_uint8(arr), geometry=geometry,
                     size=size, latent_side=latent_side, settings=s)

    # -- the method ----------------------------------------------------------------------------
    def observe(self, images, classes, progress: bool | None = None, **overrides) -> list[Observation]:
        """Run the noisy forward pass on every image and keep what the method reads from it.

        Returns one ``Observation`` per image (cross-attention per resolution, the self-attention,
        the prompt). ``decode`` turns it into a result for any post-forward settings, so sliders on
        ``lam``, ``iterations`` or the background rule never re-run the denoiser.
        """
        return [obs for batch in self._batches(images, classes, progress, overrides) for obs in batch]

    def observe_prompt(self, image, prompt: Prompt, settings: Settings | None = None) -> Observation:
        """The forward pass of one image with a prompt made elsewhere (``prompt_for``, a text query)."""
        s = settings or self.settings
        size = self.image_size(s)
        self.pass_plans(s, size)  # bad layer or weight settings fail before the model runs
        return self._observe_batch([image], [prompt], s, size, names=["image"])[0]

    def segment(self, images, classes=None, progress: bool | None = None, *, vocabulary=None,
                label_method: str = "attention", **overrides):
        """Segment one image or a list of images into ``classes``.

        ``classes`` is one list of names for every image, or one list per image. Without
        ``classes``, give a ``vocabulary``: the classes of every image are first predicted from it
        with ``iseg.labels.predict_labels(method=label_method)`` (``attention`` or ``clip``), which
        is open-vocabulary segmentation. Returns a ``SegmentationResult`` for one image, a list of
        them for a list of images. ``overrides`` change any setting for this call only.
        """
        items, many = as_image_list(images)
        if classes is None:
            if vocabulary is None:
                raise TypeError("give the classes to segment (classes=[...]) or a vocabulary to predict them from")
            classes = predict_labels(items, vocabulary, label_method, seg=self, **overrides)
        elif vocabulary is not None:
            raise TypeError("give classes or a vocabulary, not both")
        # decode batch by batch: a batch's attention maps are freed before the next forward pass;
        # each observation carries the settings of this call
        results = [r for batch in self._batches(images, classes, progress, overrides) for r in D.decode(batch)]
        return results if many else results[0]

    def decode(self, obs: Observation, **overrides) -> SegmentationResult:
        """From one ``Observation`` to a ``SegmentationResult`` (``iseg.decode``, method §4 to §6).

        Only settings that act after the forward pass matter here (clustering, ``cross_weights``
        among the captured resolutions, ``lam``, ``iterations``, ``clamp_max``, the background rule).
        """
        return D.decode([obs], **overrides)[0]

    def decode_batch(self, observations: Sequence[Observation], **overrides) -> list[SegmentationResult]:
        """``decode`` for several observations, batched where they share settings and shapes."""
        return D.decode(observations, **overrides)

    def _batches(self, images, classes, progress, overrides):
        s = self.with_settings(**overrides)
        items = as_image_list(images)[0]
        if not items:
            raise ValueError("no images given")
        per_image = self._classes_per_image(classes, len(items))
        size = self.image_size(s)
        made: dict[int, Prompt] = {}  # one prompt per class list object: [classes] * count is made once
        for c in per_image:
            if id(c) not in made:
                made[id(c)] = self.prompt_for(c, s)
        prompts = [made[id(c)] for c in per_image]
        step = self.forward_chunk(s, size)
        show = progress if progress is not None else len(items) > step
        with tqdm(total=len(items), desc="iseg", unit="img", disable=not show) as bar:
            for start in range(0, len(items), step):
                chunk = range(start, min(start + step, len(items)))
                yield self._observe_batch([items[i] for i in chunk], [prompts[i] for i in chunk], s, size,
                                          names=[image_name(items[i], i) for i in chunk])
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
        plan = self.pass_plans(s, size).self_plan  # also checks the layer and head settings now
        n = plan.self_resolution**2
        heads = max([layer.heads for layer in plan.self_layers] + [1])
        per_image = 4 * n * n * (heads + len(plan.self_layers))  # one layer's heads at a time, every layer's mean
        budget = self._FORWARD_BYTES
        if self.device.type == "cuda":
            budget = max(budget, torch.cuda.get_device_properties(self.device).total_memory // 2)
        return max(1, min(s.batch_size, budget // per_image))

    @staticmethod
    def _classes_per_image(classes, count: int) -> list:
        """One class list per image (``prompt_for`` checks the names)."""
        if isinstance(classes, str):
            raise TypeError(f"classes must be a list of names, not one string {classes!r}; e.g. ['cat', 'dog']")
        classes = list(classes)
        if classes and all(isinstance(c, (list, tuple)) for c in classes):
            if len(classes) != count:
                raise ValueError(f"got {len(classes)} class lists for {count} images; give one list per image or one for all")
            return classes
        return [classes] * count

    def pass_plans(self, settings: Settings | None = None, size: int | None = None) -> PassPlans:
        """The forward passes of ``settings`` for images of side ``size`` (a ``PassPlans``).

        One pass (``self_image_size`` None or equal to ``size``) gives both attentions, and both
        settings are ``settings``. Otherwise the cross-attention comes from the pass at ``size``
        and the self-attention from a second pass at ``self_image_size``; each pass's plan is made
        with the other attention's layer settings left at their defaults, which that pass does not
        read (an explicit ``cross_weights`` resolution need not exist on the finer grid).
        """
        s = settings or self.settings
        size = size or self.image_size(s)
        self_size = self.self_image_size(s) if s.self_image_size is not None else size
        if self_size == size:
            plan = self.plan(size // self.vae_scale, s)
            return PassPlans(s, s, plan, plan, size)
        base = Settings()
        cross_s = replace(s, self_resolution=base.self_resolution, self_layers=base.self_layers,
                          self_heads=base.self_heads)
        self_s = replace(s, cross_weights=base.cross_weights, cross_layers=base.cross_layers,
                         cross_heads=base.cross_heads)
        return PassPlans(cross_s, self_s, self.plan(size // self.vae_scale, cross_s),
                         self.plan(self_size // self.vae_scale, self_s), self_size)

    def _observe_batch(self, items, prompts: list[Prompt], s: Settings, size: int, names) -> list[Observation]:
        t0 = time.perf_counter()
        cross_s, self_s, cross_plan, self_plan, self_size = self.pass_plans(s, size)
        arrays, prepared, for_self = [], [], []
        for item, name in zip(items, names):
            # read and resize one image at a time: only 8-bit copies of the batch stay on the host
            arr = read_pixels(item, name)
            prepared.append(prepare(arr, size, s.aspect, device=self.device))
            if self_size != size:
                for_self.append(prepare(arr, self_size, s.aspect, device=self.device)[0])
            arrays.append(to_uint8(arr))
            del arr
        pixels = torch.stack([p[0] for p in prepared])
        embeddings = torch.cat([self.embedding(p, s.gamma) for p in prompts])
        cross, attn_self = self.attend(pixels, embeddings, cross_s, self_attention=not for_self)
        if for_self:
            # the second pass (Settings.self_image_size): same prompt, seed and timestep
            del pixels
            _, attn_self = self.attend(torch.stack(for_self), embeddings, self_s, cross_attention=False)
        per = (time.perf_counter() - t0) / len(items)
        return [
            Observation(
                cross={r: a[b] for r, a in cross.items()},
                self_attention=attn_self[b],
                prompt=prompt,
                image=arr,
                geometry=geometry,
                size=self_size,  # the maps are brought back to the image through the self-attention grid
                grid=self_plan.self_resolution,
                weights=dict(cross_plan.weights),
                settings=s,
                forward_s=per,
            )
            for b, (prompt, arr, (_, geometry)) in enumerate(zip(prompts, arrays, prepared))
        ]

    # -- interactive prompts -------------------------------------------------------------------
    def prompt_session(self, image, **overrides) -> PromptSession:
        """Prepare one image for interactive prompts (method §7): the forward pass runs now, and
        ``session.segment(points=...)``, ``box=``, ``line=`` cost only the refinement; each new
        ``text=`` description runs one more pass (also kept). The refinement uses
        ``interactive_defaults(seg)`` (lam, iterations, clamp_max, threshold, clustering), not those
        of ``seg.settings``: give them here or per ``segment`` call to change them."""
        return PromptSession(self, image, **overrides)

    # sessions kept for segment_prompt; with PromptSession's 4 passes each, at most 16 passes in all
    _SESSIONS = 4

    def segment_prompt(self, image, *, points=None, line=None, box=None, text=None, **overrides) -> PromptResult:
        """Segment what the user points at, strokes, boxes or describes (method §7).

        ``prompt_session(image).segment(...)`` with the session kept (for this image and the
        current ``settings``): further points, lines and boxes on the same image do not run the
        model again.
        """
        arr = load_image(image)
        # a session fixes the settings it was made with: a change of seg.settings makes a new one
        key = (PromptSession.image_key(arr), self.settings, self.preset)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
        if session is None:
            session = PromptSession(self, arr, observe=False)
            with self._lock:
                self._sessions[key] = session
                while len(self._sessions) > self._SESSIONS:
                    self._sessions.popitem(last=False)
        return session.segment(points=points, line=line, box=box, text=text, **overrides)

    def clear_prompt_sessions(self) -> None:
        """Forget the forward passes kept for ``segment_prompt``."""
        with self._lock:
            self._sessions.clear()

    def __repr__(self) -> str:
        return f"ISeg(model={self.model_name!r}, preset={self.preset!r}, iterations={self.settings.iterations}, lam={self.settings.lam})"
