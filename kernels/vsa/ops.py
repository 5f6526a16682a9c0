"""Video Sparse Attention: public API, torch.library custom ops and their autograd.

Two implementations share one semantics (``reference.py`` is the specification):
  * ``triton``: Triton kernels for the tile means, the exact top-k selection (index lists written
    directly) and the block-sparse fine branch, forward and backward, with the gated coarse term
    fused into their prologues/epilogues (except dq's whole query tiles, which get it in a pass of
    their own so that they need not wait for it; see ``_triton_backward``); the tiny tile-level
    score matmul and softmax (~624 x 624 per head) stay in PyTorch.
  * ``reference``: pure PyTorch, used on CPU, MPS, and wherever Triton is missing.
    (On Windows, Triton comes from the ``triton-windows`` package.)

Each implementation is a ``torch.library`` custom op with a fake (meta) implementation and
autograd registered through ``register_autograd``; backward passes are custom ops too, so
``torch.compile`` and FSDP see one opaque op each way.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from ...fastwan_core.errors import InputError
from .layout import TileLayout, block_rows, from_tile_order, to_tile_order
from .reference import video_sparse_attention_reference

Tensor = torch.Tensor
_TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
_IMPLEMENTATIONS = ("auto", "triton", "reference")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_module():
    from . import triton_vsa

    return triton_vsa


def _out_like_projection(q: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """[B, h, L, D] view of fresh [B, L, h, D] memory, so the result views back as [B, L, h*D] for free."""
    B, heads, L, D = q.shape
    return torch.empty(B, L, heads, D, dtype=dtype or q.dtype, device=q.device).transpose(1, 2)


def _unit_stride_last(x: Tensor) -> Tensor:
    # The kernels take any B/h/L strides but read D contiguously; only exotic views pay for a copy.
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


# --------------------------------------------------------------------------------------------
# Triton implementation (host side)
# --------------------------------------------------------------------------------------------

# Block shapes, warps and pipeline depth, chosen from the H200 sweeps recorded in
# bench/NOTES_vsa.md (bench/vsa_attention.py --sweep rewrites these while it measures).
# USE_TMA: per kernel, load whole 64-row tiles with Hopper bulk tensor copies (device-side tensor
# descriptors) instead of masked pointer loads.
# Used only on Hopper or newer (the bulk tensor copy engine) with a Triton that has descriptors.
USE_TMA = {"fwd": True, "bwd_dq": True, "bwd_dkdv": True}
LAUNCH_CONFIG = {
    ("fwd", 64): dict(num_warps=4, num_stages=3),
    ("fwd", 128): dict(num_warps=4, num_stages=3),
    ("bwd_dq", 64): dict(num_warps=4, num_stages=2),
    ("bwd_dq", 128): dict(num_warps=4, num_stages=2),
    ("bwd_dkdv", 64): dict(num_warps=4, num_stages=2),
    ("bwd_dkdv", 128): dict(num_warps=4, num_stages=2),
}
# The 32- and 16-row programs of partial tiles at D=128, where another configuration than the 64-row
# one measured faster on the H200 at 480p, 0.8, per launch (ms; ``bench/vsa_roofline.py --launch-variants``,
# bench/results/vsa_roofline_v9_configs_h200_2026-11-29.json, single runs that move by up to ±4%):
# forward 0.47 (32 rows) and 0.48 (16 rows) against 0.56 and 0.59 at 4 warps / 2 stages; dq 0.47 and
# 0.52 against 0.51 and 0.65. One stage (no prefetch) was slower everywhere. dk/dv's query-major
# small-tile programs (bench/results/vsa_roofline_v10_dkdv_h200_2026-11-29.json) keep the 64-row
# configuration, 4 warps (one warpgroup for their 128-row MMAs) and 2 stages: at 1 stage, Triton 3.6
# for sm_90 computed wrong dk/dv (relative difference ~2e2), so never launch them unpipelined.
# dk/dv's 16-row key programs (query-major) take 199 registers and 76 KB of shared memory: 2 CTAs per
# SM. Capped at 168 registers (no spills, offline sm_90 compile) 3 fit in an H200 SM's 228 KB, and
# fwd+bwd measured 15.19 against 15.36-15.38 ms in the same run (v13; a cap of 128 spills: 15.49).
SMALL_TILE_LAUNCH_CONFIG = {
    ("fwd", 128, 32): dict(num_warps=2, num_stages=2),
    ("fwd", 128, 16): dict(num_warps=1, num_stages=2),
    ("bwd_dq", 128, 32): dict(num_warps=4, num_stages=3),
    ("bwd_dq", 128, 16): dict(num_warps=2, num_stages=3),
    ("bwd_dkdv", 128, 16): dict(num_warps=4, num_stages=2, maxnreg=168),
}


# Key tiles of up to 16 tokens that the forward takes per step (2 or 4), sharing one softmax update
# and one rescale of the accumulator. On the bench's inputs these tiles are selected ~2x as often as
# whole ones (bench/NOTES_vsa.md, v18): a quarter of each query tile's list. H200, 480p, 0.8, the fine
# forward's three launches (bench/vsa_roofline.py, two runs): 3.53 / 3.55 ms with 4 against 3.68 /
# 3.63 with 2. In the whole op, where the partial query tiles' launches run beside the whole ones, most
# of that gain goes: fwd 3.78 / 3.79 against 3.81 / 3.81 ms, fwd+bwd unchanged (two runs' settings
# comparisons, bench/NOTES_vsa.md v19). dq (one _dq_block per tile, no shared update) measured 4.19 /
# 4.21 against 4.22 / 4.21 ms with 4 and keeps 2; dk/dv's 16-row query tiles four per step were slower
# (4.46 against 4.30 ms: spills).
SMALL_KEY_TILES_PER_STEP = 4

# dk/dv's key-tile sizes whose programs run query-major (triton_vsa._dkdv_entry): their MMAs are
# then 128 rows tall (wgmma) instead of 16 or 32.
DKDV_QUERY_MAJOR_ROWS = (16, 32)

# The selection kernel: score rows per program, and warps per 1024 lanes of a row (at least one).
# One row per program measured 0.165 ms at 480p on the H200 against 0.255 ms for four (which need 185
# registers a thread: one program per SM); one warp for 480p's 624 tiles (its reductions and scans
# stay within the warp), with 32-bit keys, measured 0.116-0.15 ms against 0.159-0.167 at 8 warps
# with int64 keys (bench/vsa_attention.py, coarse_select_ms, v10-v13 runs).
# split_lanes: a row's lanes in two power-of-two blocks, 624 tiles as 512 + 128 lanes rather than
# 1024: 0.069 against 0.131 ms at 480p (v16 run, settings comparison).
SELECT_LAUNCH = dict(rows=1, num_warps=1, split_lanes=True)

# The tile means: one program per (tile, batch*head, q/k/v), reading up to 64 rows. 2 / 4 / 8 / 16
# warps measured 0.104 / 0.107 / 0.115 / 0.132 ms at 480p (v16 run): no reason to move from 4. With
# (batch, head) on grid axis 0 instead, so that programs launched together read whole token rows of
# the [B, L, h, D] buffers: 0.110 against 0.107 ms (v17 run), not kept.
TILE_MEANS_LAUNCH = dict(num_warps=4)

# Launches that do not depend on each other run on two CUDA streams: the forward's partial query
# tiles beside its whole ones, the backward's dq beside dk/dv (and beside building dk/dv's lists), so
# that one launch's last wave does not idle SMs the other could use. H200, 480p, 0.8, two runs
# (bench/vsa_attention.py --compare-settings, v11/v12): fwd 3.95/3.93 ms on one stream, 3.91/3.86
# beside, 3.82/3.80 with the side stream at high priority; fwd+bwd 15.70/15.79, 15.43/15.48,
# 15.58/15.45 (later runs agree: one stream 15.67-15.93, high priority 15.29-15.59). "off" runs
# everything on the caller's stream.
OVERLAP_LAUNCHES = "side_high_priority"  # "side_high_priority" | "side" | "off"
# The backward's order of launches. dk/dv's partial key tiles always run on the second stream beside
# its whole key tiles' launch (v15: 14.61 against 14.74 ms, and 14.63 against 14.79, with them after
# it on the caller's stream). "dq_first" (v11-v16): the coarse gradients, then dq's three launches on
# the second stream, beside dk/dv's lists, then dk/dv. "partials_first" (v17): dq's whole query tiles
# start right after the preprocessing pass, while the second stream runs the coarse gradients, dq's
# partial query tiles and dk/dv's lists beside them; fwd+bwd 14.44 / 14.41 against 14.60 / 14.62 ms
# (two runs, 480p 0.8; bench/NOTES_vsa.md).
BACKWARD_SCHEDULE = "partials_first"  # "partials_first" | "dq_first"


def _use_tma(kernel: str, *tensors: Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides (true for [B, L, h, D] projections)."""
    if not USE_TMA.get(kernel, False):
        return False
    if not _triton_module().interpreting() and not _hopper_or_newer(tensors[0].device):
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:3]):
            return False
    if not _triton_module().interpreting():
        import triton

        # Device-side descriptors live in a small global scratch buffer that Triton asks us for.
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    return True


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device: torch.device) -> bool:
    import triton.language as tl

    return torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(tl, "make_tensor_descriptor")


