"""Samplers: the few-step DMD sampler of the distilled student, and the multi-step teacher samplers
(Euler and UniPC, with classifier-free guidance) for dense baselines and data synthesis.

Every sampler draws its noise on the CPU from one seeded generator and then moves it, so the same
seed gives the same video on every device.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .schedule import FASTWAN_SHIFT, FASTWAN_TIMESTEPS, predict_x0, sigma_to_timestep, student_sigmas, teacher_sigmas

# callback(step, total_steps, x0) after each step; raising from it (e.g. a user interrupt) stops
# the run between steps.
StepCallback = Callable[[int, int, torch.Tensor], None]


def seeded_noise(shape: Sequence[int], generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (device-independent for a given seed), then moved."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def _start(context, shape: Sequence[int], seed: int, device):
    """What every sampler starts from: (device, the run's CPU generator, pure noise x of `shape`).
    The device defaults to the context's."""
    if device is None:
        device = context.device if isinstance(context, torch.Tensor) else "cpu"
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return device, generator, seeded_noise(shape, generator, device)


class ODEStates:
    """The states x(sigma) of a teacher's flow ODE at given sigmas, taken while a sampler steps.

    A sampler calls `observe(sigma, next_sigma, x, x0)` at each step, with x its state at `sigma`
    and x0 the (guided) data prediction there. A wanted sigma s in (next_sigma, sigma] is read off
    the first-order step from that state, x(s) = x0 + (s / sigma)(x - x0): the flow's straight line
    through x and x0, exact where the ODE's x0 prediction is constant over the step, and the Euler
    step itself. So the sampler's grid need not hold the wanted sigmas (the student's sigmas on the
    shift-8 grid are not points of the teacher's shift-5 grid). At s = sigma (within 1e-5: UniPC
    starts at 1 - 1e-6 for a student's 1.0) the state is x itself.

    These are the inputs of the regression term's ODE-trajectory targets ([dmd] regression_inputs =
    "trajectory"): the teacher's state at each student sigma, whose endpoint is the stored sample.
    """

    def __init__(self, sigmas: Sequence[float]):
        self.sigmas = [float(s) for s in sigmas]
        self.states: list[Optional[torch.Tensor]] = [None] * len(self.sigmas)

    def observe(self, sigma: float, next_sigma: float, x: torch.Tensor, x0: torch.Tensor) -> None:
        for index, wanted in enumerate(self.sigmas):
            if self.states[index] is not None or not next_sigma < wanted <= sigma + 1e-5:
                continue
            if abs(wanted - sigma) <= 1e-5:
                self.states[index] = x.float().clone()
            else:
                self.states[index] = (x0 + (wanted / sigma) * (x - x0)).float()

    def stacked(self) -> torch.Tensor:
        """[B, K, ...]: the state at each wanted sigma, in the order given."""
        missing = [s for s, state in zip(self.sigmas, self.states) if state is None]
        if missing:
            raise ValueError(f"ODEStates: the sampler never passed sigma {missing} (its grid starts below them)")
        return torch.stack(self.states, dim=1)


def _timestep(sigma: float, batch: int, device) -> torch.Tensor:
    """The model's conditioning [batch] for one sigma: t = 1000 * sigma."""
    return torch.full((batch,), sigma_to_timestep(sigma), device=device, dtype=torch.float32)


@torch.no_grad()
def sample_dmd(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    shape: Sequence[int],
    seed: int,
    timesteps: Sequence[float] = FASTWAN_TIMESTEPS,
    shift: float = FASTWAN_SHIFT,
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
    sigmas = student_sigmas(timesteps, shift)
    device, generator, x = _start(context, shape, seed, device)  # sigmas[0] is 1.0 for a standard student
    x0 = x
    for step, sigma in enumerate(sigmas):
        velocity = model(x, _timestep(sigma, shape[0], device), context).float()
        x0 = predict_x0(x, velocity, sigma)
        if step + 1 < len(sigmas):
            next_sigma = sigmas[step + 1]
            x = (1 - next_sigma) * x0 + next_sigma * seeded_noise(shape, generator, device)
        if callback is not None:
            callback(step, len(sigmas), x0)
    return x0


# ---------------------------------------------------------------------------------------------
# Multi-step teacher sampling (dense baselines, data synthesis)

DEFAULT_TEACHER_STEPS = 50
DEFAULT_TEACHER_SHIFT = 5.0  # Wan2.1 text-to-video's default sample shift
DEFAULT_GUIDANCE = 5.0  # Wan2.1 text-to-video's default guidance scale


def classifier_free_guidance(cond: torch.Tensor, uncond: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Standard classifier-free guidance: uncond + scale * (cond - uncond), elementwise.

    The form of Wan's and diffusers' samplers; it equals cond + (scale - 1)(cond - uncond), so the
    DMD recipe's "cond + 3.5 (cond - uncond)" is scale 4.5. The weights sum to one, so guidance
    commutes with the affine x0 = x_t - sigma * v: it applies to velocities and x0 predictions
    alike. Scale 1, or no uncond, returns cond itself.
    """
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def guided_velocity(model, x: torch.Tensor, timestep: torch.Tensor, context, negative_context,
                    guidance: float) -> torch.Tensor:
    """The model's velocity under `classifier_free_guidance`, float32.

    guidance 1 (or no negative context) is the conditional velocity alone, one model call.
    """
    v_cond = model(x, timestep, context).float()
    if negative_context is None or guidance == 1.0:
        return v_cond
    v_uncond = model(x, timestep, negative_context).float()
    return classifier_free_guidance(v_cond, v_uncond, guidance)


@torch.no_grad()
def sample_euler(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    shape: Sequence[int],
    seed: int,
    negative_context: Optional[torch.Tensor] = None,
    guidance: float = DEFAULT_GUIDANCE,
    num_steps: int = DEFAULT_TEACHER_STEPS,
    shift: float = DEFAULT_TEACHER_SHIFT,
    sigmas: Optional[Sequence[float]] = None,
    callback: Optional[StepCallback] = None,
    device=None,
    ode_states: Optional[ODEStates] = None,
) -> torch.Tensor:
    """Multi-step Euler sampling of the flow ODE dx/dsigma = v, with classifier-free guidance.

    x starts as noise at sigmas[0]; each step x <- x + (sigma_next - sigma) * v_guided(x, sigma),
    where the model is called at t = 1000 * sigma. At sigma_next = 0 this is x0 = x - sigma * v.

    Args:
        model, context, shape, seed, callback, device: as in `sample_dmd`.
        negative_context: embeddings of the negative prompt (Wan's default negative prompt for the
            reference recipe), same shape as context; None disables guidance.
        guidance: CFG scale (1 = no guidance).
        num_steps, shift: build the Wan grid `teacher_sigmas(num_steps, shift)` unless `sigmas`
            (descending, ending at 0) is given.
        ode_states: records the ODE's states at its sigmas along the way (`ODEStates`).
    Returns:
        float32 normalized latents of `shape`.
    """
    sigmas = list(sigmas) if sigmas is not None else teacher_sigmas(num_steps, shift)
    device, _, x = _start(context, shape, seed, device)  # pure noise, as at sigma = 1
    total = len(sigmas) - 1
    for step in range(total):
        sigma, next_sigma = sigmas[step], sigmas[step + 1]
        velocity = guided_velocity(model, x, _timestep(sigma, shape[0], device), context, negative_context, guidance)
        x0 = predict_x0(x, velocity, sigma)
        if ode_states is not None:
            ode_states.observe(sigma, next_sigma, x, x0)
        x = x + (next_sigma - sigma) * velocity
        if callback is not None:
            callback(step, total, x0)
    return x


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (flow matching); +inf at sigma = 0."""
    if sigma <= 0.0:
        return math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _expm1_neg(h: float) -> float:
    """expm1(-h), exact at h = +inf (a step to sigma = 0)."""
    return -1.0 if math.isinf(h) else math.expm1(-h)


@torch.no_grad()
def sample_unipc(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    context: torch.Tensor,
    shape: Sequence[int],
    seed: int,
    negative_context: Optional[torch.Tensor] = None,
    guidance: float = DEFAULT_GUIDANCE,
    num_steps: int = DEFAULT_TEACHER_STEPS,
    shift: float = DEFAULT_TEACHER_SHIFT,
    callback: Optional[StepCallback] = None,
    device=None,
    ode_states: Optional[ODEStates] = None,
) -> torch.Tensor:
    """Wan's default sampler: UniPC (B(h) = e^h - 1, order 2, data prediction, corrector on every
    step, first order at the first and last step) on the flow grid `teacher_sigmas`, with CFG.

    Matches diffusers' `UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2",
    lower_order_final=True)` stepping as WanPipeline does; as there, the first sigma is 1 - 1e-6 so
    that log(alpha/sigma) stays finite. One difference: the model is conditioned on the float
    t = 1000 * sigma, where diffusers passes it truncated to an integer.
    Arguments and return as in `sample_euler`.
    """
    sigmas = teacher_sigmas(num_steps, shift)
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6
    lambdas = [_log_snr(s) for s in sigmas]
    device, _, x = _start(context, shape, seed, device)
    x0_history: list[torch.Tensor] = []  # data predictions m_{i-1}, m_i of the last two steps
    last_sample, last_order = None, 0
    for step in range(num_steps):
        sigma = sigmas[step]
        velocity = guided_velocity(model, x, _timestep(sigma, shape[0], device), context, negative_context, guidance)
        x0 = predict_x0(x, velocity, sigma)

        if step > 0:  # UniC: re-do the last step knowing the prediction at its end
            previous, earlier = x0_history[-1], (x0_history[-2] if last_order == 2 else None)
            x = _unipc_update(last_sample, previous, earlier, sigmas, lambdas, step - 1, last_order, corrector=x0)
        if ode_states is not None:  # x corrected, with the prediction made at the uncorrected x
            ode_states.observe(sigma, sigmas[step + 1], x, x0)
        x0_history = (x0_history + [x0])[-2:]
        # Second order needs one earlier prediction; the last step (to sigma = 0) is first order.
        order = min(2, step + 1, num_steps - step)
        last_sample, last_order = x, order
        earlier = x0_history[-2] if order == 2 else None
        x = _unipc_update(x, x0, earlier, sigmas, lambdas, step, order)  # UniP: predict x_{step+1}
        if callback is not None:
            callback(step, num_steps, x0)
    return x


def _unipc_update(x: torch.Tensor, m0: torch.Tensor, earlier: Optional[torch.Tensor], sigmas: list,
                  lambdas: list, step: int, order: int, corrector: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One step of data-prediction UniPC-bh2 from sigmas[step] to sigmas[step + 1].

    m0 is the data prediction at `step`, `earlier` the one at `step - 1` (used at order 2). Without
    `corrector` this is the predictor UniP; with it (the new prediction at `step + 1`) the corrector
    UniC, which re-does the step from the same x with that extra information.
    """
    sigma_s, sigma_t = sigmas[step], sigmas[step + 1]
    alpha_t = 1.0 - sigma_t
    h = lambdas[step + 1] - lambdas[step]
    phi = _expm1_neg(h)  # e^{-h} - 1: both h*phi_1 and B(h) for bh2
    base = (sigma_t / sigma_s) * x - alpha_t * phi * m0  # the first-order (DDIM) step
    difference = None  # D1 = (m_{-1} - m0) / r1, a finite-difference derivative along lambda
    r1 = None
    if order == 2:
        r1 = (lambdas[step - 1] - lambdas[step]) / h
        difference = (earlier - m0) / r1
    if corrector is None:
        return base if difference is None else base - alpha_t * phi * 0.5 * difference
    # Corrector weights: rho = 0.5 at order 1; at order 2 solve [[1, 1], [r1, 1]] rho = [b1, b2],
    # b_k = k! * phi_{k+1}(-h) scaled by 1/B(h) (the B(h) expansion of UniPC).
    if order == 1:
        rho_prev, rho_new = 0.0, 0.5
    else:
        hh = -h
        phi_1 = phi / hh - 1
        phi_2 = phi_1 / hh - 0.5
        b1, b2 = phi_1 / phi, 2 * phi_2 / phi
        rho_prev = (b1 - b2) / (1 - r1)
        rho_new = b1 - rho_prev
    correction = rho_new * (corrector - m0)
    if difference is not None:
        correction = correction + rho_prev * difference
    return base - alpha_t * phi * correction
