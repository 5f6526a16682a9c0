"""DMD recipes: the [dmd] presets, the regression and GAN terms against closed forms, the faster fake
score, the trainer running them, teacher ODE pairs from `fastwan synth`, and the toy's quick suite."""
import math

import pytest
import torch

from fastwan.training import dmd, toy
from fastwan.training.config import RECIPES, ConfigError, DMDSection, config_from_dict, recipe_settings
from fastwan.training.data import DataError, ShardDataset, write_negative_prompt, write_shard, write_synthetic_shards

LATENT_SHAPE = (16, 2, 8, 8)


def config_dict(data_dir, output_dir, dmd_values):
    return {
        "model": {"teacher": "random:tiny", "random_seed": 3},
        "attention": {"backend": "dense"},
        "dmd": dict(dmd_values),
        "optimizer": {"lr": 1e-3, "fake_score_lr": 1e-3},
        "data": {"dir": str(data_dir), "batch_size": 1},
        "train": {"output_dir": str(output_dir), "max_steps": 2, "mixed_precision": "no", "device": "cpu",
                  "checkpoint_every": 100, "tensorboard": False, "activation_checkpointing": False},
    }


# -- recipes in the config --------------------------------------------------------------------------

def test_recipe_fills_the_dmd_keys_and_written_keys_override(tmp_path):
    config = config_from_dict(config_dict(tmp_path, tmp_path / "run", {"recipe": "balanced"}), "x.toml")
    for key, value in RECIPES["balanced"].items():
        assert getattr(config.dmd, key) == value
    assert config.dmd.shift == 8.0 and config.dmd.recipe == "balanced"
    config = config_from_dict(config_dict(tmp_path, tmp_path / "run", {"recipe": "balanced", "fake_score_updates": 3}),
                              "x.toml")
    assert config.dmd.fake_score_updates == 3
    assert config.dmd.regression_weight == RECIPES["balanced"]["regression_weight"]
    # the default is FastWan itself: DMD alone, one fake-score update per step
    default = config_from_dict(config_dict(tmp_path, tmp_path / "run", {}), "x.toml").dmd
    assert default.recipe == "fastwan" and default == DMDSection()
    assert (default.regression_weight, default.gan_generator_weight, default.fake_score_updates) == (0.0, 0.0, 1)


def test_written_config_reads_back_the_same(tmp_path):
    import tomllib

    from fastwan.training.config import config_from_dict as read

    config = config_from_dict(config_dict(tmp_path, tmp_path / "run", {"recipe": "balanced", "shift": 5.0}), "x.toml")
    again = read(tomllib.loads(config.to_toml()), "again.toml")
    assert again.dmd == config.dmd


@pytest.mark.parametrize("values, expected", [
    ({"recipe": "dmd3"}, r"\[dmd\] recipe = 'dmd3' is unknown; the recipes are 'fastwan', 'balanced'"),
    ({"fake_score_updates": 0}, r"\[dmd\] fake_score_updates must be >= 1"),
    ({"regression_weight": -1.0}, r"\[dmd\] regression_weight must be >= 0"),
    ({"gan_generator_weight": 0.1}, r"\[dmd\] gan_generator_weight > 0 needs gan_discriminator_weight > 0"),
    ({"regression_inputs": "ode"}, r"\[dmd\] regression_inputs = 'ode' must be one of \"noise\" .*\"trajectory\""),
])
def test_bad_recipe_values_name_file_and_key(tmp_path, values, expected):
    with pytest.raises(ConfigError, match="x.toml: " + expected):
        config_from_dict(config_dict(tmp_path, tmp_path / "run", values), "x.toml")


# -- the loss terms against closed forms -------------------------------------------------------------

