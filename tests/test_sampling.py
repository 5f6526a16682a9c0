"""Samplers against closed-form velocity fields."""
import pytest
import torch

from fastwan.fastwan_core import sampling, schedule
from fastwan.fastwan_core.schedule import student_sigmas


class PointsAt:
    """A velocity field whose every x0 prediction is `target`: v = (x - target) / sigma."""

    def __init__(self, target):
        self.target = target
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append(t.clone())
        sigma = (t / 1000.0).view(-1, *([1] * (x.ndim - 1)))
        return (x - self.target) / sigma


def test_student_sigmas_at_shift_8():
    assert [round(s, 4) for s in student_sigmas((1000, 757, 522), 8.0)] == [1.0, 0.7568, 0.5217]


def test_dmd_recovers_the_x0_the_field_points_at():
    target = torch.randn(2, 16, 3, 4, 6)
    model = PointsAt(target)
    out = sampling.sample_dmd(model, torch.zeros(2, 8, 4), target.shape, seed=3)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)
    # One model call per student step, at t = 1000 * sigma.
    assert [round(float(t[0]), 1) for t in model.calls] == [1000.0, 756.8, 521.7]


def test_dmd_renoises_with_fresh_noise_between_steps():
    # A field that reports x0 = x_t - sigma*v with v = 0 echoes its input: the second step's input
    # must be (1 - s) x0 + s * eps with eps independent of the first noise.
    seen = []

    def echo(x, t, context):
        seen.append(x.clone())
        return torch.zeros_like(x)

    sampling.sample_dmd(echo, torch.zeros(1, 4, 4), (1, 4, 8, 8), seed=0)
    sigma = student_sigmas((1000, 757, 522), 8.0)[1]
    eps = (seen[1] - (1 - sigma) * seen[0]) / sigma
    assert abs(torch.corrcoef(torch.stack([eps.flatten(), seen[0].flatten()]))[0, 1]) < 0.2
    assert eps.std().item() == pytest.approx(1.0, abs=0.2)


def test_same_seed_same_latents_and_different_seed_different():
    model = lambda x, t, c: 0.5 * x  # noqa: E731
    context = torch.zeros(1, 4, 4)
    a = sampling.sample_dmd(model, context, (1, 16, 2, 4, 4), seed=7)
    b = sampling.sample_dmd(model, context, (1, 16, 2, 4, 4), seed=7)
    c = sampling.sample_dmd(model, context, (1, 16, 2, 4, 4), seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    e1 = sampling.sample_euler(model, context, (1, 16, 2, 4, 4), seed=7, num_steps=3)
    e2 = sampling.sample_euler(model, context, (1, 16, 2, 4, 4), seed=7, num_steps=3)
    assert torch.equal(e1, e2)


def test_callback_sees_every_step_and_can_stop_the_run():
    target = torch.randn(1, 4, 2, 2)
    model = PointsAt(target)
    steps = []
    sampling.sample_dmd(model, torch.zeros(1, 2, 2), target.shape, seed=0,
                        callback=lambda step, total, x0: steps.append((step, total)))
    assert steps == [(0, 3), (1, 3), (2, 3)]

    def stop(step, total, x0):
        raise KeyboardInterrupt

    model.calls.clear()
    with pytest.raises(KeyboardInterrupt):
        sampling.sample_euler(model, torch.zeros(1, 2, 2), target.shape, seed=0, num_steps=10, callback=stop)
    assert len(model.calls) == 1


def test_teacher_sigmas_match_diffusers_unipc_grid():
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    scheduler.set_timesteps(20)
    ours = torch.tensor(schedule.teacher_sigmas(20, 5.0), dtype=torch.float64)
    theirs = scheduler.sigmas.double()
    theirs[0] = 1.0  # diffusers nudges the first sigma to 1 - 1e-6
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def gaussian_data_velocity(mean, std):
    """Exact flow velocity E[eps - x0 | x_t] when x0 ~ N(mean, std^2) elementwise and
    x_t = (1 - s) x0 + s eps: v = (s - (1 - s) std^2) / V * (x - (1 - s) mean) - mean,
    V = (1 - s)^2 std^2 + s^2."""

    def model(x, t, context):
        s = (t / 1000.0).double().view(-1, *([1] * (x.ndim - 1)))
        var = (1 - s) ** 2 * std ** 2 + s ** 2
        return ((s - (1 - s) * std ** 2) / var * (x.double() - (1 - s) * mean) - mean).float()

    return model


def test_euler_transports_noise_to_gaussian_data():
    # The probability-flow ODE of Gaussian data is affine: x(s) = (1 - s) mean + sqrt(V(s)) eps,
    # so from noise eps it lands exactly on mean + std * eps. Euler converges to it at first order.
    mean, std = 0.7, 0.3
    shape = (1, 4, 3, 8, 8)
    model = gaussian_data_velocity(mean, std)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    exact = mean + std * noise
    errors = []
    for steps in (50, 100):
        out = sampling.sample_euler(model, torch.zeros(1), shape, seed=5, num_steps=steps, shift=3.0,
                                    negative_context=None)
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.05
    assert errors[0] / errors[1] == pytest.approx(2.0, rel=0.25)  # first-order method


def test_classifier_free_guidance_algebra():
    cond, uncond = torch.zeros(1, 3), torch.ones(1, 3)
    v_c, v_u = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)

    def model(x, t, context):
        return v_c.clone() if context is cond else v_u.clone()

    x = torch.randn(1, 4, 2, 2)
    t = torch.tensor([500.0])
    torch.testing.assert_close(sampling.guided_velocity(model, x, t, cond, uncond, 4.5), v_u + 4.5 * (v_c - v_u))
    torch.testing.assert_close(sampling.guided_velocity(model, x, t, cond, uncond, 1.0), v_c)
    # One Euler step from sigma 1 to 0: x0 = noise - v_guided.
    noise = torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(2))
    out = sampling.sample_euler(model, cond, (1, 4, 2, 2), seed=2, negative_context=uncond, guidance=3.0,
                                sigmas=[1.0, 0.0])
    torch.testing.assert_close(out, noise - (v_u + 3.0 * (v_c - v_u)))


