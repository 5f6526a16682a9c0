"""The headless pipeline's stages at 832x480x81, full-size random weights, beside diffusers.

Stages, each timed (median of --repeats after a warm-up) with its peak GPU memory:
- text: umT5-XXL encoder (transformers UMT5EncoderModel, 4096 wide, 24 layers, bf16) through our
  `UMT5TextEncoder.encode` (512 tokens, rows cut and zero-padded).
- denoise: 3-step DMD sampling (1000, 757, 522) with our WanDiT, dense and VSA at 0.8, beside the
  same sampler driving diffusers' `WanTransformer3DModel` with the same weights (3 forwards).
- decode: Wan VAE decode of 21x60x104 latents through our `WanVAE` (whole frames and tiled), beside
  diffusers' `AutoencoderKLWan.decode` called directly (the same module).
Prints one JSON object. Ratios are against the diffusers pieces measured in the same run.

    python bench/generate.py             # on a GPU (needs transformers and diffusers)
    python bench/generate.py --smoke     # tiny models on CPU, checks the script runs
    python bench/generate.py --compile --skip text,decode   # + compiled denoising (first call and steady)
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback

import torch

from bench_common import diffusers_transformer
from fastwan.fastwan_core import AttentionConfig, WanConfig, WanDiT
from fastwan.fastwan_core.latents import latent_shape
from fastwan.fastwan_core.sampling import sample_dmd

PROMPT = ("A red fox trots through fresh snow in a birch forest at dawn, breath visible in the cold air, "
          "soft golden light, slow tracking shot.")


def timed(fn, device, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, peak GiB allocated during the measured runs) of fn()."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Small random weights drawn on the module's device (fast at billions of parameters)."""
    generator = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            param.normal_(0, param[0].numel() ** -0.5, generator=generator)
        else:
            param.normal_(0, 0.02, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)


def bench_text(args, device, dtype, result):
    from transformers import UMT5EncoderModel

    from transformers import T5Tokenizer

    from fastwan.fastwan_core.demo_models import tiny_umt5_config, umt5_xxl_config
    from fastwan.fastwan_core.text_encoder import UMT5TextEncoder

    # Token ids only index the embedding table, and every prompt is padded to 512 tokens, so a
    # word-level T5 vocabulary does the same encoder work (and needs no sentencepiece).
    words = sorted(set(PROMPT.replace(",", " ").replace(".", " ").split()))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = tiny_umt5_config(len(tokenizer), 64) if args.smoke else umt5_xxl_config()
    with torch.device(device):
        encoder = UMT5EncoderModel._from_config(config, dtype=dtype)
    randomize_(encoder, 1)
    text = UMT5TextEncoder(tokenizer, encoder)
    seconds, peak = timed(lambda: text.encode(PROMPT), device, args.repeats)
    result["text"] = {"encoder": "umt5 tiny" if args.smoke else "umt5-xxl (random weights)",
                      "params_billion": round(sum(p.numel() for p in encoder.parameters()) / 1e9, 3),
                      "encode_s": round(seconds, 4), "peak_gib": peak and round(peak, 2)}


def bench_denoise(args, device, dtype, shape, result):
    config = WanConfig.tiny() if args.smoke else WanConfig.t2v_1_3b()
    torch.manual_seed(0)
    with torch.device(device):
        ours = WanDiT(config)
    randomize_(ours, 2)
    ours = ours.cast_for_inference(dtype).eval()
    context = torch.randn(1, 512, config.text_dim, device=device, dtype=dtype)
    stage = {"model": "tiny" if args.smoke else "wan2.1-t2v-1.3b (random weights)", "steps": 3,
             "latent": list(shape[2:])}

    def sampler(model):
        return lambda: sample_dmd(model, context, shape, seed=0, device=device)

    seconds, peak = timed(sampler(ours), device, args.repeats)
    stage.update(ours_dense_s=round(seconds, 4), ours_dense_peak_gib=peak and round(peak, 2))

    if not args.no_vsa:
        try:
            vsa = AttentionConfig.vsa(args.sparsity)
            seconds, peak = timed(sampler(ours.with_attention(vsa)), device, args.repeats)
            stage.update({f"ours_vsa{args.sparsity}_s": round(seconds, 4),
                          f"ours_vsa{args.sparsity}_peak_gib": peak and round(peak, 2)})
        except Exception as error:  # the VSA kernel may not exist on this machine yet
            stage[f"ours_vsa{args.sparsity}_error"] = f"{type(error).__name__}: {error}"[:300]

    try:
        reference = diffusers_transformer(ours, device, dtype)
    except ImportError as error:
        stage["diffusers_error"] = f"diffusers not installed: {error}"
        reference = None
    if reference is not None:
        def diffusers_velocity(x, t, c):
            return reference(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=c, return_dict=False)[0]

        with torch.no_grad():
            x = torch.randn(shape, device=device, dtype=dtype)
            t = torch.tensor([757.0], device=device)
            a, b = ours(x, t, context).float(), diffusers_velocity(x, t, context).float()
            stage["dense_rel_err_vs_diffusers"] = float((a - b).norm() / b.norm())
            stage["velocity_rms"] = float(b.pow(2).mean().sqrt())
        seconds, peak = timed(sampler(diffusers_velocity), device, args.repeats)
        stage.update(diffusers_dense_s=round(seconds, 4), diffusers_dense_peak_gib=peak and round(peak, 2))
        stage["speedup_dense_vs_diffusers"] = round(stage["diffusers_dense_s"] / stage["ours_dense_s"], 3)
        if f"ours_vsa{args.sparsity}_s" in stage:
            stage[f"speedup_vsa{args.sparsity}_vs_diffusers"] = round(
                stage["diffusers_dense_s"] / stage[f"ours_vsa{args.sparsity}_s"], 3)
    if args.compile:
        # Regional torch.compile of the blocks, as `fastwan generate --compile` does. The first call
        # of each attention variant compiles (the one-time wait a user sees); then the steady state.
        ours.compile_blocks()
        variants = [("dense", sampler(ours))]
        if not args.no_vsa:
            vsa = AttentionConfig.vsa(args.sparsity)
            variants.append((f"vsa{args.sparsity}", sampler(ours.with_attention(vsa))))
        for label, run in variants:
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            stage[f"ours_{label}_compiled_first_call_s"] = round(time.perf_counter() - start, 2)
            seconds, peak = timed(run, device, args.repeats, warmup=0)
            stage.update({f"ours_{label}_compiled_s": round(seconds, 4),
                          f"ours_{label}_compiled_peak_gib": peak and round(peak, 2)})
            if "diffusers_dense_s" in stage:
                stage[f"speedup_{label}_compiled_vs_diffusers"] = round(stage["diffusers_dense_s"] / seconds, 3)
    result["denoise"] = stage


