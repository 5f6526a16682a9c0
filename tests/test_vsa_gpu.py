"""VSA Triton kernels compiled for a real GPU (bf16, both head dims) against the fp32 reference.

Marked ``gpu``: skipped without CUDA. The CPU tests run the same kernels under Triton's
interpreter; these catch what only the compiler and the hardware can get wrong (bf16 dots,
tensor-descriptor loads, pipelining, shared-memory limits). bench/vsa_attention.py does the same
check at the real 480p shape.
"""

from __future__ import annotations

import pytest
import torch

from fastwan.kernels.vsa import TileLayout, topk_for_sparsity
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


@pytest.mark.parametrize("head_spans, early_lists", [(2, True), (3, False)])
def test_triton_on_gpu_in_spans_of_heads_matches_reference(head_spans, early_lists, monkeypatch):
    # Here the second CUDA stream is live: each span's coarse stage runs beside the previous span's
    # fine launches, dk/dv's lists beside the coarse backward or beside dq.
    from fastwan.kernels.vsa import ops as vsa_ops

    monkeypatch.setattr(vsa_ops, "FORWARD_HEAD_SPANS", head_spans)
    monkeypatch.setattr(vsa_ops, "EARLY_TRANSPOSED_LISTS", early_lists)
    grid = (9, 14, 22)
    topk = topk_for_sparsity(TileLayout.for_grid(grid).num_tiles, 0.8)
    check_triton_against_reference(grid, 128, torch.bfloat16, topk, True, B=2, heads=3, tol=1e-2, device="cuda")
