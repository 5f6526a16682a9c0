"""How the VSA Triton kernels are launched: one frozen table, keyed by what decides each choice.

The kernels compute the same values under every entry; the entries only move time, and are the
fastest of those timed for the whole op (forward and backward) on an H200 at 480p (32,760 tokens,
head dim 128, sparsity 0.8). ``Device`` holds what a device decides (bulk tensor copies, shared
memory, the interpreter); ``ops.py`` looks every launch up here and passes the result explicitly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType

import torch


@dataclass(frozen=True)
class Launch:
    """Triton launch options of one kernel program; None leaves an option to Triton's default
    (``maxnreg``: a register cap per thread)."""

    num_warps: int
    num_stages: int | None = None
    maxnreg: int | None = None

    def options(self) -> dict:
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)
        return {name: value for name, value in options.items() if value is not None}


_DEFAULT = Launch(num_warps=4, num_stages=2)

# (kernel, head dim, tile rows) -> (launch with >= 160 KB of shared memory per block (A100, H100,
# H200), launch below that (consumer GPUs, ~100 KB)). Head dims not listed take ``_DEFAULT``.
# - fwd: three stages prefetch K/V tiles ahead of the MMAs; at D=128 three stages of 64x128 K and V
#   tiles need ~112 KB, so small shared memory keeps two. Its 32- and 16-row programs (partial query
#   tiles) run with fewer warps: one warp per 16 rows of queries.
# - bwd_dq: two stages for whole tiles; its partial-tile programs at D=128 gain from a third.
# - bwd_dkdv: always pipelined with 4 warps (one warpgroup for the 128-row MMAs of its query-major
#   programs, see ``dkdv_query_major``): unpipelined, Triton 3.6 for sm_90 computed wrong dk/dv there.
#   Its 16-row programs take 199 registers and 76 KB of shared memory; capped at 168 registers (no
#   spills) three of them share an SM of 228 KB instead of two.
ATTENTION_LAUNCHES = MappingProxyType({
    ("fwd", 64, 64): (Launch(4, 3), Launch(4, 3)),
    ("fwd", 64, 32): (Launch(4, 3), Launch(4, 3)),
    ("fwd", 64, 16): (Launch(4, 3), Launch(4, 3)),
    ("fwd", 128, 64): (Launch(4, 3), Launch(4, 2)),
    ("fwd", 128, 32): (Launch(2, 2), Launch(2, 2)),
    ("fwd", 128, 16): (Launch(1, 2), Launch(1, 2)),
    ("bwd_dq", 64, 64): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dq", 64, 32): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dq", 64, 16): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dq", 128, 64): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dq", 128, 32): (Launch(4, 3), Launch(4, 2)),
    ("bwd_dq", 128, 16): (Launch(2, 3), Launch(2, 2)),
    ("bwd_dkdv", 64, 64): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dkdv", 64, 32): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dkdv", 64, 16): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dkdv", 128, 64): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dkdv", 128, 32): (Launch(4, 2), Launch(4, 2)),
    ("bwd_dkdv", 128, 16): (Launch(4, 2, maxnreg=168), Launch(4, 2)),
})

# The tile means: one program per (tile, batch*head, q/k/v) reading up to 64 rows, no loop.
TILE_MEANS_LAUNCH = Launch(num_warps=4)

# The top-k selection: one score row per program (more rows need so many registers that one program
# fills an SM), one warp per 1024 lanes of a row (its reductions and scans stay within the warp),
# at most 8.
SELECT_ROWS_PER_PROGRAM = 1


def select_launch(num_tiles: int) -> Launch:
    return Launch(num_warps=min(8, max(1, _next_power_of_2(num_tiles) // 1024)))


def select_lanes(num_tiles: int) -> dict:
    """A row's lanes as two power-of-two blocks, the largest up to n (at least 16), then the smallest
    that holds the rest (16 when nothing is left): 624 tiles as 512 + 128 lanes, not 1024, since each
    step of the radix search costs per lane."""
    head = max(16, 1 << (int(num_tiles).bit_length() - 1))
    return dict(BLOCK_T=head, BLOCK_TAIL=max(16, _next_power_of_2(max(1, num_tiles - head))))


def dkdv_query_major(rows: int) -> bool:
    """dk/dv's 16- and 32-row key tiles run with queries as the MMAs' rows (``triton_vsa._dkdv_entry``):
    their MMAs are then 128 rows tall (wgmma) instead of 16 or 32."""
    return rows in (16, 32)


# Launches that do not depend on each other run on a second CUDA stream at high priority (the
# forward's partial query tiles beside its whole ones; the backward's coarse gradients, partial dq
# tiles and dk/dv lists beside dq's whole tiles), so one launch's last wave leaves no SM idle.
SIDE_STREAM_PRIORITY = -1


@dataclass(frozen=True)
class Device:
    """What a device decides about the launches.

    interpreted: Triton's CPU interpreter (TRITON_INTERPRET=1): no launch options, one stream.
    tensor_descriptors: load whole tiles with bulk tensor copies (TMA; Hopper or newer, and a Triton
        with device-side descriptors; the interpreter emulates them).
    large_shared_memory: >= 160 KB of shared memory per block.
    """

    interpreted: bool
    tensor_descriptors: bool
    large_shared_memory: bool

    def attention_launch(self, kernel: str, head_dim: int, rows: int) -> dict:
        if self.interpreted:
            return {}
        large, small = ATTENTION_LAUNCHES.get((kernel, head_dim, rows), (_DEFAULT, _DEFAULT))
        return (large if self.large_shared_memory else small).options()

    def launch(self, launch: Launch) -> dict:
        return {} if self.interpreted else launch.options()

    @property
    def overlaps_launches(self) -> bool:
        return not self.interpreted


@functools.lru_cache(maxsize=None)
def device_of(device: torch.device, interpreted: bool) -> Device:
    if interpreted:
        return Device(interpreted=True, tensor_descriptors=True, large_shared_memory=True)
    import triton.language as tl

    props = torch.cuda.get_device_properties(device)
    return Device(
        interpreted=False,
        tensor_descriptors=props.major >= 9 and hasattr(tl, "make_tensor_descriptor"),
        large_shared_memory=getattr(props, "shared_memory_per_block_optin", 0) >= 160 * 1024,
    )


def _next_power_of_2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()
