"""Training the tiny world's models with the project's real classes at small sizes.

- `fastwan world-vae`: a small diffusers `AutoencoderKLWan` (Wan's strides: 8x space, 4x time, 16
  latent channels) trained as an autoencoder on world clips (MSE + a small KL, random spatial crops of
  whole 29-frame clips), then re-scaled so that its latents have Wan's per-channel means and stds: the trainer,
  the samplers and ComfyUI all normalize with Wan's constants, so the world's latents must fit them.
- `fastwan world-teacher`: the text encoder (the demo's tiny random umT5, with a tokenizer trained
  on the world's words) and a small dense `WanDiT` trained by flow matching on VAE latents of world
  clips, with 10% of captions replaced by the empty prompt for classifier-free guidance. Writes a
  complete diffusers model folder (transformer/ = the teacher) that `fastwan synth` reads.
- `fastwan world-prompts`: training captions, one per line, for `fastwan synth`.
- `fastwan world-pack`: the shipped folder: the distilled student in transformer/, the teacher in
  teacher/, the text encoder, tokenizer and VAE, all from one training run.

The whole recipe, with the commands and checksums of the shipped weights, is in
`models/tiny_world/README.md`.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..fastwan_core.config import WanConfig
from ..fastwan_core.errors import InputError
from ..fastwan_core.latents import LATENT_CHANNELS, WAN_LATENT_MEAN, WAN_LATENT_STD, normalize_latents
from . import tiny_world as world

# The world's model sizes. The DiT keeps Wan's head dim 128 (so load_dit infers it from shapes).
WORLD_DIT = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64, freq_dim=64)
WORLD_VAE = dict(base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                 temperal_downsample=[False, True, True])
TEXT_SEED = 0
CAPTION_DROPOUT = 0.1
LOG_EVERY = 200  # teacher steps between loss reports
TEACHER_TRAIN_SHIFT = 3.0  # training sigmas: shift_sigma(uniform, 3), weighted towards noise like sampling

Log = Callable[[str], None]


def _device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _cosine(progress: float, started: float, time_limit: float) -> float:
    """Cosine decay 1 -> 0 over the run, whichever of steps or the time limit runs out first."""
    if time_limit:
        progress = max(progress, (time.perf_counter() - started) / time_limit)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- text encoder ---------------------------------------------------------------------------------

def build_text_encoder(folder, seed: int = TEXT_SEED) -> Path:
    """Write `tokenizer/` and `text_encoder/` into `folder`: the demo's tiny random umT5 (2 layers,
    width WORLD_DIT.text_dim) and a sentencepiece tokenizer trained on the world's captions, so every
    word is one or a few pieces. The same seed writes the same files."""
    from transformers import UMT5EncoderModel

    from ..fastwan_core.demo_models import build_tiny_tokenizer, tiny_umt5_config

    folder = Path(folder)
    sentences = [caption.text for caption in world.ALL_CAPTIONS]
    tokenizer = build_tiny_tokenizer(folder / "tokenizer", sentences=sentences)
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(tiny_umt5_config(vocab_size=len(tokenizer), d_model=WORLD_DIT.text_dim))
    encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    return folder


def encode_captions(folder, texts, device) -> torch.Tensor:
    """umT5 embeddings [N, 512, text_dim] float32 of `texts` with the folder's text encoder."""
    from ..fastwan_core.text_encoder import UMT5TextEncoder

    encoder = UMT5TextEncoder.from_folder(folder, dtype=torch.float32, device=device)
    return encoder.encode(list(texts)).float()


# -- VAE -----------------------------------------------------------------------------------------

def _pixels(clips: torch.Tensor) -> torch.Tensor:
    """[N, F, H, W, 3] in 0..1 -> the VAE's [N, 3, F, H, W] in -1..1."""
    return clips.permute(0, 4, 1, 2, 3) * 2 - 1


def _world_batch(count: int, seed: int, device, frames: int = world.FRAMES, width: int = world.WIDTH,
                 height: int = world.HEIGHT, pool=world.TRAINING):
    captions = world.random_captions(count, seed, pool)
    return captions, world.sample_clips(captions, seed, width, height, frames, device=device)


