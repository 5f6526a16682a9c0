"""Where the VSA fine-branch kernels spend their time at 480p: a roofline probe.

Prints ONE JSON object. At the 480p shape ([1, 12, 32760, 128], grid 21x30x52, bf16, sparsity 0.8,
random inputs as in bench/vsa_attention.py) it times, in one process and taking turns:

- ``fwd_fine``: the forward attention kernel alone (selection and coarse branch precomputed);
- ``loads_only_tma`` / ``loads_only_masked``: the same programs walking the same key lists and
  loading the same K/V tiles (bulk tensor copies of 64 rows / pointer loads of the valid rows only),
  with the attention math replaced by an elementwise sum that keeps every load alive. This is the
  time the K/V traffic alone takes: the floor for any kernel that meets each (query tile, key tile)
  pair by moving a key tile into the SM of a 64-row query tile;
- ``loads_only_production_blocks``: the same with the production forward's copies: its size-sorted
  key lists, partial key tiles as 32- or 16-row blocks (the floor of the current kernel's traffic);
- ``compute_only``: the forward's math (both MMAs, online softmax) with K/V loaded once per program
  and only rescaled per step, so no per-step K/V traffic: the floor set by the math;
- the backward's parts: ``bwd_preprocess``, ``bwd_dq``, ``bwd_dkdv``;
- ``bwd_fused_*``: a single backward pass (dk/dv plus each pair's dq contribution added into an fp32
  buffer, by bulk tensor reduce-add or per-element atomics; run-to-run nondeterministic), against
  ``bwd_dq`` + ``bwd_dkdv``: what fusing the two passes would save.

It also reports the bytes each (query tile, key tile) pair moves and the implied L2->SM rate. With
``--launch-variants`` it also times each kernel's launch per tile-size group alone: dk/dv's 64-row
launch also with every query tile as a whole 64-row block (``HAS_PARTIAL_QUERIES=False``), the 32- and
16-row launches under several launch configurations (and dk/dv's also with keys as the MMAs' rows,
``QUERY_MAJOR=False``), each checked against the current launch (how
ops.SMALL_TILE_LAUNCH_CONFIG was chosen). With ``--profile`` it lists the GPU kernels of the whole
production forward and forward+backward (torch.profiler, mean microseconds per call): what the time
outside the fine-branch kernels is spent on.

    python bench/vsa_roofline.py            # GPU
    python bench/vsa_roofline.py --smoke    # CPU, tiny, Triton interpreter: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastwan.kernels.vsa import TileLayout, topk_for_sparsity  # noqa: E402
from fastwan.kernels.vsa import ops as vsa_ops  # noqa: E402
from fastwan.kernels.vsa.layout import block_rows  # noqa: E402
from fastwan.kernels.vsa import triton_vsa as tv  # noqa: E402
from vsa_attention import backward_of, bench_ms  # noqa: E402  (bench/ is on sys.path when run as a script)

_ADD, _MAX = tv._ADD, tv._MAX
# The production kernels' helpers, jitted for this process's mode, so the probes share their layout.
_program, _rows, _tile_entry, _tile_source, _load_tile, _key_list, _load_whole, _load_block = (
    tv.helpers()[name] for name in ("_program", "_rows", "_tile_entry", "_tile_source", "_load_tile", "_key_list",
                                    "_load_whole", "_load_block"))


@triton.jit
def _loads_only(K, V, OUT, KEY_TILES, TILE_OFF, TILE_LIST, skb, skh, skl, svb, svh, svl,
                H, NUM_TILES, TOPK, L, D: tl.constexpr, USE_TMA: tl.constexpr):
    bh, b, h, row, _, _ = _program(tl.load(TILE_LIST + tl.program_id(0)), TILE_OFF, H, NUM_TILES)
    key_rows = tl.arange(0, 64)
    k_source = _tile_source(K, b, h, skb, skh, skl, L, D, 64, USE_TMA)
    v_source = _tile_source(V, b, h, svb, svh, svl, L, D, 64, USE_TMA)
    acc = tl.full([64, D], 0.0, tl.float32)
    for j in range(TOPK):
        kt = tl.load(KEY_TILES + row * TOPK + j)
        k_start = tl.load(TILE_OFF + kt)
        if USE_TMA:
            k_valid = key_rows < 64  # bulk copies fetch whole rows: no mask, no tile-end load
        else:
            k_valid = key_rows < tl.load(TILE_OFF + kt + 1) - k_start
        k = _load_tile(k_source, skl, k_start, k_valid, USE_TMA, D, 64)
        v = _load_tile(v_source, svl, k_start, k_valid, USE_TMA, D, 64)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(OUT + row, tl.reduce(tl.reduce(acc, 1, _ADD), 0, _ADD))


@triton.jit
def _block_sums(K, V, b, h, skb, skh, skl, svb, svh, svl, L, entries, first, end, ROWS: tl.constexpr,
                D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr, USE_TMA: tl.constexpr):
    # Copies the partial key tiles of list entries first..end-1 as ROWS-row blocks; their sum.
    k_source = _tile_source(K, b, h, skb, skh, skl, L, D, ROWS, USE_TMA)
    v_source = _tile_source(V, b, h, svb, svh, svl, L, D, ROWS, USE_TMA)
    acc = tl.full([ROWS, D], 0.0, tl.float32)
    for j in range(first, end):
        k, v, valid = _load_block(k_source, v_source, skl, svl, entries, j, end, ROWS, D, ENTRY_SIZE_BITS, USE_TMA)
        acc += k.to(tl.float32) + v.to(tl.float32)
    return tl.reduce(tl.reduce(acc, 1, _ADD), 0, _ADD)


@triton.jit
def _loads_only_sorted(K, V, OUT, KEY_ENTRIES, KEY_COUNTS, TILE_OFF, TILE_LIST, skb, skh, skl, svb, svh, svl,
                       H, NUM_TILES, TOPK, L, D: tl.constexpr, ENTRY_SIZE_BITS: tl.constexpr,
                       USE_TMA: tl.constexpr, HAS_PARTIAL_KEYS: tl.constexpr):
    # The production forward's K/V copies alone: its size-sorted key lists, whole tiles as 64-row
    # blocks, tiles of 17..32 tokens as 32-row and of up to 16 as 16-row blocks (the copies the query
    # tile's program makes, whatever its own row count), each load kept alive by a sum.
    bh, b, h, row, _q_start, _q_len = _program(tl.load(TILE_LIST + tl.program_id(0)), TILE_OFF, H, NUM_TILES)
    key_rows = tl.arange(0, 64)
    k_source = _tile_source(K, b, h, skb, skh, skl, L, D, 64, USE_TMA)
    v_source = _tile_source(V, b, h, svb, svh, svl, L, D, 64, USE_TMA)
    entries, full_end = _key_list(KEY_ENTRIES, KEY_COUNTS, row, TOPK, HAS_PARTIAL_KEYS)
    acc = tl.full([64, D], 0.0, tl.float32)
    for j in range(0, full_end):
        k, v, valid = _load_whole(k_source, v_source, skl, svl, entries, j, key_rows, D, ENTRY_SIZE_BITS, USE_TMA)
        acc += k.to(tl.float32) + v.to(tl.float32)
    total = tl.reduce(tl.reduce(acc, 1, _ADD), 0, _ADD)
    if HAS_PARTIAL_KEYS:
        half_end = full_end + tl.load(KEY_COUNTS + 2 * row + 1)
        total += _block_sums(K, V, b, h, skb, skh, skl, svb, svh, svl, L, entries, full_end, half_end, 32, D,
                             ENTRY_SIZE_BITS, USE_TMA)
        total += _block_sums(K, V, b, h, skb, skh, skl, svb, svh, svl, L, entries, half_end, TOPK, 16, D,
                             ENTRY_SIZE_BITS, USE_TMA)
    tl.store(OUT + row, total)


@triton.jit
def _compute_only(Q, K, V, O, KEY_TILES, TILE_OFF, TILE_LIST, ONES, sqb, sqh, sql, skb, skh, skl,
                  svb, svh, svl, sob, soh, sol, H, NUM_TILES, TOPK, qk_scale, D: tl.constexpr):
    # The forward's math per step with K/V loaded once: each step rescales them by a loaded 1.0
    # (opaque to the compiler, so the MMAs cannot be hoisted out of the loop).
    bh, b, h, row, q_start, q_len = _program(tl.load(TILE_LIST + tl.program_id(0)), TILE_OFF, H, NUM_TILES)
    rows = tl.arange(0, 64)
    cols = tl.arange(0, D)
    q_mask = (rows < q_len)[:, None]
    q = tl.load(_rows(Q, b, h, sqb, sqh, sql, q_start, rows, cols), mask=q_mask, other=0.0)
    kt0 = tl.load(KEY_TILES + row * TOPK)
    k_start = tl.load(TILE_OFF + kt0)
    k_valid = rows < tl.load(TILE_OFF + kt0 + 1) - k_start
    k0 = tl.load(_rows(K, b, h, skb, skh, skl, k_start, rows, cols), mask=k_valid[:, None], other=0.0)
    v0 = tl.load(_rows(V, b, h, svb, svh, svl, k_start, rows, cols), mask=k_valid[:, None], other=0.0)
    m_i = tl.full([64], float("-inf"), tl.float32)
    l_i = tl.full([64], 0.0, tl.float32)
    acc = tl.full([64, D], 0.0, tl.float32)
    for j in range(TOPK):
        one = tl.load(ONES + j).to(k0.dtype)
        kT = tl.trans(k0 * one)
        v = v0 * one
        s = tl.dot(q, kT) * qk_scale
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        p_ij = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p_ij, 1, _ADD)
        acc = acc * alpha[:, None] + tl.dot(p_ij.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(_rows(O, b, h, sob, soh, sol, q_start, rows, cols), out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_fused(Q, K, V, DO, DK, DV, DQ32, LSE, DELTA, QUERY_ENTRIES, QUERY_OFF, TILE_OFF, TILE_LIST,
               sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
               H, NUM_TILES, L, qk_scale, sm_scale, BLOCK_N: tl.constexpr, D: tl.constexpr,
               ENTRY_SIZE_BITS: tl.constexpr, BULK_ADD: tl.constexpr):
    # The dk/dv kernel plus each pair's dq contribution, dS·K, added into an fp32 [B*h, L, D] buffer
    # (bulk tensor reduce-add, or per-element atomics): one pass over the pairs instead of two.
    bh, b, h, row, k_start, k_len = _program(tl.load(TILE_LIST + tl.program_id(0)), TILE_OFF, H, NUM_TILES)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    k_valid = rows < k_len
    k = tl.load(_rows(K, b, h, skb, skh, skl, k_start, rows, cols), mask=k_valid[:, None], other=0.0)
    v = tl.load(_rows(V, b, h, svb, svh, svl, k_start, rows, cols), mask=k_valid[:, None], other=0.0)
    q_source = _tile_source(Q, b, h, sqb, sqh, sql, L, D, 64, True)
    do_source = _tile_source(DO, b, h, sdob, sdoh, sdol, L, D, 64, True)
    dq_base = DQ32 + bh * L * D
    if BULK_ADD:
        dq_desc = tl.make_tensor_descriptor(dq_base, shape=[L, D], strides=[D, 1], block_shape=[64, D])
    query_rows = tl.arange(0, 64)
    dk = tl.full([BLOCK_N, D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, D], 0.0, tl.float32)
    for e in range(tl.load(QUERY_OFF + row), tl.load(QUERY_OFF + row + 1)):
        entry = tl.load(QUERY_ENTRIES + e)
        q_start, q_len = _tile_entry(entry, ENTRY_SIZE_BITS)
        q_valid = query_rows < q_len
        q = _load_tile(q_source, sql, q_start, q_valid, True, D, 64)
        do = _load_tile(do_source, sdol, q_start, q_valid, True, D, 64)
        lse = tl.load(LSE + bh * L + q_start + query_rows, mask=q_valid, other=0.0)
        delta = tl.load(DELTA + bh * L + q_start + query_rows, mask=q_valid, other=0.0)
        sT = tl.dot(k, tl.trans(q))
        pT = tl.where(q_valid[None, :], tl.math.exp2(sT * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk)
        dq_part = tl.dot(tl.trans(dsT), k) * sm_scale  # [64 queries, D]; rows past the query tile are 0
        if BULK_ADD:
            dq_desc.atomic_add([q_start, 0], dq_part)
        else:
            tl.atomic_add(dq_base + (q_start + query_rows)[:, None] * D + cols[None, :], dq_part,
                          mask=q_valid[:, None], sem="relaxed")
    dk *= sm_scale
    tl.store(_rows(DK, b, h, sdkb, sdkh, sdkl, k_start, rows, cols), dk.to(DK.dtype.element_ty), mask=k_valid[:, None])
    tl.store(_rows(DV, b, h, sdvb, sdvh, sdvl, k_start, rows, cols), dv.to(DV.dtype.element_ty), mask=k_valid[:, None])


def kernel_profile(q, k, v, gate, grad_out, layout, topk, calls=10):
    """GPU kernels of the production forward and forward+backward: {pass: {kernel: mean us per call}}."""
    from torch.profiler import ProfilerActivity, profile

    from fastwan.kernels.vsa import video_sparse_attention_tiled

    inputs = [t.detach().requires_grad_() for t in (q, k, v, gate)]

    def forward():
        return video_sparse_attention_tiled(*inputs[:3], layout, topk, gate=inputs[3])

    result = {}
    for name, fn in (("fwd", forward), ("fwd_bwd", backward_of(forward, grad_out, inputs))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        rows = {}
        for event in prof.key_averages():
            us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if us > 0:
                rows[event.key[:90]] = round(us / calls, 1)
        result[name] = dict(sorted(rows.items(), key=lambda item: -item[1]))
        result[name + "_total_us"] = round(sum(rows.values()), 1)
    return result


def kernel_timeline(q, k, v, gate, grad_out, layout, topk):
    """One production forward+backward as the GPU ran it: each kernel's start and duration (us from the
    first kernel's start) and stream, and the time in which no kernel ran on any stream (where the
    critical path waits for the host or for small launches)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from fastwan.kernels.vsa import video_sparse_attention_tiled

    inputs = [t.detach().requires_grad_() for t in (q, k, v, gate)]
    call = backward_of(lambda: video_sparse_attention_tiled(*inputs[:3], layout, topk, gate=inputs[3]),
                       grad_out, inputs)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        with open(trace.name) as exported:
            events = json.load(exported)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    start = kernels[0]["ts"]
    rows, idle, busy_until = [], 0.0, start
    for e in kernels:
        idle += max(0.0, e["ts"] - busy_until)
        busy_until = max(busy_until, e["ts"] + e["dur"])
        rows.append([e["name"][:48], e.get("args", {}).get("stream"), round(e["ts"] - start, 1), round(e["dur"], 1)])
    return {"kernels": rows, "span_us": round(busy_until - start, 1), "idle_us": round(idle, 1)}


