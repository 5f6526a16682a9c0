"""Load FastWan VAE: a diffusers `AutoencoderKLWan` folder as ComfyUI's own VAE.

ComfyUI's VAELoader builds the Wan2.1 VAE only at its released width (96) and only from a file in
the original Wan key layout, so it loads neither the `vae/` folder of a diffusers download
(FastWan2.1-T2V-1.3B-Diffusers) nor a narrower Wan VAE (the tiny world's). This node reads the
folder's config.json and safetensors, builds ComfyUI's `comfy.ldm.wan.vae.WanVAE` at the folder's
sizes with the weights renamed to its layout (`fastwan_core.vae`), and returns a `comfy.sd.VAE`
holding it: core VAEDecode, VAEDecodeTiled, VAEEncode and VAEEncodeTiled take it like the VAE of
VAELoader.

The list shows every folder under models/vae holding `diffusion_pytorch_model*.safetensors` whose
config.json is an AutoencoderKLWan (or missing, so the error can say so), named by its path there.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path, PurePosixPath

import torch

from ..fastwan_core.errors import CheckpointError, FastWanError, InputError
from ..fastwan_core.vae import (VAE_WEIGHTS_STEM, check_vae_folder, comfy_wan_vae_config,
                                comfy_wan_vae_state_dict)
from . import comfy_env
from .model_nodes import CATEGORY, validation_result

NODE_NAME = "Load FastWan VAE"
FOLDER_NAME = "vae"
# comfy.sd.VAE's memory estimates for its Wan2.1 VAE are for the released width; activations scale
# with the width.
RELEASED_WIDTH = 96


def _config_class(folder: Path):
    """The `_class_name` of folder/config.json; None when there is no readable config."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def vae_folders() -> dict[str, Path]:
    """Folder name (relative to models/vae) -> its path, for every folder holding
    diffusion_pytorch_model*.safetensors that is not some other class's (an SD AutoencoderKL's)."""
    folders = {}
    for name in comfy_env.filename_list(FOLDER_NAME):
        parts = PurePosixPath(name).parts
        if len(parts) < 2 or not parts[-1].startswith(VAE_WEIGHTS_STEM) or not parts[-1].endswith(".safetensors"):
            continue
        folder_name = "/".join(parts[:-1])
        if folder_name in folders:
            continue
        full = comfy_env.full_path(FOLDER_NAME, name)
        if full is None:
            continue
        folder = Path(full).parent
        if _config_class(folder) in (None, "AutoencoderKLWan"):
            folders[folder_name] = folder
    return folders


def vae_path(folder: str) -> Path:
    """The folder named `folder` in the list (headless: a plain path to it)."""
    path = vae_folders().get(folder)
    if path is None and comfy_env.folder_paths() is None and Path(str(folder)).is_dir():
        path = Path(folder)
    if path is None:
        raise InputError(f"{NODE_NAME}: {folder!r} is not a folder with {VAE_WEIGHTS_STEM}.safetensors in "
                         "models/vae. Copy the model's vae/ folder (config.json and the safetensors, e.g. of "
                         "FastWan2.1-T2V-1.3B-Diffusers) into models/vae/<name>/ and press R in the UI to refresh "
                         "the list.")
    return path


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({error}); copy the VAE folder again") from error


def check_folder(folder: str) -> tuple[Path, dict]:
    """Everything checkable without loading: listed, config.json an AutoencoderKLWan with Wan2.1's
    architecture, safetensors weights complete, nothing pickled. Returns the folder and ComfyUI
    WanVAE's constructor arguments. Raises InputError naming the node."""
    path = vae_path(folder)
    try:
        check_vae_folder(path)
        return path, comfy_wan_vae_config(read_config(path))
    except FastWanError as error:
        raise InputError(f"{NODE_NAME}: {path}: {error}" if isinstance(error, InputError)
                         else f"{NODE_NAME}: {error}") from error


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors (one file or a sharded set), in ComfyUI's Wan VAE layout."""
    from safetensors.torch import load_file

    from ..fastwan_core.checkpoint import check_safetensors_folder

    state = {}
    for file in check_safetensors_folder(path, VAE_WEIGHTS_STEM, "Wan VAE"):
        state.update(load_file(str(file)))
    return comfy_wan_vae_state_dict(state)


