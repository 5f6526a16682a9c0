"""`fastwan distill`: sparse distillation of a Wan2.1 DiT into a few-step VSA student with DMD.

Three copies of the DiT: the student (VSA attention at the configured sparsity, trainable), the real
score (the frozen dense teacher) and the fake score (a trainable dense copy of the teacher). Every
step updates the fake score by flow matching on a fresh student sample; every N-th step first
updates the student with the DMD generator loss (losses in `training/dmd.py`, shared with the toy).
AdamW over fp32 master weights, bf16 autocast, gradient clipping, activation checkpointing; FSDP2
under torchrun (`training/distributed.py`); atomic, bit-exact resumable checkpoints
(`training/checkpointing.py`). All randomness of a step (timesteps, noise) comes from one seeded CPU
generator per process, saved in every checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from ..fastwan_core.attention import AttentionConfig
from ..fastwan_core.config import WanConfig
from ..fastwan_core.errors import FastWanError
from ..fastwan_core.schedule import student_sigmas
from . import checkpointing, dmd
from .config import RANDOM_MODELS, ConfigError, DistillConfig
from .data import DataStream, ShardDataset
from .distributed import (DistributedContext, build_mesh, divide_gradients_by, enable_sequence_parallel,
                          init_distributed, parallelize_dit, sequence_parallel_groups, stream_blocks_from_cpu)


class TrainingDiverged(FastWanError):
    """A loss or gradient norm became NaN/inf; the state was saved and training stopped."""


def model_config_for(source: str, what: str = "[model] teacher") -> WanConfig:
    """The WanConfig of a model source, from safetensors headers only (no weights read)."""
    if source in RANDOM_MODELS:
        return getattr(WanConfig, RANDOM_MODELS[source])()
    from ..fastwan_core.checkpoint import index_checkpoint, infer_config

    try:
        return infer_config(index_checkpoint(source))
    except FastWanError as error:
        raise type(error)(f"{what}: {error}") from error


def build_model(source: str, dtype: torch.dtype, device, seed: int):
    """Load a DiT (or make one with random weights for "random:*" sources) on `device`."""
    from ..fastwan_core.checkpoint import load_dit
    from ..fastwan_core.model import WanDiT

    if source in RANDOM_MODELS:
        config = getattr(WanConfig, RANDOM_MODELS[source])()
        torch.manual_seed(seed)
        with torch.device(device):
            model = WanDiT(config)
        return model.to(dtype)
    return load_dit(source, dtype=dtype, device=device)


def freeze_gates(model) -> None:
    for block in model.blocks:
        block.to_gate_compress.requires_grad_(False)


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def check_regression_data(config: DistillConfig, dataset: ShardDataset, student_sigma_table) -> None:
    """The shards hold what the regression term reads ([dmd] regression_weight, regression_inputs):
    the noise of each teacher sample, or the teacher's ODE states at the student's own sigmas."""
    d = config.dmd
    if d.regression_weight <= 0:
        return
    where = f"{config.source}: [dmd] regression_weight = {d.regression_weight} with regression_inputs = " \
            f"{d.regression_inputs!r}"
    timesteps = ",".join(f"{t:g}" for t in d.student_timesteps)
    synth_flags = f"`fastwan synth --trajectory --student-timesteps {timesteps} --student-shift {d.shift:g}`"
    if d.regression_inputs != "trajectory":
        if not dataset.has_noise:
            raise ConfigError(f"{where} needs teacher ODE pairs, but the shards in {config.data.dir} hold no 'noise'. "
                              "Write the data with `fastwan synth` (it keeps each sample's noise), or set [dmd] "
                              "regression_weight = 0.")
        return
    sigmas = dataset.trajectory_sigmas
    if sigmas is None:
        raise ConfigError(f"{where} needs the teacher's ODE states at the student's sigmas, but the shards in "
                          f"{config.data.dir} hold no 'trajectory'. Write the data with {synth_flags}, or use "
                          "[dmd] regression_inputs = \"noise\".")
    if len(sigmas) != len(student_sigma_table) or any(abs(a - b) > 1e-5 for a, b in zip(sigmas, student_sigma_table)):
        raise ConfigError(f"{where}: the shards in {config.data.dir} hold the teacher's ODE states at sigmas "
                          f"{[round(s, 4) for s in sigmas]}, but the student's sigmas ([dmd] student_timesteps = "
                          f"{list(d.student_timesteps)}, shift = {d.shift:g}) are "
                          f"{[round(s, 4) for s in student_sigma_table]}. Write the data again with {synth_flags}, "
                          "or set [dmd] student_timesteps and shift to the data's.")


def sparsity_at(config: DistillConfig, step: int) -> float:
    """The student's VSA sparsity at `step` (1-based): a linear ramp, then constant."""
    a = config.attention
    if a.sparsity_ramp_steps <= 0:
        return a.sparsity
    progress = min(1.0, step / a.sparsity_ramp_steps)
    return a.sparsity_start + (a.sparsity - a.sparsity_start) * progress


