"""Every knob of the method with its reference default, and the named presets of method.md.

``Settings`` is the single source of the defaults; a preset is a set of overrides on it.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace

from . import registry
from .images import ASPECT_MODES
from .masks import BACKGROUND_RULES
from .prompts import COCO_BACKGROUND, VOC_BACKGROUND
from .reference import DATASET_KINDS, REFERENCE_KINDS

__all__ = ["Settings", "SettingsError", "FrozenMap", "PRESETS", "register_preset", "make_settings", "find_preset",
           "preset_names", "parse_overrides"]


def _freeze(value):
    """Lists and sets as tuples and maps as ``FrozenMap``, at any depth; other values as they are."""
    if isinstance(value, FrozenMap):
        return value
    if isinstance(value, Mapping):
        return FrozenMap((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        items = tuple(_freeze(v) for v in value)
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(items, value)) else items
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value, key=repr))
    return value


class FrozenMap(Mapping):
    """A read-only, hashable mapping: what ``Settings`` holds where a field is a map, so that
    settings can key caches and group observations (a ``dict`` would make them unhashable)."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self):
        return FrozenMap, (self._items,)


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
    cross_weights: Mapping[int, float] | None = None  # {r: weight}; None: the family's default ({latent/4: 0.7, latent/2: 0.3} on UNets)
    cross_layers: str | tuple[str, ...] = "auto"  # "auto" (reference layers where they exist), "all", or names
    cross_heads: str | Mapping[int, tuple[int, ...]] | None = None  # None: all; "reference-voc"; {r: positions}
    self_resolution: int | None = None  # None: the latent side
    self_layers: str | tuple[str, ...] = "auto"
    self_heads: str | tuple[int, ...] | None = None  # None: all; "reference" = heads (1, 2) on SD 2.x
    # None: the self-attention comes from the same pass as the cross-attention (the method as
    # written). A side: a second pass over the image resized to it gives the self-attention, on a
    # finer grid where the model's own grid is coarse (the shapes MM-DiT's 16x16 tokens)
    self_image_size: int | None = None
    # None: the method as docs/method.md writes it. One of iseg.reference.REFERENCE_KINDS: what the
    # authors' code computes for that run (their words, order, prompt text and token positions,
    # float16, their interactive rules); set by the ``*-reference`` presets
    reference: str | None = None
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

    def __post_init__(self):
        # every value is checked and normalised however Settings is made (directly, replace(),
        # make_settings), and maps and lists are frozen: Settings is hashable
        for f in fields(self):
            value = getattr(self, f.name)
            rule = _RULES.get(f.name)
            checked = _freeze(rule(value) if rule is not None else value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)

    def forward_key(self) -> tuple:
        """The values of the settings that act before decoding (``FORWARD_FIELDS``): two settings
        with equal keys give the same forward pass."""
        return tuple(getattr(self, name) for name in FORWARD_FIELDS)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cross_weights"] = None if self.cross_weights is None else dict(self.cross_weights)
        d["cross_heads"] = dict(self.cross_heads) if isinstance(self.cross_heads, Mapping) else self.cross_heads
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
# The authors' computation (iseg.reference): the same knobs as their twins, plus ``reference``, which
# makes the prompt, token positions, precision and interactive rules theirs. The prompt settings
# below only describe their text (``reference`` builds it); COCO's background words are theirs.
PRESETS.update({f"{name}-reference": dict(PRESETS[name], reference=name)
                for name in DATASET_KINDS})
PRESETS["interactive-reference"] = dict(PRESETS["interactive"], reference="interactive", threshold=0.4)

_FIELDS = {f.name for f in fields(Settings)}

# Settings that act before decoding: a forward pass (an ``Observation``) made with one value of
# any of them cannot stand for another (interactive sessions and the layer plan key on them).
FORWARD_FIELDS = ("image_size", "aspect", "timestep", "seed", "gamma", "prompt_prefix", "prompt_joiner",
                  "extra_words", "background_words", "cross_weights", "cross_layers", "cross_heads",
                  "self_resolution", "self_layers", "self_heads", "self_image_size", "reference")
# The others act only on the observation (``decode``) or on how the work is split.
DECODE_FIELDS = ("clustering", "cluster_rounds", "lam", "iterations", "clamp_max", "background", "bg_power",
                 "threshold", "batch_size", "return_self_attention")
# text settings: a command-line value is taken as typed (``--set prompt_prefix=1`` is the text "1")
_TEXT_FIELDS = ("aspect", "prompt_prefix", "prompt_joiner", "background")


def register_preset(name: str, **settings) -> None:
    """Add (or replace) a named preset; used by models that ship their own defaults."""
    _check_names(settings)
    replace(Settings(), **settings)  # a bad preset fails here (Settings checks itself), not when first used
    PRESETS[name] = dict(settings)


