"""Process-group setup and FSDP2, applied to single-device models from the outside (torchtitan style).

The models stay plain `WanDiT`s; `parallelize_dit` shards each block and then the root with
`torch.distributed.fsdp.fully_shard` when the run is launched under torchrun with more than one
process. A single process needs none of this and runs the same trainer code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (so all ranks stop at the same step)."""
        if not self.enabled:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)


def init_distributed(device_choice: str = "auto") -> DistributedContext:
    """Read torchrun's environment; start NCCL (CUDA) or gloo (CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if device_choice == "cuda" and not torch.cuda.is_available():
        from ..fastwan_core.errors import InputError

        raise InputError("[train] device = \"cuda\" but no CUDA GPU is visible; use \"auto\" or \"cpu\".")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def parallelize_dit(model: torch.nn.Module, context: DistributedContext) -> torch.nn.Module:
    """Shard a WanDiT with FSDP2: one unit per transformer block, then the root (embeddings, head).

    Parameters stay fp32 (the trainer's bf16 comes from autocast over fp32 master weights);
    gradients are reduce-scattered in fp32. A no-op for a single process.
    """
    if not context.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(context.device.type, (context.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