class Distiller:
    """Models, optimizers, data and RNG of one distillation run; `train_step(step)` does one step."""

    def __init__(self, config: DistillConfig, context: Optional[DistributedContext] = None, log=print):
        self.config = config
        self.context = context or init_distributed(config.train.device)
        self.device = self.context.device
        self.log = log if self.context.is_main else (lambda *a, **k: None)
        t = config.train
        self.mixed_precision = t.mixed_precision == "bf16"

        # -- every check that needs no weights, before loading anything ---------------------------
        checkpointing.check_writable(t.output_dir, config.source)
        mesh = build_mesh(config.parallel, self.context, config.source)
        self.model_config = model_config_for(config.model.teacher)
        for key in ("student_init", "fake_score_init"):
            source = getattr(config.model, key)
            if source and model_config_for(source, f"[model] {key}") != self.model_config:
                raise checkpointing.CheckpointError(
                    f"{config.source}: [model] {key} = {source!r} has a different architecture than the teacher "
                    f"({model_config_for(source)} vs {self.model_config}); the student and fake score must be "
                    "the teacher's size.")
        self.dataset = ShardDataset(config.data.dir, self.model_config.text_dim, self.model_config.patch_size)
        latent = self.dataset.latent_shape
        tokens = math.prod(n // p for n, p in zip(latent[1:], self.model_config.patch_size))
        self.sequence_group, data_rank, data_size = sequence_parallel_groups(
            self.context, config.parallel.sequence_parallel, self.model_config.num_heads, tokens, config.source)
        # processes of one sequence-parallel group share their samples and their noise
        self.data = DataStream(self.dataset, config.data.batch_size, config.data.seed, data_rank, data_size)
        self.settings = config.dmd
        self.student_sigma_table = student_sigmas(self.settings.student_timesteps, self.settings.shift)
        check_regression_data(config, self.dataset, self.student_sigma_table)

        # -- models --------------------------------------------------------------------------------
        m = config.model
        teacher = build_model(m.teacher, torch.float32, self.device, m.random_seed)
        student = build_model(m.student_init, torch.float32, self.device, m.random_seed) if m.student_init \
            else copy.deepcopy(teacher)
        fake_score = build_model(m.fake_score_init, torch.float32, self.device, m.random_seed) \
            if m.fake_score_init else copy.deepcopy(teacher)
        if self.mixed_precision:
            teacher.cast_for_inference(torch.bfloat16)  # frozen: no fp32 master copy needed
        teacher.requires_grad_(False).eval()
        student.train()
        fake_score.train()
        # The VSA gates only act in sparse attention: the dense fake score never uses them (no
        # gradient, so no optimizer state, and weight decay would only shrink them), nor does a
        # dense student.
        freeze_gates(fake_score)
        if config.attention.backend == "dense":
            freeze_gates(student)
        student.set_activation_checkpointing(t.activation_checkpointing)
        fake_score.set_activation_checkpointing(t.activation_checkpointing)
        if self.sequence_group is not None:
            for model in (teacher, student, fake_score):
                enable_sequence_parallel(model, self.sequence_group)
        # All three sharded alike; the frozen teacher optionally kept in CPU memory.
        offload = config.parallel.offload_teacher
        if offload and mesh is None:
            self.teacher = stream_blocks_from_cpu(teacher, self.device)
        else:
            self.teacher = parallelize_dit(teacher, mesh, offload=offload)
        self.student = parallelize_dit(student, mesh)
        self.fake_score = parallelize_dit(fake_score, mesh)
        if self.sequence_group is not None:
            for model in (self.student, self.fake_score):
                divide_gradients_by(model, data_size)
        o = config.optimizer
        adamw = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.student_optimizer = torch.optim.AdamW(trainable(self.student), lr=o.lr, **adamw)
        self.fake_optimizer = torch.optim.AdamW(trainable(self.fake_score), lr=o.fake_score_lr, **adamw)
        self.gan, self.gan_optimizer = None, None
        if self.settings.gan_discriminator_weight > 0:
            self.gan, self.gan_optimizer = self._gan_head(fake_score, adamw)
        self.generator = torch.Generator("cpu").manual_seed(self.noise_seed())
        self.negative = self.dataset.negative_embedding.to(self.device)  # [1, L, D]
        self.step = 0

    def _gan_head(self, fake_score, adamw: dict):
        """DMD2's head on the output of one fake-score block, with its own AdamW at the fake score's lr."""
        layer = self.settings.gan_feature_layer
        blocks = fake_score.blocks
        if layer == -1:
            layer = len(blocks) // 2
        if not 0 <= layer < len(blocks):
            raise ConfigError(
                f"{self.config.source}: [dmd] gan_feature_layer = {layer} is not a block of the fake score "
                f"(0..{len(blocks) - 1}, or -1 for the middle one).")
        head = dmd.GANHead(self.model_config.dim).to(self.device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=self.config.optimizer.fake_score_lr, **adamw)
        return dmd.GANParts(head, dmd.FeatureTap(blocks[layer])), optimizer

    def _step_gan_head(self) -> None:
        """The head's update after a fake-score backward (gradients averaged over processes)."""
        if self.context.enabled:
            for parameter in self.gan.head.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.AVG)
        self.gan_optimizer.step()

    # -- model calls --------------------------------------------------------------------------------
    def _autocast(self):
        if not self.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _caller(self, model):
        def call(x, timestep, context):
            with self._autocast():
                return model(x, timestep, context)
        return call

    def student_attention(self, step: int) -> AttentionConfig:
        a = self.config.attention
        if a.backend == "dense":
            return AttentionConfig()
        return AttentionConfig(backend="vsa", sparsity=sparsity_at(self.config, step), implementation=a.implementation)

    # -- one step -----------------------------------------------------------------------------------
    def _update(self, model, optimizer, loss: torch.Tensor, what: str, step: int) -> float:
        """Backward, clip, check for NaN/inf, step. Returns the pre-clip gradient norm."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable(model), self.config.optimizer.grad_clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        loss_value, norm_value = float(loss.detach()), float(norm)
        # Decided together: the save that follows is collective under FSDP2, so every rank must
        # take the same branch even when only one rank's (local) loss went bad.
        if self.context.any_true(not (math.isfinite(loss_value) and math.isfinite(norm_value))):
            self._diverged(what, step, loss_value, norm_value)
        optimizer.step()
        return norm_value

    def _diverged(self, what: str, step: int, loss_value: float, norm_value: float) -> None:
        name = f"nonfinite-{checkpointing.checkpoint_name(step)}"
        folder = self.save(step - 1, name=name, update_latest=False)
        latest = checkpointing.latest_checkpoint(self.config.train.output_dir)
        raise TrainingDiverged(
            f"step {step}: the {what} loss is {loss_value} and its gradient norm {norm_value}; stopped before "
            f"applying that update. The state before it is saved in {folder}. Resume from "
            f"{latest or 'the start'} with a lower [optimizer] lr / fake_score_lr or [optimizer] grad_clip, "
            "and check the data shards for NaN/inf.")

    def train_step(self, step: int) -> dict:
        """Step `step` (1-based): the generator update on every N-th step, then the fake-score update(s)."""
        started = time.perf_counter()
        settings = self.settings
        regression_inputs = settings.regression_inputs if settings.regression_weight > 0 else None
        batch = self.data.next_batch(with_noise=regression_inputs in ("noise", "line"),
                                     with_trajectory=regression_inputs == "trajectory")
        latents, text = batch.latents.to(self.device), batch.text_embeddings.to(self.device)
        regression = None
        if regression_inputs is not None:  # the data are the teacher's samples
            regression = dmd.RegressionData(
                latents, None if batch.noise is None else batch.noise.to(self.device),
                None if batch.trajectory is None else batch.trajectory.transpose(0, 1).to(self.device))
        negative = self.negative.expand(latents.shape[0], -1, -1)
        self.student.attention = self.student_attention(step)
        student = self._caller(self.student)
        fake_score = self._caller(self.fake_score)
        metrics = {"step": step}
        if dmd.is_generator_step(step, settings.generator_update_interval):
            draws = dmd.StepDraws.draw(latents.shape, self.generator, settings, self.device, self.student_sigma_table)
            losses = dmd.generator_step_losses(student, self._caller(self.teacher), fake_score, latents, text,
                                               negative, draws, settings, self.gan, regression,
                                               self.student_sigma_table)
            loss = sum(losses.values())
            metrics["generator_grad_norm"] = self._update(self.student, self.student_optimizer, loss, "generator", step)
            metrics["generator_loss"] = float(loss.detach())
            if len(losses) > 1:
                metrics.update({f"generator_{name}_loss": float(value.detach()) for name, value in losses.items()})
        for _ in range(settings.fake_score_updates):
            draws = dmd.StepDraws.draw(latents.shape, self.generator, settings, self.device, self.student_sigma_table)
            real_draws = None
            if self.gan is not None:
                real_draws = dmd.StepDraws.draw(latents.shape, self.generator, settings, self.device,
                                                self.student_sigma_table)
                self.gan_optimizer.zero_grad(set_to_none=True)
            losses = dmd.fake_score_step_losses(student, fake_score, latents, text, draws, settings, self.gan,
                                                real_draws)
            loss = sum(losses.values())
            metrics["fake_score_grad_norm"] = self._update(self.fake_score, self.fake_optimizer, loss, "fake-score",
                                                           step)
            metrics["fake_score_loss"] = float(loss.detach())
            if self.gan is not None:
                self._step_gan_head()
                metrics["fake_score_gan_loss"] = float(losses["gan"].detach())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics["step_time_s"] = time.perf_counter() - started
        metrics["sparsity"] = self.student_attention(step).sparsity
        self.step = step
        return metrics

    # -- checkpoints --------------------------------------------------------------------------------
    def _checkpointed(self) -> tuple[dict, dict]:
        """What a checkpoint holds: the trained models and their optimizers (the GAN head too, when on)."""
        models = {"student": self.student, "fake_score": self.fake_score}
        optimizers = {"student": self.student_optimizer, "fake_score": self.fake_optimizer}
        if self.gan is not None:
            models["gan_head"], optimizers["gan_head"] = self.gan.head, self.gan_optimizer
        return models, optimizers

    def save(self, step: int, name: Optional[str] = None, update_latest: bool = True) -> Path:
        return checkpointing.save_checkpoint(
            self.config.train.output_dir, step,
            *self._checkpointed(), self.generator, {"data": self.data.state_dict()}, self.context,
            self.model_config.to_dict(), keep=self.config.train.keep_checkpoints,
            name=name, update_latest=update_latest)

    def resume(self, folder) -> int:
        state = checkpointing.load_checkpoint(
            folder, *self._checkpointed(), self.generator, self.context)
        self.data.load_state_dict(state["data"])
        self.step = int(state["step"])
        if not state["rng_restored"]:
            # Saved by another number of processes: the weights and optimizer states are resharded;
            # each process's noise stream restarts from the seed and the step.
            self.generator.manual_seed(self.noise_seed() * 1000003 + self.step)
            self.log(f"{folder} was saved by {state['world_size']} processes, resumed on {self.context.world_size}: "
                     f"same weights and optimizer states, data continues from the saved position, the global batch "
                     f"is now {self.data.global_batch} (was {self.config.data.batch_size * state['world_size']}), "
                     "noise streams restart from the seed and the step.")
        return self.step

    def noise_seed(self) -> int:
        return self.config.train.seed * 1000003 + self.data.rank


class MetricsLog:
    """Plain log lines always; metrics.jsonl in the run folder; TensorBoard when installed."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, log=print):
        self.enabled, self.log = enabled, log
        self.jsonl = run_dir / "metrics.jsonl" if enabled else None
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: plain lines and jsonl only
                self.writer = None

    def write(self, metrics: dict, max_steps: int) -> None:
        if not self.enabled:
            return
        parts = [f"step {metrics['step']}/{max_steps}"]
        for key in ("fake_score_loss", "fake_score_grad_norm", "generator_loss", "generator_grad_norm"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.5g}")
        parts += [f"sparsity {metrics['sparsity']:.2f}", f"step_time {metrics['step_time_s']:.3f}s",
                  f"{metrics['samples_per_s']:.3g} samples/s", f"{metrics['samples_per_s_per_gpu']:.3g} per GPU",
                  f"global batch {metrics['global_batch']}"]
        self.log(" | ".join(parts))
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget the logged steps after `step` (the checkpoint resumed from): they are about to be re-run."""
    if not path.is_file():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # half a line: the process was killed while writing it
            return math.inf

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) != len(lines):
        from ..fastwan_core.checkpoint import atomic_write_text

        atomic_write_text(path, "".join(kept))


def run_distill(config: DistillConfig, context: Optional[DistributedContext] = None, log=print,
                stop_at_step: Optional[int] = None) -> dict:
    """Train until max_steps or a stop signal; returns {"step", "stopped", "checkpoint"}.

    Resumes automatically from the run folder's latest checkpoint. SIGTERM/SIGINT finish the current
    step, save, and return (stopped="signal"). `stop_at_step` behaves like a signal arriving during
    that step (for tests of interruption).
    """
    trainer = Distiller(config, context, log)
    context = trainer.context
    t = config.train
    run_dir = Path(t.output_dir)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        from ..fastwan_core.checkpoint import atomic_write_text

        atomic_write_text(run_dir / "config.toml", config.to_toml())
    latest = checkpointing.latest_checkpoint(run_dir)
    if latest is not None:
        trainer.resume(latest)
        trainer.log(f"resumed from {latest} at step {trainer.step}")
        if context.is_main:
            drop_metrics_after(run_dir / "metrics.jsonl", trainer.step)
    metrics_log = MetricsLog(run_dir, context.is_main, t.tensorboard, trainer.log)

    stop = {"reason": None}
    previous = {}

    def request_stop(signum, frame):
        if stop["reason"] is not None:  # a second Ctrl-C / SIGTERM: stop now, without saving
            raise KeyboardInterrupt
        stop["reason"] = signal.Signals(signum).name
        trainer.log(f"{stop['reason']} received: finishing step {trainer.step + 1}, then saving a checkpoint")

    with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, request_stop)
    result = {"step": trainer.step, "stopped": None, "checkpoint": str(latest or "")}
    try:
        for step in range(trainer.step + 1, t.max_steps + 1):
            metrics = trainer.train_step(step)
            metrics["global_batch"] = trainer.data.global_batch
            metrics["samples_per_s"] = trainer.data.global_batch / metrics["step_time_s"]
            metrics["samples_per_s_per_gpu"] = metrics["samples_per_s"] / context.world_size
            if step % t.log_every == 0 or step == t.max_steps:
                metrics_log.write(metrics, t.max_steps)
            if stop_at_step is not None and step == stop_at_step:
                stop["reason"] = "stop_at_step"
            stopping = context.any_true(stop["reason"] is not None)
            if step % t.checkpoint_every == 0 or step == t.max_steps or stopping:
                result["checkpoint"] = str(trainer.save(step))
            if stopping:
                result["stopped"] = stop["reason"] or "signal"
                trainer.log(f"stopped at step {step}; checkpoint {result['checkpoint']}")
                break
        result["step"] = trainer.step
    finally:
        metrics_log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return result


def main_distill(args) -> int:
    from .config import load_config
    from .distributed import shutdown

    config = load_config(args.config, args.set)
    if getattr(args, "memory_plan", False):
        from .data import ShardDataset
        from .distributed import memory_plan

        if args.gpus < 1 or args.gpus_per_node < 0:
            from ..fastwan_core.errors import InputError

            raise InputError(f"--gpus {args.gpus} --gpus-per-node {args.gpus_per_node}: give at least one GPU.")
        model_config = model_config_for(config.model.teacher)
        dataset = ShardDataset(config.data.dir, model_config.text_dim, model_config.patch_size)
        gpus_per_node = args.gpus_per_node or args.gpus
        print(json.dumps(memory_plan(model_config, config, args.gpus, gpus_per_node, dataset.latent_shape), indent=2))
        return 0
    context = init_distributed(config.train.device)
    try:
        result = run_distill(config, context, log=lambda line: print(line, flush=True))
    finally:
        shutdown(context)
    if context.is_main:
        print(json.dumps(result), flush=True)
    return 0


def main_export(args) -> int:
    """`fastwan export`: the student of a run's checkpoint -> one safetensors file via save_dit."""
    from ..fastwan_core.checkpoint import save_dit
    from ..fastwan_core.errors import InputError

    run = Path(args.run_dir)
    if args.checkpoint:
        folder = run / "checkpoints" / args.checkpoint
        if not (folder / checkpointing.TRAINER_STATE_FILE).is_file():
            raise InputError(f"--checkpoint {args.checkpoint}: {folder} is not a complete checkpoint; pick one of "
                             f"{sorted(p.name for p in (run / 'checkpoints').glob('step-*'))}.")
    else:
        folder = checkpointing.latest_checkpoint(run)
        if folder is None:
            raise InputError(f"--run {run}: no checkpoints/latest in this folder; give the output_dir of a "
                             "`fastwan distill` run that has saved at least once.")
    if not str(args.out).endswith(".safetensors"):
        raise InputError(f"--out {args.out}: the export is one file; give a path ending in .safetensors.")
    from ..fastwan_core.model import WanDiT
    from ..fastwan_core.pipeline import DTYPES

    config = WanConfig.from_dict(checkpointing.read_trainer_state(folder)["model_config"])
    weights = {k.split("/", 1)[1]: v for k, v in checkpointing.read_checkpoint(folder, "student/").items()}
    with torch.device("meta"):
        student = WanDiT(config)
    student.load_state_dict(weights, assign=True)
    path = save_dit(student.to(DTYPES[args.dtype]), args.out, layout=args.layout)
    print(json.dumps({"exported": str(path), "checkpoint": str(folder), "layout": args.layout, "dtype": args.dtype}))
    return 0
