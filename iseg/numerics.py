"""Non-finite numbers stop the run with an error that names where they appeared and what to check.

A NaN in the weights, a float16 overflow or a setting beyond float32's range would otherwise flow
through softmax, min-max scaling and argmax into a clean-looking all-background mask. Each stage
is checked with one ``isfinite`` reduction per tensor and one host synchronisation per group.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ["NonFiniteError", "check_finite", "check_scale"]


class NonFiniteError(FloatingPointError):
    """NaN or infinity in the method's numbers; the message names the stage and what to check."""


def check_finite(stages: Sequence[tuple[str, torch.Tensor | None, str]]) -> None:
    """``stages``: ``(where, tensor, what to check)`` in the order the method computes them.

    Raises ``NonFiniteError`` for the first stage with a NaN or an infinity (the earliest is the
    source; later ones only inherit it). One host synchronisation for all of them.
    """
    present = [(where, t, hint) for where, t, hint in stages if t is not None and t.is_floating_point()]
    if not present:
        return
    flags = torch.stack([torch.isfinite(t).all().to(present[0][1].device) for _, t, _ in present]).tolist()
    for ok, (where, t, hint) in zip(flags, present):
        if not ok:
            nan = bool(torch.isnan(t).any())
            kind = "NaN" if nan else "infinite values"
            raise NonFiniteError(f"{where} has {kind} (dtype {str(t.dtype).replace('torch.', '')}); check {hint}")


def check_scale(name: str, value) -> None:
    """A model config factor that multiplies every latent (the VAE's ``scaling_factor``) must be a
    finite non-zero number: 0 makes every image the same latent, NaN every latent NaN."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value == 0:
        raise NonFiniteError(f"the VAE's {name} is {value!r}: it must be a finite non-zero number "
                             "(check the VAE's config.json)")
