"""Training data: turn videos + captions (`fastwan preprocess`) or prompts alone (`fastwan synth`,
the frozen teacher generates the latents) into the shard format of `training/data.py`.

Both write shard after shard atomically and skip shards that already exist, so a killed run
continues where it stopped when started again with the same arguments.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..fastwan_core.errors import InputError
from ..fastwan_core.latents import denormalize_latents, latent_shape, validate_video_size
from ..fastwan_core.pipeline import check_teacher_settings
from ..fastwan_core.schedule import (FASTWAN_SHIFT, FASTWAN_TIMESTEPS_TEXT, check_shift, check_timesteps,
                                     parse_timesteps, student_sigmas)
from .data import shard_path, write_negative_prompt, write_shard

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".webp")
CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str


def check_data_run(model_folder, out, samples_per_shard: int, device, parts: Sequence[str]) -> torch.device:
    """What `preprocess` and `synth` check before any model loads: the model folder's parts (headers
    of every file: complete, safetensors), the output folder writable, the shard size and the device.
    Returns the device. Raises InputError / CheckpointError."""
    from ..fastwan_core.files import check_writable
    from ..fastwan_core.pipeline import check_model_folder, parse_device

    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise InputError(f"--samples-per-shard {samples_per_shard}: must be a whole number >= 1")
    device = parse_device(None if device is None else str(device))
    check_writable(out, "--out", folder=True)
    if not Path(model_folder).is_dir():
        raise InputError(f"--model {model_folder}: no such folder; give a Wan/FastWan diffusers folder (holding "
                         f"{', '.join(p + '/' for p in parts)})")
    check_model_folder(Path(model_folder), parts=parts)
    return device


def find_clips(source: Path) -> list[Clip]:
    """Videos and their captions in `source`: either `captions.jsonl` with one
    {"video": relative path, "caption": text} per line, or `NAME.mp4` (webm, gif, ...) beside
    `NAME.txt`. Sorted, so shard contents do not depend on the file system's order."""
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"preprocess: {source} is not a folder. Give a folder of videos with NAME.txt "
                         f"captions beside them, or with a {CAPTIONS_FILE}.")
    index = source / CAPTIONS_FILE
    clips = []
    if index.is_file():
        for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                video, caption = source / entry["video"], str(entry["caption"])
            except (ValueError, KeyError, TypeError) as error:
                raise InputError(f"{index}:{number}: each line must be a JSON object with 'video' and "
                                 f"'caption' ({error}).") from error
            if not video.is_file():
                raise InputError(f"{index}:{number}: video {entry['video']!r} does not exist in {source}.")
            clips.append(Clip(video, caption))
        return clips
    missing = []
    for video in sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
        caption_file = video.with_suffix(".txt")
        if caption_file.is_file():
            clips.append(Clip(video, caption_file.read_text(encoding="utf-8").strip()))
        else:
            missing.append(video.name)
    if missing:
        raise InputError(f"preprocess: {len(missing)} videos in {source} have no caption file, e.g. "
                         f"{', '.join(missing[:3])}. Put the caption in NAME.txt beside NAME.mp4, or list "
                         f"videos and captions in {CAPTIONS_FILE}.")
    if not clips:
        raise InputError(f"preprocess: no videos ({', '.join(VIDEO_SUFFIXES)}) in {source}.")
    return clips


