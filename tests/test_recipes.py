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


def test_regression_at_sigma_one_regresses_the_noise_map():
    # A student v(x) = a x: from pure noise z, x0 = z - 1 * a z = (1 - a) z.
    a = 0.3
    student = lambda x, t, c: a * x  # noqa: E731
    z, y = torch.randn(5, 4), torch.randn(5, 4)
    loss = dmd.regression_loss(student, z, y, None, torch.ones(5))
    assert abs(float(loss) - float((((1 - a) * z - y) ** 2).mean())) < 1e-6
    # at sigma 0.5 the input is the midpoint of the pair: x0 = (0.5 y + 0.5 z) (1 - 0.5 a)
    loss = dmd.regression_loss(student, z, y, None, torch.full((5,), 0.5))
    assert abs(float(loss) - float((((0.5 * y + 0.5 * z) * (1 - 0.5 * a) - y) ** 2).mean())) < 1e-6


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

def shards_with_noise(folder, num_samples=2):
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(num_samples, *LATENT_SHAPE, generator=generator)
    text = torch.randn(num_samples, 8, 64, generator=generator)
    noise = torch.randn(num_samples, *LATENT_SHAPE, generator=generator)
    write_shard(folder / "shard-00000.safetensors", latents, text, noise=noise)
    write_negative_prompt(folder, torch.randn(1, 8, 64, generator=generator))
    return folder, noise


def test_trainer_runs_every_option(tmp_path):
    from fastwan.training.trainer import Distiller

    data, noise = shards_with_noise(tmp_path / "data")
    dataset = ShardDataset(data, text_dim=64)
    assert dataset.has_noise
    torch.testing.assert_close(dataset.load([1], with_noise=True)[2], noise[1:2])
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


def test_regression_without_noise_in_the_shards_fails_before_loading_models(tmp_path, monkeypatch):
    from fastwan.training import trainer

    data = write_synthetic_shards(tmp_path / "data", num_samples=2, latent_shape=LATENT_SHAPE, text_len=8, text_dim=64)
    assert not ShardDataset(data, text_dim=64).has_noise
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: pytest.fail("loaded a model"))
    config = config_from_dict(config_dict(data, tmp_path / "run", {"recipe": "balanced"}), "x.toml")
    with pytest.raises(ConfigError, match="x.toml: .*regression_weight = 0.5 needs teacher ODE pairs.*fastwan synth"):
        trainer.Distiller(config, log=lambda *a: None)
    with pytest.raises(DataError, match="hold no 'noise'"):
        ShardDataset(data, text_dim=64).load([0], with_noise=True)


# -- the toy's quick suite -----------------------------------------------------------------------------

# One thread: on a shared, busy machine a second intra-op thread makes these small steps many times slower.
QUICK = dict(steps=600, teacher_fit_steps=500, eval_samples=4096, teacher_1000step_samples=1024, ode_pairs=4096,
             threads=1)


@pytest.mark.slow
def test_quick_suite_named_recipe_distills_and_frozen_control_fails():
    """Two mixtures of the suite (wide modes far apart; two unequal modes far apart), seed 0, 600
    steps: the named recipe covers every mode and beats the naive 3-step teacher (seen: tv 0.031 /
    0.0005, swd 0.11 / 0.05 against the teacher's 0.25 / 0.49); the same recipe with a frozen fake
    score does not. The full suite is bench/toy_suite.py."""
    by_name = {spec.name: spec for spec in toy.SUITE}
    runs = [toy.ToyRun(by_name[name].build(), 0, name) for name in ("circle4-wide-far", "pair-unequal-far")]
    results, _ = toy.run_ensemble(toy.ToyOptions(recipe="balanced", **QUICK), runs)
    for result in results:
        assert result["modes_covered"] == result["modes_total"], result
        assert result["swd_student"] < result["swd_teacher_3step"], result
    control, _ = toy.run_ensemble(toy.ToyOptions(recipe="balanced", freeze_fake_score=True, **QUICK), runs)
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
    latents, _, noise = dataset.load([1], with_noise=True)
    encoder = UMT5TextEncoder.from_folder(folder)
    teacher = load_dit(folder)
    with torch.no_grad():
        velocity = guided_velocity(teacher, noise, torch.full((1,), 1000.0), encoder.encode(["a cat"]),
                                   encoder.encode([WAN_NEGATIVE_PROMPT]), 3.0)
    # Euler from sigma 1 to 0 in one step: x0 = noise - v
    torch.testing.assert_close(latents, noise - velocity, atol=1e-4, rtol=1e-4)
