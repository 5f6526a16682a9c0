"""Experiment (not adopted): a Gluon forward of the VSA fine branch for Hopper, against the Triton one.

Question: is the Triton forward (kernels/vsa/triton_vsa.py) slow because of its schedule? Gluon,
Triton's low-level dialect, gives the control Triton hides: warp specialization, asynchronous
warpgroup MMAs and explicit shared-memory rings. Two kernels for the full (64-token) query tiles:
  * ``_fwd``: FlashAttention-3's schedule, a producer warp issuing the bulk tensor copies (q, then
    each selected key tile's K and V into 2-slot rings) and a compute warpgroup that issues QKᵀ of
    step j together with P·V of step j-1 and runs the softmax of step j while P·V is in flight;
  * ``_fwd_inline``: the same MMA overlap with the copies issued by the compute warpgroup itself
    (one warpgroup per CTA; 64 KB of shared memory, so 3 CTAs per SM), optionally with q in
    registers (``Q_IN_REGS``) and copies of only a partial key tile's valid rows (``PARTIAL_COPIES``).
Both gave the v7 Triton kernel's output bit for bit (same math, same summation order); the v8
kernel walks size-sorted key lists, so it now differs from them by summation order only.

Measured on the H200 (bench/results/vsa_gluon_probe_h200_2026-11-29.json, bench/NOTES_vsa.md): the
64-row launch goes from 3.26 ms (Triton) to 3.02 ms, the whole forward by ~4%; none of the options
moves it further. Not adopted: 4% does not pay for a second forward kernel on an experimental API
(this file is written against Triton 3.6's Gluon, the GPU machine's; Triton 3.9 renamed
``async_copy_global_to_shared`` and ``thread_barrier``), Hopper only.

Runs only on an sm_90 GPU with Triton 3.6: ``python bench/vsa_gluon_probe.py [--out FILE]``. Prints
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from fastwan.kernels.vsa import TileLayout, topk_for_sparsity
from fastwan.kernels.vsa import ops as vsa_ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from vsa_attention import bench_ms, projection_views, rel_err  # noqa: E402

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    _IMPORT_ERROR = None
except ImportError as error:  # a Triton without Gluon's Hopper API
    _IMPORT_ERROR = error

if _IMPORT_ERROR is None:

    @gluon.jit
    def _load_partition(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty,
                        ENTRIES, q_start, TOPK, ENTRY_SIZE_BITS: gl.constexpr, NUM_BUF: gl.constexpr):
        # One warp: q once, then each selected key tile's K and V into ring slot j % NUM_BUF as soon
        # as the compute warps have released that slot (a slot starts free: its "empty" barrier
        # begins in the completed phase, so the first wait, on phase 1, passes at once).
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_start, 0], q_bar, q_smem)
        for j in range(TOPK):
            k_start = gl.load(ENTRIES + j) >> ENTRY_SIZE_BITS
            slot = j % NUM_BUF
            phase = (j // NUM_BUF) & 1
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_start, 0], k_ready.index(slot), k_bufs.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [k_start, 0], v_ready.index(slot), v_bufs.index(slot))

    @gluon.jit
    def _softmax_step(s, k_len, m_i, l_i, qk_scale, s_layout: gl.constexpr):
        # Online softmax of one key tile's raw scores s [64, 64]: key slots past the tile's token
        # count hold the next tile's tokens (whole 64-row copies) and are masked out.
        key_slots = gl.arange(0, 64, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((key_slots < k_len)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        return p, alpha, l_i * alpha + gl.sum(p, 1), m_new

    @gluon.jit
    def _compute_partition(q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty,
                           ENTRIES, TOPK, qk_scale,
                           D: gl.constexpr, ENTRY_SIZE_BITS: gl.constexpr, NUM_BUF: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 64, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        size_mask: gl.constexpr = (1 << ENTRY_SIZE_BITS) - 1
        dtype: gl.constexpr = q_smem.dtype
        zero_s = gl.zeros([64, 64], gl.float32, s_layout)
        acc = gl.zeros([64, D], gl.float32, o_layout)
        m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.full([64], 0.0, gl.float32, gl.SliceLayout(1, s_layout))

        # Step 0: scores only.
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, alpha, l_i, m_i = _softmax_step(s, gl.load(ENTRIES) & size_mask, m_i, l_i, qk_scale, s_layout)
        for j in range(1, TOPK):
            slot = j % NUM_BUF
            prev = (j - 1) % NUM_BUF
            # Issue QKᵀ of step j, then P·V of step j-1; both run on the tensor cores while this
            # warpgroup does the softmax of step j.
            mbarrier.wait(k_ready.index(slot), (j // NUM_BUF) & 1)
            s = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_BUF) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))  # groups retire in order: QKᵀ of step j is done
            mbarrier.arrive(k_empty.index(slot), count=1)
            p, alpha, l_i, m_i = _softmax_step(s, gl.load(ENTRIES + j) & size_mask, m_i, l_i, qk_scale, s_layout)
            acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        last = (TOPK - 1) % NUM_BUF
        mbarrier.wait(v_ready.index(last), ((TOPK - 1) // NUM_BUF) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        return acc, l_i, m_i

    @gluon.jit
    def _copy_key_tile(descs, PARTIAL: gl.constexpr, entry, bar, buf, ENTRY_SIZE_BITS: gl.constexpr):
        # Copy the rows of one key tile into a 64-row buffer with the smallest box (64/32/16/8 rows)
        # that covers its token count: partial tiles (a grid side not a multiple of 4) then cost
        # less L2 traffic. Rows past the box keep the previous tile's (finite) values; the softmax
        # masks them.
        d64, d32, d16, d8 = descs
        start = entry >> ENTRY_SIZE_BITS
        size = entry & ((1 << ENTRY_SIZE_BITS) - 1)
        if not PARTIAL:
            mbarrier.expect(bar, d64.block_type.nbytes)
            tma.async_copy_global_to_shared(d64, [start, 0], bar, buf)
        elif size > 32:
            mbarrier.expect(bar, d64.block_type.nbytes)
            tma.async_copy_global_to_shared(d64, [start, 0], bar, buf)
        elif size > 16:
            mbarrier.expect(bar, d32.block_type.nbytes)
            tma.async_copy_global_to_shared(d32, [start, 0], bar, buf.slice(0, 32))
        elif size > 8:
            mbarrier.expect(bar, d16.block_type.nbytes)
            tma.async_copy_global_to_shared(d16, [start, 0], bar, buf.slice(0, 16))
        else:
            mbarrier.expect(bar, d8.block_type.nbytes)
            tma.async_copy_global_to_shared(d8, [start, 0], bar, buf.slice(0, 8))

    @gluon.jit
    def _descriptors(base, L, stride, D: gl.constexpr, layout: gl.constexpr, PARTIAL: gl.constexpr):
        # Bulk-copy descriptors of one head's [L, D] rows: 64-row boxes, plus 32/16/8-row boxes
        # for partial copies (each descriptor is built in global memory by the program).
        d64 = tma.make_tensor_descriptor(base, shape=[L, D], strides=[stride, 1], block_shape=[64, D], layout=layout)
        if PARTIAL:
            return (d64,
                    tma.make_tensor_descriptor(base, shape=[L, D], strides=[stride, 1], block_shape=[32, D],
                                               layout=layout),
                    tma.make_tensor_descriptor(base, shape=[L, D], strides=[stride, 1], block_shape=[16, D],
                                               layout=layout),
                    tma.make_tensor_descriptor(base, shape=[L, D], strides=[stride, 1], block_shape=[8, D],
                                               layout=layout))
        else:
            return d64, d64, d64, d64

    @gluon.jit
    def _fwd_inline(Q, K, V, G, COARSE, O, LSE, ENTRIES, TILE_OFF, TILE_LIST,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sgb, sgh, sgl, sob, soh, sol,
                    H, NUM_TILES, TOPK, L, qk_scale,
                    HAS_GATE: gl.constexpr, D: gl.constexpr, ENTRY_SIZE_BITS: gl.constexpr, NUM_BUF: gl.constexpr,
                    NUM_VBUF: gl.constexpr, Q_IN_REGS: gl.constexpr = False, PARTIAL_COPIES: gl.constexpr = False):
        # The same schedule without a producer warp: the compute warpgroup issues its own bulk copies
        # (K two steps ahead, V NUM_VBUF steps ahead), so a CTA is one warpgroup and a smaller
        # footprint (NUM_VBUF = 1: 64 KB) fits three CTAs per SM.
        tile = gl.load(TILE_LIST + gl.program_id(0))
        bh = gl.program_id(1).to(gl.int64)
        b = bh // H
        h = bh % H
        row = bh * NUM_TILES + tile
        q_start = gl.load(TILE_OFF + tile)
        q_len = gl.load(TILE_OFF + tile + 1) - q_start
        entries = ENTRIES + row * TOPK
        smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_desc = tma.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[L, D], strides=[sql, 1],
                                            block_shape=[64, D], layout=smem_layout)
        k_descs = _descriptors(K + b * skb + h * skh, L, skl, D, smem_layout, PARTIAL_COPIES)
        v_descs = _descriptors(V + b * svb + h * svh, L, svl, D, smem_layout, PARTIAL_COPIES)
        dtype: gl.constexpr = Q.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [64, D], smem_layout)
        k_bufs = gl.allocate_shared_memory(dtype, [2, 64, D], smem_layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_VBUF, 64, D], smem_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [NUM_VBUF, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(2):
            mbarrier.init(k_bar.index(i), count=1)
        for i in gl.static_range(NUM_VBUF):
            mbarrier.init(v_bar.index(i), count=1)
        size_mask: gl.constexpr = (1 << ENTRY_SIZE_BITS) - 1
        # Partial copies leave the rows past the box untouched; start V from zeros so that those rows
        # are finite from the first step on (P is 0 there, but 0 * NaN would not be).
        zero_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        for i in gl.static_range(NUM_VBUF):
            v_bufs.index(i).store(gl.zeros([64, D], dtype, zero_layout))
        fence_async_shared()
        gl.thread_barrier()

        # Prologue copies: q, K of steps 0 and 1, V of steps 0 .. NUM_VBUF-1.
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_start, 0], q_bar, q_smem)
        for i in gl.static_range(2):
            if i < TOPK:
                _copy_key_tile(k_descs, PARTIAL_COPIES, gl.load(entries + i), k_bar.index(i), k_bufs.index(i), ENTRY_SIZE_BITS)
        for i in gl.static_range(NUM_VBUF):
            if i < TOPK:
                _copy_key_tile(v_descs, PARTIAL_COPIES, gl.load(entries + i), v_bar.index(i), v_bufs.index(i), ENTRY_SIZE_BITS)

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 64, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        zero_s = gl.zeros([64, 64], gl.float32, s_layout)
        acc = gl.zeros([64, D], gl.float32, o_layout)
        m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.full([64], 0.0, gl.float32, gl.SliceLayout(1, s_layout))

        mbarrier.wait(q_bar, 0)
        if Q_IN_REGS:
            # q as the register operand of QKᵀ: each MMA then reads only K from shared memory.
            q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        else:
            q_op = q_smem
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(q_op, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        if 2 < TOPK:
            _copy_key_tile(k_descs, PARTIAL_COPIES, gl.load(entries + 2), k_bar.index(0), k_bufs.index(0), ENTRY_SIZE_BITS)
        p, alpha, l_i, m_i = _softmax_step(s, gl.load(entries) & size_mask, m_i, l_i, qk_scale, s_layout)
        for j in range(1, TOPK):
            slot = j % 2
            vslot = (j - 1) % NUM_VBUF
            mbarrier.wait(k_bar.index(slot), (j // 2) & 1)
            s = warpgroup_mma(q_op, k_bufs.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_bar.index(vslot), ((j - 1) // NUM_VBUF) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma(p_op, v_bufs.index(vslot), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))
            if j + 2 < TOPK:
                _copy_key_tile(k_descs, PARTIAL_COPIES, gl.load(entries + j + 2), k_bar.index(slot), k_bufs.index(slot), ENTRY_SIZE_BITS)
            p, alpha, l_i, m_i = _softmax_step(s, gl.load(entries + j) & size_mask, m_i, l_i, qk_scale, s_layout)
            acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
            if j - 1 + NUM_VBUF < TOPK:
                _copy_key_tile(v_descs, PARTIAL_COPIES, gl.load(entries + j - 1 + NUM_VBUF), v_bar.index(vslot), v_bufs.index(vslot), ENTRY_SIZE_BITS)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        last = (TOPK - 1) % NUM_VBUF
        mbarrier.wait(v_bar.index(last), ((TOPK - 1) // NUM_VBUF) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        _epilogue(acc, l_i, m_i, G, COARSE, O, LSE, b, h, bh, row, q_start, q_len, sgb, sgh, sgl, sob, soh, sol, L,
                  HAS_GATE, D)

    @gluon.jit
    def _epilogue(acc, l_i, m_i, G, COARSE, O, LSE, b, h, bh, row, q_start, q_len, sgb, sgh, sgl, sob, soh, sol, L,
                  HAS_GATE: gl.constexpr, D: gl.constexpr):
        # out = fine / l (+ gate * coarse), and the base-2 LSE for the backward.
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 64, 16])
        rows = gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        q_mask = (rows < q_len)[:, None]
        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        if HAS_GATE:
            coarse = gl.load(COARSE + row * D + cols)
            g = gl.load(G + b * sgb + h * sgh + (q_start + rows)[:, None] * sgl + cols[None, :], mask=q_mask, other=0.0)
            out += g.to(gl.float32) * coarse[None, :]
        gl.store(O + b * sob + h * soh + (q_start + rows)[:, None] * sol + cols[None, :], out.to(O.dtype.element_ty),
                 mask=q_mask)
        lse_rows = gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
        gl.store(LSE + bh * L + q_start + lse_rows, m_i + gl.log2(l_i), mask=lse_rows < q_len)

    @gluon.jit
    def _fwd(Q, K, V, G, COARSE, O, LSE, ENTRIES, TILE_OFF, TILE_LIST,
             sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sgb, sgh, sgl, sob, soh, sol,
             H, NUM_TILES, TOPK, L, qk_scale,
             HAS_GATE: gl.constexpr, D: gl.constexpr, ENTRY_SIZE_BITS: gl.constexpr, NUM_BUF: gl.constexpr):
        # One full query tile (64 tokens) of one (batch, head), as triton_vsa._fwd with BLOCK_M = 64.
        tile = gl.load(TILE_LIST + gl.program_id(0))
        bh = gl.program_id(1).to(gl.int64)
        b = bh // H
        h = bh % H
        row = bh * NUM_TILES + tile
        q_start = gl.load(TILE_OFF + tile)
        q_len = gl.load(TILE_OFF + tile + 1) - q_start
        entries = ENTRIES + row * TOPK

        smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_desc = tma.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[L, D], strides=[sql, 1],
                                            block_shape=[64, D], layout=smem_layout)
        k_desc = tma.make_tensor_descriptor(K + b * skb + h * skh, shape=[L, D], strides=[skl, 1],
                                            block_shape=[64, D], layout=smem_layout)
        v_desc = tma.make_tensor_descriptor(V + b * svb + h * svh, shape=[L, D], strides=[svl, 1],
                                            block_shape=[64, D], layout=smem_layout)
        dtype: gl.constexpr = Q.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [64, D], smem_layout)
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_BUF, 64, D], smem_layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_BUF, 64, D], smem_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=1)

        acc, l_i, m_i = gl.warp_specialize([
            (_compute_partition, (q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty,
                                  entries, TOPK, qk_scale, D, ENTRY_SIZE_BITS, NUM_BUF)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                               v_empty, entries, q_start, TOPK, ENTRY_SIZE_BITS, NUM_BUF)),
        ], [1], [24])

        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        rows = gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        q_mask = (rows < q_len)[:, None]
        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        if HAS_GATE:
            coarse = gl.load(COARSE + row * D + cols)
            g = gl.load(G + b * sgb + h * sgh + (q_start + rows)[:, None] * sgl + cols[None, :], mask=q_mask, other=0.0)
            out += g.to(gl.float32) * coarse[None, :]
        gl.store(O + b * sob + h * soh + (q_start + rows)[:, None] * sol + cols[None, :], out.to(dtype), mask=q_mask)
        lse_rows = gl.arange(0, 64, layout=gl.SliceLayout(1, gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])))
        gl.store(LSE + bh * L + q_start + lse_rows, m_i + gl.log2(l_i), mask=lse_rows < q_len)


def fine_launches(q, k, v, gate, layout, topk):
    """Each query-tile size group's fine-branch launch alone (selection precomputed): times in ms,
    and the Gluon kernels' agreement with the Triton kernel on the 64-row group."""
    tv = vsa_ops._triton_module()
    B, heads, L, D = q.shape
    n = layout.num_tiles
    means, probs, key_tiles, key_entries, key_counts, coarse = vsa_ops._coarse_forward(
        q, k, v, layout.tile_offsets, topk)
    entries = vsa_ops._pack_tile_entries(key_tiles, layout.tile_offsets)
    scale = math.log2(math.e) / math.sqrt(D)
    result = {"coarse_ms": bench_ms(lambda: vsa_ops._coarse_forward(q, k, v, layout.tile_offsets, topk), False)}

    def buffers():
        out = vsa_ops._out_like_projection(q)
        return out, torch.zeros(B, heads, L, dtype=torch.float32, device=q.device)

    def strides(out):
        return (*vsa_ops._strides(q), *vsa_ops._strides(k), *vsa_ops._strides(v), *vsa_ops._strides(gate),
                *vsa_ops._strides(out))


    def triton_launch(rows, count, tiles, out, lse, **config):
        tv.kernels()["fwd"][(count, B * heads)](
            q, k, v, gate, coarse, out, lse, key_entries, key_counts, layout.tile_offsets, tiles, *strides(out),
            heads, n, topk, L, scale, HAS_GATE=True, BLOCK_M=rows, D=D, ENTRY_SIZE_BITS=vsa_ops._ENTRY_SIZE_BITS,
            HAS_PARTIAL_KEYS=True, USE_TMA=True,
            **(config or vsa_ops._launch_config("fwd", D, q.device, rows)))

    def gluon_launch(name, count, tiles, out, lse):
        config = dict(GLUON_CONFIGS[name])
        globals()[config.pop("kernel")][(count, B * heads)](
            q, k, v, gate, coarse, out, lse, entries, layout.tile_offsets, tiles, *strides(out),
            heads, n, topk, L, scale, HAS_GATE=True, D=D, ENTRY_SIZE_BITS=vsa_ops._ENTRY_SIZE_BITS, **config)

    groups = vsa_ops._groups(vsa_ops._flat_groups(layout))
    for rows, first, count in groups:
        tiles = layout.tiles_by_block[first:]
        out, lse = buffers()
        result[f"triton_{rows}rows_{count}tiles_ms"] = bench_ms(lambda: triton_launch(rows, count, tiles, out, lse), False)
        if rows < 64:  # launch configurations of the small-tile groups
            for warps, stages in ((1, 2), (2, 2), (2, 3), (4, 2)):
                result[f"triton_{rows}rows_w{warps}_s{stages}_ms"] = bench_ms(
                    lambda: triton_launch(rows, count, tiles, out, lse, num_warps=warps, num_stages=stages), False)
            continue
        triton_launch(rows, count, tiles, out, lse)
        for name in GLUON_CONFIGS:
            g_out, g_lse = buffers()
            gluon_launch(name, count, tiles, g_out, g_lse)
            torch.cuda.synchronize()
            # Compare the 64-row tiles' tokens only (the other groups were not launched here).
            token = torch.cat([torch.arange(int(layout.tile_offsets[t]), int(layout.tile_offsets[t + 1]))
                               for t in tiles[:count].tolist()]).to(q.device)
            result[f"gluon_{name}"] = {
                "out_rel_diff_vs_triton": rel_err(g_out[:, :, token], out[:, :, token]),
                "lse_max_abs_diff_vs_triton": (g_lse[:, :, token] - lse[:, :, token]).abs().max().item(),
                "ms": bench_ms(lambda: gluon_launch(name, count, tiles, g_out, g_lse), False),
            }

    # All groups back to back on one stream (as ops.py launches them), or the small-tile groups on a
    # second stream beside the 64-row launch: if the small launches only lacked parallelism, the
    # second stream would hide them.
    side = torch.cuda.Stream()
    out, lse = buffers()

    def all_groups(gluon, streams):
        def launch(rows, first, count):
            tiles = layout.tiles_by_block[first:]
            if gluon and rows == 64:
                gluon_launch("ws", count, tiles, out, lse)
            else:
                triton_launch(rows, count, tiles, out, lse)

        if not streams:
            for group in groups:
                launch(*group)
            return
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for group in groups:
                if group[0] < 64:
                    launch(*group)
        for group in groups:
            if group[0] == 64:
                launch(*group)
        torch.cuda.current_stream().wait_stream(side)

    for gluon in (False, True):
        for streams in (False, True):
            label = f"all_groups_{'gluon' if gluon else 'triton'}_{'2streams' if streams else '1stream'}_ms"
            result[label] = bench_ms(lambda: all_groups(gluon, streams), False)
    return result


