"""One noisy forward pass with attention capture (method document §1 and §3): which layers and heads
it reads (``LayerPlan``, ``make_plan``), and how the pass is launched.

    plan = make_plan(backbone, latent_side=64, settings=s)
    plan.weights          # {r: w} resolution weights of the cross-attention
    plan.cross            # {r: (AttentionLayer, ...)} cross-attention layers per resolution
    plan.self_layers      # self-attention layers at plan.self_resolution
    plan.heads            # {layer name: head indices}; layers not named: every head

``NoisyForward(backbone)`` encodes images, adds the seed's noise at the timestep and runs the
denoiser once with capture processors on the layers of a ``LayerPlan``. Launch options keep the
capture exactly as it is and change only how the pass is started:

- plain (default): ``capture_attention`` around the denoiser call;
- ``"cuda-graph"``: record the pass with capture once per input shape into a CUDA graph, then
  replay it (at batch 1 a large GPU is bound by kernel launches, not arithmetic);
- ``"torch"``: ``torch.compile`` of the denoiser with the capture processors installed for as
  long as it is used.

``trace`` captures every layer (per head) for looking inside the model; ``encode``, ``noisy``,
``denoise`` and ``decode_latents`` are the pass's steps one at a time (notebook 01, the bench).

A model whose preset reads the self-attention at another image size (``Settings.self_image_size``)
runs two passes; its plan says so (``plan_passes``: ``plan.passes``), and ``NoisyForward.observe``
runs whatever passes a plan holds.

``Cache`` is the one small keyed store (least recently used goes first) behind every cache of
``ISeg`` (plans, prompt embeddings, prompt sessions) and of the pass (the noise).
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from . import registry
from .backbones import Backbone
from .capture import AttentionLayer, AttentionStore, capture_attention, install_capture, pick_layers
from .numerics import check_finite
from .presets import FrozenMap, Settings, SettingsError

__all__ = ["LayerPlan", "make_plan", "plan_passes", "image_sizes", "check_timestep", "check_plan", "NoisyForward", "Cache",
           "GraphedForward", "CompiledForward", "make_launcher", "require_cuda", "METHODS", "SIZE_RANGE"]

# Image sizes the method accepts, as multiples of the model's native size: a model trained at one
# size means nothing far from it, and self-attention memory grows with the fourth power of the side.
SIZE_RANGE = (0.25, 2.0)


class Cache:
    """A small keyed store: ``get(key, make)`` returns the value kept for ``key``, else makes it
    with ``make()`` and keeps it; past ``size`` values the least recently used goes. Every read
    and write holds ``lock`` (``ISeg`` gives its denoiser's, so threads share the caches safely)."""

    def __init__(self, size: int, lock=None):
        self.size = size
        self.lock = lock if lock is not None else threading.RLock()
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], object]):
        with self.lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = self._items[key] = make()
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return value

    def clear(self) -> None:
        with self.lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


# One lock per denoiser, shared by every ISeg that uses it: capturing attention swaps the
# denoiser's processors, so two forward passes on one model at once would read each other's attention.
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def denoiser_lock(module) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


@dataclass(frozen=True)
class LayerPlan:
    """The layers one forward pass captures and how their maps are combined.

    ``image_size`` is the side of the square the pass sees. ``self_pass``: where the self-attention
    comes from a second pass at another image size (``Settings.self_image_size``), that pass's plan
    (it reads only self-attention, this one only cross-attention); ``None``: this pass gives both.
    """

    weights: FrozenMap  # {r: weight > 0}
    cross: FrozenMap  # {r: tuple[AttentionLayer, ...]}
    self_layers: tuple[AttentionLayer, ...]
    self_resolution: int
    heads: FrozenMap  # {layer name: tuple of head indices}
    image_size: int = 0
    self_pass: LayerPlan | None = None

    def layers(self, self_attention: bool = True, cross_attention: bool = True) -> list[AttentionLayer]:
        """Every layer to capture: the cross-attention ones, then the self-attention ones."""
        out = [layer for group in self.cross.values() for layer in group] if cross_attention else []
        return out + list(self.self_layers) if self_attention else out

    @property
    def passes(self) -> tuple[LayerPlan, ...]:
        """The forward passes to run, in order: this one, then ``self_pass`` where there is one."""
        return (self,) if self.self_pass is None else (self, self.self_pass)

    @property
    def self_plan(self) -> LayerPlan:
        """The pass whose self-attention is read (its ``self_resolution`` is the maps' grid)."""
        return self.passes[-1]


