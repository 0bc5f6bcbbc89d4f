"""Step 3 of the method: capture attention probabilities through diffusers' processor API.

``capture_attention(unet, layers)`` installs a ``CaptureProcessor`` on the chosen layers (every
other layer keeps its own processor, normally SDPA), yields an ``AttentionStore`` that fills up
during the forward pass, and restores the original processors on exit, also after an error::

    layers = select_layers(unet, "cross", resolutions=[16, 32], latent_side=64)
    with capture_attention(unet, layers) as store:
        unet(z_t, t, encoder_hidden_states=E)
    maps = store.by_resolution("cross")   # {16: (B, 256, 77), 32: (B, 1024, 77)}

An MM-DiT (SD3) has no separate cross- and self-attention: each joint attention module attends
from image and text tokens to both at once. ``joint_attention_layers`` names two maps per module,
``<module>:text`` (cross) and ``<module>:image`` (self), and one ``JointCaptureProcessor`` on the
module records both, each renormalised over its own keys. FLUX's transformer has joint
(double-stream) blocks and single-stream blocks whose one sequence is ``[text; image]``;
``flux_attention_layers`` names the same two maps for both, and ``FluxCaptureProcessor`` records
them with the rotary embedding applied as diffusers applies it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "AttentionLayer",
    "AttentionStore",
    "CaptureProcessor",
    "JointCaptureProcessor",
    "FluxCaptureProcessor",
    "attention_layers",
    "joint_attention_layers",
    "flux_attention_layers",
    "select_layers",
    "pick_layers",
    "capture_attention",
    "install_capture",
]

KINDS = ("self", "cross")


@dataclass(frozen=True)
class AttentionLayer:
    """One attention map of a denoiser. On a UNet, one attention module, named as in
    ``unet.attn_processors`` without ``.processor``; a joint (MM-DiT) attention module gives two
    maps, ``<module>:text`` (image queries to text keys, kind "cross") and ``<module>:image``
    (image queries to image keys, kind "self"), both with ``module`` set to the module's name."""

    name: str
    kind: str  # "self" or "cross"
    level: int  # downsampling steps below the latent: resolution = latent_side / 2**level
    heads: int
    module: str = ""  # the attention module's name where it differs from ``name``; "" means ``name``

    def resolution(self, latent_side: int) -> int:
        return math.ceil(latent_side / 2**self.level)

    @property
    def target(self) -> str:
        """The name of the attention module whose processor captures this layer."""
        return self.module or self.name


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def attention_layers(unet) -> list[AttentionLayer]:
    """Every attention layer of a ``UNet2DConditionModel``, in forward order of its processor dict."""
    n_down = len(unet.down_blocks)
    n_up = len(unet.up_blocks)
    modules = dict(unet.named_modules())
    layers = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        module = modules[name]
        m = _BLOCK.match(name)
        if m is None:
            continue
        if m.group(3):
            level = n_down - 1
        elif m.group(1) == "down_blocks":
            level = int(m.group(2))
        else:
            level = n_up - 1 - int(m.group(2))
        kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        layers.append(AttentionLayer(name=name, kind=kind, level=level, heads=int(module.heads)))
    return layers


def joint_attention_layers(transformer) -> list[AttentionLayer]:
    """The two maps of every joint attention module of an MM-DiT (``SD3Transformer2DModel``):
    ``transformer_blocks.{i}.attn:text`` (cross) and ``transformer_blocks.{i}.attn:image`` (self).

    All sit on the patch grid, ``level = log2(patch_size)`` below the latent. Image-only attention
    modules (SD 3.5's ``attn2``) are not listed."""
    patch = int(transformer.config.patch_size)
    level = round(math.log2(patch))
    if 2**level != patch:
        raise ValueError(f"patch_size {patch} is not a power of two; the layer level cannot express it")
    modules = dict(transformer.named_modules())
    layers = []
    for key in transformer.attn_processors:
        name = key.removesuffix(".processor")
        module = modules[name]
        if not name.startswith("transformer_blocks.") or getattr(module, "add_k_proj", None) is None:
            continue
        heads = int(module.heads)
        layers.append(AttentionLayer(name=name + ":text", kind="cross", level=level, heads=heads, module=name))
        layers.append(AttentionLayer(name=name + ":image", kind="self", level=level, heads=heads, module=name))
    return layers


