"""Benchmark Video Sparse Attention against dense SDPA and the reference project's kernel.

Prints ONE JSON object. On a GPU (the lent H200): correctness of the Triton path at the real
shape against the PyTorch reference (and against ``fastvideo_kernel`` when it is importable),
then median times (triton.testing.do_bench) of forward and forward+backward at the 480p shape
[1, 12, 32760, 128] (grid 21x30x52) and the training shape (20x28x52), sparsity 0.8 and 0.9,
next to cuDNN and FlashAttention SDPA dense and ``fastvideo_kernel`` (Triton path) measured in
the same run.

Effective TFLOP/s count only kept work: fwd = 4 * D * sum over (batch, head, query tile) of
(query tokens x kept key tokens); fwd+bwd = 3.5 x fwd (backward = 2.5 x forward, the
FlashAttention convention). ``*_tflops_blocks`` counts whole 64x64 blocks instead (what a kernel
that computes on padding does).

Uses the public API only (``fastwan.kernels.vsa``); launch choices live in ``kernels/vsa/launches.py``.

    python bench/vsa_attention.py                 # GPU: check + time (about 3 minutes)
    python bench/vsa_attention.py --skip-check    # GPU: time only
    python bench/vsa_attention.py --smoke         # CPU, tiny, Triton interpreter: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fastwan.kernels.vsa import (  # noqa: E402
    TileLayout,
    topk_for_sparsity,
    video_sparse_attention_reference,
    video_sparse_attention_tiled,
)
from fastwan.kernels.vsa.reference import coarse_scores, padded_tiles, select_key_tiles, tile_means  # noqa: E402


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bench_ms(fn, smoke: bool) -> float:
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def projection_views(B, heads, L, D, dtype, device, count, requires_grad=False):
    """Random [B, heads, L, D] views of [B, L, heads, D] buffers, as the DiT produces them."""
    return [
        torch.randn(B, L, heads, D, dtype=dtype, device=device).transpose(1, 2).requires_grad_(requires_grad)
        for _ in range(count)
    ]


def reference_key_tiles(q, k, layout, topk):
    """The key tiles each query tile keeps, [B, h, n, topk], as the PyTorch reference selects them."""
    means = [tile_means(t, layout.tile_of_token, layout.tile_sizes) for t in (q, k)]
    return select_key_tiles(coarse_scores(*means), topk)


def kept_work(key_tiles, layout):
    """(sum over rows of query tokens x kept key tokens, number of kept 64x64 blocks)."""
    sizes = layout.tile_sizes.to(key_tiles.device, torch.float64)
    kept_keys = sizes[key_tiles.long()].sum(-1)  # [B, h, n]
    return (kept_keys * sizes).sum().item(), key_tiles.numel()


def check_correctness(grid, topk, heads, device, dtype, fvk, D=128):
    """Triton vs the fp32 reference at a real grid: forward on all heads, gradients on 2 heads."""
    layout = TileLayout.for_grid(grid, device)
    L = layout.num_tokens
    result = {"grid": list(grid), "topk": topk}
    q, k, v, gate = projection_views(1, heads, L, D, dtype, device, 4)
    with torch.no_grad():
        out = video_sparse_attention_tiled(q, k, v, layout, topk, gate=gate, implementation="triton")
        ref = video_sparse_attention_reference(q, k, v, layout.tile_offsets, topk, gate)
        result["fwd_rel_err"] = rel_err(out, ref)
        result["fwd_finite"] = bool(torch.isfinite(out).all())
        if fvk is not None:
            try:
                result["fastvideo_kernel"] = compare_with_fastvideo(fvk, q, k, v, gate, layout, topk, out)
            except Exception as exc:  # comparator only: record, never fail the bench on it
                result["fastvideo_kernel"] = {"error": repr(exc)}
    # Gradients on 2 heads (the fp32 reference backward at 12 heads needs too much memory).
    q2, k2, v2, g2 = (t[:, :2].detach().requires_grad_(True) for t in (q, k, v, gate))
    out2 = video_sparse_attention_tiled(q2, k2, v2, layout, topk, gate=g2, implementation="triton")
    grad_out = torch.randn_like(out2)
    grads = torch.autograd.grad(out2, (q2, k2, v2, g2), grad_out)
    ref_in = [t.detach().float().requires_grad_(True) for t in (q2, k2, v2, g2)]
    ref2 = video_sparse_attention_reference(*ref_in[:3], layout.tile_offsets, topk, ref_in[3])
    ref_grads = torch.autograd.grad(ref2, ref_in, grad_out.float())
    for name, g, r in zip(("dq", "dk", "dv", "dgate"), grads, ref_grads):
        result[f"{name}_rel_err"] = rel_err(g, r)
    return result


def padded_inputs(layout, *tensors):
    """Tile-ordered [B, h, L, D] -> contiguous [B, h, n*64, D] with zero padding (fastvideo_kernel's layout)."""
    return [padded_tiles(t, layout.tile_offsets).flatten(2, 3).contiguous() for t in tensors]


def compare_with_fastvideo(fvk, q, k, v, gate, layout, topk, ours):
    qp, kp, vp, gp = padded_inputs(layout, q, k, v, gate)
    sizes = layout.tile_sizes.to(torch.int32)
    theirs = fvk.video_sparse_attn(qp, kp, vp, sizes, sizes, topk, (4, 4, 4), gp)
    valid = (torch.arange(64, device=q.device).view(1, 64) < sizes.view(-1, 1)).view(-1)
    theirs = theirs[:, :, valid]
    # Its tile means are rounded to bf16 before scoring, so a few near-tie selections differ.
    return {"fwd_rel_err_vs_ours": rel_err(ours, theirs)}


def backward_of(fn, grad_out, inputs):
    """forward + backward of fn, for timing. Every contender's inputs get their .grad cleared first, so no
    run pays for accumulating into the previous run's gradients (an extra read and write of each)."""
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad_out)

    return run