def decode_unclamped(vae, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode(latents)` before diffusers clamps it to -1..1: the clamp has no gradient outside
    that range, so a decoder trained through it leaves pixels that overshoot stuck on the wrong side
    (reconstructions never sharpen). Collects the decoder's per-chunk outputs with a forward hook."""
    chunks = []
    handle = vae.decoder.register_forward_hook(lambda module, inputs, output: chunks.append(output))
    try:
        vae.decode(latents)
    finally:
        handle.remove()
    return torch.cat(chunks, dim=2)


def object_crops(clips: torch.Tensor, crop, generator: torch.Generator) -> torch.Tensor:
    """A spatial crop of each clip that holds its object: centred on the object's centroid in a random
    frame, shifted by up to a quarter crop. [N, F, H, W, 3] -> [N, F, crop_h, crop_w, 3].

    Crops at random places hold mostly background (an object covers about 3% of a frame), and a VAE
    trained on them learns to draw the background alone, with a PSNR that looks fine because the
    background is most of the picture."""
    count, frames, height, width, _ = clips.shape
    crop_height, crop_width = crop
    background = clips[:, 0, 0, 0]  # the renderer keeps objects EDGE_MARGIN pixels off the edges
    crops = []
    for index in range(count):
        frame = int(torch.randint(0, frames, (1,), generator=generator))
        ys, xs = torch.nonzero(world.object_mask(clips[index, frame][None], background[index][None])[0],
                               as_tuple=True)
        centre_y, centre_x = ((ys.float().mean().item(), xs.float().mean().item()) if ys.numel()
                              else (height / 2, width / 2))
        shift_y, shift_x = ((torch.rand(2, generator=generator) - 0.5) * 0.5).tolist()
        top = int(round(min(max(centre_y + shift_y * crop_height - crop_height / 2, 0), height - crop_height)))
        left = int(round(min(max(centre_x + shift_x * crop_width - crop_width / 2, 0), width - crop_width)))
        crops.append(clips[index, :, top:top + crop_height, left:left + crop_width])
    return torch.stack(crops)


def train_vae(out, steps: int = 2000, time_limit: float = 0.0, batch: int = 8, lr: float = 2e-4,
              crop=(64, 64), kl_weight: float = 1e-4, seed: int = 0, device=None, clip_size=None,
              min_adherence: float = 0.0, init=None, log: Log = print) -> dict:
    """Train the world VAE and save it (diffusers `save_pretrained`) at `out`. Returns figures:
    steps done, seconds, PSNR (dB) of reconstructions of 16 held-out-caption clips at full size, and
    the judge's caption adherence on those reconstructions (% of clips read right): PSNR alone looks
    fine for a VAE that drops the objects. With `min_adherence` > 0 a VAE whose reconstructions fall
    below it is still saved, then InputError says so (the teacher would learn a world without objects).

    The decoder reads the posterior mean (a deterministic autoencoder with a small KL on the
    posterior): with the posterior's initial unit variance, sampled latents are mostly noise and
    reconstructions stay blurred for thousands of steps.

    crop: (height, width) of the training crops (`object_crops`), multiples of 8. Crops are spatial
        only: the causal VAE carries a feature cache from chunk to chunk of 4 frames, and one trained on
        short clips drifts on long ones (reconstruction error growing with the frame index).
    time_limit: stop early after this many seconds (0: none).
    clip_size: (frames, height, width) of the world clips (default the world's size).
    init: a VAE folder written by an earlier `world-vae` to go on training (one that stopped short of
        `min_adherence`): runs of a few minutes add up. Its clips repeat the earlier run's unless `seed`
        differs.
    """
    from diffusers import AutoencoderKLWan

    device = _device(device)
    frames, height, width = clip_size or (world.FRAMES, world.HEIGHT, world.WIDTH)
    crop_height, crop_width = crop
    if crop_height % 8 or crop_width % 8 or crop_height > height or crop_width > width:
        raise InputError(f"world-vae: crop {crop} must be multiples of 8 within the clip size {height}x{width}")
    torch.manual_seed(seed)
    if init is not None:
        vae = AutoencoderKLWan.from_pretrained(str(check_world_vae(init, "world-vae: --init")),
                                               torch_dtype=torch.float32).to(device).train()
    else:
        vae = AutoencoderKLWan(**WORLD_VAE).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    crop_generator = torch.Generator().manual_seed(seed + 1)
    started, step = time.perf_counter(), 0
    for step in range(1, steps + 1):
        _, clips = _world_batch(batch, seed * 7919 + step, device, frames, width, height)
        x = _pixels(object_crops(clips, crop, crop_generator))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = decode_unclamped(vae, posterior.mean)
        loss = F.mse_loss(recon.float(), x) + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        for g in optimizer.param_groups:
            g["lr"] = lr * min(1.0, step / 100) * (0.1 + 0.9 * _cosine(step / steps, started, time_limit))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == 1:
            log(f"world-vae step {step}/{steps} loss {float(loss.detach()):.5f} ({time.perf_counter() - started:.0f} s)")
        if time_limit and time.perf_counter() - started > time_limit:
            break
    vae.eval()
    calibrate_vae(vae, seed=seed + 2, device=device, clip_size=(frames, height, width))
    psnr, adherence = reconstruction_quality(vae, device=device, clip_size=(frames, height, width))
    figures = {"steps": step, "seconds": round(time.perf_counter() - started, 1), "psnr_db": round(psnr, 2),
               "reconstruction_adherence": {k: round(v, 1) for k, v in adherence.items()}}
    out = Path(out)
    vae.save_pretrained(str(out), safe_serialization=True)
    log(f"world-vae: {json.dumps(figures)} -> {out}")
    if adherence["all"] < min_adherence:
        raise InputError(f"world-vae: the judge reads only {adherence['all']:.0f}% of the VAE's reconstructions "
                         f"right (needed {min_adherence:.0f}%; colour {adherence['color']:.0f}%, shape "
                         f"{adherence['shape']:.0f}%): it loses the objects, and a teacher trained on its latents "
                         f"would draw none. The VAE is saved at {out}; train it longer: `fastwan world-vae --init {out} "
                         f"--out {out}-more --seed {seed + 1}` (then use {out}-more), or a longer --time-limit.")
    return figures


