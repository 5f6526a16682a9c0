"""Resumable training checkpoints, written atomically, in safetensors + JSON (nothing pickled).

Layout of a run folder:
    config.toml                      the resolved config of the run
    metrics.jsonl                    one JSON object per logged step
    checkpoints/latest               text: the name of the newest complete checkpoint
    checkpoints/step-000250/
        student.safetensors          WanDiT weights (fp32 masters) + config metadata: `load_dit` reads it
        fake_score.safetensors       the same for the fake score
        optimizer_student.safetensors / optimizer_fake_score.safetensors
                                     AdamW moments as "<param name>/<state name>" tensors; the param
                                     groups (lr, betas, ...) as JSON metadata
        rng-rank00000.safetensors    each process's RNG states (trainer CPU generator, torch CPU, CUDA)
        trainer_state.json           step, data position, world size

A checkpoint is written to `checkpoints/.step-000250.tmp/` and renamed into place only once complete,
then `latest` is replaced atomically; a crash mid-save leaves the previous checkpoint untouched.
Under FSDP2 the full (unsharded) state dicts are gathered to rank 0, which writes them; every rank
writes its own RNG file. Resuming loads them on rank 0 and broadcasts.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fastwan_core.errors import CheckpointError

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
MODEL_FILES = {"student": "student.safetensors", "fake_score": "fake_score.safetensors"}


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _state_dict_options(distributed: bool, for_loading: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if for_loading:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint folder {path.parent} is incomplete. Resume from "
                              f"another checkpoint (edit {path.parent.parent / LATEST_FILE}) or start a new run.")
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    tensors = {}
    for param_name, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"{param_name}/{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": json.dumps(groups)}


def _unflatten_optimizer(tensors: dict, metadata: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        param_name, key = name.rsplit("/", 1)
        state.setdefault(param_name, {})[key] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


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


def save_checkpoint(run_dir, step: int, models: dict, optimizers: dict, generator: torch.Generator,
                    trainer_state: dict, context, model_config_json: str, keep: int = 2,
                    name: Optional[str] = None, update_latest: bool = True) -> Path:
    """Write a complete checkpoint atomically; returns its folder. Collective under FSDP2.

    models / optimizers: {"student": ..., "fake_score": ...}. trainer_state: JSON-able dict
    (step, data position, ...). model_config_json: WanConfig.to_dict() as JSON, stored in each model
    file's metadata so `load_dit` can read the file alone.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from ..fastwan_core.checkpoint import CONFIG_METADATA_KEY

    checkpoints = Path(run_dir) / "checkpoints"
    name = name or checkpoint_name(step)
    final = checkpoints / name
    temporary = checkpoints / f".{name}.tmp"
    options = _state_dict_options(context.enabled)
    if context.is_main:
        if temporary.exists():
            shutil.rmtree(temporary)  # the leftover of a crash during an earlier save
        temporary.mkdir(parents=True)
    context.barrier()
    _save_safetensors(rng_state(generator), temporary / f"rng-rank{context.rank:05d}.safetensors")
    for key, model in models.items():
        weights = get_model_state_dict(model, options=options)
        # An optimizer that has not stepped yet has no state to save, and asking torch for it would
        # create it by taking a zero-gradient step (which advances AdamW's step counter).
        optimizer_state = get_optimizer_state_dict(model, optimizers[key], options=options) \
            if optimizers[key].state else {"state": {}, "param_groups": optimizers[key].state_dict()["param_groups"]}
        if context.is_main:
            _save_safetensors(weights, temporary / MODEL_FILES[key],
                              {"format": "pt", CONFIG_METADATA_KEY: model_config_json})
            tensors, metadata = _flatten_optimizer(optimizer_state)
            _save_safetensors(tensors, temporary / f"optimizer_{key}.safetensors", metadata)
        del weights, optimizer_state
    context.barrier()
    if context.is_main:
        state = dict(trainer_state, step=step, world_size=context.world_size,
                     optimizers_not_started=[key for key, optimizer in optimizers.items() if not optimizer.state])
        (temporary / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
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
    import tempfile

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


def read_checkpoint(folder) -> dict:
    """Every tensor of a checkpoint, unsharded, on CPU: "<model>/<param>", "optimizer_<model>/<param>/<state>",
    "rng-rank<r>/<generator>"; for exports, inspection and tests. Single process, no process group."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors, _ = _load_safetensors(path)
        out.update({f"{path.stem}/{k}": v for k, v in tensors.items()})
    return out


def load_checkpoint(folder, models: dict, optimizers: dict, generator: torch.Generator, context) -> dict:
    """Restore models, optimizers and RNG states in place; returns the trainer state dict."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(folder)
    state = json.loads((folder / TRAINER_STATE_FILE).read_text())
    if state.get("world_size", 1) != context.world_size:
        raise CheckpointError(f"{folder} was written by {state.get('world_size')} processes but this run has "
                              f"{context.world_size}; the data order and RNG streams are per process, so resume "
                              "with the same number of processes (or export and start a new run).")
    options = _state_dict_options(context.enabled, for_loading=True)
    for key, model in models.items():
        weights, _ = _load_safetensors(folder / MODEL_FILES[key]) if context.is_main or not context.enabled else ({}, {})
        set_model_state_dict(model, weights, options=options)
        if key in state.get("optimizers_not_started", []):
            continue  # saved before its first step: the fresh optimizer is that state
        if context.is_main or not context.enabled:
            tensors, metadata = _load_safetensors(folder / f"optimizer_{key}.safetensors")
            optimizer_state = _unflatten_optimizer(tensors, metadata)
        else:
            optimizer_state = {}
        set_optimizer_state_dict(model, optimizers[key], optimizer_state, options=options)
    rng, _ = _load_safetensors(folder / f"rng-rank{context.rank:05d}.safetensors")
    restore_rng_state(generator, rng)
    return state