def time_dense(q, k, v, grad_out, smoke):
    """cuDNN and FlashAttention SDPA, dense, forward and forward+backward on contiguous copies."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, heads, L, D = q.shape
    dense_flops = 4 * B * heads * L * L * D
    rows = {}
    qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qc, kc, vc)

    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                with torch.no_grad():
                    rows[f"dense_{label}_fwd_ms"] = bench_ms(sdpa, smoke)
                rows[f"dense_{label}_fwd_bwd_ms"] = bench_ms(backward_of(sdpa, grad_out, (qc, kc, vc)), smoke)
            rows[f"dense_{label}_fwd_tflops"] = dense_flops / rows[f"dense_{label}_fwd_ms"] / 1e9
        except Exception as exc:
            rows[f"dense_{label}_error"] = repr(exc)
    return rows


def time_shape(name, grid, sparsities, heads, device, dtype, fvk, smoke):
    layout = TileLayout.for_grid(grid, device)
    L, D, B = layout.num_tokens, 128 if not smoke else 64, 1
    rows = {"grid": list(grid), "tokens": L, "tiles": layout.num_tiles, "heads": heads, "head_dim": D}
    q, k, v, gate = projection_views(B, heads, L, D, dtype, device, 4, requires_grad=True)
    grad_out = torch.randn(B, L, heads, D, dtype=dtype, device=device).transpose(1, 2)
    inputs = (q, k, v, gate)

    if device.type == "cuda":
        rows.update(time_dense(q, k, v, grad_out, smoke))
    for sparsity in sparsities:
        topk = topk_for_sparsity(layout.num_tiles, sparsity)
        row = {"topk": topk}
        ours = lambda: video_sparse_attention_tiled(q, k, v, layout, topk, gate=gate)  # noqa: E731
        with torch.no_grad():
            kept_tokens, kept_blocks = kept_work(reference_key_tiles(q, k, layout, topk), layout)
            fwd_flops = 4 * D * kept_tokens
            block_flops = 4 * D * kept_blocks * 64 * 64
            row["ours_fwd_ms"] = bench_ms(ours, smoke)
            contiguous = [t.detach().contiguous() for t in (q, k, v, gate)]  # [B, h, L, D] memory instead
            row["ours_fwd_contiguous_bhld_ms"] = bench_ms(
                lambda: video_sparse_attention_tiled(*contiguous[:3], layout, topk, gate=contiguous[3]), smoke
            )
        row["ours_fwd_bwd_ms"] = bench_ms(backward_of(ours, grad_out, inputs), smoke)
        row["ours_fwd_tflops"] = fwd_flops / row["ours_fwd_ms"] / 1e9
        row["ours_fwd_tflops_blocks"] = block_flops / row["ours_fwd_ms"] / 1e9
        row["ours_fwd_bwd_tflops"] = 3.5 * fwd_flops / row["ours_fwd_bwd_ms"] / 1e9
        if fvk is not None:
            try:
                qp, kp, vp, gp = (t.detach().requires_grad_(True) for t in padded_inputs(layout, q, k, v, gate))
                gop = padded_inputs(layout, grad_out)[0]
                sizes = layout.tile_sizes.to(torch.int32)
                theirs = lambda: fvk.video_sparse_attn(qp, kp, vp, sizes, sizes, topk, (4, 4, 4), gp)  # noqa: E731
                with torch.no_grad():
                    row["fastvideo_fwd_ms"] = bench_ms(theirs, smoke)
                row["fastvideo_fwd_bwd_ms"] = bench_ms(backward_of(theirs, gop, (qp, kp, vp, gp)), smoke)
                row["speedup_vs_fastvideo_fwd"] = row["fastvideo_fwd_ms"] / row["ours_fwd_ms"]
                row["speedup_vs_fastvideo_fwd_bwd"] = row["fastvideo_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
            except Exception as exc:
                row["fastvideo_error"] = repr(exc)
        for label in ("cudnn", "flash"):
            if f"dense_{label}_fwd_ms" in rows:
                row[f"speedup_vs_{label}_fwd"] = rows[f"dense_{label}_fwd_ms"] / row["ours_fwd_ms"]
                row[f"speedup_vs_{label}_fwd_bwd"] = rows[f"dense_{label}_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
        rows[f"sparsity_{sparsity}"] = row
    return rows


def load_fastvideo_kernel():
    os.environ.setdefault("FASTVIDEO_VSA_TRITON", "1")  # its compiled sm_90 kernels do not load on CUDA 13
    try:
        import fastvideo_kernel

        return fastvideo_kernel
    except Exception:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness checks")
    args = parser.parse_args()

    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter's bf16 tl.dot is broken on CPU
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "dtype": str(dtype), "flop_convention": "fwd 4*D*q*kept_k; fwd+bwd 3.5x fwd"}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    fvk = None if smoke else load_fastvideo_kernel()
    report["fastvideo_kernel"] = getattr(fvk, "__version__", None)
    if smoke:
        shapes = {"smoke": ((3, 6, 9), 2)}
    else:
        shapes = {"480p": ((21, 30, 52), 12), "train_77x448x832": ((20, 28, 52), 12)}

    def section(name, fn):
        try:
            report[name] = fn()
        except Exception:
            report[name] = {"error": traceback.format_exc()[-2000:]}

    if not args.skip_check:
        for label, (grid, heads) in shapes.items():
            topk = topk_for_sparsity(TileLayout.for_grid(grid).num_tiles, 0.8)
            head_dim = 64 if smoke else 128
            section(f"check_{label}", lambda: check_correctness(grid, topk, heads, device, dtype, fvk, head_dim))
    for label, (grid, heads) in shapes.items():
        section(f"time_{label}", lambda: time_shape(label, grid, (0.8, 0.9), heads, device, dtype, fvk, smoke))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