def check_world_vae(folder, where: str) -> Path:
    """A folder holding a VAE of the world's architecture (WORLD_VAE), or InputError saying what is off."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise InputError(f"{where} {folder} holds no VAE (config.json); give a folder written by `fastwan world-vae`.")
    values = json.loads(config.read_text())
    different = {key: values.get(key) for key, wanted in WORLD_VAE.items() if values.get(key) != wanted}
    if different:
        raise InputError(f"{where} {folder} is not the world's VAE architecture: {different} differ from "
                         f"{ {key: WORLD_VAE[key] for key in different} }.")
    return folder


@torch.no_grad()
def calibrate_vae(vae, seed: int, device, count: int = 32, clip_size=None) -> None:
    """Fold an exact per-channel affine map into the VAE's 1x1x1 quant convs so that the posterior
    means of world clips have Wan's latent means and stds (and decode to the same pixels as before)."""
    frames, height, width = clip_size or (world.FRAMES, world.HEIGHT, world.WIDTH)
    means = []
    for start in range(0, count, 8):
        _, clips = _world_batch(8, seed + start, device, frames, width, height)
        means.append(vae.encode(_pixels(clips).to(next(vae.parameters()).dtype)).latent_dist.mean.float())
    latents = torch.cat(means).transpose(0, 1).reshape(LATENT_CHANNELS, -1)  # [16, N*T*H*W]
    data_mean, data_std = latents.mean(1), latents.std(1).clamp(min=1e-4)
    wan_mean = torch.tensor(WAN_LATENT_MEAN, device=latents.device)
    wan_std = torch.tensor(WAN_LATENT_STD, device=latents.device)
    scale = wan_std / data_std  # new = scale * old + offset
    offset = wan_mean - scale * data_mean
    quant, post = vae.quant_conv, vae.post_quant_conv
    weight, bias = quant.weight.data, quant.bias.data  # [32, 32, 1, 1, 1]: rows 0..15 mean, 16..31 logvar
    weight[:LATENT_CHANNELS] *= scale.view(-1, 1, 1, 1, 1).to(weight.dtype)
    bias[:LATENT_CHANNELS] = (bias[:LATENT_CHANNELS] * scale + offset).to(bias.dtype)
    bias[LATENT_CHANNELS:] += (2 * torch.log(scale)).to(bias.dtype)
    # post_quant_conv reads new latents: old = (new - offset) / scale.
    post_weight = post.weight.data  # [16 out, 16 in, 1, 1, 1]
    post.bias.data -= (post_weight[..., 0, 0, 0] @ (offset / scale)).to(post.bias.dtype)
    post_weight /= scale.view(1, -1, 1, 1, 1).to(post_weight.dtype)


