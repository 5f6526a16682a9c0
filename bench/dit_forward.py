"""One DiT forward at 480p x 81 frames: ours vs diffusers' WanTransformer3DModel, same weights.

Full-size Wan2.1-T2V-1.3B with random weights, bf16, latent 21x60x104, context 512x4096. Reports
eager and torch.compile (regional: each block compiled, as both models repeat one block) medians,
the VSA backend at 0.8 when its kernel is available, and peak memory. Prints one JSON object.

    python bench/dit_forward.py            # on a GPU
    python bench/dit_forward.py --smoke    # tiny config on CPU, checks the script runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_common import diffusers_transformer
from fastwan.fastwan_core import AttentionConfig, WanConfig, WanDiT


def time_one_ms(fn, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_interleaved_ms(fns: dict, repeats: int, warmup: int, device) -> dict:
    """Median time of each callable, the callables taking turns (in rotating order) so that clock
    and thermal drift during the run weigh on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            times[name].append(time_one_ms(fns[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_gib(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-vsa", action="store_true", help="skip the VSA backend")
    args = parser.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        config, grid, text_len, dtype, repeats = WanConfig.tiny(), (3, 8, 12), 16, torch.float32, 2
    else:
        config, grid, text_len, dtype, repeats = WanConfig.t2v_1_3b(), (21, 60, 104), 512, torch.bfloat16, args.repeats
    torch.manual_seed(0)
    with torch.device(device):
        ours = WanDiT(config).cast_for_inference(dtype).eval()
    x = torch.randn(1, 16, *grid, device=device, dtype=dtype)
    t = torch.tensor([757.0], device=device)
    ctx = torch.randn(1, text_len, config.text_dim, device=device, dtype=dtype)
    result = {"shape": {"latent": list(grid), "context": [text_len, config.text_dim]},
              "model": "tiny" if args.smoke else "wan2.1-t2v-1.3b (random weights)",
              "dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    reference = diffusers_transformer(ours, device, dtype)

    with torch.no_grad():
        out_ours = ours(x, t, ctx).float()
        out_ref = reference(x, t, ctx, return_dict=False)[0].float()
    result["rel_err_vs_diffusers"] = float((out_ours - out_ref).norm() / out_ref.norm())

    def run(model):
        if model is reference:
            return lambda: reference(x, t, ctx, return_dict=False)
        return lambda: model(x, t, ctx)

    vsa = AttentionConfig.vsa(0.8)
    try:
        from fastwan.kernels.vsa import video_sparse_attention_tiled  # noqa: F401
        have_vsa = not args.no_vsa
    except ImportError:
        have_vsa = False

    timings = {}
    with torch.no_grad():
        variants = {"ours": run(ours), "diffusers": run(reference)}
        if have_vsa:
            variants["ours_vsa0.8"] = run(ours.with_attention(vsa))
        for name, fn in variants.items():
            result[f"{name}_peak_memory_gib"] = peak_memory_gib(fn, device)
        timings.update({f"{name}_eager_ms": ms for name, ms in
                        time_interleaved_ms(variants, repeats, 2, device).items()})
        if not args.no_compile:
            for block in ours.blocks:
                block.compile()
            for block in reference.blocks:
                block.compile()
            timings.update({f"{name}_compiled_ms": ms for name, ms in
                            time_interleaved_ms(variants, repeats, 3, device).items()})
    result.update({k: round(v, 2) for k, v in timings.items()})
    result["speedup_eager_vs_diffusers"] = round(timings["diffusers_eager_ms"] / timings["ours_eager_ms"], 3)
    if "ours_compiled_ms" in timings:
        result["speedup_compiled_vs_diffusers"] = round(timings["diffusers_compiled_ms"] / timings["ours_compiled_ms"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