def _check_names(options: Mapping) -> None:
    unknown = [k for k in options if k not in _FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(_FIELDS), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown option(s) {', '.join(hints)}; valid options: {sorted(_FIELDS)}")


class SettingsError(ValueError, TypeError):
    """A setting of the wrong type or out of range. It is both a ValueError and a TypeError, so
    that code written against either (the command lines, older callers) catches it."""


def find_preset(name: str) -> dict | None:
    """The overrides of a preset: one of ``PRESETS`` or one a registered model brings (its plug-in's
    ``PRESETS``, read when first asked for); ``None`` when no such preset exists."""
    if name in PRESETS:
        return PRESETS[name]
    return registry.model_presets().get(name)


def preset_names() -> list[str]:
    """Every preset name ``make_settings`` accepts."""
    return sorted(set(PRESETS) | set(registry.model_presets()))


def make_settings(preset: str | None = None, base: Settings | None = None, **overrides) -> Settings:
    """Settings from a preset name plus overrides, with every value checked.

    Every field is checked for type and range (``SettingsError`` names the setting and what is
    allowed). Booleans given as text (``"false"``, ``"no"``, ``"0"``, any case) become booleans,
    string keys of ``cross_weights``/``cross_heads`` (as JSON writes them) become integers, and
    lists become tuples; nothing else is converted.
    """
    if base is not None and not isinstance(base, Settings):
        raise SettingsError(f"base must be a Settings (e.g. seg.settings or make_settings(...)), got "
                            f"{type(base).__name__}; give single values as keyword arguments: make_settings(lam=0.1)")
    settings = base or Settings()
    if preset is not None:
        values = find_preset(preset) if isinstance(preset, str) else None
        if values is None:
            close = difflib.get_close_matches(str(preset), preset_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown preset {preset!r}{hint}; presets: {preset_names()}")
        settings = replace(settings, **values)
    _check_names(overrides)
    settings = replace(settings, **overrides)
    return settings


# Upper bounds for values nobody can mean. The reference runs 5-10 refinement iterations (50 in the
# interactive demo) and K-means converges in a few rounds; 1000 of either is 20x anything measured
# and already minutes per image with SD, while 10**6 ran for hours before. batch_size has no upper
# bound: the segmenter runs a large batch in chunks that fit its memory budget.
MAX_ITERATIONS = 1000
MAX_CLUSTER_ROUNDS = 1000
MAX_IMAGE_SIZE = 4096  # a 512x512 latent; its self-attention alone would be 2**36 entries
# Real settings multiply float32 (or float16) tensors: float32 holds magnitudes from about 1e-38 to
# 3.4e38, so a factor is kept within 1e-30..1e30, which leaves 8 orders of magnitude for the
# products it enters (gamma * embedding, lam * log10 of an attention, a weight * a map). Beyond
# that, 1e40 became inf and 1e-320 became 0 in float32, and the mask was silently all background.
REAL_MIN, REAL_MAX = 1e-30, 1e30
_TRUE_WORDS = ("true", "yes", "1")
_FALSE_WORDS = ("false", "no", "0")


def _fail(name: str, allowed: str, value) -> SettingsError:
    return SettingsError(f"setting {name} must be {allowed}, got {value!r}")


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _fail(name, "true or false (also yes/no, 1/0)", value)


def _int(name: str, value, low: int, high: int | None = None, allowed: str | None = None) -> int:
    allowed = allowed or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")
    # bool is an int subclass, but iterations=True is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, allowed, value)
    value = int(value)
    if value < low or (high is not None and value > high):
        raise _fail(name, allowed, value)
    return value


def _real(name: str, value, allowed: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise _fail(name, allowed, value)
    return float(value)


def _factor(name: str, value, allowed: str, ok, zero: bool = False, low: float = REAL_MIN) -> float:
    """``_real``, then the range float32 arithmetic can hold: ``low .. REAL_MAX`` (or 0 if ``zero``)."""
    value = _real(name, value, allowed, ok)
    if not ((zero and value == 0) or low <= value <= REAL_MAX):
        span = f"from {low:g} to {REAL_MAX:g}" if low > 0 else f"at most {REAL_MAX:g}"
        raise SettingsError(f"setting {name}={value!r} is beyond what float32 arithmetic holds (about 1e-38 to 3e38, "
                            f"with room for the products it enters): give {'0 or ' if zero and low > 0 else ''}a value {span}")
    return value


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(name, " or ".join(repr(c) for c in choices), value)
    return value


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise _fail(name, "text", value)
    return value


def _words(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        raise SettingsError(f"setting {name} must be a list of words, not one string {value!r}")
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise _fail(name, "a list of words", value)
    if isinstance(value, (set, frozenset)):  # no order: the prompt would change from run to run
        raise SettingsError(f"setting {name} must be a list of words in order, not a set {sorted(value)!r}")
    value = tuple(value)  # once: a generator would be used up by the check
    if not all(isinstance(w, str) for w in value):
        raise _fail(name, "a list of words", value)
    if any(not w.strip() for w in value):  # it would add a bare separator to the prompt
        raise SettingsError(f"setting {name}: an empty word in {list(value)!r}; leave it out")
    return value


def _resolution(name: str, key) -> int:
    # JSON (run.json, --set) writes mapping keys as text: "16" means resolution 16
    if isinstance(key, str) and key.strip().isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 1:
        raise SettingsError(f"setting {name}: resolutions must be positive integers such as 16, got {key!r}")
    return int(key)


def _heads(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
        raise _fail(name, "a list of head positions (integers >= 0)", value)
    value = tuple(value)
    if not value or not all(isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 0 for h in value):
        raise _fail(name, "a non-empty list of head positions (integers >= 0)", value)
    return tuple(int(h) for h in value)


def _cross_weights(value):
    name = "cross_weights"
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise _fail(name, 'null or a map {resolution: weight}, e.g. {"16": 0.3, "8": 0.7}', value)
    out = {_resolution(name, r): _factor(name, w, "non-negative numbers as weights", lambda x: x >= 0, zero=True)
           for r, w in value.items()}
    if len(out) != len(value):
        raise SettingsError(f"setting {name} names a resolution twice: {value!r}")
    if sum(out.values()) <= 0:
        raise SettingsError(f"setting {name}: the weights must not all be 0 (nothing would be read), got {value!r}")
    return FrozenMap(out)


def _layers(name: str, value):
    if isinstance(value, str):
        return _choice(name, value, ("auto", "all"))
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        value = tuple(value)
        if value and all(isinstance(v, str) and v for v in value):
            return value
    raise _fail(name, "'auto', 'all' or a non-empty list of layer names", value)


def _cross_heads(value):
    name = "cross_heads"
    if value is None:
        return None
    if isinstance(value, str):
        return _choice(name, value, ("reference-voc",))
    if isinstance(value, Mapping) and value:
        return FrozenMap((_resolution(name, r), _heads(name, h)) for r, h in value.items())
    raise _fail(name, "null, 'reference-voc' or a map {resolution: [head positions]}", value)


def _self_heads(value):
    name = "self_heads"
    if value is None:
        return None
    if isinstance(value, str):
        return _choice(name, value, ("reference",))
    return _heads(name, value)


# One rule per field: value -> the checked value. test_hostile_cli checks that every field has one.
_RULES = {
    "image_size": lambda v: None if v is None else _int("image_size", v, 8, MAX_IMAGE_SIZE),
    "aspect": lambda v: _choice("aspect", v, ASPECT_MODES),
    "timestep": lambda v: _int("timestep", v, 0, 999),
    "seed": lambda v: _int("seed", v, 0, 2**64 - 1, "an integer in [0, 2**64)"),  # torch.Generator's range
    "gamma": lambda v: _factor("gamma", v, "a finite number > 0", lambda x: x > 0),
    "prompt_prefix": lambda v: _text("prompt_prefix", v),
    "prompt_joiner": lambda v: _text("prompt_joiner", v),
    "extra_words": lambda v: _words("extra_words", v),
    "background_words": lambda v: _words("background_words", v),
    "cross_weights": _cross_weights,
    "cross_layers": lambda v: _layers("cross_layers", v),
    "cross_heads": _cross_heads,
    "self_resolution": lambda v: None if v is None else _int("self_resolution", v, 1),
    "self_layers": lambda v: _layers("self_layers", v),
    "self_heads": _self_heads,
    "self_image_size": lambda v: None if v is None else _int("self_image_size", v, 8, MAX_IMAGE_SIZE),
    "reference": lambda v: None if v is None else _choice("reference", v, REFERENCE_KINDS),
    "clustering": lambda v: _bool("clustering", v),
    "cluster_rounds": lambda v: _int("cluster_rounds", v, 1, MAX_CLUSTER_ROUNDS),
    "lam": lambda v: _factor("lam", v, "a finite number >= 0", lambda x: x >= 0, zero=True, low=0),
    "iterations": lambda v: _int("iterations", v, 0, MAX_ITERATIONS),
    # clamp_max <= 0 would clamp every Ent-Self entry to it and silently switch the step off
    "clamp_max": lambda v: None if v is None else _factor("clamp_max", v, "null or a finite number > 0", lambda x: x > 0),
    "background": lambda v: _choice("background", v, BACKGROUND_RULES),
    "bg_power": lambda v: _factor("bg_power", v, "a finite number > 0", lambda x: x > 0),
    "threshold": lambda v: _real("threshold", v, "a number in (0, 1)", lambda x: 0 < x < 1),
    "batch_size": lambda v: _int("batch_size", v, 1),
    "return_self_attention": lambda v: _bool("return_self_attention", v),
}


def parse_overrides(items) -> dict:
    """``["lam=0.1", "cross_weights={\"16\": 1}"]`` (command-line ``--set``) -> setting overrides.

    Text settings (``aspect``, ``prompt_prefix``, ``prompt_joiner``, ``background``) take the value
    as typed; every other value is read as JSON where it parses, else kept as text. Each value is
    then checked and converted for its setting as ``make_settings`` does (``clustering=False`` and
    ``clustering=no`` become ``False``; ``seed=1.5`` is refused), so errors name the setting here.
    """
    import json

    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingsError(f"--set expects KEY=VALUE, got {item!r}")
        _check_names({key: None})
        if key in _TEXT_FIELDS:
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        out[key] = _RULES[key](out[key])
    return out