@functools.lru_cache(maxsize=None)
def _large_shared_memory(device: torch.device) -> bool:
    # Three pipeline stages of 64x128 K and V tiles need ~112 KB of shared memory: fine on
    # A100/H100/H200 (160+ KB per block), too much for consumer GPUs (~100 KB, e.g. RTX 4090).
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) >= 160 * 1024


def _launch_config(kernel: str, D: int, device: torch.device, rows: int = 64) -> dict:
    if _triton_module().interpreting():
        return {}
    config = dict(SMALL_TILE_LAUNCH_CONFIG.get((kernel, D, rows))
                  or LAUNCH_CONFIG.get((kernel, D), dict(num_warps=4, num_stages=2)))
    if not _large_shared_memory(device):
        if config["num_stages"] > 2 and D * config["num_stages"] > 256:
            config["num_stages"] = 2
        # Register caps buy a third CTA per SM only where the shared memory holds three.
        config.pop("maxnreg", None)
    return config


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device, high_priority: bool) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device, priority=-1 if high_priority else 0)


class _TwoStreams:
    """Fork/join of launches that do not depend on each other::

        with _TwoStreams(x.device) as streams:
            with streams.beside():
                ...  # launched on a second stream, after everything already on the caller's stream
            ...      # launched on the caller's stream, concurrently
        # here the caller's stream has waited for the second one

    Every tensor either side touched is then safe to free or read on the caller's stream (the
    caching allocator orders frees on the stream that allocated them). Tensors allocated inside
    ``beside()`` come from the second stream's pool; that stream is private to this module and every
    use of it starts by waiting for the caller's stream, so a reuse of their memory is ordered after
    any use the caller enqueued before freeing them (no ``record_stream`` needed). A plain sequence
    on CPU, in the Triton interpreter and with ``OVERLAP_LAUNCHES = "off"``.
    """

    def __init__(self, device: torch.device):
        self.active = (device.type == "cuda" and OVERLAP_LAUNCHES != "off"
                       and not _triton_module().interpreting())
        self.device = device

    def __enter__(self):
        if self.active:
            self.caller = torch.cuda.current_stream(self.device)
            self.side = _side_stream(self.device, OVERLAP_LAUNCHES == "side_high_priority")
            self.side.wait_stream(self.caller)
        return self

    def beside(self):
        return torch.cuda.stream(self.side) if self.active else contextlib.nullcontext()

    def fork(self) -> None:
        """From here on, work beside also waits for what the caller's stream has enqueued so far."""
        if self.active:
            self.side.wait_stream(self.caller)

    def join(self) -> None:
        """From here on, the caller's stream also waits for what has been enqueued beside so far."""
        if self.active:
            self.caller.wait_stream(self.side)

    def __exit__(self, *exc):
        self.join()
        return False


