"""VSA tile layout: where each token of a (T, H, W) video grid sits in compact 4x4x4 tile order.

Tiles of 4x4x4 tokens cover the post-patchify grid; tiles are ordered (t, h, w) and the tokens
inside a tile are in (t, h, w) order too. Grid sides that are not multiples of 4 give partial
tiles that simply hold fewer tokens. The order is *compact*: tile i's valid tokens occupy
positions ``tile_offsets[i] : tile_offsets[i + 1]`` of the tile-ordered sequence, so that
sequence has exactly ``T*H*W`` tokens and no padding slots (the kernels mask partial tiles
instead of computing on zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import InputError

TILE_SIDE = 4
TILE_TOKENS = TILE_SIDE**3  # 64: the most tokens one tile can hold


# The row blocks the kernels process a tile's tokens in: a tile of up to 16 tokens takes a 16-row
# block, 17..32 a 32-row block, more a whole 64-row tile (largest first, the order of ``tiles_by_block``).
BLOCK_ROWS = (64, 32, 16)


def block_rows(sizes: torch.Tensor) -> torch.Tensor:
    """Tokens per tile (any int tensor) -> the smallest of ``BLOCK_ROWS`` that holds them, same shape."""
    return torch.where(sizes <= 16, 16, torch.where(sizes <= 32, 32, 64))


@dataclass(frozen=True, eq=False)
class TileLayout:
    """The compact tile order for one grid on one device.

    Attributes:
        grid: (T, H, W) post-patchify token grid.
        num_tiles: number of 4x4x4 tiles, ``ceil(T/4) * ceil(H/4) * ceil(W/4)``.
        tile_sizes: int32 [num_tiles], valid tokens per tile (1..64).
        tile_offsets: int32 [num_tiles + 1], prefix sum of ``tile_sizes`` (offsets[0] = 0).
        tile_of_token: int64 [L], tile index of each tile-ordered position.
        perm: int64 [L], tile-ordered position j holds token-order index ``perm[j]``.
        inv_perm: int64 [L], token-order index i sits at tile-ordered position ``inv_perm[i]``.
        tiles_by_block: int32 [num_tiles], tile indices grouped by the row block that fits them
            (64, then 32, then 16 rows), so the kernels launch one program size per group and a
            tile of 16 tokens does not compute 64 rows.
        block_groups: ((rows, count), ...) the groups of ``tiles_by_block`` in order.
    """

    grid: tuple[int, int, int]
    num_tiles: int
    tile_sizes: torch.Tensor
    tile_offsets: torch.Tensor
    tile_of_token: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    tiles_by_block: torch.Tensor
    block_groups: tuple[tuple[int, int], ...]

    @property
    def num_tokens(self) -> int:
        return self.perm.numel()

    @staticmethod
    def for_grid(grid, device=None) -> "TileLayout":
        """The layout of ``grid=(T, H, W)`` with its index tensors on ``device`` (cached)."""
        grid = _check_grid(grid)
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return _layout_for_grid(grid, device)


def _check_grid(grid) -> tuple[int, int, int]:
    try:
        sides = tuple(int(s) for s in grid)
    except (TypeError, ValueError):
        sides = ()
    if len(sides) != 3 or any(s < 1 for s in sides):
        raise InputError(
            f"VSA grid must be three positive token counts (T, H, W) after patchify, got {grid!r}; "
            "pass the latent frames and the patchified height and width, e.g. (21, 30, 52) for 480p."
        )
    return sides  # type: ignore[return-value]


@lru_cache(maxsize=64)
def _layout_for_grid(grid: tuple[int, int, int], device: torch.device) -> TileLayout:
    T, H, W = grid
    tiles_t, tiles_h, tiles_w = (math.ceil(s / TILE_SIDE) for s in grid)
    t = torch.arange(T).view(T, 1, 1).expand(T, H, W).reshape(-1)
    h = torch.arange(H).view(1, H, 1).expand(T, H, W).reshape(-1)
    w = torch.arange(W).view(1, 1, W).expand(T, H, W).reshape(-1)
    tile = ((t // TILE_SIDE) * tiles_h + h // TILE_SIDE) * tiles_w + w // TILE_SIDE  # [L]
    slot = ((t % TILE_SIDE) * TILE_SIDE + h % TILE_SIDE) * TILE_SIDE + w % TILE_SIDE  # [L]
    # Sorting by (tile, slot inside the tile) gives the compact tile order; the keys are unique.
    perm = torch.argsort(tile * TILE_TOKENS + slot)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    num_tiles = tiles_t * tiles_h * tiles_w
    sizes = torch.bincount(tile, minlength=num_tiles)
    offsets = torch.zeros(num_tiles + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    rows_needed = block_rows(sizes)
    groups = [(rows, torch.nonzero(rows_needed == rows).flatten()) for rows in BLOCK_ROWS]
    groups = [(rows, tiles) for rows, tiles in groups if tiles.numel() > 0]
    return TileLayout(
        grid=grid,
        num_tiles=num_tiles,
        tile_sizes=sizes.to(torch.int32).to(device),
        tile_offsets=offsets.to(torch.int32).to(device),
        tile_of_token=tile[perm].to(device),
        perm=perm.to(device),
        inv_perm=inv_perm.to(device),
        tiles_by_block=torch.cat([tiles for _, tiles in groups]).to(torch.int32).to(device),
        block_groups=tuple((rows, tiles.numel()) for rows, tiles in groups),
    )


def _check_length(x: torch.Tensor, layout: TileLayout, dim: int) -> None:
    if x.shape[dim] != layout.num_tokens:
        raise InputError(
            f"VSA: tensor of shape {tuple(x.shape)} has {x.shape[dim]} tokens on dim {dim}, but the grid "
            f"{layout.grid} has {layout.num_tokens}; pass the grid of the patchified latent that produced "
            "these tokens."
        )


def to_tile_order(x: torch.Tensor, layout: TileLayout, dim: int = -2) -> torch.Tensor:
    """Reorder the token axis ``dim`` of ``x`` from (t, h, w) token order to compact tile order."""
    _check_length(x, layout, dim)
    return x.index_select(dim, layout.perm.to(x.device))


def from_tile_order(x: torch.Tensor, layout: TileLayout, dim: int = -2) -> torch.Tensor:
    """Inverse of :func:`to_tile_order`: compact tile order back to (t, h, w) token order."""
    _check_length(x, layout, dim)
    return x.index_select(dim, layout.inv_perm.to(x.device))


def topk_for_sparsity(num_tiles: int, sparsity: float) -> int:
    """Key tiles kept per query tile at ``sparsity`` (fraction dropped): clamp(ceil((1-s)·n), 1, n)."""
    if not 0.0 <= float(sparsity) < 1.0:
        raise InputError(
            f"VSA sparsity must be in [0, 1), got {sparsity!r}; FastWan runs at 0.8, 0 means dense attention."
        )
    # The small epsilon keeps e.g. (1 - 0.8) * 625 = 125.00000000000001 from rounding up to 126.
    kept = math.ceil((1.0 - float(sparsity)) * num_tiles - 1e-9)
    return max(1, min(num_tiles, kept))
