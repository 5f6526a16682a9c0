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
from fastwan.kernels.vsa.reference import video_sparse_attention_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_gate", [True, False])
def test_triton_on_gpu_matches_reference(D, dtype, with_gate):
    grid = (9, 14, 22)  # partial tiles on every axis: 3 x 4 x 6 = 72 tiles
    layout = TileLayout.for_grid(grid, "cuda")
    topk = topk_for_sparsity(layout.num_tiles, 0.8)
    B, heads, L = 2, 3, layout.num_tokens
    inputs = [
        torch.randn(B, L, heads, D, dtype=dtype, device="cuda").transpose(1, 2).requires_grad_(True)
        for _ in range(4 if with_gate else 3)
    ]
    gate = inputs[3] if with_gate else None
    out = video_sparse_attention_tiled(*inputs[:3], layout, topk, gate=gate, implementation="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    ref_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
    ref_gate = ref_inputs[3] if with_gate else None
    expected = video_sparse_attention_reference(*ref_inputs[:3], layout.tile_offsets, topk, ref_gate)
    ref_grads = torch.autograd.grad(expected, ref_inputs, grad_out.float())
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < tol
    for name, g, r in zip(("dq", "dk", "dv", "dgate"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol, name
