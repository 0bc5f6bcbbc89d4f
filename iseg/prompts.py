"""Step 2 of the method: prompts from lists, class token positions, and Cat-Cross (method.md §2)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "VOC_BACKGROUND",
    "COCO_BACKGROUND",
    "PromptTooLongError",
    "UnknownWordError",
    "Prompt",
    "check_class_names",
    "build_prompt",
    "class_offsets",
    "class_prompt",
    "unknown_words",
    "class_token_spans",
    "make_prompt",
    "encode_prompt",
    "cat_cross",
]

# Background words of the reference prompts, as lists so that no word can be lost to a string slip.
VOC_BACKGROUND = ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water")
COCO_BACKGROUND = VOC_BACKGROUND + ("river", "sea", "railway")


class PromptTooLongError(ValueError):
    """Some class names do not fit in the text encoder's token window."""


class UnknownWordError(ValueError):
    """A class name (or prompt word) has words the model's tokenizer does not know.

    Such words become the tokenizer's unknown token (the end-of-text token for CLIP), which the
    model reads as the end of the prompt: the class would be segmented from noise."""

    def __init__(self, message: str, words: Sequence[str] = ()):
        super().__init__(message)
        self.words = tuple(words)


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt and where each class sits in it."""

    text: str
    classes: tuple[str, ...]
    input_ids: tuple[int, ...]  # padded to the tokenizer's window
    spans: tuple[tuple[int, ...], ...]  # token positions of each class (0 = start token)
    # the caller's name of each class where the prompt uses another word for it (the ``*-reference``
    # presets prompt with the authors' words: ``classes`` has "plane" where ``names`` has
    # "aeroplane"); empty when they are ``classes`` themselves
    names: tuple[str, ...] = ()

    @property
    def given(self) -> tuple[str, ...]:
        """The caller's names of ``classes``, in the same order."""
        return self.names or self.classes


def check_class_names(classes: Sequence[str]) -> tuple[str, ...]:
    """Validate a class list and return it as a tuple of stripped names."""
    if isinstance(classes, str):
        raise TypeError(f"classes must be a list of names, not one string {classes!r}; e.g. ['cat', 'dog']")
    names = tuple(classes)
    if not names:
        raise ValueError("the class list is empty; give at least one class name")
    cleaned = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"class names must be strings, got {name!r}")
        if not name.strip():
            raise ValueError(f"empty class name in {list(names)!r}")
        cleaned.append(" ".join(name.split()))
    seen, dup = set(), []
    for name in cleaned:
        key = name.lower()
        if key in seen:
            dup.append(name)
        seen.add(key)
    if dup:
        given = repr(list(names)) if len(names) <= 12 else f"{repr(list(names[:10]))[:-1]}, ...] ({len(names)} names)"
        raise ValueError(f"duplicate class name(s) {sorted(set(dup))} in {given}; give each class once")
    return tuple(cleaned)


def build_prompt(
    classes: Sequence[str],
    prefix: str = "a photograph of",
    extra: Sequence[str] = ("other object", "background"),
    background_words: Sequence[str] = VOC_BACKGROUND,
    joiner: str = " and ",
) -> str:
    """The reference prompt: ``prefix`` + classes and ``extra`` joined by "and", then background words.

    ``build_prompt(["cat", "dog"])`` gives "a photograph of cat and dog and other object and
    background, ground, land, ...". ``joiner`` goes between names (the shapes model uses " and a ").
    """
    return _prompt_text(check_class_names(classes), prefix, extra, background_words, joiner)


def _prompt_text(names: tuple[str, ...], prefix: str, extra: Sequence[str], background_words: Sequence[str],
                 joiner: str) -> str:
    text = joiner.join([*names, *extra])
    if prefix:
        text = f"{prefix} {text}"
    if background_words:
        text = f"{text}, {', '.join(background_words)}"
    return text


def class_offsets(classes: Sequence[str], prefix: str = "a photograph of", joiner: str = " and ") -> list[int]:
    """Character position of every class name in ``build_prompt(classes, prefix, ..., joiner)``."""
    return _offsets(check_class_names(classes), prefix, joiner)


