"""Samplers: the few-step DMD sampler of the distilled student.

Every sampler draws its noise on the CPU from one seeded generator and then moves it, so the same
seed gives the same video on every device.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .schedule import predict_x0, sigma_to_timestep, student_sigmas

DEFAULT_STUDENT_TIMESTEPS = (1000, 757, 522)
DEFAULT_SHIFT = 8.0

# callback(step, total_steps, x0) after each step; raising from it (e.g. a user interrupt) stops
# the run between steps.
StepCallback = Callable[[int, int, torch.Tensor], None]


def seeded_noise(shape: Sequence[int], generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (device-independent for a given seed), then moved."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_dmd(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    shape: Sequence[int],
    seed: int,
    timesteps: Sequence[float] = DEFAULT_STUDENT_TIMESTEPS,
    shift: float = DEFAULT_SHIFT,
    callback: Optional[StepCallback] = None,
    device=None,
) -> torch.Tensor:
    """Few-step DMD sampling (no CFG).

    For each student sigma: v = model(x, 1000*sigma, context); x0 = x - sigma*v; re-noise x0 to the
    next sigma with fresh noise. Returns the last x0.

    Args:
        model: callable (x [B,...] float, timestep [B] float in 0..1000, context) -> velocity, same
            shape as x. A `WanDiT` or anything with that signature.
        context: conditioning passed through to the model, e.g. umT5 embeddings [B, L, 4096].
        shape: shape of the latents to sample, e.g. [B, 16, T, H, W] (normalized latent space).
        seed: seeds one CPU generator that draws all noise of the run.
        timesteps: the student's timesteps on the shifted grid (see `schedule.student_sigmas`).
        shift: the flow-matching timestep shift.
        callback: called as callback(step_index, num_steps, x0) after each step.
        device: where to run; defaults to the context's device.
    Returns:
        float32 normalized latents of `shape`.
    """
    if device is None:
        device = context.device if isinstance(context, torch.Tensor) else "cpu"
    sigmas = student_sigmas(timesteps, shift)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    batch = shape[0]
    x = seeded_noise(shape, generator, device)  # pure noise; sigmas[0] is 1.0 for a standard student
    x0 = x
    for step, sigma in enumerate(sigmas):
        t = torch.full((batch,), sigma_to_timestep(sigma), device=device, dtype=torch.float32)
        velocity = model(x, t, context).float()
        x0 = predict_x0(x, velocity, sigma)
        if step + 1 < len(sigmas):
            next_sigma = sigmas[step + 1]
            x = (1 - next_sigma) * x0 + next_sigma * seeded_noise(shape, generator, device)
        if callback is not None:
            callback(step, len(sigmas), x0)
    return x0
