"""Every knob of the method with its reference default, and the named presets of method.md.

``Settings`` is the single source of the defaults; a preset is a set of overrides on it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from .prompts import COCO_BACKGROUND, VOC_BACKGROUND

__all__ = ["Settings", "PRESETS", "register_preset", "make_settings", "parse_overrides"]


@dataclass(frozen=True)
class Settings:
    """The knobs of iSeg (method.md). Defaults are the reference protocol's."""

    # §1 the noisy forward pass
    image_size: int | None = None  # None: the model's native size (512 for SD 2.1-base)
    aspect: str = "stretch"  # "stretch" (reference) or "pad" (pad to square, mapped back exactly)
    timestep: int = 100
    seed: int = 1101
    # §2 prompt and Cat-Cross
    gamma: float = 1.6
    prompt_prefix: str = "a photograph of"
    prompt_joiner: str = " and "
    extra_words: tuple[str, ...] = ("other object", "background")
    background_words: tuple[str, ...] = VOC_BACKGROUND
    # §3 which attention to read
    cross_weights: Mapping[int, float] | None = None  # {r: weight}; None: {latent/4: 0.7, latent/2: 0.3}
    cross_layers: str | tuple[str, ...] = "auto"  # "auto" (reference layers where they exist), "all", or names
    cross_heads: str | Mapping[int, tuple[int, ...]] | None = None  # None: all; "reference-voc"; {r: positions}
    self_resolution: int | None = None  # None: the latent side
    self_layers: str | tuple[str, ...] = "auto"
    self_heads: str | tuple[int, ...] | None = None  # None: all; "reference" = heads (1, 2) on SD 2.x
    # §4 initial maps
    clustering: bool = True
    cluster_rounds: int = 20
    # §5 Ent-Self and refinement
    lam: float = 0.015
    iterations: int = 10
    clamp_max: float | None = None
    # §6 labels
    background: str = "power"  # "power" (VOC, Context) or "threshold" (COCO)
    bg_power: float = 2.0
    threshold: float = 0.45
    # execution
    batch_size: int = 4
    return_self_attention: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["cross_weights"] is not None:
            d["cross_weights"] = {str(k): v for k, v in d["cross_weights"].items()}
        if isinstance(d["cross_heads"], Mapping):
            d["cross_heads"] = {str(k): list(v) for k, v in d["cross_heads"].items()}
        return d


_REFERENCE_DATASET = dict(clustering=True, self_heads="reference")

PRESETS: dict[str, dict] = {
    "wsss-voc": dict(_REFERENCE_DATASET, iterations=10, lam=0.015, background="power",
                     background_words=VOC_BACKGROUND, cross_heads="reference-voc"),
    "wsss-coco": dict(_REFERENCE_DATASET, iterations=10, lam=0.1, background="threshold", threshold=0.45,
                      background_words=COCO_BACKGROUND),
    "ovs-voc": dict(_REFERENCE_DATASET, iterations=8, lam=0.015, background="power",
                    background_words=VOC_BACKGROUND, cross_heads="reference-voc"),
    "ovs-context": dict(_REFERENCE_DATASET, iterations=5, lam=0.002, background="power", background_words=()),
    "ovs-coco": dict(_REFERENCE_DATASET, iterations=10, lam=0.2, background="threshold", threshold=0.45,
                     background_words=COCO_BACKGROUND),
    "interactive": dict(iterations=50, lam=0.1, clustering=False, clamp_max=1.0, threshold=0.5),
}

_FIELDS = {f.name for f in fields(Settings)}
_TUPLE_FIELDS = ("extra_words", "background_words")


def register_preset(name: str, **settings) -> None:
    """Add (or replace) a named preset; used by models that ship their own defaults."""
    _check_names(settings)
    PRESETS[name] = dict(settings)


def _check_names(options: Mapping) -> None:
    unknown = [k for k in options if k not in _FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(_FIELDS), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown option(s) {', '.join(hints)}; valid options: {sorted(_FIELDS)}")


def make_settings(preset: str | None = None, base: Settings | None = None, **overrides) -> Settings:
    """Settings from a preset name plus overrides, with every value checked."""
    settings = base or Settings()
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(str(preset), sorted(PRESETS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown preset {preset!r}{hint}; presets: {sorted(PRESETS)}")
        settings = replace(settings, **PRESETS[preset])
    _check_names(overrides)
    for key in _TUPLE_FIELDS:
        if key in overrides and overrides[key] is not None:
            if isinstance(overrides[key], str):
                raise TypeError(f"{key} must be a list of words, not one string {overrides[key]!r}")
            overrides[key] = tuple(overrides[key])
    settings = replace(settings, **overrides)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    need(s.aspect in ("stretch", "pad"), f"aspect must be 'stretch' or 'pad', got {s.aspect!r}")
    need(s.background in ("power", "threshold"), f"background must be 'power' or 'threshold', got {s.background!r}")
    need(isinstance(s.iterations, int) and s.iterations >= 0, f"iterations must be an integer >= 0, got {s.iterations!r}")
    need(s.lam >= 0, f"lam must be >= 0, got {s.lam}")
    need(s.gamma > 0, f"gamma must be > 0, got {s.gamma}")
    need(0 <= s.timestep < 1000, f"timestep must be in [0, 1000), got {s.timestep}")
    need(isinstance(s.batch_size, int) and s.batch_size >= 1, f"batch_size must be an integer >= 1, got {s.batch_size!r}")
    need(0 < s.threshold < 1, f"threshold must be in (0, 1), got {s.threshold}")
    need(s.bg_power > 0, f"bg_power must be > 0, got {s.bg_power}")
    need(s.cluster_rounds >= 1, f"cluster_rounds must be >= 1, got {s.cluster_rounds}")
    if s.image_size is not None:
        need(isinstance(s.image_size, int) and s.image_size >= 8, f"image_size must be an integer >= 8, got {s.image_size!r}")
    if s.cross_weights is not None:
        need(len(s.cross_weights) > 0 and all(w >= 0 for w in s.cross_weights.values()),
             f"cross_weights must map resolutions to non-negative weights, got {s.cross_weights!r}")
    if isinstance(s.cross_layers, str):
        need(s.cross_layers in ("auto", "all"), f"cross_layers must be 'auto', 'all' or a list of names, got {s.cross_layers!r}")
    if isinstance(s.self_layers, str):
        need(s.self_layers in ("auto", "all"), f"self_layers must be 'auto', 'all' or a list of names, got {s.self_layers!r}")
    if isinstance(s.cross_heads, str):
        need(s.cross_heads == "reference-voc", f"cross_heads must be None, 'reference-voc' or {{r: positions}}, got {s.cross_heads!r}")
    if isinstance(s.self_heads, str):
        need(s.self_heads == "reference", f"self_heads must be None, 'reference' or a list of heads, got {s.self_heads!r}")


def parse_overrides(items) -> dict:
    """``["lam=0.1", "cross_weights={\"16\": 1}"]`` (command-line ``--set``) -> setting overrides.

    Values are read as JSON where they parse, else kept as strings; lists become tuples and the
    keys of ``cross_weights`` become integer resolutions.
    """
    import json

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    if isinstance(out.get("cross_weights"), dict):
        out["cross_weights"] = {int(k): float(v) for k, v in out["cross_weights"].items()}
    for key, value in out.items():
        if isinstance(value, list):
            out[key] = tuple(value)
    return out
