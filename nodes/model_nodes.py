"""Load FastWan and VSA Attention Patch: the nodes that produce a FastWan MODEL.

Load FastWan returns ComfyUI's own MODEL type (see `native_model`): KSampler, SamplerCustomAdvanced,
LoRA loaders and model patches take it like any Wan2.1 model. VSA Attention Patch takes any Wan2.1
MODEL (FastWan's, or ComfyUI's own from Load Diffusion Model) and returns a clone that samples with
video sparse attention.
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import torch

from ..fastwan_core.attention import AttentionConfig
from ..fastwan_core.checkpoint import index_checkpoint, infer_config, load_dit
from ..fastwan_core.errors import FastWanError, InputError
from . import comfy_env
from .fp8_weights import is_fp8_file, keep_fp8_weights, use_fp8_matmul
from .native_model import fastwan_dit, make_model, model_source, native_wan_model, set_attention

CATEGORY = "FastWan"
MODEL = "MODEL"

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft")
LOADER_NAME = "Load FastWan"
PATCH_NAME = "VSA Attention Patch"
MAX_SPARSITY = 0.95


def check_widget_ranges(node_class, node_name: str, values: dict) -> None:
    """The min/max of each widget in `values` (ComfyUI skips its own range check for inputs a
    VALIDATE_INPUTS hook names, so the hooks call this)."""
    spec = node_class.INPUT_TYPES()
    for name, value in values.items():
        options = {**spec.get("required", {}), **spec.get("optional", {})}.get(name, (None, {}))[1]
        if value is None or not isinstance(value, (int, float)):
            continue
        low, high = options.get("min"), options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            raise InputError(f"{node_name}: {name} {value} is outside {low}..{high}")


def validation_result(check, *args, **kwargs):
    """Run `check`; True if it passes, else its message: what ComfyUI's VALIDATE_INPUTS hook wants,
    so /prompt refuses the value with the same words the node would raise."""
    try:
        check(*args, **kwargs)
    except FastWanError as error:
        return str(error)
    return True


# ------------------------------------------------------------------------------------------------
# Loading, with a cache so one file is read once however many handles use it

# (real path, mtime, size, dtype) -> the loaded DiT. Weak values: an entry lives exactly as long as
# some MODEL still uses it, so the cache never keeps a model alive that ComfyUI dropped.
_loaded_dits: "weakref.WeakValueDictionary[tuple, torch.nn.Module]" = weakref.WeakValueDictionary()
# (real path, mtime, size) -> None if the file is a loadable Wan2.1 T2V DiT, else the error message.
_checked_files: dict[tuple, str | None] = {}


def resolve_checkpoint_path(path: Path) -> Path:
    """A shard of a sharded diffusers checkpoint (listed by ComfyUI as a single file) -> its index,
    so the whole model is loaded; anything else unchanged."""
    for index_file in sorted(path.parent.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError):
            continue
        if path.name in set(weight_map.values()):
            return index_file
    return path


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def model_path(model_name: str) -> Path:
    """The checkpoint file of `model_name` in the diffusion_models folder (headless: a plain path)."""
    path = comfy_env.full_path("diffusion_models", model_name)
    if path is None and comfy_env.folder_paths() is None and os.path.isfile(str(model_name)):
        path = model_name
    if path is None:
        raise InputError(f"{LOADER_NAME}: model_name {model_name!r} was not found in the diffusion_models model "
                         "folder. Put the FastWan .safetensors file into ComfyUI/models/diffusion_models and press "
                         "R in the UI to refresh the list.")
    return resolve_checkpoint_path(Path(path))


def check_model_file(model_name: str) -> None:
    """Refuse, from the file's header alone, anything that is not a Wan2.1 T2V DiT (a VAE, a text
    encoder, an I2V model, a LoRA, a pickle)."""
    if not str(model_name).lower().endswith(MODEL_FILE_SUFFIXES):
        raise InputError(f"{LOADER_NAME}: {model_name!r} is not a .safetensors file; FastWan loads safetensors DiT "
                         "files only (pickled .pt/.ckpt files can run code when opened).")
    path = model_path(model_name)
    key = _file_key(path)
    if key not in _checked_files:
        try:
            infer_config(index_checkpoint(path))
            _checked_files[key] = None
        except FastWanError as error:
            _checked_files[key] = f"{LOADER_NAME}: {error}"
    if _checked_files[key] is not None:
        raise InputError(_checked_files[key])


def load_fastwan_dit(path: Path, dtype: torch.dtype):
    """Load (or reuse) the DiT in `path` computing in `dtype`, kept on the offload device. The block
    weights of fp8 files stay fp8: multiplied in fp8 where ComfyUI would (`use_fp8_matmul`), else
    up-cast per matmul."""
    key = _file_key(path) + (str(dtype),)
    cached = _loaded_dits.get(key)
    if cached is not None:
        return cached
    dit = load_dit(path, dtype=dtype, device=comfy_env.offload_device())
    if is_fp8_file(path):
        keep_fp8_weights(dit, path)
        device = comfy_env.load_device()
        use_fp8_matmul(dit, comfy_env.fp8_matmul_switch(device), device, dtype)
    _loaded_dits[key] = dit
    return dit


class FastWanModelLoader:
    """Load FastWan: a FastWan (or any Wan2.1 T2V) DiT from the diffusion_models folder, as a MODEL."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (cls.model_names(), {
                    "tooltip": "The FastWan DiT file in models/diffusion_models (e.g. "
                               "fastwan2.1_t2v_1.3B_bf16.safetensors). ComfyUI's own Wan2.1 T2V files and "
                               "diffusers transformer files load too, but only FastWan is trained for 3 steps "
                               "with sparse attention.",
                }),
                "weight_dtype": (["auto", "bf16", "fp16", "fp32"], {
                    "default": "auto",
                    "tooltip": "Precision the model computes in. auto: what ComfyUI picks for diffusion models on "
                               "your card (bf16 on recent NVIDIA cards, fp32 on CPU). fp32 doubles memory. The "
                               "block weights of fp8 files (*_fp8_e4m3fn, *_fp8_e4m3fn_scaled) stay fp8 in memory "
                               "and are up-cast for each matmul, or multiplied in fp8 with ComfyUI's "
                               "--fast fp8_matrix_mult on RTX 40xx / H100 and newer cards (bf16/fp16 only).",
                }),
            }
        }

    @staticmethod
    def model_names() -> list[str]:
        return [name for name in comfy_env.filename_list("diffusion_models")
                if name.lower().endswith(MODEL_FILE_SUFFIXES)]

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The FastWan DiT as a ComfyUI MODEL: use it with the 3-Step DMD Sampler, KSampler or "
                       "SamplerCustomAdvanced, LoRA loaders and model patches.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a FastWan Wan2.1 T2V DiT (safetensors) as a MODEL."

    @classmethod
    def VALIDATE_INPUTS(cls, model_name=None, weight_dtype=None):
        # Naming an input here turns off ComfyUI's own list check for it, so it is done here too.
        if model_name is not None and not str(model_name).lower().endswith(MODEL_FILE_SUFFIXES):
            return validation_result(check_model_file, model_name)
        if model_name is not None and comfy_env.folder_paths() is not None and model_name not in cls.model_names():
            return (f"{LOADER_NAME}: model_name {model_name!r} is not in models/diffusion_models. Put the file "
                    "there and press R in the UI to refresh the list.")
        if weight_dtype is not None and weight_dtype not in ("auto", *WEIGHT_DTYPES):
            return f"{LOADER_NAME}: weight_dtype {weight_dtype!r} is not one of auto, bf16, fp16, fp32"
        if model_name is not None:
            return validation_result(check_model_file, model_name)
        return True

    def load(self, model_name: str, weight_dtype: str = "auto"):
        check_model_file(model_name)
        path = model_path(model_name)
        if weight_dtype == "auto":
            # bf16 files hold two bytes per weight; ComfyUI only uses this as a rough size.
            dtype = comfy_env.auto_weight_dtype(comfy_env.load_device(), os.path.getsize(path) // 2)
        elif weight_dtype in WEIGHT_DTYPES:
            dtype = WEIGHT_DTYPES[weight_dtype]
        else:
            raise InputError(f"{LOADER_NAME}: weight_dtype {weight_dtype!r} is not one of auto, bf16, fp16, fp32")
        return (make_model(load_fastwan_dit(path, dtype), str(path)),)


def check_sparsity(sparsity) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= MAX_SPARSITY:
        raise InputError(f"{PATCH_NAME}: sparsity {sparsity} is outside 0..{MAX_SPARSITY}; FastWan was trained at 0.8 "
                         "(0 means dense attention)")
    return sparsity


def dense_weights_warning(model, sparsity: float) -> str | None:
    """The warning for sparse attention on weights that were not trained for it, or None."""
    if sparsity <= 0:
        return None
    dit = fastwan_dit(model)
    if dit is not None and dit.has_trained_gates():
        return None
    return (f"{PATCH_NAME}: {os.path.basename(model_source(model))} has no trained VSA gates (a dense Wan2.1 "
            f"model?). Sparse attention at {sparsity:.2f} will lose detail; use a FastWan checkpoint, or set "
            "sparsity to 0.")


class FastWanVSAPatch:
    """VSA Attention Patch: a copy of the model that samples with video sparse attention."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "A Wan2.1 text-to-video MODEL: Load FastWan, or ComfyUI's Load "
                                             "Diffusion Model with a Wan2.1 T2V file. It is not changed; the "
                                             "patch applies to the copy this node outputs."}),
                "sparsity": ("FLOAT", {
                    "default": 0.8, "min": 0.0, "max": MAX_SPARSITY, "step": 0.05,
                    "tooltip": "Fraction of key tiles each query tile skips. FastWan was trained at 0.8. "
                               "0 means dense attention. Higher is faster but blurrier.",
                }),
                "backend": (["auto", "triton", "reference"], {
                    "default": "auto",
                    "tooltip": "auto: the Triton kernel on NVIDIA cards, the PyTorch reference elsewhere. "
                               "reference: the PyTorch implementation (slow; for checking).",
                }),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model that uses video sparse attention at the chosen sparsity.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = "Switches a Wan2.1 model to Video Sparse Attention (VSA) for sampling."

    @classmethod
    def VALIDATE_INPUTS(cls, sparsity=None):
        return True if sparsity is None else validation_result(check_sparsity, sparsity)

    def patch(self, model, sparsity: float = 0.8, backend: str = "auto", unique_id=None):
        sparsity = check_sparsity(sparsity)
        if fastwan_dit(model) is None and native_wan_model(model) is None:
            raise InputError(f"{PATCH_NAME}: the model is not a Wan2.1 text-to-video model "
                             f"({type(getattr(model, 'model', model)).__name__}). Connect Load FastWan, or Load "
                             "Diffusion Model with a Wan2.1 T2V file.")
        config = AttentionConfig(backend="vsa" if sparsity > 0 else "dense", sparsity=sparsity, implementation=backend)
        patched = set_attention(model, config)
        warning = dense_weights_warning(model, sparsity)
        if warning is None:
            return (patched,)
        comfy_env.log.warning(warning)
        comfy_env.show_node_text(unique_id, warning)
        return {"ui": {"text": [warning]}, "result": (patched,)}