def test_gan_losses_are_the_logistic_non_saturating_ones():
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.3, -1.5])
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected_generator = -sum(math.log(sigmoid(z)) for z in fake.tolist()) / 2
    expected_discriminator = (-sum(math.log(sigmoid(z)) for z in real.tolist()) / 2
                              - sum(math.log(1 - sigmoid(z)) for z in fake.tolist()) / 2)
    assert abs(float(dmd.gan_generator_loss(fake)) - expected_generator) < 1e-6
    assert abs(float(dmd.gan_discriminator_loss(real, fake)) - expected_discriminator) < 1e-6


def test_regression_inputs_start_where_each_mode_says():
    """noise: the pair's noise at the first sigma; line: the point (1 - s) y + s z at each sample's drawn
    sigma; trajectory: the stored ODE state of each sample's own drawn step. And the loss: a student
    v(x) = a x gives x0 = x - s a x, compared with the teacher sample y."""
    table = [1.0, 0.75, 0.5]
    settings = recipe_settings("fastwan", real_guidance_scale=1.0, regression_weight=1.0)
    y, z = torch.randn(4, 3), torch.randn(4, 3)
    trajectory = torch.randn(3, 4, 3)  # [K, B, ...]
    draws = dmd.StepDraws.draw(y.shape, torch.Generator().manual_seed(0), settings, "cpu", table)
    draws.student_step = torch.tensor([2, 0, 1, 2])
    draws.student_sigma = torch.tensor([table[k] for k in draws.student_step.tolist()])
    data = dmd.RegressionData(y, z, trajectory)
    settings.regression_inputs = "noise"
    x, sigma = dmd.regression_input(data, draws, settings, table)
    torch.testing.assert_close(x, z)
    torch.testing.assert_close(sigma, torch.ones(4))
    settings.regression_inputs = "line"
    x, sigma = dmd.regression_input(data, draws, settings, table)
    s = draws.student_sigma[:, None]
    torch.testing.assert_close(x, (1 - s) * y + s * z)
    settings.regression_inputs = "trajectory"
    x, sigma = dmd.regression_input(data, draws, settings, table)
    torch.testing.assert_close(x, torch.stack([trajectory[2, 0], trajectory[0, 1], trajectory[1, 2], trajectory[2, 3]]))
    torch.testing.assert_close(sigma, torch.tensor([0.5, 1.0, 0.75, 0.5]))
    a = 0.3
    loss = dmd.regression_loss(lambda x, t, c: a * x, x, y, None, sigma)
    assert abs(float(loss) - float(((x - sigma[:, None] * a * x - y) ** 2).mean())) < 1e-6
    # per-point steps (the toy: [S, P, 1] against samples [S, P, 2]) pick per point
    points = dmd.RegressionData(torch.zeros(1, 2, 2), None, torch.arange(12.0).view(3, 1, 2, 2))
    draws.student_step = torch.tensor([[[1], [2]]])
    x, _ = dmd.regression_input(points, draws, settings, table)
    torch.testing.assert_close(x, torch.tensor([[[4.0, 5.0], [10.0, 11.0]]]))
    with pytest.raises(ValueError, match="needs the teacher's ODE states"):
        dmd.regression_input(dmd.RegressionData(y, z), draws, settings, table)


