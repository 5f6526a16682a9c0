"""One sparse-distillation step cycle at full 1.3B size: seconds per step and peak memory.

Runs the real trainer (`training.trainer.Distiller`) with random weights on synthetic shards at the
recipe's training size, 77x448x832 video = latents [16, 20, 56, 104] (20x28x52 tokens), umT5 context
512 x 4096. A cycle is `generator_update_interval` (5) steps: every step updates the fake score, the
last one also the generator (VSA student at sparsity 0.8, dense teacher with CFG, dense fake score;
bf16 autocast over fp32 masters, activation checkpointing, AdamW). The first cycle warms up (Triton
autotuning, allocator); the next `--cycles` are measured.

Reference: the published recipe spent about 10.8 s per step per GPU (768 GPU-hours for 4,000 steps
on 64 GPUs, batch 1 per GPU).

    python bench/train_step.py            # on a CUDA GPU, prints one JSON object
    python bench/train_step.py --smoke    # tiny model on CPU: checks the script end to end
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REFERENCE_SECONDS_PER_STEP = 768 * 3600 / 64 / 4000  # 768 GPU-hours, 64 GPUs, 4000 steps -> 10.8 s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model on CPU (checks the script)")
    parser.add_argument("--latent", default="20,56,104", help="latent T,H,W (default: 77x448x832 video)")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--cycles", type=int, default=1, help="measured cycles after one warm-up cycle")
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    from fastwan.training.config import config_from_dict
    from fastwan.training.data import write_synthetic_shards
    from fastwan.training.trainer import Distiller

    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: extra threads only contend on a small CI box
        model, latent, text_len, text_dim, device, precision = "random:tiny", (2, 8, 8), 8, 64, "cpu", "no"
        implementation = "reference"
    else:
        if not torch.cuda.is_available():
            print(json.dumps({"error": "no CUDA GPU; use --smoke on CPU"}))
            return 1
        model, text_len, text_dim, device, precision = "random:1.3b", 512, 4096, "cuda", "bf16"
        latent = tuple(int(v) for v in args.latent.split(","))
        implementation = "auto"

    with tempfile.TemporaryDirectory() as scratch:
        data = write_synthetic_shards(Path(scratch) / "data", num_samples=2, latent_shape=(16, *latent),
                                      text_len=text_len, text_dim=text_dim, samples_per_shard=2,
                                      dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        config = config_from_dict({
            "model": {"teacher": model},
            "attention": {"backend": "vsa", "sparsity": args.sparsity, "sparsity_start": args.sparsity,
                          "implementation": implementation},
            "data": {"dir": str(data)},
            "train": {"output_dir": str(Path(scratch) / "run"), "mixed_precision": precision, "device": device,
                      "activation_checkpointing": not args.no_activation_checkpointing, "tensorboard": False},
        }, "bench/train_step.py")
        started = time.perf_counter()
        distiller = Distiller(config, log=lambda *a, **k: None)
        setup_s = time.perf_counter() - started
        interval = config.dmd.generator_update_interval
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_times, fake_only, with_generator = [], [], []
        for cycle in range(1 + args.cycles):
            for step in range(cycle * interval + 1, (cycle + 1) * interval + 1):
                metrics = distiller.train_step(step)
                if cycle == 0:
                    continue  # warm-up
                step_times.append(metrics["step_time_s"])
                (with_generator if "generator_loss" in metrics else fake_only).append(metrics["step_time_s"])
        fake_step_s = statistics.median(fake_only)
        generator_step_s = statistics.median(with_generator)
        result = {
            "bench": "train_step",
            "smoke": args.smoke,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "model": model,
            "latent_shape": [16, *latent],
            "tokens": latent[0] * (latent[1] // 2) * (latent[2] // 2),
            "student_sparsity": args.sparsity,
            "activation_checkpointing": not args.no_activation_checkpointing,
            "seconds_per_step": sum(step_times) / len(step_times),
            "fake_score_step_s": fake_step_s,
            "generator_step_s": generator_step_s,  # generator update + that step's fake-score update
            "generator_update_s": generator_step_s - fake_step_s,
            "cycle_s": sum(step_times) / args.cycles,
            "four_fake_plus_one_generator_s": 4 * fake_step_s + generator_step_s,
            "reference_seconds_per_step": REFERENCE_SECONDS_PER_STEP,
            "speedup_vs_reference": REFERENCE_SECONDS_PER_STEP / (sum(step_times) / len(step_times)),
            "setup_s": setup_s,
            "losses_finite": bool(all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if "loss" in k)),
        }
        if device == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
