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

The settings are the config's `[dmd]` section (`config.DMDSection`); a named recipe fills them
(`config.RECIPES`). Besides plain DMD a recipe can add, against DMD's mode-seeking:
- a regression of the student onto the teacher's samples: from their noise at the first step (DMD),
  or at every step from the teacher ODE's own state at that step's sigma (CausVid),
- DMD2's GAN term: a small head on the fake score's features tells real data from student samples,
  the fake score's own loss trains it, the generator gets the non-saturating loss,
- more fake-score updates per step, so that the fake score keeps up with the student.

Guidance convention: `real_guidance_scale` is the *standard* classifier-free guidance scale s,
    real = uncond + s (cond - uncond) = cond + (s - 1)(cond - uncond).
The reference recipe writes its guidance as "cond + 3.5 (cond - uncond)", which is s = 4.5 here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fastwan_core.sampling import classifier_free_guidance
from ..fastwan_core.schedule import add_noise, predict_x0, sigma_grid, sigma_to_timestep, student_sigmas
from .config import DMDSection

Model = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


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


def draw_student_steps(batch: int, generator: torch.Generator,
                       sigmas: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the student's steps per sample, uniformly: (step index int64 [batch], its sigma
    float32 [batch]), on the CPU."""
    table = torch.tensor(list(sigmas), dtype=torch.float32)
    index = torch.randint(0, table.numel(), (batch,), generator=generator)
    return index, table[index]


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
    student_step: torch.Tensor  # [B] int64: the index of student_sigma in the student's sigmas

    @classmethod
    def draw(cls, shape, generator: torch.Generator, settings: DMDSection, device,
             student_sigma_table: Optional[Sequence[float]] = None) -> "StepDraws":
        if student_sigma_table is None:
            student_sigma_table = student_sigmas(settings.student_timesteps, settings.shift)
        batch = shape[0]
        student_step, student_sigma = draw_student_steps(batch, generator, student_sigma_table)
        student_noise = torch.randn(tuple(shape), generator=generator)
        dmd_sigma = draw_dmd_sigmas(batch, generator, settings.shift, settings.dmd_min_ratio,
                                    settings.dmd_max_ratio)
        dmd_noise = torch.randn(tuple(shape), generator=generator)
        return cls(student_sigma.to(device), student_noise.to(device), dmd_sigma.to(device), dmd_noise.to(device),
                   student_step.to(device))


class FeatureTap:
    """Keeps the output of one submodule of a network from its latest forward (a forward hook), so
    the GAN head reads the fake score's features without the network knowing about it."""

    def __init__(self, module: nn.Module):
        self.features: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.features = output

    def take(self) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("FeatureTap: the tapped module did not run in the last forward")
        return features

    def remove(self) -> None:
        self._handle.remove()