def launch_variants(groups, kernels, smoke):
    """Each (kernel, size group) launch alone: the current settings, then every launch under other
    launch configurations, and dk/dv's 64-row launch with whole-tile query blocks. Each variant
    writes fresh zeroed buffers that must match the current launch's (max relative difference
    reported); times in ms."""
    result = {}
    configs = ((1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (4, 1), (4, 2), (4, 3)) if not smoke else ((1, 2),)
    for kernel, (fn, names, like) in kernels.items():
        for rows, _, _ in groups:
            sweep = ((4, 2), (4, 3), (8, 2), (8, 3)) if rows == 64 else configs
            variants = [("current", {})]
            variants += [(f"w{w}_s{st}", {} if smoke else dict(num_warps=w, num_stages=st)) for w, st in sweep]
            if kernel == "bwd_dkdv" and rows == 64:
                variants.append(("whole_query_tiles", {"HAS_PARTIAL_QUERIES": False}))
            elif kernel == "bwd_dkdv":
                variants += [(f"key_major_w{w}_s{st}", {"QUERY_MAJOR": False, **({} if smoke else dict(
                    num_warps=w, num_stages=st))}) for w, st in ((2, 2), (4, 2))]
            expected = None
            for label, launch in variants:
                buffers = {name: torch.zeros_like(like) for name in names}
                key = f"{kernel}_{rows}rows_{label}"
                try:
                    fn(rows, launch, **buffers)
                    if expected is None:
                        expected = buffers
                    result[key + "_rel_diff"] = max(
                        ((buffers[name].float() - expected[name].float()).norm() / expected[name].float().norm()).item()
                        for name in names)
                    result[key + "_ms"] = bench_ms(lambda: fn(rows, launch, **buffers), smoke)
                except Exception as exc:  # e.g. out of shared memory: report it and go on
                    result[key + "_ms"] = repr(exc)[:200]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of taking turns (median reported)")
    parser.add_argument("--profile", action="store_true",
                        help="also list the GPU kernels of the production forward and forward+backward, and "
                             "one forward+backward's kernel timeline")
    parser.add_argument("--launch-variants", nargs="?", const="all", default=None, metavar="KERNELS",
                        help="also time each size group's launch alone under other launch configurations "
                             "(and dk/dv's without partial query blocks), checking each against the current one; "
                             "optionally only some kernels: fwd,bwd_dq,bwd_dkdv")
    args = parser.parse_args()
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float16 if smoke else torch.bfloat16
    grid, heads, D = ((3, 6, 9), 2, 64) if smoke else ((21, 30, 52), 12, 128)
    torch.manual_seed(0)
    layout = TileLayout.for_grid(grid, device)
    n, L, B = layout.num_tiles, layout.num_tokens, 1
    topk = topk_for_sparsity(n, 0.8)
    q, k, v, gate, grad_out = (torch.randn(B, L, heads, D, dtype=dtype, device=device).transpose(1, 2)
                               for _ in range(5))
    groups = vsa_ops._groups(vsa_ops._flat_groups(layout))
    offsets, by_block = layout.tile_offsets, layout.tiles_by_block
    S = vsa_ops._strides
    K = tv.kernels()
    if not smoke:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    with torch.no_grad():
        out, lse, key_tiles, key_entries, key_counts, means, probs, coarse = vsa_ops._triton_forward(
            q, k, v, gate, offsets, by_block, vsa_ops._flat_groups(layout), topk)
    qk_scale = math.log2(math.e) / math.sqrt(D)

    def config(kernel, rows=64):
        return {} if smoke else vsa_ops._launch_config(kernel, D, device, rows)

    def settings(kernel, rows, launch):
        # The production launch of one group (constexprs and configuration), with `launch` overriding any of it.
        flags = dict(USE_TMA=vsa_ops.USE_TMA[kernel], ENTRY_SIZE_BITS=vsa_ops._ENTRY_SIZE_BITS, D=D,
                     **vsa_ops._list_flags(kernel, rows, groups))
        return {**flags, **config(kernel, rows), **(launch or {})}

    def fwd_fine(only_rows=None, launch=None, out=out):
        for rows, first, count in groups:
            if only_rows is None or rows == only_rows:
                K["fwd"][(count, B * heads)](
                    q, k, v, gate, coarse, out, lse, key_entries, key_counts, offsets, by_block[first:],
                    *S(q), *S(k), *S(v), *S(gate), *S(out), heads, n, topk, L, qk_scale,
                    HAS_GATE=True, BLOCK_M=rows, **settings("fwd", rows, launch))

    sink = torch.empty(B * heads * n, dtype=torch.float32, device=device)

    def loads_only(use_tma):
        def run():
            _loads_only[(n, B * heads)](k, v, sink, key_tiles, offsets, by_block, *S(k), *S(v), heads, n, topk, L,
                                        D=D, USE_TMA=use_tma, **config("fwd"))
        return run

    def loads_only_sorted():
        _loads_only_sorted[(n, B * heads)](k, v, sink, key_entries, key_counts, offsets, by_block, *S(k), *S(v),
                                           heads, n, topk, L, D=D, ENTRY_SIZE_BITS=vsa_ops._ENTRY_SIZE_BITS,
                                           USE_TMA=vsa_ops.USE_TMA["fwd"] and not smoke,
                                           HAS_PARTIAL_KEYS=vsa_ops._list_flags("fwd", 64, groups)["HAS_PARTIAL_KEYS"],
                                           **config("fwd"))

    ones = torch.ones(topk, dtype=torch.float32, device=device)
    out_c = torch.empty_like(out)

    def compute_only():
        _compute_only[(n, B * heads)](q, k, v, out_c, key_tiles, offsets, by_block, ones,
                                      *S(q), *S(k), *S(v), *S(out_c), heads, n, topk, qk_scale, D=D,
                                      **({} if smoke else dict(num_warps=4, num_stages=2)))

    # The backward's kernels on the inputs _triton_backward gives them (coarse gradients zero).
    delta = torch.empty(B, heads, L, dtype=torch.float32, device=device)
    d_gate = torch.empty_like(out)
    d_coarse = torch.empty(B, heads, n, D, dtype=torch.float32, device=device)
    dq, dk, dv = (torch.empty_like(out) for _ in range(3))
    zeros = torch.zeros(B, heads, n, D, dtype=torch.float32, device=device)
    query_entries, query_offsets, query_counts = vsa_ops._transposed_query_lists(key_tiles, offsets)

    def bwd_preprocess():
        K["bwd_preprocess"][(n, B * heads)](out, grad_out, gate, coarse, delta, d_gate, d_coarse, offsets,
                                            *S(out), *S(grad_out), *S(gate), *S(d_gate), heads, n, L,
                                            HAS_GATE=True, BLOCK=64, D=D)

    def bwd_dq(only_rows=None, launch=None, dq=dq):
        for rows, first, count in groups:
            if only_rows is None or rows == only_rows:
                K["bwd_dq"][(count, B * heads)](
                    q, k, v, grad_out, dq, lse, delta, key_entries, key_counts, offsets, by_block[first:], zeros,
                    *S(q), *S(k), *S(v), *S(grad_out), *S(dq), heads, n, topk, L, qk_scale, 1 / math.sqrt(D),
                    HAS_COARSE=True, BLOCK_M=rows, **settings("bwd_dq", rows, launch))

    def bwd_dkdv(only_rows=None, launch=None, dk=dk, dv=dv):
        for rows, first, count in groups:
            if only_rows is None or rows == only_rows:
                K["bwd_dkdv"][(count, B * heads)](
                    q, k, v, grad_out, dk, dv, lse, delta, query_entries, query_offsets, query_counts, offsets,
                    by_block[first:], zeros, zeros, *S(q), *S(k), *S(v), *S(grad_out), *S(dk), *S(dv), heads, n, L,
                    qk_scale, 1 / math.sqrt(D), HAS_COARSE=True, BLOCK_N=rows, **settings("bwd_dkdv", rows, launch))

    dq32 = torch.zeros(B * heads, L, D, dtype=torch.float32, device=device)
    dq_f, dk_f, dv_f = (torch.empty_like(out) for _ in range(3))

    def bwd_fused(bulk_add):
        # Zeroing the fp32 dq buffer and rounding it to bf16 are part of the cost.
        def run():
            dq32.zero_()
            for rows, first, count in groups:
                _bwd_fused[(count, B * heads)](q, k, v, grad_out, dk_f, dv_f, dq32, lse, delta, query_entries,
                                               query_offsets, offsets, by_block[first:], *S(q), *S(k), *S(v),
                                               *S(grad_out), *S(dk_f), *S(dv_f), heads, n, L, qk_scale,
                                               1 / math.sqrt(D), BLOCK_N=rows, D=D,
                                               ENTRY_SIZE_BITS=vsa_ops._ENTRY_SIZE_BITS, BULK_ADD=bulk_add,
                                               **config("bwd_dkdv"))
            dq_f.copy_(dq32.view(B, heads, L, D))
        return run

    variants = {"fwd_fine": fwd_fine, "loads_only_tma": loads_only(True), "loads_only_masked": loads_only(False),
                "loads_only_production_blocks": loads_only_sorted,
                "compute_only": compute_only, "bwd_preprocess": bwd_preprocess, "bwd_dq": bwd_dq,
                "bwd_dkdv": bwd_dkdv,
                # Key tiles of <= 16 tokens two per step, as before ops.SMALL_KEY_TILES_PER_STEP = 4.
                "fwd_fine_small_keys_two_per_step": lambda: fwd_fine(launch={"SMALL_KEYS_PER_STEP": 2})}
    if smoke:  # Triton's interpreter has no bulk reduce-add
        variants["bwd_fused_atomic_add"] = bwd_fused(False)
    elif vsa_ops._hopper_or_newer(device):  # bulk tensor copies: Hopper and newer
        variants.update({"bwd_fused_bulk_add": bwd_fused(True), "bwd_fused_atomic_add": bwd_fused(False)})
    report = {"device": torch.cuda.get_device_name() if not smoke else "cpu (smoke)", "grid": list(grid),
              "heads": heads, "head_dim": D, "topk": topk, "tiles": n,
              "use_tma": dict(vsa_ops.USE_TMA), "launch_config": {f"{a}/{b}": c for (a, b), c in
                                                                  vsa_ops.LAUNCH_CONFIG.items() if b == D}}
    for fn in variants.values():
        fn()
    for name in ("bwd_fused_bulk_add", "bwd_fused_atomic_add"):
        if name in variants:
            variants[name]()
            for label, a, b in (("dq", dq_f, dq), ("dk", dk_f, dk), ("dv", dv_f, dv)):
                report[f"{name}_{label}_rel_err"] = ((a.float() - b.float()).norm() / b.float().norm()).item()
    if args.profile and not smoke:
        report["profile"] = kernel_profile(q, k, v, gate, grad_out, layout, topk)
        report["timeline"] = kernel_timeline(q, k, v, gate, grad_out, layout, topk)
    if args.launch_variants:
        launches = {"fwd": (fwd_fine, ("out",), out), "bwd_dq": (bwd_dq, ("dq",), dq),
                    "bwd_dkdv": (bwd_dkdv, ("dk", "dv"), dk)}
        chosen = args.launch_variants.split(",") if args.launch_variants != "all" else list(launches)
        report.update(launch_variants(groups, {name: launches[name] for name in chosen}, smoke))
    times = {name: [] for name in variants}
    for _ in range(1 if smoke else args.rounds):  # taking turns: each round times every variant once
        for name, fn in variants.items():
            times[name].append(bench_ms(fn, smoke))
    for name, values in times.items():
        report[f"{name}_ms"] = sorted(values)[len(values) // 2]
    # Traffic: every (query tile, key tile) pair streams one 64-row K and V tile (bulk copies), or
    # only the tile's valid rows (masked loads).
    sizes = layout.tile_sizes.to(device).long()
    pairs = key_tiles.numel()
    item = q.element_size()
    tma_bytes = pairs * 2 * 64 * D * item
    valid_bytes = int(sizes[key_tiles.long()].sum()) * 2 * D * item
    report["pairs"] = pairs
    report["kv_bytes_tma_gb"] = tma_bytes / 1e9
    report["kv_bytes_valid_rows_gb"] = valid_bytes / 1e9
    for name in ("fwd_fine", "loads_only_tma"):
        report[f"{name}_l2_tb_per_s"] = tma_bytes / report[f"{name}_ms"] / 1e9
    report["loads_only_masked_l2_tb_per_s"] = valid_bytes / report["loads_only_masked_ms"] / 1e9
    # The production forward's blocks: 64 rows for tiles of more than 32 tokens, else 32 or 16.
    production_bytes = int(block_rows(sizes)[key_tiles.long()].sum()) * 2 * D * item
    report["kv_bytes_production_blocks_gb"] = production_bytes / 1e9
    report["loads_only_production_blocks_l2_tb_per_s"] = (
        production_bytes / report["loads_only_production_blocks_ms"] / 1e9)
    block_flops = 4 * D * pairs * 64 * 64
    kept_flops = 4 * D * float((sizes[key_tiles.long()].sum(-1) * sizes.view(1, 1, -1)).sum())
    report["kept_over_block_flops"] = kept_flops / block_flops
    for name in ("fwd_fine", "compute_only"):
        report[f"{name}_tflops_blocks"] = block_flops / report[f"{name}_ms"] / 1e9
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