def gaussian_velocity(mean: float, std: float):
    """The exact flow velocity E[eps - x0 | x] of data N(mean, std^2) per element (x = (1-s) x0 + s eps)."""
    def velocity(x, timestep, context=None):
        s = (timestep / 1000).view(-1, *([1] * (x.ndim - 1))).double()
        var = (1 - s) ** 2 * std ** 2 + s ** 2
        residual = x.double() - (1 - s) * mean
        x0 = mean + (1 - s) * std ** 2 / var * residual
        eps = s / var * residual
        return (eps - x0).to(x.dtype)
    return velocity


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_ode_states_follow_the_teachers_flow(sampler):
    """For Gaussian data the flow ODE from noise z is x(s) = (1 - s) m + sqrt((1 - s)^2 d^2 + s^2) z:
    the states a 30-step teacher sampler (shift 5) records at the student's shift-8 sigmas, which are
    not points of its grid, lie on it."""
    from fastwan.fastwan_core.sampling import ODEStates, sample_euler, sample_unipc
    from fastwan.fastwan_core.schedule import student_sigmas, teacher_sigmas

    mean, std = 0.7, 0.4
    wanted = student_sigmas((1000, 757, 522), 8.0)
    assert not set(wanted[1:]) & set(teacher_sigmas(30, 5.0))
    states = ODEStates(wanted)
    sample = {"unipc": sample_unipc, "euler": sample_euler}[sampler]
    sample(gaussian_velocity(mean, std), None, (2, 4, 8), seed=3, guidance=1.0, num_steps=30, shift=5.0,
                   ode_states=states)
    z = torch.randn((2, 4, 8), generator=torch.Generator().manual_seed(3))
    recorded = states.stacked()  # [B, K, ...]
    assert recorded.shape == (2, 3, 4, 8)
    torch.testing.assert_close(recorded[:, 0], z)  # sigma 1: the noise itself
    tolerance = {"unipc": 2e-3, "euler": 1e-2}[sampler]
    for k, s in enumerate(wanted):
        exact = (1 - s) * mean + math.sqrt((1 - s) ** 2 * std ** 2 + s ** 2) * z
        assert float((recorded[:, k] - exact).abs().max()) < tolerance, (k, s)
    with pytest.raises(ValueError, match="never passed sigma"):
        ODEStates([0.5]).stacked()