class GANHead(nn.Module):
    """DMD2's discriminator head on the fake score's features: a logit per sample.

    features [B, ..., D] (tokens or points of each sample) -> LayerNorm, Linear, SiLU, Linear -> one
    logit per token, averaged over all but the batch dim: [B] float32.
    """

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.net(features.float()).squeeze(-1)
        return logits.reshape(logits.shape[0], -1).mean(dim=1)


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(fake)) = -log sigmoid(D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: -log sigmoid(D(real)) - log(1 - sigmoid(D(fake)))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


@dataclass
class RegressionData:
    """The teacher's side of the regression term, for a batch like data_x0.

    teacher_sample: the teacher's samples (the target).
    noise: the noise each sample's teacher ODE started from (`fastwan synth` keeps it), for
        regression_inputs "noise" and "line".
    trajectory: [K, *teacher_sample.shape], the teacher ODE's state at each of the K student sigmas
        (`fastwan synth --trajectory`), for regression_inputs "trajectory".
    """

    teacher_sample: torch.Tensor
    noise: Optional[torch.Tensor] = None
    trajectory: Optional[torch.Tensor] = None


def regression_input(data: RegressionData, draws: StepDraws, settings: DMDSection,
                     student_sigma_table: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the regression's student forward starts: (x, sigma), by settings.regression_inputs.

    - "noise": at the first student sigma, on the line between the pair (at sigma 1: the noise itself),
      DMD's regression of the one-step map onto the teacher's noise -> sample map.
    - "line": at each sample's drawn student sigma, on the straight line between noise and sample
      (reflow's target; the line is not the teacher's path, so its marginals are not the student's inputs).
    - "trajectory": at each sample's drawn student step, the teacher ODE's own state at that sigma.
      The ODE is a bijection, so the sample is a function of that state and the target does not blur;
      and the states have the marginals of noised data, which is what the student sees at that step.
    draws.student_sigma / student_step broadcast against the sample (one per sample, or per point).
    """
    mode = settings.regression_inputs
    sample = data.teacher_sample
    if mode == "trajectory":
        if data.trajectory is None:
            raise ValueError("regression_input: regression_inputs = \"trajectory\" needs the teacher's ODE states")
        step = draws.student_step
        step = step.view(-1, *([1] * (sample.ndim - 1))) if step.ndim == 1 else step
        index = step.expand(sample.shape)[None]  # [1, *sample.shape]
        x = torch.gather(data.trajectory, 0, index.to(data.trajectory.device))[0]
        return x.float(), draws.student_sigma
    if data.noise is None:
        raise ValueError(f"regression_input: regression_inputs = {mode!r} needs the noise of each teacher sample")
    if mode == "line":
        sigma = draws.student_sigma
    else:
        sigma = torch.full((sample.shape[0],), float(student_sigma_table[0]), device=sample.device)
    return add_noise(sample.float(), data.noise.float(), sigma), sigma


def regression_loss(student: Model, x: torch.Tensor, teacher_sample: torch.Tensor, context,
                    sigma: torch.Tensor) -> torch.Tensor:
    """MSE between teacher_sample and the student's x0 from the input x at sigma (`regression_input`).

    sigma: [B], or one per element group broadcasting against x.
    """
    velocity = student(x, _timestep(sigma), context)
    x0 = predict_x0(x, velocity.float(), sigma)
    return F.mse_loss(x0, teacher_sample.float().detach())


@dataclass
class GANParts:
    """What the GAN term needs: the head and the tap on the fake score's feature layer."""

    head: GANHead
    tap: FeatureTap


def generator_step_losses(student: Model, real_score: Model, fake_score: Model, data_x0: torch.Tensor,
                          context, negative_context, draws: StepDraws, settings: DMDSection,
                          gan: Optional[GANParts] = None, regression: Optional[RegressionData] = None,
                          student_sigma_table: Optional[Sequence[float]] = None) -> dict:
    """The generator's losses for one batch, weighted: {"dmd", and "gan" / "regression" when on}.

    The student forward carries grad; the real score never does. data_x0 [B, ...]: data samples
    (normalized latents), noised to the drawn student sigma. context / negative_context: conditioning
    for the student & scores / for the real score's unconditional branch (None: no guidance).
    gan: needed when settings.gan_generator_weight > 0; the fake score then runs with grad, so the
    head's verdict on the noised student sample reaches the student (the DMD term stays detached).
    regression: the teacher's samples and the inputs settings.regression_inputs names, needed when
    settings.regression_weight > 0. student_sigma_table: the student's sigmas (default: the settings').
    """
    x0 = student_x0(student, data_x0, context, draws.student_sigma, draws.student_noise)
    use_gan = settings.gan_generator_weight > 0
    with torch.no_grad():
        x_t = add_noise(x0.detach(), draws.dmd_noise, draws.dmd_sigma)
        t = _timestep(draws.dmd_sigma)
        real_cond = real_score(x_t, t, context).float()
        real_uncond = None
        if negative_context is not None and settings.real_guidance_scale != 1.0:
            real_uncond = real_score(x_t, t, negative_context).float()
        real_v = apply_guidance(real_cond, real_uncond, settings.real_guidance_scale)
        real_x0 = predict_x0(x_t.float(), real_v, draws.dmd_sigma)
    losses = {}
    if use_gan:
        if gan is None:
            raise ValueError("generator_step_losses: gan_generator_weight > 0 needs the GAN head (gan=GANParts)")
        x_t = add_noise(x0, draws.dmd_noise, draws.dmd_sigma)  # with grad, for the head's verdict
        fake_v = fake_score(x_t, t, context).float()
        losses["gan"] = settings.gan_generator_weight * gan_generator_loss(gan.head(gan.tap.take()))
        fake_v = fake_v.detach()
    else:
        with torch.no_grad():
            fake_v = fake_score(x_t, t, context).float()
    fake_x0 = predict_x0(x_t.detach().float(), fake_v, draws.dmd_sigma)
    losses["dmd"] = generator_loss(x0, fake_x0, real_x0)
    if settings.regression_weight > 0:
        if regression is None:
            raise ValueError("generator_step_losses: regression_weight > 0 needs the teacher's samples (regression=)")
        if student_sigma_table is None:
            student_sigma_table = student_sigmas(settings.student_timesteps, settings.shift)
        x, sigma = regression_input(regression, draws, settings, student_sigma_table)
        losses["regression"] = settings.regression_weight * regression_loss(student, x, regression.teacher_sample,
                                                                             context, sigma)
    return losses


def fake_score_step_losses(student: Model, fake_score: Model, data_x0: torch.Tensor, context,
                           draws: StepDraws, settings: DMDSection, gan: Optional[GANParts] = None,
                           real_draws: Optional[StepDraws] = None) -> dict:
    """The fake score's losses, weighted: {"flow_matching", and "gan" when on}.

    Flow matching on a fresh (no-grad) student sample. With settings.gan_discriminator_weight > 0 the
    head (and through it the fake score) also learns to tell that noised student sample from data_x0
    noised with `real_draws` (its DMD sigma and noise).
    """
    with torch.no_grad():
        x0 = student_x0(student, data_x0, context, draws.student_sigma, draws.student_noise).detach()
    x_t = add_noise(x0, draws.dmd_noise, draws.dmd_sigma)
    velocity = fake_score(x_t, _timestep(draws.dmd_sigma), context)
    losses = {"flow_matching": fake_score_loss(velocity, draws.dmd_noise, x0)}
    if settings.gan_discriminator_weight > 0:
        if gan is None or real_draws is None:
            raise ValueError("fake_score_step_losses: gan_discriminator_weight > 0 needs gan and real_draws")
        fake_logits = gan.head(gan.tap.take())
        real_t = add_noise(data_x0, real_draws.dmd_noise, real_draws.dmd_sigma)
        fake_score(real_t, _timestep(real_draws.dmd_sigma), context)
        real_logits = gan.head(gan.tap.take())
        losses["gan"] = settings.gan_discriminator_weight * gan_discriminator_loss(real_logits, fake_logits)
    return losses


def is_generator_step(step: int, interval: int) -> bool:
    """Steps count from 1; the generator is updated on steps interval, 2*interval, ..."""
    return step % interval == 0
