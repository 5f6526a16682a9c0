"""The trainer on several CPU processes (gloo), the way torchrun runs it on GPUs.

- Sharded checkpoints (torch.distributed.checkpoint): saved on 2 processes, they hold exactly the
  state FSDP2 gathers (the oracle: full_state_dict all-gathers, no DCP involved); resumed on 1 and on
  4 processes every weight and optimizer state equals it; on 2, a stop + resume is bit-exact.
- HSDP (2 shard groups of 2) gives the gradients of one process on the whole batch.
Each group of processes is started once per module (tiny models; the start-up dominates): about
60 s of CPU on 2 cores for both, so the tests that share them are marked slow (CI runs them).
"""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from fastwan.training import checkpointing
from fastwan.training.config import config_from_dict
from fastwan.training.data import write_synthetic_shards

LATENT_SHAPE = (16, 2, 8, 8)


def raw_config(data_dir, output_dir, **parallel):
    return {
        "model": {"teacher": "random:tiny", "random_seed": 2},
        "attention": {"backend": "vsa", "implementation": "reference", "sparsity": 0.5, "sparsity_start": 0.5},
        "dmd": {"generator_update_interval": 2},
        "optimizer": {"lr": 1e-3, "fake_score_lr": 1e-3},
        "data": {"dir": str(data_dir), "batch_size": 1},
        "train": {"output_dir": str(output_dir), "max_steps": 4, "mixed_precision": "no", "device": "cpu",
                  "checkpoint_every": 100, "tensorboard": False, "activation_checkpointing": False},
        "parallel": parallel,
    }


def quiet(*args, **kwargs):
    pass


# -- running a function on N gloo processes ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, function, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from fastwan.training.distributed import init_distributed, shutdown

    context = init_distributed("cpu")
    try:
        function(context, *args)
    finally:
        shutdown(context)