def _coarse_forward(q, k, v, tile_offsets, topk):
    """Tile means and top-k selection (Triton), tile-level scores, softmax and coarse output (PyTorch,
    fp32, tiny).

    Returns means fp32 [3, B, h, n, D], probs fp32 [B, h, n, n], ``_select_key_tiles``' three lists,
    and the coarse branch's tile outputs fp32 [B, h, n, D].
    """
    D = q.shape[-1]
    means = _tile_means(q, k, v, tile_offsets)
    # fp32 even under bf16 autocast: the selection kernel ranks exact fp32 score keys.
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = torch.matmul(means[0], means[1].transpose(-1, -2)).mul_(1.0 / math.sqrt(D))
        # The softmax and the coarse output do not wait for the selection (one warp per score row,
        # latency-bound): they run beside it. (The means of v beside it too measured the same: 3.79
        # against 3.80 ms fwd, bench/NOTES_vsa.md v19.)
        with _TwoStreams(q.device) as streams:
            with streams.beside():
                probs = torch.softmax(scores, dim=-1)
                coarse = torch.matmul(probs, means[2])
            key_tiles, key_entries, key_counts = _select_key_tiles(scores, tile_offsets, topk)
    return means, probs, key_tiles, key_entries, key_counts, coarse


def _tile_means(q: Tensor, k: Tensor, v: Tensor, tile_offsets: Tensor) -> Tensor:
    """Per-tile means of q, k and v [B, h, L, D] (one launch) -> fp32 [3, B, h, n, D]."""
    B, heads, L, D = q.shape
    n = tile_offsets.numel() - 1
    means = torch.empty(3, B, heads, n, D, dtype=torch.float32, device=q.device)
    _triton_module().kernels()["tile_means"][(n, B * heads, 3)](
        q, k, v, means, tile_offsets, *_strides(q), *_strides(k), *_strides(v), heads, n, B * heads * n,
        BLOCK=64, D=D, **({} if _triton_module().interpreting() else TILE_MEANS_LAUNCH),
    )
    return means