def flux_attention_layers(transformer) -> list[AttentionLayer]:
    """The two maps of every attention module of a ``FluxTransformer2DModel``: for each double-stream
    block ``transformer_blocks.{i}.attn:text`` (cross) and ``...:image`` (self), then the same for
    each single-stream block ``single_transformer_blocks.{i}.attn``.

    All sit on the grid of packed 2x2 latent patches (``FluxPipeline._pack_latents``), level 1
    below the latent: the transformer's own ``patch_size`` is 1, the packing is done outside it."""
    modules = dict(transformer.named_modules())
    layers = []
    for key in transformer.attn_processors:
        name = key.removesuffix(".processor")
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        heads = int(modules[name].heads)
        layers.append(AttentionLayer(name=name + ":text", kind="cross", level=1, heads=heads, module=name))
        layers.append(AttentionLayer(name=name + ":image", kind="self", level=1, heads=heads, module=name))
    return layers


def _matches(layer: AttentionLayer, prefix: str) -> bool:
    return any(layer.name == prefix or layer.name.startswith(prefix + sep) for sep in ".:")


def select_layers(
    unet,
    kind: str,
    resolutions: Iterable[int] | None = None,
    latent_side: int | None = None,
    names: Sequence[str] | None = None,
) -> list[AttentionLayer]:
    """Choose layers of a UNet by kind and latent resolution, or by name (prefixes allowed).

    ``resolutions`` needs ``latent_side`` (the side of the latent the UNet will see).
    ``names`` may be full layer names or prefixes such as ``"up_blocks.3.attentions.1"``.
    """
    return pick_layers(attention_layers(unet), kind, resolutions, latent_side, names)


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
                known = sorted({layer.name.split(".transformer_blocks")[0] for layer in layers})
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
            raise KeyError(f"layer {name!r} was not captured; captured: {sorted(self)}")
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