def image_sizes(backbone: Backbone, s: Settings, model: str = "this") -> tuple[int, int]:
    """``(image_size, self_image_size)`` of ``s``, checked: ``None`` means the native size, and
    ``image_size`` for the second; a ``ValueError`` names a size the ``model`` cannot mean."""
    native, step = backbone.native_size, backbone.size_step()
    lo = max(step, math.ceil(native * SIZE_RANGE[0] / step) * step)
    hi = int(native * SIZE_RANGE[1]) // step * step

    def checked(name: str, size: int | None, default: int) -> int:
        if size is None:
            return default
        if not (lo <= size <= hi and size % step == 0):
            none = f"{name}=None for {native}" if name == "image_size" else f"{name}=None for image_size's pass"
            raise ValueError(
                f"{name}={size} does not suit the {model!r} model: it was trained on {native}x{native} "
                f"images; give a multiple of {step} from {lo} to {hi}, or {none}")
        return size

    size = checked("image_size", s.image_size, native)
    return size, checked("self_image_size", s.self_image_size, size)


def check_timestep(backbone: Backbone, s: Settings, model: str = "this") -> Settings:
    """``s``, its ``timestep`` checked against the scheduler's ``num_train_timesteps`` (a
    ValueError naming both, instead of an IndexError inside diffusers at the first image)."""
    config = getattr(getattr(backbone.pipe, "scheduler", None), "config", None)
    steps = config.get("num_train_timesteps") if isinstance(config, Mapping) else None
    if isinstance(steps, int) and not isinstance(steps, bool) and s.timestep >= steps:
        raise ValueError(f"timestep={s.timestep} is past the {model!r} model's noise schedule: its "
                         f"scheduler/scheduler_config.json has num_train_timesteps {steps}, so the timestep "
                         f"must be below {steps}; give a smaller timestep or fix that file")
    return s


def plan_passes(backbone: Backbone, s: Settings, model: str = "this") -> LayerPlan:
    """The plan of what ``ISeg.segment`` runs with ``s``: one pass at ``image_size`` that gives both
    attentions, or, where ``self_image_size`` differs, a pass at ``image_size`` for the
    cross-attention whose ``self_pass`` gives the self-attention at ``self_image_size``. Each
    pass's layers are chosen with the other attention's layer settings left at their defaults,
    which that pass does not read (an explicit ``cross_weights`` resolution need not exist on the
    finer grid)."""
    size, self_size = image_sizes(backbone, s, model)
    scale = backbone.latent_scale
    if self_size == size:
        return make_plan(backbone, size // scale, s)
    base = Settings()
    cross = make_plan(backbone, size // scale, replace(s, self_resolution=base.self_resolution,
                                                        self_layers=base.self_layers, self_heads=base.self_heads))
    second = make_plan(backbone, self_size // scale, replace(s, cross_weights=base.cross_weights,
                                                            cross_layers=base.cross_layers, cross_heads=base.cross_heads))
    return replace(cross, self_layers=(), self_pass=replace(second, weights=FrozenMap(), cross=FrozenMap()))


#: the settings that choose which attention layers a pass reads
LAYER_FIELDS = ("image_size", "self_image_size", "cross_weights", "cross_layers", "self_resolution", "self_layers",
                "cross_heads", "self_heads")