def fit_frames(frames: torch.Tensor, width: int, height: int, count: int) -> torch.Tensor:
    """uint8 frames [F, H0, W0, 3] -> float [count, height, width, 3] in 0..1: the first `count`
    frames, scaled so the shorter side fits (bilinear, antialiased) and center-cropped."""
    if frames.shape[0] < count:
        raise InputError(f"{frames.shape[0]} frames, fewer than the {count} needed")
    clip = frames[:count].permute(0, 3, 1, 2).float() / 255.0  # [F, 3, H0, W0]
    scale = max(height / clip.shape[2], width / clip.shape[3])
    resized_h, resized_w = max(height, round(clip.shape[2] * scale)), max(width, round(clip.shape[3] * scale))
    clip = F.interpolate(clip, size=(resized_h, resized_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (resized_h - height) // 2, (resized_w - width) // 2
    clip = clip[:, :, top:top + height, left:left + width].clamp(0, 1)
    return clip.permute(0, 2, 3, 1).contiguous()


def _shard_ranges(total: int, per_shard: int):
    for shard, start in enumerate(range(0, total, per_shard)):
        yield shard, start, min(start + per_shard, total)


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="shard")


def preprocess(source, model_folder, out, width: int = 832, height: int = 448, frames: int = 77,
               samples_per_shard: int = 8, device=None, dtype: Optional[torch.dtype] = None,
               negative_prompt: Optional[str] = None, log: Callable[[str], None] = print) -> Path:
    """Encode videos + captions into shards: Wan VAE latents (posterior mean, un-normalized) and umT5
    embeddings, plus the negative prompt's embedding. Clips shorter than `frames` are skipped with a
    warning. Returns the data folder."""
    from ..fastwan_core.text_encoder import WAN_NEGATIVE_PROMPT, UMT5TextEncoder
    from ..fastwan_core.vae import WanVAE
    from ..fastwan_core.video_io import read_video_frames

    validate_video_size(width, height, frames)
    clips = find_clips(Path(source))
    device = check_data_run(model_folder, out, samples_per_shard, device, parts=("text_encoder", "vae"))
    text_encoder = UMT5TextEncoder.from_folder(model_folder, dtype=dtype, device=device)
    vae = WanVAE.from_folder(model_folder, dtype=dtype, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # only once the models loaded: no empty folder on errors
    if not (out / "negative_prompt.safetensors").is_file():
        prompt = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        write_negative_prompt(out, text_encoder.encode([prompt]).float().cpu(), prompt)
    skipped = []
    ranges = list(_shard_ranges(len(clips), samples_per_shard))
    for shard, start, end in _progress(ranges, len(ranges), "preprocess"):
        path = shard_path(out, shard)
        if path.is_file():
            continue  # written by an earlier, interrupted run
        latents, captions = [], []
        for clip in clips[start:end]:
            try:
                pixels = fit_frames(torch.from_numpy(read_video_frames(clip.video)), width, height, frames)
            except InputError as error:
                skipped.append(f"{clip.video.name} ({error})")
                continue
            latents.append(vae.encode(pixels[None]).cpu())
            captions.append(clip.caption)
        if not latents:
            continue
        embeddings = text_encoder.encode(captions).float().cpu()
        write_shard(path, torch.cat(latents), embeddings, prompts=captions)
    if skipped:
        warnings.warn(f"preprocess skipped {len(skipped)} clips: {'; '.join(skipped[:5])}", stacklevel=2)
    log(f"preprocess: {len(clips) - len(skipped)} clips in {len(ranges)} shards under {out}")
    return out


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"synth: prompts file {path} does not exist (one prompt per line).")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"synth: {path} holds no prompts (one prompt per line).")
    return prompts