class AppendOne(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


class FeatureNet(torch.nn.Module):
    """A score whose 'features' are its input and a constant 1 (the layer the tap reads; the 1 keeps
    the input's offset visible through the head's LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.features = AppendOne()
        self.scale = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t, c=None):
        return self.scale * self.features(x)[..., :-1]


def test_gan_terms_push_the_student_and_the_head_the_right_way():
    torch.manual_seed(0)
    settings = recipe_settings("fastwan", real_guidance_scale=1.0, shift=1.0, gan_generator_weight=1.0,
                               gan_discriminator_weight=1.0)
    fake = FeatureNet()
    head = dmd.GANHead(5, hidden=8)
    gan = dmd.GANParts(head, dmd.FeatureTap(fake.features))
    student_bias = torch.nn.Parameter(torch.zeros(4))
    student = lambda x, t, c: x - student_bias  # noqa: E731  (x0 = x - sigma v: the bias moves x0 when sigma = 1)
    data = torch.randn(64, 4)
    draws = dmd.StepDraws.draw(data.shape, torch.Generator().manual_seed(1), settings, "cpu", [1.0])
    losses = dmd.generator_step_losses(student, FeatureNet(), fake, data, None, None, draws, settings, gan)
    assert set(losses) == {"dmd", "gan"}
    # the GAN term alone: its gradient on x0 raises the head's logit on the student's noised samples
    (grad,) = torch.autograd.grad(losses["gan"], student_bias)
    with torch.no_grad():
        step = -1e-2 * grad  # gradient descent on the generator loss moves x0 = ... + bias by `step`
        x_t = dmd.add_noise(data, draws.student_noise, draws.student_sigma)
        x0 = x_t - draws.student_sigma[:, None] * (x_t - student_bias)
        noised = lambda x: dmd.add_noise(x, draws.dmd_noise, draws.dmd_sigma)  # noqa: E731
        before = head(fake.features(noised(x0))).mean()
        after = head(fake.features(noised(x0 + step))).mean()
    assert after > before
    # the discriminator term: a few steps on it separate data (around +2) from student samples (around -2)
    optimizer = torch.optim.SGD(list(head.parameters()), lr=0.5)
    real = torch.randn(256, 4) + 2
    for _ in range(30):
        d = dmd.StepDraws.draw(real.shape, torch.Generator().manual_seed(2), settings, "cpu", [1.0])
        d.dmd_sigma = torch.full_like(d.dmd_sigma, 0.1)
        r = dmd.StepDraws.draw(real.shape, torch.Generator().manual_seed(3), settings, "cpu", [1.0])
        r.dmd_sigma = torch.full_like(r.dmd_sigma, 0.1)
        losses = dmd.fake_score_step_losses(lambda x, t, c: x + 2, fake, real, None, d, settings, gan, r)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert set(losses) == {"flow_matching", "gan"}
    with torch.no_grad():
        real_logit = head(fake.features(0.9 * real + 0.1 * torch.randn_like(real))).mean()
        student_logit = head(fake.features(0.9 * (-real) + 0.1 * torch.randn_like(real))).mean()
    assert real_logit > student_logit + 1.0


def test_missing_inputs_of_an_option_are_errors():
    settings = recipe_settings("balanced", real_guidance_scale=1.0)
    net = lambda x, t, c: x  # noqa: E731
    data = torch.randn(2, 3)
    draws = dmd.StepDraws.draw(data.shape, torch.Generator().manual_seed(0), settings, "cpu")
    with pytest.raises(ValueError, match="regression_weight > 0 needs"):
        dmd.generator_step_losses(net, net, net, data, None, None, draws, settings)


# -- the trainer ---------------------------------------------------------------------------------------

FASTWAN_SIGMAS = (1.0, 0.7568, 0.5217)  # student_sigmas((1000, 757, 522), 8), rounded


def shards_with_noise(folder, num_samples=2, trajectory_sigmas=None):
    """A data folder whose shards hold each sample's noise, and with `trajectory_sigmas` its ODE states."""
    from fastwan.fastwan_core.schedule import student_sigmas

    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(num_samples, *LATENT_SHAPE, generator=generator)
    text = torch.randn(num_samples, 8, 64, generator=generator)
    noise = torch.randn(num_samples, *LATENT_SHAPE, generator=generator)
    trajectory = None
    if trajectory_sigmas == "fastwan":
        trajectory_sigmas = student_sigmas((1000, 757, 522), 8.0)
    if trajectory_sigmas is not None:
        trajectory = torch.randn(num_samples, len(trajectory_sigmas), *LATENT_SHAPE, generator=generator)
    write_shard(folder / "shard-00000.safetensors", latents, text, noise=noise, trajectory=trajectory,
                trajectory_sigmas=trajectory_sigmas)
    write_negative_prompt(folder, torch.randn(1, 8, 64, generator=generator))
    return folder, noise, trajectory


def test_trainer_runs_every_option(tmp_path):
    from fastwan.training.trainer import Distiller

    data, noise, trajectory = shards_with_noise(tmp_path / "data", trajectory_sigmas="fastwan")
    dataset = ShardDataset(data, text_dim=64)
    assert dataset.has_noise and dataset.trajectory_sigmas == pytest.approx(FASTWAN_SIGMAS, abs=1e-4)
    batch = dataset.load([1], with_noise=True, with_trajectory=True)
    torch.testing.assert_close(batch.noise, noise[1:2])
    torch.testing.assert_close(batch.trajectory, trajectory[1:2])
    values = {"recipe": "balanced", "generator_update_interval": 1, "gan_generator_weight": 0.1,
              "gan_discriminator_weight": 0.5}
    config = config_from_dict(config_dict(data, tmp_path / "run", values), "x.toml")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distiller = Distiller(config, log=lambda *a: None)
        head_before = [p.detach().clone() for p in distiller.gan.head.parameters()]
        metrics = distiller.train_step(1)
    finally:
        torch.set_num_threads(previous)
    for key in ("generator_dmd_loss", "generator_regression_loss", "generator_gan_loss", "fake_score_gan_loss"):
        assert math.isfinite(metrics[key]), metrics
    assert any(not torch.equal(a, b) for a, b in zip(head_before, distiller.gan.head.parameters()))


def test_trainer_regresses_from_the_stored_state_of_each_samples_step(tmp_path, monkeypatch):
    """What the trainer's student forward starts from in the regression term is, for every sample,
    the shard's teacher ODE state at the student step drawn for it, at that step's sigma."""
    from fastwan.training.trainer import Distiller

    data, _, trajectory = shards_with_noise(tmp_path / "data", num_samples=4, trajectory_sigmas="fastwan")
    dataset = ShardDataset(data, text_dim=64)
    seen = []
    original = dmd.regression_loss
    monkeypatch.setattr(dmd, "regression_loss", lambda student, x, target, context, sigma: (
        seen.append((x.detach().cpu(), sigma.detach().cpu())), original(student, x, target, context, sigma))[1])
    values = {"recipe": "balanced", "generator_update_interval": 1}
    config = config_from_dict(config_dict(data, tmp_path / "run", dict(values)), "x.toml")
    config.data.batch_size = 4
    distiller = Distiller(config, log=lambda *a: None)
    order = distiller.data._permutation()[:4].tolist()  # the rows of the first batch
    distiller.train_step(1)
    (x, sigma), = seen
    table = torch.tensor(distiller.student_sigma_table)
    for row, (state, s) in enumerate(zip(x, sigma)):
        step = int(torch.argmin((table - s).abs()))
        assert abs(float(table[step]) - float(s)) < 1e-6
        torch.testing.assert_close(state, trajectory[order[row], step])


def test_regression_data_missing_or_mismatched_fails_before_loading_models(tmp_path, monkeypatch):
    from fastwan.training import trainer

    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: pytest.fail("loaded a model"))
    plain = write_synthetic_shards(tmp_path / "plain", num_samples=2, latent_shape=LATENT_SHAPE, text_len=8,
                                   text_dim=64)
    assert not ShardDataset(plain, text_dim=64).has_noise
    config = config_from_dict(config_dict(plain, tmp_path / "run", {"recipe": "balanced", "regression_inputs": "noise"}),
                              "x.toml")
    with pytest.raises(ConfigError, match="x.toml: .*regression_weight = 1.0 .*needs teacher ODE pairs.*fastwan synth"):
        trainer.Distiller(config, log=lambda *a: None)
    with pytest.raises(DataError, match="hold no 'noise'"):
        ShardDataset(plain, text_dim=64).load([0], with_noise=True)
    # the balanced recipe regresses from ODE states: pairs alone are not enough, and the error says how to write them
    pairs, _, _ = shards_with_noise(tmp_path / "pairs")
    config = config_from_dict(config_dict(pairs, tmp_path / "run", {"recipe": "balanced"}), "x.toml")
    with pytest.raises(ConfigError, match="hold no 'trajectory'.*fastwan synth --trajectory --student-timesteps "
                                          "1000,757,522 --student-shift 8"):
        trainer.Distiller(config, log=lambda *a: None)
    with pytest.raises(DataError, match="hold no 'trajectory'"):
        ShardDataset(pairs, text_dim=64).load([0], with_trajectory=True)
    # states at another student's sigmas
    other, _, _ = shards_with_noise(tmp_path / "other", trajectory_sigmas=[1.0, 0.5])
    config = config_from_dict(config_dict(other, tmp_path / "run", {"recipe": "balanced"}), "x.toml")
    with pytest.raises(ConfigError, match=r"at sigmas \[1.0, 0.5\], but the student's sigmas .* are \[1.0, 0.7568, "
                                          r"0.5217\]. Write the data again"):
        trainer.Distiller(config, log=lambda *a: None)