def run_processes(world_size, function, *args, timeout=300):
    processes = mp.start_processes(_entry, args=(world_size, _free_port(), function, args), nprocs=world_size,
                                   join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            raise TimeoutError(f"{world_size} processes running {function.__name__} took over {timeout} s")


def full_state(distiller) -> dict:
    """Every weight and optimizer state, unsharded by FSDP2's own all-gathers (not by DCP)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {}
    for key, model, optimizer in (("student", distiller.student, distiller.student_optimizer),
                                  ("fake_score", distiller.fake_score, distiller.fake_optimizer)):
        out.update({f"{key}/{k}": v.clone() for k, v in get_model_state_dict(model, options=options).items()})
        for name, entries in get_optimizer_state_dict(model, optimizer, options=options).get("state", {}).items():
            out.update({f"optimizer_{key}/{name}/{entry}": v.clone() for entry, v in entries.items()})
    return out


def save_tensors(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# -- the workers ------------------------------------------------------------------------------------

def train_and_save_on_two(context, data_dir, root):
    from fastwan.training.trainer import Distiller, run_distill

    # straight: 4 steps, a checkpoint after step 2 (both optimizers have stepped: generator every 2nd)
    distiller = Distiller(config_from_dict(raw_config(data_dir, root / "straight")), context, log=quiet)
    for model in (distiller.teacher, distiller.student, distiller.fake_score):  # all three sharded alike
        weight = model.blocks[0].ffn[0].weight
        assert weight.to_local().shape[0] == weight.shape[0] // 2 and weight.device_mesh.shape == (2,)
    for step in range(1, 5):
        metrics = distiller.train_step(step)
        if step == 1:
            first_step = metrics
        if step == 2:
            distiller.save(2)
            state = full_state(distiller)
            if context.is_main:
                save_tensors(state, root / "gathered_at_2.safetensors")
    distiller.save(4)
    # interrupted after step 1 (before the student's first update), resumed on the same 2 processes
    config = config_from_dict(raw_config(data_dir, root / "interrupted"))
    run_distill(config, context, log=quiet, stop_at_step=1)
    run_distill(config, context, log=quiet)
    # the frozen teacher's FSDP shards kept in CPU memory: the same first step
    offloaded = Distiller(config_from_dict(raw_config(data_dir, root / "offloaded", offload_teacher=True)), context,
                          log=quiet)
    assert offloaded.teacher.blocks[0]._get_fsdp_state()._fsdp_param_group.offload_policy.__class__.__name__ \
        == "CPUOffloadPolicy"
    if context.is_main:
        (root / "first_step.json").write_text(json.dumps([first_step, offloaded.train_step(1)]))
    else:
        offloaded.train_step(1)
    sequence_parallel_on_two(context, root)
    # the trainer with both processes on each sample (Ulysses): one data-parallel group, so the same
    # batches and noise as one process
    parallel = Distiller(config_from_dict(raw_config(data_dir, root / "sequence", sequence_parallel=2)), context,
                         log=quiet)
    history = [parallel.train_step(step) for step in (1, 2)]
    state = full_state(parallel)
    if context.is_main:
        (root / "sequence_parallel_steps.json").write_text(json.dumps(history))
        save_tensors(state, root / "sequence_parallel_state.safetensors")


def sequence_parallel_on_two(context, root):
    """Ulysses over 2 processes (one attention head each) against the same model on one process:
    outputs, and parameter gradients summed over the two, for dense and VSA attention (top 2 of 4 tiles)."""
    import copy

    import torch.distributed as dist

    from fastwan.fastwan_core.attention import AttentionConfig
    from fastwan.training.distributed import enable_sequence_parallel

    model, (_, t, text, _) = hybrid_problem()
    for block in model.blocks:  # non-zero VSA gates: the coarse branch counts too
        torch.nn.init.normal_(block.to_gate_compress.weight, std=0.05)
    generator = torch.Generator().manual_seed(5)
    x, target = (torch.randn(2, 16, 4, 16, 16, generator=generator) for _ in range(2))  # 4x8x8 tokens: 4 VSA tiles
    parallel = enable_sequence_parallel(copy.deepcopy(model), dist.group.WORLD)
    report = {}
    for attention in (AttentionConfig(), AttentionConfig(backend="vsa", sparsity=0.5, implementation="reference")):
        model.zero_grad(), parallel.zero_grad()
        model.attention = parallel.attention = attention
        expected = model(x, t[:2], text[:2])
        torch.nn.functional.mse_loss(expected, target).backward()
        got = parallel(x, t[:2], text[:2])
        torch.nn.functional.mse_loss(got, target).backward()
        grads = {}
        for (name, p), (_, q) in zip(model.named_parameters(), parallel.named_parameters()):
            if p.grad is not None:
                dist.all_reduce(q.grad)
                grads[name] = (p.grad, q.grad)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for name, (p_grad, q_grad) in grads.items():
            torch.testing.assert_close(q_grad, p_grad, rtol=1e-4, atol=1e-6, msg=name)
        report[attention.backend] = {"gradients": len(grads), "output_mean_abs": float(got.detach().abs().mean())}
    if context.is_main:
        (root / "sequence_parallel.json").write_text(json.dumps(report))


def resume_on_four(context, data_dir, root):
    from fastwan.training.trainer import Distiller

    distiller = Distiller(config_from_dict(raw_config(data_dir, root / "four")), context, log=quiet)
    assert distiller.resume(root / "straight/checkpoints/step-000002") == 2
    state = full_state(distiller)
    if context.is_main:
        save_tensors(state, root / "resumed_on_4.safetensors")
    distiller.train_step(3)  # and it trains on


def hybrid_gradients_on_four(context, root):
    """HSDP over 2 shard groups of 2: each process takes one sample of a batch of 4."""
    from torch.distributed.tensor import Replicate, Shard

    from fastwan.training.config import ParallelSection
    from fastwan.training.distributed import build_mesh, parallelize_dit

    model, inputs = hybrid_problem()
    mesh = build_mesh(ParallelSection(sharding="hybrid", shard_group_size=2), context)
    assert mesh.shape == (2, 2) and mesh.mesh_dim_names == ("replicate", "shard")
    model = parallelize_dit(model, mesh)
    weight = model.blocks[0].ffn[0].weight
    assert weight.placements == (Replicate(), Shard(0)) and weight.to_local().shape[0] == weight.shape[0] // 2
    x, t, text, target = (tensor[context.rank:context.rank + 1] for tensor in inputs)
    torch.nn.functional.mse_loss(model(x, t, text), target).backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    if context.is_main:
        save_tensors(grads, root / "hybrid_grads.safetensors")


def resume_and_hybrid_on_four(context, data_dir, root):
    resume_on_four(context, data_dir, root)
    hybrid_gradients_on_four(context, root)


def hybrid_problem():
    from fastwan.fastwan_core.config import WanConfig
    from fastwan.fastwan_core.model import WanDiT

    torch.manual_seed(0)
    model = WanDiT(WanConfig.tiny())
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(4, *LATENT_SHAPE, generator=generator), torch.tensor([999.0, 757.0, 522.0, 100.0]),
              torch.randn(4, 8, 64, generator=generator), torch.randn(4, *LATENT_SHAPE, generator=generator))
    return model, inputs


# -- the tests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("data"), num_samples=4, latent_shape=LATENT_SHAPE,
                                  text_len=8, text_dim=64, samples_per_shard=2, seed=3)


@pytest.fixture(scope="module")
def saved_on_two(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    run_processes(2, train_and_save_on_two, data_dir, root)
    return root


@pytest.fixture(scope="module")
def on_four(data_dir, saved_on_two):
    run_processes(4, resume_and_hybrid_on_four, data_dir, saved_on_two)
    return saved_on_two


def assert_states_equal(expected: dict, got: dict):
    assert sorted(got) == sorted(expected)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:4]}"


@pytest.mark.slow
def test_sharded_checkpoint_holds_the_gathered_state(saved_on_two):
    folder = saved_on_two / "straight/checkpoints/step-000002"
    shards = sorted(p.name for p in (folder / checkpointing.STATE_FOLDER).iterdir())
    assert len(shards) == 2 and all(name.startswith(("shard-00001-", "shard-00002-")) for name in shards)
    saved = checkpointing.read_checkpoint(folder)
    gathered = load_tensors(saved_on_two / "gathered_at_2.safetensors")
    assert_states_equal(gathered, {k: v for k, v in saved.items() if not k.startswith("rng-")})
    assert {k.split("/")[0] for k in saved if k.startswith("rng-")} == {"rng-rank00000", "rng-rank00001"}
    assert json.loads((folder / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_export_of_a_sharded_checkpoint_is_one_file_load_dit_reads(saved_on_two, tmp_path, capsys):
    from fastwan.cli import main
    from fastwan.fastwan_core.checkpoint import load_dit

    out = tmp_path / "student.safetensors"
    assert main(["export", "--run", str(saved_on_two / "straight"), "--checkpoint", "step-000002",
                 "--out", str(out), "--dtype", "fp32"]) == 0
    exported = load_dit(out).state_dict()
    gathered = load_tensors(saved_on_two / "gathered_at_2.safetensors")
    assert_states_equal({k[len("student/"):]: v for k, v in gathered.items() if k.startswith("student/")}, exported)


@pytest.mark.slow
def test_stop_and_resume_on_two_processes_is_bit_exact(saved_on_two):
    straight = saved_on_two / "straight/checkpoints/step-000004"
    resumed = saved_on_two / "interrupted/checkpoints/step-000004"
    assert_states_equal(checkpointing.read_checkpoint(straight), checkpointing.read_checkpoint(resumed))
    assert (json.loads((straight / "trainer_state.json").read_text())
            == json.loads((resumed / "trainer_state.json").read_text()))
    lines = [json.loads(line) for line in (saved_on_two / "interrupted/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:  # throughput of the run and per GPU, from the global batch of 2 x 1
        assert m["global_batch"] == 2
        assert m["samples_per_s"] == pytest.approx(2 / m["step_time_s"])
        assert m["samples_per_s_per_gpu"] == pytest.approx(m["samples_per_s"] / 2)


@pytest.mark.slow
def test_offloaded_teacher_on_two_processes_gives_the_same_step(saved_on_two):
    plain, offloaded = json.loads((saved_on_two / "first_step.json").read_text())
    for key in ("fake_score_loss", "fake_score_grad_norm"):
        assert plain[key] == offloaded[key], key


@pytest.mark.slow
def test_sequence_parallel_matches_one_process(saved_on_two):
    # the comparisons ran inside the two processes (assert_close); here: that they ran, on real gradients
    report = json.loads((saved_on_two / "sequence_parallel.json").read_text())
    assert set(report) == {"dense", "vsa"}
    assert all(entry["gradients"] > 20 and entry["output_mean_abs"] > 0 for entry in report.values())


@pytest.mark.slow
def test_sequence_parallel_trainer_matches_one_process(data_dir, saved_on_two, tmp_path):
    from fastwan.training.trainer import Distiller

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Distiller(config_from_dict(raw_config(data_dir, tmp_path)), log=quiet)
        expected = [single.train_step(step) for step in (1, 2)]
        state = full_state(single)
    finally:
        torch.set_num_threads(previous)
    got = json.loads((saved_on_two / "sequence_parallel_steps.json").read_text())
    assert "generator_loss" in expected[1]
    for a, b in zip(expected, got):
        for key in ("fake_score_loss", "fake_score_grad_norm", "generator_loss", "generator_grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), key
    parallel = load_tensors(saved_on_two / "sequence_parallel_state.safetensors")
    assert sorted(parallel) == sorted(state)
    for key in state:
        torch.testing.assert_close(parallel[key], state[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.slow
def test_saved_on_two_resumes_on_one(data_dir, saved_on_two, tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from fastwan.training.trainer import Distiller

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines = []
        distiller = Distiller(config_from_dict(raw_config(data_dir, tmp_path)), log=lines.append)
        assert distiller.resume(saved_on_two / "straight/checkpoints/step-000002") == 2
        state = {f"student/{k}": v for k, v in distiller.student.state_dict().items()}
        state.update({f"fake_score/{k}": v for k, v in distiller.fake_score.state_dict().items()})
        for key, model, optimizer in (("student", distiller.student, distiller.student_optimizer),
                                      ("fake_score", distiller.fake_score, distiller.fake_optimizer)):
            for name, entries in get_optimizer_state_dict(model, optimizer)["state"].items():
                state.update({f"optimizer_{key}/{name}/{entry}": v for entry, v in entries.items()})
        assert_states_equal(load_tensors(saved_on_two / "gathered_at_2.safetensors"), state)
        assert distiller.data.state_dict() == {"epoch": 0, "cursor": 4}  # 2 steps x 2 processes
        assert any("saved by 2 processes, resumed on 1" in line and "global batch is now 1 (was 2)" in line
                   for line in lines), lines
        distiller.train_step(3)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
def test_saved_on_two_resumes_on_four(on_four):
    assert_states_equal(load_tensors(on_four / "gathered_at_2.safetensors"),
                        load_tensors(on_four / "resumed_on_4.safetensors"))


@pytest.mark.slow
def test_hybrid_sharding_gives_the_single_process_gradients(on_four):
    model, (x, t, text, target) = hybrid_problem()
    # FSDP averages the 4 processes' gradients: the mean of per-sample losses on one process
    loss = sum(torch.nn.functional.mse_loss(model(x[i:i + 1], t[i:i + 1], text[i:i + 1]), target[i:i + 1])
               for i in range(4)) / 4
    loss.backward()
    got = load_tensors(on_four / "hybrid_grads.safetensors")
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(float(g.abs().sum()) > 0 for g in expected.values()) > 0.8 * len(expected)


# -- the Slurm launcher -----------------------------------------------------------------------------

def _slurm(tmp_path, *args, **env):
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "srun.args"
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {log}\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2 $3" = "show hostnames node[07-08]" ] '
                                      '&& printf "node07\\nnode08\\n"\n')
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts/slurm_distill.sh"
    environment = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=environment, timeout=60)
    return done, (log.read_text().splitlines() if log.exists() else None)


def test_slurm_script_launches_one_torchrun_per_node(tmp_path):
    from fastwan.training.config import apply_override

    config = tmp_path / "run.toml"
    config.write_text("[train]\nmax_steps = 3\n")
    output = tmp_path / 'shared runs/a "b"'
    done, argv = _slurm(tmp_path, "--config", str(config), "--output", str(output), "--port", "29600",
                        "--set", "train.max_steps=10", SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2",
                        SLURM_JOB_NODELIST="node[07-08]", SLURM_GPUS_ON_NODE="8")
    assert done.returncode == 0, done.stderr
    assert argv[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    command = argv[argv.index("torch.distributed.run") + 1:]
    flags = dict(zip(command[:10:2], command[1:10:2]))
    assert flags == {"--nnodes": "2", "--nproc_per_node": "8", "--rdzv_backend": "c10d",
                     "--rdzv_endpoint": "node07:29600", "--rdzv_id": "42"}
    assert command[10:16] == ["-m", "fastwan.cli", "distill", "--config", str(config), "--set"]
    data = {}
    apply_override(data, command[16], "test")  # the trainer reads the output folder back exactly
    assert data == {"train": {"output_dir": str(output)}}
    assert command[17:] == ["--set", "train.max_steps=10"] and output.is_dir()


def test_slurm_script_refuses_bad_arguments(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("")
    slurm = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "node[07-08]"}
    for args, env, message in [
        (["--output", str(tmp_path)], slurm, "--config is required"),
        (["--config", str(tmp_path / "no.toml"), "--output", str(tmp_path)], slurm, "no such file"),
        (["--config", str(config)], slurm, "--output is required"),
        (["--config", str(config), "--output", str(tmp_path)], {"SLURM_GPUS_ON_NODE": "8"}, "not inside a Slurm"),
        (["--config", str(config), "--output", str(tmp_path)], slurm, "--gpus-per-node is required"),
        (["--config", str(config), "--output", str(tmp_path), "--gpus-per-node", "x"], slurm, "whole number"),
        (["--bogus"], slurm, "unknown argument '--bogus'"),
    ]:
        done, argv = _slurm(tmp_path, *args, **env)
        assert done.returncode == 2 and message in done.stderr and argv is None, (args, done.stderr)


# -- memory for larger models -----------------------------------------------------------------------

def wan_parameters(c) -> int:
    """Closed form of a Wan2.1 DiT's parameter count from its dimensions (DESIGN §5), VSA gates included."""
    d, f, patch = c.dim, c.ffn_dim, c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
    attention = 4 * (d * d + d) + 2 * d  # q, k, v, o + RMSNorm on q and k
    block = 2 * attention + 2 * d + (2 * d * f + f + d) + 6 * d + (d * d + d)  # + norm3, ffn, modulation, gate
    root = (c.in_channels * patch * d + d) + (c.text_dim * d + d + d * d + d) + (c.freq_dim * d + d + d * d + d) \
        + (d * 6 * d + 6 * d) + (d * c.out_channels * patch + c.out_channels * patch + 2 * d)
    return c.num_layers * block + root


def test_14b_config_memory_plan(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from fastwan.cli import main
    from fastwan.fastwan_core.config import WanConfig
    from fastwan.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "build_model", lambda *a, **k: pytest.fail("the plan loaded a model"))
    data = write_synthetic_shards(tmp_path / "data", num_samples=1, latent_shape=(16, 20, 56, 104), text_len=8,
                                  text_dim=4096, samples_per_shard=1)
    config = Path(__file__).resolve().parents[1] / "training/configs/wan_14b_480p.toml"
    common = ["distill", "--config", str(config), "--set", 'model.teacher="random:14b"',
              "--set", f"data.dir={json.dumps(str(data))}", "--memory-plan"]

    def plan(*extra):
        assert main(common + list(extra)) == 0
        return json.loads(capsys.readouterr().out)

    total = wan_parameters(WanConfig.t2v_14b())
    gates = 40 * (5120 * 5120 + 5120)
    assert 14.0e9 < total - gates < 14.5e9  # Wan2.1-T2V-14B
    full = plan("--gpus", "64", "--gpus-per-node", "8")
    assert full["parameters_per_model"] == total and full["shard_group"] == 64
    assert full["tokens_per_gpu"] == 20 * 28 * 52
    gib = full["per_gpu_gib"]
    assert gib["teacher_weights"] == round(2 * total / 64 / 2**30, 2)  # bf16, frozen
    assert gib["student_weights_grads_adamw"] == round(16 * total / 64 / 2**30, 2)  # fp32 + grads + 2 moments
    assert gib["fake_score_weights_grads_adamw"] == round((16 * total - 12 * gates) / 64 / 2**30, 2)  # frozen gates
    assert full["total_per_gpu_gib"] < 40
    hybrid = plan("--gpus", "64", "--gpus-per-node", "8", "--set", "parallel.sharding=hybrid")
    assert hybrid["shard_group"] == 8
    assert hybrid["per_gpu_gib"]["student_weights_grads_adamw"] == round(16 * total / 8 / 2**30, 2)
    offloaded = plan("--gpus", "64", "--set", "parallel.offload_teacher=true")
    assert offloaded["per_gpu_gib"]["teacher_weights"] == 0
    assert offloaded["teacher_in_cpu_memory_per_process_gib"] == gib["teacher_weights"]
    assert main(common + ["--gpus", "0"]) == 2 and "at least one GPU" in capsys.readouterr().err


def test_offloaded_teacher_trains_the_same(data_dir, tmp_path):
    """One process: the teacher's blocks live in CPU memory between their forwards; same losses."""
    from fastwan.training.trainer import Distiller

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = {}
        for offload in (False, True):
            raw = raw_config(data_dir, tmp_path / str(offload), offload_teacher=offload)
            distiller = Distiller(config_from_dict(raw), log=quiet)
            history[offload] = [distiller.train_step(step) for step in (1, 2)]
            block = distiller.teacher.blocks[0]
            assert (block._forward_pre_hooks != {}) == offload
        for a, b in zip(history[False], history[True]):
            assert {k: v for k, v in a.items() if "time" not in k and "per_s" not in k} == \
                   {k: v for k, v in b.items() if "time" not in k and "per_s" not in k}
    finally:
        torch.set_num_threads(previous)


def test_sequence_parallel_that_cannot_split_is_refused_before_any_model_loads(data_dir, tmp_path, monkeypatch):
    from fastwan.training import trainer as trainer_module
    from fastwan.training.config import ConfigError
    from fastwan.training.trainer import Distiller

    monkeypatch.setattr(trainer_module, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ConfigError) as error:
        Distiller(config_from_dict(raw_config(data_dir, tmp_path, sequence_parallel=3)), log=quiet)
    message = str(error.value)
    assert "[parallel] sequence_parallel = 3" in message
    assert "number of processes (1)" in message and "2 attention heads" in message and "32 video tokens" in message