class CaptureProcessor:
    """An attention processor that computes the softmax explicitly and records it.

    Its output equals ``AttnProcessor2_0``'s (SDPA). Probabilities are computed in float32 for the
    chosen ``heads`` (all by default); the store receives their sum over heads unless
    ``per_head``. With ``keep_grad`` the stored maps stay in the autograd graph (for training
    losses on attention); otherwise they are detached.
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

        query, key, value = _split_heads(attn, query, key, value)

        if self.heads is not None and (max(self.heads) >= attn.heads or min(self.heads) < -attn.heads):
            raise ValueError(f"layer {self.name} has {attn.heads} heads; cannot select heads {self.heads}")
        if self.per_head:
            probs = self._probs(attn, query, key, attention_mask)
            out = probs.to(value.dtype) @ value
            if self.heads is not None:
                probs = probs[:, self.heads]
            self.store.record(self.name, probs if self.keep_grad else probs.detach(), True, self.accumulate)
        elif batch_size * attn.heads * query.shape[-2] * key.shape[-2] * 4 <= self.ALL_HEADS_BYTES:
            # small maps (every cross-attention layer): all heads in one product, fewer kernel launches
            probs = self._probs(attn, query, key, attention_mask)
            out = probs.to(value.dtype) @ value
            if self.heads is None:
                total, count = probs.sum(1), attn.heads
            else:  # slices, not an index tensor: no host-to-device copy (CUDA graphs forbid one)
                picked = sorted({h % attn.heads for h in self.heads})
                total, count = sum(probs[:, h] for h in picked), len(picked)
            self.store.record_sum(self.name, total if self.keep_grad else total.detach(), count, self.accumulate)
        else:
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
            out = torch.cat(outs, dim=1)
            self.store.record_sum(self.name, total if self.keep_grad else total.detach(), len(chosen), self.accumulate)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * value.shape[-1])

        out = attn.to_out[0](out.to(query.dtype))
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointCaptureProcessor:
    """A joint (MM-DiT) attention processor that returns what ``JointAttnProcessor2_0`` returns
    and records the image queries' attention, split by key.

    The output is computed on the same SDPA path as diffusers' processor. For the image-query rows
    only, the chosen heads' scores ``q k^T * scale`` are taken in float32 over the keys
    ``[image; text]``; their softmax restricted to the text keys (the joint softmax renormalised
    over the text keys, which is the same thing) is recorded under ``layers["cross"]``, and
    restricted to the image keys under ``layers["self"]``. ``layers`` maps a kind to the name the
    store keeps it under; a kind not in it is not computed. ``heads`` maps a kind to its head
    indices (``None``: all). ``per_head``, ``keep_grad`` and ``accumulate`` act as in
    ``CaptureProcessor``; large maps are computed one head at a time, keeping only running sums.
    """

    ALL_HEADS_BYTES = CaptureProcessor.ALL_HEADS_BYTES

    def __init__(
        self,
        store: AttentionStore,
        layers: Mapping[str, str],
        heads: Mapping[str, Sequence[int] | None] | None = None,
        per_head: bool = False,
        keep_grad: bool = False,
        accumulate: bool = False,
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

    def _chosen(self, kind: str, n_heads: int) -> list[int]:
        heads = self.heads[kind]
        if heads is None:
            return list(range(n_heads))
        if max(heads) >= n_heads or min(heads) < -n_heads:
            raise ValueError(f"layer {self.layers[kind]} has {n_heads} heads; cannot select heads {heads}")
        return sorted({h % n_heads for h in heads})

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = _split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                         attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            q_text, k_text, v_text = _split_heads(
                attn, attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states), attn.norm_added_q, attn.norm_added_k)
            n_image = query.shape[2]
            query = torch.cat([query, q_text], dim=2)
            key = torch.cat([key, k_text], dim=2)
            value = torch.cat([value, v_text], dim=2)
        else:
            n_image = query.shape[2]

        self._record(attn, query[:, :, :n_image], key, n_image)

        hidden_states = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * value.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1] :]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _record(self, attn, query, key, n_image: int, text_first: bool = False, scale: float | None = None) -> None:
        """Record the image queries' probabilities over the image keys and over the text keys.

        ``query`` and ``key`` are ``(B, heads, n, head_dim)``; the keys are ``[image; text]``, or
        ``[text; image]`` with ``text_first``. ``scale`` defaults to ``attn.scale``."""
        n_heads = query.shape[1]
        scale = attn.scale if scale is None else scale
        n_text = key.shape[2] - n_image
        if text_first:
            parts = {"self": slice(n_text, key.shape[2]), "cross": slice(0, n_text)}
        else:
            parts = {"self": slice(0, n_image), "cross": slice(n_image, key.shape[2])}
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


class FluxCaptureProcessor(JointCaptureProcessor):
    """An attention processor for FLUX's ``FluxAttention`` that returns what diffusers'
    ``FluxAttnProcessor`` returns and records the image queries' attention, split by key.

    The output runs diffusers' own code path: the same projections (``_get_qkv_projections``),
    RMS norms, rotary embedding (``apply_rotary_emb``) and ``dispatch_attention_fn`` with the
    replaced processor's attention backend. In a double-stream block the joint sequence is
    ``[text; image]`` (the text tokens first, unlike SD3); in a single-stream block the module gets
    that sequence already joined, with no separate context, so the text length comes from
    ``text_length``, which a forward pre-hook on the block sets from its ``encoder_hidden_states``
    (``install_capture`` registers it). The probabilities are taken from the rotated queries and
    keys, in float32, with the scale ``head_dim ** -0.5`` that the attention uses; the recording
    is ``JointCaptureProcessor``'s (``layers``, ``heads``, ``per_head``, ``keep_grad``, ``accumulate``).
    An ``attention_mask`` (``FluxPipeline`` passes none) reaches the output, not the recorded maps,
    as with ``JointCaptureProcessor``."""

    def __init__(self, store: AttentionStore, layers: Mapping[str, str],
                 heads: Mapping[str, Sequence[int] | None] | None = None, original=None, **options):
        super().__init__(store, layers, heads, **options)
        self.text_length: int | None = None
        # the attention backend of the processor this one replaces, so the output is computed alike
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
        elif self.text_length is not None:
            n_text = self.text_length
        else:
            raise RuntimeError(f"{sorted(self.layers.values())}: a single-stream FLUX attention module needs the "
                               "text length; install the processor with install_capture (or set text_length)")
        # (B, n, heads, head_dim) -> (B, heads, n, head_dim); image queries only
        n_image = query.shape[1] - n_text
        self._record(attn, query[:, n_text:].transpose(1, 2), key.transpose(1, 2), n_image, text_first=True,
                     scale=query.shape[-1] ** -0.5)

        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _is_flux_attention(module) -> bool:
    return any(cls.__name__ == "FluxAttention" for cls in type(module).__mro__)


def _text_length_hook(processor: FluxCaptureProcessor):
    """A forward pre-hook for a FLUX single-stream block: its ``encoder_hidden_states`` (keyword,
    or second positional argument under gradient checkpointing) give the text length."""

    def hook(block, args, kwargs):
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        processor.text_length = None if context is None else int(context.shape[1])

    return hook


def install_capture(
    module,
    layers: Iterable[AttentionLayer | str],
    heads: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    **options,
):
    """Put a ``CaptureProcessor`` on each of ``layers`` of ``module`` (a denoiser with diffusers'
    ``attn_processors``/``set_attn_processor``), or one ``JointCaptureProcessor`` on each joint
    attention module that the layers name (``AttentionLayer.module``), serving its ":text" and
    ":image" maps together (a ``FluxCaptureProcessor`` on FLUX's attention modules, with a hook on
    each single-stream block that tells it the text length); returns ``(store, restore)``, where
    ``restore()`` puts the module's own processors back and removes those hooks. ``options`` go to every processor (``per_head``, ``keep_grad``,
    ``accumulate``). ``capture_attention`` is the scoped form."""
    layers = list(layers)  # a generator would be used up by the checks below
    original = module.attn_processors
    known = {key.removesuffix(".processor") for key in original}
    # layers given by name are looked up in the module's table (kind, level and heads come from it)
    by_name = {}
    if any(isinstance(layer, str) for layer in layers):
        if hasattr(module, "single_transformer_blocks"):
            by_name = {layer.name: layer for layer in flux_attention_layers(module)}
        elif hasattr(module, "down_blocks"):
            by_name = {layer.name: layer for layer in attention_layers(module)}
        elif hasattr(module, "transformer_blocks"):
            by_name = {layer.name: layer for layer in joint_attention_layers(module)}
    chosen = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in by_name:
                raise ValueError(f"{layer!r} is not an attention layer of this {type(module).__name__}")
            layer = by_name[layer]
        elif layer.target not in known:
            raise ValueError(f"{layer.target!r} is not an attention layer of this {type(module).__name__}")
        chosen.append(layer)
    store = AttentionStore(chosen)
    # one processor per attention module: a joint module serves its ":text" and ":image" maps at once
    groups: dict[str, dict[str, AttentionLayer]] = {}
    for layer in chosen:
        groups.setdefault(layer.target, {})[layer.name] = layer
    replaced = dict(original)

    def heads_of(layer):
        return heads.get(layer.name) if isinstance(heads, Mapping) else heads

    modules = dict(module.named_modules()) if any(layer.module for layer in chosen) else {}
    single_stream = []  # (block, processor): a text-length hook each, once the processors are in place
    for target, group in groups.items():
        if any(layer.module for layer in group.values()):
            kinds = [layer.kind for layer in group.values()]
            if len(set(kinds)) != len(kinds):
                raise ValueError(f"two {kinds[0]} maps of one joint attention module {target!r}: {sorted(group)}")
            names = {layer.kind: layer.name for layer in group.values()}
            chosen_heads = {layer.kind: heads_of(layer) for layer in group.values()}
            attn = modules.get(target)
            if attn is not None and _is_flux_attention(attn):
                processor = FluxCaptureProcessor(store, names, chosen_heads, original=original[target + ".processor"],
                                                 **options)
                if getattr(attn, "added_kv_proj_dim", None) is None:  # single-stream: the block knows the text
                    single_stream.append((modules[target.rpartition(".")[0]], processor))
            else:
                processor = JointCaptureProcessor(store, names, chosen_heads, **options)
        else:
            (layer,) = group.values()
            processor = CaptureProcessor(store, layer.name, heads=heads_of(layer), **options)
        replaced[target + ".processor"] = processor
    module.set_attn_processor(replaced)
    hooks = [block.register_forward_pre_hook(_text_length_hook(processor), with_kwargs=True)
             for block, processor in single_stream]

    def restore():
        for hook in hooks:
            hook.remove()
        module.set_attn_processor(original)

    return store, restore


def _split_heads(attn, query, key, value, norm_q=..., norm_k=...):
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


@contextmanager
def capture_attention(
    unet,
    layers: Iterable[AttentionLayer | str],
    heads: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    per_head: bool = False,
    keep_grad: bool = False,
    accumulate: bool = False,
):
    """Capture attention probabilities of ``layers`` while the block runs; yields an ``AttentionStore``.

    ``heads`` is ``None`` (all heads), one list of head indices for every layer, or a mapping
    from layer name to its list. ``accumulate`` sums over several forward passes (e.g. the steps
    of a generation) instead of keeping the last one. The UNet's original processors are back
    in place when the block ends, whether it ends normally or with an exception.
    """
    store, restore = install_capture(unet, list(layers), heads, per_head=per_head, keep_grad=keep_grad,
                                     accumulate=accumulate)
    try:
        yield store
    finally:
        restore()