def check_plan(backbone: Backbone, s: Settings, model, preset: str | None, overrides: Mapping) -> Settings:
    """The layers ``s`` reads exist in ``model`` (a ``LoadedModel``) at its image size, checked when
    ``ISeg`` is made or given overrides, before any image is read or file written: a preset of another
    model (the shapes UNet's resolutions on the MM-DiT) or an ``image_size`` whose grids lack the
    preset's ``cross_weights`` would fail at the first image, in the middle of a run, naming neither.
    Returns ``s``; a ``SettingsError`` names the preset or the settings given and what to do."""
    image_sizes(backbone, s, model.name)  # a size the model cannot mean: its own error
    try:
        plan_passes(backbone, s, model.name)
    except SettingsError:
        raise
    except ValueError as err:
        asked = {k: v for k, v in overrides.items() if k in LAYER_FIELDS}
        owner = next((name for name, entry in registry.MODELS.items() if entry.plugin and preset in
                      getattr(registry.plugin(name), "PRESETS", {})), None)
        if not asked and owner is not None and registry.MODELS[owner].preset != model.preset:
            own = f" (its own preset, {model.preset!r}, is used then)" if model.preset else ""
            raise SettingsError(f"preset {preset!r} was chosen for the {owner!r} model, and this is the {model.name!r} "
                                f"model ({model.family}): leave preset out{own}. (The layers it names: {err})") from None
        if not asked and preset in (None, model.preset):
            return s  # the model's own defaults: a tiny test model may need an image_size per call
        what = ", ".join(f"{k}={v!r}" for k, v in asked.items()) or f"preset {preset!r}"
        raise SettingsError(f"{what} asks for attention layers this model does not have: {err}. "
                            f"{_what_works(backbone, s, model.name, err)}") from None
    return s


def _what_works(backbone: Backbone, s: Settings, model: str, err: Exception) -> str:
    """The sizes at which ``s`` would find its layers (``image_size``, else ``self_image_size`` for a
    second pass), or what else to change."""
    if "head" in str(err):
        return "No image size changes a model's heads: give heads it has"
    step, native = backbone.size_step(), backbone.native_size
    sizes = range(step, 4 * native + 1, step)
    for field in ("image_size", "self_image_size") if s.self_image_size is not None else ("image_size",):
        fits = []
        for size in sizes:
            try:
                plan_passes(backbone, replace(s, **{field: size}), model)
                fits.append(size)
            except ValueError:
                pass
        if fits:
            return f"With these settings the sizes that work are {field}={' or '.join(map(str, fits))}"
    return "No image size fits these settings: give cross_weights (and self_resolution) for the grids listed"


