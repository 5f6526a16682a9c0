"""FastWan's student schedule as the nodes use it: the default timesteps and shift, the widget
parser, and the sigmas a native sampler steps through.

The values and the timestep rule come from fastwan_core/schedule.py; this module only words them
for nodes (messages name the node).
"""
from __future__ import annotations

from ..fastwan_core.schedule import FASTWAN_SHIFT, FASTWAN_TIMESTEPS, FASTWAN_TIMESTEPS_TEXT, student_sigmas
from ..fastwan_core.schedule import check_shift as check_shift_rule
from ..fastwan_core.schedule import parse_timesteps as parse_timesteps_text

__all__ = ["FASTWAN_SHIFT", "FASTWAN_TIMESTEPS", "FASTWAN_TIMESTEPS_TEXT", "check_shift", "dmd_sigmas",
           "parse_timesteps"]


def parse_timesteps(text: str, where: str) -> tuple[float, ...]:
    """The core's parser, its messages naming the node: "<node>: timesteps '...' ..."."""
    return parse_timesteps_text(text, where=f"{where}: timesteps")


def check_shift(shift, where: str) -> float:
    """The core's shift rule, its message naming the node."""
    return check_shift_rule(float(shift), where=f"{where}: shift")


def dmd_sigmas(timesteps, shift: float) -> list[float]:
    """The student's sigmas (1.0, 0.7568, 0.5217 for FastWan) followed by the final 0."""
    return list(student_sigmas(timesteps, shift)) + [0.0]
