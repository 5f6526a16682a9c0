"""Pure-PyTorch Video Sparse Attention: the specification the Triton kernels must match.

Runs on any device (CPU, MPS, CUDA without Triton) and is differentiable through ordinary
autograd. All inputs are in compact tile order (see ``layout.py``); all arithmetic is fp32.

    coarse: per-tile means of q, k, v -> dense softmax among tile means (scale 1/sqrt(D))
            -> each tile's result copied to its tokens
    select: top-k key tiles per (batch, head, query tile) on the coarse scores (no grad)
    fine:   each query tile attends only to the tokens of its k selected key tiles
    out   = coarse * gate + fine          (gate None: fine only)
"""

from __future__ import annotations

import math

import torch

# Query tiles processed together by the fine branch: bounds the gathered keys to
# chunk * topk * 64 * D floats per (batch, head).
_QUERY_TILES_PER_CHUNK = 32


def tile_means(x: torch.Tensor, tile_of_token: torch.Tensor, tile_sizes: torch.Tensor) -> torch.Tensor:
    """Mean of each tile's tokens: x [B, h, L, D] -> fp32 [B, h, n, D] (sum in fp32 / valid count)."""
    B, heads, _, D = x.shape
    n = tile_sizes.numel()
    sums = x.new_zeros(B, heads, n, D, dtype=torch.float32)
    sums = sums.index_add(2, tile_of_token, x.float())
    return sums / tile_sizes.to(sums.device, torch.float32).view(1, 1, n, 1)


def coarse_scores(q_means: torch.Tensor, k_means: torch.Tensor) -> torch.Tensor:
    """Tile-level attention logits [B, h, n, n] (fp32), scale 1/sqrt(D)."""
    return torch.matmul(q_means, k_means.transpose(-1, -2)) / math.sqrt(q_means.shape[-1])


def select_key_tiles(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the ``topk`` highest-scoring key tiles per query tile: int32 [B, h, n, topk], ascending."""
    indices = torch.topk(scores.detach(), topk, dim=-1, sorted=False).indices
    # Ascending order walks K/V memory forward, which is kinder to the caches; the set is what matters.
    return torch.sort(indices, dim=-1).values.to(torch.int32)


def padded_tiles(x: torch.Tensor, tile_offsets: torch.Tensor) -> torch.Tensor:
    """Scatter compact tile order [B, h, L, D] into [B, h, n, 64, D] blocks, empty slots zero."""
    B, heads, L, D = x.shape
    n = tile_offsets.numel() - 1
    offsets = tile_offsets.to(x.device, torch.int64)
    sizes = offsets[1:] - offsets[:-1]
    tile = torch.repeat_interleave(torch.arange(n, device=x.device), sizes, output_size=L)
    slot = torch.arange(L, device=x.device) - offsets[tile]
    blocks = x.new_zeros(B, heads, n * 64, D)
    blocks = blocks.index_copy(2, tile * 64 + slot, x)
    return blocks.view(B, heads, n, 64, D)


def fine_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_offsets: torch.Tensor, key_tiles: torch.Tensor
) -> torch.Tensor:
    """Block-sparse attention: query tile i attends to the tokens of key tiles ``key_tiles[..., i, :]``.

    q, k, v: [B, h, L, D] compact tile order; key_tiles: int [B, h, n, topk]. Returns fp32 [B, h, L, D].
    """
    B, heads, L, D = q.shape
    n = tile_offsets.numel() - 1
    offsets = tile_offsets.to(q.device, torch.int64)
    sizes = offsets[1:] - offsets[:-1]
    slot_valid = torch.arange(64, device=q.device).view(1, 64) < sizes.view(n, 1)  # [n, 64]
    qb, kb, vb = (padded_tiles(t.float(), tile_offsets) for t in (q, k, v))  # [B, h, n, 64, D]
    idx = key_tiles.to(torch.int64)
    topk = idx.shape[-1]
    scale = 1.0 / math.sqrt(D)
    out_blocks = []
    for start in range(0, n, _QUERY_TILES_PER_CHUNK):
        stop = min(n, start + _QUERY_TILES_PER_CHUNK)
        sel = idx[:, :, start:stop]  # [B, h, c, topk]
        c = stop - start
        gather = sel.reshape(B, heads, c * topk, 1, 1).expand(B, heads, c * topk, 64, D)
        keys = torch.gather(kb, 2, gather).view(B, heads, c, topk * 64, D)
        values = torch.gather(vb, 2, gather).view(B, heads, c, topk * 64, D)
        key_valid = slot_valid[sel].view(B, heads, c, 1, topk * 64)
        logits = torch.matmul(qb[:, :, start:stop], keys.transpose(-1, -2)) * scale  # [B, h, c, 64, topk*64]
        logits = logits.masked_fill(~key_valid, float("-inf"))
        out_blocks.append(torch.matmul(torch.softmax(logits, dim=-1), values))  # [B, h, c, 64, D]
    out = torch.cat(out_blocks, dim=2).view(B, heads, n * 64, D)
    tile = torch.repeat_interleave(torch.arange(n, device=q.device), sizes, output_size=L)
    slot = torch.arange(L, device=q.device) - offsets[tile]
    return out.index_select(2, tile * 64 + slot)


def video_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tile_offsets: torch.Tensor,
    topk: int,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """VSA on compact tile-ordered q, k, v, gate [B, h, L, D]; returns [B, h, L, D] in q's dtype.

    ``tile_offsets``: int [n + 1] prefix sum of the tiles' valid token counts. Differentiable in
    q, k, v and gate (the top-k selection itself is not).
    """
    L = q.shape[-2]
    offsets = tile_offsets.to(q.device, torch.int64)
    sizes = offsets[1:] - offsets[:-1]
    n = sizes.numel()
    tile = torch.repeat_interleave(torch.arange(n, device=q.device), sizes, output_size=L)
    q_means, k_means = tile_means(q, tile, sizes), tile_means(k, tile, sizes)
    scores = coarse_scores(q_means, k_means)
    key_tiles = select_key_tiles(scores, topk)
    out = fine_attention(q, k, v, tile_offsets, key_tiles)
    if gate is not None:
        v_means = tile_means(v, tile, sizes)
        coarse = torch.matmul(torch.softmax(scores, dim=-1), v_means)  # [B, h, n, D]
        out = out + coarse.index_select(2, tile) * gate.float()
    return out.to(q.dtype)
