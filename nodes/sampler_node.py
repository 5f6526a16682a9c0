"""3-Step DMD Sampler: text conditioning + FASTWAN_MODEL -> a LATENT that core VAEDecode decodes.

Interop with core nodes:
- `positive` is core CLIPTextEncode's CONDITIONING with the umT5 encoder (CLIPLoader type "wan"):
  a list of [embeddings [B, L, 4096], {...}]. ComfyUI pads the umT5 tokens to at least 512 and
  zeroes the padded rows (attention mask applied to the output), which is exactly Wan's own
  context: the prompt's embeddings followed by zero rows up to 512. Shorter contexts (other
  encoders, hand-made conditioning) are zero-padded to the model's `text_len` (512) the same way;
  longer ones (prompts over 512 tokens) are kept whole, as ComfyUI's own Wan model does.
- The output LATENT holds un-normalized Wan latents [B, 16, (F-1)/4+1, H/8, W/8], what core
  VAEDecode with wan_2.1_vae.safetensors expects (core samplers return the same).
"""
from __future__ import annotations

import math

import torch

from ..fastwan_core.errors import InputError
from ..fastwan_core.latents import (LATENT_CHANNELS, VAE_SPATIAL_STRIDE, VAE_TEMPORAL_STRIDE,
                                    denormalize_latents, latent_shape, validate_video_size)
from ..fastwan_core.sampling import sample_dmd
from ..fastwan_core.schedule import FASTWAN_SHIFT, FASTWAN_TIMESTEPS_TEXT, parse_timesteps
from . import comfy_env
from .model_nodes import CATEGORY, FASTWAN_MODEL, attention_of, dit_of

NODE_NAME = "3-Step DMD Sampler"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def conditioning_context(positive, text_dim: int, text_len: int, batch: int) -> torch.Tensor:
    """CONDITIONING -> context [batch, max(L, text_len), text_dim] float32 (zero rows appended).

    Only the first entry is used: area/timestep-combined conditioning has no meaning for this
    sampler.
    """
    if not isinstance(positive, (list, tuple)) or not positive or not isinstance(positive[0], (list, tuple)):
        raise InputError(f"{NODE_NAME}: 'positive' is not CONDITIONING. Connect a CLIPTextEncode node whose "
                         "clip comes from CLIPLoader with umt5_xxl_fp8_e4m3fn_scaled.safetensors, type wan.")
    if len(positive) > 1:
        comfy_env.log.warning("%s: the positive conditioning has %d entries (combined conditioning); only the "
                              "first is used.", NODE_NAME, len(positive))
    embeddings = positive[0][0]
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3:
        raise InputError(f"{NODE_NAME}: 'positive' holds no [batch, tokens, channels] text embeddings. Use "
                         "CLIPTextEncode with the umT5 text encoder (CLIPLoader type wan).")
    cond_batch, tokens, channels = embeddings.shape
    if channels != text_dim:
        raise InputError(f"{NODE_NAME}: the text embeddings have {channels} channels but the model expects "
                         f"{text_dim} (umT5-XXL). Load umt5_xxl_fp8_e4m3fn_scaled.safetensors with CLIPLoader "
                         "type wan; CLIP-L/G or T5 encoders of other models do not fit.")
    if cond_batch not in (1, batch):
        raise InputError(f"{NODE_NAME}: the conditioning has batch {cond_batch} but batch_size is {batch}; "
                         "encode one prompt (batch 1) or set batch_size to the conditioning's batch.")
    context = embeddings.float()
    if tokens < text_len:
        context = torch.nn.functional.pad(context, (0, 0, 0, text_len - tokens))
    return context.expand(batch, -1, -1)


