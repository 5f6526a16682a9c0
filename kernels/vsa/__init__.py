"""Video Sparse Attention (VSA): trainable block-sparse attention over 4x4x4 video tiles.

Triton kernels on CUDA (``triton-windows`` provides Triton on Windows), a PyTorch reference
everywhere else; see ``ops.py`` for the API, ``reference.py`` for the exact semantics,
``triton_vsa.py`` for the kernels and ``launches.py`` for how they are launched.
"""

from .layout import TileLayout, from_tile_order, to_tile_order, topk_for_sparsity
from .ops import video_sparse_attention, video_sparse_attention_tiled
from .reference import video_sparse_attention_reference

__all__ = [
    "TileLayout",
    "from_tile_order",
    "to_tile_order",
    "topk_for_sparsity",
    "video_sparse_attention",
    "video_sparse_attention_tiled",
    "video_sparse_attention_reference",
]
