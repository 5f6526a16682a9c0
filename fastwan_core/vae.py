"""The Wan2.1 VAE (diffusers `AutoencoderKLWan`): un-normalized latents <-> video frames.

Latents here are the VAE's own (un-normalized, as in ComfyUI's LATENT); the DiT's normalized space
is `latents.normalize_latents` / `denormalize_latents` away. Frames are ComfyUI IMAGE style:
float [B, F, H, W, 3] in 0..1, channels last.

Memory: the Wan VAE already decodes causally one latent frame at a time (with a feature cache), so
memory grows with the frame area, not the clip length. `tiling=True` bounds the area too, decoding
overlapping spatial tiles (diffusers' `enable_tiling`, 256-pixel tiles with blended seams), which
lets 480p decode fit in a few GB at a small speed cost.

`comfy_wan_vae_config` / `comfy_wan_vae_state_dict` translate such a folder for ComfyUI's own Wan
VAE class (the original Wan layout), for the ComfyUI VAE node.
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


# ------------------------------------------------------------------------------------------------
# ComfyUI's Wan2.1 VAE (`comfy.ldm.wan.vae.WanVAE`, the original Wan repository's layout) from a
# diffusers `AutoencoderKLWan` folder. ComfyUI's own VAELoader only builds the full-width Wan2.1 VAE
# from a file in that layout; these two functions let the VAE node build one of any width.

# A diffusers residual block's tensors -> the same block's in the original layout, where the block
# is one Sequential: RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv (hence 0, 2, 3, 6).
_RESIDUAL_NAMES = {
    "norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias",
}
# Attention (norm, to_qkv, proj) and resample (resample.1, time_conv) tensors keep their names.
_KEPT_NAMES = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias",
               "resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
_TOP_LEVEL = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}


def _block_tensor(name: str) -> str:
    """A tensor name inside one residual, attention or resample block -> its original-layout name."""
    if name in _RESIDUAL_NAMES:
        return _RESIDUAL_NAMES[name]
    if name in _KEPT_NAMES:
        return name
    raise KeyError(name)


def comfy_wan_vae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKLWan` tensors -> the same tensors under ComfyUI's `WanVAE` names.

    The diffusers decoder groups its blocks (`up_blocks.i.resnets.j`, `up_blocks.i.upsamplers.0`);
    the original layout numbers them in one Sequential (`upsamples.k`), so the offsets come from the
    block sizes found in `state_dict` (any `num_res_blocks`, any number of levels). The encoder's
    `down_blocks.k` is already flat. Tensors are not copied.
    Raises CheckpointError naming the tensors that belong to no Wan2.1 VAE (e.g. a Wan2.2 VAE's).
    """
    up_resnets: dict[int, int] = {}
    up_samplers: set[int] = set()
    for key in state_dict:
        parts = key.split(".")
        if parts[:2] == ["decoder", "up_blocks"] and len(parts) > 4 and parts[2].isdigit() and parts[4].isdigit():
            block = int(parts[2])
            if parts[3] == "resnets":
                up_resnets[block] = max(up_resnets.get(block, 0), int(parts[4]) + 1)
            elif parts[3] == "upsamplers":
                up_samplers.add(block)
    up_offsets, offset = {}, 0
    for block in sorted(set(up_resnets) | up_samplers):
        up_offsets[block] = offset
        offset += up_resnets.get(block, 0) + (block in up_samplers)

    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        try:
            if len(parts) == 2 and parts[0] in _TOP_LEVEL:
                new_key = f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"
            elif parts[0] not in ("encoder", "decoder"):
                raise KeyError(key)
            elif parts[1] in _ENDS:
                new_key = f"{parts[0]}.{_ENDS[parts[1]]}.{'.'.join(parts[2:])}"
            elif parts[1] == "mid_block":  # resnet, attention, resnet
                index = {"resnets": {"0": 0, "1": 2}, "attentions": {"0": 1}}[parts[2]][parts[3]]
                new_key = f"{parts[0]}.middle.{index}.{_block_tensor('.'.join(parts[4:]))}"
            elif parts[:2] == ["encoder", "down_blocks"]:
                new_key = f"encoder.downsamples.{int(parts[2])}.{_block_tensor('.'.join(parts[3:]))}"
            elif parts[:2] == ["decoder", "up_blocks"]:
                block = int(parts[2])
                if parts[3] == "resnets":
                    index, name = up_offsets[block] + int(parts[4]), _block_tensor(".".join(parts[5:]))
                elif parts[3:5] == ["upsamplers", "0"]:
                    index, name = up_offsets[block] + up_resnets.get(block, 0), _block_tensor(".".join(parts[5:]))
                else:
                    raise KeyError(key)
                new_key = f"decoder.upsamples.{index}.{name}"
            else:
                raise KeyError(key)
        except (KeyError, ValueError, IndexError):
            unknown.append(key)
            continue
        converted[new_key] = tensor
    if unknown:
        raise CheckpointError(f"the VAE weights hold {len(unknown)} tensors that no Wan2.1 VAE has "
                              f"({', '.join(sorted(unknown)[:4])}{', ...' if len(unknown) > 4 else ''}); "
                              "only Wan2.1-style AutoencoderKLWan folders (not Wan2.2's VAE) can be loaded")
    return converted


def comfy_wan_vae_config(config: dict) -> dict:
    """A diffusers `AutoencoderKLWan` config.json -> the constructor arguments of ComfyUI's
    `comfy.ldm.wan.vae.WanVAE`. Only VAEs with Wan2.1's architecture and strides (8x space, 4x time,
    which ComfyUI's VAE object assumes) fit; anything else raises InputError saying what differs."""
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise InputError(f"the VAE config is a {config.get('_class_name')}, not an AutoencoderKLWan (Wan's VAE)")
    base_dim = config.get("base_dim", 96)
    dim_mult = list(config.get("dim_mult", [1, 2, 4, 4]))
    temporal = list(config.get("temperal_downsample", [False, True, True]))
    problems = []
    if config.get("is_residual", False) or config.get("patch_size") is not None:
        problems.append("it is a Wan2.2 VAE (is_residual / patch_size), which this loader does not build")
    if config.get("decoder_base_dim") not in (None, base_dim):
        problems.append(f"decoder_base_dim {config['decoder_base_dim']} differs from base_dim {base_dim}")
    if config.get("in_channels", 3) != 3 or config.get("out_channels", 3) != 3:
        problems.append("it does not take and give RGB (in_channels and out_channels must be 3)")
    if len(dim_mult) != 4 or len(temporal) != 3 or sum(bool(t) for t in temporal) != 2:
        problems.append(f"dim_mult {dim_mult} / temperal_downsample {temporal} do not give Wan2.1's strides "
                        "(4 levels, 2 of the 3 downsamples temporal: 8x space, 4x time)")
    if list(config.get("attn_scales", [])):
        problems.append(f"attn_scales {config['attn_scales']} is not empty (diffusers' decoder ignores it)")
    if problems:
        raise InputError("this VAE cannot be built as ComfyUI's Wan2.1 VAE: " + "; ".join(problems))
    return {"dim": int(base_dim), "z_dim": int(config.get("z_dim", LATENT_CHANNELS)), "dim_mult": dim_mult,
            "num_res_blocks": int(config.get("num_res_blocks", 2)), "attn_scales": [],
            "temperal_downsample": [bool(t) for t in temporal], "dropout": 0.0}