class NoWeightsWarningFilter(logging.Filter):
    """Drops comfy.sd.VAE's warning for an empty state dict, which `native_wan_vae` passes on purpose."""

    def filter(self, record):
        return "No VAE weights detected" not in record.getMessage()


def native_wan_vae(architecture: dict, weights: dict[str, torch.Tensor]):
    """A `comfy.sd.VAE` holding ComfyUI's WanVAE(**architecture) with `weights`, its attributes
    those comfy.sd.VAE gives its own Wan2.1 VAE.

    comfy.sd.VAE.__init__ picks the architecture from the state dict's key names and builds the Wan
    VAE at the released width only, and its `config` argument builds SD's AutoencoderKL. So we let it
    run on an empty state dict: it sets every default attribute (whatever a newer ComfyUI adds) and
    returns without a model ("No VAE weights detected", a warning we keep out of the log); then we set
    the Wan2.1 attributes and the model, device, dtype and ModelPatcher as its Wan2.1 branch and
    the end of its __init__ do.
    """
    import comfy.sd
    from comfy import model_management
    from comfy.ldm.wan.vae import WanVAE
    from comfy.model_patcher import ModelPatcher

    model = WanVAE(**architecture)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:  # missing, extra or mis-shaped tensors
        raise CheckpointError(f"the weights do not fit the config's VAE: {str(error)[:600]}") from error

    quiet = NoWeightsWarningFilter()
    logging.getLogger().addFilter(quiet)  # comfy.sd logs through the root logger
    try:
        vae = comfy.sd.VAE(sd={})
    finally:
        logging.getLogger().removeFilter(quiet)

    width = architecture["dim"] / RELEASED_WIDTH
    vae.upscale_ratio = (lambda a: max(0, a * 4 - 3), 8, 8)
    vae.upscale_index_formula = (4, 8, 8)
    vae.downscale_ratio = (lambda a: max(0, math.floor((a + 3) / 4)), 8, 8)
    vae.downscale_index_formula = (4, 8, 8)
    vae.latent_dim = 3
    vae.latent_channels = architecture["z_dim"]
    vae.working_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    vae.memory_used_encode = lambda shape, dtype: (
        6000 * width * shape[3] * shape[4] * model_management.dtype_size(dtype))
    vae.memory_used_decode = lambda shape, dtype: (
        7000 * width * shape[3] * shape[4] * (8 * 8) * model_management.dtype_size(dtype))

    vae.first_stage_model = model.eval()
    vae.device = model_management.vae_device()
    vae.vae_dtype = model_management.vae_dtype(vae.device, vae.working_dtypes)
    model.to(vae.vae_dtype)
    vae.output_device = model_management.intermediate_device()
    vae.patcher = ModelPatcher(model, load_device=vae.device, offload_device=model_management.vae_offload_device())
    return vae


class FastWanVAELoader:
    """Load FastWan VAE: a diffusers AutoencoderKLWan folder (any width) as ComfyUI's VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": (sorted(vae_folders()), {
                    "tooltip": "A folder in models/vae holding a diffusers Wan VAE: config.json (AutoencoderKLWan) "
                               "and diffusion_pytorch_model.safetensors, e.g. the vae/ folder of "
                               "FastWan2.1-T2V-1.3B-Diffusers. Any width with Wan2.1's 8x/4x strides. "
                               "Safetensors only.",
                }),
            }
        }

    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("ComfyUI's Wan2.1 VAE at the folder's sizes, for VAEDecode, VAEDecodeTiled and VAEEncode.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a diffusers-format Wan2.1 VAE folder (AutoencoderKLWan, any width) as ComfyUI's own "
                   "Wan VAE.")

    @classmethod
    def VALIDATE_INPUTS(cls, folder=None):
        # Naming the input here turns off ComfyUI's own list check for it; check_folder does it.
        return True if folder is None else validation_result(check_folder, folder)

    def load(self, folder: str):
        path, architecture = check_folder(folder)
        if not comfy_env.in_comfyui():
            raise InputError(f"{NODE_NAME}: the VAE it makes is ComfyUI's; run it inside ComfyUI (headless, "
                             "fastwan_core.vae.WanVAE.from_folder loads the same folder).")
        try:
            return (native_wan_vae(architecture, read_weights(path)),)
        except FastWanError as error:
            raise InputError(f"{NODE_NAME}: {path}: {error}") from error
