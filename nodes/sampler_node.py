"""3-Step DMD Sampler and its native pieces (a SAMPLER and SIGMAS for SamplerCustomAdvanced).

Interop with core nodes:
- `positive` is core CLIPTextEncode's CONDITIONING with the umT5 encoder (CLIPLoader type "wan").
  ComfyUI pads the umT5 tokens to at least 512 and zeroes the padded rows, which is exactly Wan's
  own context; shorter contexts are zero-padded to the model's 512 rows the same way.
- The output LATENT holds un-normalized Wan latents [B, 16, (F-1)/4+1, H/8, W/8], what core
  VAEDecode with wan_2.1_vae.safetensors expects (core samplers return the same).

Inside ComfyUI the node runs ComfyUI's own sampling (`comfy.sample.sample_custom`) with the DMD
SAMPLER and SIGMAS below, so memory management, model patches, LoRAs, progress, latent previews
and Cancel behave as with KSampler. Outside ComfyUI it calls `fastwan_core.sampling.sample_dmd`.
"""
from __future__ import annotations

import torch

from ..fastwan_core.errors import InputError
from ..fastwan_core.latents import (LATENT_CHANNELS, VAE_SPATIAL_STRIDE, VAE_TEMPORAL_STRIDE,
                                    denormalize_latents, latent_shape, validate_video_size)
from ..fastwan_core.sampling import sample_dmd
from . import comfy_env
from .fastwan_schedule import (FASTWAN_SHIFT, FASTWAN_TIMESTEPS_TEXT, check_shift, dmd_sigmas,
                               parse_timesteps)
from .model_nodes import CATEGORY, MODEL, check_widget_ranges, validation_result
from .native_model import attention_of, dmd_sampler, fastwan_dit, native_wan_model

NODE_NAME = "3-Step DMD Sampler"
SIGMAS_NAME = "FastWan DMD Sigmas"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
TIMESTEPS_TOOLTIP = ("Student timesteps (0..1000, decreasing), one model call each. FastWan was distilled for "
                     f"{FASTWAN_TIMESTEPS_TEXT}.")
SHIFT_TOOLTIP = f"Flow-matching shift of the timestep grid ({FASTWAN_SHIFT} for FastWan)."


def check_sampler_values(width=None, height=None, length=None, seed=None, timesteps=None, shift=None,
                         batch_size=None) -> None:
    """Every widget value checkable without running; values that are links (None here) are skipped."""
    if None not in (width, height, length):
        validate_video_size(int(width), int(height), int(length), where=NODE_NAME)
    if batch_size is not None and not 1 <= int(batch_size) <= 64:
        raise InputError(f"{NODE_NAME}: batch_size {batch_size} is outside 1..64")
    if seed is not None and not 0 <= int(seed) <= MAX_SEED:
        raise InputError(f"{NODE_NAME}: seed {seed} is outside 0..{MAX_SEED}")
    if timesteps is not None:
        parse_timesteps(timesteps, NODE_NAME)
    if shift is not None:
        check_shift(shift, NODE_NAME)


def check_conditioning(positive, batch: int) -> None:
    if not isinstance(positive, (list, tuple)) or not positive or not isinstance(positive[0], (list, tuple)):
        raise InputError(f"{NODE_NAME}: 'positive' is not CONDITIONING. Connect a CLIPTextEncode node whose "
                         "clip comes from CLIPLoader with umt5_xxl_fp8_e4m3fn_scaled.safetensors, type wan.")
    embeddings = positive[0][0]
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3:
        raise InputError(f"{NODE_NAME}: 'positive' holds no [batch, tokens, channels] text embeddings. Use "
                         "CLIPTextEncode with the umT5 text encoder (CLIPLoader type wan).")
    if embeddings.shape[0] not in (1, batch):
        raise InputError(f"{NODE_NAME}: the conditioning has batch {embeddings.shape[0]} but batch_size is {batch}; "
                         "encode one prompt (batch 1) or set batch_size to the conditioning's batch.")


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


def sample_outside_comfyui(model, positive, shape, seed: int, timesteps, shift: float) -> torch.Tensor:
    """Headless / tests: `sample_dmd` on the MODEL's DiT, un-normalized latents on the CPU."""
    dit = fastwan_dit(model)
    embeddings = positive[0][0].float()
    device = torch.device(model.load_device)
    dit.to(device)
    context = embeddings.expand(shape[0], -1, -1).to(device)
    attention = attention_of(model)

    def velocity(x, t, ctx):
        return dit(x, t, ctx, attention=attention)

    x0 = sample_dmd(velocity, context, shape, seed, timesteps=timesteps, shift=shift, device=device)
    return denormalize_latents(x0.float()).to(comfy_env.intermediate_device())