@torch.no_grad()
def reconstruction_quality(vae, device, count: int = 16, seed: int = 123456, clip_size=None) -> tuple[float, dict]:
    """(mean PSNR in dB with pixels in 0..1, the judge's `world.adherence`) of the VAE's reconstructions
    of world clips with held-out captions (posterior mean, decoded)."""
    from ..fastwan_core.vae import WanVAE

    frames, height, width = clip_size or (world.FRAMES, world.HEIGHT, world.WIDTH)
    captions, clips = _world_batch(count, seed, device, frames, width, height, pool=world.HELD_OUT)
    codec = WanVAE(vae)  # the pixel conventions (0..1 frames, clamped decode) of the pipeline
    psnrs, readings = [], []
    for clip in clips.split(4):
        recon = codec.decode(codec.encode(clip))
        mse = (recon - clip.float()).pow(2).mean(dim=(1, 2, 3, 4))
        psnrs.append(-10 * torch.log10(mse.clamp(min=1e-10)))
        readings += world.judge(recon)
    return float(torch.cat(psnrs).mean()), world.adherence(readings, captions)


# -- teacher ---------------------------------------------------------------------------------------

@torch.no_grad()
def encode_pool(vae_folder, count: int, seed: int, device, clip_size=None):
    """`count` world clips with training captions -> (normalized latents [count, 16, T, h, w], captions)."""
    from ..fastwan_core.vae import WanVAE

    frames, height, width = clip_size or (world.FRAMES, world.HEIGHT, world.WIDTH)
    vae = WanVAE.from_folder(vae_folder, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
                             device=device)
    captions, latents = [], []
    for start in range(0, count, 16):
        batch_captions, clips = _world_batch(min(16, count - start), seed + start, device, frames, width, height)
        latents.append(normalize_latents(vae.encode(clips)))
        captions += batch_captions
    return torch.cat(latents), captions


def train_teacher(vae_folder, out, steps: int = 3000, time_limit: float = 0.0, batch: int = 32, lr: float = 3e-4,
                  pool_size: int = 2048, ema: float = 0.999, seed: int = 0, device=None, clip_size=None,
                  config: WanConfig = WORLD_DIT, log: Log = print) -> dict:
    """Train the dense teacher by flow matching and write a complete diffusers model folder at `out`
    (transformer/ = the EMA teacher, text_encoder/, tokenizer/, vae/, scheduler/, model_index.json).

    pool_size: world clips encoded once before training (each seen many times).
    time_limit: stop early after this many seconds of training (0: none).
    """
    from ..fastwan_core.checkpoint import save_dit
    from ..fastwan_core.model import WanDiT
    from ..fastwan_core.schedule import add_noise, shift_sigma

    device = _device(device)
    out = Path(out)
    vae_folder = check_world_vae(vae_folder, "world-teacher: --vae")
    scratch = out.with_name(out.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    build_text_encoder(scratch)
    shutil.copytree(vae_folder, scratch / "vae")
    _write_pipeline_files(scratch)

    started = time.perf_counter()
    latents, captions = encode_pool(scratch, pool_size, seed, device, clip_size)
    texts = sorted({c.text for c in captions})
    table = encode_captions(scratch, texts + [world.NEGATIVE_PROMPT], device)  # [K+1, 512, D]
    row = {text: i for i, text in enumerate(texts)}
    caption_rows = torch.tensor([row[c.text] for c in captions], device=device)
    negative_row = len(texts)
    log(f"world-teacher: encoded {pool_size} clips in {time.perf_counter() - started:.0f} s; latents "
        f"{list(latents.shape[1:])}, std {float(latents.float().std()):.3f}")

    torch.manual_seed(seed)
    model = WanDiT(config).to(device).train()
    average = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    # Random draws on the device and the loss read every LOG_EVERY steps: a CPU draw copied over or a
    # loss read each step would make the host wait for the GPU every step, and the run trains for a
    # fixed wall-clock budget.
    generator = torch.Generator(device).manual_seed(seed + 1)
    started, step, window_loss, window_steps, mean_loss = time.perf_counter(), 0, 0.0, 0, float("nan")
    for step in range(1, steps + 1):
        index = torch.randint(0, len(latents), (batch,), generator=generator, device=device)
        x0 = latents[index].float()
        rows = torch.where(torch.rand(batch, generator=generator, device=device) < CAPTION_DROPOUT,
                           torch.full_like(caption_rows[index], negative_row), caption_rows[index])
        sigma = shift_sigma(torch.rand(batch, generator=generator, device=device), TEACHER_TRAIN_SHIFT)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        x_t = add_noise(x0, noise, sigma)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            velocity = model(x_t, sigma * 1000, table[rows])
        loss = F.mse_loss(velocity.float(), noise - x0)
        for g in optimizer.param_groups:
            g["lr"] = lr * min(1.0, step / 200) * (0.05 + 0.95 * _cosine(step / steps, started, time_limit))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            for target, source in zip(average.parameters(), model.parameters()):
                target.lerp_(source, 1 - decay)
        window_loss, window_steps = window_loss + loss.detach(), window_steps + 1
        out_of_time = bool(time_limit) and time.perf_counter() - started > time_limit
        if step % LOG_EVERY == 0 or step == 1 or step == steps or out_of_time:
            mean_loss, window_loss, window_steps = float(window_loss) / window_steps, 0.0, 0
            log(f"world-teacher step {step}/{steps} loss {mean_loss:.4f} ({time.perf_counter() - started:.0f} s)")
        if out_of_time:
            break
    save_dit(average.float().cpu(), scratch / "transformer", layout="diffusers")
    if out.exists():
        shutil.rmtree(out)
    scratch.rename(out)
    figures = {"steps": step, "seconds": round(time.perf_counter() - started, 1),
               "final_loss": round(mean_loss, 4)}
    log(f"world-teacher: {json.dumps(figures)} -> {out}")
    return figures


def _write_pipeline_files(folder: Path) -> None:
    """model_index.json and scheduler/ of a diffusers WanPipeline folder."""
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0,
                            num_train_timesteps=1000).save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# -- packing the shipped folder ------------------------------------------------------------------

