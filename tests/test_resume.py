"""Interrupting and resuming a distillation run changes nothing: at every step, before and after the
first generator update, a stop + resume ends in exactly the state of a run never interrupted (every
weight, optimizer moment and step counter, RNG state, data position and metrics line), and saving a
checkpoint never changes the run. Also the run folder checks done before any model loads."""
import json

import pytest
import torch

from fastwan.cli import main
from fastwan.training import checkpointing, trainer as trainer_module
from fastwan.training.config import config_from_dict
from fastwan.training.data import write_synthetic_shards
from fastwan.training.trainer import run_distill

LATENT_SHAPE = (16, 2, 8, 8)
MAX_STEPS = 4
GENERATOR_EVERY = 3  # the student's optimizer first steps at step 3: stops at 1 and 2 come before it
TIMING_KEYS = ("step_time_s", "samples_per_s", "samples_per_s_per_gpu")


def quiet(*args, **kwargs):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # module scope: before the module-scoped reference run (reductions depend on the thread count)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data"), num_samples=3, latent_shape=LATENT_SHAPE,
                                  text_len=8, text_dim=64, samples_per_shard=2, seed=5)


def raw_config(data_dir, output_dir, dmd=None, **train):
    return {
        "model": {"teacher": "random:tiny", "random_seed": 1},
        "attention": {"backend": "vsa", "implementation": "reference", "sparsity": 0.5, "sparsity_start": 0.0,
                      "sparsity_ramp_steps": 3},
        "dmd": {"generator_update_interval": GENERATOR_EVERY, **(dmd or {})},
        "optimizer": {"lr": 1e-3, "fake_score_lr": 1e-3},
        "data": {"dir": str(data_dir), "batch_size": 1},
        "train": {"output_dir": str(output_dir), "max_steps": MAX_STEPS, "mixed_precision": "no", "device": "cpu",
                  "checkpoint_every": 100, "tensorboard": False, "activation_checkpointing": False, **train},
    }


def final_state(run_dir):
    """Every tensor of the last checkpoint, its trainer state, and the metrics log without timings."""
    folder = checkpointing.latest_checkpoint(run_dir)
    state = json.loads((folder / checkpointing.TRAINER_STATE_FILE).read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]
    return checkpointing.read_checkpoint(folder), state, metrics


def assert_same_run(expected, got):
    tensors, state, metrics = expected
    got_tensors, got_state, got_metrics = got
    assert sorted(got_tensors) == sorted(tensors)
    different = [k for k in tensors if not torch.equal(tensors[k], got_tensors[k])]
    assert not different, f"{len(different)} of {len(tensors)} tensors differ, e.g. {different[:5]}"
    assert got_state == state
    assert got_metrics == metrics


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_distill(config_from_dict(raw_config(data_dir, run_dir)), log=quiet)
    return final_state(run_dir)


