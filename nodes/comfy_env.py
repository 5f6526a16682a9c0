"""The one place the nodes touch ComfyUI, always behind a guard.

Inside ComfyUI these helpers use `folder_paths`, `comfy.model_management`, `comfy.utils`,
`comfy.model_patcher` and `latent_preview`. Outside it (tests, headless use) each falls back to a
plain equivalent, so the package imports and every node runs without ComfyUI.

Every lookup imports at call time, not at module import: ComfyUI has set up `sys.modules` long
before a node runs, and tests inject a stub `folder_paths` after this package was imported.
"""
from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch

log = logging.getLogger("FastWan")


def optional_module(name: str):
    """The module `name` if it can be imported, else None (only ImportError counts as absent)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def folder_paths():
    """ComfyUI's `folder_paths` module (or a stand-in a test injected), or None."""
    return optional_module("folder_paths")


def model_management():
    return optional_module("comfy.model_management")


def in_comfyui() -> bool:
    """True when ComfyUI's model management is importable (we run inside ComfyUI)."""
    return model_management() is not None


# ------------------------------------------------------------------------------------------------
# Devices and dtypes


def load_device() -> torch.device:
    """Where models compute: ComfyUI's torch device, else CUDA when present, else CPU."""
    mm = model_management()
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    """Where idle weights live: ComfyUI's unet offload device, else CPU."""
    mm = model_management()
    if mm is not None:
        return mm.unet_offload_device()
    return torch.device("cpu")


def auto_weight_dtype(device: torch.device, num_parameters: int) -> torch.dtype:
    """The weight dtype "auto" picks: ComfyUI's choice for diffusion models on `device` (it knows
    --force-fp16, --bf16-unet, card capabilities), else bf16 on a CUDA card that supports it, fp16
    on other CUDA cards, fp32 on CPU (CPU matmuls in half precision are slow)."""
    supported = [torch.bfloat16, torch.float16, torch.float32]
    mm = model_management()
    if mm is not None:
        return mm.unet_dtype(device=device, model_params=num_parameters, supported_dtypes=supported)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def intermediate_device() -> torch.device:
    """Where node outputs such as LATENT live between nodes (ComfyUI: CPU by default)."""
    mm = model_management()
    if mm is not None:
        return mm.intermediate_device()
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# Model management


class PlainModelPatcher:
    """Stand-in for ComfyUI's ModelPatcher outside ComfyUI: the same few members the nodes use
    (`model`, `model_options`, `load_device`, `offload_device`, `clone()`)."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.model_options: dict = {"transformer_options": {}}

    def clone(self) -> "PlainModelPatcher":
        """A new handle on the same weights with its own copy of the options."""
        import copy

        other = PlainModelPatcher(self.model, self.load_device, self.offload_device)
        other.model_options = copy.deepcopy(self.model_options)
        return other


def make_patcher(model: torch.nn.Module, load_dev: torch.device, offload_dev: torch.device):
    """Wrap `model` so ComfyUI can move it: a `comfy.model_patcher.ModelPatcher` inside ComfyUI,
    a `PlainModelPatcher` elsewhere."""
    patcher_module = optional_module("comfy.model_patcher")
    if patcher_module is not None and in_comfyui():
        return patcher_module.ModelPatcher(model, load_device=load_dev, offload_device=offload_dev)
    return PlainModelPatcher(model, load_dev, offload_dev)


def load_for_sampling(patcher, memory_required: int = 0) -> torch.device:
    """Bring the patcher's weights onto its load device; returns that device.

    Inside ComfyUI this asks model management to load it (evicting other models, e.g. the VAE or
    text encoder, if the card is short of memory) with `memory_required` bytes reserved for
    activations. Our layers are plain torch modules that ComfyUI cannot run half-offloaded, so the
    model is loaded completely.
    """
    device = torch.device(patcher.load_device)
    mm = model_management()
    if mm is not None and not isinstance(patcher, PlainModelPatcher):
        mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
        # --novram asks for partial loading even with force_full_load; modules left behind would
        # fail with a device mismatch, so move any stragglers (costs memory, keeps it working).
        stray = [p for p in patcher.model.parameters() if p.device != device]
        if stray:
            log.warning("FastWan: %d weight tensors were left on %s by ComfyUI's low-VRAM mode; moving the "
                        "whole model to %s.", len(stray), stray[0].device, device)
            patcher.model.to(device)
        return device
    patcher.model.to(device)
    return device


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    mm = model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# ------------------------------------------------------------------------------------------------
# Progress and previews


class StepProgress:
    """One progress-bar tick per sampling step, with a latent preview image when ComfyUI's
    previews are on (--preview-method). Outside ComfyUI it does nothing."""

    def __init__(self, total_steps: int, device: torch.device):
        utils = optional_module("comfy.utils")
        self.bar = utils.ProgressBar(total_steps) if utils is not None and in_comfyui() else None
        self.total = total_steps
        self.previewer = self._previewer(device) if self.bar is not None else None

    @staticmethod
    def _previewer(device):
        preview = optional_module("latent_preview")
        formats = optional_module("comfy.latent_formats")
        if preview is None or formats is None or not hasattr(formats, "Wan21"):
            return None
        try:
            return preview.get_previewer(device, formats.Wan21())
        except Exception as error:  # a preview must never stop a generation
            log.warning("FastWan: latent previews unavailable: %s", error)
            return None

    def step(self, index: int, x0_normalized: torch.Tensor) -> None:
        """Report step `index` (0-based) done; `x0_normalized` is the current [B,16,T,H,W] estimate
        in the DiT's normalized space, which is what ComfyUI's Wan previewers expect."""
        if self.bar is None:
            return
        preview_image = None
        if self.previewer is not None:
            try:
                preview_image = self.previewer.decode_latent_to_preview_image("JPEG", x0_normalized)
            except Exception as error:
                log.warning("FastWan: latent preview failed: %s", error)
                self.previewer = None
        self.bar.update_absolute(index + 1, self.total, preview_image)


def metadata_disabled() -> bool:
    """True when ComfyUI runs with --disable-metadata (then files carry no workflow)."""
    cli_args = optional_module("comfy.cli_args")
    return bool(cli_args is not None and getattr(cli_args.args, "disable_metadata", False))


def filename_list(folder_name: str) -> list[str]:
    """`folder_paths.get_filename_list(folder_name)`, or [] outside ComfyUI."""
    paths = folder_paths()
    if paths is None:
        return []
    try:
        return list(paths.get_filename_list(folder_name))
    except KeyError:  # an old ComfyUI without this model folder
        return []


def full_path(folder_name: str, name: str) -> Optional[str]:
    """The file `name` of a model folder, or None if ComfyUI does not know it."""
    paths = folder_paths()
    if paths is None:
        return None
    return paths.get_full_path(folder_name, name)
