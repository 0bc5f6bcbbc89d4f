"""Segment images: ``iseg segment IMAGE... --classes cat,dog --out DIR``.

Writes, per image, the label map as a palette PNG (``NAME.labels.png``, pixel value = label),
an overlay (``NAME.overlay.png``), the per-iteration animation (``NAME.iterations.gif``) and a
JSON file with the prompt, the classes, the settings and the timing.

NAME is the image's file name without its extension (``photos/cat.jpg`` -> ``cat``). Images that
would share a NAME keep their extension (``x.png`` and ``x.jpg`` -> ``x.png``, ``x.jpg``) and, when
that is not enough, their parent folders joined by ``__`` (``a/x.png`` and ``b/x.png`` ->
``a__x.png``, ``b__x.png``), so every image gets its own files; names that differ only in case
(``X.png`` and ``x.png``) are numbered (``X-1``, ``x-2``). The names depend on which images are
given together, not on their order.

Earlier results in the output folder are never replaced unless ``--overwrite`` is given; then the
command lists what it replaces, and removes the old animation of an image rerun with ``--no-gif``.
Files are written to a temporary name in the folder and renamed, so a symbolic link planted there
is replaced, never written through; a temporary file that a killed run left is removed by the next.
Every input (images, classes, settings, device, the output folder and the file names' length) is
checked before the model loads.

A classes file is JSON ``{"image file name": ["class", ...]}`` (keys may also be the name without
extension or the path as given); a single string is one class (``{"x.png": "star"}``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from ..images import MIN_SIDE
from ..loading import load_model
from ..prompts import check_class_names
from ..segmenter import ISeg
from ..viz import iteration_frames, label_png, save_gif
from .files import check_folder, check_names, write_atomic
from .options import CommandError, add_set_option, device_option, settings_overrides

__all__ = ["add_arguments", "run", "output_names"]

_SUFFIXES = (".labels.png", ".overlay.png", ".iterations.gif", ".json")


def output_names(images: list[Path]) -> list[str]:
    """A distinct output NAME per image (see the module docstring), in the order given.

    Each image starts from its stem; every group of images that share a name (case-insensitively,
    as on macOS and Windows file systems) moves one step further: the file name, then one more
    parent folder at a time, until all names differ. Images whose paths differ only in case
    (``X.png`` and ``x.png``), which no folder can tell apart, are numbered (``X-1``, ``x-2``, in
    the order of their paths).
    """
    resolved = [p.resolve() for p in images]
    seen: dict[Path, Path] = {}
    for given, real in zip(images, resolved):
        if real in seen:
            raise CommandError(f"image {given} is given twice (also as {seen[real]}); give each image once")
        seen[real] = given
    by_folded: dict[str, list[int]] = {}
    for k, real in enumerate(resolved):
        by_folded.setdefault(str(real).casefold(), []).append(k)
    number = [""] * len(images)
    for group in by_folded.values():
        if len(group) > 1:
            for i, k in enumerate(sorted(group, key=lambda k: str(resolved[k]))):
                number[k] = f"-{i + 1}"
    parts = [[p for p in real.parts if p not in (real.anchor, "")] for real in resolved]
    level = [0] * len(images)

    def name(k: int) -> str:
        if level[k] == 0:
            return images[k].stem + number[k]
        return "__".join(parts[k][-level[k]:]) + number[k]

    while True:
        groups: dict[str, list[int]] = {}
        for k in range(len(images)):
            groups.setdefault(name(k).casefold(), []).append(k)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return [name(k) for k in range(len(images))]
        moved = False
        for group in clashes:
            for k in group:
                if level[k] < len(parts[k]):
                    level[k] += 1
                    moved = True
        if not moved:  # cannot happen (numbered paths differ); never loop for ever
            raise CommandError(f"images {', '.join(str(images[k]) for k in clashes[0])} would share the output "
                               f"name {name(clashes[0][0])!r}; rename one of them")


def _classes_for(images: list[Path], classes: str | None, classes_file: Path | None) -> list[list[str]]:
    if (classes is None) == (classes_file is None):
        raise CommandError("give the class names with --classes a,b,c or --classes-file FILE.json (one of the two)")
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
        try:
            check_class_names(names)  # before the model loads: "cat,,dog" is a typo, not three classes
        except ValueError as err:
            shown = classes if len(classes) <= 80 else f"{classes[:60]}...{classes[-10:]}"
            raise CommandError(f"--classes {shown!r}: {err}") from None
        return [names] * len(images)
    table = _read_classes_file(Path(classes_file))
    out = []
    users: dict[str, list[Path]] = {}
    for img in images:
        keys = list(dict.fromkeys(k for k in (str(img), img.name, img.stem) if k in table))
        if not keys:
            raise CommandError(f"--classes-file {classes_file} has no classes for {img.name} (keys are file names)")
        if len(keys) > 1:  # "x.png" and "x" both name x.png: which one was meant is a guess
            raise CommandError(f"--classes-file {classes_file} has {len(keys)} keys for the image {img.name} "
                               f"({', '.join(map(repr, keys))}); keep one of them")
        key = keys[0]
        users.setdefault(key, []).append(img)
        value = table[key]
        if isinstance(value, str):
            # one class; a comma most likely means a list written as text, which would be one odd class
            if "," in value:
                raise CommandError(f"--classes-file {classes_file}: {key!r} has the text {value!r}; give a list "
                                   f"such as {json.dumps([v.strip() for v in value.split(',')])}")
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CommandError(f"--classes-file {classes_file}: the classes of {key!r} must be a list of names "
                               f"(or one name), got {value!r}")
        try:
            check_class_names(value)
        except ValueError as err:
            raise CommandError(f"--classes-file {classes_file}, {key!r}: {err}") from None
        out.append(list(value))
    shared = next(((k, imgs) for k, imgs in users.items() if len({str(i) for i in imgs}) > 1), None)
    if shared is not None:  # "x" names x.png and x.jpg, or x.png two images in different folders
        key, imgs = shared
        raise CommandError(f"--classes-file {classes_file}: the key {key!r} names {len(imgs)} images "
                           f"({', '.join(str(i) for i in imgs[:4])}); give each its own key, its file name or its "
                           "path as given on the command line")
    return out


def _read_classes_file(path: Path) -> dict:
    if not path.is_file():
        raise CommandError(f"--classes-file {path} does not exist or is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the JSON
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CommandError(f"--classes-file {path} is not UTF-8 text (bad byte at line {line}); "
                           "save it as UTF-8") from None
    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:  # json would keep the last silently
            raise CommandError(f"--classes-file {path} lists {', '.join(map(repr, twice))} twice; give each image once")
        return dict(pairs)

    try:
        table = json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as err:
        raise CommandError(f"--classes-file {path} is not valid JSON: {err.msg} at line {err.lineno} "
                           f"column {err.colno}") from None
    if not isinstance(table, dict):
        raise CommandError(f"--classes-file {path} must hold a JSON object {{\"image file name\": [\"class\", ...]}}")
    return table


def _check_image(path: Path) -> None:
    """Read the image's header now: a file that is not an image, or one too small, is refused before
    the model loads and before any result is written (the pixels are read when it is segmented)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                img.verify()  # the chunks' checksums (PNG): a file cut short is refused now
    except Image.DecompressionBombError as err:
        raise CommandError(f"image {_shown(path)} is too large to open safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CommandError(f"image {_shown(path)} cannot be read as an image ({err}); is the file corrupt or not an image?") from None
    if min(width, height) < MIN_SIDE:
        raise CommandError(f"image {_shown(path)} is {width}x{height} pixels; iSeg needs at least {MIN_SIDE}x{MIN_SIDE}")


def _shown(path: Path) -> str:
    """``path`` as text, quoted with its invisible characters escaped (``'\\ufeffa.png'``) when it
    has any: a byte-order mark or a control character pasted into a name is otherwise invisible in
    the message, which then seems to name an existing file."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def _invisible_hint(path: Path) -> str:
    """A hint when ``path`` without its invisible characters (a byte-order mark, zero-width spaces)
    names a file that exists."""
    text = str(path)
    if text.isprintable():
        return ""
    plain = Path("".join(c for c in text if c.isprintable()))
    return (f" (its name holds invisible characters; did you mean {plain}?)" if plain.is_file()
            else " (its name holds invisible characters, shown escaped)")


def _output_folder(out: Path | str) -> Path:
    if not str(out).strip():
        raise CommandError("--out is empty; give the folder for the results (default: iseg-out)")
    try:
        return check_folder(out, "--out")
    except ValueError as err:
        raise CommandError(str(err)) from None


def _taken(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link counts: it is in the way


def _check_images(images: list[Path]) -> None:
    for path in images:
        if not path.is_file():
            raise CommandError(f"image not found: {_shown(path)}{_invisible_hint(path)}" if not path.exists()
                               else f"image {_shown(path)} is not a file")
        _check_image(path)


def _result_files(images: list[Path], out: Path, overwrite: bool) -> list[list[Path]]:
    """The result files of every image in ``out`` (labels, overlay, animation, record), checked:
    none may be an input image, and earlier results are replaced only with ``overwrite``."""
    targets = [[out / f"{name}{suffix}" for suffix in _SUFFIXES] for name in output_names(images)]
    inputs = {path.resolve() for path in images}
    clash = [t for files in targets for t in files if t.resolve() in inputs]
    try:
        check_names(t for files in targets for t in files)
    except ValueError as err:
        raise CommandError(str(err)) from None
    if clash:  # --overwrite replaces earlier results, never an image being segmented
        raise CommandError(f"a result would be written over the input image {clash[0]}; choose another --out "
                           "(or rename the image)")
    earlier = [t for files in targets for t in files if _taken(t)]
    if earlier and not overwrite:
        listed = ", ".join(t.name for t in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise CommandError(f"--out {out} already holds results of these images ({listed}); pass --overwrite to "
                           "replace them, or choose another --out")
    foreign = [t for t in earlier if _not_ours(t)]
    if foreign:  # --overwrite replaces iseg's results; a file of the user's that bears such a name stays
        raise CommandError(f"--overwrite replaces only earlier iseg results, and {foreign[0]} is not one "
                           f"({_not_ours(foreign[0])}); move it out of --out {out}, or choose another --out")
    if earlier:
        print(f"iseg: --overwrite: replacing {len(earlier)} earlier file(s) in {out}: "
              + ", ".join(t.name for t in earlier), file=sys.stderr)
    return targets


#: how each kind of result file begins
_SIGNATURES = {".png": (b"\x89PNG\r\n\x1a\n",), ".gif": (b"GIF87a", b"GIF89a")}
#: keys every record ``_write_results`` writes holds
_RECORD_KEYS = {"image", "model", "classes", "labels", "settings"}


def _not_ours(path: Path) -> str:
    """Why ``path`` is not a result iseg wrote (empty when it may be one)."""
    if path.is_symlink():
        return ""  # the link is replaced, never written through: what it points at stays as it is
    if not path.is_file():
        return "a folder" if path.is_dir() else "not a regular file"
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as err:
        return f"it cannot be read: {err.strerror}"
    if path.suffix in _SIGNATURES:
        return "" if head.startswith(_SIGNATURES[path.suffix]) else f"not a {path.suffix[1:].upper()} image"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "not JSON"
    return "" if isinstance(record, dict) and _RECORD_KEYS <= record.keys() else "not an iseg record"


def _write_results(seg, path: Path, result, files: list[Path], gif: bool, started: float) -> None:
    """The label map, the overlay, the animation (with ``gif``) and the JSON record of one image
    (its wall time: from ``started``, before the segmentation, to the record)."""
    labels_png, overlay_png, gif_file, record_json = files
    write_atomic(labels_png, lambda p, r=result: label_png(r.labels).save(p, format="PNG"))
    write_atomic(overlay_png, lambda p, r=result: r.overlay().save(p, format="PNG"))
    if gif:
        write_atomic(gif_file, lambda p, r=result: save_gif(iteration_frames(r), p))
    elif _taken(gif_file):
        gif_file.unlink()  # an animation of an earlier run would not match these results (--overwrite given)
    record = {
        "image": str(path),
        "model": seg.model.name,
        "preset": seg.preset,
        "classes": list(result.classes),
        "labels": {str(i + 1): c for i, c in enumerate(result.classes)},
        # a -reference preset prompts with the authors' words: the names given, in label order
        **({"given_classes": list(result.given_classes)} if result.names else {}),
        "prompt": result.prompt,
        "token_spans": [list(s) for s in result.token_spans],
        "pixels": {c: int((result.labels == i + 1).sum()) for i, c in enumerate(result.classes)},
        "settings": result.settings.as_dict(),
        "timing": dict(result.timing, wall_s=time.perf_counter() - started),
    }
    write_atomic(record_json, lambda p, rec=record: p.write_text(json.dumps(rec, indent=2)))


def run(args) -> int:
    """``iseg segment``: every option is checked before the model loads or anything is written."""
    images = [Path(p) for p in args.images]
    _check_images(images)
    per_image = _classes_for(images, args.classes, args.classes_file)
    overrides = settings_overrides(args.set, args.preset)
    device = device_option(args.device)
    out = _output_folder(Path(args.out) if str(args.out).strip() else "")  # Path("") would be the current folder
    targets = _result_files(images, out, args.overwrite)

    pipe = load_model(args.model, device=device)
    seg = ISeg(pipe, preset=args.preset, **overrides)
    for names in dict.fromkeys(tuple(n) for n in per_image):  # words the model lacks, a prompt too long: every
        seg.prompt_for(names)  # image's classes are checked before the first result is written
    print(f"iseg: {seg}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for path, names, files in tqdm(list(zip(images, per_image, targets)), desc="segment", unit="img"):
        t0 = time.perf_counter()
        result = seg.segment(path, names)
        _write_results(seg, path, result, files, args.gif, t0)
    print(f"iseg: wrote {len(images)} result(s) to {out}", file=sys.stderr)
    return 0


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("images", nargs="+", help="image files")
    s.add_argument("--classes", help="comma-separated class names for every image, e.g. cat,dog")
    s.add_argument("--classes-file", type=Path,
                   help='JSON file {"image file name": ["class", ...]} (UTF-8; one string is one class)')
    s.add_argument("--model", default="auto", help="hub id, local folder, 'shapes' or 'auto' (default)")
    s.add_argument("--preset", default=None,
                   help="wsss-voc, wsss-coco, ovs-voc, ovs-context, ovs-coco, interactive, shapes (default: the model's)")
    add_set_option(s)
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    s.add_argument("--out", default="iseg-out", help="output folder (default: iseg-out)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace earlier results of the same images in --out (listed when replaced)")
    s.add_argument("--no-gif", dest="gif", action="store_false", help="skip the per-iteration animation")