def size_from_latent(latent, where: str) -> tuple[int, int, int, int]:
    """A video LATENT -> (batch, width, height, length) of the video it stands for."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[1] != LATENT_CHANNELS:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise InputError(f"{where}: the 'latent' input must be a Wan video latent [batch, 16, frames, height, "
                         f"width] (e.g. from EmptyHunyuanLatentVideo or Wan22ImageToVideoLatent); got {shape}. "
                         "Disconnect it to use the width/height/length widgets.")
    batch, _, frames, height, width = samples.shape
    return (batch, width * VAE_SPATIAL_STRIDE, height * VAE_SPATIAL_STRIDE, (frames - 1) * VAE_TEMPORAL_STRIDE + 1)


def activation_bytes(dit, shape, dtype: torch.dtype) -> int:
    """Rough peak activation memory of one DiT forward, so ComfyUI frees that much before loading."""
    batch, _, frames, height, width = shape
    pt, ph, pw = dit.config.patch_size
    tokens = (frames // pt) * (height // ph) * (width // pw)
    per_token = dit.config.ffn_dim + 6 * dit.config.dim
    return int(batch * tokens * per_token * torch.finfo(dtype).bits // 8 * 1.5)


class FastWanDMDSampler:
    """3-Step DMD Sampler: generates Wan video latents from text in three model evaluations."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (FASTWAN_MODEL, {"tooltip": "FastWan model from Load FastWan, usually through VSA "
                                                     "Attention Patch."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt: CLIPTextEncode with the umT5 text encoder "
                                                         "(CLIPLoader, type wan). No negative prompt: the "
                                                         "distilled model runs without CFG."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Video width in pixels, a multiple of 16 (FastWan: 832x480)."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Video height in pixels, a multiple of 16."}),
                "length": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4,
                                   "tooltip": "Number of frames, of the form 4k+1 (81 = 5 s at 16 fps)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Videos generated at once (each with its own noise)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the noise; the same seed gives the same video on any device."}),
                "timesteps": ("STRING", {"default": FASTWAN_TIMESTEPS_TEXT,
                                         "advanced": True,
                                         "tooltip": "Student timesteps (0..1000, decreasing), one model call each. "
                                                    "FastWan was distilled for 1000,757,522."}),
                "shift": ("FLOAT", {"default": FASTWAN_SHIFT, "min": 0.1, "max": 100.0, "step": 0.1,
                                    "advanced": True,
                                    "tooltip": "Flow-matching shift of the timestep grid (8.0 for FastWan)."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Optional: take batch, width, height and length from this video "
                                                 "latent (e.g. EmptyHunyuanLatentVideo) instead of the widgets."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Wan video latents [batch, 16, (length-1)/4+1, height/8, width/8] for VAEDecode with "
                       "wan_2.1_vae.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Few-step DMD sampling of a FastWan model: a 5 s 480p clip in 3 model evaluations, no CFG."

    def sample(self, model, positive, width=832, height=480, length=81, batch_size=1, seed=0,
               timesteps=FASTWAN_TIMESTEPS_TEXT, shift=FASTWAN_SHIFT, latent=None):
        dit = dit_of(model)
        if latent is not None:
            batch_size, width, height, length = size_from_latent(latent, NODE_NAME)
        validate_video_size(int(width), int(height), int(length), where=NODE_NAME)
        student_timesteps = parse_timesteps(timesteps, where=f"{NODE_NAME}: timesteps")
        if not (float(shift) > 0 and math.isfinite(float(shift))):
            raise InputError(f"{NODE_NAME}: shift {shift} must be a positive number (FastWan uses 8.0)")
        if not 0 <= int(seed) <= MAX_SEED:
            raise InputError(f"{NODE_NAME}: seed {seed} is outside 0..{MAX_SEED}")
        shape = latent_shape(int(batch_size), int(width), int(height), int(length))
        context = conditioning_context(positive, dit.config.text_dim, dit.config.text_len, shape[0])
        sampling_dit = dit.with_attention(attention_of(model))

        device = comfy_env.load_for_sampling(model, activation_bytes(dit, shape, dit.dtype))
        progress = comfy_env.StepProgress(len(student_timesteps), device)
        comfy_env.throw_if_interrupted()

        def velocity(x, t, ctx):
            return sampling_dit(x, t, ctx)

        def after_step(step, total, x0):
            progress.step(step, x0)
            comfy_env.throw_if_interrupted()  # stops between steps when the user cancels

        x0 = sample_dmd(velocity, context.to(device), shape, int(seed), timesteps=student_timesteps,
                        shift=float(shift), callback=after_step, device=device)
        samples = denormalize_latents(x0.float()).to(comfy_env.intermediate_device())
        return ({"samples": samples},)
