"""The tiny world's proof: does the 3-step VSA student draw what the caption asks, like its teacher?

Samples clips for captions of the world's training and held-out combinations with
- teacher: the dense teacher, many-step UniPC with CFG (the reference),
- teacher_3step: the same teacher naively run with 3 Euler steps (with CFG),
- student_dense / student_vsa: the distilled student's 3-step DMD sampler, dense and at VSA sparsity,
- control_vsa (with --control): a student distilled with the fake score frozen, 3 VSA steps,
decodes them with the world VAE and reads them with the world's judge (training/tiny_world.py).
Reports caption adherence (% of clips with colour, shape, direction and background all right, and
each alone) per split, and the Frechet distance of each sampler's judge features to the teacher's
on the same captions drawn with other noise seeds (the teacher's own entry is that noise floor).
Also the judge's accuracy on ground-truth clips. Prints one JSON object; exit status 0 iff the bar
of issue #20 holds (see `BAR`).

    python bench/tiny_world.py --models fastwan/models/tiny_world                 # GPU
    python bench/tiny_world.py --models DIR --control control.safetensors          # + the control
    python bench/tiny_world.py --smoke                                             # CPU, tiny, checks it runs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastwan.fastwan_core.attention import AttentionConfig
from fastwan.fastwan_core.checkpoint import load_dit
from fastwan.fastwan_core.latents import denormalize_latents, latent_shape
from fastwan.fastwan_core.sampling import sample_dmd, sample_euler, sample_unipc
from fastwan.fastwan_core.text_encoder import UMT5TextEncoder
from fastwan.fastwan_core.vae import WanVAE
from fastwan.training import tiny_world as world

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "tiny_world"
TEACHER_MIN_ADHERENCE = 80.0  # % of training captions the teacher must draw right for the comparison to mean anything
JUDGE_MIN_ACCURACY = 95.0  # % of ground-truth clips the judge must read right
BAR = (f"the judge reads at least {JUDGE_MIN_ACCURACY:.0f}% of ground-truth clips right and the teacher draws at "
       f"least {TEACHER_MIN_ADHERENCE:.0f}% of training captions right (else the comparison below is empty: a "
       "teacher that draws nothing is matched by anything); "
       "student_vsa adherence (all attributes) within 5 points of the teacher's on training and on held-out "
       "captions; student_vsa's Frechet distance at most half of teacher_3step's; with --control, the control "
       "clearly worse (Frechet distance over twice the student's or training adherence 10 points lower)")


def _arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=str(SHIPPED), help="the tiny-world folder (transformer/ = student, "
                                                               "teacher/, text_encoder/, tokenizer/, vae/)")
    parser.add_argument("--control", default=None, help="a student distilled with the fake score frozen")
    parser.add_argument("--per-split", type=int, default=128, help="clips per split and sampler")
    parser.add_argument("--teacher-steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.5, help="the teacher's CFG scale")
    parser.add_argument("--teacher-shift", type=float, default=5.0)
    parser.add_argument("--sparsity", type=float, default=0.5, help="the student's VSA sparsity")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", default=f"{world.FRAMES}x{world.HEIGHT}x{world.WIDTH}", help="FRAMESxHEIGHTxWIDTH")
    parser.add_argument("--device", default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny clips, few samples: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.per_split, args.teacher_steps, args.batch, args.size, args.device = 4, 3, 4, "9x48x64", "cpu"
    return args


def _captions(per_split: int):
    """Captions of each split: drawn uniformly from the training combinations; every held-out
    combination equally often."""
    held_out = [world.HELD_OUT[i % len(world.HELD_OUT)] for i in range(per_split)]
    return {"training": world.random_captions(per_split, seed=2026), "held_out": held_out}


def main(argv=None) -> int:
    args = _arguments(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames, height, width = (int(v) for v in args.size.split("x"))
    folder = Path(args.models)
    encoder = UMT5TextEncoder.from_folder(folder, dtype=torch.float32, device=device)
    vae = WanVAE.from_folder(folder, dtype=dtype, device=device)
    teacher = load_dit(folder / "teacher", dtype=dtype, device=device)
    student = load_dit(folder / "transformer", dtype=dtype, device=device)
    control = load_dit(args.control, dtype=dtype, device=device) if args.control else None
    negative_embedding = encoder.encode([world.NEGATIVE_PROMPT])
    dense, vsa = AttentionConfig(), AttentionConfig.vsa(args.sparsity)

    def teacher_many(model, context, shape, seed, negative):
        model.attention = dense
        return sample_unipc(model, context, shape, seed, negative_context=negative, guidance=args.guidance,
                            num_steps=args.teacher_steps, shift=args.teacher_shift, device=device)

    def teacher_three(model, context, shape, seed, negative):
        model.attention = dense
        return sample_euler(model, context, shape, seed, negative_context=negative, guidance=args.guidance,
                            num_steps=3, shift=args.teacher_shift, device=device)

    def three_step(attention):
        def run(model, context, shape, seed, negative):
            model.attention = attention
            return sample_dmd(model, context, shape, seed, device=device)
        return run

    samplers = {"teacher": (teacher, teacher_many), "teacher_3step": (teacher, teacher_three),
                "student_dense": (student, three_step(dense)), "student_vsa": (student, three_step(vsa))}
    if control is not None:
        samplers["control_vsa"] = (control, three_step(vsa))

    splits = _captions(args.per_split)
    all_captions = splits["training"] + splits["held_out"]
    context = encoder.encode([c.text for c in all_captions])

    def generate(model, sampler, seed_base):
        readings = []
        for start in range(0, len(all_captions), args.batch):
            batch_context = context[start:start + args.batch]
            count = batch_context.shape[0]
            shape = latent_shape(count, width, height, frames)
            latents = sampler(model, batch_context.to(dtype), shape, seed_base + start,
                              negative_embedding.expand(count, -1, -1).to(dtype))
            clips = vae.decode(denormalize_latents(latents.float()))
            readings += world.judge(clips)
        return readings

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "clip": {"frames": frames, "height": height, "width": width},
              "clips_per_split": args.per_split, "teacher_steps": args.teacher_steps, "guidance": args.guidance,
              "student_sparsity": args.sparsity, "bar": BAR}
    truth = world.judge(torch.cat([world.sample_clips(all_captions[i:i + 16], seed=7 + i, width=width, height=height,
                                                      frames=frames, device=device)
                                   for i in range(0, len(all_captions), 16)]))
    report["judge_on_ground_truth"] = _by_split(truth, splits)
    reference = np.array([r.features for r in generate(teacher, teacher_many, seed_base=10_000)])
    report["samplers"] = {}
    for name, (model, sampler) in samplers.items():
        started = time.perf_counter()
        readings = generate(model, sampler, seed_base=20_000)
        features = np.array([r.features for r in readings])
        report["samplers"][name] = {"adherence": _by_split(readings, splits),
                                    "frechet_to_teacher": round(world.frechet_distance(features, reference), 4),
                                    "seconds": round(time.perf_counter() - started, 1)}
    report["checks"] = _checks(report["samplers"], report["judge_on_ground_truth"])
    report["passed"] = all(report["checks"].values())
    print(json.dumps(report))
    return 0 if report["passed"] or args.smoke else 1


def _by_split(readings, splits) -> dict:
    n = len(splits["training"])
    return {"training": _rounded(world.adherence(readings[:n], splits["training"])),
            "held_out": _rounded(world.adherence(readings[n:], splits["held_out"]))}


def _rounded(values: dict) -> dict:
    return {k: round(v, 1) for k, v in values.items()}


def _checks(samplers: dict, judge_on_ground_truth: dict) -> dict:
    """The bar's checks by name (all must hold). The first two make the rest meaningful: with a teacher
    that draws no object, a student that draws none is "within 5 points" of it."""
    teacher, student = samplers["teacher"], samplers["student_vsa"]
    checks = {
        "judge_reads_ground_truth": all(judge_on_ground_truth[split]["all"] >= JUDGE_MIN_ACCURACY
                                        for split in ("training", "held_out")),
        "teacher_follows_training_captions": teacher["adherence"]["training"]["all"] >= TEACHER_MIN_ADHERENCE,
    }
    checks.update({f"student_vsa_adherence_{split}_within_5": student["adherence"][split]["all"]
                   >= teacher["adherence"][split]["all"] - 5 for split in ("training", "held_out")})
    checks["student_vsa_frechet_at_most_half_teacher_3step"] = (
        student["frechet_to_teacher"] <= 0.5 * samplers["teacher_3step"]["frechet_to_teacher"])
    if "control_vsa" in samplers:
        control = samplers["control_vsa"]
        checks["control_clearly_worse"] = (
            control["frechet_to_teacher"] > 2 * student["frechet_to_teacher"]
            or control["adherence"]["training"]["all"] <= student["adherence"]["training"]["all"] - 10)
    return checks


if __name__ == "__main__":
    sys.exit(main())
