"""VSA layout and PyTorch reference against independent oracles (CPU, tiny shapes).

Oracle: float64 dense attention over token order with an explicit token-level boolean mask built
from the top-k tiles of an independently computed coarse score (one-hot pooling matrix).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastwan.fastwan_core.errors import InputError
from fastwan.kernels.vsa import (
    TileLayout,
    from_tile_order,
    to_tile_order,
    topk_for_sparsity,
    video_sparse_attention,
    video_sparse_attention_tiled,
)
from vsa_checks import check_compile_traces_as_one_op, rel_err

AWKWARD_GRIDS = [
    (1, 1, 1),  # a single token
    (4, 4, 4),  # a single full tile
    (1, 8, 8),  # one frame
    (3, 5, 7),
    (7, 6, 5),
    (5, 1, 6),
    (6, 7, 3),
]


def tile_ids_token_order(grid):
    """Tile index of every token in (t, h, w) order, from coordinates (independent of layout.py)."""
    T, H, W = grid
    nh, nw = math.ceil(H / 4), math.ceil(W / 4)
    ids = [((t // 4) * nh + h // 4) * nw + w // 4 for t in range(T) for h in range(H) for w in range(W)]
    return torch.tensor(ids)


def oracle(q, k, v, gate, grid, topk):
    """Dense float64 VSA in token order with an explicit token mask. Returns (out, selected [B,h,n,n] bool)."""
    q, k, v = (t.double() for t in (q, k, v))
    tid = tile_ids_token_order(grid)
    n = int(tid.max()) + 1
    onehot = torch.nn.functional.one_hot(tid, n).double().T  # [n, L]
    pool = onehot / onehot.sum(1, keepdim=True)
    qm, km, vm = pool @ q, pool @ k, pool @ v  # [B, h, n, D]
    D = q.shape[-1]
    scores = qm @ km.transpose(-1, -2) / math.sqrt(D)
    chosen = scores.detach().topk(topk, dim=-1).indices
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)  # [B, h, n, n]
    token_mask = selected[:, :, tid][:, :, :, tid]  # [B, h, L, L]
    logits = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~token_mask, float("-inf"))
    out = torch.softmax(logits, -1) @ v
    if gate is not None:
        out = out + (torch.softmax(scores, -1) @ vm)[:, :, tid] * gate.double()
    return out, selected


def fresh_inputs(B, heads, L, D, dtype=torch.float32, gate=True):
    tensors = [torch.randn(B, heads, L, D, dtype=dtype) for _ in range(4 if gate else 3)]
    return [t.requires_grad_(True) for t in tensors]


def test_topk_for_sparsity():
    assert topk_for_sparsity(624, 0.8) == 125  # 480p: 124.8 -> 125
    assert topk_for_sparsity(624, 0.9) == 63
    assert topk_for_sparsity(455, 0.8) == 91  # training shape, exactly 91
    assert topk_for_sparsity(10, 0.0) == 10
    assert topk_for_sparsity(3, 0.99) == 1  # clamp to at least one tile
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(InputError, match=r"sparsity must be in \[0, 1\).*0.8"):
            topk_for_sparsity(10, bad)


@pytest.mark.parametrize("grid", AWKWARD_GRIDS + [(8, 8, 8), (9, 2, 13)])
def test_layout_matches_independent_construction(grid):
    T, H, W = grid
    layout = TileLayout.for_grid(grid)
    # Independent: walk tiles in (t, h, w) order, and tokens inside each tile in (t, h, w) order.
    perm, sizes = [], []
    for t0 in range(0, T, 4):
        for h0 in range(0, H, 4):
            for w0 in range(0, W, 4):
                tokens = [
                    (t * H + h) * W + w
                    for t in range(t0, min(t0 + 4, T))
                    for h in range(h0, min(h0 + 4, H))
                    for w in range(w0, min(w0 + 4, W))
                ]
                perm += tokens
                sizes.append(len(tokens))
    assert layout.num_tiles == len(sizes) == math.ceil(T / 4) * math.ceil(H / 4) * math.ceil(W / 4)
    assert layout.perm.tolist() == perm
    assert layout.tile_sizes.tolist() == sizes and layout.tile_sizes.dtype == torch.int32
    assert layout.tile_offsets.tolist() == [0] + torch.tensor(sizes).cumsum(0).tolist()
    assert layout.tile_offsets.dtype == torch.int32
    # Size groups for the kernels: every tile once, in the smallest of 64/32/16 rows that holds it.
    groups = [(rows, [i for i, s in enumerate(sizes) if min(r for r in (16, 32, 64) if r >= s) == rows])
              for rows in (64, 32, 16)]
    groups = [(rows, tiles) for rows, tiles in groups if tiles]
    assert layout.block_groups == tuple((rows, len(tiles)) for rows, tiles in groups)
    assert layout.tiles_by_block.tolist() == [i for _, tiles in groups for i in tiles]
    x = torch.randn(2, 3, T * H * W, 5)
    tiled = to_tile_order(x, layout)
    assert torch.equal(tiled, x[:, :, perm])
    assert torch.equal(from_tile_order(tiled, layout), x)
    assert torch.equal(from_tile_order(to_tile_order(x, layout, dim=2), layout, dim=2), x)
    assert TileLayout.for_grid(list(grid)) is layout  # cached per grid and device


def test_layout_rejects_bad_grid_and_length():
    with pytest.raises(InputError, match=r"grid must be three positive.*\(21, 30, 52\)"):
        TileLayout.for_grid((0, 4, 4))
    with pytest.raises(InputError, match="grid must be three"):
        TileLayout.for_grid((4, 4))
    layout = TileLayout.for_grid((2, 3, 4))
    with pytest.raises(InputError, match=r"has 23 tokens on dim -2.*grid \(2, 3, 4\) has 24"):
        to_tile_order(torch.randn(1, 1, 23, 4), layout)


@pytest.mark.parametrize("grid", AWKWARD_GRIDS)
def test_reference_matches_masked_dense_oracle(grid):
    torch.manual_seed(hash(grid) % 1000)
    L = grid[0] * grid[1] * grid[2]
    n = TileLayout.for_grid(grid).num_tiles
    topk = max(1, n // 2)
    q, k, v, gate = fresh_inputs(2, 3, L, 16)
    out = video_sparse_attention(q, k, v, grid, topk, gate=gate, implementation="reference")
    expected, _ = oracle(q, k, v, gate, grid, topk)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, expected) < 1e-5
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, gate), grad_out)
    want = torch.autograd.grad(expected, (q, k, v, gate), grad_out.double())
    for name, g, w in zip("q k v gate".split(), got, want):
        assert rel_err(g, w) < 1e-5, name


def test_selection_differs_per_batch_and_head():
    # Batch 2 x 2 heads with different selections each: the reference must follow every one of them.
    grid = (4, 8, 12)  # 6 full tiles
    torch.manual_seed(1)
    q, k, v, gate = fresh_inputs(2, 2, 384, 8)
    _, selected = oracle(q, k, v, gate, grid, 2)
    rows = selected.flatten(2)
    assert len({tuple(r.tolist()) for r in rows.reshape(4, -1)}) == 4, "test inputs should select differently"
    out = video_sparse_attention(q, k, v, grid, 2, gate=gate, implementation="reference")
    expected, _ = oracle(q, k, v, gate, grid, 2)
    assert rel_err(out, expected) < 1e-5


def test_sparsity_zero_is_dense_attention_plus_gated_coarse():
    grid = (3, 5, 6)
    layout = TileLayout.for_grid(grid)
    torch.manual_seed(2)
    q, k, v, gate = fresh_inputs(1, 2, 90, 16)
    topk = topk_for_sparsity(layout.num_tiles, 0.0)
    assert topk == layout.num_tiles
    out = video_sparse_attention(q, k, v, grid, topk, gate=gate, implementation="reference")
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    # Coarse term from the closed form: tile means by explicit loops over tokens.
    tid = tile_ids_token_order(grid)
    means = [torch.stack([x[:, :, tid == i].mean(2) for i in range(layout.num_tiles)], 2) for x in (q, k, v)]
    coarse = torch.softmax(means[0] @ means[1].transpose(-1, -2) / 4.0, -1) @ means[2]
    assert rel_err(out, dense + coarse[:, :, tid] * gate) < 1e-5


def test_zero_gate_leaves_only_the_fine_branch():
    grid = (5, 4, 4)
    torch.manual_seed(3)
    q, k, v = fresh_inputs(1, 2, 80, 16, gate=False)
    gate = torch.zeros_like(q, requires_grad=True)
    with_gate = video_sparse_attention(q, k, v, grid, 1, gate=gate, implementation="reference")
    without = video_sparse_attention(q, k, v, grid, 1, implementation="reference")
    expected, _ = oracle(q, k, v, None, grid, 1)
    assert torch.allclose(with_gate, without, atol=1e-6)
    assert rel_err(without, expected) < 1e-5
    # The zero gate still gets a gradient: d out / d gate = coarse output, which is not zero.
    (d_gate,) = torch.autograd.grad(with_gate.sum(), gate)
    assert d_gate.abs().min() > 0


def test_tiled_output_views_back_as_projection_layout():
    grid = (2, 4, 4)
    layout = TileLayout.for_grid(grid)
    qkv = torch.randn(1, 32, 3, 2, 8)  # [B, L, (q k v), heads, D]: q/k/v are strided views
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = video_sparse_attention_tiled(q, k, v, layout, 1, implementation="reference")
    assert out.transpose(1, 2).is_contiguous()  # [B, L, heads, D] memory: .view(B, L, heads*D) is free


def test_user_errors_name_the_problem():
    grid = (2, 4, 8)
    layout = TileLayout.for_grid(grid)
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(InputError, match=r"implementation must be one of.*'fast'.*'auto'"):
        video_sparse_attention_tiled(q, q, q, layout, 1, implementation="fast")
    with pytest.raises(InputError, match=r"topk must be an int in \[1, 2\].*got 3.*topk_for_sparsity"):
        video_sparse_attention_tiled(q, q, q, layout, 3)
    with pytest.raises(InputError, match=r"q has 63 tokens but the grid \(2, 4, 8\) has 64"):
        video_sparse_attention_tiled(q[:, :, :63], q[:, :, :63], q[:, :, :63], layout, 1)
    with pytest.raises(InputError, match=r"k is \(1, 2, 64, 4\)"):
        video_sparse_attention_tiled(q, q[..., :4], q, layout, 1)
    with pytest.raises(InputError, match=r"gate is torch.float16.*cast"):
        video_sparse_attention_tiled(q, q, q, layout, 1, gate=q.half())
    with pytest.raises(InputError, match=r"\[B, heads, L, D\]"):
        video_sparse_attention_tiled(q[0], q[0], q[0], layout, 1)


def test_reference_custom_op_passes_opcheck():
    # Schema, fake tensor, autograd registration and AOT dispatch of the registered op.
    layout = TileLayout.for_grid((3, 5, 4))
    q, k, v, gate = (torch.randn(1, 2, 60, 8, requires_grad=True) for _ in range(4))
    torch.library.opcheck(torch.ops.fastwan.vsa_reference.default, (q, k, v, gate, layout.tile_offsets, 2))
    torch.library.opcheck(torch.ops.fastwan.vsa_reference.default, (q, k, v, None, layout.tile_offsets, 1))


def test_torch_compile_traces_the_op_without_graph_breaks():
    check_compile_traces_as_one_op("reference", 16)