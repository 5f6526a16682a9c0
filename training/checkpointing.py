"""Resumable training checkpoints: sharded, written by every process in parallel, atomic, nothing pickled.

Layout of a run folder:
    config.toml                      the resolved config of the run
    metrics.jsonl                    one JSON object per logged step
    checkpoints/latest               text: the name of the newest complete checkpoint
    checkpoints/step-000250/
        state/shard-00001-model-00001-of-00001.safetensors, shard-00002-..., ...
                                     torch.distributed.checkpoint (DCP) in safetensors: each process
                                     writes the shards it holds, with their offsets in the file's
                                     metadata. Keys "<model>/<param>" (fp32 master weights) and
                                     "optimizer_<model>/<param>/<state>" (AdamW moments, step)
        rng-rank00000.safetensors    each process's RNG states (trainer CPU generator, torch CPU, CUDA)
        trainer_state.json           step, data position, world size, the optimizers' param groups,
                                     the model config; written last

A checkpoint is written into `checkpoints/.step-000250.tmp/` and renamed into place only once every
process has finished writing (the folder must be on a filesystem all nodes share); then `latest`
is replaced atomically. A crash or kill mid-save leaves only the hidden temp folder, which is never
picked and is removed by the next save.

DCP reshards on load, so a run resumes on any number of processes with the same weights and
optimizer state (each process's data order and noise stream are per process: on a different
number they continue from the data position but restart their noise from the seed and the step).
`read_checkpoint` assembles the full tensors in one process (for `fastwan export` and tests).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fastwan_core.errors import CheckpointError
from ..fastwan_core.files import apply_umask

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
STATE_FOLDER = "state"
FORMAT_VERSION = 2


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.safetensors"


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG a training step may touch: the trainer's CPU generator, torch's CPU and CUDA RNGs."""
    state = {"trainer_generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{index}"] = cuda_state
    return state