def test_classifier_free_guidance_is_the_closed_form_and_dmd_uses_it():
    from fastwan.training import dmd

    cond, uncond = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    guided = sampling.classifier_free_guidance(cond, uncond, 4.5)
    torch.testing.assert_close(guided, uncond + 4.5 * (cond - uncond))  # Ho & Salimans' standard CFG
    torch.testing.assert_close(guided, cond + 3.5 * (cond - uncond))  # the DMD recipe's written form
    assert sampling.classifier_free_guidance(cond, uncond, 1.0) is cond  # scale 1: no guidance
    assert sampling.classifier_free_guidance(cond, None, 4.5) is cond  # no negative: no guidance
    # The trainer's real score is guided by the same function, bit for bit.
    assert torch.equal(dmd.apply_guidance(cond, uncond, 4.5), guided)


def diffusers_unipc(model, context, negative_context, guidance, shape, seed, num_steps, shift):
    """Oracle: diffusers' UniPCMultistepScheduler stepped as WanPipeline steps it (the model called at
    t = 1000 * sigma as a float, like ours)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        solver_order=2, solver_type="bh2", lower_order_final=True)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for index, timestep in enumerate(scheduler.timesteps):
        t = torch.full((shape[0],), float(scheduler.sigmas[index]) * 1000.0)
        v = sampling.guided_velocity(model, x, t, context, negative_context, guidance)
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("num_steps", [1, 2, 3, 8, 20])
def test_unipc_matches_diffusers(num_steps):
    # A sigma-dependent nonlinear field, so every predictor/corrector coefficient matters.
    shape = (2, 4, 2, 4, 4)
    data_model = gaussian_data_velocity(0.4, 0.5)

    def model(x, t, context):
        return data_model(x, t, context) + 0.3 * torch.tanh(x) * context

    cond, uncond = torch.tensor(1.0), torch.tensor(-0.5)
    ours = sampling.sample_unipc(model, cond, shape, seed=4, negative_context=uncond, guidance=2.0,
                                 num_steps=num_steps, shift=5.0)
    theirs = diffusers_unipc(model, cond, uncond, 2.0, shape, seed=4, num_steps=num_steps, shift=5.0)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


def test_unipc_is_more_accurate_than_euler_on_gaussian_data():
    # Both end with a first-order step to sigma 0; UniPC's second-order steps before it still
    # cut the error several-fold (measured: 0.015 vs 0.11 at 40 steps).
    mean, std = 0.7, 0.3
    shape = (1, 4, 3, 8, 8)
    model = gaussian_data_velocity(mean, std)
    exact = mean + std * torch.randn(shape, generator=torch.Generator().manual_seed(5))
    unipc = sampling.sample_unipc(model, torch.zeros(1), shape, seed=5, num_steps=40, shift=3.0)
    euler = sampling.sample_euler(model, torch.zeros(1), shape, seed=5, num_steps=40, shift=3.0)
    unipc_error, euler_error = (unipc - exact).abs().max().item(), (euler - exact).abs().max().item()
    assert unipc_error < euler_error / 5
