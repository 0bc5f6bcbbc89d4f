"""Step 2 of the method: prompts from lists, class token positions, and Cat-Cross (method.md §2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "VOC_BACKGROUND",
    "COCO_BACKGROUND",
    "PromptTooLongError",
    "Prompt",
    "check_class_names",
    "build_prompt",
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


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt and where each class sits in it."""

    text: str
    classes: tuple[str, ...]
    input_ids: tuple[int, ...]  # padded to the tokenizer's window
    spans: tuple[tuple[int, ...], ...]  # token positions of each class (0 = start token)


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
        raise ValueError(f"duplicate class name(s) {sorted(set(dup))} in {list(names)!r}; give each class once")
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
    names = check_class_names(classes)
    text = joiner.join([*names, *extra])
    if prefix:
        text = f"{prefix} {text}"
    if background_words:
        text = f"{text}, {', '.join(background_words)}"
    return text


def _find(haystack: Sequence[int], needle: Sequence[int], start: int) -> int:
    n = len(needle)
    for i in range(start, len(haystack) - n + 1):
        if list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def class_token_spans(tokenizer, text: str, classes: Sequence[str]) -> tuple[list[int], list[tuple[int, ...]]]:
    """Token positions that each class occupies in ``text``, found with the tokenizer itself.

    Classes are searched in order, each after the previous one, so a name that is also part of a
    later name is not confused with it. Returns the unpadded, untruncated ids (start and end
    tokens included) and one tuple of positions per class.
    """
    ids = tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]
    spans, cursor = [], 1
    for name in classes:
        piece = tokenizer(name, add_special_tokens=False, truncation=False)["input_ids"]
        if not piece:
            raise ValueError(f"class name {name!r} gives no tokens")
        at = _find(ids, piece, cursor)
        if at < 0:
            raise ValueError(f"class {name!r} was not found in the prompt {text!r}; put every class name in the prompt")
        spans.append(tuple(range(at, at + len(piece))))
        cursor = at + len(piece)
    return ids, spans


def make_prompt(tokenizer, text: str, classes: Sequence[str]) -> Prompt:
    """Tokenise ``text`` and locate ``classes``; raise ``PromptTooLongError`` on overflow."""
    names = check_class_names(classes)
    ids, spans = class_token_spans(tokenizer, text, names)
    window = tokenizer.model_max_length
    # the last position of the window holds the end token after truncation
    outside = [name for name, span in zip(names, spans) if span[-1] >= window - 1]
    if outside:
        raise PromptTooLongError(
            f"the prompt is {len(ids)} tokens long but the text encoder reads {window}; "
            f"class(es) {outside} fall outside the window. Use fewer classes per prompt, shorter "
            "names, or fewer background words (background_words=())"
        )
    padded = tokenizer(text, padding="max_length", max_length=window, truncation=True)["input_ids"]
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
