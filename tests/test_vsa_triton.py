"""VSA Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1) against the PyTorch reference.

Tiny shapes; the interpreter runs every program in numpy. tests/conftest.py turns the interpreter on
without a CUDA GPU; with one, these skip (test_vsa_gpu.py runs the compiled kernels). Note: Triton 3.9's interpreter computes
bf16 ``tl.dot`` wrongly on CPU (garbage values even for a plain 16x16 product), so bf16 runs on the
GPU only (bench/vsa_attention.py checks it); here fp32 (exact dots) and fp16 cover the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastwan.fastwan_core.errors import InputError  # noqa: E402
from fastwan.kernels.vsa import (  # noqa: E402
    TileLayout,
    video_sparse_attention,
    video_sparse_attention_tiled,
)
from fastwan.kernels.vsa import ops as vsa_ops  # noqa: E402
from fastwan.kernels.vsa import triton_vsa  # noqa: E402
from fastwan.kernels.vsa.launches import ATTENTION_LAUNCHES, Device  # noqa: E402
from vsa_checks import check_compile_traces_as_one_op, check_triton_against_reference, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_vsa.INTERPRETED, reason="runs the kernels in Triton's CPU interpreter")
INTERPRETER = Device(interpreted=True, tensor_descriptors=True, large_shared_memory=True)


@pytest.mark.parametrize(
    "grid, topk, with_gate",
    [
        ((3, 5, 7), 2, True),  # partial tiles in every axis
        ((7, 6, 5), 3, False),  # no coarse term
        ((1, 8, 8), 4, True),  # one frame, sparsity 0 (all 4 tiles)
        ((4, 4, 4), 1, True),  # a single full tile
        ((5, 1, 6), 1, True),  # H = 1
        ((6, 7, 3), 3, True),
    ],
)
@pytest.mark.parametrize("aligned", [False, True])
def test_triton_fp32_matches_reference(grid, topk, with_gate, aligned):
    # Aligned projections take tensor-descriptor (TMA) loads, which read whole 64-row blocks past
    # partial tiles (and past the sequence end, zero-filled) and rely on masking the scores;
    # misaligned views take masked pointer loads (as every view does on GPUs without TMA).
    torch.manual_seed(sum(grid) + topk)
    check_triton_against_reference(grid, 64, torch.float32, topk, with_gate, tol=1e-5, aligned=aligned)


@pytest.mark.parametrize("topk, aligned", [(27, False), (13, True), (6, False), (21, True)])
def test_triton_packs_partial_key_tiles(topk, aligned):
    # Grid 9x10x11 has tiles of 64, 48 | 32, 24 | 16, 12, 8 and 6 tokens, so the forward's three
    # loops (one tile per step, two of 17..32 tokens, four of up to 16) all run, with odd tails.
    torch.manual_seed(topk)
    check_triton_against_reference((9, 10, 11), 64, torch.float32, topk, True, B=1, heads=2, tol=1e-5,
                                   aligned=aligned)


@pytest.mark.parametrize("D", [64, 128])
def test_triton_fp16_matches_reference(D):
    # Also the tensor-descriptor (TMA) loads, which read whole 64-row blocks past partial tiles.
    torch.manual_seed(D)
    check_triton_against_reference((5, 6, 7) if D == 64 else (3, 5, 6), D, torch.float16, 3, True, B=1, tol=3e-3)


def test_triton_token_order_api_matches_reference():
    torch.manual_seed(5)
    grid = (3, 6, 5)
    q, k, v, gate = (torch.randn(2, 2, 90, 64) for _ in range(4))
    out = video_sparse_attention(q, k, v, grid, 2, gate=gate, implementation="triton")
    expected = video_sparse_attention(q, k, v, grid, 2, gate=gate, implementation="reference")
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("n, topk", [(7, 3), (16, 16), (20, 1), (33, 12), (40, 36), (624, 125)])
def test_triton_selection_is_exact_topk_with_size_sorted_lists(n, topk):
    # The selection kernel writes each row's top-k tile indices directly, ascending (ties go to the
    # lowest index), and the same tiles as packed entries grouped whole tiles / 17..32 tokens / up to 16
    # (ascending within a group) with the first two counts. A row's lanes come in two blocks (40 tiles:
    # 32 + 16, 624: 512 + 128), padded at the end; tile sizes are random, so every group and order occurs.
    rows = 10
    sizes = torch.randint(1, 65, (n,))
    offsets = torch.zeros(n + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(sizes, 0)
    scores = torch.randn(rows, n)
    scores[0, : min(n, 4)] = 3.0  # a tie at the top
    scores[1] = -scores[1].abs()  # all negative
    scores[2] = 0.5  # all tied: the lowest indices win, across both lane blocks when topk needs them
    scores[3, n // 2:] = scores[3].max() + 1.0  # ties at the top that straddle the blocks (40: lanes 20..39)
    key_tiles, entries, counts = vsa_ops._select_key_tiles(scores, offsets, topk, INTERPRETER)
    bits = vsa_ops._ENTRY_SIZE_BITS
    for r in range(rows):
        values = scores[r]
        kth = values.sort(descending=True).values[topk - 1]
        want = [i for i in range(n) if values[i] > kth]
        want += [i for i in range(n) if values[i] == kth][: topk - len(want)]
        assert key_tiles[r].tolist() == sorted(want)
        groups = [[t for t in sorted(want) if lo < sizes[t] <= hi] for lo, hi in ((32, 64), (16, 32), (0, 16))]
        packed = [(offsets[t].item() << bits) | sizes[t].item() for group in groups for t in group]
        assert entries[r].tolist() == packed
        assert counts[r].tolist() == [len(groups[0]), len(groups[1])]


def test_transposed_query_lists_match_brute_force():
    # Each key tile's list: the query tiles that selected it, whole tiles first, then those of
    # 17..32 tokens, then up to 16 (ascending within each), with the first two counts.
    layout = TileLayout.for_grid((5, 6, 7))  # tiles of 64, 48 | 32, 24 | 16, 12 tokens...
    sizes = layout.tile_sizes.tolist()
    starts = layout.tile_offsets.tolist()
    torch.manual_seed(6)
    B, heads, n, topk = 2, 3, layout.num_tiles, 5
    key_tiles = torch.stack([torch.randperm(n)[:topk] for _ in range(B * heads * n)]).view(B, heads, n, topk)
    key_tiles = key_tiles.sort(-1).values.to(torch.int32)
    entries, offsets, counts = vsa_ops._transposed_query_lists(key_tiles, layout.tile_offsets)
    flat = key_tiles.view(B * heads, n, topk)
    bits = vsa_ops._ENTRY_SIZE_BITS
    for bh in range(B * heads):
        for kt in range(n):
            lo, hi = offsets[bh * n + kt].item(), offsets[bh * n + kt + 1].item()
            selected_by = [qt for qt in range(n) if kt in flat[bh, qt].tolist()]
            whole = [qt for qt in selected_by if sizes[qt] > 32]
            half = [qt for qt in selected_by if 16 < sizes[qt] <= 32]
            small = [qt for qt in selected_by if sizes[qt] <= 16]
            got = [(e >> bits, e & ((1 << bits) - 1)) for e in entries[lo:hi].tolist()]
            assert got == [(starts[qt], sizes[qt]) for qt in whole + half + small]
            assert counts[bh * n + kt].tolist() == [len(whole), len(half)]


def test_packed_tile_entries_hold_each_tiles_first_token_and_size():
    layout = TileLayout.for_grid((5, 6, 7))  # partial tiles of every size class
    tiles = torch.randint(0, layout.num_tiles, (3, 11), dtype=torch.int32)
    entries = vsa_ops._pack_tile_entries(tiles, layout.tile_offsets)
    assert entries.dtype == torch.int32 and entries.shape == tiles.shape
    for entry, tile in zip(entries.flatten().tolist(), tiles.flatten().tolist()):
        tokens = torch.nonzero(layout.tile_of_token == tile).flatten()  # tile-ordered positions of the tile
        assert entry >> 7 == tokens.min().item() and entry & 127 == tokens.numel()


@pytest.mark.parametrize(
    "limit, value, grid, tokens, message",
    [
        # 32 tokens: one too many for the packed list entries
        ("MAX_TRITON_TOKENS", 32, (2, 4, 4), 32, r"fewer than 32 tokens.*32 tokens.*implementation='auto'"),
        # 2 tiles: one too many for the selection's 16-bit counters
        ("MAX_TRITON_TILES", 2, (2, 4, 8), 64, r"fewer than 2 tiles.*64 tokens and 2 tiles.*implementation='auto'"),
    ],
)
def test_triton_refuses_what_its_packed_fields_cannot_hold(limit, value, grid, tokens, message, monkeypatch):
    monkeypatch.setattr(vsa_ops, limit, value)
    layout = TileLayout.for_grid(grid)
    q = torch.randn(1, 1, tokens, 64)
    with pytest.raises(InputError, match=message):
        video_sparse_attention_tiled(q, q, q, layout, 1, implementation="triton")
    out = video_sparse_attention_tiled(q, q, q, layout, 1, implementation="auto")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("large_shared_memory", [True, False])
def test_dkdv_launches_are_always_pipelined(large_shared_memory):
    # Query-major dk/dv programs (the 16/32-row key tiles) computed wrong dk/dv at num_stages=1 with
    # Triton 3.6 on an H200: no configuration may launch them unpipelined, nor with fewer than the
    # 4 warps (one warpgroup) their 128-row MMAs are written for.
    gpu = Device(interpreted=False, tensor_descriptors=False, large_shared_memory=large_shared_memory)
    assert any(kernel == "bwd_dkdv" for kernel, _, _ in ATTENTION_LAUNCHES)
    for D in vsa_ops._TRITON_HEAD_DIMS:
        for rows in (64, 32, 16):
            config = gpu.attention_launch("bwd_dkdv", D, rows)
            assert config["num_stages"] >= 2 and config["num_warps"] >= 4, (D, rows, config)


def test_triton_custom_op_passes_opcheck():
    layout = TileLayout.for_grid((2, 4, 8))
    q, k, v, gate = (torch.randn(1, 1, 64, 16, requires_grad=True) for _ in range(4))
    torch.library.opcheck(
        torch.ops.fastwan.vsa_triton_fwd.default,
        (q, k, v, gate, layout.tile_offsets, layout.tiles_by_block, vsa_ops._flat_groups(layout), 1),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


_WITHOUT_INTERPRETER = """
import re, torch
from fastwan.fastwan_core.errors import InputError
from fastwan.kernels.vsa import TileLayout, video_sparse_attention_tiled
layout = TileLayout.for_grid((2, 4, 4))
q = torch.randn(1, 1, 32, 64)
try:
    video_sparse_attention_tiled(q, q, q, layout, 1, implementation="triton")
    raise SystemExit("no error")
except InputError as error:
    assert re.search(r"implementation='triton' needs.*CUDA tensors.*implementation='auto'", str(error)), error
# 'auto' quietly uses the reference on CPU.
assert torch.isfinite(video_sparse_attention_tiled(q, q, q, layout, 1, implementation="auto")).all()
"""


def test_triton_on_cpu_without_interpreter_is_refused():
    # Compiled kernels (TRITON_INTERPRET unset when triton is imported) cannot take CPU tensors; in a
    # child process, since this one runs the interpreter.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", _WITHOUT_INTERPRETER], capture_output=True, text=True, env=env,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]


def test_triton_op_under_torch_compile():
    check_compile_traces_as_one_op("triton", 64)
