"""Step 3 of the method: capture attention probabilities through diffusers' processor API.

``capture_attention(denoiser, layers)`` installs a recording processor on the chosen layers
(every other layer keeps its own processor, normally SDPA), yields an ``AttentionStore`` that
fills up during the forward pass, and restores the original processors on exit, also after an
error::

    layers = select_layers(denoiser, "cross", resolutions=[16, 32], latent_side=64)
    with capture_attention(denoiser, layers) as store:
        denoiser(z_t, t, encoder_hidden_states=E)
    maps = store.by_resolution("cross")   # {16: (B, 256, 77), 32: (B, 1024, 77)}

What is common to every model family lives here: the layer record (``AttentionLayer``), the
store, installing and restoring processors, head sums and means, the recording processor of an
attention module that is either cross- or self-attention (``CaptureProcessor``) and the recording
machinery of one attention whose keys are image and text tokens at once
(``SplitCaptureProcessor``: the image queries' softmax split into a self map over the image keys
and a cross map over the text keys). A model family's backbone (``iseg.backbones``) names its
layers, and each layer names the processor class that records it (``AttentionLayer.processor``);
a family whose attention computes differently brings a subclass of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

__all__ = [
    "AttentionLayer",
    "AttentionStore",
    "CaptureProcessor",
    "SplitCaptureProcessor",
    "attention_layers",
    "register_layer_table",
    "select_layers",
    "pick_layers",
    "split_heads",
    "capture_attention",
    "install_capture",
]

KINDS = ("self", "cross")


@dataclass(frozen=True)
class AttentionLayer:
    """One attention map of a denoiser. Where an attention module is either cross- or
    self-attention, one module, named as in ``denoiser.attn_processors`` without ``.processor``;
    an attention module over image and text tokens at once gives two maps, ``<module>:text``
    (image queries to text keys, kind "cross") and ``<module>:image`` (image queries to image
    keys, kind "self"), both with ``module`` set to the module's name. ``processor`` is the
    ``CaptureProcessor`` class that records the map (the family's backbone chooses it; ``None``
    means ``CaptureProcessor``); it takes no part in comparisons."""

    name: str
    kind: str  # "self" or "cross"
    level: int  # downsampling steps below the latent: resolution = latent_side / 2**level
    heads: int
    module: str = ""  # the attention module's name where it differs from ``name``; "" means ``name``
    processor: type | None = field(default=None, compare=False, repr=False)

    def resolution(self, latent_side: int) -> int:
        return math.ceil(latent_side / 2**self.level)

    @property
    def target(self) -> str:
        """The name of the attention module whose processor captures this layer."""
        return self.module or self.name


#: ``table(denoiser) -> list[AttentionLayer] | None``, one per model family, newest first: each
#: names the layers of a denoiser of its family and answers ``None`` for any other denoiser.
#: ``iseg.backbones.register_backbone`` adds the backbone's ``layers_of``.
LAYER_TABLES: list[Callable] = []


def register_layer_table(table: Callable) -> Callable:
    """Add a family's layer table (it is asked before those registered earlier); returns it."""
    if table not in LAYER_TABLES:
        LAYER_TABLES.insert(0, table)
    return table


def attention_layers(denoiser) -> list[AttentionLayer]:
    """Every attention layer of a denoiser, in forward order of its processor dict, as its model
    family's backbone names them; a ``TypeError`` where no registered family knows the denoiser."""
    for table in LAYER_TABLES:
        layers = table(denoiser)
        if layers is not None:
            return list(layers)
    raise TypeError(f"no model family iseg knows has a {type(denoiser).__name__} denoiser; a new family "
                    "registers its backbone with iseg.backbones.register_backbone")


def _matches(layer: AttentionLayer, prefix: str) -> bool:
    return any(layer.name == prefix or layer.name.startswith(prefix + sep) for sep in ".:")


def _short_name(layer: AttentionLayer, layers: Sequence[AttentionLayer]) -> str:
    """The shortest dotted prefix of ``layer.name`` that matches no other of ``layers``."""
    parts = layer.name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if all(other is layer or not _matches(other, prefix) for other in layers):
            return prefix
    return layer.name


def select_layers(
    denoiser,
    kind: str,
    resolutions: Iterable[int] | None = None,
    latent_side: int | None = None,
    names: Sequence[str] | None = None,
) -> list[AttentionLayer]:
    """Choose layers of a denoiser by kind and latent resolution, or by name (prefixes allowed).

    ``resolutions`` needs ``latent_side`` (the side of the latent the denoiser will see).
    ``names`` may be full layer names or prefixes (a block's name stands for every layer in it).
    """
    return pick_layers(attention_layers(denoiser), kind, resolutions, latent_side, names)