def test_shards_with_odd_trajectories_are_refused(tmp_path):
    latents, text = torch.randn(2, *LATENT_SHAPE), torch.randn(2, 8, 64)
    with pytest.raises(DataError, match="trajectory and trajectory_sigmas come together"):
        write_shard(tmp_path / "x.safetensors", latents, text, trajectory=torch.randn(2, 3, *LATENT_SHAPE))
    with pytest.raises(DataError, match=r"trajectory must be \[N=2, K=2, 16, 2, 8, 8\], got \[2, 3, 16, 2, 8, 8\]"):
        write_shard(tmp_path / "x.safetensors", latents, text, trajectory=torch.randn(2, 3, *LATENT_SHAPE),
                    trajectory_sigmas=[1.0, 0.5])
    # two shards of one folder at different sigmas
    folder = tmp_path / "mixed"
    shards_with_noise(folder, trajectory_sigmas=[1.0, 0.5])
    write_shard(folder / "shard-00001.safetensors", latents, text, trajectory=torch.randn(2, 2, *LATENT_SHAPE),
                trajectory_sigmas=[1.0, 0.6])
    with pytest.raises(DataError, match="teacher ODE states at different sigmas"):
        ShardDataset(folder, text_dim=64)
    # a shard whose trajectory has no sigmas in its metadata
    from safetensors.torch import save_file

    bare = tmp_path / "bare"
    shards_with_noise(bare)
    save_file({"latents": latents, "text_embeddings": text, "text_lengths": torch.tensor([8, 8]),
               "trajectory": torch.randn(2, 2, *LATENT_SHAPE)}, str(bare / "shard-00001.safetensors"),
              {"fastwan_shard_format": "1"})
    with pytest.raises(DataError, match="shard-00001.safetensors: 'trajectory' comes without a readable "
                                        "'trajectory_sigmas'"):
        ShardDataset(bare, text_dim=64)


