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

``trace`` captures every layer (per head) for looking inside the model; the bench times the same
``encode`` and ``denoise`` steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .backbones import Backbone
from .capture import AttentionLayer, AttentionStore, capture_attention, install_capture, pick_layers
from .numerics import check_finite
from .presets import FrozenMap, Settings

__all__ = ["LayerPlan", "make_plan", "NoisyForward", "GraphedForward", "CompiledForward", "make_launcher", "require_cuda",
           "METHODS"]

@dataclass(frozen=True)
class LayerPlan:
    """The layers one forward pass captures and how their maps are combined."""

    weights: FrozenMap  # {r: weight > 0}
    cross: FrozenMap  # {r: tuple[AttentionLayer, ...]}
    self_layers: tuple[AttentionLayer, ...]
    self_resolution: int
    heads: FrozenMap  # {layer name: tuple of head indices}

    def layers(self, self_attention: bool = True, cross_attention: bool = True) -> list[AttentionLayer]:
        """Every layer to capture: the cross-attention ones, then the self-attention ones."""
        out = [layer for group in self.cross.values() for layer in group] if cross_attention else []
        return out + list(self.self_layers) if self_attention else out


def make_plan(backbone: Backbone, latent_side: int, s: Settings) -> LayerPlan:
    """The plan of ``s`` for a ``latent_side`` latent; a ``ValueError`` names a setting that the
    model cannot follow (a resolution it does not have, a head out of range)."""
    available = backbone.attention_layers()
    weights = dict(s.cross_weights) if s.cross_weights is not None else backbone.default_cross_weights(latent_side)
    if s.reference == "interactive" and s.cross_weights is None:
        # the authors' demo reads text from the half-resolution grid alone (32 at 512 px), see below
        weights = {max(1, latent_side // 2): 1.0}
    weights = {int(r): float(w) for r, w in weights.items() if w != 0}
    if not weights:
        raise ValueError(f"cross_weights {dict(s.cross_weights)!r} gives every resolution weight 0; "
                         "give at least one resolution a positive weight, e.g. {%d: 1.0}"
                         % (next(iter(backbone.default_cross_weights(latent_side))) or 1))
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
                     self_layers=tuple(self_layers), self_resolution=self_r, heads=FrozenMap(heads))


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
    """Encode, noise and denoise once with capture; ``set_launch`` chooses how the pass starts."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.launcher = None  # GraphedForward or CompiledForward; None: the plain path
        self.encoder = None  # a torch.compile'd VAE encoding, or None
        self._noise: dict[tuple, torch.Tensor] = {}

    def set_launch(self, method: str | None, vae: bool | Mapping = False, **compile_kwargs) -> None:
        if not isinstance(vae, (bool, Mapping)):
            raise TypeError(f"vae must be True, False or a dict of torch.compile arguments, got {vae!r}")
        launcher = None if method is None else make_launcher(method, **compile_kwargs)
        if method == "cuda-graph":
            require_cuda(self.backbone.device)  # refused now, not at the first segment call
        if self.launcher is not None:
            self.launcher.release(self.backbone)
        self.launcher = launcher
        options = {"dynamic": False, **(vae if isinstance(vae, Mapping) else {})}
        self.encoder = None if vae is False else torch.compile(self.backbone.encoding, **options)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``z0`` of ``(B, 3, S, S)`` images in [0, 1] (method document §1)."""
        return self.backbone.encode(pixels, self.encoder)

    def noisy(self, z0: torch.Tensor, seed: int, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, t)`` with the same noise, drawn from ``seed``, for every image: batches equal single calls."""
        # a CPU generator, so any device gives the same noise; kept on the device so a batch costs
        # no host-to-device copy, which would wait for the VAE
        key = (seed, tuple(z0.shape[1:]), z0.device, z0.dtype)
        noise = self._noise.get(key)
        if noise is None:
            draw = torch.randn(z0.shape[1:], generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
            self._noise.clear()  # one entry is all a run needs
            noise = self._noise[key] = draw.to(z0.device, z0.dtype)
        t = torch.full((z0.shape[0],), timestep, dtype=torch.long, device=z0.device)
        return self.backbone.add_noise(z0, noise.expand_as(z0), t), t

    @torch.no_grad()
    def run(self, pixels: torch.Tensor, embedding: torch.Tensor, plan: LayerPlan, seed: int, timestep: int,
            self_attention: bool = True, cross_attention: bool = True):
        """``({r: cross (B, r*r, T)} or {}, self (B, n, n) or None)`` of one pass over ``pixels``."""
        z_t, t = self.noisy(self.encode(pixels), seed, timestep)
        layers = plan.layers(self_attention, cross_attention)
        if self.launcher is not None:
            # the store belongs to the graph or compiled module; by_resolution returns new tensors
            store = self.launcher(self.backbone, layers, plan.heads, z_t, t, embedding)
            cross = store.by_resolution("cross")
            attn_self = store.by_resolution("self").get(plan.self_resolution) if self_attention else None
        else:
            with capture_attention(self.backbone.denoiser, layers, heads=dict(plan.heads)) as store:
                self.backbone.denoise(z_t, t, embedding)
            cross = store.by_resolution("cross")
            attn_self = store.by_resolution("self").get(plan.self_resolution) if self_attention else None
            store.clear()
        self.check(embedding, z_t, cross, attn_self)
        return cross, attn_self

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
        z0 = self.encode(pixels)
        z_t, t = self.noisy(z0, seed, timestep)
        self.check(embedding, z_t)
        with capture_attention(self.backbone.denoiser, layers, per_head=per_head) as store:
            self.backbone.denoise(z_t, t, embedding)
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
