"""The segmenter: one noisy forward pass per image, then Cat-Cross maps, Ent-Self and refinement.

    model = iseg.load_model("shapes")
    seg = iseg.ISeg(model)
    result = seg.segment("cat.png", ["cat", "dog"])
    result.labels            # (H, W) int, 0 = background, k = k-th class

``ISeg`` is a thin façade over three parts that do the work, each reachable from it:
``seg.backbone`` (``iseg.backbones``: the model family's encoders, noise and denoiser),
``seg.forward`` (``iseg.forward.NoisyForward``: the noisy pass with capture, and its steps one at a
time: ``encode``, ``noisy``, ``denoise``, ``decode_latents``) and ``seg.model`` (the
``LoadedModel``: name, preset, word list). ``seg.plan()`` says which layers and heads the pass reads
(and whether a second pass gives the self-attention), and ``iseg.decode`` turns observations into
masks without touching the model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from os import PathLike

import torch
from tqdm.auto import tqdm

from . import decode as D
from .backbones import backbone_for
from .forward import (
    SIZE_RANGE,
    Cache,
    LayerPlan,
    NoisyForward,
    check_plan,
    check_timestep,
    image_sizes,
    make_plan,
    plan_passes,
)
from .images import as_image_list, image_name, load_image, prepare, read_pixels, to_uint8
from .interactive import PromptResult, PromptSession
from .labels import predict_labels
from .loading import LoadedModel
from .presets import DECODE_FIELDS, FORWARD_FIELDS, Settings, make_settings
from .prompts import Prompt, class_prompt
from .reference import DATASET_KINDS, reference_prompt
from .results import Observation, SegmentationResult, Trace

__all__ = ["ISeg", "Observation", "SegmentationResult", "Trace", "FORWARD_FIELDS", "DECODE_FIELDS", "SIZE_RANGE"]


class ISeg:
    """Training-free segmentation with a diffusion model's attention (the iSeg method).

    ``ISeg(model, preset=None, **overrides)``: ``model`` is what ``iseg.load_model`` returns (or a
    bare Stable-Diffusion-style pipeline); ``preset`` names a preset (``iseg.presets.preset_names()``;
    without one, a shipped model's own, else the reference defaults); overrides are any ``Settings``
    field. Sizes: ``image_size`` and ``self_image_size`` are multiples of ``seg.backbone.size_step()``
    within ``SIZE_RANGE`` times the native size; a pass holds at most ``seg.forward.chunk_size`` images.

    Threads: one ``ISeg`` (or several on one model) may be called from several threads. Forward
    passes on one denoiser run one at a time under its lock (``seg.forward.lock``, which guards the
    caches too); decoding runs in parallel. Results equal those of sequential calls.
    """

    _SESSIONS = 4  # sessions kept for segment_prompt; with PromptSession's 4 passes each, 16 passes in all

    def __init__(self, model, preset: str | None = None, **overrides):
        if isinstance(model, (str, PathLike)):
            raise TypeError(f"ISeg takes a loaded model, not its name: ISeg(iseg.load_model({str(model)!r}))")
        if model is None:
            raise TypeError("ISeg takes a loaded model, got None: ISeg(iseg.load_model('shapes')) or another model")
        self.model = LoadedModel.of(model)
        self.backbone = backbone_for(self.model.pipe)
        self.preset = preset if preset is not None else self.model.preset
        self.settings = make_settings(self.preset, **overrides)
        # the fields the caller set by hand: interactive prompts take these from ``self.settings``
        # too, instead of from the interactive preset
        self.hand_set = frozenset(overrides)
        self.forward = NoisyForward(self.backbone)
        lock = self.forward.lock
        # plans are cheap, so a few are enough; a dataset run has one prompt per class set
        self._plans, self._embeddings, self._sessions = Cache(64, lock), Cache(256, lock), Cache(self._SESSIONS, lock)
        # sizes, a preset or layer settings this model cannot follow fail now, not at the first image
        check_plan(self.backbone, check_timestep(self.backbone, self.settings, self.model.name), self.model, self.preset, overrides)

    def with_settings(self, **overrides) -> Settings:
        """``settings`` with ``overrides`` (any ``Settings`` field), checked."""
        s = make_settings(None, base=self.settings, **overrides) if overrides else self.settings
        s = check_timestep(self.backbone, s, self.model.name)
        return check_plan(self.backbone, s, self.model, self.preset, overrides) if overrides else s

    @property
    def raw_bg_power(self) -> float:
        """The background power for raw (N = 0) maps: the model's own measured one
        (``LoadedModel.raw_bg_power``), else the settings' ``bg_power``. Never ``None``, so
        ``ISeg(model, iterations=0, bg_power=seg.raw_bg_power)`` works for every model."""
        power = self.model.raw_bg_power
        return self.settings.bg_power if power is None else power

    # -- prompts -------------------------------------------------------------------------------
    def prompt_for(self, classes: Sequence[str], settings: Settings | None = None) -> Prompt:
        """The prompt ``segment`` writes for ``classes``, with each class's token positions."""
        s, m = settings or self.settings, self.model
        if s.reference in DATASET_KINDS:  # the authors' words, order, text and token positions
            return reference_prompt(self.backbone.tokenizer, s.reference, classes, model=m.name, known=m.known_words)
        return class_prompt(self.backbone.tokenizer, classes, s.prompt_prefix, s.extra_words, s.background_words,
                            s.prompt_joiner, model=m.name, known=m.known_words)

    def embedding(self, prompt: Prompt, gamma: float) -> torch.Tensor:
        """Cat-Cross text embedding ``(1, window, dim)``; the encoder's output is cached per prompt."""
        hidden = self._embeddings.get(prompt.input_ids, lambda: self.backbone.encode_text(prompt))
        return self.backbone.cat_cross(hidden, prompt, gamma).to(self.backbone.device, self.backbone.dtype)

    # -- the forward pass ----------------------------------------------------------------------
    def compile(self, method: str | None = "cuda-graph", *, vae: bool | Mapping = False, **compile_kwargs) -> ISeg:
        """Launch the noisy forward pass faster; the maps stay the same (``iseg.forward``).

        ``"cuda-graph"``: record the pass with capture once per input shape, then replay it (CUDA
        only). ``"torch"``: ``torch.compile`` of the denoiser with capture (e.g.
        ``mode="max-autotune-no-cudagraphs"``). ``None``: the plain path. ``vae=True`` (or a dict of
        ``torch.compile`` arguments) compiles the VAE encoder too; in float16 a few pixels can then
        change label (bench/RESULTS.md: 139 of 1.2 million). ``seg.forward.compiled`` says which.
        """
        self.forward.set_launch(method, vae, **compile_kwargs)
        return self

    def offload_text_encoder(self) -> ISeg:
        """Keep the text encoder on the CPU in float32 (about 0.7 GB less GPU memory for SD 2.1 in
        fp16); prompt embeddings are cached and moved over."""
        with self.forward.lock:
            self.backbone.offload_text_encoder()
            self._embeddings.clear()
        return self

    def plan(self, latent_side: int | None = None, settings: Settings | None = None) -> LayerPlan:
        """Which layers and heads the pass reads (a ``LayerPlan``, cached per settings).

        Without ``latent_side``: the plan of what ``segment`` runs, at ``image_size``; its
        ``passes`` are one pass, or two where ``self_image_size`` asks for the self-attention of a
        second pass (``plan.self_pass``). With ``latent_side``: one pass's plan for that latent grid.
        """
        s = settings or self.settings
        if latent_side is None:
            return self._plans.get((None, s), lambda: plan_passes(self.backbone, s, self.model.name))
        return self._plans.get((latent_side, s), lambda: make_plan(self.backbone, latent_side, s))

    def trace(self, image, classes, kind: str | None = None, per_head: bool = True, **overrides) -> Trace:
        """One forward pass with every attention layer (of ``kind``, or all) captured per head, for
        looking inside the model (``segment`` reads only the layers it needs). The pass is at
        ``image_size`` (for a second pass's self-attention, trace with ``image_size`` set to its size)."""
        if kind not in (None, "cross", "self"):
            raise ValueError(f"kind must be 'cross', 'self' or None (every layer), got {kind!r}")
        s = check_timestep(self.backbone, make_settings(None, base=self.settings, **overrides), self.model.name)
        size = image_sizes(self.backbone, s, self.model.name)[0]
        prompt = self.prompt_for(classes, s)
        arr = load_image(image)
        pixels, geometry = prepare(arr, size, s.aspect)
        layers = [layer for layer in self.backbone.attention_layers() if kind is None or layer.kind == kind]
        embedding = self.embedding(prompt, s.gamma)
        store, latent_side = self.forward.trace(pixels[None], embedding, layers, s.seed, s.timestep, per_head)
        return Trace(store=store, prompt=prompt, image=to_uint8(arr), geometry=geometry,
                     size=size, latent_side=latent_side, settings=s)

    # -- the method ----------------------------------------------------------------------------
    def observe(self, images, classes, progress: bool | None = None, *, settings: Settings | None = None,
                **overrides) -> list[Observation]:
        """Run the noisy forward pass on every image and keep what the method reads from it.

        Returns one ``Observation`` per image (cross-attention per resolution, the self-attention,
        the prompt). ``classes`` may also be a ``Prompt`` made elsewhere (``prompt_for``, a text
        query); ``settings`` replaces ``seg.settings`` for this call. ``decode`` turns it into a
        result for any post-forward settings, so sliders on ``lam``, ``iterations`` or the
        background rule never re-run the denoiser.
        """
        return [obs for batch in self._batches(images, classes, progress, settings, overrides) for obs in batch]

    def segment(self, images, classes=None, progress: bool | None = None, *, vocabulary=None,
                label_method: str = "attention", **overrides):
        """Segment one image or a list of images into ``classes``.

        ``classes`` is one list of names for every image, or one list per image. Without
        ``classes``, give a ``vocabulary``: the classes of every image are first predicted from it
        with ``iseg.labels.predict_labels(method=label_method)`` (``attention`` or ``clip``), which
        is open-vocabulary segmentation. Returns a ``SegmentationResult`` for one image, a list of
        them for a list of images or a batch (a 4-D array or tensor, even of one image). ``overrides`` change any setting for this call only.
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
        results = [r for batch in self._batches(images, classes, progress, None, overrides) for r in D.decode(batch)]
        return results if many else results[0]

    def decode(self, observations: Observation | Sequence[Observation], **overrides):
        """From an ``Observation`` to a ``SegmentationResult``, or from a list of them to a list
        (batched where they share settings and shapes; ``iseg.decode``, method §4 to §6).

        Only settings that act after the forward pass matter here (clustering, ``cross_weights``
        among the captured resolutions, ``lam``, ``iterations``, ``clamp_max``, the background rule).
        """
        one = isinstance(observations, Observation)
        results = D.decode([observations] if one else observations, **overrides)
        return results[0] if one else results

    def _batches(self, images, classes, progress, settings, overrides):
        s = make_settings(None, base=settings, **overrides) if settings is not None else self.with_settings(**overrides)
        items = as_image_list(images)[0]
        if not items:
            raise ValueError("no images given")
        plan = self.plan(settings=s)  # bad size, layer or weight settings fail before the model runs
        per_image = _classes_per_image(classes, len(items))
        made: dict[int, Prompt] = {}  # one prompt per class list object: [classes] * count is made once
        for c in per_image:
            if id(c) not in made:
                made[id(c)] = c if isinstance(c, Prompt) else self.prompt_for(c, s)
        prompts = [made[id(c)] for c in per_image]
        step = self.forward.chunk_size(plan, s.batch_size)
        show = progress if progress is not None else len(items) > step
        with tqdm(total=len(items), desc="iseg", unit="img", disable=not show) as bar:
            for start in range(0, len(items), step):
                chunk = range(start, min(start + step, len(items)))
                yield self._observe_batch([items[i] for i in chunk], [prompts[i] for i in chunk], s, plan,
                                          names=[image_name(items[i], i) for i in chunk])
                bar.update(len(chunk))

    def _observe_batch(self, items, prompts: list[Prompt], s: Settings, plan: LayerPlan, names) -> list[Observation]:
        t0 = time.perf_counter()
        arrays, geometries, batches = _read_batch(items, names, plan, s.aspect, self.backbone.device)
        embeddings = torch.cat([self.embedding(p, s.gamma) for p in prompts])
        cross, attn_self = self.forward.observe(batches, embeddings, plan, s.seed, s.timestep)
        per = (time.perf_counter() - t0) / len(items)
        grid, size = plan.self_plan.self_resolution, plan.self_plan.image_size
        # the maps are brought back to the image through the self-attention grid (size, grid)
        return [Observation(cross={r: a[b] for r, a in cross.items()}, self_attention=attn_self[b], prompt=prompt,
                            image=arr, geometry=geometry, size=size, grid=grid, weights=dict(plan.weights),
                            settings=s, forward_s=per)
                for b, (prompt, arr, geometry) in enumerate(zip(prompts, arrays, geometries))]

    # -- interactive prompts -------------------------------------------------------------------
    def prompt_session(self, image, **overrides) -> PromptSession:
        """Prepare one image for interactive prompts (method §7): the forward pass runs now, and
        ``session.segment(points=...)``, ``box=``, ``line=`` cost only the refinement; each new
        ``text=`` description runs one more pass (also kept). The refinement uses
        ``interactive_defaults(seg)`` (lam, iterations, clamp_max, threshold, clustering), not those
        of ``seg.settings``: give them here or per ``segment`` call to change them."""
        return PromptSession(self, image, **overrides)

    def segment_prompt(self, image, *, points=None, line=None, box=None, text=None, **overrides) -> PromptResult:
        """Segment what the user points at, strokes, boxes or describes (method §7):
        ``prompt_session(image).segment(...)`` with the session kept (for this image and the current
        ``settings``), so further points, lines and boxes on the image do not run the model again."""
        arr = load_image(image)
        # a session fixes the settings it was made with: a change of seg.settings makes a new one
        key = (PromptSession.image_key(arr), self.settings, self.preset)
        session = self._sessions.get(key, lambda: PromptSession(self, arr, observe=False))
        return session.segment(points=points, line=line, box=box, text=text, **overrides)

    def clear_prompt_sessions(self) -> None:
        """Forget the forward passes kept for ``segment_prompt``."""
        self._sessions.clear()

    def __repr__(self) -> str:
        s = self.settings
        return f"ISeg(model={self.model.name!r}, preset={self.preset!r}, iterations={s.iterations}, lam={s.lam})"


def _classes_per_image(classes, count: int) -> list:
    """One class list (or ``Prompt``) per image (``prompt_for`` checks the names)."""
    if isinstance(classes, Prompt):
        return [classes] * count
    if isinstance(classes, str):
        raise TypeError(f"classes must be a list of names, not one string {classes!r}; e.g. ['cat', 'dog']")
    classes = list(classes)
    if classes and all(isinstance(c, (list, tuple)) for c in classes):
        if len(classes) != count:
            raise ValueError(f"got {len(classes)} class lists for {count} images; give one list per image or one for all")
        return classes
    return [classes] * count


def _read_batch(items, names, plan: LayerPlan, aspect: str, device) -> tuple[list, list, list[torch.Tensor]]:
    """The 8-bit images, their geometries (at ``plan.image_size``) and one pixel batch per pass of ``plan``."""
    arrays, geometries, pixels = [], [], [[] for _ in plan.passes]
    for item, name in zip(items, names):
        # read and resize one image at a time: only 8-bit copies of the batch stay on the host
        arr = read_pixels(item, name)
        for batch, step in zip(pixels, plan.passes):
            batch.append(prepare(arr, step.image_size, aspect, device=device))
        geometries.append(pixels[0][-1][1])
        arrays.append(to_uint8(arr))
        del arr
    return arrays, geometries, [torch.stack([p[0] for p in batch]) for batch in pixels]