# -- the toy's quick suite -----------------------------------------------------------------------------

# One thread: on a shared, busy machine a second intra-op thread makes these small steps many times slower.
QUICK = dict(steps=600, teacher_fit_steps=500, eval_samples=4096, teacher_1000step_samples=1024, ode_pairs=4096,
             threads=1)


@pytest.mark.slow
def test_quick_suite_named_recipe_distills_and_frozen_control_fails():
    """Two mixtures of the suite (wide modes far apart; two unequal modes far apart), seed 0, 600
    steps: the named recipe meets the whole bar (seen: tv 0.016 / 0.010, precision 0.951 / 0.962, swd
    0.050 / 0.055 against the naive teacher's 0.245 / 0.487); the control, DMD with its fake score
    frozen, does not. The full suite is bench/toy_suite.py."""
    by_name = {spec.name: spec for spec in toy.SUITE}
    runs = [toy.ToyRun(by_name[name].build(), 0, name) for name in ("circle4-wide-far", "pair-unequal-far")]
    results, _ = toy.run_ensemble(toy.ToyOptions(recipe="balanced", **QUICK), runs)
    for result in results:
        assert result["passed"], result
    control, _ = toy.run_ensemble(toy.ToyOptions(recipe="fastwan", freeze_fake_score=True, **QUICK), runs)
    for result, trained in zip(control, results):
        assert not result["passed"], result
        assert result["swd_student"] > trained["swd_student"], (result, trained)


def test_an_ensemble_run_uses_its_own_mixture():
    # Each run of an ensemble is measured against its own mixture: a 2-mode and a 9-mode run.
    by_name = {spec.name: spec for spec in toy.SUITE}
    runs = [toy.ToyRun(by_name["pair-unequal-far"].build(), 0, "pair"),
            toy.ToyRun(by_name["grid3x3"].build(), 1, "grid")]
    options = toy.ToyOptions(steps=5, eval_samples=2048, teacher_1000step_samples=2048, teacher_fit_steps=5, batch=64,
                             generator_batch=128, fake_batch=64)
    results, samples = toy.run_ensemble(options, runs)
    assert [r["modes_total"] for r in results] == [2, 9] and [r["seed"] for r in results] == [0, 1]
    # the 1000-step exact teacher lands on its own run's modes (independent of the student): within
    # twice the distance between two draws of the target
    for result in results:
        assert result["swd_teacher_1000step"] < 2 * result["swd_target_resample"], result


