"""What the subcommands of ``iseg`` share: the ``CommandError`` they raise for a mistake on the
command line, and the options and checks they have in common (``--set``, ``--overwrite``,
``--device``, ``--out FILE``). Each command's module imports these; ``iseg.commands.main`` assembles the
commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..loading import resolve_device
from ..presets import make_settings, parse_overrides
from .files import check_folder, check_names

__all__ = ["CommandError", "add_set_option", "overwrite_option", "settings_overrides", "device_option", "output_file",
           "command_options", "parse_command", "run_command"]


class CommandError(ValueError):
    """A mistake on the command line: printed as one ``iseg: error: ...`` line, exit status 2."""


# -- options and checks the commands share ----------------------------------------------------------
def add_set_option(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE ...``: setting overrides; may be given several times."""
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override settings (values read as JSON), e.g. --set lam=0.1 iterations=5")


def overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} (refused without it)")


def settings_overrides(values, preset: str | None) -> dict:
    """The ``--set`` overrides, checked together with ``--preset``; errors name the option."""
    try:
        overrides = parse_overrides(values)
    except ValueError as err:
        raise CommandError(f"--set: {err}") from None
    try:
        make_settings(preset, **overrides)
    except ValueError as err:
        raise CommandError(f"--preset: {err}") from None
    return overrides


def device_option(value):
    """``--device`` as a ``torch.device`` (None: CUDA when present), an error naming the option."""
    try:
        return resolve_device(value)
    except ValueError as err:
        raise CommandError(f"--device: {err}") from None


def output_file(path: Path | None, overwrite: bool, prog: str = "iseg") -> Path | None:
    """Check ``--out FILE`` before any work: not a folder, its folder not a file, and an existing
    file only replaced with ``--overwrite`` (then it says so)."""
    if path is None:
        return None
    if not str(path).strip():
        raise CommandError("--out is empty; give a file name")
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"--out {path} is a folder; give a file name")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise CommandError(f"--out {path}: {parent} is a file, not a folder")
    try:  # a dangling link or a read-only folder on the way, or a name too long: refused before any work
        check_folder(path.parent, f"--out {path}: the folder")
        check_names([path], "--out")
    except ValueError as err:
        raise CommandError(str(err)) from None
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise CommandError(f"--out {path} already exists; pass --overwrite to replace it, or choose another --out")
        print(f"{prog}: --overwrite: replacing {path}", file=sys.stderr)
    return path


# -- running one command ---------------------------------------------------------------------------------
def command_options(parser: argparse.ArgumentParser, module, description: str | None):
    """Give ``parser`` the options of a command module (its ``add_arguments``) and its description."""
    parser.description = description if description is not None else module.__doc__
    module.add_arguments(parser)
    parser.set_defaults(_module=module, _parser=parser)
    return parser


def parse_command(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv``; an unknown option is named by the command's own parser."""
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's parser, whose usage is the one that helps
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def run_command(args: argparse.Namespace, prog: str = "iseg") -> int:
    """Run a parsed command; every error is one ``PROG: error: ...`` line."""
    module = args._module
    # the command sees its own options only (train-shapes records them in its checkpoint)
    args = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"})
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        hint = getattr(module, "INTERRUPT_HINT", "")
        print(f"{prog}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, *getattr(module, "USER_ERRORS", ())) as err:
        # bad input: its message says what and how to fix it
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - torch and PIL failures: one line, named by type, never a traceback
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