def pick_layers(
    layers: Sequence[AttentionLayer],
    kind: str,
    resolutions: Iterable[int] | None = None,
    latent_side: int | None = None,
    names: Sequence[str] | None = None,
) -> list[AttentionLayer]:
    """``select_layers`` on a list of layers (any model family's ``attention_layers()``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    layers = [layer for layer in layers if layer.kind == kind]
    if names is not None:
        chosen = []
        for prefix in names:
            hits = [layer for layer in layers if _matches(layer, prefix)]
            if not hits:
                known = [_short_name(layer, layers) for layer in layers]
                raise ValueError(f"no {kind}-attention layer matches {prefix!r}; {kind}-attention layers: {known}")
            chosen.extend(hit for hit in hits if hit not in chosen)
        layers = chosen
    if resolutions is not None:
        if latent_side is None:
            raise ValueError("selecting layers by resolution needs latent_side")
        wanted = set(int(r) for r in resolutions)
        available = sorted({layer.resolution(latent_side) for layer in layers})
        missing = sorted(wanted - set(available))
        if missing:
            raise ValueError(
                f"this model has no {kind}-attention at resolution(s) {missing} for a {latent_side}x{latent_side} "
                f"latent; available: {available}"
            )
        layers = [layer for layer in layers if layer.resolution(latent_side) in wanted]
    return layers


class AttentionStore:
    """Attention probabilities captured during forward passes, in float32.

    For every captured layer it keeps the sum of the selected heads' probabilities
    (``(B, n_query, n_key)``) and how many heads were summed, or every selected head
    (``(B, heads, n_query, n_key)``) when capture was asked ``per_head=True``.
    """

    def __init__(self, layers: Sequence[AttentionLayer] = ()):
        self.layers = {layer.name: layer for layer in layers}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.per_head: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.sums or name in self.per_head

    def __len__(self) -> int:
        return len(set(self.sums) | set(self.per_head))

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.per_head.clear()

    def mean(self, name: str) -> torch.Tensor:
        """Head-mean probabilities of one layer, ``(B, n_query, n_key)``."""
        if name in self.per_head:
            return self.per_head[name].mean(1)
        if name not in self.sums:
            raise KeyError(f"layer {name!r} was not captured; captured: {self.names()}")
        return self.sums[name] / self.counts[name]

    def heads(self, name: str) -> torch.Tensor:
        """Per-head probabilities of one layer, ``(B, heads, n_query, n_key)``."""
        if name not in self.per_head:
            raise KeyError(f"layer {name!r} has no per-head maps; capture with per_head=True")
        return self.per_head[name]

    def names(self, kind: str | None = None) -> list[str]:
        out = [n for n in self.layers if n in self]
        return [n for n in out if kind is None or self.layers[n].kind == kind]

    def by_resolution(self, kind: str) -> dict[int, torch.Tensor]:
        """Mean over every captured head of every layer of ``kind``, per resolution ``r``.

        Returns ``{r: (B, r*r, n_key)}``. Layers with different head counts are weighted by the
        number of heads they contributed, so the result is the mean over all (layer, head) pairs.
        """
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for name in self.names(kind):
            if name in self.per_head:
                s, c = self.per_head[name].sum(1), self.per_head[name].shape[1]
            else:
                s, c = self.sums[name], self.counts[name]
            r = math.isqrt(s.shape[-2])
            sums[r] = s if r not in sums else sums[r] + s
            counts[r] = counts.get(r, 0) + c
        return {r: sums[r] / counts[r] for r in sorted(sums)}

    def record(self, name: str, probs: torch.Tensor, per_head: bool, accumulate: bool) -> None:
        """Store ``(B, heads, n_query, n_key)`` probabilities, per head or as their sum."""
        if per_head:
            value = probs
            if accumulate and name in self.per_head:
                value = self.per_head[name] + value
            self.per_head[name] = value
            return
        self.record_sum(name, probs.sum(1), probs.shape[1], accumulate)

    def record_sum(self, name: str, total: torch.Tensor, count: int, accumulate: bool) -> None:
        """Store the sum ``(B, n_query, n_key)`` of ``count`` heads' probabilities."""
        if accumulate and name in self.sums:
            total, count = self.sums[name] + total, self.counts[name] + count
        self.sums[name] = total
        self.counts[name] = count


