"""FastWan's student schedule as the nodes use it: the default timesteps and shift, the widget
parser, and the sigmas a native sampler steps through.

The one place in nodes/ that names these (the core's schedule is the source of truth), so a single
edit follows the core if it moves them.
"""
from __future__ import annotations

import math

from ..fastwan_core.errors import InputError
from ..fastwan_core.sampling import DEFAULT_SHIFT, DEFAULT_STUDENT_TIMESTEPS
from ..fastwan_core.schedule import student_sigmas

FASTWAN_TIMESTEPS = tuple(DEFAULT_STUDENT_TIMESTEPS)
FASTWAN_SHIFT = float(DEFAULT_SHIFT)
FASTWAN_TIMESTEPS_TEXT = ",".join(str(t) for t in FASTWAN_TIMESTEPS)


def parse_timesteps(text: str, where: str) -> tuple[float, ...]:
    """"1000,757,522" -> (1000.0, 757.0, 522.0); each in (0, 1000], strictly decreasing."""
    try:
        values = tuple(float(part) for part in str(text).replace(";", ",").split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise InputError(f"{where}: timesteps {text!r} is not a comma-separated list of numbers; "
                         f"FastWan uses {FASTWAN_TIMESTEPS_TEXT}")
    bad = [v for v in values if not (math.isfinite(v) and 0.0 < v <= 1000.0)]
    if bad:
        raise InputError(f"{where}: timesteps {text!r} has values outside (0, 1000]: {bad}; "
                         f"FastWan uses {FASTWAN_TIMESTEPS_TEXT}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise InputError(f"{where}: timesteps {text!r} must decrease from noise to clean "
                         f"(e.g. {FASTWAN_TIMESTEPS_TEXT})")
    return values


def check_shift(shift, where: str) -> float:
    shift = float(shift)
    if not (math.isfinite(shift) and shift > 0):
        raise InputError(f"{where}: shift {shift} must be a positive number (FastWan uses {FASTWAN_SHIFT})")
    return shift


def dmd_sigmas(timesteps, shift: float) -> list[float]:
    """The student's sigmas (1.0, 0.7568, 0.5217 for FastWan) followed by the final 0."""
    return list(student_sigmas(timesteps, shift)) + [0.0]
