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
``torch.compile`` and FSDP see one opaque op each way. Every launch takes its options from the
table in ``launches.py``, looked up for the tensors' device.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from ..errors import InputError
from .launches import (
    SELECT_ROWS_PER_PROGRAM,
    SIDE_STREAM_PRIORITY,
    TILE_MEANS_LAUNCH,
    Device,
    device_of,
    dkdv_query_major,
    select_launch,
    select_lanes,
)
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

def _device(x: Tensor) -> Device:
    """The launch choices of x's device (``launches.py``); the interpreter runs on the CPU."""
    return device_of(x.device, _triton_module().INTERPRETED)


def _use_tma(device: Device, *tensors: Tensor) -> bool:
    """Tensor descriptors need the device's bulk copies and 16-byte aligned bases and row strides
    (true for [B, L, h, D] projections); other views take masked pointer loads."""
    if not device.tensor_descriptors:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:3]):
            return False
    if not device.interpreted:
        import triton

        # Device-side descriptors live in a small global scratch buffer that Triton asks us for.
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    return True


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device, priority=SIDE_STREAM_PRIORITY)


class _TwoStreams:
    """Fork/join of launches that do not depend on each other::

        with _TwoStreams(x.device, device) as streams:
            with streams.beside():
                ...  # launched on a second stream, after everything already on the caller's stream
            ...      # launched on the caller's stream, concurrently
        # here the caller's stream has waited for the second one

    Every tensor either side touched is then safe to free or read on the caller's stream (the
    caching allocator orders frees on the stream that allocated them). Tensors allocated inside
    ``beside()`` come from the second stream's pool; that stream is private to this module and every
    use of it starts by waiting for the caller's stream, so a reuse of their memory is ordered after
    any use the caller enqueued before freeing them (no ``record_stream`` needed). A plain sequence
    on CPU and in the Triton interpreter.
    """

    def __init__(self, torch_device: torch.device, device: Device):
        self.active = torch_device.type == "cuda" and device.overlaps_launches
        self.device = torch_device

    def __enter__(self):
        if self.active:
            self.caller = torch.cuda.current_stream(self.device)
            self.side = _side_stream(self.device)
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


def _coarse_forward(q, k, v, tile_offsets, topk, device: Device):
    """Tile means and top-k selection (Triton), tile-level scores, softmax and coarse output (PyTorch,
    fp32, tiny).

    Returns means fp32 [3, B, h, n, D], probs fp32 [B, h, n, n], ``_select_key_tiles``' three lists,
    and the coarse branch's tile outputs fp32 [B, h, n, D].
    """
    D = q.shape[-1]
    means = _tile_means(q, k, v, tile_offsets, device)
    # fp32 even under bf16 autocast: the selection kernel ranks exact fp32 score keys.
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = torch.matmul(means[0], means[1].transpose(-1, -2)).mul_(1.0 / math.sqrt(D))
        # The softmax and the coarse output do not wait for the selection (one warp per score row,
        # latency-bound): they run beside it.
        with _TwoStreams(q.device, device) as streams:
            with streams.beside():
                probs = torch.softmax(scores, dim=-1)
                coarse = torch.matmul(probs, means[2])
            key_tiles, key_entries, key_counts = _select_key_tiles(scores, tile_offsets, topk, device)
    return means, probs, key_tiles, key_entries, key_counts, coarse


def _tile_means(q: Tensor, k: Tensor, v: Tensor, tile_offsets: Tensor, device: Device) -> Tensor:
    """Per-tile means of q, k and v [B, h, L, D] (one launch) -> fp32 [3, B, h, n, D]."""
    B, heads, L, D = q.shape
    n = tile_offsets.numel() - 1
    means = torch.empty(3, B, heads, n, D, dtype=torch.float32, device=q.device)
    _triton_module().tile_means_kernel[(n, B * heads, 3)](
        q, k, v, means, tile_offsets, *_strides(q), *_strides(k), *_strides(v), heads, n, B * heads * n,
        BLOCK=64, D=D, **device.launch(TILE_MEANS_LAUNCH),
    )
    return means


def _select_key_tiles(scores: Tensor, tile_offsets: Tensor, topk: int, device: Device
                      ) -> tuple[Tensor, Tensor, Tensor]:
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
    rows_per_program = SELECT_ROWS_PER_PROGRAM
    tv.select_kernel[(triton_cdiv(num_rows, rows_per_program),)](
        scores.contiguous(), key_tiles, key_entries, key_counts, tile_offsets, num_rows, n, topk,
        ENTRY_SIZE_BITS=_ENTRY_SIZE_BITS, ROWS=rows_per_program, **select_lanes(n),
        **device.launch(select_launch(n)),
    )
    return key_tiles, key_entries, key_counts


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _groups(block_groups) -> list[tuple[int, int, int]]:
    """Flat [rows0, count0, rows1, count1, ...] -> [(rows, first, count)] over ``tiles_by_block``."""
    result, first = [], 0
    for rows, count in zip(block_groups[::2], block_groups[1::2]):
        result.append((rows, first, count))
        first += count
    return result