def split_heads(attn, query, key, value, norm_q=..., norm_k=...):
    """``(B, n, heads * d)`` projections -> ``(B, heads, n, d)``, with the module's q/k norms (or
    the given ones) applied, as diffusers' processors do."""
    batch_size, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    norm_q = attn.norm_q if norm_q is ... else norm_q
    norm_k = attn.norm_k if norm_k is ... else norm_k
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


class CaptureProcessor:
    """An attention processor that computes the softmax explicitly and records it.

    Its output equals ``AttnProcessor2_0``'s (SDPA). Probabilities are computed in float32 for the
    chosen ``heads`` (all by default); the store receives their sum over heads unless
    ``per_head``. With ``keep_grad`` the stored maps stay in the autograd graph (for training
    losses on attention); otherwise they are detached.

    ``install_capture`` makes one per attention module with ``build`` and lets it ``attach``
    whatever else it needs on the denoiser; a family's own processor class overrides those two.
    """

    # float32 probabilities of all heads held at once at most; larger layers go one head at a time
    ALL_HEADS_BYTES = 64 * 2**20

    def __init__(
        self,
        store: AttentionStore,
        name: str,
        heads: Sequence[int] | None = None,
        per_head: bool = False,
        keep_grad: bool = False,
        accumulate: bool = False,
    ):
        self.store = store
        self.name = name
        self.heads = None if heads is None else list(heads)
        self.per_head = per_head
        self.keep_grad = keep_grad
        self.accumulate = accumulate

    @classmethod
    def build(cls, store: AttentionStore, layers: Sequence[AttentionLayer], heads: Mapping[str, Sequence[int] | None],
              original, **options) -> CaptureProcessor:
        """The processor recording ``layers`` (the maps of one attention module) into ``store``;
        ``heads`` maps each layer's name to its head indices (``None``: all), ``original`` is the
        processor it replaces, ``options`` are ``per_head``, ``keep_grad`` and ``accumulate``."""
        if len(layers) != 1 or layers[0].module:
            raise ValueError(f"{cls.__name__} records one whole attention module, not {[x.name for x in layers]}; "
                             "the maps of a split module are recorded by their family's processor (layer.processor)")
        return cls(store, layers[0].name, heads=heads.get(layers[0].name), **options)

    def attach(self, denoiser, target: str) -> list:
        """Anything the processor needs besides its place on ``target`` (e.g. a forward hook on the
        block around it), installed on ``denoiser``; returns handles with ``remove()``."""
        return []

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.keep_grad else x.detach()

    @staticmethod
    def _probs(attn, query, key, attention_mask):
        # fp32 scores and softmax: fp16 logits of 4096x4096 self-attention can overflow
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        return scores.softmax(dim=-1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = split_heads(attn, query, key, value)

        out = self._attend_and_record(attn, query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * value.shape[-1])
        out = attn.to_out[0](out.to(query.dtype))
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend_and_record(self, attn, query, key, value, attention_mask) -> torch.Tensor:
        """The attention output ``(B, heads, n, d)``; the chosen heads' probabilities go to the store."""
        if self.heads is not None and (max(self.heads) >= attn.heads or min(self.heads) < -attn.heads):
            raise ValueError(f"layer {self.name} has {attn.heads} heads; cannot select heads {self.heads}")
        if self.per_head:
            probs = self._probs(attn, query, key, attention_mask)
            out = probs.to(value.dtype) @ value
            if self.heads is not None:
                probs = probs[:, self.heads]
            self.store.record(self.name, self._keep(probs), True, self.accumulate)
            return out
        if query.shape[0] * attn.heads * query.shape[-2] * key.shape[-2] * 4 <= self.ALL_HEADS_BYTES:
            # small maps (every cross-attention layer): all heads in one product, fewer kernel launches
            probs = self._probs(attn, query, key, attention_mask)
            if self.heads is None:
                total, count = probs.sum(1), attn.heads
            else:  # slices, not an index tensor: no host-to-device copy (CUDA graphs forbid one)
                picked = sorted({h % attn.heads for h in self.heads})
                total, count = sum(probs[:, h] for h in picked), len(picked)
            self.store.record_sum(self.name, self._keep(total), count, self.accumulate)
            return probs.to(value.dtype) @ value
        # one head at a time: the (B, heads, n, n) probabilities of a 4096-pixel layer are never
        # held at once, only the running sum of the selected heads
        chosen = set(range(attn.heads)) if self.heads is None else {h % attn.heads for h in self.heads}
        outs, total = [], None
        for h in range(attn.heads):
            mask_h = None if attention_mask is None else attention_mask[:, h : h + 1]
            p = self._probs(attn, query[:, h : h + 1], key[:, h : h + 1], mask_h)
            outs.append(p.to(value.dtype) @ value[:, h : h + 1])
            if h in chosen:
                total = p[:, 0] if total is None else total + p[:, 0]
        self.store.record_sum(self.name, self._keep(total), len(chosen), self.accumulate)
        return torch.cat(outs, dim=1)


class SplitCaptureProcessor:
    """The recording half of a processor for one attention over image and text tokens at once:
    the image queries' attention, split by key.

    For the image-query rows only, the chosen heads' scores ``q k^T * scale`` are taken in float32
    over all keys; their softmax restricted to the text keys (the one softmax renormalised over
    the text keys, which is the same thing) is recorded under ``layers["cross"]``, and restricted
    to the image keys under ``layers["self"]``. ``layers`` maps a kind to the name the store keeps
    it under; a kind not in it is not computed. ``heads`` maps a kind to its head indices
    (``None``: all). ``per_head``, ``keep_grad`` and ``accumulate`` act as in
    ``CaptureProcessor``; large maps are computed one head at a time, keeping only running sums.

    A family's subclass computes the attention output as its own processor does (``__call__``)
    and hands the queries and keys to ``record``; ``text_first`` says whether the keys are
    ``[text; image]`` rather than ``[image; text]``. ``original`` is the processor replaced.
    """

    ALL_HEADS_BYTES = CaptureProcessor.ALL_HEADS_BYTES
    #: the keys are ``[text; image]`` (True) or ``[image; text]`` (False)
    text_first = False

    def __init__(
        self,
        store: AttentionStore,
        layers: Mapping[str, str],
        heads: Mapping[str, Sequence[int] | None] | None = None,
        per_head: bool = False,
        keep_grad: bool = False,
        accumulate: bool = False,
        original=None,
    ):
        unknown = set(layers) - set(KINDS)
        if unknown:
            raise ValueError(f"layers maps kinds {KINDS} to names, got kinds {sorted(unknown)}")
        self.store = store
        self.layers = dict(layers)
        heads = heads or {}
        self.heads = {kind: None if heads.get(kind) is None else list(heads[kind]) for kind in self.layers}
        self.per_head = per_head
        self.keep_grad = keep_grad
        self.accumulate = accumulate
        self.original = original

    @classmethod
    def build(cls, store: AttentionStore, layers: Sequence[AttentionLayer], heads: Mapping[str, Sequence[int] | None],
              original, **options) -> SplitCaptureProcessor:
        """As ``CaptureProcessor.build``: ``layers`` are the module's maps, at most one per kind."""
        kinds = [layer.kind for layer in layers]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"two {kinds[0]} maps of one attention module: {sorted(x.name for x in layers)}")
        return cls(store, {layer.kind: layer.name for layer in layers},
                   {layer.kind: heads.get(layer.name) for layer in layers}, original=original, **options)

    def attach(self, denoiser, target: str) -> list:
        """As ``CaptureProcessor.attach``."""
        return []

    def _chosen(self, kind: str, n_heads: int) -> list[int]:
        heads = self.heads[kind]
        if heads is None:
            return list(range(n_heads))
        if max(heads) >= n_heads or min(heads) < -n_heads:
            raise ValueError(f"layer {self.layers[kind]} has {n_heads} heads; cannot select heads {heads}")
        return sorted({h % n_heads for h in heads})

    def _parts(self, n_image: int, n_key: int) -> dict[str, slice]:
        n_text = n_key - n_image
        if self.text_first:
            return {"self": slice(n_text, n_key), "cross": slice(0, n_text)}
        return {"self": slice(0, n_image), "cross": slice(n_image, n_key)}

    def record(self, query, key, n_image: int, scale: float) -> None:
        """Record the image queries' probabilities over the image keys and over the text keys.

        ``query`` (image queries only) and ``key`` are ``(B, heads, n, head_dim)``; the keys are
        ``[image; text]``, or ``[text; image]`` with ``text_first``."""
        n_heads = query.shape[1]
        parts = self._parts(n_image, key.shape[2])
        kinds = [k for k in self.layers if k == "self" or key.shape[2] > n_image]  # no text keys: no cross map
        if not kinds:
            return
        chosen = {kind: self._chosen(kind, n_heads) for kind in kinds}

        def probs(q, k, kind):  # fp32 scores and softmax over one kind's keys
            scores = (q.float() @ k[:, :, parts[kind]].float().transpose(-1, -2)) * scale
            return scores.softmax(dim=-1)

        def keep(x):
            return x if self.keep_grad else x.detach()

        batch, n_query, n_key = query.shape[0], query.shape[2], key.shape[2]
        if self.per_head:
            for kind in kinds:  # the heads in the order asked, as CaptureProcessor keeps them
                heads = chosen[kind] if self.heads[kind] is None else [h % n_heads for h in self.heads[kind]]
                p = probs(query[:, heads], key[:, heads], kind)
                self.store.record(self.layers[kind], keep(p), True, self.accumulate)
        elif batch * n_heads * n_query * n_key * 4 <= self.ALL_HEADS_BYTES:
            # small maps: all heads in one product; slices, not an index tensor (CUDA graphs forbid
            # a host-to-device copy)
            for kind in kinds:
                p = probs(query, key, kind)
                total = sum(p[:, h] for h in chosen[kind])
                self.store.record_sum(self.layers[kind], keep(total), len(chosen[kind]), self.accumulate)
        else:
            # one head at a time: only the running sums of the chosen heads are held
            for kind in kinds:
                total = None
                for h in chosen[kind]:
                    p = probs(query[:, h : h + 1], key[:, h : h + 1], kind)[:, 0]
                    total = p if total is None else total + p
                self.store.record_sum(self.layers[kind], keep(total), len(chosen[kind]), self.accumulate)


