"""DMD core: guidance convention, generator/fake-score losses, time draws."""
import torch

from fastwan.training import dmd
from fastwan.training.config import DMDSection


def test_guidance_standard_4_5_is_reference_3_5():
    cond, uncond = torch.randn(3, 5), torch.randn(3, 5)
    ours = dmd.apply_guidance(cond, uncond, 4.5)
    reference_form = cond + 3.5 * (cond - uncond)  # the reference recipe's written form
    textbook_form = uncond + 4.5 * (cond - uncond)  # Ho & Salimans' standard CFG
    torch.testing.assert_close(ours, reference_form)
    torch.testing.assert_close(ours, textbook_form)
    assert dmd.reference_guidance_to_standard(3.5) == 4.5
    assert DMDSection().real_guidance_scale == 4.5
    # scale 1 is no guidance at all
    torch.testing.assert_close(dmd.apply_guidance(cond, uncond, 1.0), cond)


def test_guidance_commutes_with_x0_prediction():
    x_t, cond_v, uncond_v = torch.randn(3, 2, 4, 4, 4).unbind(0)
    sigma = 0.63
    guided_x0 = x_t - sigma * dmd.apply_guidance(cond_v, uncond_v, 4.5)
    x0_guided = dmd.apply_guidance(x_t - sigma * cond_v, x_t - sigma * uncond_v, 4.5)
    torch.testing.assert_close(guided_x0, x0_guided)


def test_generator_loss_gradient_zero_when_real_equals_fake():
    x0 = torch.randn(4, 16, 2, 4, 4, requires_grad=True)
    real = torch.randn(4, 16, 2, 4, 4)
    loss = dmd.generator_loss(x0, real.clone(), real)
    loss.backward()
    assert x0.grad.abs().max().item() == 0.0
    assert loss.item() == 0.0


def test_generator_loss_gradient_is_normalized_fake_minus_real():
    x0 = torch.randn(3, 6, 5, dtype=torch.float64)
    fake, real = torch.randn(3, 6, 5), torch.randn(3, 6, 5)
    leaf = x0.clone().float().requires_grad_(True)
    dmd.generator_loss(leaf, fake, real).backward()
    # independent oracle, per sample by hand
    expected = torch.empty_like(x0)
    for b in range(3):
        normalizer = sum(abs(float(x0[b].flatten()[i]) - float(real[b].flatten()[i])) for i in range(30)) / 30
        expected[b] = (fake[b].double() - real[b].double()) / normalizer / x0.numel()
    torch.testing.assert_close(leaf.grad.double(), expected, rtol=1e-4, atol=1e-9)
    # and the direction: one SGD step on x0 lowers the distance to real relative to fake
    moved = leaf.detach() - 1e3 * leaf.grad
    assert ((moved - real).pow(2).sum() - (moved - fake).pow(2).sum()) < ((leaf.detach() - real).pow(2).sum() - (leaf.detach() - fake).pow(2).sum())


def test_generator_loss_nan_free_when_sample_equals_real():
    x0 = torch.randn(2, 3, requires_grad=True)
    real = torch.cat([x0.detach()[:1], torch.randn(1, 3)])
    dmd.generator_loss(x0, torch.randn(2, 3), real).backward()
    assert torch.isfinite(x0.grad).all()
    assert x0.grad[0].abs().max() == 0