def teacher_model_folder(shipped, out) -> Path:
    """A complete model folder whose transformer/ is the shipped folder's teacher (what `fastwan
    synth --model` reads), linked to the shipped text encoder, tokenizer and VAE."""
    shipped, out = Path(shipped), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for part in ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json"):
        target = out / part
        if not target.exists():
            target.symlink_to((shipped / part).resolve())
    if not (out / "transformer").exists():
        (out / "transformer").symlink_to((shipped / "teacher").resolve())
    return out


def pack(teacher_model, student, out, dtype: str = "bf16", log: Log = print) -> Path:
    """The shipped folder: transformer/ = the student (FastWan layout, VSA gates), teacher/ = the
    dense teacher, vae/ (all three in `dtype`), plus the teacher folder's text_encoder/, tokenizer/,
    scheduler/."""
    from ..fastwan_core.checkpoint import load_dit, save_dit
    from ..fastwan_core.pipeline import DTYPES

    teacher_model, out = Path(teacher_model), Path(out)
    scratch = out.with_name(out.name + ".building")
    shutil.rmtree(scratch, ignore_errors=True)
    for part in ("text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(teacher_model / part, scratch / part)
    save_vae(teacher_model / "vae", scratch / "vae", DTYPES[dtype])
    shutil.copy(teacher_model / "model_index.json", scratch / "model_index.json")
    save_dit(load_dit(student, dtype=DTYPES[dtype]), scratch / "transformer", layout="fastwan")
    save_dit(load_dit(teacher_model / "transformer", dtype=DTYPES[dtype]), scratch / "teacher", layout="diffusers")
    write_readme(scratch)
    if out.exists():
        shutil.rmtree(out)
    scratch.rename(out)
    log(f"world-pack: wrote {out}")
    return out


SHIPPED_README = """# The tiny world's models

Trained from scratch by `bash scripts/train_tiny_world.sh` (one GPU, about 8 minutes), every stage a
`fastwan` command: `world-vae` (the VAE), `world-teacher` (text encoder, tokenizer and the dense teacher
DiT), `world-prompts` + `synth` (teacher samples), `distill --config training/configs/tiny_world.toml`
(the 3-step VSA student, DMD) and `world-pack` (this folder). docs/training.md, "The tiny world", has
the benchmark figures.

- transformer/: the distilled student (FastWan layout, VSA gates), bf16
- teacher/: the dense teacher (diffusers layout), bf16
- vae/: AutoencoderKLWan at width 16, bf16
- text_encoder/, tokenizer/: a 2-layer umT5 (random, fixed weights) and a tokenizer of the world's words

SHA-256 of every file:

"""


def write_readme(folder: Path) -> Path:
    """The shipped folder's README.md: what each part is, how it was made, and every file's SHA-256
    (tests/test_tiny_world.py checks them)."""
    import hashlib

    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
        lines.append(f"    {hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder).as_posix()}")
    readme = folder / "README.md"
    readme.write_text(SHIPPED_README + "\n".join(lines) + "\n")
    return readme


def save_vae(source, out, dtype: torch.dtype) -> Path:
    """Re-save a VAE folder with its weights in `dtype` (the shipped folder's bf16 halves its size)."""
    from diffusers import AutoencoderKLWan

    AutoencoderKLWan.from_pretrained(str(source), torch_dtype=dtype).save_pretrained(str(out), safe_serialization=True)
    config = Path(out) / "config.json"
    values = json.loads(config.read_text())
    values.pop("_name_or_path", None)  # a path on the machine that packed it
    config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return Path(out)


def write_prompts(path, count: int, seed: int) -> Path:
    """`count` training captions (uniform over TRAINING combinations, with replacement), one a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(c.text + "\n" for c in world.random_captions(count, seed)))
    return path


# -- command line ----------------------------------------------------------------------------------

def add_parsers(subparsers) -> None:
    vae = subparsers.add_parser("world-vae", help="train the tiny world's VAE (AutoencoderKLWan, small width)")
    vae.add_argument("--out", required=True, help="folder for the VAE (diffusers save_pretrained)")
    vae.add_argument("--steps", type=int, default=2000)
    vae.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds (0: none)")
    vae.add_argument("--batch", type=int, default=8)
    vae.add_argument("--lr", type=float, default=2e-4)
    vae.add_argument("--seed", type=int, default=0)
    vae.add_argument("--device", default=None)
    vae.add_argument("--init", default=None,
                     help="go on training this VAE folder (from an earlier world-vae run); use another --seed")
    vae.add_argument("--min-adherence", type=float, default=0.0,
                     help="fail (exit status 2, the VAE still saved) when the judge reads fewer than this %% of "
                          "reconstructed held-out clips right")
    vae.set_defaults(run=lambda a: _print(train_vae(a.out, a.steps, a.time_limit, a.batch, a.lr, seed=a.seed,
                                                    device=a.device, min_adherence=a.min_adherence, init=a.init)))

    teacher = subparsers.add_parser("world-teacher", help="train the tiny world's dense teacher DiT (flow matching)")
    teacher.add_argument("--vae", required=True, help="the VAE folder written by world-vae")
    teacher.add_argument("--out", required=True, help="model folder to write (transformer/ = the teacher)")
    teacher.add_argument("--steps", type=int, default=3000)
    teacher.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds (0: none)")
    teacher.add_argument("--batch", type=int, default=32)
    teacher.add_argument("--lr", type=float, default=3e-4)
    teacher.add_argument("--pool", type=int, default=2048, help="world clips encoded for training")
    teacher.add_argument("--seed", type=int, default=0)
    teacher.add_argument("--device", default=None)
    teacher.set_defaults(run=lambda a: _print(train_teacher(a.vae, a.out, a.steps, a.time_limit, a.batch, a.lr,
                                                            a.pool, seed=a.seed, device=a.device)))

    prompts = subparsers.add_parser("world-prompts", help="training captions of the tiny world, one per line")
    prompts.add_argument("--out", required=True)
    prompts.add_argument("--count", type=int, default=256)
    prompts.add_argument("--seed", type=int, default=0)
    prompts.set_defaults(run=lambda a: _print({"prompts": str(write_prompts(a.out, a.count, a.seed))}))

    packer = subparsers.add_parser("world-pack", help="assemble the shipped tiny-world folder (student + teacher)")
    packer.add_argument("--teacher-model", required=True, help="the folder written by world-teacher")
    packer.add_argument("--student", required=True, help="the student exported by `fastwan export`")
    packer.add_argument("--out", required=True)
    packer.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    packer.set_defaults(run=lambda a: _print({"packed": str(pack(a.teacher_model, a.student, a.out, a.dtype))}))


def _print(figures: dict) -> int:
    print(json.dumps(figures), flush=True)
    return 0