def test_mixture_batch_velocity_is_each_mixtures_own():
    a = toy.GaussianMixture2D(modes=3, radius=1.0, sigma=0.2, weights=(1, 2, 3))
    b = toy.GaussianMixture2D(means=((0.0, 2.0), (1.0, -1.0)), sigma=0.4)
    batch = toy.MixtureBatch([a, b], "cpu")
    x = torch.randn(2 * 7, 2, dtype=torch.float64)
    t = torch.rand(2 * 7, dtype=torch.float64) * 0.9 + 0.05
    joint = batch.velocity(x, t)
    torch.testing.assert_close(joint[:7], a.velocity(x[:7], t[:7]))
    torch.testing.assert_close(joint[7:], b.velocity(x[7:], t[7:]))
    # the batch's samples follow each mixture's weights
    samples = batch.sample(20000, torch.Generator().manual_seed(0)).view(2, 20000, 2)
    share = torch.bincount(torch.cdist(samples[0].double(), a.means).argmin(1), minlength=3).double() / 20000
    torch.testing.assert_close(share, torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64), atol=0.015, rtol=0)


def test_toy_cli_rejects_unknown_recipe_and_mixture(capsys):
    from fastwan.cli import main

    assert main(["toy-dmd", "--recipe", "nope"]) == 2
    assert "--recipe 'nope' is unknown" in capsys.readouterr().err
    assert main(["toy-dmd", "--mixture", "nope"]) == 2
    assert "--mixture 'nope' is not in the suite" in capsys.readouterr().err
    assert main(["toy-dmd", "--modes", "3", "--weights", "1", "2"]) == 2
    assert "--weights needs 3 positive numbers" in capsys.readouterr().err


def test_synth_keeps_each_samples_noise_as_a_teacher_ode_pair(tmp_path):
    """One Euler step of the teacher from the stored noise gives the stored sample: the shard's
    (noise, latents) are the pairs the regression term needs."""
    pytest.importorskip("diffusers")
    from fastwan.fastwan_core import load_dit
    from fastwan.fastwan_core.demo_models import build_demo_model_folder
    from fastwan.fastwan_core.sampling import guided_velocity
    from fastwan.fastwan_core.text_encoder import WAN_NEGATIVE_PROMPT, UMT5TextEncoder
    from fastwan.training.preprocess import synth

    folder = build_demo_model_folder(tmp_path / "models" / "tiny-fastwan")
    out = synth(["a boat", "a cat"], folder, tmp_path / "syn", width=32, height=32, frames=5, num_steps=1,
                guidance=3.0, seed=11, samples_per_shard=2, sampler="euler", device="cpu", log=lambda m: None)
    dataset = ShardDataset(out, text_dim=64)
    assert dataset.has_noise
    batch = dataset.load([1], with_noise=True)
    latents, noise = batch.latents, batch.noise
    encoder = UMT5TextEncoder.from_folder(folder)
    teacher = load_dit(folder)
    with torch.no_grad():
        velocity = guided_velocity(teacher, noise, torch.full((1,), 1000.0), encoder.encode(["a cat"]),
                                   encoder.encode([WAN_NEGATIVE_PROMPT]), 3.0)
    # Euler from sigma 1 to 0 in one step: x0 = noise - v
    torch.testing.assert_close(latents, noise - velocity, atol=1e-4, rtol=1e-4)


