"""The 2D DMD toy: exact teacher velocity, metrics, the pass bar and its frozen-fake control."""
import json
import math

import pytest
import torch

from fastwan.training import toy


def monte_carlo_velocity(mixture, x_t, t, samples=400_000, seed=0):
    """E[eps - x0 | x_t] by self-normalized importance sampling over prior draws of x0.

    Independent of the closed form: only uses p(x_t | x0) = N((1 - t) x0, t^2 I) and samples of the
    mixture, never the per-mode posterior algebra.
    """
    generator = torch.Generator().manual_seed(seed)
    x0 = mixture.sample(samples, generator).double()
    log_w = -0.5 * ((x_t.double()[None] - (1 - t) * x0) ** 2).sum(1) / t ** 2
    w = torch.softmax(log_w, 0)
    mean_x0 = (w[:, None] * x0).sum(0)
    # eps = (x_t - (1 - t) x0) / t, so E[eps - x0 | x_t] = (x_t - E[x0 | x_t]) / t
    return (x_t.double() - mean_x0) / t, float(1.0 / (w ** 2).sum())


@pytest.mark.parametrize("t", [0.35, 0.6, 0.9])
def test_teacher_velocity_matches_monte_carlo(t):
    mixture = toy.GaussianMixture2D(modes=5, radius=1.5, sigma=0.3)
    generator = torch.Generator().manual_seed(int(t * 100))
    points = torch.randn(4, 2, generator=generator, dtype=torch.float64) * 1.2
    exact = mixture.velocity(points, torch.full((4,), t, dtype=torch.float64))
    for point, expected in zip(points, exact):
        estimate, effective_samples = monte_carlo_velocity(mixture, point, t)
        assert effective_samples > 2000
        torch.testing.assert_close(expected, estimate, atol=0.03 / t, rtol=0.02)


def test_teacher_velocity_limits():
    mixture = toy.GaussianMixture2D(modes=3, radius=2.0, sigma=0.1)
    x = torch.randn(64, 2, dtype=torch.float64)
    # t -> 1: x_t is pure noise, E[x0 | x_t] -> the mixture mean (0), so v -> x_t
    torch.testing.assert_close(mixture.velocity(x, torch.full((64,), 1.0, dtype=torch.float64)), x)
    # float32 and float64 agree (the toy runs in float32)
    t = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(mixture.velocity(x.float(), t.float()), mixture.velocity(x, t).float(),
                               rtol=1e-4, atol=1e-4)


def test_metrics_on_known_distributions():
    mixture = toy.GaussianMixture2D(modes=8, radius=2.0, sigma=0.1)
    generator = torch.Generator().manual_seed(0)
    target = mixture.sample(8192, generator)
    metrics = toy.mode_metrics(target, mixture)
    assert metrics["modes_covered"] == 8 and metrics["tv"] < 0.03
    assert abs(metrics["precision"] - (1 - math.exp(-4.5))) < 0.01  # P(r < 3 sigma) of a 2D Gaussian
    # all mass on half of the modes: tv 0.5, four modes missing
    half = target[torch.cdist(target.double(), mixture.means).argmin(1) % 2 == 0]
    metrics = toy.mode_metrics(half, mixture)
    assert metrics["modes_covered"] == 4 and abs(metrics["tv"] - 0.5) < 1e-9
    # the swd noise floor is small; a shifted copy is about the shift away
    assert toy.sliced_wasserstein(target, mixture.sample(8192, generator)) < 0.03
    assert abs(toy.sliced_wasserstein(target, target + torch.tensor([0.5, 0.0])) - 0.5 * 2 / math.pi) < 0.01


