"""The ``iseg`` command: one program, one subcommand per task.

    iseg segment IMAGE... --classes cat,dog --out DIR     segment images
    iseg eval --dataset voc --root VOC2012 --out DIR      evaluate on a dataset (also ``iseg eval``)
    iseg labels --split val                               thresholds of the attention label predictor
    iseg bench --model shapes --batch-sizes 1 8           speed and memory
    iseg train-shapes --out FOLDER                        train the shapes model
    iseg eval-shapes --split val --out val.json           sweep the shapes world's settings

Every subcommand is a module's ``add_arguments(parser)`` and ``run(args) -> int``; this module only
puts them together, with the conventions they share: kebab-case options, ``--model``, ``--device``,
``--preset`` and ``--set KEY=VALUE`` where a command runs the method, ``--out`` for where results go,
and ``--overwrite`` to replace earlier results there (refused without it). A mistake on the command
line is one ``iseg: error: ...`` line and exit status 2, never a traceback; a failure inside torch or
PIL is one line naming its type, exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from .. import __version__
from .options import CommandError, command_options, parse_command, run_command

__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]


# name, module, one line for ``iseg --help``, description (None: the module's docstring)
COMMANDS: list[tuple[str, str, str, str | None]] = [
    ("segment", "iseg.commands.segment", "segment images into named classes", None),
    ("eval", "iseg.evaluation.run", "evaluate on a dataset (WSSS or open vocabulary)", None),
    ("labels", "iseg.shapes.calibrate", "choose or score the attention label thresholds",
     "Attention label prediction on the shapes world: choose the thresholds of iseg.labels' 'attention' method "
     "on a split, or score fixed thresholds (--min-share, --min-peak)."),
    ("bench", "iseg.commands.bench", "speed and memory against the hardware floor", None),
    ("train-shapes", "iseg.shapes.train", "train the shapes model (or fine-tune it)", None),
    ("eval-shapes", "iseg.shapes.evaluate", "sweep timestep, lam and N on the shapes world", None),
]


# -- assembling -----------------------------------------------------------------------------------------
def _module(path: str):
    # the command modules import torch and diffusers' helpers; they are loaded when the parser is built
    return importlib.import_module(path)


class _CommandsFormatter(argparse.HelpFormatter):
    """Every command and its help on one line (argparse measures the commands without their indent)."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            longest = max(map(len, action.choices))
            self._action_max_length = max(self._action_max_length, self._current_indent + 4 + longest)


def build_parser() -> argparse.ArgumentParser:
    """The ``iseg`` parser: one subparser per entry of ``COMMANDS``."""
    p = argparse.ArgumentParser(prog="iseg", description="Training-free segmentation with the iSeg method.",
                                epilog="'iseg COMMAND --help' describes a command and its options.",
                                formatter_class=_CommandsFormatter)
    p.add_argument("--version", action="version", version=f"iseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, path, help_line, description in COMMANDS:
        s = sub.add_parser(name, help=help_line, formatter_class=argparse.RawDescriptionHelpFormatter)
        command_options(s, _module(path), description)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The ``iseg`` command."""
    return run_command(parse_command(build_parser(), argv))

