"""Wan2.1 latent statistics and the shape rules of the Wan VAE.

The DiT works on normalized latents; ComfyUI's LATENT and the VAE work on un-normalized ones.
"""
from __future__ import annotations

import torch

from .errors import InputError

LATENT_CHANNELS = 16
VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = 8
# Pixels per DiT token side: VAE stride 8 times the DiT patch 2.
PIXEL_MULTIPLE = 16

WAN_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, LATENT_CHANNELS, 1, 1, 1)
    mean = torch.tensor(WAN_LATENT_MEAN, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(WAN_LATENT_STD, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize_latents(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents [B,16,T,H,W] -> the DiT's normalized space: (z - mean) / std, per channel."""
    mean, std = _stats(latents)
    return ((latents.float() - mean) / std).to(latents.dtype)


def denormalize_latents(latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents [B,16,T,H,W] -> VAE latents: z * std + mean, per channel."""
    mean, std = _stats(latents)
    return (latents.float() * std + mean).to(latents.dtype)


def _nearest_multiples(value: int, multiple: int) -> str:
    below = max(multiple, (value // multiple) * multiple)
    above = below + multiple
    return f"{below} or {above}" if below != value else str(value)


def validate_video_size(width: int, height: int, frames: int, where: str = "") -> None:
    """Raise InputError unless width/height are multiples of 16 and frames is 4k+1 (k >= 0)."""
    prefix = f"{where}: " if where else ""
    problems = []
    if width < PIXEL_MULTIPLE or width % PIXEL_MULTIPLE:
        problems.append(f"width {width} is not a positive multiple of {PIXEL_MULTIPLE} "
                        f"(nearest valid: {_nearest_multiples(width, PIXEL_MULTIPLE)})")
    if height < PIXEL_MULTIPLE or height % PIXEL_MULTIPLE:
        problems.append(f"height {height} is not a positive multiple of {PIXEL_MULTIPLE} "
                        f"(nearest valid: {_nearest_multiples(height, PIXEL_MULTIPLE)})")
    if frames < 1 or (frames - 1) % VAE_TEMPORAL_STRIDE:
        below = max(1, ((frames - 1) // VAE_TEMPORAL_STRIDE) * VAE_TEMPORAL_STRIDE + 1)
        above = below + VAE_TEMPORAL_STRIDE
        problems.append(f"frames {frames} is not of the form 4k+1 (nearest valid: {below} or {above})")
    if problems:
        raise InputError(prefix + "; ".join(problems) + ". The Wan VAE compresses time by 4 "
                         "(plus the first frame) and space by 8, and the DiT patches 2x2.")


def latent_shape(batch: int, width: int, height: int, frames: int) -> tuple[int, int, int, int, int]:
    """Pixel video size -> latent shape [B, 16, (F-1)/4+1, H/8, W/8] after validating it."""
    validate_video_size(width, height, frames)
    return (batch, LATENT_CHANNELS, (frames - 1) // VAE_TEMPORAL_STRIDE + 1,
            height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE)