def test_fake_score_loss_is_flow_matching_mse():
    v, noise, x0 = torch.randn(3, 2, 7).unbind(0)
    expected = ((v - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(dmd.fake_score_loss(v, noise, x0), expected)


def test_dmd_sigma_draw_is_shifted_uniform_and_clamped():
    generator = torch.Generator().manual_seed(0)
    sigmas = dmd.draw_dmd_sigmas(200_000, generator, shift=8.0, min_ratio=0.02, max_ratio=0.98)
    assert sigmas.min() >= 0.02 and sigmas.max() <= 0.98
    assert sigmas.max() == 0.98  # the clamp is hit: shift 8 piles mass near sigma 1
    # independent oracle: u ~ U(0, 1], sigma = 8u / (1 + 7u); P(sigma <= 8q/(1+7q)) = q.
    for q in (0.1, 0.25, 0.5):
        threshold = 8 * q / (1 + 7 * q)
        assert abs((sigmas <= threshold).double().mean().item() - q) < 0.01
    unshifted = dmd.draw_dmd_sigmas(100_000, generator, shift=1.0, min_ratio=0.0, max_ratio=1.0)
    assert abs(unshifted.mean().item() - 0.5) < 0.01


def test_student_sigma_draw_uses_the_student_grid():
    from fastwan.fastwan_core.schedule import student_sigmas

    table = student_sigmas((1000, 757, 522), 8.0)
    steps, draws = dmd.draw_student_steps(3000, torch.Generator().manual_seed(1), table)
    torch.testing.assert_close(draws, torch.tensor(table, dtype=torch.float32)[steps])
    values = sorted(set(draws.tolist()))
    assert len(values) == 3
    torch.testing.assert_close(torch.tensor(values[::-1]), torch.tensor([1.0, 0.7568, 0.5217]), atol=2e-4, rtol=0)


def test_step_losses_with_linear_models_train_the_right_parameters():
    torch.manual_seed(0)
    student = torch.nn.Linear(4, 4)
    fake = torch.nn.Linear(4, 4)
    real = torch.nn.Linear(4, 4)
    call = lambda net: (lambda x, t, c: net(x) * (1 + t[:, None] / 1000))  # noqa: E731
    settings = DMDSection()
    data = torch.randn(8, 4)
    draws = dmd.StepDraws.draw(data.shape, torch.Generator().manual_seed(3), settings, "cpu")
    settings.real_guidance_scale = 1.0
    losses = dmd.generator_step_losses(call(student), call(real), call(fake), data, None, None, draws, settings)
    assert list(losses) == ["dmd"]  # the fastwan recipe: DMD alone
    losses["dmd"].backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert fake.weight.grad is None and real.weight.grad is None
    student.zero_grad()
    losses = dmd.fake_score_step_losses(call(student), call(fake), data, None, draws, settings)
    assert list(losses) == ["flow_matching"]
    losses["flow_matching"].backward()
    assert fake.weight.grad.abs().sum() > 0 and student.weight.grad is None


def test_generator_step_interval():
    assert [s for s in range(1, 16) if dmd.is_generator_step(s, 5)] == [5, 10, 15]


def test_dmd_drives_a_mixture_generator_to_the_target():
    """With exact scores (real: the target mixture; fake: the generator's own mixture, both closed
    form), DMD's generator loss moves a reparameterized mixture generator onto the target: means to
    the target's means and the width to the target's std."""
    import math

    from fastwan.training.toy import GaussianMixture2D

    target = GaussianMixture2D(modes=6, radius=2.0, sigma=0.1)
    generator = torch.Generator().manual_seed(0)
    means = (target.means.float() * 0.6 + 0.3 * torch.randn(6, 2, generator=generator)).requires_grad_(True)
    log_width = torch.tensor(math.log(0.5), requires_grad=True)
    optimizer = torch.optim.Adam([means, log_width], lr=1e-2)
    for _ in range(600):
        component = torch.randint(0, 6, (256,), generator=generator)
        x0 = means[component] + log_width.exp() * torch.randn(256, 2, generator=generator)
        own = GaussianMixture2D(modes=6, radius=2.0, sigma=float(log_width.detach().exp()))
        own.means = means.detach().double()
        sigma = dmd.draw_dmd_sigmas(256, generator, shift=1.0)
        x_t = dmd.add_noise(x0.detach(), torch.randn(256, 2, generator=generator), sigma)
        real_x0 = dmd.predict_x0(x_t, target.velocity(x_t, sigma), sigma)
        fake_x0 = dmd.predict_x0(x_t, own.velocity(x_t, sigma), sigma)
        loss = dmd.generator_loss(x0, fake_x0, real_x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    distance = torch.cdist(means.detach().double(), target.means).min(dim=1).values
    assert distance.max() < 0.03
    assert abs(float(log_width.detach().exp()) - 0.1) < 0.02
    # every target mode got its own generator mode
    assert len(set(torch.cdist(means.detach().double(), target.means).argmin(dim=1).tolist())) == 6
