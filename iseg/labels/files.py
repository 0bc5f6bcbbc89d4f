"""The ``file`` label method: labels from a JSON (``{id: [names]}``) or CSV (``id,name;name``) file."""

from __future__ import annotations

import csv
import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["read_labels_file", "image_id"]


def read_labels_file(path, vocabulary: Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """``{image id: class names}`` from JSON (``{id: [names]}``) or CSV (``id,name;name`` rows).

    With a vocabulary, every name must belong to it (an unknown name is an error naming the image
    and the closest class) and the names come back in vocabulary order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # Excel and Notepad start UTF-8 files with a byte-order mark
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"labels file {path} is not UTF-8 text (byte {data[err.start]:#04x} on line {line}); "
                         "save it as UTF-8 (in Excel: CSV UTF-8)") from None
    if path.suffix.lower() == ".json":
        def no_repeats(pairs):
            seen = set()
            for k, _ in pairs:
                if k in seen:
                    raise ValueError(f"labels file {path} lists image {k!r} twice; give each image once")
                seen.add(k)
            return dict(pairs)

        try:
            raw = json.loads(text, object_pairs_hook=no_repeats)
        except json.JSONDecodeError as err:
            raise ValueError(f"labels file {path} is not valid JSON: {err}") from None
        if not isinstance(raw, Mapping):
            raise ValueError(f"labels file {path} must hold an object {{image id: [class names]}}")
        table = {str(k): v for k, v in raw.items()}
    else:
        table = {}
        first_line = {}
        for line, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or row[0].startswith("#") or row[0].strip() in ("id", "image"):
                continue
            key = row[0].strip()
            if key in table:  # two rows for one image are more likely a mistake than meant to be merged
                raise ValueError(f"labels file {path} lists image {key!r} twice (lines {first_line[key]} and {line}); "
                                 "give each image one row, its classes separated by ';'")
            first_line[key] = line
            table[key] = [n.strip() for cell in row[1:] for n in cell.split(";") if n.strip()]
    out = {}
    for key, names in table.items():
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"labels file {path}: the labels of {key!r} must be a list of class names, got {names!r}")
        if vocabulary is not None:
            for n in names:
                if n not in vocabulary:
                    close = difflib.get_close_matches(n, list(vocabulary), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"labels file {path}, image {key!r}: {n!r} is not in the vocabulary{hint}")
            names = [c for c in vocabulary if c in set(names)]
        out[key] = tuple(dict.fromkeys(names))
    return out


def image_id(item, index: int) -> str:
    """The id of an image file in a labels file: its name without extension."""
    if isinstance(item, (str, Path)):
        return Path(item).stem
    raise ValueError(f"image {index} is not a file path: give ids=[...] to look its labels up in the file")
