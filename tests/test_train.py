"""The distillation trainer at tiny size on CPU: updates, resume, signals, export, bad configs."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fastwan.training import checkpointing, trainer as trainer_module
from fastwan.training.config import ConfigError, config_from_dict, load_config
from fastwan.training.data import DataError, write_negative_prompt, write_shard, write_synthetic_shards
from fastwan.training.trainer import Distiller, TrainingDiverged, run_distill, sparsity_at

REPO = Path(__file__).resolve().parents[1]
LATENT_SHAPE = (16, 2, 8, 8)


def tiny_config(data_dir, output_dir, **sections):
    base = {
        "model": {"teacher": "random:tiny", "random_seed": 3},
        "attention": {"backend": "vsa", "implementation": "reference", "sparsity": 0.5, "sparsity_start": 0.5},
        "dmd": {"generator_update_interval": 2},
        "optimizer": {"lr": 1e-3, "fake_score_lr": 1e-3},
        "data": {"dir": str(data_dir), "batch_size": 1},
        "train": {"output_dir": str(output_dir), "max_steps": 6, "mixed_precision": "no", "device": "cpu",
                  "checkpoint_every": 100, "tensorboard": False, "activation_checkpointing": True},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return config_from_dict(base, "test.toml"), base


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data"), num_samples=4, latent_shape=LATENT_SHAPE,
                                  text_len=8, text_dim=64, samples_per_shard=2, seed=7)


def quiet(*args, **kwargs):
    pass


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads; on a busy 2-core CI box they thrash.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_bitwise_equal(a_dir, b_dir):
    a, b = checkpointing.read_checkpoint(a_dir), checkpointing.read_checkpoint(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
    a_state = json.loads((a_dir / "trainer_state.json").read_text())
    b_state = json.loads((b_dir / "trainer_state.json").read_text())
    assert a_state == b_state


def test_tiny_distillation_trains_student_and_fake_but_not_teacher(data_dir, tmp_path):
    config, _ = tiny_config(data_dir, tmp_path / "run")
    distiller = Distiller(config, log=quiet)
    before = {name: {k: v.detach().clone() for k, v in getattr(distiller, name).state_dict().items()}
              for name in ("student", "fake_score", "teacher")}
    history = [distiller.train_step(step) for step in range(1, 5)]
    for metrics in history:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k != "step")
    assert [("generator_loss" in m) for m in history] == [False, True, False, True]  # every 2nd step
    changed = {name: sum(not torch.equal(before[name][k], v) for k, v in getattr(distiller, name).state_dict().items())
               for name in before}
    assert changed["teacher"] == 0
    assert changed["student"] > 0.8 * len(before["student"])
    assert changed["fake_score"] > 0.8 * len(before["fake_score"])
    # the student ran sparse (VSA) and the scores dense: the teacher and student configs differ
    assert distiller.student_attention(1).backend == "vsa"


def test_resume_after_interrupt_is_bitwise_identical(data_dir, tmp_path):
    config, _ = tiny_config(data_dir, tmp_path / "straight")
    straight = run_distill(config, log=quiet)
    assert straight["step"] == 6 and straight["stopped"] is None

    config, _ = tiny_config(data_dir, tmp_path / "interrupted")
    first = run_distill(config, log=quiet, stop_at_step=3)
    assert first["stopped"] == "stop_at_step" and first["step"] == 3
    assert checkpointing.latest_checkpoint(tmp_path / "interrupted").name == "step-000003"
    second = run_distill(config, log=quiet)  # resumes from step 3 (data epoch rolls over at step 5)
    assert second["step"] == 6
    assert_bitwise_equal(tmp_path / "straight/checkpoints/step-000006", tmp_path / "interrupted/checkpoints/step-000006")


def test_sigterm_saves_and_resume_matches(data_dir, tmp_path):
    config, raw = tiny_config(data_dir, tmp_path / "reference", train={"max_steps": 5})
    run_distill(config, log=quiet)

    raw["train"].update(output_dir=str(tmp_path / "killed"), max_steps=5)
    config_path = tmp_path / "killed.toml"
    config_path.write_text(config_from_dict(raw).to_toml())
    process = subprocess.Popen([sys.executable, "-m", "fastwan.cli", "distill", "--config", str(config_path),
                                "--set", "train.max_steps=1000"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                               # same intra-op thread count as this process: float reductions (and so
                               # bit-exactness) depend on it
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=120) == 0, "".join(lines)
    assert any("SIGTERM received" in line for line in lines), "".join(lines)
    saved = checkpointing.latest_checkpoint(tmp_path / "killed")
    saved_step = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert 2 <= saved_step < 5
    # resume in-process to step 5: identical to the run that was never interrupted
    run_distill(config_from_dict(raw), log=quiet)
    assert_bitwise_equal(tmp_path / "reference/checkpoints/step-000005", tmp_path / "killed/checkpoints/step-000005")


def test_export_loads_with_load_dit_and_matches_in_memory_student(data_dir, tmp_path):
    from fastwan.cli import main
    from fastwan.fastwan_core.checkpoint import load_dit

    config, _ = tiny_config(data_dir, tmp_path / "run", train={"max_steps": 2})
    distiller = Distiller(config, log=quiet)
    for step in (1, 2):
        distiller.train_step(step)
    distiller.save(2)
    out = tmp_path / "student.safetensors"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out), "--dtype", "fp32"]) == 0
    exported = load_dit(out)
    assert exported.has_trained_gates() == distiller.student.has_trained_gates()
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1, *LATENT_SHAPE, generator=generator)
    context = torch.randn(1, 8, 64, generator=generator)
    t = torch.tensor([757.0])
    distiller.student.attention = exported.attention = attention = distiller.student_attention(2)
    with torch.no_grad():
        expected = distiller.student(x, t, context)
        got = exported(x, t, context)
    assert torch.equal(expected, got)
    bf16 = tmp_path / "student_bf16.safetensors"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(bf16), "--layout", "comfy"]) == 0
    with torch.no_grad():
        got_bf16 = load_dit(bf16, dtype=torch.float32).with_attention(attention)(x, t, context)
    torch.testing.assert_close(got_bf16, expected, rtol=0.05, atol=0.05)


def test_export_errors_name_the_fix(tmp_path, capsys):
    from fastwan.cli import main

    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no checkpoints/latest" in capsys.readouterr().err


def test_nonfinite_loss_saves_and_stops(tmp_path):
    data = write_synthetic_shards(tmp_path / "data", num_samples=2, latent_shape=LATENT_SHAPE, text_len=8, text_dim=64)
    bad = torch.full((2, *LATENT_SHAPE), float("nan"))
    write_shard(data / "shard-00000.safetensors", bad, torch.randn(2, 8, 64))
    config, _ = tiny_config(data, tmp_path / "run")
    with pytest.raises(TrainingDiverged) as error:
        run_distill(config, log=quiet)
    message = str(error.value)
    assert "step 1" in message and "nan" in message and "lower [optimizer] lr" in message
    saved = checkpointing.read_checkpoint(tmp_path / "run/checkpoints/nonfinite-step-000001", "student/")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    assert checkpointing.latest_checkpoint(tmp_path / "run") is None  # a bad state is never "latest"


# -- config and data errors, all before any model is built -------------------------------------

@pytest.fixture
def no_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config/data checks finished")
    monkeypatch.setattr(trainer_module, "build_model", refuse)


@pytest.mark.parametrize("section, values, expected", [
    ("train", {"max_step": 3}, ["test.toml", "unknown key [train] max_step", "max_steps"]),
    ("optimizer", {"lr": "fast"}, ["test.toml", "[optimizer] lr", "must be a number"]),
    ("train", {"activation_checkpointing": 1}, ["[train] activation_checkpointing", "true/false"]),
    ("dmd", {"real_guidance_scale": 0.5}, ["[dmd] real_guidance_scale", "standard CFG", "3.5"]),
    ("attention", {"sparsity": 1.0}, ["[attention] sparsity", "[0, 1)"]),
    ("data", {"dir": "/no/such/folder"}, ["[data] dir", "/no/such/folder", "no such folder"]),
    ("model", {"teacher": "/no/such/model.safetensors"}, ["[model] teacher", "no such file"]),
    ("wrong", {"x": 1}, ["unknown section [wrong]"]),
    ("parallel", {"sharding": "ring"}, ["[parallel] sharding", "\"full\"", "\"hybrid\""]),
    ("parallel", {"sequence_parallel": 0}, ["[parallel] sequence_parallel", ">= 1"]),
])
def test_bad_config_values_are_reported_with_file_and_key(data_dir, tmp_path, section, values, expected):
    _, raw = tiny_config(data_dir, tmp_path / "run")
    raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw, "test.toml")
    for text in expected:
        assert text in str(error.value), str(error.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nmax_steps = 3")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(broken)
    valid = tmp_path / "valid.toml"
    valid.write_text("[train]\nmax_steps = 3\n")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(valid, ["max_steps"])


def test_shipped_configs_parse(tmp_path, data_dir):
    overrides = [f"data.dir={json.dumps(str(data_dir))}", 'model.teacher="random:tiny"']
    recipe = load_config(REPO / "training/configs/wan_1_3b_480p.toml", overrides)
    assert recipe.attention.sparsity == 0.8 and recipe.attention.backend == "vsa"
    assert recipe.optimizer.lr == 2e-6 and recipe.optimizer.betas == [0.9, 0.999]
    assert recipe.dmd.real_guidance_scale == 4.5 and recipe.dmd.generator_update_interval == 5
    assert recipe.dmd.student_timesteps == [1000, 757, 522] and recipe.dmd.shift == 8.0
    assert recipe.train.max_steps == 4000 and recipe.train.mixed_precision == "bf16"
    debug = load_config(REPO / "training/configs/debug_tiny.toml", overrides)
    assert debug.model.teacher == "random:tiny"
    # the recipe without its data is refused by name
    with pytest.raises(ConfigError, match=r"\[data\] dir"):
        load_config(REPO / "training/configs/wan_1_3b_480p.toml", ['model.teacher="random:tiny"'])


def _data_error(tmp_path, make):
    folder = tmp_path / "bad"
    folder.mkdir(parents=True)
    make(folder)
    config, _ = tiny_config(folder, tmp_path / "run")
    with pytest.raises(DataError) as error:
        Distiller(config, log=quiet)
    return str(error.value)


def test_data_errors_before_compute(tmp_path, no_compute):
    message = _data_error(tmp_path / "a", lambda f: None)
    assert "no shard-*.safetensors" in message and "fastwan preprocess" in message

    def wrong_text_dim(folder):
        write_shard(folder / "shard-00000.safetensors", torch.randn(1, *LATENT_SHAPE), torch.randn(1, 8, 32))
        write_negative_prompt(folder, torch.randn(1, 8, 32))
    message = _data_error(tmp_path / "b", wrong_text_dim)
    assert "shard-00000.safetensors" in message and "text_embeddings" in message and "64" in message

    def wrong_channels(folder):
        write_synthetic_shards(folder, num_samples=2, latent_shape=LATENT_SHAPE, text_len=8, text_dim=64)
        from safetensors.torch import save_file
        save_file({"latents": torch.randn(1, 4, 2, 8, 8), "text_embeddings": torch.randn(1, 8, 64),
                   "text_lengths": torch.ones(1, dtype=torch.int64)}, str(folder / "shard-00001.safetensors"))
    message = _data_error(tmp_path / "c", wrong_channels)
    assert "shard-00001.safetensors" in message and "[N, 16, T, H, W]" in message

    def odd_size(folder):
        write_synthetic_shards(folder, num_samples=2, latent_shape=(16, 2, 7, 8), text_len=8, text_dim=64)
    message = _data_error(tmp_path / "d", odd_size)
    assert "not divisible" in message and "multiples of 16" in message

    def no_negative(folder):
        write_synthetic_shards(folder, num_samples=2, latent_shape=LATENT_SHAPE, text_len=8, text_dim=64)
        os.remove(folder / "negative_prompt.safetensors")
    message = _data_error(tmp_path / "e", no_negative)
    assert "negative_prompt.safetensors is missing" in message

    def mixed_shapes(folder):
        write_synthetic_shards(folder, num_samples=2, latent_shape=LATENT_SHAPE, text_len=8, text_dim=64)
        write_shard(folder / "shard-00001.safetensors", torch.randn(1, 16, 2, 8, 4), torch.randn(1, 8, 64))
    message = _data_error(tmp_path / "f", mixed_shapes)
    assert "differ from the first shard" in message


def test_sparsity_ramp(data_dir, tmp_path):
    config, _ = tiny_config(data_dir, tmp_path, attention={"sparsity": 0.8, "sparsity_start": 0.0,
                                                           "sparsity_ramp_steps": 4})
    assert [sparsity_at(config, s) for s in (1, 2, 4, 9)] == pytest.approx([0.2, 0.4, 0.8, 0.8])
    constant, _ = tiny_config(data_dir, tmp_path, attention={"sparsity": 0.8})
    assert sparsity_at(constant, 1) == 0.8
