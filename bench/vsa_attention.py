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

    python bench/vsa_attention.py                 # GPU: check + time (about 3 minutes)
    python bench/vsa_attention.py --sweep         # also sweep warps/stages per kernel first
    python bench/vsa_attention.py --smoke         # CPU, tiny, Triton interpreter: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
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
from fastwan.kernels.vsa import ops as vsa_ops  # noqa: E402
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


def triton_outputs(q, k, v, gate, layout, topk):
    return vsa_ops._vsa_triton_fwd(
        q, k, v, gate, layout.tile_offsets, layout.tiles_by_block, vsa_ops._flat_groups(layout), topk
    )


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
        tri_tiles = triton_outputs(q, k, v, gate, layout, topk)[2].sort(-1).values
        means = [tile_means(t, layout.tile_of_token, layout.tile_sizes) for t in (q, k)]
        ref_tiles = select_key_tiles(coarse_scores(*means), topk)
        result["selection_agreement"] = (tri_tiles == ref_tiles).double().mean().item()
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


def coarse_breakdown(q, k, v, layout, topk, smoke):
    """Times of the coarse stage's parts: the tile means (one launch for q, k, v) and the top-k kernel."""

    def pool():
        return vsa_ops._tile_means(q, k, v, layout.tile_offsets)

    means = pool()
    scores = torch.matmul(means[0], means[1].transpose(-1, -2))

    def select():
        vsa_ops._select_key_tiles(scores, layout.tile_offsets, topk)

    return {
        "coarse_pool_ms": bench_ms(pool, smoke),
        "coarse_select_ms": bench_ms(select, smoke),
        "coarse_torch_topk_ms": bench_ms(lambda: torch.topk(scores, topk, dim=-1), smoke),
    }


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
            key_tiles = triton_outputs(q, k, v, gate, layout, topk)[2]
            kept_tokens, kept_blocks = kept_work(key_tiles, layout)
            fwd_flops = 4 * D * kept_tokens
            block_flops = 4 * D * kept_blocks * 64 * 64
            row["ours_fwd_ms"] = bench_ms(ours, smoke)
            row["ours_coarse_ms"] = bench_ms(
                lambda: vsa_ops._coarse_forward(q, k, v, layout.tile_offsets, topk), smoke
            )
            row.update(coarse_breakdown(q, k, v, layout, topk, smoke))
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
        if "dense_cudnn_fwd_ms" in rows:
            row["speedup_vs_cudnn_fwd"] = rows["dense_cudnn_fwd_ms"] / row["ours_fwd_ms"]
            row["speedup_vs_cudnn_fwd_bwd"] = rows["dense_cudnn_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
        rows[f"sparsity_{sparsity}"] = row
    return rows


def sweep_launch_configs(device, dtype, smoke):
    """Time TMA on/off and warps/stages per kernel at 480p, sparsity 0.8; keep the fastest."""
    layout = TileLayout.for_grid((21, 30, 52), device)
    topk = topk_for_sparsity(layout.num_tiles, 0.8)
    q, k, v, gate = projection_views(1, 12, layout.num_tokens, 128, dtype, device, 4, requires_grad=True)
    grad_out = torch.randn_like(q)
    ours = lambda: video_sparse_attention_tiled(q, k, v, layout, topk, gate=gate)  # noqa: E731

    def fwd_ms():
        with torch.no_grad():
            return bench_ms(ours, smoke)

    def fwd_bwd_ms():
        return bench_ms(lambda: ours().backward(grad_out), smoke)

    def trial(kernel, tma, warps, stages, measure):
        vsa_ops.USE_TMA[kernel] = bool(tma)
        vsa_ops.LAUNCH_CONFIG[(kernel, 128)] = dict(num_warps=warps, num_stages=stages)
        try:
            return measure()
        except Exception as exc:
            return repr(exc)[:300]

    results = {}
    # (TMA, warps, stages). 8 warps, 4 stages, 128-row key blocks and packed small tiles all lost
    # clearly in earlier sweeps (bench/NOTES_vsa.md).
    plans = {
        "fwd": ([(0, 4, 3), (1, 4, 2), (1, 4, 3)], fwd_ms),
        "bwd_dq": ([(0, 4, 2), (1, 4, 2), (1, 4, 3)], fwd_bwd_ms),
        "bwd_dkdv": ([(0, 4, 2), (0, 4, 3), (1, 4, 2)], fwd_bwd_ms),
    }
    for kernel, (configs, measure) in plans.items():
        timings = {}
        for tma, warps, stages in configs:
            timings[f"t{tma}w{warps}s{stages}"] = trial(kernel, tma, warps, stages, measure)
        best = min((t, key) for key, t in timings.items() if isinstance(t, float))[1]
        tma, rest = best[1:].split("w")
        warps, stages = rest.split("s")
        vsa_ops.USE_TMA[kernel] = bool(int(tma))
        vsa_ops.LAUNCH_CONFIG[(kernel, 128)] = dict(num_warps=int(warps), num_stages=int(stages))
        results[kernel] = {"timings_ms": timings, "best": best}
    return results


def compare_settings(device, dtype, smoke, rounds=5):
    """480p, sparsity 0.8: forward and forward+backward under alternative module settings of
    ``vsa_ops`` (how launches overlap, the backward's launch order, dk/dv's orientation), timed in turns
    (median of ``rounds``), each checked to give the same outputs and gradients as the current one."""
    grid, heads, D = ((3, 6, 9), 2, 64) if smoke else ((21, 30, 52), 12, 128)
    layout = TileLayout.for_grid(grid, device)
    topk = topk_for_sparsity(layout.num_tiles, 0.8)
    q, k, v, gate = projection_views(1, heads, layout.num_tokens, D, dtype, device, 4, requires_grad=True)
    grad_out = torch.randn_like(q)
    inputs = (q, k, v, gate)
    ours = lambda: video_sparse_attention_tiled(q, k, v, layout, topk, gate=gate)  # noqa: E731
    key_major_16 = {("bwd_dkdv", D, 16): dict(num_warps=2, num_stages=2)}
    variants = {
        "current": {},
        "overlap_off": {"OVERLAP_LAUNCHES": "off"},
        "overlap_side": {"OVERLAP_LAUNCHES": "side"},
        "overlap_side_high_priority": {"OVERLAP_LAUNCHES": "side_high_priority"},
        "backward_partials_first": {"BACKWARD_SCHEDULE": "partials_first"},
        "backward_dq_first": {"BACKWARD_SCHEDULE": "dq_first"},
        "small_keys_two_per_step": {"SMALL_KEY_TILES_PER_STEP": 2},
        "dkdv16_key_major": {"DKDV_QUERY_MAJOR_ROWS": (32,),
                             "SMALL_TILE_LAUNCH_CONFIG": {**vsa_ops.SMALL_TILE_LAUNCH_CONFIG, **key_major_16}},
    }
    # Without the register caps that let a third CTA share an SM (ops.SMALL_TILE_LAUNCH_CONFIG).
    for (kernel, head_dim, rows), config in vsa_ops.SMALL_TILE_LAUNCH_CONFIG.items():
        if head_dim == D and "maxnreg" in config:
            uncapped = {key: value for key, value in config.items() if key != "maxnreg"}
            variants[f"{kernel}{rows}_no_register_cap"] = {"SMALL_TILE_LAUNCH_CONFIG": {
                **vsa_ops.SMALL_TILE_LAUNCH_CONFIG, (kernel, D, rows): uncapped}}
    # The top-k kernel's launch (score rows per program, warps, lane blocks) and the tile means' warps:
    # each kernel timed alone, below.
    select_variants = {f"select_rows{rows}_w{warps}{'' if split else '_one_block'}": {
        "SELECT_LAUNCH": dict(rows=rows, num_warps=warps, split_lanes=split)}
        for rows, warps, split in ((1, 1, True), (1, 1, False), (1, 2, True), (1, 4, True), (2, 2, True))}
    means_variants = {f"tile_means_w{warps}": {"TILE_MEANS_LAUNCH": dict(num_warps=warps)} for warps in (2, 4, 8, 16)}

    @contextlib.contextmanager
    def applied(settings):
        previous = {name: getattr(vsa_ops, name) for name in settings}
        try:
            for name, value in settings.items():
                setattr(vsa_ops, name, value)
            yield
        finally:
            for name, value in previous.items():
                setattr(vsa_ops, name, value)

    def outputs():
        for t in inputs:
            t.grad = None
        out = ours()
        out.backward(grad_out)
        return [out.detach().clone()] + [t.grad.clone() for t in inputs]

    result, times, expected = {}, {name: {"fwd": [], "fwd_bwd": []} for name in variants}, None
    for name, settings in variants.items():
        with applied(settings):
            got = outputs()
        expected = expected or got
        result[f"{name}_max_rel_diff"] = max(rel_err(a, b) for a, b in zip(got, expected))
    for _ in range(1 if smoke else rounds):
        for name, settings in variants.items():
            with applied(settings):
                with torch.no_grad():
                    times[name]["fwd"].append(bench_ms(ours, smoke))
                times[name]["fwd_bwd"].append(bench_ms(backward_of(ours, grad_out, inputs), smoke))
    for name, runs in times.items():
        for part, values in runs.items():
            result[f"{name}_{part}_ms"] = sorted(values)[len(values) // 2]
    with torch.no_grad():
        selected = None
        # The top-k kernel alone on the forward's scores (the coarse stage timed whole is bound by
        # the host's launches, not by the GPU).
        means = vsa_ops._tile_means(q, k, v, layout.tile_offsets)
        scores = torch.matmul(means[0], means[1].transpose(-1, -2))
        for name, settings in select_variants.items():
            with applied(settings):
                got = vsa_ops._select_key_tiles(scores, layout.tile_offsets, topk)
                selected = selected or got
                result[f"{name}_same_lists"] = all(torch.equal(a, b) for a, b in zip(got, selected))
                result[f"{name}_ms"] = bench_ms(lambda: vsa_ops._select_key_tiles(scores, layout.tile_offsets, topk),
                                                smoke)
        for name, settings in means_variants.items():
            with applied(settings):
                result[f"{name}_same"] = torch.equal(vsa_ops._tile_means(q, k, v, layout.tile_offsets), means)
                result[f"{name}_ms"] = bench_ms(lambda: vsa_ops._tile_means(q, k, v, layout.tile_offsets), smoke)
    return result


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
    parser.add_argument("--sweep", action="store_true", help="sweep num_warps/num_stages before timing")
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness checks")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--compare-settings", action="store_true",
                        help="also time alternative launch settings at 480p, 0.8 (overlap, dk/dv launch order and "
                             "orientation, register caps, top-k and tile-means launches)")
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
    if args.compare_settings:
        section("compare_settings", lambda: compare_settings(device, dtype, smoke))
    if args.sweep and not smoke:
        section("sweep", lambda: sweep_launch_configs(device, dtype, smoke))
    report["launch_config"] = {f"{k}/{d}": v for (k, d), v in vsa_ops.LAUNCH_CONFIG.items()}
    report["launch_config"].update({f"{k}/{d}/{rows}rows": v
                                    for (k, d, rows), v in vsa_ops.SMALL_TILE_LAUNCH_CONFIG.items()})
    report["launch_config"]["use_tma"] = dict(vsa_ops.USE_TMA)
    for label, (grid, heads) in shapes.items():
        section(f"time_{label}", lambda: time_shape(label, grid, (0.8, 0.9), heads, device, dtype, fvk, smoke))
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
