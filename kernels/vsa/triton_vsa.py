"""Triton kernels of Video Sparse Attention over compact tile order.

The attention kernels take a (tile, batch*head) grid: one program per 4x4x4 tile of one head,
launched once per tile-size group (64/32/16-row programs, see ``TileLayout.tiles_by_block``).
Tiles hold 1..64 tokens starting at ``tile_offsets[tile]``; rows past a tile's size are masked,
never read as padding from memory. Tensors are [B, h, L, D] views with any strides on B, h, L
and a unit stride on D, so q/k/v views of a [B, L, h, D] projection need no copy. The top-k
kernel takes one program per (batch, head, query tile) row of coarse scores. Launch options
live in ``launches.py``; the host side that launches these is ``ops.py``.

``triton.jit`` decides when this module is imported whether the kernels compile or run in Triton's
CPU interpreter (TRITON_INTERPRET=1, which the CPU tests set before importing triton).

Math (per query row, base-2 softmax as in FlashAttention-2):
    s = q·k * scale * log2(e) over the keys of the row's selected tiles
    lse2 = max(s) + log2(sum(exp2(s - max)))       (saved for backward)
    fine = sum_j exp2(s_j - lse2) v_j
    out = fine + gate * coarse[tile]
Backward: delta = rowsum(dO * fine); dS = P * (dO·v - delta); dq = scale dS k; dk = scale dSᵀ q;
dv = Pᵀ dO; plus each tile's coarse-branch gradient spread evenly over its tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program(tile, TILE_OFF, H, NUM_TILES):
    # This program's (batch, head) from grid axis 1, and its tile's place in the compact order:
    # (bh, b, h, row, first token, token count); row = bh * NUM_TILES + tile indexes the
    # per-(batch, head, tile) arrays.
    bh = tl.program_id(1).to(tl.int64)
    start = tl.load(TILE_OFF + tile)
    return bh, bh // H, bh % H, bh * NUM_TILES + tile, start, tl.load(TILE_OFF + tile + 1) - start


@triton.jit
def _rows(X, b, h, stride_b, stride_h, stride_l, start, rows, cols):
    # Pointers to tokens start + rows, all head-dim columns, of one (batch, head) of [B, h, L, D] X.
    return X + b * stride_b + h * stride_h + (start + rows)[:, None] * stride_l + cols[None, :]


@triton.jit
def _tile_entry(entry, ENTRY_SIZE_BITS: tl.constexpr):
    # A packed list entry (ops._pack_tile_entries) -> (first token, token count) of its tile.
    return entry >> ENTRY_SIZE_BITS, entry & ((1 << ENTRY_SIZE_BITS) - 1)


@triton.jit
def _tile_source(X, b, h, stride_b, stride_h, stride_l, L, D: tl.constexpr, ROWS: tl.constexpr,
                 USE_TMA: tl.constexpr):
    # Where the loop reads ROWS-row blocks of one (batch, head) of [B, h, L, D] X from: a bulk tensor
    # copy descriptor with ROWS-row boxes (Hopper and newer), else the pointer to the head's first token.
    base = X + b * stride_b + h * stride_h
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[L, D], strides=[stride_l, 1], block_shape=[ROWS, D])
    else:
        return base


@triton.jit
def _load_tile(source, stride_l, start, valid, USE_TMA: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
    # The ROWS tokens from `start`, [ROWS, D]. A bulk copy fetches all ROWS rows (rows past the tile
    # belong to the next tile, or are zeros past the sequence end: callers mask them out of the math);
    # pointer loads fetch only `valid` rows.
    if USE_TMA:
        return source.load([start, 0])
    else:
        rows = tl.arange(0, ROWS)
        return tl.load(source + (start + rows)[:, None] * stride_l + tl.arange(0, D)[None, :], mask=valid[:, None],
                       other=0.0)


@triton.jit
def tile_means_kernel(Q, K, V, OUT, TILE_OFF, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, H, NUM_TILES, NUM_ROWS,
                BLOCK: tl.constexpr, D: tl.constexpr):
    # Mean of one tile's valid tokens, fp32, for q, k and v in one launch (grid axis 2 picks which):
    # [B, h, L, D] each -> OUT [3, B, h, n, D] (NUM_ROWS = B * h * n).
    bh, b, h, row, start, size = _program(tl.program_id(0), TILE_OFF, H, NUM_TILES)
    which = tl.program_id(2)
    if which == 0:
        X, stride_b, stride_h, stride_l = Q, sqb, sqh, sql
    elif which == 1:
        X, stride_b, stride_h, stride_l = K, skb, skh, skl
    else:
        X, stride_b, stride_h, stride_l = V, svb, svh, svl
    row += which * NUM_ROWS
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    x = tl.load(_rows(X, b, h, stride_b, stride_h, stride_l, start, rows, cols), mask=(rows < size)[:, None],
                other=0.0).to(tl.float32)
    tl.store(OUT + row * D + cols, tl.sum(x, 0) / size.to(tl.float32))


@triton.jit
def _select_keys(SCORES, rows, lanes, NUM_ROWS, NUM_TILES):
    # One part of a row's lanes: each score as an unsigned 32-bit key in the same order (all bits of
    # negatives flipped, the sign bit of the rest), so the radix search compares 32-bit integers, not
    # int64; lanes past the row get 0, below every candidate (each has a bit set).
    valid = (lanes[None, :] < NUM_TILES) & (rows[:, None] < NUM_ROWS)
    x = tl.load(SCORES + rows[:, None] * NUM_TILES + lanes[None, :], mask=valid, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)
    return tl.where(valid, key, tl.full(key.shape, 0, tl.uint32)), valid


@triton.jit
def _count_at_least(key, candidate):
    return tl.sum((key >= candidate).to(tl.int32), 1, keep_dims=True)


@triton.jit
def _exclusive_scan(x, offset):
    # Per row, the sum of x over the earlier lanes of this part, plus the earlier parts' offset.
    return tl.cumsum(x, 1) - x + offset


@triton.jit
def _select_chosen(key, valid, threshold, flags_offset, tie_quota):
    # One part's chosen lanes (above the k-th largest key, or among the row's first tie_quota ties
    # with it) and each one's place in the ascending list. Counters packed in 16-bit fields, ties low
    # and above high, so one scan gives both.
    above = (key > threshold) & valid
    ties = (key == threshold) & valid
    flags = ties.to(tl.int32) + (above.to(tl.int32) << 16)
    before = _exclusive_scan(flags, flags_offset)
    ties_before, above_before = before & 0xFFFF, before >> 16
    chosen = above | (ties & (ties_before < tie_quota))
    return chosen, above_before + tl.minimum(ties_before, tie_quota)


@triton.jit
def _select_classes(TILE_OFF, lanes, chosen, NUM_TILES, ENTRY_SIZE_BITS: tl.constexpr):
    # The row block that holds each chosen tile (layout.block_rows: more than 32 tokens in 64 rows,
    # 17..32 in 32, up to 16 in 16) as packed counters (64-row low, 32-row high), and its list entry.
    lane_ok = lanes < NUM_TILES
    start = tl.load(TILE_OFF + lanes, mask=lane_ok, other=0)
    size = tl.load(TILE_OFF + lanes + 1, mask=lane_ok, other=0) - start
    whole = chosen & (size > 32)[None, :]
    half = chosen & ((size > 16) & (size <= 32))[None, :]
    return whole, half, whole.to(tl.int32) + (half.to(tl.int32) << 16), (start << ENTRY_SIZE_BITS) | size


@triton.jit
def _select_store(KEY_TILES, KEY_ENTRIES, rows, lanes, chosen, position, whole, half, classes, entry,
                  classes_offset, n_whole, n_half, TOPK):
    # One part's chosen lanes into both lists: ascending, and grouped 64-, 32-, 16-row tiles.
    tl.store(KEY_TILES + rows[:, None] * TOPK + position, lanes[None, :] + rows[:, None] * 0, mask=chosen)
    before = _exclusive_scan(classes, classes_offset)
    whole_before, half_before = before & 0xFFFF, before >> 16
    slot = tl.where(whole, whole_before,
                    tl.where(half, n_whole + half_before, position - whole_before - half_before + n_whole + n_half))
    tl.store(KEY_ENTRIES + rows[:, None] * TOPK + slot, entry[None, :] + rows[:, None] * 0, mask=chosen)


@triton.jit
def select_kernel(SCORES, KEY_TILES, KEY_ENTRIES, KEY_COUNTS, TILE_OFF, NUM_ROWS, NUM_TILES, TOPK,
            ENTRY_SIZE_BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    # ROWS (batch, head, query tile) rows of coarse scores -> each row's TOPK best key tiles, written
    # directly as an ascending index list (no boolean mask, no sort), and as the list the forward and
    # dq walk: packed entries (ops._pack_tile_entries) grouped by the row block that holds the tile
    # (layout.block_rows: 64, 32, then 16; ascending within one), with per-row counts of the 64- and
    # 32-row ones. A row's lanes come in two parts of BLOCK_T and BLOCK_TAIL (powers of two), so that
    # 624 tiles take 512 + 128 lanes rather than 1024: each step of the search costs per lane.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    lanes = tl.arange(0, BLOCK_T)
    tail_lanes = BLOCK_T + tl.arange(0, BLOCK_TAIL)
    key, valid = _select_keys(SCORES, rows, lanes, NUM_ROWS, NUM_TILES)
    tail_key, tail_valid = _select_keys(SCORES, rows, tail_lanes, NUM_ROWS, NUM_TILES)
    # The exact k-th largest key, by a 32-step radix search.
    threshold = tl.full([ROWS, 1], 0, tl.uint32)
    for i in tl.static_range(32):
        candidate = threshold | tl.full([ROWS, 1], 1 << (31 - i), tl.uint32)
        count = _count_at_least(key, candidate) + _count_at_least(tail_key, candidate)
        threshold = tl.where(count >= TOPK, candidate, threshold)
    # Ties fill what the keys above the threshold leave of TOPK, lowest index first. The places come
    # from int32 prefix sums of counters packed in 16-bit fields (the scans are this kernel's costly
    # step after the search: five separate ones, or one over int64 fields, took 0.24-0.26 ms at 480p
    # against 0.14 ms for two).
    above_in_head = tl.sum(((key > threshold) & valid).to(tl.int32), 1, keep_dims=True)
    above_in_tail = tl.sum(((tail_key > threshold) & tail_valid).to(tl.int32), 1, keep_dims=True)
    ties_in_head = tl.sum(((key == threshold) & valid).to(tl.int32), 1, keep_dims=True)
    tie_quota = TOPK - above_in_head - above_in_tail
    chosen, position = _select_chosen(key, valid, threshold, 0, tie_quota)
    tail_chosen, tail_position = _select_chosen(tail_key, tail_valid, threshold,
                                                ties_in_head + (above_in_head << 16), tie_quota)
    whole, half, classes, entry = _select_classes(TILE_OFF, lanes, chosen, NUM_TILES, ENTRY_SIZE_BITS)
    tail_whole, tail_half, tail_classes, tail_entry = _select_classes(TILE_OFF, tail_lanes, tail_chosen, NUM_TILES,
                                                                      ENTRY_SIZE_BITS)
    head_classes = tl.sum(classes, 1, keep_dims=True)
    totals = head_classes + tl.sum(tail_classes, 1, keep_dims=True)
    n_whole, n_half = totals & 0xFFFF, totals >> 16
    _select_store(KEY_TILES, KEY_ENTRIES, rows, lanes, chosen, position, whole, half, classes, entry,
                  0, n_whole, n_half, TOPK)
    _select_store(KEY_TILES, KEY_ENTRIES, rows, tail_lanes, tail_chosen, tail_position, tail_whole, tail_half,
                  tail_classes, tail_entry, head_classes, n_whole, n_half, TOPK)
    row_ok = rows[:, None] < NUM_ROWS
    tl.store(KEY_COUNTS + rows[:, None] * 2, n_whole, mask=row_ok)
    tl.store(KEY_COUNTS + rows[:, None] * 2 + 1, n_half, mask=row_ok)


@triton.jit
def _key_list(KEY_ENTRIES, KEY_COUNTS, row, TOPK, HAS_PARTIAL_KEYS: tl.constexpr):
    # A query tile's key list (written by select_kernel) and the end of its whole tiles: the count
    # loaded when the grid has partial tiles, else the whole list.
    entries = KEY_ENTRIES + row * TOPK
    if HAS_PARTIAL_KEYS:
        full_end = tl.load(KEY_COUNTS + 2 * row)
    else:
        full_end = TOPK
    return entries, full_end


@triton.jit
def _load_whole(k_source, v_source, skl, svl, entries, j, key_rows,
                D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr, USE_TMA: tl.constexpr):
    # The key tile of list entry j as 64-row blocks of K and V, with its valid rows.
    k_start, k_len = _tile_entry(tl.load(entries + j), ENTRY_SIZE_BITS)
    k_valid = key_rows < k_len
    k = _load_tile(k_source, skl, k_start, k_valid, USE_TMA, D, 64)
    v = _load_tile(v_source, svl, k_start, k_valid, USE_TMA, D, 64)
    return k, v, k_valid


@triton.jit
def _load_pair(k_source, v_source, skl, svl, entries, j, end,
               ROWS: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr, USE_TMA: tl.constexpr):
    # The partial key tiles of list entries j and j+1 as ROWS-row blocks of K and V, with their valid
    # rows. Entry j always holds a tile; past `end` the second entry is absent: count 0, all masked.
    start1, count1 = _tile_entry(tl.load(entries + j), ENTRY_SIZE_BITS)
    start2, count2 = _tile_entry(tl.load(entries + j + 1, mask=j + 1 < end, other=0), ENTRY_SIZE_BITS)
    rows = tl.arange(0, ROWS)
    valid1 = rows < count1
    valid2 = rows < count2
    k1 = _load_tile(k_source, skl, start1, valid1, USE_TMA, D, ROWS)
    k2 = _load_tile(k_source, skl, start2, valid2, USE_TMA, D, ROWS)
    v1 = _load_tile(v_source, svl, start1, valid1, USE_TMA, D, ROWS)
    v2 = _load_tile(v_source, svl, start2, valid2, USE_TMA, D, ROWS)
    return k1, v1, valid1, k2, v2, valid2


@triton.jit
def _load_block(k_source, v_source, skl, svl, entries, j, end,
                ROWS: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr, USE_TMA: tl.constexpr):
    # The partial key tile of list entry j as a ROWS-row block of K and V, with its valid rows; past
    # `end` the entry is absent: count 0, all masked.
    start, count = _tile_entry(tl.load(entries + j, mask=j < end, other=0), ENTRY_SIZE_BITS)
    valid = tl.arange(0, ROWS) < count
    return (_load_tile(k_source, skl, start, valid, USE_TMA, D, ROWS),
            _load_tile(v_source, svl, start, valid, USE_TMA, D, ROWS), valid)


@triton.jit
def _attend_four(q, k_source, v_source, skl, svl, entries, j, end, m_i, l_i, acc, qk_scale,
                 ROWS: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr, USE_TMA: tl.constexpr):
    # One online-softmax step over list entries j..j+3 (those before `end`), each as a ROWS-row block:
    # as _attend_pair, four small tiles sharing one rescale of the accumulator.
    k1, v1, valid1 = _load_block(k_source, v_source, skl, svl, entries, j, end, ROWS, D, ENTRY_SIZE_BITS, USE_TMA)
    k2, v2, valid2 = _load_block(k_source, v_source, skl, svl, entries, j + 1, end, ROWS, D, ENTRY_SIZE_BITS,
                                 USE_TMA)
    k3, v3, valid3 = _load_block(k_source, v_source, skl, svl, entries, j + 2, end, ROWS, D, ENTRY_SIZE_BITS,
                                 USE_TMA)
    k4, v4, valid4 = _load_block(k_source, v_source, skl, svl, entries, j + 3, end, ROWS, D, ENTRY_SIZE_BITS,
                                 USE_TMA)
    s1 = tl.where(valid1[None, :], tl.dot(q, tl.trans(k1)), float("-inf"))
    s2 = tl.where(valid2[None, :], tl.dot(q, tl.trans(k2)), float("-inf"))
    s3 = tl.where(valid3[None, :], tl.dot(q, tl.trans(k3)), float("-inf"))
    s4 = tl.where(valid4[None, :], tl.dot(q, tl.trans(k4)), float("-inf"))
    block_max = tl.maximum(tl.maximum(tl.max(s1, 1), tl.max(s2, 1)),
                           tl.maximum(tl.max(s3, 1), tl.max(s4, 1)))
    m_new = tl.maximum(m_i, block_max * qk_scale)
    p1 = tl.math.exp2(s1 * qk_scale - m_new[:, None])
    p2 = tl.math.exp2(s2 * qk_scale - m_new[:, None])
    p3 = tl.math.exp2(s3 * qk_scale - m_new[:, None])
    p4 = tl.math.exp2(s4 * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = (l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1) + tl.sum(p3, 1)
           + tl.sum(p4, 1))
    acc = tl.dot(p1.to(v1.dtype), v1, acc * alpha[:, None])
    acc = tl.dot(p2.to(v2.dtype), v2, acc)
    acc = tl.dot(p3.to(v3.dtype), v3, acc)
    acc = tl.dot(p4.to(v4.dtype), v4, acc)
    return m_new, l_i, acc


@triton.jit
def _attend_pair(q, k_source, v_source, skl, svl, entries, j, end, m_i, l_i, acc, qk_scale,
                 ROWS: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr, USE_TMA: tl.constexpr):
    # One online-softmax step over list entries j and j+1 (if j+1 < end), each as a ROWS-row block.
    # Entry j always holds a tile (>= 1 valid key), so m_new is finite; an absent second entry is
    # fully masked and adds exp2(-inf) = 0.
    k1, v1, valid1, k2, v2, valid2 = _load_pair(k_source, v_source, skl, svl, entries, j, end,
                                                ROWS, D, ENTRY_SIZE_BITS, USE_TMA)
    s1 = tl.where(valid1[None, :], tl.dot(q, tl.trans(k1)), float("-inf"))
    s2 = tl.where(valid2[None, :], tl.dot(q, tl.trans(k2)), float("-inf"))
    m_new = tl.maximum(m_i, tl.maximum(tl.max(s1, 1), tl.max(s2, 1)) * qk_scale)
    p1 = tl.math.exp2(s1 * qk_scale - m_new[:, None])
    p2 = tl.math.exp2(s2 * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1)
    acc = tl.dot(p2.to(v2.dtype), v2, tl.dot(p1.to(v1.dtype), v1, acc * alpha[:, None]))
    return m_new, l_i, acc


@triton.jit
def fwd_kernel(Q, K, V, G, COARSE, O, LSE, KEY_ENTRIES, KEY_COUNTS, TILE_OFF, TILE_LIST,
         sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sgb, sgh, sgl, sob, soh, sol,
         H, NUM_TILES, TOPK, L, qk_scale,
         HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr,
         HAS_PARTIAL_KEYS: tl.constexpr, USE_TMA: tl.constexpr = False):
    # One query tile (BLOCK_M rows: 64, or 32/16 for the small-tile launches over TILE_LIST) of
    # one head against its TOPK selected key tiles (online softmax). The key list comes sorted by
    # tile size with counts (written by select_kernel): tiles of more than 32 tokens take one
    # 64-slot step each; smaller ones go several per step sharing one softmax update, two as 32-row
    # blocks (17..32 tokens) or four as 16-row blocks (up to 16), so a partial key tile costs neither
    # a whole tile's copy nor a whole tile's MMA columns. Grids without tiles of <= 32 tokens compile
    # without those loops (HAS_PARTIAL_KEYS=False: compiled in, they slow the one-tile loop ~10%).
    # Each key tile's rows are a scalar start plus a lane offset: per-row gathered addresses are
    # 1.3-2x slower.
    bh, b, h, row, q_start, q_len = _program(tl.load(TILE_LIST + tl.program_id(0)), TILE_OFF, H, NUM_TILES)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    q_mask = (rows < q_len)[:, None]
    q = tl.load(_rows(Q, b, h, sqb, sqh, sql, q_start, rows, cols), mask=q_mask, other=0.0)
    k_source = _tile_source(K, b, h, skb, skh, skl, L, D, 64, USE_TMA)
    v_source = _tile_source(V, b, h, svb, svh, svl, L, D, 64, USE_TMA)
    key_rows = tl.arange(0, 64)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, D], 0.0, tl.float32)
    entries, full_end = _key_list(KEY_ENTRIES, KEY_COUNTS, row, TOPK, HAS_PARTIAL_KEYS)
    for j in range(0, full_end):
        k, v, k_valid = _load_whole(k_source, v_source, skl, svl, entries, j, key_rows, D, ENTRY_SIZE_BITS, USE_TMA)
        # Raw scores; the scale folds into the max and into exp2's multiply-add, and P@V accumulates
        # into the rescaled accumulator in place (-4% against scaling s first and adding the product).
        s = tl.where(k_valid[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p_ij = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p_ij, 1)
        acc = tl.dot(p_ij.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    if HAS_PARTIAL_KEYS:
        # Partial key tiles, several per step: two 32-row blocks (17..32 tokens), then four 16-row blocks.
        half_end = full_end + tl.load(KEY_COUNTS + 2 * row + 1)
        k32 = _tile_source(K, b, h, skb, skh, skl, L, D, 32, USE_TMA)
        v32 = _tile_source(V, b, h, svb, svh, svl, L, D, 32, USE_TMA)
        for j in range(full_end, half_end, 2):
            m_i, l_i, acc = _attend_pair(q, k32, v32, skl, svl, entries, j, half_end, m_i, l_i, acc, qk_scale,
                                         32, D, ENTRY_SIZE_BITS, USE_TMA)
        k16 = _tile_source(K, b, h, skb, skh, skl, L, D, 16, USE_TMA)
        v16 = _tile_source(V, b, h, svb, svh, svl, L, D, 16, USE_TMA)
        for j in range(half_end, TOPK, 4):
            m_i, l_i, acc = _attend_four(q, k16, v16, skl, svl, entries, j, TOPK, m_i, l_i, acc, qk_scale,
                                         16, D, ENTRY_SIZE_BITS, USE_TMA)
    out = acc / l_i[:, None]
    if HAS_GATE:
        coarse = tl.load(COARSE + row * D + cols)
        g = tl.load(_rows(G, b, h, sgb, sgh, sgl, q_start, rows, cols), mask=q_mask, other=0.0)
        out += g.to(tl.float32) * coarse[None, :]
    tl.store(_rows(O, b, h, sob, soh, sol, q_start, rows, cols), out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * L + q_start + rows, m_i + tl.math.log2(l_i), mask=rows < q_len)


@triton.jit
def bwd_preprocess_kernel(O, DO, G, COARSE, DELTA, DG, DCOARSE, TILE_OFF,
                    sob, soh, sol, sdob, sdoh, sdol, sgb, sgh, sgl, sdgb, sdgh, sdgl,
                    H, NUM_TILES, L,
                    HAS_GATE: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    # delta = rowsum(dO * fine) with fine = out - gate*coarse; and the gate / coarse gradients.
    bh, b, h, row, start, size = _program(tl.program_id(0), TILE_OFF, H, NUM_TILES)
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    mask = (rows < size)[:, None]
    o = tl.load(_rows(O, b, h, sob, soh, sol, start, rows, cols), mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_rows(DO, b, h, sdob, sdoh, sdol, start, rows, cols), mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        coarse = tl.load(COARSE + row * D + cols)
        g = tl.load(_rows(G, b, h, sgb, sgh, sgl, start, rows, cols), mask=mask, other=0.0).to(tl.float32)
        o -= g * coarse[None, :]
        tl.store(_rows(DG, b, h, sdgb, sdgh, sdgl, start, rows, cols), (do * coarse[None, :]).to(DG.dtype.element_ty),
                 mask=mask)
        tl.store(DCOARSE + row * D + cols, tl.sum(do * g, 0))
    tl.store(DELTA + bh * L + start + rows, tl.sum(do * o, 1), mask=rows < size)


@triton.jit
def add_tile_rows_kernel(SRC, ADD, DST, TILE_OFF, TILE_LIST, ssb, ssh, ssl, sdb, sdh, sdl, H, NUM_TILES,
                   BLOCK: tl.constexpr, D: tl.constexpr):
    # DST's rows of one tile (from TILE_LIST) = SRC's fp32 rows + the tile's ADD row, rounded once: dq's
    # whole query tiles, whose launch could not wait for the coarse gradient (ops._triton_backward).
    bh, b, h, row, start, size = _program(tl.load(TILE_LIST + tl.program_id(0)), TILE_OFF, H, NUM_TILES)
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    mask = (rows < size)[:, None]
    x = tl.load(_rows(SRC, b, h, ssb, ssh, ssl, start, rows, cols), mask=mask, other=0.0)
    x += tl.load(ADD + row * D + cols)[None, :]
    tl.store(_rows(DST, b, h, sdb, sdh, sdl, start, rows, cols), x.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _dq_block(q, do, lse, delta, k, v, k_valid, dq, qk_scale):
    # dq += dS k for one block of keys; rows past the key tile get p = 0, so they add nothing.
    s = tl.dot(q, tl.trans(k))
    p_ij = tl.where(k_valid[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p_ij * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def _dq_pair(q, do, lse, delta, k_source, v_source, skl, svl, entries, j, end, dq, qk_scale,
             ROWS: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr, USE_TMA: tl.constexpr):
    # List entries j and j+1 (if j+1 < end) as ROWS-row blocks; an absent second entry adds nothing.
    k1, v1, valid1, k2, v2, valid2 = _load_pair(k_source, v_source, skl, svl, entries, j, end,
                                                ROWS, D, ENTRY_SIZE_BITS, USE_TMA)
    dq = _dq_block(q, do, lse, delta, k1, v1, valid1, dq, qk_scale)
    return _dq_block(q, do, lse, delta, k2, v2, valid2, dq, qk_scale)


@triton.jit
def bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KEY_ENTRIES, KEY_COUNTS, TILE_OFF, TILE_LIST, DQ_COARSE,
            sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sdqb, sdqh, sdql,
            H, NUM_TILES, TOPK, L, qk_scale, sm_scale,
            HAS_COARSE: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr,
            HAS_PARTIAL_KEYS: tl.constexpr, USE_TMA: tl.constexpr = False):
    # dq of one query tile (BLOCK_M rows, as in the forward): walk the forward's key list, with its
    # partial key tiles two per step as 32- or 16-row blocks.
    bh, b, h, row, q_start, q_len = _program(tl.load(TILE_LIST + tl.program_id(0)), TILE_OFF, H, NUM_TILES)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    q_valid = rows < q_len
    q = tl.load(_rows(Q, b, h, sqb, sqh, sql, q_start, rows, cols), mask=q_valid[:, None], other=0.0)
    do = tl.load(_rows(DO, b, h, sdob, sdoh, sdol, q_start, rows, cols), mask=q_valid[:, None], other=0.0)
    # Invalid rows get lse = delta = 0: their p stays finite and their dS is 0 because dO is 0.
    lse = tl.load(LSE + bh * L + q_start + rows, mask=q_valid, other=0.0)
    delta = tl.load(DELTA + bh * L + q_start + rows, mask=q_valid, other=0.0)
    k_source = _tile_source(K, b, h, skb, skh, skl, L, D, 64, USE_TMA)
    v_source = _tile_source(V, b, h, svb, svh, svl, L, D, 64, USE_TMA)
    key_rows = tl.arange(0, 64)
    dq = tl.full([BLOCK_M, D], 0.0, tl.float32)
    entries, full_end = _key_list(KEY_ENTRIES, KEY_COUNTS, row, TOPK, HAS_PARTIAL_KEYS)
    for j in range(0, full_end):
        k, v, k_valid = _load_whole(k_source, v_source, skl, svl, entries, j, key_rows, D, ENTRY_SIZE_BITS, USE_TMA)
        dq = _dq_block(q, do, lse, delta, k, v, k_valid, dq, qk_scale)
    if HAS_PARTIAL_KEYS:
        half_end = full_end + tl.load(KEY_COUNTS + 2 * row + 1)
        k32 = _tile_source(K, b, h, skb, skh, skl, L, D, 32, USE_TMA)
        v32 = _tile_source(V, b, h, svb, svh, svl, L, D, 32, USE_TMA)
        for j in range(full_end, half_end, 2):
            dq = _dq_pair(q, do, lse, delta, k32, v32, skl, svl, entries, j, half_end, dq, qk_scale,
                          32, D, ENTRY_SIZE_BITS, USE_TMA)
        k16 = _tile_source(K, b, h, skb, skh, skl, L, D, 16, USE_TMA)
        v16 = _tile_source(V, b, h, svb, svh, svl, L, D, 16, USE_TMA)
        for j in range(half_end, TOPK, 2):
            dq = _dq_pair(q, do, lse, delta, k16, v16, skl, svl, entries, j, TOPK, dq, qk_scale,
                          16, D, ENTRY_SIZE_BITS, USE_TMA)
    dq *= sm_scale
    if HAS_COARSE:
        dq += tl.load(DQ_COARSE + row * D + cols)[None, :]
    tl.store(_rows(DQ, b, h, sdqb, sdqh, sdql, q_start, rows, cols), dq.to(DQ.dtype.element_ty), mask=q_valid[:, None])


@triton.jit
def _dkdv_entry(k, v, q_source, do_source, sql, sdol, LSE, DELTA, bh, L, entry, dk, dv, qk_scale,
                ROWS: tl.constexpr, QUERY_MAJOR: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr,
                USE_TMA: tl.constexpr):
    # dk += dSᵀ q and dv += Pᵀ dO (dk unscaled: the kernel scales once) for the query tile of one
    # transposed-list entry, as a ROWS-row block. Rows past the query tile (a bulk copy reads into the
    # next tile) are removed by zeroing their P columns, so their dS columns are zero too; rewriting
    # the loaded q and dO tiles instead costs more than the copies save.
    # QUERY_MAJOR (the 16/32-row key tiles): the same products with queries as the MMAs' rows and the
    # accumulators transposed, dkᵀ += qᵀ dS and dvᵀ += dOᵀ P ([D, keys]), so the two accumulating
    # MMAs are D = 128 rows tall instead of 16 or 32.
    q_start, q_len = _tile_entry(entry, ENTRY_SIZE_BITS)
    rows = tl.arange(0, ROWS)
    q_valid = rows < q_len
    q = _load_tile(q_source, sql, q_start, q_valid, USE_TMA, D, ROWS)
    do = _load_tile(do_source, sdol, q_start, q_valid, USE_TMA, D, ROWS)
    lse = tl.load(LSE + bh * L + q_start + rows, mask=q_valid, other=0.0)
    delta = tl.load(DELTA + bh * L + q_start + rows, mask=q_valid, other=0.0)
    if QUERY_MAJOR:
        s = tl.dot(q, tl.trans(k))  # [queries, keys]
        p = tl.where(q_valid[:, None], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(do), p.to(do.dtype), dv)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk = tl.dot(tl.trans(q), ds.to(q.dtype), dk)
    else:
        sT = tl.dot(k, tl.trans(q))  # [keys, queries]
        pT = tl.where(q_valid[None, :], tl.math.exp2(sT * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_queries(k, v, q_source, do_source, sql, sdol, LSE, DELTA, bh, L, QUERY_ENTRIES, first, end, dk, dv,
                  qk_scale, ROWS: tl.constexpr, UNPIPELINED: tl.constexpr, QUERY_MAJOR: tl.constexpr,
                  D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr, USE_TMA: tl.constexpr):
    # The query tiles of transposed-list entries first..end-1, one ROWS-row block per step. UNPIPELINED
    # loops issue each step's copies in the step (num_stages=1): a 64-row key tile's loops over partial
    # query tiles must, because a second pipelined loop of MMAs into the same accumulators makes ptxas
    # serialize every MMA of the kernel (warning C7515, Triton 3.6 for sm_90).
    if UNPIPELINED:
        for e in tl.range(first, end, num_stages=1):
            dk, dv = _dkdv_entry(k, v, q_source, do_source, sql, sdol, LSE, DELTA, bh, L, tl.load(QUERY_ENTRIES + e),
                                 dk, dv, qk_scale, ROWS, QUERY_MAJOR, D, ENTRY_SIZE_BITS, USE_TMA)
    else:
        for e in range(first, end):
            dk, dv = _dkdv_entry(k, v, q_source, do_source, sql, sdol, LSE, DELTA, bh, L, tl.load(QUERY_ENTRIES + e),
                                 dk, dv, qk_scale, ROWS, QUERY_MAJOR, D, ENTRY_SIZE_BITS, USE_TMA)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, QUERY_ENTRIES, QUERY_OFF, QUERY_COUNTS, TILE_OFF, TILE_LIST,
              DK_COARSE, DV_COARSE,
              sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
              sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
              H, NUM_TILES, L, qk_scale, sm_scale,
              HAS_COARSE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr,
              HAS_PARTIAL_QUERIES: tl.constexpr, QUERY_MAJOR: tl.constexpr, USE_TMA: tl.constexpr = False):
    # dk, dv of one key tile (BLOCK_N rows: 64, or 32/16 for the small-tile launches over
    # TILE_LIST): walk the query tiles that selected it (the transposed list), one per step. Each
    # entry is packed as (first token << ENTRY_SIZE_BITS) | token count (ops._pack_tile_entries), so a
    # step needs one scalar load instead of the dependent tile index -> offsets chain (-10% for this
    # kernel on the H200). The list comes sorted by query-tile size with per-row counts
    # (ops._transposed_query_lists), so partial query tiles (HAS_PARTIAL_QUERIES) are 32- or 16-row
    # blocks: bulk copies and MMA columns of their own size, not a whole tile's.
    bh, b, h, row, k_start, k_len = _program(tl.load(TILE_LIST + tl.program_id(0)), TILE_OFF, H, NUM_TILES)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    k_valid = rows < k_len
    k = _load_tile(_tile_source(K, b, h, skb, skh, skl, L, D, BLOCK_N, USE_TMA), skl, k_start, k_valid, USE_TMA, D,
                   BLOCK_N)
    v = _load_tile(_tile_source(V, b, h, svb, svh, svl, L, D, BLOCK_N, USE_TMA), svl, k_start, k_valid, USE_TMA, D,
                   BLOCK_N)
    if QUERY_MAJOR:  # transposed accumulators, see _dkdv_entry
        dk = tl.full([D, BLOCK_N], 0.0, tl.float32)
        dv = tl.full([D, BLOCK_N], 0.0, tl.float32)
    else:
        dk = tl.full([BLOCK_N, D], 0.0, tl.float32)
        dv = tl.full([BLOCK_N, D], 0.0, tl.float32)
    first = tl.load(QUERY_OFF + row)
    last = tl.load(QUERY_OFF + row + 1)
    if HAS_PARTIAL_QUERIES:
        full_end = first + tl.load(QUERY_COUNTS + 2 * row)
        half_end = full_end + tl.load(QUERY_COUNTS + 2 * row + 1)
    else:
        full_end = last
        half_end = last
    q_source = _tile_source(Q, b, h, sqb, sqh, sql, L, D, 64, USE_TMA)
    do_source = _tile_source(DO, b, h, sdob, sdoh, sdol, L, D, 64, USE_TMA)
    dk, dv = _dkdv_queries(k, v, q_source, do_source, sql, sdol, LSE, DELTA, bh, L, QUERY_ENTRIES, first, full_end,
                           dk, dv, qk_scale, 64, False, QUERY_MAJOR, D, ENTRY_SIZE_BITS,
                           USE_TMA)
    if HAS_PARTIAL_QUERIES:
        q32 = _tile_source(Q, b, h, sqb, sqh, sql, L, D, 32, USE_TMA)
        do32 = _tile_source(DO, b, h, sdob, sdoh, sdol, L, D, 32, USE_TMA)
        dk, dv = _dkdv_queries(k, v, q32, do32, sql, sdol, LSE, DELTA, bh, L, QUERY_ENTRIES, full_end, half_end,
                               dk, dv, qk_scale, 32, BLOCK_N == 64, QUERY_MAJOR, D,
                               ENTRY_SIZE_BITS, USE_TMA)
        q16 = _tile_source(Q, b, h, sqb, sqh, sql, L, D, 16, USE_TMA)
        do16 = _tile_source(DO, b, h, sdob, sdoh, sdol, L, D, 16, USE_TMA)
        dk, dv = _dkdv_queries(k, v, q16, do16, sql, sdol, LSE, DELTA, bh, L, QUERY_ENTRIES, half_end, last,
                               dk, dv, qk_scale, 16, BLOCK_N == 64, QUERY_MAJOR, D,
                               ENTRY_SIZE_BITS, USE_TMA)
    if QUERY_MAJOR:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    dk *= sm_scale
    if HAS_COARSE:
        dk += tl.load(DK_COARSE + row * D + cols)[None, :]
        dv += tl.load(DV_COARSE + row * D + cols)[None, :]
    tl.store(_rows(DK, b, h, sdkb, sdkh, sdkl, k_start, rows, cols), dk.to(DK.dtype.element_ty), mask=k_valid[:, None])
    tl.store(_rows(DV, b, h, sdvb, sdvh, sdvl, k_start, rows, cols), dv.to(DV.dtype.element_ty), mask=k_valid[:, None])


# Whether ``triton.jit`` made the kernels above interpreter functions (TRITON_INTERPRET=1 at import).
INTERPRETED = not isinstance(fwd_kernel, triton.runtime.JITFunction)
