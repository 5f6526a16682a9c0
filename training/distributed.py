"""Process-group setup and FSDP2, applied to single-device models from the outside (torchtitan style).

The models stay plain `WanDiT`s; `parallelize_dit` shards each block and then the root with
`torch.distributed.fsdp.fully_shard` when the run is launched under torchrun with more than one
process, over the mesh of `build_mesh`: all processes (full sharding), or HSDP (a 2D mesh: each
shard group, by default one node's GPUs, holds one copy of the weights; gradients are
reduce-scattered within a group and all-reduced across groups, so the only traffic between nodes is
one all-reduce of a shard). A single process needs none of this and runs the same trainer code.
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
    local_world_size: int = 1  # processes on this node

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
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                              local_world_size=local_world_size)


def build_mesh(parallel, context: DistributedContext, where: str = "config"):
    """The device mesh the models are sharded over ([parallel] sharding), or None for one process.

    "full": 1D over all processes. "hybrid": 2D (replicate, shard) with `shard_group_size` processes
    per shard group (0: one node's). Raises a ConfigError when the processes cannot be grouped so.
    """
    if not context.enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if parallel.sharding == "full":
        return init_device_mesh(context.device.type, (context.world_size,), mesh_dim_names=("shard",))
    group = parallel.shard_group_size or context.local_world_size
    if context.world_size % group:
        from .config import ConfigError

        raise ConfigError(f"{where}: [parallel] sharding = \"hybrid\" needs the {context.world_size} processes "
                          f"in shard groups of equal size, but shard_group_size is {group}"
                          f"{' (one node: LOCAL_WORLD_SIZE)' if not parallel.shard_group_size else ''}; set "
                          "[parallel] shard_group_size to a divisor of the process count.")
    return init_device_mesh(context.device.type, (context.world_size // group, group),
                            mesh_dim_names=("replicate", "shard"))


def parallelize_dit(model: torch.nn.Module, mesh, offload: bool = False) -> torch.nn.Module:
    """Shard a WanDiT with FSDP2 over `mesh` (None: one process, nothing to do): one unit per
    transformer block, then the root (embeddings, head). A 2D mesh gives HSDP.

    Parameters stay fp32 (the trainer's bf16 comes from autocast over fp32 master weights);
    gradients are reduce-scattered in fp32. `offload`: the shards live in CPU memory and each unit
    is copied to the GPU for its forward (for the frozen teacher: no gradients, no optimizer).
    """
    if mesh is None:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    return model


def stream_blocks_from_cpu(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """One process: keep a frozen model's blocks in CPU memory and copy each to `device` only for its
    own forward (the embeddings and head, a few percent of the weights, stay on `device`)."""
    blocks = model.blocks
    model.blocks = torch.nn.ModuleList()
    model.to(device)
    model.blocks = blocks.to("cpu")
    for block in blocks:
        host = {param: param.data.pin_memory() if device.type == "cuda" else param.data
                for param in block.parameters()}

        def to_device(module, args, host=host):
            for param, data in host.items():
                param.data = data.to(device, non_blocking=True)

        def to_host(module, args, output, host=host):
            for param, data in host.items():
                param.data = data

        block.register_forward_pre_hook(to_device)
        block.register_forward_hook(to_host)
    return model


def sequence_parallel_groups(context: DistributedContext, size: int, num_heads: int, tokens: int,
                             where: str = "config"):
    """(the process group sharing this process's samples or None, data-parallel rank, data-parallel size)
    for `size` processes per sample: consecutive ranks, so a group stays within a node."""
    if size == 1:
        return None, context.rank, context.world_size
    from .config import ConfigError

    problems = []
    if context.world_size % size or not context.enabled:
        problems.append(f"divide the number of processes ({context.world_size})")
    if num_heads % size:
        problems.append(f"divide the model's {num_heads} attention heads")
    if tokens % size:
        problems.append(f"divide the {tokens} video tokens of a sample")
    if problems:
        raise ConfigError(f"{where}: [parallel] sequence_parallel = {size} must " + " and ".join(problems) + ".")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(context.device.type, (context.world_size // size, size),
                            mesh_dim_names=("data", "sequence"))
    return mesh.get_group("sequence"), context.rank // size, context.world_size // size


def divide_gradients_by(model: torch.nn.Module, factor: int) -> None:
    """FSDP2 averages gradients over all processes; with sequence parallelism a group's processes hold
    parts of one sample's gradient, so the sum is divided by the number of data-parallel groups only."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(float(factor))
            module.set_force_sum_reduction_for_comms(True)  # plain sums + scaling: every backend has them


class _AllToAll(torch.autograd.Function):
    """x [group size, ...]: slice j goes to rank j of `group`; slice i of the result came from rank i.
    Its own adjoint, so the backward is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _GatherTokens(torch.autograd.Function):
    """[B, L/n, C] per rank -> [B, L, C] on every rank. Every rank computes the same loss from the
    result, so the gradient of a rank's slice is its part of the incoming gradient (no sum)."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.rank, ctx.length = rank, x.shape[1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.length:(ctx.rank + 1) * ctx.length], None, None, None


def enable_sequence_parallel(model: torch.nn.Module, group) -> torch.nn.Module:
    """Ulysses sequence parallelism over the video tokens within `group` (n processes, same sample).

    Each process runs every block on its 1/n of the tokens (in the order the blocks see them, VSA
    tile order included) with its rows of the RoPE table; self-attention exchanges (all-to-all) the
    token split for a head split, so the attention kernel, dense or VSA, sees the whole sequence for
    heads/n of the heads, and exchanges back. The head's output is gathered, so the model returns
    the whole prediction on every process. Parameter gradients are each process's share: they sum
    to the full gradient over the group (the trainer's FSDP divides by the data-parallel size only).
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    heads = model.config.num_heads
    if heads % size:
        from .config import ConfigError

        raise ConfigError(f"[parallel] sequence_parallel = {size} must divide the model's {heads} attention heads.")

    def split_tokens(block, args):
        tokens, time_mod, context, rope, resolved = args
        length = rope.shape[0]
        if length % size:
            raise ValueError(f"sequence parallelism over {size} processes: {length} video tokens per sample "
                             f"do not split evenly; use a latent size whose token count is a multiple of {size}.")
        local = length // size
        if tokens.shape[1] == length:  # the first block: take this process's slice
            tokens = tokens[:, rank * local:(rank + 1) * local]
        return tokens, time_mod, context, rope[rank * local:(rank + 1) * local], resolved

    def to_heads(x):  # [B, L/n, h, D] -> [B, L, h/n, D]
        b, local, h, d = x.shape
        x = x.reshape(b, local, size, h // size, d).permute(2, 0, 1, 3, 4)
        x = _AllToAll.apply(x, group)  # [n (token slice), B, L/n, h/n, D]
        return x.permute(1, 0, 2, 3, 4).reshape(b, size * local, h // size, d)

    def to_tokens(x):  # [B, L, h/n, D] -> [B, L/n, h, D]
        b, length, h, d = x.shape
        x = x.reshape(b, size, length // size, h, d).permute(1, 0, 2, 3, 4)
        x = _AllToAll.apply(x, group)  # [n (head group), B, L/n, h/n, D]
        return x.permute(1, 2, 0, 3, 4).reshape(b, length // size, size * h, d)

    def ulysses(attend):
        def attend_whole_sequence(q, k, v, gate, attention):
            gate = None if gate is None else to_heads(gate)
            return to_tokens(attend(to_heads(q), to_heads(k), to_heads(v), gate, attention))
        return attend_whole_sequence

    for block in model.blocks:
        block.register_forward_pre_hook(split_tokens)
        block.self_attn.attend = ulysses(block.self_attn.attend)
    model.head.register_forward_hook(lambda head, args, out: _GatherTokens.apply(out, group, rank, size))
    return model


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


GIB = 2**30


def memory_plan(model_config, config, world_size: int, gpus_per_node: int, latent_shape) -> dict:
    """Per-GPU memory of a run, from the model's shapes alone (built on the meta device, no weights).

    Exact for the sharded states: the teacher's weights (bf16 with mixed precision, else fp32; zero
    on the GPU when offloaded), the student's and fake score's fp32 weights, gradients and two AdamW
    moments, each divided by the shard group size (all processes, or one group with HSDP), plus the
    all-gathered unit in use and the one prefetched. The activations are an estimate: the residual
    stream saved at every block boundary (activation checkpointing) or every block's working set,
    both counted as [tokens, width] rows in the compute dtype.
    """
    from ..fastwan_core.model import WanDiT

    with torch.device("meta"):
        model = WanDiT(model_config)
    total = sum(p.numel() for p in model.parameters())
    gates = sum(p.numel() for b in model.blocks for p in b.to_gate_compress.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    p, t = config.parallel, config.train
    if world_size == 1:
        shard = 1
    elif p.sharding == "full":
        shard = world_size
    else:
        shard = p.shard_group_size or gpus_per_node
    if world_size % shard:
        from .config import ConfigError

        raise ConfigError(f"{config.source}: [parallel] shard groups of {shard} do not divide {world_size} GPUs.")
    teacher_bytes = 2 if t.mixed_precision == "bf16" else 4
    student_trainable = total - (gates if config.attention.backend == "dense" else 0)
    fake_trainable = total - gates

    def trained(trainable: int) -> int:  # fp32 weights, fp32 gradients, AdamW exp_avg + exp_avg_sq
        return (4 * total + 12 * trainable) // shard

    channels, frames, height, width = latent_shape
    pt, ph, pw = model_config.patch_size
    tokens = config.data.batch_size * (frames // pt) * (height // ph) * (width // pw) // p.sequence_parallel
    activation_bytes = teacher_bytes  # the residual stream runs in bf16 under autocast
    working_set = tokens * (4 * model_config.dim + model_config.ffn_dim) * activation_bytes
    if t.activation_checkpointing:
        activations = tokens * model_config.dim * activation_bytes * model_config.num_layers + working_set
    else:
        activations = working_set * model_config.num_layers
    per_gpu = {
        "teacher_weights": 0 if p.offload_teacher else total * teacher_bytes // shard,
        "student_weights_grads_adamw": trained(student_trainable),
        "fake_score_weights_grads_adamw": trained(fake_trainable),
        "gathered_units": 0 if shard == 1 else 2 * block * 4,
        "activations_estimate": activations,
    }
    teacher_on_cpu = total * teacher_bytes // shard if p.offload_teacher else 0
    return {
        "parameters_per_model": total,
        "parameters_per_block": block,
        "gpus": world_size,
        "shard_group": shard,
        "tokens_per_gpu": tokens,
        "per_gpu_gib": {k: round(v / GIB, 2) for k, v in per_gpu.items()},
        "total_per_gpu_gib": round(sum(per_gpu.values()) / GIB, 2),
        "teacher_in_cpu_memory_per_process_gib": round(teacher_on_cpu / GIB, 2),
    }
