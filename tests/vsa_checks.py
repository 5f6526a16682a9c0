"""Checks shared by the VSA test files (the Triton path under the interpreter and on the GPU, and
the reference op): each compares against an independent oracle with fresh random inputs."""

from __future__ import annotations

import torch

from fastwan.kernels.vsa import TileLayout, video_sparse_attention_tiled
from fastwan.kernels.vsa.reference import video_sparse_attention_reference


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def projection_views(B, heads, L, D, dtype, count, device="cpu", aligned=True):
    """Fresh random [B, heads, L, D] views of [B, L, heads, D] buffers, as the DiT hands them over.

    aligned=False: views one element into [B, L, heads, D + 1] buffers, so neither their base nor their
    row stride is 16-byte aligned (the kernels then load with masked pointers instead of TMA)."""
    if aligned:
        buffers = [torch.randn(B, L, heads, D, dtype=dtype, device=device) for _ in range(count)]
    else:
        buffers = [torch.randn(B, L, heads, D + 1, dtype=dtype, device=device)[..., 1:] for _ in range(count)]
    return [x.transpose(1, 2).requires_grad_(True) for x in buffers]


def check_triton_against_reference(grid, D, dtype, topk, with_gate, B=2, heads=2, tol=1e-5, device="cpu",
                                   aligned=True):
    """Forward and all gradients of the Triton path against the fp32 reference, fresh inputs."""
    layout = TileLayout.for_grid(grid, device)
    inputs = projection_views(B, heads, layout.num_tokens, D, dtype, 4 if with_gate else 3, device, aligned)
    gate = inputs[3] if with_gate else None
    out = video_sparse_attention_tiled(*inputs[:3], layout, topk, gate=gate, implementation="triton")
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert out.transpose(1, 2).is_contiguous()  # fresh [B, L, heads, D] memory, whatever the inputs' strides
    assert torch.isfinite(out).all()
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    ref_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
    ref_gate = ref_inputs[3] if with_gate else None
    expected = video_sparse_attention_reference(*ref_inputs[:3], layout.tile_offsets, topk, ref_gate)
    ref_grads = torch.autograd.grad(expected, ref_inputs, grad_out.float())
    assert rel_err(out, expected) < tol, "out"
    for name, g, r in zip(("dq", "dk", "dv", "dgate"), grads, ref_grads):
        assert g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol, name


def check_compile_traces_as_one_op(implementation, head_dim):
    """torch.compile(fullgraph=True) fails on any graph break: the API and its custom op must trace as
    one op, and the compiled gradients must equal the eager ones."""
    layout = TileLayout.for_grid((3, 5, 7))
    inputs = [torch.randn(1, 2, layout.num_tokens, head_dim, requires_grad=True) for _ in range(4)]

    def loss(q, k, v, gate):
        out = video_sparse_attention_tiled(q * 2.0, k, v, layout, 2, gate=gate, implementation=implementation)
        return out.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(loss(*inputs), inputs)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)
