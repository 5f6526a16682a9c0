"""The one place the nodes touch ComfyUI, always behind a guard.

Inside ComfyUI these helpers use `folder_paths`, `comfy.model_management`, `comfy.cli_args` and the
server (node texts). Outside it (tests, headless use) each falls back to a plain equivalent, so the
package imports and every node runs without ComfyUI. The native model and sampling pieces that
need more of ComfyUI live in `native_model` and import it only when called inside ComfyUI.

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


def fp8_matmul_switch(device: torch.device) -> bool:
    """ComfyUI's switch for fp8 matmuls: `--fast fp8_matrix_mult` (or a bare `--fast`) and its
    `supports_fp8_compute(device)`. Off outside ComfyUI. (ComfyUI applies the flag to unscaled fp8
    weights; for `_scaled` files it multiplies in fp8 only with its loader's fp8_e4m3fn_fast,
    which Load FastWan has no widget for, so here the flag covers both.)"""
    mm, cli_args = model_management(), optional_module("comfy.cli_args")
    feature = getattr(getattr(cli_args, "PerformanceFeature", None), "Fp8MatrixMultiplication", None)
    if mm is None or feature is None or not hasattr(mm, "supports_fp8_compute"):
        return False
    return feature in (getattr(cli_args.args, "fast", None) or ()) and bool(mm.supports_fp8_compute(device))


def text_encoder_device() -> torch.device:
    """Where text encoders compute: ComfyUI's text-encoder device, else CPU."""
    mm = model_management()
    return mm.text_encoder_device() if mm is not None else torch.device("cpu")


def text_encoder_offload_device() -> torch.device:
    """Where idle text-encoder weights live: ComfyUI's text-encoder offload device, else CPU."""
    mm = model_management()
    return mm.text_encoder_offload_device() if mm is not None else torch.device("cpu")


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


def show_node_text(node_id, text: str) -> None:
    """Show `text` on node `node_id` in ComfyUI's UI (the node's progress text), not only in the log."""
    server = optional_module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or node_id is None or not hasattr(instance, "send_progress_text"):
        return
    try:
        instance.send_progress_text(text, str(node_id))
    except Exception as error:  # a message must never stop a generation
        log.warning("FastWan: could not show a message in the UI: %s", error)


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