def make_plan(backbone: Backbone, latent_side: int, s: Settings) -> LayerPlan:
    """The plan of ``s`` for a ``latent_side`` latent; a ``ValueError`` names a setting that the
    model cannot follow (a resolution it does not have, a head out of range)."""
    available = backbone.attention_layers()
    weights = dict(s.cross_weights) if s.cross_weights is not None else backbone.default_cross_weights(latent_side)
    if s.reference == "interactive" and s.cross_weights is None:
        # the authors' demo reads text from the half-resolution grid alone (32 at 512 px), see below
        weights = {max(1, latent_side // 2): 1.0}
    # Settings refuses weights that are all 0, so at least one resolution is left
    weights = {int(r): float(w) for r, w in weights.items() if w != 0}
    cross: dict[int, list[AttentionLayer]] = {}
    reference_used = True
    for r in weights:
        if isinstance(s.cross_layers, tuple):
            cross[r] = pick_layers(available, "cross", [r], latent_side, names=s.cross_layers)
            reference_used = False
            continue
        level = round(math.log2(latent_side / r)) if r > 0 else -1
        everything = pick_layers(available, "cross", [r], latent_side)
        # ... and, with the interactive reference, only from the layers its demo reads
        names = backbone.reference_layers("cross", level, interactive=s.reference == "interactive")
        ref = None
        if s.cross_layers == "auto" and names and latent_side / 2**level == r:
            try:
                ref = pick_layers(available, "cross", [r], latent_side, names=names)
            except ValueError:
                ref = None
        cross[r] = ref if ref is not None else everything
        reference_used = reference_used and ref is not None
    heads = _cross_heads(backbone, s, cross, latent_side, reference_used)

    self_r = s.self_resolution or backbone.default_self_resolution(latent_side)
    if isinstance(s.self_layers, tuple):
        self_layers = pick_layers(available, "self", [self_r], latent_side, names=s.self_layers)
    else:
        self_layers = pick_layers(available, "self", [self_r], latent_side)
        names = backbone.reference_layers("self", 0)
        if s.self_layers == "auto" and self_r == latent_side and names:
            try:
                self_layers = pick_layers(available, "self", [self_r], latent_side, names=names)
            except ValueError:  # the reference's layers are not there: every self-attention layer at that resolution
                pass
    self_heads = s.self_heads
    if self_heads == "reference":
        self_heads = backbone.reference_heads("self", 0, self_layers) if self_r == latent_side else None
    if self_heads is not None:
        heads.update({layer.name: tuple(self_heads) for layer in self_layers})
    for layer in self_layers:
        for h in heads.get(layer.name, ()):
            if not -layer.heads <= h < layer.heads:
                raise ValueError(f"self_heads {tuple(self_heads)} out of range: {layer.name} has {layer.heads} heads")
    return LayerPlan(weights=FrozenMap(weights), cross=FrozenMap((r, tuple(v)) for r, v in cross.items()),
                     self_layers=tuple(self_layers), self_resolution=self_r, heads=FrozenMap(heads),
                     image_size=latent_side * backbone.latent_scale)


def _cross_heads(backbone: Backbone, s: Settings, cross: dict, latent_side: int, reference_used: bool) -> dict:
    spec = s.cross_heads
    if spec is None:
        return {}
    if spec == "reference-voc":
        levels = {r: round(math.log2(latent_side / r)) for r in cross}
        chosen = {r: backbone.reference_heads("cross", level, cross[r]) if reference_used else None
                  for r, level in levels.items()}
        if any(h is None for h in chosen.values()):
            warnings.warn("cross_heads='reference-voc' only applies to SD 2.1-base; averaging all heads instead",
                          stacklevel=5)
            return {}
        spec = chosen
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


METHODS = ("cuda-graph", "torch")


class NoisyForward:
    """Encode, noise and denoise once with capture; ``set_launch`` chooses how the pass starts.

    ``seg.forward`` of an ``ISeg``. Its steps hold the denoiser's lock (``lock``), shared by
    every ``ISeg`` of the model, so a pass never runs while another thread's captures."""

    # bytes that the attention captured in one forward pass may take (the self-attention matrices,
    # per head while they are averaged); on a GPU, half of its memory
    _FORWARD_BYTES = 2 * 2**30

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.launcher = None  # GraphedForward or CompiledForward; None: the plain path
        self.encoder = None  # a torch.compile'd VAE encoding, or None
        self.lock = denoiser_lock(backbone.denoiser)
        self._noise = Cache(1, self.lock)  # one draw is all a run needs

    def set_launch(self, method: str | None, vae: bool | Mapping = False, **compile_kwargs) -> None:
        if not isinstance(vae, (bool, Mapping)):
            raise TypeError(f"vae must be True, False or a dict of torch.compile arguments, got {vae!r}")
        launcher = None if method is None else make_launcher(method, **compile_kwargs)
        if method == "cuda-graph":
            require_cuda(self.backbone.device)  # refused now, not at the first segment call
        with self.lock:  # not while another thread's forward pass runs on the denoiser
            if self.launcher is not None:
                self.launcher.release(self.backbone)
            self.launcher = launcher
            options = {"dynamic": False, **(vae if isinstance(vae, Mapping) else {})}
            self.encoder = None if vae is False else torch.compile(self.backbone.encoding, **options)

    @property
    def compiled(self) -> str | None:
        """The launch method in use (``"cuda-graph"``, ``"torch"``) or ``None`` for the plain path."""
        if self.launcher is None:
            return None
        return "torch" if isinstance(self.launcher, CompiledForward) else "cuda-graph"

    @property
    def attention_kind(self) -> str:
        """``"separate"`` where the denoiser has cross- and self-attention modules of its own,
        ``"joint"`` where one attention runs image and text tokens through one softmax that capture
        splits into a cross and a self part (the backbone's ``attention_kind``)."""
        return self.backbone.attention_kind

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``z0`` of ``(B, 3, S, S)`` images in [0, 1] (method document §1)."""
        return self.backbone.encode(pixels, self.encoder)

    def noisy(self, z0: torch.Tensor, seed: int, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, t)`` with the same noise, drawn from ``seed``, for every image: batches equal single calls
        (``z_t = a z0 + b eps``, with ``(a, b) = seg.backbone.noise_weights(timestep)``)."""
        # a CPU generator, so any device gives the same noise; kept on the device so a batch costs
        # no host-to-device copy, which would wait for the VAE
        key = (seed, tuple(z0.shape[1:]), z0.device, z0.dtype)
        noise = self._noise.get(key, lambda: torch.randn(
            z0.shape[1:], generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32).to(z0.device, z0.dtype))
        t = torch.full((z0.shape[0],), timestep, dtype=torch.long, device=z0.device)
        return self.backbone.add_noise(z0, noise.expand_as(z0), t), t

    @torch.no_grad()
    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor) -> None:
        """One pass of the denoiser over ``z_t`` at ``t`` with the text ``embedding`` (from
        ``seg.embedding``), as the family's pipeline makes it; the noise prediction is thrown away.
        Run it inside ``capture_attention(seg.backbone.denoiser, ...)`` to read the attention."""
        device = self.backbone.device
        with self.lock:
            self.backbone.denoise(z_t.to(device), t.to(device), embedding.to(device))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """What the VAE makes of latents ``z`` (from ``encode`` or ``noisy``): ``(B, 3, S, S)``
        images in [0, 1] on the CPU, ready to plot."""
        with self.lock:
            return self.backbone.decode_latents(z)

    @torch.no_grad()
    def run(self, pixels: torch.Tensor, embedding: torch.Tensor, plan: LayerPlan, seed: int, timestep: int):
        """``({r: cross (B, r*r, T)} or {}, self (B, n, n) or None)`` of one pass over ``pixels``,
        with the layers of ``plan`` (one of ``plan.passes``)."""
        with self.lock:
            z_t, t = self.noisy(self.encode(pixels), seed, timestep)
            layers = plan.layers()
            if self.launcher is not None:
                # the store belongs to the graph or compiled module; by_resolution returns new tensors
                store = self.launcher(self.backbone, layers, plan.heads, z_t, t, embedding)
                cross = store.by_resolution("cross")
                attn_self = store.by_resolution("self").get(plan.self_resolution) if plan.self_layers else None
            else:
                with capture_attention(self.backbone.denoiser, layers, heads=dict(plan.heads)) as store:
                    self.backbone.denoise(z_t, t, embedding)
                cross = store.by_resolution("cross")
                attn_self = store.by_resolution("self").get(plan.self_resolution) if plan.self_layers else None
                store.clear()
        self.check(embedding, z_t, cross, attn_self)
        return cross, attn_self

    def observe(self, pixels: Sequence[torch.Tensor], embedding: torch.Tensor, plan: LayerPlan, seed: int,
                timestep: int) -> tuple[dict, torch.Tensor]:
        """``({r: cross (B, r*r, T)}, self (B, n, n))`` of every pass of ``plan`` (``plan.passes``),
        one batch of ``pixels`` per pass at its ``image_size``; same prompt, seed and timestep."""
        cross, attn_self = {}, None
        for batch, step in zip(pixels, plan.passes):
            got, got_self = self.run(batch, embedding, step, seed, timestep)
            cross.update(got)
            attn_self = attn_self if got_self is None else got_self
        return cross, attn_self

    def chunk_size(self, plan: LayerPlan, batch_size: int) -> int:
        """How many images one forward pass of ``plan`` takes: ``batch_size``, or fewer where the
        captured self-attention of that many images would pass the memory budget (a ``batch_size``
        of 10000 is run in chunks, with the same results)."""
        step = plan.self_plan
        n = step.self_resolution**2
        heads = max([layer.heads for layer in step.self_layers] + [1])
        per_image = 4 * n * n * (heads + len(step.self_layers))  # one layer's heads at a time, every layer's mean
        budget = self._FORWARD_BYTES
        device = self.backbone.device
        if device.type == "cuda":
            budget = max(budget, torch.cuda.get_device_properties(device).total_memory // 2)
        return max(1, min(batch_size, budget // per_image))

    def check(self, embedding, z_t, cross=None, attn_self=None) -> None:
        """Stop with ``NonFiniteError`` where the pass made NaN or infinity, naming the first stage."""
        dtype = str(self.backbone.dtype).replace("torch.", "")
        weights = f"the weights of the {{}} (a NaN in a checkpoint spreads everywhere) and the dtype ({dtype}"
        weights += ": float16 overflows above 65504; try float32 or bfloat16)"
        check_finite([
            ("the prompt embedding (text encoder output, times gamma)", embedding,
             weights.format("text encoder") + ", and the setting gamma"),
            ("the noisy latents z_t (VAE encoding plus noise)", z_t,
             weights.format("VAE") + ", the image, and the VAE's scaling_factor and shift_factor"),
            *((f"the cross-attention captured at resolution {r}", a, weights.format("denoiser") + ", and gamma")
              for r, a in (cross or {}).items()),
            ("the captured self-attention", attn_self, weights.format("denoiser")),
        ])

    @torch.no_grad()
    def trace(self, pixels: torch.Tensor, embedding: torch.Tensor, layers: Sequence[AttentionLayer], seed: int,
              timestep: int, per_head: bool = True) -> tuple[AttentionStore, int]:
        """Every one of ``layers`` captured (per head) in one pass; returns the store and the latent side."""
        with self.lock:
            z0 = self.encode(pixels)
            z_t, t = self.noisy(z0, seed, timestep)
            self.check(embedding, z_t)
            with capture_attention(self.backbone.denoiser, layers, per_head=per_head) as store:
                self.backbone.denoise(z_t, t, embedding)
            # the trace's views plot these maps as they are: a NaN would draw an empty picture
            hint = "the weights of the denoiser and the dtype (float16 overflows above 65504; try float32 or bfloat16)"
            captured = {**store.sums, **store.per_head}
            check_finite([(f"the attention captured in layer {name}", captured[name], hint) for name in store.names()])
        return store, z0.shape[-1]


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise RuntimeError(
            f"CUDA graphs need the pipeline on a CUDA device, it is on {device}; "
            "use seg.compile('torch') or the plain path (seg.compile(None)) there"
        )


def _key(layers: Sequence[AttentionLayer], heads) -> tuple:
    heads = {k: tuple(v) for k, v in heads.items()} if isinstance(heads, Mapping) else heads
    return tuple(layer.name for layer in layers), repr(heads)


class GraphedForward:
    """One CUDA graph per (captured layers, heads, input shapes, dtype)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, backbone: Backbone, layers, heads, z_t, t, emb) -> AttentionStore:
        require_cuda(z_t.device)
        key = _key(layers, heads) + (tuple(z_t.shape), tuple(emb.shape), z_t.dtype, emb.dtype, z_t.device)
        if key not in self._graphs:
            self._graphs[key] = self._record(backbone, layers, heads, z_t, t, emb)
        graph, (static_z, static_t, static_e), store = self._graphs[key]
        static_z.copy_(z_t)
        static_t.copy_(t)
        static_e.copy_(emb)
        graph.replay()
        return store

    def _record(self, backbone: Backbone, layers, heads, z_t, t, emb):
        inputs = (z_t.clone(), t.clone(), emb.clone())
        with capture_attention(backbone.denoiser, layers, heads=dict(heads)) as store:
            side = torch.cuda.Stream(device=z_t.device)
            side.wait_stream(torch.cuda.current_stream(z_t.device))
            with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
                for _ in range(self.warmup):
                    backbone.denoise(*inputs)
            torch.cuda.current_stream(z_t.device).wait_stream(side)
            store.clear()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                backbone.denoise(*inputs)
        # the store now holds the graph's own output tensors, which every replay rewrites
        return graph, inputs, store

    def release(self, backbone: Backbone) -> None:
        self._graphs.clear()


class CompiledForward:
    """``torch.compile`` of the denoiser with the capture processors installed while it is used."""

    def __init__(self, **compile_kwargs):
        self.compile_kwargs = compile_kwargs
        self._key = None
        self._store: AttentionStore | None = None
        self._restore = None
        self._fn = None

    def __call__(self, backbone: Backbone, layers, heads, z_t, t, emb) -> AttentionStore:
        key = _key(layers, heads)
        if key != self._key:
            self.release(backbone)
            self._store, self._restore = install_capture(backbone.denoiser, layers, dict(heads))
            self._fn = torch.compile(backbone.denoiser, **self.compile_kwargs)
            self._key = key
        self._store.clear()
        backbone.denoise(z_t, t, emb, module=self._fn)
        return self._store

    def release(self, backbone: Backbone) -> None:
        """Put the denoiser's own processors back."""
        if self._restore is not None:
            self._restore()
        self._key = self._store = self._restore = self._fn = None


def make_launcher(method: str, **compile_kwargs):
    if method == "cuda-graph":
        if compile_kwargs:
            raise TypeError(f"'cuda-graph' takes no torch.compile arguments, got {sorted(compile_kwargs)}")
        return GraphedForward()
    if method == "torch":
        return CompiledForward(**compile_kwargs)
    raise ValueError(f"unknown compile method {method!r}; choose one of {METHODS} (or None for the plain path)")
