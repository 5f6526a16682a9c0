"""VSA Triton kernels compiled for a real GPU (bf16, both head dims) against the fp32 reference.

Marked ``gpu``: skipped without CUDA. The CPU tests run the same kernels under Triton's
interpreter; these catch what only the compiler and the hardware can get wrong (bf16 dots,
tensor-descriptor loads, pipelining, shared-memory limits). bench/vsa_attention.py does the same
check at the real 480p shape.
"""

from __future__ import annotations

import pytest
import torch

from fastwan.kernels.vsa import TileLayout, topk_for_sparsity, video_sparse_attention_tiled
from vsa_checks import check_triton_against_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_gate", [True, False])
def test_triton_on_gpu_matches_reference(D, dtype, with_gate):
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    grid = (9, 14, 22)  # partial tiles on every axis: 3 x 4 x 6 = 72 tiles
    topk = topk_for_sparsity(TileLayout.for_grid(grid).num_tiles, 0.8)
    check_triton_against_reference(grid, D, dtype, topk, with_gate, B=2, heads=3, tol=tol, device="cuda")


def test_triton_on_gpu_never_waits_for_the_gpu():
    # A host sync in the op (a .item(), a bincount sizing its output) would stall the host once per
    # attention layer and pass, so its launches could no longer run ahead of the GPU. (The sync
    # debug mode raises on the synchronizing calls it knows, which include bincount on CUDA.)
    layout = TileLayout.for_grid((9, 14, 22), "cuda")
    topk = topk_for_sparsity(layout.num_tiles, 0.8)
    q, k, v, gate = (torch.randn(1, 2, layout.num_tokens, 128, device="cuda", dtype=torch.bfloat16,
                                 requires_grad=True) for _ in range(4))
    video_sparse_attention_tiled(q, k, v, layout, topk, gate=gate).sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = video_sparse_attention_tiled(q, k, v, layout, topk, gate=gate)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
