"""Which attention layers and heads the settings read (method document §3), as a typed plan.

    plan = make_plan(backbone, latent_side=64, settings=s)
    plan.weights          # {r: w} resolution weights of the cross-attention
    plan.cross            # {r: (AttentionLayer, ...)} cross-attention layers per resolution
    plan.self_layers      # self-attention layers at plan.self_resolution
    plan.heads            # {layer name: head indices}; layers not named: every head
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from .backbones import Backbone
from .capture import AttentionLayer, pick_layers
from .presets import FrozenMap, Settings

__all__ = ["LayerPlan", "make_plan"]


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
        names = backbone.reference_layers("cross", level)
        if s.reference == "interactive" and names:
            # ... and only from its up_blocks.2 layers (where the family has them)
            names = [n for n in names if n.startswith("up_blocks.2.")] or names
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
            except ValueError:  # not an SD-shaped UNet: every self-attention layer at that resolution
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