def test_uninterrupted_run_trains_both_optimizers(uninterrupted):
    tensors, state, metrics = uninterrupted
    assert state["step"] == MAX_STEPS and [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert all(m["global_batch"] == 1 for m in metrics)
    assert [("generator_loss" in m) for m in metrics] == [s % GENERATOR_EVERY == 0 for s in range(1, MAX_STEPS + 1)]
    steps = {k.split("/")[0]: v for k, v in tensors.items() if k.endswith("/step")}
    # AdamW's step counters: one generator update, MAX_STEPS fake-score updates
    assert steps == {"optimizer_student": torch.tensor(1.0), "optimizer_fake_score": torch.tensor(float(MAX_STEPS))}


def test_checkpointing_every_step_does_not_change_the_run(data_dir, tmp_path, uninterrupted):
    run_distill(config_from_dict(raw_config(data_dir, tmp_path, checkpoint_every=1, keep_checkpoints=1)), log=quiet)
    assert_same_run(uninterrupted, final_state(tmp_path))
    from fastwan.fastwan_core.files import file_mode

    written = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert written and all(p.stat().st_mode & 0o777 == file_mode() for p in written)  # the umask's mode


@pytest.mark.parametrize("stop_at", range(1, MAX_STEPS))
def test_stop_and_resume_at_every_step_is_bit_exact(data_dir, tmp_path, uninterrupted, stop_at):
    config = config_from_dict(raw_config(data_dir, tmp_path))
    first = run_distill(config, log=quiet, stop_at_step=stop_at)
    assert first["stopped"] == "stop_at_step" and first["step"] == stop_at
    assert run_distill(config, log=quiet)["step"] == MAX_STEPS
    assert_same_run(uninterrupted, final_state(tmp_path))


def test_stop_and_resume_with_the_gan_term_is_bit_exact(data_dir, tmp_path):
    # The GAN head and its optimizer are part of the run's state: they are checkpointed too.
    gan = {"gan_generator_weight": 0.1, "gan_discriminator_weight": 0.1}
    reference_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_distill(config_from_dict(raw_config(data_dir, reference_dir, dmd=gan)), log=quiet)
    expected = final_state(reference_dir)
    assert any("gan_head" in k for k in expected[0]), "the GAN head is not in the checkpoint"
    config = config_from_dict(raw_config(data_dir, resumed_dir, dmd=gan))
    run_distill(config, log=quiet, stop_at_step=2)
    run_distill(config, log=quiet)
    assert_same_run(expected, final_state(resumed_dir))


def test_resume_forgets_metrics_of_steps_it_reruns(data_dir, tmp_path, uninterrupted):
    """A run killed after logging steps past its last checkpoint re-runs them: they are logged once."""
    config = config_from_dict(raw_config(data_dir, tmp_path))
    run_distill(config, log=quiet, stop_at_step=1)
    log = tmp_path / "metrics.jsonl"
    with open(log, "a") as handle:  # what a SIGKILL after step 3 leaves: steps 2, 3 logged, no checkpoint
        handle.write(json.dumps({"step": 2, "fake_score_loss": 0.0}) + "\n")
        handle.write(json.dumps({"step": 3, "fake_score_loss": 0.0}) + "\n" + '{"step": 4, "fake_')
    run_distill(config, log=quiet)
    assert_same_run(uninterrupted, final_state(tmp_path))


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import safetensors.torch
import torch
from fastwan.training.config import load_config
from fastwan.training.trainer import run_distill

torch.set_num_threads(1)
serialize, calls = safetensors.torch.save, []

def serialize_then_die(tensors, metadata=None):  # DCP serializes each shard file with safetensors.torch.save
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return serialize(tensors, metadata=metadata)

safetensors.torch.save = serialize_then_die
run_distill(load_config(sys.argv[1]), log=print)
"""


def test_checkpoint_killed_mid_write_is_never_latest(data_dir, tmp_path, uninterrupted):
    import subprocess
    import sys

    raw = raw_config(data_dir, tmp_path / "run", checkpoint_every=1, keep_checkpoints=3)
    config_path = tmp_path / "run.toml"
    config_path.write_text(config_from_dict(raw).to_toml())
    done = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, str(config_path)], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stdout + done.stderr
    checkpoints = tmp_path / "run/checkpoints"
    assert (checkpoints / ".step-000002.tmp").is_dir() and not (checkpoints / "step-000002").exists()
    assert checkpointing.latest_checkpoint(tmp_path / "run").name == "step-000001"
    run_distill(config_from_dict(raw), log=quiet)  # resumes from step 1
    assert not list(checkpoints.glob(".*.tmp"))
    assert_same_run(uninterrupted, final_state(tmp_path / "run"))


@pytest.fixture
def no_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the run folder was checked")
    monkeypatch.setattr(trainer_module, "build_model", refuse)


def test_unwritable_output_dir_fails_before_any_model_loads(data_dir, tmp_path, capsys, no_compute):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config_path = tmp_path / "run.toml"
    config_path.write_text(config_from_dict(raw_config(data_dir, blocker / "run")).to_toml())
    assert main(["distill", "--config", str(config_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "[train] output_dir" in err and "not writable" in err and str(blocker / "run") in err


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_output_dir_fails_before_any_model_loads(data_dir, tmp_path, capsys, no_compute):
    run_dir = tmp_path / "read_only"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    config_path = tmp_path / "run.toml"
    config_path.write_text(config_from_dict(raw_config(data_dir, run_dir)).to_toml())
    try:
        assert main(["distill", "--config", str(config_path)]) == 2
    finally:
        run_dir.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not writable" in err, err