def test_sliced_wasserstein_to_one_target():
    # Against a target sorted once: a copy shifted by d is mean |d . u| over the directions away, in
    # any direction (d . u exactly, as sorting commutes with a shift), and sets of another size are refused.
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(4096, 2, generator=generator)
    to_target = toy.SlicedWassersteinTo(target, projections=64, seed=7)
    angles = torch.rand(64, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * math.pi
    for shift in ([0.3, 0.0], [0.0, -0.2], [0.1, 0.4]):
        d = torch.tensor(shift, dtype=torch.float64)
        expected = (d[0] * torch.cos(angles) + d[1] * torch.sin(angles)).abs().mean().item()
        assert abs(to_target(target + torch.tensor(shift)) - expected) < 1e-6, shift
    assert to_target(target) == 0.0
    with pytest.raises(ValueError, match="same size"):
        to_target(target[:100])


def test_1000_step_teacher_matches_target_and_3_step_does_not():
    mixture = toy.GaussianMixture2D(modes=8, radius=2.0, sigma=0.1)
    generator = torch.Generator().manual_seed(1)
    target = mixture.sample(4096, generator)
    fine = toy.euler_teacher_sample(mixture, 4096, 200, 1.0, generator)
    coarse = toy.euler_teacher_sample(mixture, 4096, 3, 1.0, generator)
    assert toy.sliced_wasserstein(fine, target) < 0.05
    assert toy.sliced_wasserstein(coarse, target) > 2 * toy.sliced_wasserstein(fine, target)
    assert toy.mode_metrics(coarse, mixture)["precision"] < 0.9


SMALL = dict(steps=1500, eval_samples=4096)


@pytest.fixture(scope="module")
def distilled():
    return toy.run_toy(toy.ToyOptions(seed=0, **SMALL))


@pytest.fixture(scope="module")
def frozen_control():
    return toy.run_toy(toy.ToyOptions(seed=0, freeze_fake_score=True, **SMALL))


def test_small_distillation_beats_the_naive_3_step_teacher(distilled):
    """Short of the bar, a small run must still distill: every mode, and far sharper and closer to
    the target than the exact teacher's own 3-step Euler samples (precision ~0.49, swd ~0.14)."""
    result, _ = distilled
    assert result["modes_covered"] == 8, result
    assert result["precision"] > result["teacher_3step_precision"] + 0.15, result
    assert result["swd_student"] < 0.8 * result["swd_teacher_3step"], result


def test_frozen_fake_score_control_fails_the_bar(distilled, frozen_control):
    result, _ = frozen_control
    assert result["passed"] is False, result
    assert result["precision"] < 0.95 or result["tv"] >= 0.05 or result["modes_covered"] < 8
    # The failure is the missing fake-score learning, not the small size: the same run with a
    # learning fake score is several times closer to the target.
    assert result["swd_student"] > 3 * distilled[0]["swd_student"], (result, distilled[0])


def test_cli_prints_one_json_line_and_writes_png(tmp_path, capsys, monkeypatch):
    from fastwan.cli import main

    monkeypatch.setattr(toy, "ToyOptions", _small_options)
    out = tmp_path / "toy.png"
    code = main(["toy-dmd", "--modes", "4", "--steps", "20", "--seed", "3", "--out", str(out)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("modes_covered", "modes_total", "tv", "precision", "swd_student", "swd_teacher_3step",
                "swd_teacher_1000step"):
        assert key in result
    assert result["modes_total"] == 4 and code == (0 if result["passed"] else 1)
    # one tv per student step along the sampled chain; the last step's output is the sample itself
    assert len(result["tv_by_student_step"]) == 3
    assert result["tv_by_student_step"][-1] == pytest.approx(result["tv"], abs=1e-4)
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.width == 3 * image.height - 72
    from fastwan.fastwan_core.files import file_mode

    assert out.stat().st_mode & 0o777 == file_mode()  # the umask's mode, like every file we write


_ORIGINAL_OPTIONS = toy.ToyOptions


def _small_options(**kw):
    return _ORIGINAL_OPTIONS(**{**kw, "eval_samples": 512, "batch": 256, "generator_batch": 256, "fake_batch": 128,
                                "teacher_fit_steps": 100})


def test_cli_rejects_bad_options(capsys):
    from fastwan.cli import main

    assert main(["toy-dmd", "--modes", "0"]) == 2
    assert "--modes" in capsys.readouterr().err
    assert main(["toy-dmd", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_toy_networks_act_per_point_on_samples_of_points():
    # A generator sample of M points at one noise level ([B, M, 2] with timestep [B], points_per_sample)
    # gives each point what the network gives that point alone at its sample's noise level.
    net = toy.ToyScore(data_std=[1.4], seeds=[0])
    x = torch.randn(3, 5, 2)
    timestep = torch.tensor([900.0, 400.0, 20.0])
    grouped = net(x, timestep)
    assert grouped.shape == x.shape
    torch.testing.assert_close(grouped.reshape(-1, 2), net(x.reshape(-1, 2), timestep.repeat_interleave(5)))
    # A timestep per point ([B, M, 1]: each point from its own student step) is each point's own.
    per_point = torch.tensor([900.0, 757.0, 522.0])[torch.randint(0, 3, (3, 5, 1))]
    torch.testing.assert_close(net(x, per_point).reshape(-1, 2), net(x.reshape(-1, 2), per_point.reshape(-1)))
    torch.testing.assert_close(net(x, per_point)[1, 2], net(x[1, 2:3], per_point[1, 2])[0])


def test_soft_choice_head_is_a_softmax_weighted_choice_of_candidates():
    # Against an explicit per-point loop over the head's own linear map: softmax weights over the first
    # J outputs, candidate j = outputs J + 2j, J + 2j + 1.
    torch.manual_seed(0)
    head = toy.SoftChoiceHead(width=6, outputs=2, candidates=3)
    h = torch.randn(4, 6)
    raw = (h @ head.linear.weight.T + head.linear.bias).detach()
    expected = []
    for row in raw:
        weights = [math.exp(float(z)) for z in row[:3]]
        total = sum(weights)
        expected.append([sum(w / total * float(row[3 + 2 * j + d]) for j, w in enumerate(weights)) for d in range(2)])
    torch.testing.assert_close(head(h), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # With large logit gaps it picks one candidate outright: the sharp switch the generator needs.
    with torch.no_grad():
        head.linear.bias[:3] = torch.tensor([0.0, 60.0, 0.0])
    chosen = (h @ head.linear.weight[3:].T + head.linear.bias[3:]).detach()
    torch.testing.assert_close(head(h), chosen[:, 2:4], rtol=1e-4, atol=1e-4)


def test_toy_network_without_candidates_has_a_linear_output():
    net = toy.ToyScoreMLP(candidates=0)
    assert isinstance(net.net[-1], toy.EnsembleLinear) and net.net[-1].weight.shape[-1] == 2
    assert isinstance(toy.ToyScoreMLP().net[-1], toy.SoftChoiceHead)


def test_an_ensemble_network_is_its_runs_networks_side_by_side():
    # Against lone networks of each seed: the ensemble's run r computes what network r alone computes.
    ensemble = toy.ToyScore(data_std=[1.4, 0.7], seeds=[3, 5])
    lone = [toy.ToyScore(data_std=[1.4], seeds=[3]), toy.ToyScore(data_std=[0.7], seeds=[5])]
    x = torch.randn(2 * 6, 2)
    timestep = torch.rand(2 * 6) * 1000
    joint = ensemble(x, timestep)
    for r, net in enumerate(lone):
        torch.testing.assert_close(joint[6 * r:6 * (r + 1)], net(x[6 * r:6 * (r + 1)], timestep[6 * r:6 * (r + 1)]))


def test_toy_runs_with_samples_of_points():
    result, samples = toy.run_toy(_small_options(steps=10, points_per_sample=16, seed=1))
    assert result["modes_total"] == 8 and math.isfinite(result["swd_student"])
    assert torch.isfinite(samples["distilled 3-step student"]).all()


def test_toy_options_refuse_a_batch_that_does_not_split_into_samples():
    with pytest.raises(ValueError, match=r"generator_batch \(100\) must be a multiple of points_per_sample \(64\)"):
        toy.ToyOptions(generator_batch=100, points_per_sample=64)