def _select_key_tiles(scores: Tensor, tile_offsets: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-k key tiles of each row of fp32 scores [..., n] (ties to the lower index), one kernel.

    Returns key_tiles int32 [..., topk] (ascending tile indices: what the backward transposes), and
    the lists the forward and dq kernels walk: key_entries int32 [..., topk], the same tiles packed
    (``_pack_tile_entries``) and ordered by the row block that holds them (``layout.block_rows``: 64,
    then 32, then 16; ascending within a block size), and key_counts int32 [..., 2], per row the
    number of 64- and 32-row ones.
    """
    tv = _triton_module()
    n = scores.shape[-1]
    num_rows = scores.numel() // n
    key_tiles = scores.new_empty(*scores.shape[:-1], topk, dtype=torch.int32)
    key_entries = torch.empty_like(key_tiles)
    key_counts = scores.new_empty(*scores.shape[:-1], 2, dtype=torch.int32)
    rows_per_program = SELECT_LAUNCH["rows"]
    tv.kernels()["select"][(triton_cdiv(num_rows, rows_per_program),)](
        scores.contiguous(), key_tiles, key_entries, key_counts, tile_offsets, num_rows, n, topk,
        ENTRY_SIZE_BITS=_ENTRY_SIZE_BITS, ROWS=rows_per_program, **_select_lanes(n),
        **({} if tv.interpreting() else dict(num_warps=_select_warps(n))),
    )
    return key_tiles, key_entries, key_counts


def _select_lanes(n: int) -> dict:
    """The selection kernel's two lane blocks for a row of n tiles: the largest power of two up to n
    (at least 16), then the smallest that holds the rest (16 when nothing is left). Without
    ``SELECT_LAUNCH["split_lanes"]``: one block of the next power of two (and an empty tail)."""
    head = max(16, 1 << (int(n).bit_length() - 1) if SELECT_LAUNCH["split_lanes"] else _next_power_of_2(n))
    return dict(BLOCK_T=head, BLOCK_TAIL=max(16, _next_power_of_2(max(1, n - head))))


def _select_warps(n: int) -> int:
    return min(8, SELECT_LAUNCH["num_warps"] * max(1, _next_power_of_2(n) // 1024))


def _next_power_of_2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _groups(block_groups) -> list[tuple[int, int, int]]:
    """Flat [rows0, count0, rows1, count1, ...] -> [(rows, first, count)] over ``tiles_by_block``."""
    result, first = [], 0
    for rows, count in zip(block_groups[::2], block_groups[1::2]):
        result.append((rows, first, count))
        first += count
    return result


def _triton_forward(q, k, v, gate, tile_offsets, tiles_by_block, block_groups, topk):
    tv = _triton_module()
    B, heads, L, D = q.shape
    n = tile_offsets.numel() - 1
    means, probs, key_tiles, key_entries, key_counts, coarse = _coarse_forward(q, k, v, tile_offsets, topk)
    out = _out_like_projection(q)
    lse = torch.empty(B, heads, L, dtype=torch.float32, device=q.device)
    g = gate if gate is not None else q  # dummy pointer when HAS_GATE is False
    use_tma = _use_tma("fwd", k, v)
    groups = _groups(block_groups)

    def launch(rows, first, count):  # one launch per query-tile size group
        tv.kernels()["fwd"][(count, B * heads)](
            q, k, v, g, coarse, out, lse, key_entries, key_counts, tile_offsets, tiles_by_block[first:],
            *_strides(q), *_strides(k), *_strides(v), *_strides(g), *_strides(out),
            heads, n, topk, L, math.log2(math.e) / math.sqrt(D),
            HAS_GATE=gate is not None, BLOCK_M=rows, D=D, ENTRY_SIZE_BITS=_ENTRY_SIZE_BITS,
            USE_TMA=use_tma, **_list_flags("fwd", rows, groups), **_launch_config("fwd", D, q.device, rows),
        )

    with _TwoStreams(q.device) as streams:
        _partial_tiles_beside(streams, groups, launch)
    return out, lse, key_tiles, key_entries, key_counts, means, probs, coarse


def _partial_tiles_beside(streams: _TwoStreams, groups, launch) -> None:
    """One launch per size group: the partial tiles' (groups after the first, which write rows
    disjoint from the whole tiles') on the second stream, the whole tiles' on the caller's."""
    with streams.beside():
        for group in groups[1:]:
            launch(*group)
    launch(*groups[0])


def _list_flags(kernel: str, rows: int, groups) -> dict:
    """The constexprs of how one size group's launch walks its lists (also used by bench/vsa_roofline.py).

    HAS_PARTIAL_KEYS / HAS_PARTIAL_QUERIES: whether the grid has tiles of <= 32 tokens (exactly the 32-
    and 16-row groups); without them the kernels compile without their partial-tile loops and never
    read the per-row counts. SMALL_KEYS_PER_STEP (forward): ``SMALL_KEY_TILES_PER_STEP``. QUERY_MAJOR
    (dk/dv): the 16/32-row key tiles run with queries as the MMAs' rows (triton_vsa._dkdv_entry).
    """
    partial = any(group_rows < 64 for group_rows, _, _ in groups)
    if kernel == "bwd_dkdv":
        return dict(HAS_PARTIAL_QUERIES=partial, QUERY_MAJOR=rows in DKDV_QUERY_MAJOR_ROWS)
    if kernel == "fwd":
        return dict(HAS_PARTIAL_KEYS=partial, SMALL_KEYS_PER_STEP=SMALL_KEY_TILES_PER_STEP)
    return dict(HAS_PARTIAL_KEYS=partial)


def _transposed_query_lists(key_tiles: Tensor, tile_offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dk/dv's lists: for each (batch*head, key tile), the query tiles that selected it.

    key_tiles int32 [B, h, n, topk] -> (entries int32 [B*h*n*topk], packed as ``_pack_tile_entries``,
    grouped by key tile and within one key tile ordered by the row block that holds the query tile
    (``layout.block_rows``: 64, then 32, then 16; ascending tile index within a block size);
    offsets int32 [B*h*n + 1] of each key tile's entries; counts int32 [B*h*n, 2] of its 64- and
    32-row query tiles). One stable sort on (key tile, block size) places the entries; a search of
    each (key tile, block size) in the sorted keys gives offsets and counts, without a host sync.
    """
    B, heads, n, topk = key_tiles.shape
    device = key_tiles.device
    bh = torch.arange(B * heads, device=device, dtype=torch.int64).view(B * heads, 1, 1)
    key_ids = (bh * n + key_tiles.view(B * heads, n, topk).to(torch.int64)).view(-1)
    query_tiles = torch.arange(n, device=device).view(1, n, 1).expand(B * heads, n, topk).reshape(-1)
    rows = block_rows(tile_offsets[1:] - tile_offsets[:-1]).to(device)
    size_rank = (rows == 32).long() + 2 * (rows == 16).long()  # 64 -> 0, 32 -> 1, 16 -> 2
    sort_keys = key_ids * 3 + size_rank[query_tiles]
    sorted_keys, order = torch.sort(sort_keys, stable=True)
    entries = _pack_tile_entries(query_tiles[order], tile_offsets)
    # Where each (key tile, size) run starts in the sorted keys. (Not bincount: on CUDA it waits for
    # the GPU to size its output, which would stall the host in every backward.)
    starts = torch.searchsorted(sorted_keys, torch.arange(3 * B * heads * n + 1, device=device))
    per_size = (starts[1:] - starts[:-1]).view(B * heads * n, 3)
    return entries, starts[::3].to(torch.int32), per_size[:, :2].to(torch.int32).contiguous()


# The attention kernels read each list entry (the forward's and dq's key lists, dk/dv's transposed
# lists) as one int32, (first token << _ENTRY_SIZE_BITS) | token count; they get the bit count as a
# constexpr.
_ENTRY_SIZE_BITS = 7  # a tile holds 1..64 tokens
MAX_TRITON_TOKENS = 1 << (31 - _ENTRY_SIZE_BITS)
# The selection kernel counts chosen tiles in 16-bit fields (triton_vsa._select).
MAX_TRITON_TILES = 1 << 16


def _pack_tile_entries(tiles: Tensor, tile_offsets: Tensor) -> Tensor:
    """Tile indices (int32, any shape) -> int32 entries (first token << _ENTRY_SIZE_BITS) | token count."""
    index = tiles.long()
    starts = tile_offsets[:-1].long()[index]
    sizes = (tile_offsets[1:] - tile_offsets[:-1]).long()[index]
    return ((starts << _ENTRY_SIZE_BITS) | sizes).to(torch.int32)


def _coarse_backward(d_coarse, means, probs, tile_offsets):
    """Gradients of the tile means from d(coarse tile outputs), divided by each tile's count.

    Every token of a tile receives its tile's mean-gradient / size; returns three fp32 [B, h, n, D].
    """
    with torch.autocast(device_type=d_coarse.device.type, enabled=False):
        return _coarse_backward_fp32(d_coarse.float(), means, probs, tile_offsets)


def _coarse_backward_fp32(d_coarse, means, probs, tile_offsets):
    q_means, k_means, v_means = means
    scale = 1.0 / math.sqrt(q_means.shape[-1])
    d_probs = torch.matmul(d_coarse, v_means.transpose(-1, -2))
    dv_means = torch.matmul(probs.transpose(-1, -2), d_coarse)
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    dq_means = torch.matmul(d_scores, k_means) * scale
    dk_means = torch.matmul(d_scores.transpose(-1, -2), q_means) * scale
    sizes = (tile_offsets[1:] - tile_offsets[:-1]).to(torch.float32).view(1, 1, -1, 1)
    return dq_means / sizes, dk_means / sizes, dv_means / sizes


def _triton_backward(
    grad_out, q, k, v, gate, out, lse, key_tiles, key_entries, key_counts, means, probs, coarse, tile_offsets,
    tiles_by_block, block_groups,
):
    tv = _triton_module()
    B, heads, L, D = q.shape
    n = tile_offsets.numel() - 1
    topk = key_tiles.shape[-1]
    grad_out = _unit_stride_last(grad_out)
    has_gate = gate is not None
    delta = torch.empty(B, heads, L, dtype=torch.float32, device=q.device)
    if has_gate:
        d_gate = _out_like_projection(q, gate.dtype)
        d_coarse = torch.empty(B, heads, n, D, dtype=torch.float32, device=q.device)
        g = gate
    else:
        d_coarse = means[0]  # dummy, never read
        d_gate = g = q
    tv.kernels()["bwd_preprocess"][(n, B * heads)](
        out, grad_out, g, coarse, delta, d_gate, d_coarse, tile_offsets,
        *_strides(out), *_strides(grad_out), *_strides(g), *_strides(d_gate),
        heads, n, L, HAS_GATE=has_gate, BLOCK=64, D=D,
    )
    qk_scale = math.log2(math.e) / math.sqrt(D)
    sm_scale = 1.0 / math.sqrt(D)
    dq = _out_like_projection(q)
    dk = _out_like_projection(k)
    dv = _out_like_projection(v)
    groups = _groups(block_groups)

    def coarse_backward():  # -> the coarse gradients of q, k, v per tile (dummies, never read, without a gate)
        return _coarse_backward(d_coarse, means, probs, tile_offsets) if has_gate else (means[0],) * 3

    def launch_dq(rows, first, count, target, dq_coarse):  # one launch per query-tile size group
        # dq_coarse None: the launch writes dq without the coarse term.
        with_coarse = has_gate and dq_coarse is not None
        tv.kernels()["bwd_dq"][(count, B * heads)](
            q, k, v, grad_out, target, lse, delta, key_entries, key_counts, tile_offsets, tiles_by_block[first:],
            dq_coarse if with_coarse else means[0], *_strides(q), *_strides(k), *_strides(v),
            *_strides(grad_out), *_strides(target), heads, n, topk, L, qk_scale, sm_scale,
            HAS_COARSE=with_coarse, BLOCK_M=rows, D=D, ENTRY_SIZE_BITS=_ENTRY_SIZE_BITS,
            USE_TMA=_use_tma("bwd_dq", k, v), **_list_flags("bwd_dq", rows, groups),
            **_launch_config("bwd_dq", D, q.device, rows),
        )

    with _TwoStreams(q.device) as streams:
        if BACKWARD_SCHEDULE == "dq_first":
            dq_c, dk_c, dv_c = coarse_backward()
            streams.fork()  # dq's launches read the coarse gradient
            # dq reads what dk/dv reads and writes only dq: it runs beside the dk/dv lists and launches.
            with streams.beside():
                for group in groups:
                    launch_dq(*group, dq, dq_c)
            query_lists = _transposed_query_lists(key_tiles, tile_offsets)
        else:  # "partials_first"
            # dq's whole query tiles start at once on the caller's stream (issued first, so that a host
            # that is not ahead of the GPU does not hold them back). They cannot wait for the coarse
            # gradient, so with a gate they write their fp32 rows (before the coarse term) to a scratch
            # buffer that one pass then adds it to, beside dk/dv. Beside them: the coarse gradients, dq's
            # partial query tiles and dk/dv's lists, small or copy-bound launches that fill the SMs.
            rows, first, count = groups[0]
            fine_dq = torch.empty(B, heads, L, D, dtype=torch.float32, device=q.device) if has_gate else dq
            launch_dq(rows, first, count, fine_dq, None)
            with streams.beside():
                dq_c, dk_c, dv_c = coarse_backward()
                for group in groups[1:]:
                    launch_dq(*group, dq, dq_c)
                query_lists = _transposed_query_lists(key_tiles, tile_offsets)
            streams.join()  # dk/dv read the lists and the coarse gradients
            if has_gate:  # the pass beside dk/dv's launches, after dq's whole tiles
                streams.fork()
                with streams.beside():
                    tv.kernels()["add_tile_rows"][(count, B * heads)](
                        fine_dq, dq_c, dq, tile_offsets, tiles_by_block[first:], *_strides(fine_dq), *_strides(dq),
                        heads, n, BLOCK=rows, D=D,
                    )

        def launch_dkdv(rows, first, count):  # one launch per key-tile size group
            tv.kernels()["bwd_dkdv"][(count, B * heads)](
                q, k, v, grad_out, dk, dv, lse, delta, *query_lists, tile_offsets, tiles_by_block[first:], dk_c, dv_c,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
                heads, n, L, qk_scale, sm_scale,
                HAS_COARSE=has_gate, BLOCK_N=rows, D=D, ENTRY_SIZE_BITS=_ENTRY_SIZE_BITS,
                USE_TMA=_use_tma("bwd_dkdv", q, grad_out), **_list_flags("bwd_dkdv", rows, groups),
                **_launch_config("bwd_dkdv", D, q.device, rows),
            )

        streams.fork()  # dk/dv's partial key tiles wait for the lists and the coarse gradients
        _partial_tiles_beside(streams, groups, launch_dkdv)
    return dq, dk, dv, (d_gate if has_gate else None)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastwan::vsa_triton_fwd", mutates_args=())
def _vsa_triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, tile_offsets: Tensor, tiles_by_block: Tensor,
    block_groups: list[int], topk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out [B,h,L,D], lse2 fp32 [B,h,L], key_tiles int32 [B,h,n,topk], key_entries int32
    [B,h,n,topk] and key_counts int32 [B,h,n,2] (``_select_key_tiles``), means fp32 [3,B,h,n,D],
    coarse probs fp32 [B,h,n,n], coarse tile outputs fp32 [B,h,n,D]). The backward reads all but out."""
    return _triton_forward(q, k, v, gate, tile_offsets, tiles_by_block, block_groups, topk)


@_vsa_triton_fwd.register_fake
def _(q, k, v, gate, tile_offsets, tiles_by_block, block_groups, topk):
    B, heads, L, D = q.shape
    n = tile_offsets.shape[0] - 1
    f32 = dict(dtype=torch.float32)
    i32 = dict(dtype=torch.int32)
    return (
        _out_like_projection(q),
        q.new_empty(B, heads, L, **f32),
        q.new_empty(B, heads, n, topk, **i32),
        q.new_empty(B, heads, n, topk, **i32),
        q.new_empty(B, heads, n, 2, **i32),
        q.new_empty(3, B, heads, n, D, **f32),
        q.new_empty(B, heads, n, n, **f32),
        q.new_empty(B, heads, n, D, **f32),
    )


@torch.library.custom_op("fastwan::vsa_triton_bwd", mutates_args=())
def _vsa_triton_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, out: Tensor, lse: Tensor,
    key_tiles: Tensor, key_entries: Tensor, key_counts: Tensor, means: Tensor, probs: Tensor, coarse: Tensor,
    tile_offsets: Tensor, tiles_by_block: Tensor, block_groups: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, d_gate = _triton_backward(
        grad_out, q, k, v, gate, out, lse, key_tiles, key_entries, key_counts, means, probs, coarse, tile_offsets,
        tiles_by_block, block_groups,
    )
    return dq, dk, dv, (d_gate if d_gate is not None else q.new_empty(0))


@_vsa_triton_bwd.register_fake
def _(grad_out, q, k, v, gate, out, lse, key_tiles, key_entries, key_counts, means, probs, coarse, tile_offsets,
      tiles_by_block, block_groups):
    d_gate = _out_like_projection(q, gate.dtype) if gate is not None else q.new_empty(0)
    return _out_like_projection(q), _out_like_projection(k), _out_like_projection(v), d_gate


def _triton_setup_context(ctx, inputs, output):
    q, k, v, gate, tile_offsets, tiles_by_block, block_groups, topk = inputs
    ctx.has_gate = gate is not None
    ctx.block_groups = block_groups
    # All the forward's outputs: out, lse, the three selection lists, means, probs, coarse.
    ctx.save_for_backward(q, k, v, gate, *output, tile_offsets, tiles_by_block)


def _triton_autograd(ctx, grad_out, *_unused):
    q, k, v, gate, *forward_outputs, tile_offsets, tiles_by_block = ctx.saved_tensors
    dq, dk, dv, d_gate = _vsa_triton_bwd(
        grad_out, q, k, v, gate, *forward_outputs, tile_offsets, tiles_by_block, ctx.block_groups
    )
    return dq, dk, dv, (d_gate if ctx.has_gate else None), None, None, None, None


_vsa_triton_fwd.register_autograd(_triton_autograd, setup_context=_triton_setup_context)


@torch.library.custom_op("fastwan::vsa_reference", mutates_args=())
def _vsa_reference(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, tile_offsets: Tensor, topk: int) -> Tensor:
    with torch.no_grad():
        out = video_sparse_attention_reference(q, k, v, tile_offsets, topk, gate)
    result = _out_like_projection(q)
    result.copy_(out)
    return result


@_vsa_reference.register_fake
def _(q, k, v, gate, tile_offsets, topk):
    return _out_like_projection(q)


@torch.library.custom_op("fastwan::vsa_reference_bwd", mutates_args=())
def _vsa_reference_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, tile_offsets: Tensor, topk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # The reference backward differentiates the reference forward again. Custom-op bodies run
    # below the autograd dispatch key, so torch.func.vjp (its own transform) does the work.
    has_gate = gate is not None

    def forward(*inputs):
        return video_sparse_attention_reference(*inputs[:3], tile_offsets, topk, inputs[3] if has_gate else None)

    primals = (q, k, v, gate) if has_gate else (q, k, v)
    _, vjp = torch.func.vjp(forward, *primals)
    grads = vjp(grad_out.to(q.dtype))
    d_gate = grads[3] if has_gate else q.new_empty(0)
    return grads[0], grads[1], grads[2], d_gate


@_vsa_reference_bwd.register_fake
def _(grad_out, q, k, v, gate, tile_offsets, topk):
    d_gate = torch.empty_like(gate) if gate is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), d_gate


def _reference_setup_context(ctx, inputs, output):
    q, k, v, gate, tile_offsets, topk = inputs
    ctx.topk = topk
    ctx.has_gate = gate is not None
    ctx.save_for_backward(q, k, v, gate, tile_offsets)


def _reference_autograd(ctx, grad_out):
    q, k, v, gate, tile_offsets = ctx.saved_tensors
    dq, dk, dv, d_gate = _vsa_reference_bwd(grad_out, q, k, v, gate, tile_offsets, ctx.topk)
    return dq, dk, dv, (d_gate if ctx.has_gate else None), None, None


_vsa_reference.register_autograd(_reference_autograd, setup_context=_reference_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _flat_groups(layout: TileLayout) -> list[int]:
    return [x for group in layout.block_groups for x in group]


def _check_inputs(q, k, v, gate, layout: TileLayout, topk: int, implementation: str) -> str:
    if implementation not in _IMPLEMENTATIONS:
        raise InputError(
            f"VSA implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}; use 'auto' to pick "
            "Triton on CUDA and the PyTorch reference elsewhere."
        )
    if q.dim() != 4:
        raise InputError(f"VSA expects q, k, v of shape [B, heads, L, D]; got q of shape {tuple(q.shape)}.")
    for name, t in (("k", k), ("v", v), ("gate", gate)):
        if t is not None and t.shape != q.shape:
            raise InputError(
                f"VSA expects q, k, v and gate of one shape [B, heads, L, D]; q is {tuple(q.shape)} but {name} is "
                f"{tuple(t.shape)}."
            )
        if t is not None and (t.device != q.device or t.dtype != q.dtype):
            raise InputError(
                f"VSA: {name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}; cast/move them together."
            )
    if q.shape[2] != layout.num_tokens:
        raise InputError(
            f"VSA: q has {q.shape[2]} tokens but the grid {layout.grid} has {layout.num_tokens}; pass the grid of "
            "the patchified latent that produced these tokens."
        )
    if not (isinstance(topk, int) and 1 <= topk <= layout.num_tiles):
        raise InputError(
            f"VSA topk must be an int in [1, {layout.num_tiles}] (tiles of grid {layout.grid}), got {topk!r}; "
            "use topk_for_sparsity(num_tiles, sparsity)."
        )
    triton_ok = (
        _triton_importable()
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[-1] in _TRITON_HEAD_DIMS
        and q.shape[2] < MAX_TRITON_TOKENS
        and layout.num_tiles < MAX_TRITON_TILES
        and (q.is_cuda or (q.device.type == "cpu" and _triton_module().interpreting()))
    )
    if implementation == "auto":
        return "triton" if (triton_ok and q.is_cuda) else "reference"
    if implementation == "triton" and not triton_ok:
        raise InputError(
            f"VSA implementation='triton' needs the triton package (triton-windows on Windows), CUDA tensors, "
            f"fp16/bf16/fp32, a head dim in {_TRITON_HEAD_DIMS}, fewer than {MAX_TRITON_TOKENS} tokens and fewer than "
            f"{MAX_TRITON_TILES} tiles; got {q.dtype} on {q.device} with head dim {q.shape[-1]}, {q.shape[2]} tokens "
            f"and {layout.num_tiles} tiles. Use "
            "implementation='auto' to fall back to the PyTorch reference."
        )
    return implementation


def video_sparse_attention_tiled(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TileLayout,
    topk: int,
    gate: Tensor | None = None,
    implementation: str = "auto",
) -> Tensor:
    """VSA over inputs already in compact tile order.

    Args:
        q, k, v: [B, heads, L, D] in ``layout``'s tile order (views of a [B, L, heads, D] buffer are
            fine: strides are honoured, nothing is copied). Triton: bf16/fp16 with fp32 accumulation
            (fp32 inputs work, but their dots run as TF32 on GPUs); reference: any float dtype.
        layout: ``TileLayout.for_grid(grid, device)``.
        topk: key tiles kept per query tile (``topk_for_sparsity``).
        gate: optional [B, heads, L, D] weight of the coarse branch; None means no coarse term.
        implementation: "auto" (Triton on CUDA when importable, else reference), "triton", "reference".

    Returns:
        [B, heads, L, D] in tile order, in q's dtype, backed by [B, L, heads, D] memory so
        ``out.transpose(1, 2).reshape(B, L, heads * D)`` is free.
    """
    impl = _check_inputs(q, k, v, gate, layout, topk, implementation)
    tile_offsets = layout.tile_offsets.to(q.device)
    if impl == "triton":
        q, k, v = (_unit_stride_last(t) for t in (q, k, v))
        gate = _unit_stride_last(gate) if gate is not None else None
        return _vsa_triton_fwd(
            q, k, v, gate, tile_offsets, layout.tiles_by_block.to(q.device), _flat_groups(layout), topk
        )[0]
    return _vsa_reference(q, k, v, gate, tile_offsets, topk)


def video_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid,
    topk: int,
    gate: Tensor | None = None,
    implementation: str = "auto",
) -> Tensor:
    """VSA in (t, h, w) token order: q, k, v, gate [B, heads, L, D] with L = T*H*W over ``grid=(T, H, W)``.

    Permutes to compact tile order, runs :func:`video_sparse_attention_tiled`, permutes back.
    Returns [B, heads, L, D] in token order and q's dtype. Differentiable in q, k, v, gate.
    """
    layout = TileLayout.for_grid(grid, q.device)
    tiled = [to_tile_order(t, layout) if t is not None else None for t in (q, k, v, gate)]
    out = video_sparse_attention_tiled(*tiled[:3], layout, topk, tiled[3], implementation)
    return from_tile_order(out, layout)