def _triton_forward(q, k, v, gate, tile_offsets, tiles_by_block, block_groups, topk, device: Device):
    tv = _triton_module()
    B, heads, L, D = q.shape
    n = tile_offsets.numel() - 1
    means, probs, key_tiles, key_entries, key_counts, coarse = _coarse_forward(q, k, v, tile_offsets, topk, device)
    out = _out_like_projection(q)
    lse = torch.empty(B, heads, L, dtype=torch.float32, device=q.device)
    g = gate if gate is not None else q  # dummy pointer when HAS_GATE is False
    use_tma = _use_tma(device, k, v)
    groups = _groups(block_groups)

    def launch(rows, first, count):  # one launch per query-tile size group
        tv.fwd_kernel[(count, B * heads)](
            q, k, v, g, coarse, out, lse, key_entries, key_counts, tile_offsets, tiles_by_block[first:],
            *_strides(q), *_strides(k), *_strides(v), *_strides(g), *_strides(out),
            heads, n, topk, L, math.log2(math.e) / math.sqrt(D),
            HAS_GATE=gate is not None, BLOCK_M=rows, D=D, ENTRY_SIZE_BITS=_ENTRY_SIZE_BITS,
            USE_TMA=use_tma, **_list_flags("fwd", rows, groups), **device.attention_launch("fwd", D, rows),
        )

    with _TwoStreams(q.device, device) as streams:
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
    """The constexprs of how one size group's launch walks its lists.

    HAS_PARTIAL_KEYS / HAS_PARTIAL_QUERIES: whether the grid has tiles of <= 32 tokens (exactly the 32-
    and 16-row groups); without them the kernels compile without their partial-tile loops and never
    read the per-row counts. QUERY_MAJOR (dk/dv): ``launches.dkdv_query_major``.
    """
    partial = any(group_rows < 64 for group_rows, _, _ in groups)
    if kernel == "bwd_dkdv":
        return dict(HAS_PARTIAL_QUERIES=partial, QUERY_MAJOR=dkdv_query_major(rows))
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
# The selection kernel counts chosen tiles in 16-bit fields (triton_vsa.select_kernel).
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
    tiles_by_block, block_groups, device: Device,
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
    tv.bwd_preprocess_kernel[(n, B * heads)](
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
        tv.bwd_dq_kernel[(count, B * heads)](
            q, k, v, grad_out, target, lse, delta, key_entries, key_counts, tile_offsets, tiles_by_block[first:],
            dq_coarse if with_coarse else means[0], *_strides(q), *_strides(k), *_strides(v),
            *_strides(grad_out), *_strides(target), heads, n, topk, L, qk_scale, sm_scale,
            HAS_COARSE=with_coarse, BLOCK_M=rows, D=D, ENTRY_SIZE_BITS=_ENTRY_SIZE_BITS,
            USE_TMA=_use_tma(device, k, v), **_list_flags("bwd_dq", rows, groups),
            **device.attention_launch("bwd_dq", D, rows),
        )

    with _TwoStreams(q.device, device) as streams:
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
                tv.add_tile_rows_kernel[(count, B * heads)](
                    fine_dq, dq_c, dq, tile_offsets, tiles_by_block[first:], *_strides(fine_dq), *_strides(dq),
                    heads, n, BLOCK=rows, D=D,
                )

        def launch_dkdv(rows, first, count):  # one launch per key-tile size group
            tv.bwd_dkdv_kernel[(count, B * heads)](
                q, k, v, grad_out, dk, dv, lse, delta, *query_lists, tile_offsets, tiles_by_block[first:], dk_c, dv_c,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
                heads, n, L, qk_scale, sm_scale,
                HAS_COARSE=has_gate, BLOCK_N=rows, D=D, ENTRY_SIZE_BITS=_ENTRY_SIZE_BITS,
                USE_TMA=_use_tma(device, q, grad_out), **_list_flags("bwd_dkdv", rows, groups),
                **device.attention_launch("bwd_dkdv", D, rows),
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
    return _triton_forward(q, k, v, gate, tile_offsets, tiles_by_block, block_groups, topk, _device(q))


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
        tiles_by_block, block_groups, _device(q),
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
        and (q.is_cuda or (q.device.type == "cpu" and _triton_module().INTERPRETED))
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