def _offsets(names: tuple[str, ...], prefix: str, joiner: str) -> list[int]:
    at = len(prefix) + 1 if prefix else 0
    out = []
    for name in names:
        out.append(at)
        at += len(name) + len(joiner)
    return out


def class_prompt(tokenizer, classes: Sequence[str], prefix: str = "a photograph of",
                 extra: Sequence[str] = ("other object", "background"), background_words: Sequence[str] = VOC_BACKGROUND,
                 joiner: str = " and ", model: str | None = None, known=None) -> Prompt:
    """The Cat-Cross prompt of ``classes``: ``build_prompt``'s text, tokenised, every class found
    where it was put (``make_prompt``). The class names are checked once, here."""
    names = check_class_names(classes)
    text = _prompt_text(names, prefix, extra, background_words, joiner)
    return _located_prompt(tokenizer, text, names, _offsets(names, prefix, joiner), model, known)


def _find(haystack: Sequence[int], needle: Sequence[int], start: int) -> int:
    n = len(needle)
    for i in range(start, len(haystack) - n + 1):
        if list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def unknown_words(tokenizer, text: str, known=None) -> list[str]:
    """The whitespace-separated words of ``text`` that ``tokenizer`` turns (partly) into its
    unknown token, or, when the model has a closed word list ``known``, that are not in it."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for w in text.split():
        if known is not None and w.lower() not in known:
            out.append(w)
        elif unk is not None and unk in token_ids(tokenizer, w, add_special_tokens=False, truncation=False):
            out.append(w)
    return out


def _unknown_error(tokenizer, text: str, names: Sequence[str], model: str | None, known=None) -> UnknownWordError | None:
    who = f"the {model!r} model's tokenizer" if model else "the model's tokenizer"
    bad_classes = {name: unknown_words(tokenizer, name, known) for name in names}
    bad_classes = {k: v for k, v in bad_classes.items() if v}
    if bad_classes:
        listed = "; ".join(f"class {k!r} (word(s) {v})" for k, v in bad_classes.items())
        words = [w for v in bad_classes.values() for w in v]
        return UnknownWordError(
            f"{listed}: {who} does not know {'this word' if len(words) == 1 else 'these words'}; it would read "
            "as the end of the prompt and give a meaningless mask. Use words the model knows"
            + (" (iseg.shapes.vocabulary() lists the shapes model's)" if model == "shapes" else ""), words)
    bad = unknown_words(tokenizer, text, known)
    if bad:
        return UnknownWordError(
            f"the prompt {text!r} has word(s) {bad} that {who} does not know; change prompt_prefix, "
            "extra_words or background_words, or pick the model's preset (ISeg(..., preset=...), "
            "iseg segment --preset ...)", bad)
    return None


def class_token_spans(tokenizer, text: str, classes: Sequence[str], offsets: Sequence[int] | None = None,
                      model: str | None = None, known=None) -> tuple[list[int], list[tuple[int, ...]]]:
    """Token positions that each class occupies in ``text``, found with the tokenizer itself.

    ``offsets`` are the character positions of the classes in ``text`` (``class_offsets``); each
    class is then looked up exactly where it was put, so a class named like a word of the prompt
    itself (``a``, ``and``, ``of``) gets its own tokens, not the prefix's or the joiner's. Without
    them, classes are searched in order, each after the previous one. Returns the unpadded,
    untruncated ids (start and end tokens included) and one tuple of positions per class. A class
    with words the tokenizer does not know (or, given a model's closed word list ``known``, words
    outside it) raises ``UnknownWordError`` naming ``model``.
    """
    names = list(classes)
    if offsets is not None and len(offsets) != len(names):
        raise ValueError(f"got {len(offsets)} offsets for {len(names)} classes")
    ids = token_ids(tokenizer, text, add_special_tokens=True, truncation=False)
    empty = token_ids(tokenizer, "", add_special_tokens=True)
    front = 1 if empty and empty[0] == getattr(tokenizer, "bos_token_id", None) else 0
    unk = getattr(tokenizer, "unk_token_id", None)
    # CLIP's unknown token is its end token: look for it before the text's own end
    if (unk is not None and unk in ids[front : len(ids) - (len(empty) - front)]) or (
            known is not None and any(w.lower() not in known for w in text.split())):
        problem = _unknown_error(tokenizer, text, names, model, known)
        if problem is not None:
            raise problem
    spans, cursor = [], front
    for k, name in enumerate(names):
        piece = token_ids(tokenizer, name, add_special_tokens=False, truncation=False)
        if not piece:
            raise ValueError(f"class name {name!r} gives no tokens")
        at = -1
        if offsets is not None:
            if text[offsets[k] : offsets[k] + len(name)] != name:
                raise ValueError(f"class {name!r} is not at character {offsets[k]} of the prompt {text!r}")
            # the tokens of the text before the class: CLIP splits words independently, so they are
            # exactly the prompt's first tokens
            guess = front + len(token_ids(tokenizer, text[: offsets[k]], add_special_tokens=False, truncation=False))
            at = guess if list(ids[guess : guess + len(piece)]) == list(piece) else _find(ids, piece, guess)
        else:
            at = _find(ids, piece, cursor)
        if at < 0:
            raise ValueError(f"class {name!r} was not found in the prompt {text!r}; put every class name in the prompt")
        spans.append(tuple(range(at, at + len(piece))))
        cursor = at + len(piece)
    return ids, spans


# One lock per tokenizer: a fast tokenizer sets its truncation and padding on every call, so
# two threads calling it with other options at once can get each other's (a class then seems
# missing from its own prompt).
_TOKENIZER_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def tokenize(tokenizer, text, **options):
    """``tokenizer(text, **options)``, one call at a time per tokenizer."""
    with _LOCKS_LOCK:
        lock = _TOKENIZER_LOCKS.setdefault(tokenizer, threading.Lock())
    with lock:
        return tokenizer(text, **options)


def token_ids(tokenizer, text: str, **options) -> list[int]:
    """``tokenizer(text, **options)["input_ids"]``, one call at a time per tokenizer."""
    return tokenize(tokenizer, text, **options)["input_ids"]


def make_prompt(tokenizer, text: str, classes: Sequence[str], offsets: Sequence[int] | None = None,
                model: str | None = None, known=None) -> Prompt:
    """Tokenise ``text`` and locate ``classes`` (at character ``offsets`` when given).

    Raises ``PromptTooLongError`` on overflow and ``UnknownWordError`` for words the tokenizer
    does not know (the message names ``model``).
    """
    return _located_prompt(tokenizer, text, check_class_names(classes), offsets, model, known)


def _located_prompt(tokenizer, text: str, names: tuple[str, ...], offsets, model, known) -> Prompt:
    ids, spans = class_token_spans(tokenizer, text, names, offsets, model, known)
    window = tokenizer.model_max_length
    # the last position of the window holds the end token after truncation
    outside = [name for name, span in zip(names, spans) if span[-1] >= window - 1]
    if outside:
        raise PromptTooLongError(
            f"the prompt is {len(ids)} tokens long but the text encoder reads {window}; "
            f"class(es) {outside} fall outside the window. Use fewer classes per prompt, shorter "
            "names, or fewer background words (background_words=())"
        )
    padded = token_ids(tokenizer, text, padding="max_length", max_length=window, truncation=True)
    return Prompt(text=text, classes=names, input_ids=tuple(padded), spans=tuple(spans))


@torch.no_grad()
def encode_prompt(text_encoder, input_ids: Sequence[int], device=None) -> torch.Tensor:
    """Conditional text embedding ``E`` of shape ``(1, window, dim)``, as the pipeline computes it."""
    device = device or text_encoder.device
    ids = torch.tensor([list(input_ids)], device=device)
    return text_encoder(ids)[0]


def cat_cross(embedding: torch.Tensor, spans: Sequence[Sequence[int]], gamma: float) -> torch.Tensor:
    """Cat-Cross: scale the embedding vectors at every class-token position by ``gamma``.

    Returns a new tensor; ``gamma = 1`` returns an unchanged copy.
    """
    out = embedding.clone()
    positions = sorted({i for span in spans for i in span})
    if positions and gamma != 1:
        out[..., positions, :] = out[..., positions, :] * gamma
    return out