def check_resumed_trajectory(out, trajectory_sigmas: Optional[Sequence[float]]) -> None:
    """A resumed `synth` (it skips the shards that exist) must write what the existing shards hold:
    the teacher ODE states at the same sigmas, or none. Raises InputError before any model loads."""
    from safetensors import safe_open

    wanted = None if trajectory_sigmas is None else [round(float(s), 6) for s in trajectory_sigmas]
    for shard in sorted(Path(out).glob("shard-*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                text = (handle.metadata() or {}).get("trajectory_sigmas")
        except Exception:  # a damaged shard: ShardDataset names it when training reads the folder
            continue
        held = None if text is None else [round(float(s), 6) for s in json.loads(text)]
        if held != wanted:
            have = "no teacher ODE states" if held is None else f"teacher ODE states at sigmas {held}"
            want = "none" if wanted is None else f"states at sigmas {wanted}"
            raise InputError(f"synth: {shard} from an earlier run holds {have}, but this run would write {want}; "
                             f"synth resumes a folder only with the same --trajectory settings. Write to a new "
                             f"--out folder, or repeat the earlier run's flags.")


def synth(prompts: Sequence[str], model_folder, out, width: int = 832, height: int = 448, frames: int = 77,
          num_steps: int = 50, guidance: float = 5.0, shift: float = 8.0, seed: int = 0,
          samples_per_shard: int = 8, sampler: str = "unipc", device=None, dtype: Optional[torch.dtype] = None,
          negative_prompt: Optional[str] = None, trajectory_timesteps: Optional[Sequence[float]] = None,
          trajectory_shift: float = FASTWAN_SHIFT, log: Callable[[str], None] = print) -> Path:
    """The frozen teacher (dense, multi-step, CFG) turns prompts into latents; no video and no VAE
    needed. Sample i uses seed `seed + i`, so shards are reproducible and independent of sharding; each
    shard keeps the noise each sample started from (`noise`), so its samples are teacher ODE pairs.

    trajectory_timesteps: a student's timesteps (on the grid of `trajectory_shift`, as the distill
    config's [dmd] student_timesteps and shift); each shard then also keeps the teacher ODE's state at
    each of their sigmas (`trajectory`, `sampling.ODEStates`) for [dmd] regression_inputs =
    "trajectory". It costs K more latents of storage per sample and no extra model call."""
    from ..fastwan_core.attention import AttentionConfig
    from ..fastwan_core.checkpoint import load_dit
    from ..fastwan_core.sampling import ODEStates, sample_euler, sample_unipc, seeded_noise
    from ..fastwan_core.text_encoder import WAN_NEGATIVE_PROMPT, UMT5TextEncoder

    shape = latent_shape(1, width, height, frames)
    check_teacher_settings(num_steps, guidance, shift, sampler)
    trajectory_sigmas = None
    if trajectory_timesteps is not None:
        check_timesteps(tuple(trajectory_timesteps), "--student-timesteps")
        trajectory_sigmas = student_sigmas(trajectory_timesteps, check_shift(trajectory_shift, "--student-shift"))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"--seed {seed}: must be a whole number >= 0")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError("synth: every prompt must be non-empty text (one prompt per line)")
    device = check_data_run(model_folder, out, samples_per_shard, device, parts=("text_encoder", "transformer"))
    check_resumed_trajectory(out, trajectory_sigmas)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    text_encoder = UMT5TextEncoder.from_folder(model_folder, dtype=dtype, device=device)
    teacher = load_dit(Path(model_folder), dtype=dtype, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # only once the models loaded: no empty folder on errors
    negative = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    negative_context = text_encoder.encode([negative])
    if not (out / "negative_prompt.safetensors").is_file():
        write_negative_prompt(out, negative_context.float().cpu(), negative)
    teacher.attention = AttentionConfig()  # the teacher is dense
    sample = sample_unipc if sampler == "unipc" else sample_euler
    ranges = list(_shard_ranges(len(prompts), samples_per_shard))
    for shard, start, end in _progress(ranges, len(ranges), "synth"):
        path = shard_path(out, shard)
        if path.is_file():
            continue
        batch = list(prompts[start:end])
        context = text_encoder.encode(batch)
        latents, noises, trajectories = [], [], []
        for offset in range(len(batch)):
            states = ODEStates(trajectory_sigmas) if trajectory_sigmas is not None else None
            x0 = sample(teacher, context[offset:offset + 1], shape, seed + start + offset,
                        negative_context=negative_context, guidance=guidance, num_steps=num_steps, shift=shift,
                        device=device, ode_states=states)
            latents.append(denormalize_latents(x0.float()).cpu())
            if states is not None:
                trajectories.append(states.stacked().cpu())
            # the noise the sampler started from (its first draw from this seed): with the sample, a
            # teacher ODE pair for the regression term
            noises.append(seeded_noise(shape, torch.Generator("cpu").manual_seed(seed + start + offset), "cpu"))
        write_shard(path, torch.cat(latents), context.float().cpu(), prompts=batch, noise=torch.cat(noises),
                    trajectory=torch.cat(trajectories) if trajectories else None, trajectory_sigmas=trajectory_sigmas)
    log(f"synth: {len(prompts)} teacher samples ({num_steps} {sampler} steps, CFG {guidance}) in "
        f"{len(ranges)} shards under {out}")
    return out


# -- command line ----------------------------------------------------------------------------------

def add_parsers(subparsers) -> None:
    """Register `fastwan preprocess` and `fastwan synth`."""
    def common(parser):
        parser.add_argument("--model", required=True, help="Wan/FastWan diffusers folder (text_encoder/, tokenizer/, "
                                                          "vae/; synth also transformer/ = the teacher)")
        parser.add_argument("--out", required=True, help="data folder to write shards into (resumes if present)")
        parser.add_argument("--width", type=int, default=832, help="multiple of 16")
        parser.add_argument("--height", type=int, default=448, help="multiple of 16")
        parser.add_argument("--frames", type=int, default=77, help="4k+1 frames per clip (recipe: 77)")
        parser.add_argument("--samples-per-shard", type=int, default=8, help="samples in each shard file")
        parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
        parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                            help="weights dtype (default bf16 on CUDA, fp32 on CPU)")
        parser.add_argument("--negative-prompt", default=None, help="the negative prompt (default: Wan's)")

    pre = subparsers.add_parser("preprocess", help="videos + captions -> training shards (VAE latents, umT5 states)",
                                description="Encode a folder of videos (NAME.mp4 + NAME.txt, or captions.jsonl) "
                                            "into shards for `fastwan distill`.")
    pre.add_argument("--videos", required=True, help="folder of videos with captions")
    common(pre)
    pre.set_defaults(run=_run_preprocess)

    syn = subparsers.add_parser("synth", help="prompts -> training shards sampled by the dense teacher (no videos)",
                                description="The teacher (multi-step, CFG) generates latents for each prompt.")
    syn.add_argument("--prompts", required=True, help="text file, one prompt per line")
    syn.add_argument("--steps", type=int, default=50, help="teacher sampler steps")
    syn.add_argument("--guidance", type=float, default=5.0, help="standard CFG scale")
    syn.add_argument("--shift", type=float, default=8.0, help="flow shift, > 0")
    syn.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    syn.add_argument("--sampler", default="unipc", choices=["unipc", "euler"], help="teacher sampler")
    syn.add_argument("--trajectory", action="store_true",
                     help="also keep the teacher ODE's state at each student sigma (for [dmd] regression_inputs = "
                          "\"trajectory\", the balanced recipe); K more latents per sample")
    syn.add_argument("--student-timesteps", default=FASTWAN_TIMESTEPS_TEXT,
                     help="with --trajectory: the distill config's [dmd] student_timesteps, comma-separated")
    syn.add_argument("--student-shift", type=float, default=FASTWAN_SHIFT,
                     help="with --trajectory: the distill config's [dmd] shift")
    common(syn)
    syn.set_defaults(run=_run_synth)


def _dtype(name):
    from ..fastwan_core.pipeline import DTYPES

    return None if name is None else DTYPES[name]  # None: each model's own default for the device


def _run_preprocess(args) -> int:
    preprocess(args.videos, args.model, args.out, width=args.width, height=args.height, frames=args.frames,
               samples_per_shard=args.samples_per_shard, device=args.device, dtype=_dtype(args.dtype),
               negative_prompt=args.negative_prompt)
    return 0


def _run_synth(args) -> int:
    synth(read_prompts(args.prompts), args.model, args.out, width=args.width, height=args.height,
          frames=args.frames, num_steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed,
          samples_per_shard=args.samples_per_shard, sampler=args.sampler, device=args.device,
          dtype=_dtype(args.dtype), negative_prompt=args.negative_prompt,
          trajectory_timesteps=parse_timesteps(args.student_timesteps, "--student-timesteps") if args.trajectory
          else None, trajectory_shift=args.student_shift)
    return 0