def restore_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["trainer_generator"])
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _training_state(models: dict, optimizers: dict, started: set) -> tuple[dict, dict]:
    """The flat {key: tensor or DTensor} that DCP writes/reads in place, and the optimizers' param groups.

    Optimizers not in `started` are left out: torch would create their state by taking a step with
    zero gradients (which advances AdamW's step counter), and a fresh optimizer is their state anyway.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat, groups = {}, {}
    for key, model in models.items():
        for name, value in get_model_state_dict(model).items():
            flat[f"{key}/{name}"] = value
        if key not in started:
            continue
        optimizer_state = get_optimizer_state_dict(model, optimizers[key])
        for name, entries in optimizer_state["state"].items():
            for entry, value in entries.items():
                flat[f"optimizer_{key}/{name}/{entry}"] = value
        groups[key] = optimizer_state["param_groups"]
    return flat, groups


@contextlib.contextmanager
def _quiet_single_process(enabled: bool):
    """DCP warns on every single-process save/load that it assumes a single process: that is the intent."""
    with warnings.catch_warnings():
        if enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _json_groups(groups: list) -> list:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in groups]


def save_checkpoint(run_dir, step: int, models: dict, optimizers: dict, generator: torch.Generator,
                    trainer_state: dict, context, model_config: dict, keep: int = 2,
                    name: Optional[str] = None, update_latest: bool = True) -> Path:
    """Write a complete checkpoint atomically; returns its folder. Collective: every process calls it.

    models / optimizers: {"student": ..., "fake_score": ...}. trainer_state: JSON-able dict (data
    position, ...). model_config: WanConfig.to_dict(), so an export needs no other file.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    checkpoints = Path(run_dir) / "checkpoints"
    name = name or checkpoint_name(step)
    final = checkpoints / name
    temporary = checkpoints / f".{name}.tmp"
    if context.is_main:
        if temporary.exists():
            shutil.rmtree(temporary)  # the leftover of a crash during an earlier save
        (temporary / STATE_FOLDER).mkdir(parents=True)
    context.barrier()
    started = {key for key, optimizer in optimizers.items() if optimizer.state}
    flat, groups = _training_state(models, optimizers, started)
    with _quiet_single_process(not context.enabled):
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(temporary / STATE_FOLDER), save_distributed=True),
                 no_dist=not context.enabled)
    save_file({k: v.contiguous() for k, v in rng_state(generator).items()}, str(temporary / rng_file(context.rank)))
    context.barrier()
    if context.is_main:
        apply_umask(temporary)  # DCP's and safetensors' writers make 0600 files
        state = dict(trainer_state, format=FORMAT_VERSION, step=step, world_size=context.world_size,
                     optimizers_started=sorted(started),
                     param_groups={key: _json_groups(value) for key, value in groups.items()},
                     model_config=model_config)
        with open(temporary / TRAINER_STATE_FILE, "w") as handle:
            handle.write(json.dumps(state, indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if update_latest:
            _write_latest(checkpoints, name)
            _prune(checkpoints, keep)
    context.barrier()
    return final


def _write_latest(checkpoints: Path, name: str) -> None:
    temporary = checkpoints / f".{LATEST_FILE}.tmp"
    temporary.write_text(name + "\n")
    os.replace(temporary, checkpoints / LATEST_FILE)


def _prune(checkpoints: Path, keep: int) -> None:
    complete = sorted(p for p in checkpoints.glob("step-*") if p.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(run_dir, where: str) -> None:
    """Fail now, with one line, if the run folder cannot be created or written (not after the models load)."""
    run_dir = Path(run_dir)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, run_dir / "checkpoints"):
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
    except OSError as error:
        raise CheckpointError(f"{where}: [train] output_dir = {str(run_dir)!r} is not writable "
                              f"({error.strerror or error}); choose a folder you can write to, e.g. "
                              "--set train.output_dir=runs/my_run.") from None


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The newest complete checkpoint of a run folder, or None when there is none."""
    checkpoints = Path(run_dir) / "checkpoints"
    pointer = checkpoints / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = checkpoints / pointer.read_text().strip()
    if not (folder / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {folder.name}, which is missing or incomplete. Point it at a "
                              f"complete step-* folder in {checkpoints} or remove it to start over.")
    return folder


def read_trainer_state(folder) -> dict:
    folder = Path(folder)
    path = folder / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint ({TRAINER_STATE_FILE} is missing); pick "
                              f"another step-* folder of {folder.parent}.")
    state = json.loads(path.read_text())
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by an older trainer (checkpoint format "
                              f"{state.get('format', 1)}, this one reads {FORMAT_VERSION}); resume it with that "
                              "version, or export its student there and start a new run from it.")
    return state


def load_checkpoint(folder, models: dict, optimizers: dict, generator: torch.Generator, context) -> dict:
    """Restore models and optimizers in place (resharded to this run's processes), and the RNG states
    when the number of processes is the one that saved. Returns the trainer state, with
    "rng_restored" telling whether the RNG states were restored."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(folder)
    state = read_trainer_state(folder)
    started = set(state["optimizers_started"])
    flat, groups = _training_state(models, optimizers, started)
    with _quiet_single_process(not context.enabled):
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(folder / STATE_FOLDER)), no_dist=not context.enabled)
    for key, model in models.items():
        prefix = f"{key}/"
        set_model_state_dict(model, {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)})
        if key not in started:
            continue
        entries: dict = {}
        prefix = f"optimizer_{key}/"
        for flat_key, value in flat.items():
            if flat_key.startswith(prefix):
                name, entry = flat_key[len(prefix):].rsplit("/", 1)
                entries.setdefault(name, {})[entry] = value
        saved_groups = state["param_groups"][key]
        param_groups = [dict(current, **{k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
                        for current, saved in zip(groups[key], saved_groups)]
        set_optimizer_state_dict(model, optimizers[key], {"state": entries, "param_groups": param_groups})
    state["rng_restored"] = state["world_size"] == context.world_size
    if state["rng_restored"]:
        rng = {}
        with safe_open(str(folder / rng_file(context.rank)), framework="pt") as handle:
            rng = {k: handle.get_tensor(k) for k in handle.keys()}
        restore_rng_state(generator, rng)
    return state


def read_checkpoint(folder, prefix: str = "") -> dict:
    """The full (unsharded) CPU tensors of a checkpoint whose keys start with `prefix` ("student/": the
    student's weights), plus "rng-rank<r>/<generator>" for an empty prefix. One process, no process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = Path(folder)
    read_trainer_state(folder)
    reader = HuggingFaceStorageReader(str(folder / STATE_FOLDER))
    metadata = reader.read_metadata()
    out = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
           for key, entry in metadata.state_dict_metadata.items() if key.startswith(prefix)}
    with _quiet_single_process(True):
        dcp.load(out, storage_reader=HuggingFaceStorageReader(str(folder / STATE_FOLDER)), no_dist=True)
    if not prefix:
        for path in sorted(folder.glob("rng-rank*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                out.update({f"{path.stem}/{k}": handle.get_tensor(k) for k in handle.keys()})
    return out