def bench_decode(args, device, dtype, shape, result):
    from diffusers import AutoencoderKLWan

    from fastwan.fastwan_core.demo_models import wan_vae_config
    from fastwan.fastwan_core.vae import WanVAE

    torch.manual_seed(3)
    with torch.device(device):
        module = AutoencoderKLWan(**wan_vae_config(tiny=args.smoke)).to(dtype).eval()
    latents = torch.randn(shape, device=device)
    vae = WanVAE(module)
    stage = {"vae": "tiny" if args.smoke else "wan2.1 vae (diffusers default config, random weights)"}

    seconds, peak = timed(lambda: vae.decode(latents), device, args.repeats)
    stage.update(ours_s=round(seconds, 4), ours_peak_gib=peak and round(peak, 2))

    def diffusers_decode():
        with torch.no_grad():
            return module.decode(latents.to(dtype), return_dict=False)[0]

    seconds, peak = timed(diffusers_decode, device, args.repeats)
    stage.update(diffusers_s=round(seconds, 4), diffusers_peak_gib=peak and round(peak, 2))
    vae.set_tiling(True, *((32, 24) if args.smoke else (256, 192)))
    seconds, peak = timed(lambda: vae.decode(latents), device, args.repeats)
    stage.update(ours_tiled_s=round(seconds, 4), ours_tiled_peak_gib=peak and round(peak, 2))
    stage["ratio_vs_diffusers"] = round(stage["diffusers_s"] / stage["ours_s"], 3)
    result["decode"] = stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--no-vsa", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time denoising with the DiT blocks torch.compiled (as `fastwan generate --compile`)")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: text,denoise,decode")
    args = parser.parse_args()

    if not args.smoke and not torch.cuda.is_available():
        parser.error("the full-size benchmark needs a CUDA GPU; use --smoke for the tiny CPU run")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    width, height, frames = (48, 32, 5) if args.smoke else (832, 480, 81)
    if args.smoke:
        args.repeats = 1
    shape = latent_shape(1, width, height, frames)
    result = {"video": {"width": width, "height": height, "frames": frames}, "dtype": str(dtype).replace("torch.", ""),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "repeats": args.repeats, "torch": torch.__version__}
    skip = set(filter(None, args.skip.split(",")))
    for name, stage in (("text", bench_text), ("denoise", bench_denoise), ("decode", bench_decode)):
        if name in skip:
            continue
        try:
            if name == "text":
                stage(args, device, dtype, result)
            else:
                stage(args, device, dtype, shape, result)
        except Exception as error:
            result[name] = {"error": f"{type(error).__name__}: {error}"[:500],
                            "trace": traceback.format_exc().splitlines()[-3:]}
        free()  # each stage's models die with its function; release their cached GPU memory
    seconds = [result.get("text", {}).get("encode_s"), result.get("denoise", {}).get(f"ours_vsa{args.sparsity}_s")
               or result.get("denoise", {}).get("ours_dense_s"), result.get("decode", {}).get("ours_s")]
    if all(s is not None for s in seconds):
        result["ours_text_denoise_decode_s"] = round(sum(seconds), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