GLUON_CONFIGS = {
    "ws": {"kernel": "_fwd", "NUM_BUF": 2, "num_warps": 4, "maxnreg": 128},
    "inline": {"kernel": "_fwd_inline", "NUM_BUF": 2, "NUM_VBUF": 1, "num_warps": 4, "maxnreg": 168},
    "inline_q_in_regs": {"kernel": "_fwd_inline", "NUM_BUF": 2, "NUM_VBUF": 1, "num_warps": 4, "maxnreg": 232,
                         "Q_IN_REGS": True},
    "inline_partial_copies": {"kernel": "_fwd_inline", "NUM_BUF": 2, "NUM_VBUF": 1, "num_warps": 4, "maxnreg": 168,
                              "PARTIAL_COPIES": True},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if _IMPORT_ERROR is not None or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print(f"needs an sm_90 GPU and Triton 3.6's Gluon ({_IMPORT_ERROR!r})", file=sys.stderr)
        return 2
    import triton

    # Device-side tensor descriptors live in a global scratch buffer that Triton asks us for.
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    device = torch.device("cuda")
    grid, heads, D = (21, 30, 52), 12, 128
    layout = TileLayout.for_grid(grid, device)
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "grid": list(grid),
              "heads": heads, "head_dim": D, "dtype": "bfloat16"}
    torch.manual_seed(0)
    q, k, v, gate = projection_views(1, heads, layout.num_tokens, D, torch.bfloat16, device, 4)
    with torch.no_grad():
        for sparsity in (0.8, 0.9):
            topk = topk_for_sparsity(layout.num_tiles, sparsity)
            report[f"sparsity_{sparsity}"] = {"topk": topk, **fine_launches(q, k, v, gate, layout, topk)}
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
