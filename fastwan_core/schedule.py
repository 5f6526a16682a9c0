"""The flow-matching noise schedule, written once.

Convention (Wan / rectified flow): x_t = (1 - sigma) * x0 + sigma * noise, the model predicts
v = noise - x0, so x0 = x_t - sigma * v, and the model is conditioned on t = 1000 * sigma.
The shift warps sigma towards noise: shifted = s * sigma / (1 + (s - 1) * sigma).

Training uses a grid of 1000 shifted sigmas (unshifted 1, 0.999, ..., 0.001). A few-step student's
timesteps such as (1000, 757, 522) are points of that *shifted* grid: each snaps to the nearest
grid entry, giving sigma = 1.0, 0.7568, 0.5217 at shift 8.

FastWan's own schedule (the timesteps its student was distilled for, and their shift) and the parser
of user-typed timesteps live here too, so the sampler, the CLI, the node, the trainer and the toy
all read the same values.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .errors import InputError

NUM_TRAIN_TIMESTEPS = 1000

# The FastWan student's timesteps on the shifted grid, and that grid's shift (DESIGN §5).
FASTWAN_TIMESTEPS = (1000, 757, 522)
FASTWAN_SHIFT = 8.0
FASTWAN_TIMESTEPS_TEXT = ",".join(str(t) for t in FASTWAN_TIMESTEPS)  # as users type it: "1000,757,522"


def shift_sigma(sigma, shift: float):
    """Apply the timestep shift to sigma in [0, 1] (float or tensor)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_grid(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The training grid: shifted sigmas, descending from 1.0, float64 [num_train_timesteps]."""
    unshifted = torch.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=torch.float64)
    return shift_sigma(unshifted, shift)


def sigma_to_timestep(sigma):
    """The model is conditioned on t = 1000 * sigma (sigma already shifted)."""
    return sigma * NUM_TRAIN_TIMESTEPS


def student_sigmas(timesteps: Sequence[float], shift: float) -> list[float]:
    """Few-step student: timesteps on the shifted grid (e.g. 1000, 757, 522) -> their sigmas
    (1.0, 0.7568, 0.5217 at shift 8), each snapped to the nearest grid entry."""
    grid_timesteps = sigma_grid(shift) * NUM_TRAIN_TIMESTEPS
    sigmas = []
    for t in timesteps:
        t = float(t)
        if not 0.0 < t <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"student timestep {t} is outside (0, {NUM_TRAIN_TIMESTEPS}]")
        index = int(torch.argmin((grid_timesteps - t).abs()))
        sigmas.append(float(grid_timesteps[index]) / NUM_TRAIN_TIMESTEPS)
    return sigmas


def parse_timesteps(text: str, where: str = "timesteps") -> tuple[float, ...]:
    """User text "1000,757,522" -> (1000.0, 757.0, 522.0): student timesteps, one model call each.

    Commas (or semicolons) separate the values; spaces are ignored. Each value must lie in
    (0, 1000] and the list must decrease (noise to clean). Raises InputError naming `where` (the
    CLI option or node input the text came from).
    """
    try:
        values = tuple(float(part) for part in str(text).replace(";", ",").split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise InputError(f"{where} {text!r} is not a comma-separated list of numbers; FastWan uses {FASTWAN_TIMESTEPS_TEXT}")
    check_timesteps(values, where, shown=repr(text))
    return values


def check_timesteps(values: Sequence[float], where: str = "timesteps", shown: Optional[str] = None) -> None:
    """The rule for student timesteps, however they arrive (text, config list, API tuple): one or
    more numbers in (0, 1000], decreasing from noise to clean. Raises InputError naming `where`."""
    shown = shown or ",".join(map(str, values))
    if not values:
        raise InputError(f"{where} is empty; FastWan uses {FASTWAN_TIMESTEPS_TEXT}")
    bad = [v for v in values
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v <= NUM_TRAIN_TIMESTEPS and math.isfinite(v))]
    if bad:
        raise InputError(f"{where} {shown} has values outside (0, {NUM_TRAIN_TIMESTEPS}]: {bad}; "
                         f"FastWan uses {FASTWAN_TIMESTEPS_TEXT}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise InputError(f"{where} {shown} must decrease from noise to clean (e.g. {FASTWAN_TIMESTEPS_TEXT})")


def check_shift(shift, where: str = "shift", hint: str = f"FastWan uses {FASTWAN_SHIFT}") -> float:
    """The rule for a flow-matching shift, however it arrives (CLI, API, config, node): a finite
    number > 0. Returns it as a float; raises InputError naming `where`, with `hint` as the fix."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (math.isfinite(shift) and shift > 0):
        raise InputError(f"{where} {shift}: the flow shift must be a number > 0 ({hint})")
    return float(shift)


def teacher_sigmas(num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """The sigma grid of Wan's multi-step flow sampler (and diffusers' WanPipeline): `num_steps`
    shifted values of linspace(1, 1/num_train_timesteps, num_steps + 1)[:-1], then a final 0.

    This is the grid of diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift),
    which starts at sigma = 1 - 1e-6 rather than 1 (to keep its log-SNR finite); we start at 1.
    Returns num_steps + 1 floats, descending from 1.0 to 0.0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1, dtype=torch.float64)[:-1]
    return [float(s) for s in shift_sigma(base, shift)] + [0.0]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise; sigma a float or a [B] tensor."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0 + sigma * noise


def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x_t - sigma * v."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (x_t.ndim - 1)))
    return x_t - sigma * velocity