def sample_in_comfyui(model, positive, shape, seed: int, sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's own sampling with the DMD SAMPLER: what SamplerCustomAdvanced with RandomNoise(seed),
    BasicGuider(positive), FastWan DMD Sampler and FastWan DMD Sigmas does."""
    import comfy.sample
    import latent_preview

    latent_image = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(latent_image, seed)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    return comfy.sample.sample_custom(model, noise, 1.0, dmd_sampler(), sigmas, positive, [], latent_image,
                                      callback=callback, seed=seed)


class FastWanDMDSampler:
    """3-Step DMD Sampler: generates Wan video latents from text in three model evaluations."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "FastWan model from Load FastWan, usually through VSA Attention "
                                             "Patch (LoRA loaders and model patches in between work too)."}),
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
                                 "tooltip": "Seed of the noise; the same seed gives the same video on any device "
                                            "and the same result as SamplerCustomAdvanced with RandomNoise."}),
                "timesteps": ("STRING", {"default": FASTWAN_TIMESTEPS_TEXT, "advanced": True,
                                         "tooltip": TIMESTEPS_TOOLTIP}),
                "shift": ("FLOAT", {"default": FASTWAN_SHIFT, "min": 0.1, "max": 100.0, "step": 0.1,
                                    "advanced": True, "tooltip": SHIFT_TOOLTIP}),
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

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, length=None, timesteps=None):
        # ComfyUI attaches a failed hook's message to every input the hook names, and checks the
        # min/max of the inputs it does not name itself: so the hook names only what needs it.
        return validation_result(cls.check_values, width=width, height=height, length=length, timesteps=timesteps)

    @classmethod
    def check_values(cls, width=None, height=None, length=None, batch_size=None, seed=None, timesteps=None,
                     shift=None) -> None:
        """What /prompt validation and the run both check, with the same messages."""
        check_widget_ranges(cls, NODE_NAME, dict(width=width, height=height, length=length, batch_size=batch_size,
                                                 seed=seed, shift=shift))
        check_sampler_values(width=width, height=height, length=length, seed=seed, timesteps=timesteps,
                             shift=shift, batch_size=batch_size)

    def sample(self, model, positive, width=832, height=480, length=81, batch_size=1, seed=0,
               timesteps=FASTWAN_TIMESTEPS_TEXT, shift=FASTWAN_SHIFT, latent=None):
        if fastwan_dit(model) is None and native_wan_model(model) is None:
            raise InputError(f"{NODE_NAME}: the model is not a Wan2.1 text-to-video model "
                             f"({type(getattr(model, 'model', model)).__name__}). Connect Load FastWan, or Load "
                             "Diffusion Model with a Wan2.1 T2V file.")
        if latent is not None:
            batch_size, width, height, length = size_from_latent(latent, NODE_NAME)
        self.check_values(width, height, length, batch_size, seed, timesteps, shift)
        student_timesteps = parse_timesteps(timesteps, NODE_NAME)
        shape = latent_shape(int(batch_size), int(width), int(height), int(length))
        check_conditioning(positive, shape[0])
        if comfy_env.in_comfyui():
            sigmas = torch.tensor(dmd_sigmas(student_timesteps, float(shift)), dtype=torch.float32)
            samples = sample_in_comfyui(model, positive, shape, int(seed), sigmas)
        else:
            samples = sample_outside_comfyui(model, positive, shape, int(seed), student_timesteps, float(shift))
        return ({"samples": samples},)


class FastWanDMDSamplerSelect:
    """FastWan DMD Sampler: the DMD step rule as a SAMPLER for SamplerCustomAdvanced / SamplerCustom."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("Each step predicts the clean latent and re-noises it to the next sigma with fresh noise of "
                       "the run's seed (FastWan's DMD sampler). Use with FastWan DMD Sigmas, BasicGuider and "
                       "RandomNoise.",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = "FastWan's few-step DMD sampler for SamplerCustomAdvanced."

    def get_sampler(self):
        return (dmd_sampler(),)


class FastWanDMDSigmas:
    """FastWan DMD Sigmas: the student's sigma schedule (1.0, 0.7568, 0.5217, 0) as SIGMAS."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "timesteps": ("STRING", {"default": FASTWAN_TIMESTEPS_TEXT, "tooltip": TIMESTEPS_TOOLTIP}),
                "shift": ("FLOAT", {"default": FASTWAN_SHIFT, "min": 0.1, "max": 100.0, "step": 0.1,
                                    "tooltip": SHIFT_TOOLTIP}),
            }
        }

    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY
    DESCRIPTION = "The sigmas FastWan was distilled for, for SamplerCustomAdvanced."

    @classmethod
    def VALIDATE_INPUTS(cls, timesteps=None):
        return True if timesteps is None else validation_result(parse_timesteps, timesteps, SIGMAS_NAME)

    def get_sigmas(self, timesteps=FASTWAN_TIMESTEPS_TEXT, shift=FASTWAN_SHIFT):
        check_widget_ranges(type(self), SIGMAS_NAME, dict(shift=shift))
        values = parse_timesteps(timesteps, SIGMAS_NAME)
        return (torch.tensor(dmd_sigmas(values, check_shift(shift, SIGMAS_NAME)), dtype=torch.float32),)
