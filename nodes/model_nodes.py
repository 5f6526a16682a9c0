"""Load FastWan and VSA Attention Patch: the nodes that produce a FASTWAN_MODEL.

A FASTWAN_MODEL is a ComfyUI ModelPatcher (outside ComfyUI: `comfy_env.PlainModelPatcher`) around a
`FastWanDiffusionModel`, which holds the `WanDiT`. The patcher lets ComfyUI move the weights between
the card and system memory like any core model; its `model_options` carry the attention setting
that the sampler passes to `WanDiT.forward`, so patching never touches the shared weights.
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import torch

from ..fastwan_core.attention import AttentionConfig
from ..fastwan_core.checkpoint import load_dit
from ..fastwan_core.errors import InputError
from ..fastwan_core.model import WanDiT
from . import comfy_env

FASTWAN_MODEL = "FASTWAN_MODEL"
CATEGORY = "FastWan"
# Key of the AttentionConfig in the patcher's model_options.
ATTENTION_OPTION = "fastwan_attention"

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft")


class FastWanDiffusionModel(torch.nn.Module):
    """The module ComfyUI's model management moves around: the DiT plus what ModelPatcher expects
    of a model (`get_dtype`, a writable `device`). `WanDiT.device` is a read-only property, so the
    DiT cannot be handed to ModelPatcher directly."""

    def __init__(self, dit: WanDiT, source: str):
        super().__init__()
        self.diffusion_model = dit
        self.source = source
        self.device = dit.device

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype


def dit_of(model) -> WanDiT:
    """The WanDiT inside a FASTWAN_MODEL; a clear error for anything else."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, FastWanDiffusionModel):
        raise InputError(f"expected a FASTWAN_MODEL from the 'Load FastWan' node, got {type(model).__name__}. "
                         "Connect Load FastWan (optionally through VSA Attention Patch) to this input; core "
                         "MODEL outputs (Load Diffusion Model) cannot be used here.")
    return inner.diffusion_model


def attention_of(model) -> AttentionConfig:
    """The attention setting a FASTWAN_MODEL samples with (dense unless VSA Attention Patch set it)."""
    config = model.model_options.get(ATTENTION_OPTION)
    return config if config is not None else dit_of(model).attention


# ------------------------------------------------------------------------------------------------
# Loading, with a cache so one file is read once however many handles use it

# (real path, mtime, size, dtype) -> the loaded module. Weak values: an entry lives exactly as long
# as some FASTWAN_MODEL still uses it, so the cache never keeps a model alive that ComfyUI dropped.
_loaded_models: "weakref.WeakValueDictionary[tuple, FastWanDiffusionModel]" = weakref.WeakValueDictionary()


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


def load_fastwan_model(path: str | os.PathLike, dtype: torch.dtype) -> FastWanDiffusionModel:
    """Load (or reuse) the DiT in `path` with weights of `dtype`, kept on the offload device."""
    path = resolve_checkpoint_path(Path(path))
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(dtype))
    cached = _loaded_models.get(key)
    if cached is not None:
        return cached
    dit = load_dit(path, dtype=dtype, device=comfy_env.offload_device())
    module = FastWanDiffusionModel(dit, str(path))
    _loaded_models[key] = module
    return module


class FastWanModelLoader:
    """Load FastWan: a FastWan (or any Wan2.1 T2V) DiT from the diffusion_models folder."""

    @classmethod
    def INPUT_TYPES(cls):
        names = [name for name in comfy_env.filename_list("diffusion_models")
                 if name.lower().endswith(MODEL_FILE_SUFFIXES)]
        return {
            "required": {
                "model_name": (names, {
                    "tooltip": "The FastWan DiT file in models/diffusion_models (e.g. "
                               "fastwan2.1_t2v_1.3B_bf16.safetensors). ComfyUI's own Wan2.1 T2V files and "
                               "diffusers transformer folders load too, but only FastWan is trained for 3 steps "
                               "with sparse attention.",
                }),
                "weight_dtype": (["auto", "bf16", "fp16", "fp32"], {
                    "default": "auto",
                    "tooltip": "Precision of the weights. auto: what ComfyUI picks for diffusion models on your "
                               "card (bf16 on recent NVIDIA cards, fp32 on CPU). fp32 doubles memory.",
                }),
            }
        }

    RETURN_TYPES = (FASTWAN_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The FastWan DiT, managed by ComfyUI (moved to the card only while sampling).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a FastWan Wan2.1 T2V DiT (safetensors) for the 3-Step DMD Sampler."

    def load(self, model_name: str, weight_dtype: str = "auto"):
        path = comfy_env.full_path("diffusion_models", model_name)
        if path is None and comfy_env.folder_paths() is None and os.path.isfile(model_name):
            path = model_name  # headless use: a plain file path
        if path is None:
            raise InputError(f"Load FastWan: model_name {model_name!r} was not found in the diffusion_models "
                             "model folder. Put the FastWan .safetensors file into ComfyUI/models/diffusion_models "
                             "and press R in the UI to refresh the list.")
        load_dev, offload_dev = comfy_env.load_device(), comfy_env.offload_device()
        if weight_dtype == "auto":
            # bf16 files hold two bytes per weight; ComfyUI only uses this as a rough size.
            dtype = comfy_env.auto_weight_dtype(load_dev, os.path.getsize(path) // 2)
        elif weight_dtype in WEIGHT_DTYPES:
            dtype = WEIGHT_DTYPES[weight_dtype]
        else:
            raise InputError(f"Load FastWan: weight_dtype {weight_dtype!r} is not one of auto, bf16, fp16, fp32")
        module = load_fastwan_model(path, dtype)
        return (comfy_env.make_patcher(module, load_dev, offload_dev),)


class FastWanVSAPatch:
    """VSA Attention Patch: a copy of the model that samples with video sparse attention."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (FASTWAN_MODEL, {"tooltip": "The model from Load FastWan. It is not changed; the patch "
                                                     "applies to the copy this node outputs."}),
                "sparsity": ("FLOAT", {
                    "default": 0.8, "min": 0.0, "max": 0.95, "step": 0.05,
                    "tooltip": "Fraction of key tiles each query tile skips. FastWan was trained at 0.8. "
                               "0 means dense attention. Higher is faster but blurrier.",
                }),
                "backend": (["auto", "triton", "reference"], {
                    "default": "auto",
                    "tooltip": "auto: the Triton kernel on NVIDIA cards, the PyTorch reference elsewhere. "
                               "reference: the PyTorch implementation (slow; for checking).",
                }),
            }
        }

    RETURN_TYPES = (FASTWAN_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model that uses video sparse attention at the chosen sparsity.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = "Switches a FastWan model to Video Sparse Attention (VSA) for sampling."

    def patch(self, model, sparsity: float = 0.8, backend: str = "auto"):
        dit = dit_of(model)
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise InputError(f"VSA Attention Patch: sparsity {sparsity} is outside 0..0.95; FastWan was trained at 0.8")
        config = AttentionConfig(backend="vsa" if sparsity > 0 else "dense",
                                 sparsity=sparsity if sparsity > 0 else 0.0, implementation=backend)
        if sparsity > 0 and not dit.has_trained_gates():
            comfy_env.log.warning(
                "VSA Attention Patch: %s has no trained VSA gates (a dense Wan2.1 checkpoint?). Sparse attention at "
                "%.2f will lose detail; use a FastWan checkpoint, or set sparsity to 0.",
                getattr(model.model, "source", "the model"), sparsity)
        patched = model.clone()
        patched.model_options[ATTENTION_OPTION] = config
        return (patched,)
