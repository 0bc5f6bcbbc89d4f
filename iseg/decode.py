"""From observations to masks (method document §4 to §6), with no pipeline: KL clustering,
Cat-Cross class maps, Ent-Self, iterative refinement and the background rule.

    results = decode(observations)                 # each with the settings it was made with
    results = decode(observations, lam=1.0)        # or with post-forward settings changed
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from . import reference as REF
from . import refine as R
from .images import to_original
from .masks import maps_to_labels, minmax
from .numerics import check_finite
from .presets import FORWARD_FIELDS, Settings, make_settings
from .results import Observation, SegmentationResult

__all__ = ["decode", "DECODE_BYTES"]

# self-attention matrices refined together at most (bytes of float32), so that a batch of
# 4096-pixel maps does not multiply the memory the refinement needs
DECODE_BYTES = 512 * 2**20


def decode(observations: Sequence[Observation], **overrides) -> list[SegmentationResult]:
    """One ``SegmentationResult`` per observation. Observations that share settings, class count,
    attention grid and image geometry are refined as one batch, with one copy to the host per
    batch. ``overrides`` change settings that act after the forward pass (``DECODE_FIELDS``, and
    ``cross_weights`` among the captured resolutions)."""
    groups: dict[tuple, list[int]] = {}
    settings: dict[Settings, Settings] = {}
    for i, obs in enumerate(observations):
        if obs.settings not in settings:
            settings[obs.settings] = _decode_settings(obs.settings, overrides)
        groups.setdefault((settings[obs.settings], len(obs.prompt.classes), obs.grid, obs.geometry, obs.size), []).append(i)
    results: list[SegmentationResult | None] = [None] * len(observations)
    for (s, _, grid, _, _), members in groups.items():
        chunk = max(1, DECODE_BYTES // (4 * grid**4))
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            for i, result in zip(part, _decode_group([observations[i] for i in part], s)):
                results[i] = result
    return results


def _decode_settings(made: Settings, overrides: dict) -> Settings:
    """``made`` with the overrides; a setting that acts before decoding may only repeat the value
    the observation was made with (a new value would need a new forward pass)."""
    if not overrides:
        return made
    s = make_settings(None, base=made, **overrides)
    changed = [f for f in FORWARD_FIELDS if f != "cross_weights" and getattr(s, f) != getattr(made, f)]
    if changed:
        raise ValueError(f"{', '.join(changed)} act(s) before decoding: the observations were made with "
                         f"{', '.join(f'{f}={getattr(made, f)!r}' for f in changed)}; run observe (or segment) "
                         "again with the new value(s)")
    return s


def check_refinement(x, attn_self: Sequence[torch.Tensor], P, steps, s: Settings) -> None:
    """``NonFiniteError`` naming the first stage of §4-§5 with NaN or infinity (one synchronisation)."""
    check_finite([
        ("the class evidence X (cross-attention mixed by cross_weights, clustered)", x,
         f"the captured cross-attention and the setting cross_weights ({_weights_text(s)})"),
        *(("the self-attention", a, "the denoiser's weights and dtype") for a in attn_self),
        ("the Ent-Self matrix P", P, f"the settings lam ({s.lam}) and clamp_max ({s.clamp_max})"),
        ("the refined class maps", steps, f"the settings lam ({s.lam}), clamp_max ({s.clamp_max}) "
         f"and iterations ({s.iterations})"),
    ])


def _weights_text(s: Settings) -> str:
    return "the family's default" if s.cross_weights is None else repr(dict(s.cross_weights))


def _decode_group(group: list[Observation], s: Settings) -> list[SegmentationResult]:
    t0 = time.perf_counter()
    first = group[0]
    # Settings refuses cross_weights that are all 0, so at least one resolution is left
    weights = first.weights if s.cross_weights is None else {int(r): float(w) for r, w in s.cross_weights.items() if w}
    grid, classes, count = first.grid, len(first.prompt.classes), len(group)
    cross = {r: torch.stack([o.cross[r] for o in group]) for r in weights if r in first.cross}
    attn_self = torch.stack([o.self_attention for o in group])
    if s.reference in REF.DATASET_KINDS:
        # the authors' float16 pipeline: maps, mixing, clustering and class maps in float16
        x = REF.mix_half(cross, weights, grid)
        if s.clustering:
            x = REF.kl_cluster_half(x, rounds=s.cluster_rounds)
        m = torch.stack([REF.class_maps_half(x[b], o.prompt.spans) for b, o in enumerate(group)])
        attn_self = attn_self.half().float()  # stored in float16, refined in float32
    else:
        x = R.aggregate_cross_attention(cross, weights, grid)  # (B, n, T)
        if s.clustering:
            x = R.kl_cluster(x, rounds=s.cluster_rounds)
        m = torch.stack([R.class_maps(x[b], o.prompt.spans) for b, o in enumerate(group)])  # (B, n, C)
    P = R.entropy_reduce(attn_self, s.lam, s.clamp_max)
    steps = R.refine(m, P, s.iterations)  # (B, N+1, n, C)
    check_refinement(x, [o.self_attention for o in group], P, steps, s)
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
            names=obs.prompt.names,
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
