"""DMD (Distribution Matching Distillation) as pure, model-agnostic functions.

Shared by the 2D toy benchmark (`training/toy.py`) and the real trainer (`training/trainer.py`), so
the code the toy proves is the code that distills Wan. A "model" here is any callable
`model(x, timestep, context) -> velocity` with x [B, ...] float, timestep [B] float in 0..1000 (that
is 1000 * sigma), and the flow-matching convention of `fastwan_core/schedule.py`:
x_t = (1 - sigma) x0 + sigma noise, v = noise - x0, x0 = x_t - sigma v.

Three networks take part:
- the student (generator): few-step sampler whose output distribution we train;
- the real score: the frozen teacher, queried with classifier-free guidance;
- the fake score: a trainable copy of the teacher that tracks the student's output distribution
  by flow matching on the student's samples.
The generator step moves student samples along (fake score - real score), i.e. down the KL between
the student's and the teacher's noised distributions.

Guidance convention: `real_guidance_scale` is the *standard* classifier-free guidance scale s,
    real = uncond + s (cond - uncond) = cond + (s - 1)(cond - uncond).
The reference recipe writes its guidance as "cond + 3.5 (cond - uncond)", which is s = 4.5 here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..fastwan_core.sampling import classifier_free_guidance
from ..fastwan_core.schedule import (FASTWAN_SHIFT, FASTWAN_TIMESTEPS, add_noise, predict_x0, sigma_grid,
                                     sigma_to_timestep, student_sigmas)

Model = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class DMDSettings:
    """The numbers of one DMD recipe (defaults: the 1.3B FastWan recipe, DESIGN §5).

    student_timesteps: the student's timesteps on the shifted 1000-step grid.
    shift: flow-matching timestep shift, used for the student grid and for the DMD time draw.
    dmd_min_ratio / dmd_max_ratio: the DMD time draw is clamped to sigma in [min, max].
    real_guidance_scale: standard CFG scale of the real score (4.5 == the reference's "3.5").
    generator_update_interval: the generator is updated on every N-th step (fake score every step).
    """

    student_timesteps: tuple = FASTWAN_TIMESTEPS
    shift: float = FASTWAN_SHIFT
    dmd_min_ratio: float = 0.02
    dmd_max_ratio: float = 0.98
    real_guidance_scale: float = 4.5
    generator_update_interval: int = 5


def reference_guidance_to_standard(reference_scale: float) -> float:
    """The reference recipe's "cond + g (cond - uncond)" weight g -> the standard CFG scale g + 1."""
    return reference_scale + 1.0


def apply_guidance(cond: torch.Tensor, uncond: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Standard classifier-free guidance, `fastwan_core.sampling.classifier_free_guidance`."""
    return classifier_free_guidance(cond, uncond, scale)


def draw_dmd_sigmas(batch: int, generator: torch.Generator, shift: float, min_ratio: float = 0.02,
                    max_ratio: float = 0.98) -> torch.Tensor:
    """The DMD noise level: a uniform draw over the 1000-entry shifted sigma grid, clamped.

    Returns float32 sigmas [batch] on the CPU (drawn from `generator`, which must be a CPU generator
    so that runs are reproducible on every device).
    """
    grid = sigma_grid(shift).to(torch.float32)  # [1000], descending from 1.0
    index = torch.randint(0, grid.numel(), (batch,), generator=generator)
    return grid[index].clamp(min_ratio, max_ratio)


def draw_student_sigmas(batch: int, generator: torch.Generator, sigmas: Sequence[float]) -> torch.Tensor:
    """One of the student's sigmas per sample, uniformly; float32 [batch] on the CPU."""
    table = torch.tensor(list(sigmas), dtype=torch.float32)
    index = torch.randint(0, table.numel(), (batch,), generator=generator)
    return table[index]


def generator_loss(x0: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """The DMD generator loss.

    grad = (fake_x0 - real_x0) / mean|x0 - real_x0|   (mean over all but the batch dim, per sample)
    loss = 0.5 * MSE(x0, stopgrad(x0 - grad))
    so d loss / d x0 = grad / x0.numel(): the student sample moves against (fake - real).

    Args: x0 [B, ...] the student's sample (with grad); fake_x0, real_x0 [B, ...] the fake and real
    scores' x0 predictions of the noised sample (no grad needed). Computed in float32.
    Returns: a scalar float32 loss.
    """
    x0 = x0.float()
    real_x0 = real_x0.detach().float()
    fake_x0 = fake_x0.detach().float()
    reduce_dims = tuple(range(1, x0.ndim))
    normalizer = (x0.detach() - real_x0).abs().mean(dim=reduce_dims, keepdim=True)
    grad = (fake_x0 - real_x0) / normalizer
    # A sample exactly on the real prediction gives 0/0; that sample carries no signal.
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def fake_score_loss(velocity: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the fake score: MSE(v, noise - x0), float32 scalar.

    velocity [B, ...]: the fake score's prediction at x_t = (1 - sigma) x0 + sigma noise.
    """
    return F.mse_loss(velocity.float(), (noise.float() - x0.float()).detach())


def _timestep(sigma: torch.Tensor) -> torch.Tensor:
    return sigma_to_timestep(sigma).to(torch.float32)


def student_x0(student: Model, data_x0: torch.Tensor, context, sigma: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
    """One student forward from a data sample noised to the student sigma: returns x0 [B, ...].

    sigma [B] (already on data_x0's device), noise like data_x0. Gradients flow unless the caller
    wraps this in no_grad.
    """
    x_t = add_noise(data_x0, noise, sigma)
    velocity = student(x_t, _timestep(sigma), context)
    return predict_x0(x_t, velocity.float(), sigma)


@dataclass
class StepDraws:
    """All random numbers of one DMD step, drawn on the CPU from one generator, then moved."""

    student_sigma: torch.Tensor  # [B]
    student_noise: torch.Tensor  # like x0
    dmd_sigma: torch.Tensor  # [B]
    dmd_noise: torch.Tensor  # like x0

    @classmethod
    def draw(cls, shape, generator: torch.Generator, settings: DMDSettings, device,
             student_sigma_table: Optional[Sequence[float]] = None) -> "StepDraws":
        if student_sigma_table is None:
            student_sigma_table = student_sigmas(settings.student_timesteps, settings.shift)
        batch = shape[0]
        student_sigma = draw_student_sigmas(batch, generator, student_sigma_table)
        student_noise = torch.randn(tuple(shape), generator=generator)
        dmd_sigma = draw_dmd_sigmas(batch, generator, settings.shift, settings.dmd_min_ratio,
                                    settings.dmd_max_ratio)
        dmd_noise = torch.randn(tuple(shape), generator=generator)
        return cls(student_sigma.to(device), student_noise.to(device), dmd_sigma.to(device), dmd_noise.to(device))


def generator_step_loss(student: Model, real_score: Model, fake_score: Model, data_x0: torch.Tensor,
                        context, negative_context, draws: StepDraws, guidance_scale: float) -> torch.Tensor:
    """The generator's DMD loss for one batch (the student forward carries grad; scores do not).

    data_x0 [B, ...]: data samples (normalized latents), noised to the drawn student sigma.
    context / negative_context: conditioning for the student & scores / for the real score's
    unconditional branch (None: no guidance).
    """
    x0 = student_x0(student, data_x0, context, draws.student_sigma, draws.student_noise)
    with torch.no_grad():
        x_t = add_noise(x0.detach(), draws.dmd_noise, draws.dmd_sigma)
        t = _timestep(draws.dmd_sigma)
        real_cond = real_score(x_t, t, context).float()
        real_uncond = None
        if negative_context is not None and guidance_scale != 1.0:
            real_uncond = real_score(x_t, t, negative_context).float()
        real_v = apply_guidance(real_cond, real_uncond, guidance_scale)
        real_x0 = predict_x0(x_t.float(), real_v, draws.dmd_sigma)
        fake_x0 = predict_x0(x_t.float(), fake_score(x_t, t, context).float(), draws.dmd_sigma)
    return generator_loss(x0, fake_x0, real_x0)


def fake_score_step_loss(student: Model, fake_score: Model, data_x0: torch.Tensor, context,
                         draws: StepDraws) -> torch.Tensor:
    """The fake score's flow-matching loss on a fresh (no-grad) student sample."""
    with torch.no_grad():
        x0 = student_x0(student, data_x0, context, draws.student_sigma, draws.student_noise).detach()
    x_t = add_noise(x0, draws.dmd_noise, draws.dmd_sigma)
    velocity = fake_score(x_t, _timestep(draws.dmd_sigma), context)
    return fake_score_loss(velocity, draws.dmd_noise, x0)


def is_generator_step(step: int, interval: int) -> bool:
    """Steps count from 1; the generator is updated on steps interval, 2*interval, ..."""
    return step % interval == 0
