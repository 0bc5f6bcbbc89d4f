"""Writing files so that nothing is ever half written: a new temporary file in the same folder,
then one rename over the target (``os.replace``). A kill leaves the old file or the new one, never
a mix; a symbolic link at the target is replaced, never written through.

A kill between creating the temporary file and the rename leaves that (hidden) temporary file
behind: the next write of the same target removes it. Names are checked against the file
system's limit before anything runs (``check_names``), so a long name fails at the start and not
after an hour of work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .. import registry

__all__ = ["write_atomic", "write_text", "write_json", "stale_temporaries", "name_limit", "check_names",
           "check_folder"]

_RANDOM = r"[a-z0-9_]{8}"  # what tempfile.mkstemp puts between prefix and suffix


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def name_limit(folder: Path) -> int:
    """The longest file name the file system of ``folder`` (or its nearest existing parent) allows."""
    for place in (Path(folder), *Path(folder).parents):
        if place.is_dir():
            try:
                return int(os.pathconf(place, "PC_NAME_MAX"))
            except (OSError, ValueError, AttributeError):  # Windows has no pathconf
                return 255
    return 255


def _temp_parts(target: Path, limit: int = 255) -> tuple[str, str]:
    """``(prefix, suffix)`` of the temporary files of ``target``: ``.NAME.XXXXXXXX.EXT``, or for a
    name too long for that, ``.iseg-HASH.XXXXXXXX.EXT``."""
    prefix, suffix = f".{target.name}.", target.suffix
    if len(prefix) + 8 + len(suffix) > limit:
        prefix = f".iseg-{hashlib.sha1(target.name.encode()).hexdigest()[:16]}."
    return prefix, suffix


def stale_temporaries(target: Path) -> list[Path]:
    """Temporary files of ``target`` that a killed write left in its folder."""
    folder = target.parent
    if not folder.is_dir():
        return []
    prefix, suffix = _temp_parts(target, name_limit(folder))
    pattern = re.compile(re.escape(prefix) + _RANDOM + re.escape(suffix) + r"\Z")
    return [p for p in folder.iterdir() if pattern.match(p.name) and (p.is_file() or p.is_symlink())]


def write_atomic(target: Path, save: Callable[[Path], object]) -> None:
    """``save(path)`` to a new temporary file next to ``target``, then rename it over ``target``.

    The file gets the permissions of any new file (not ``mkstemp``'s private 0600). A failure leaves
    ``target`` as it was and removes the temporary file; temporary files of ``target`` that an
    earlier, killed write left are removed first.
    """
    target = Path(target)
    for stale in stale_temporaries(target):
        stale.unlink(missing_ok=True)
    prefix, suffix = _temp_parts(target, name_limit(target.parent))
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        save(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(target: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically, flushed to disk before the rename."""

    def save(path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(target, save)


def write_json(target: Path, value, indent: int | None = 1) -> None:
    """``value`` as JSON in ``target``, written atomically."""
    write_text(target, json.dumps(value, indent=indent))


def check_names(paths: Iterable[Path], what: str = "--out") -> None:
    """Refuse file names longer than their file system allows (``ValueError`` naming the first)."""
    limits: dict[Path, int] = {}
    for path in paths:
        path = Path(path)
        limit = limits.setdefault(path.parent, name_limit(path.parent))
        size = len(os.fsencode(path.name))
        if size > limit:
            raise ValueError(f"{what}: the file name {path.name[:40]}...{path.name[-20:]} is {size} bytes long; "
                             f"the file system of {path.parent} allows {limit}. Rename the input or choose a "
                             "shorter name")


def check_folder(folder: Path, what: str = "--out") -> Path:
    """``folder`` can hold new files: not a file, not a dangling link, and its nearest existing
    folder writable, and not in the folder of iseg's shipped models; ``ValueError`` naming ``what``
    otherwise. Nothing is created."""
    folder = Path(folder)
    here = Path(os.path.abspath(folder)).resolve()
    for shipped in registry.MODEL_DIRS:
        shipped = Path(shipped).resolve()
        if here == shipped or shipped in here.parents:
            where = "is" if here == shipped else "is inside"
            raise ValueError(f"{what} {folder} {where} {shipped}, the folder of the models that ship with iseg; "
                             f"files written there would mix with a shipped model's. Choose another {what}")
    for place in (folder, *folder.parents):
        if place.is_symlink() and not place.exists():
            target = os.readlink(place)
            whose = "" if place == folder else f": {place}"
            raise ValueError(f"{what} {folder}{whose} is a symbolic link to {target}, which does not exist; "
                             "create the folder it points to, or choose another")
        if place.exists():
            if not place.is_dir():
                whose = " is a file" if place == folder else f": {place} is a file"
                raise ValueError(f"{what} {folder}{whose}, not a folder; give a folder name")
            if not os.access(place, os.W_OK | os.X_OK):
                raise ValueError(f"{what} {folder}: the folder {place} is not writable; choose another")
            return folder
    return folder
