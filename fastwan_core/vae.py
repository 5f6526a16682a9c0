"""The Wan2.1 VAE (diffusers `AutoencoderKLWan`): un-normalized latents <-> video frames.

Latents here are the VAE's own (un-normalized, as in ComfyUI's LATENT); the DiT's normalized space
is `latents.normalize_latents` / `denormalize_latents` away. Frames are ComfyUI IMAGE style:
float [B, F, H, W, 3] in 0..1, channels last.

Memory: the Wan VAE already decodes causally one latent frame at a time (with a feature cache), so
memory grows with the frame area, not the clip length. `tiling=True` bounds the area too, decoding
overlapping spatial tiles (diffusers' `enable_tiling`, 256-pixel tiles with blended seams), which
lets 480p decode fit in a few GB at a small speed cost.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .errors import CheckpointError, InputError
from .latents import LATENT_CHANNELS, VAE_SPATIAL_STRIDE, VAE_TEMPORAL_STRIDE


VAE_WEIGHTS_STEM = "diffusion_pytorch_model"


def vae_folder(folder: Union[str, Path]) -> Path:
    """`folder/vae` of a model folder, or `folder` itself when it is the vae/ folder."""
    folder = Path(folder)
    return folder / "vae" if (folder / "vae").is_dir() else folder


def check_vae_folder(folder: Union[str, Path]) -> None:
    """Check a model folder's `vae/` (or a vae folder) without loading it: config.json and
    safetensors weights complete (headers checked against the file sizes), pickles refused.
    Raises CheckpointError."""
    from .checkpoint import check_safetensors_folder

    folder = vae_folder(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no Wan VAE here (expected vae/config.json and "
                              f"vae/{VAE_WEIGHTS_STEM}.safetensors). Download the whole FastWan "
                              "diffusers repository, e.g. `huggingface-cli download "
                              "FastVideo/FastWan2.1-T2V-1.3B-Diffusers --local-dir DIR`.")
    check_safetensors_folder(folder, VAE_WEIGHTS_STEM, "Wan VAE")


class WanVAE:
    """Wraps a diffusers `AutoencoderKLWan` with Wan's pixel and latent conventions."""

    def __init__(self, vae: torch.nn.Module, tiling: bool = False):
        self.vae = vae.eval()
        self.set_tiling(tiling)

    @classmethod
    def from_folder(cls, folder: Union[str, Path], dtype: Optional[torch.dtype] = None, device=None,
                    tiling: bool = False) -> "WanVAE":
        """Load `vae/` of a Wan/FastWan diffusers folder (or a `vae/` folder itself).

        Args:
            dtype: weight dtype (default: bfloat16 on CUDA, float32 otherwise).
            device: where to run (default CPU).
            tiling: decode in spatial tiles to bound memory (see the module docstring).
        Raises:
            CheckpointError when the folder is missing or unreadable, or the weights are pickled.
        """
        from diffusers import AutoencoderKLWan

        folder = vae_folder(folder)
        check_vae_folder(folder)
        device = torch.device(device or "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
        except Exception as error:
            raise CheckpointError(f"{folder}: cannot load the Wan VAE ({error}). The folder should hold "
                                  "config.json and diffusion_pytorch_model.safetensors of an "
                                  "AutoencoderKLWan; download it again.") from error
        return cls(vae.to(device), tiling=tiling)

    def set_tiling(self, enabled: bool, tile_size: int = 256, tile_stride: int = 192) -> None:
        """Decode/encode in overlapping spatial tiles of `tile_size` pixels, `tile_stride` apart
        (bounded memory), or whole frames (fastest)."""
        self.tiling = bool(enabled)
        if self.tiling:
            if not 0 < tile_stride <= tile_size or tile_size % 8 or tile_stride % 8:
                raise InputError(f"VAE tiles: size {tile_size} and stride {tile_stride} must be multiples of 8 "
                                 "with 0 < stride <= size (default 256 / 192)")
            self.vae.enable_tiling(tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
                                   tile_sample_stride_height=tile_stride, tile_sample_stride_width=tile_stride)
        else:
            self.vae.disable_tiling()

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalized latents [B, 16, T, H/8, W/8] -> frames float32 [B, 4(T-1)+1, H, W, 3] in 0..1."""
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
            raise InputError(f"Wan VAE decode expects latents [batch, {LATENT_CHANNELS}, frames, height, width]; "
                             f"got {list(latents.shape)}")
        video = self.vae.decode(latents.to(device=self.device, dtype=self.dtype), return_dict=False)[0]
        # [B, 3, F, H, W] in -1..1 -> [B, F, H, W, 3] in 0..1
        return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).contiguous()

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None
               ) -> torch.Tensor:
        """Frames [B, F, H, W, 3] in 0..1 (F = 4k+1, H and W multiples of 8) -> un-normalized
        latents float32 [B, 16, (F-1)/4+1, H/8, W/8]: the posterior mean, or a sample from it."""
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise InputError(f"Wan VAE encode expects frames [batch, frames, height, width, 3]; got {list(frames.shape)}")
        count, height, width = frames.shape[1:4]
        if (count - 1) % VAE_TEMPORAL_STRIDE or height % VAE_SPATIAL_STRIDE or width % VAE_SPATIAL_STRIDE:
            raise InputError(f"Wan VAE encode needs 4k+1 frames and sides divisible by {VAE_SPATIAL_STRIDE}; "
                             f"got {count} frames of {width}x{height}")
        pixels = frames.permute(0, 4, 1, 2, 3).to(device=self.device, dtype=self.dtype) * 2 - 1
        posterior = self.vae.encode(pixels, return_dict=False)[0]
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents.float()

    def to(self, device) -> "WanVAE":
        self.vae.to(device)
        return self