def test_synth_trajectory_holds_the_teachers_states_at_the_student_sigmas(tmp_path):
    """One Euler step from sigma 1 to 0 is the straight line from the noise to the sample, so the
    ODE's state at each student sigma s is (1 - s) sample + s noise (normalized latents); `--trajectory`
    stores exactly that, with the sigmas, and a resumed run with other settings is refused."""
    pytest.importorskip("diffusers")
    from fastwan.cli import main
    from fastwan.fastwan_core.demo_models import build_demo_model_folder
    from fastwan.fastwan_core.errors import InputError
    from fastwan.fastwan_core.schedule import student_sigmas
    from fastwan.training.preprocess import synth

    folder = build_demo_model_folder(tmp_path / "models" / "tiny-fastwan")
    common = dict(width=32, height=32, frames=5, num_steps=1, guidance=3.0, seed=11, samples_per_shard=1,
                  sampler="euler", device="cpu", log=lambda m: None)
    out = synth(["a boat", "a cat"], folder, tmp_path / "syn", trajectory_timesteps=(1000, 757, 522),
                trajectory_shift=8.0, **common)
    dataset = ShardDataset(out, text_dim=64)
    sigmas = student_sigmas((1000, 757, 522), 8.0)
    assert dataset.trajectory_sigmas == pytest.approx(sigmas)
    batch = dataset.load([0, 1], with_noise=True, with_trajectory=True)
    assert batch.trajectory.shape == (2, 3, *batch.latents.shape[1:])
    for k, s in enumerate(sigmas):
        torch.testing.assert_close(batch.trajectory[:, k], (1 - s) * batch.latents + s * batch.noise,
                                   atol=1e-4, rtol=1e-4)
    # the distill trainer reads them with the balanced recipe's defaults (the student's sigmas match)
    from fastwan.training.trainer import Distiller

    values = config_dict(out, tmp_path / "run", {"recipe": "balanced", "generator_update_interval": 1})
    values["model"] = {"teacher": str(folder / "transformer")}
    metrics = Distiller(config_from_dict(values, "x.toml"), log=lambda *a: None).train_step(1)
    assert math.isfinite(metrics["generator_regression_loss"]) and metrics["generator_regression_loss"] > 0
    # resuming the folder without --trajectory (or at other sigmas) would mix shards: refused up front
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(InputError, match="holds teacher ODE states at sigmas .* but this run would write none"):
        synth(["a boat", "a cat"], folder, out, **common)
    with pytest.raises(InputError, match="synth resumes a folder only with the same --trajectory settings"):
        synth(["a boat", "a cat"], folder, out, trajectory_timesteps=(1000, 500), **common)
    assert not (out / "shard-00001.safetensors").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a boat\n")
    assert main(["synth", "--prompts", str(prompts), "--model", str(folder), "--out", str(tmp_path / "bad"),
                 "--trajectory", "--student-timesteps", "757,1000"]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_toy_suite_bench_reports_recipe_control_and_ablation(tmp_path):
    """bench/toy_suite.py end to end at a tiny size: one JSON object with the recipe, the control (DMD
    with a frozen fake score) and the recipe's frozen-fake-score ablation, each with its worst case."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "toy_suite.py"
    partial = tmp_path / "partial.jsonl"
    done = subprocess.run([sys.executable, str(script), "--recipes", "balanced", "--mixtures", "pair-unequal-far",
                           "--seeds", "0", "--steps", "20", "--eval-samples", "2048", "--frozen-ablation",
                           "--device", "cpu", "--processes", "2", "--partial", str(partial)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert set(report["recipes"]) == {"balanced", "control", "balanced, frozen fake score"}
    for label, entry in report["recipes"].items():
        (run,) = entry["runs"]
        assert run["mixture"] == "pair-unequal-far" and run["steps"] == 20
        assert run["freeze_fake_score"] == (label != "balanced")
        assert entry["worst"]["runs"] == 1 and entry["every_run_passed"] == run["passed"]
    assert report["recipes"]["control"]["runs"][0]["recipe"] == "fastwan"
    assert report["recipes"]["control"]["every_run_failed"] == (not report["recipes"]["control"]["runs"][0]["passed"])
    assert len(partial.read_text().splitlines()) == 3