def _resolve(module, layers: Sequence[AttentionLayer | str], known: set[str]) -> list[AttentionLayer]:
    """``layers`` as ``AttentionLayer``s: a name is looked up in the denoiser's table (kind, level,
    heads and processor come from it); a ``ValueError`` names one that is not there."""
    by_name = {}
    if any(isinstance(layer, str) for layer in layers):
        by_name = {layer.name: layer for layer in attention_layers(module)}
    chosen = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in by_name:
                raise ValueError(f"{layer!r} is not an attention layer of this {type(module).__name__}")
            layer = by_name[layer]
        elif layer.target not in known:
            raise ValueError(f"{layer.target!r} is not an attention layer of this {type(module).__name__}")
        chosen.append(layer)
    return chosen


def install_capture(
    module,
    layers: Iterable[AttentionLayer | str],
    heads: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    **options,
):
    """Put a recording processor on each attention module of ``module`` (a denoiser with
    diffusers' ``attn_processors``/``set_attn_processor``) that ``layers`` name: one processor per
    module, of the layers' ``processor`` class (``CaptureProcessor`` by default), serving every
    map of that module (e.g. its ":text" and ":image" maps together), plus whatever it
    ``attach``-es; returns ``(store, restore)``, where ``restore()`` puts the module's own
    processors back and removes what was attached. ``options`` go to every processor
    (``per_head``, ``keep_grad``, ``accumulate``). ``capture_attention`` is the scoped form."""
    original = module.attn_processors
    chosen = _resolve(module, list(layers), {key.removesuffix(".processor") for key in original})
    store = AttentionStore(chosen)
    groups: dict[str, list[AttentionLayer]] = {}
    for layer in chosen:
        groups.setdefault(layer.target, []).append(layer)
    names = {layer.name for layer in chosen}
    head_map = {name: heads.get(name) for name in names} if isinstance(heads, Mapping) else dict.fromkeys(names, heads)
    processors = {}
    for target, group in groups.items():
        kinds = {layer.processor or CaptureProcessor for layer in group}
        if len(kinds) != 1:
            raise ValueError(f"the maps of {target!r} name different processors: {sorted(k.__name__ for k in kinds)}")
        processors[target] = kinds.pop().build(store, group, head_map, original[target + ".processor"], **options)
    module.set_attn_processor({**original, **{t + ".processor": p for t, p in processors.items()}})
    handles = []

    def restore():  # set_attn_processor empties the dict it is given: a copy each time
        for handle in handles:
            handle.remove()
        module.set_attn_processor(dict(original))

    try:
        handles.extend(handle for target, processor in processors.items() for handle in processor.attach(module, target))
    except BaseException:
        restore()
        raise
    return store, restore


@contextmanager
def capture_attention(
    denoiser,
    layers: Iterable[AttentionLayer | str],
    heads: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    per_head: bool = False,
    keep_grad: bool = False,
    accumulate: bool = False,
):
    """Capture attention probabilities of ``layers`` while the block runs; yields an ``AttentionStore``.

    ``heads`` is ``None`` (all heads), one list of head indices for every layer, or a mapping
    from layer name to its list. ``accumulate`` sums over several forward passes (e.g. the steps
    of a generation) instead of keeping the last one. The denoiser's original processors are back
    in place when the block ends, whether it ends normally or with an exception.
    """
    store, restore = install_capture(denoiser, list(layers), heads, per_head=per_head, keep_grad=keep_grad,
                                     accumulate=accumulate)
    try:
        yield store
    finally:
        restore()
