"""Load FastWan Text Encoder: a diffusers-style umT5 folder as a CLIP that CLIPTextEncode accepts.

ComfyUI's CLIPLoader builds only the full-size umT5-XXL from one file. This node loads the
`text_encoder/` (config.json + safetensors) and `tokenizer/` folders of a diffusers model folder
(the FastWan / Wan2.1 diffusers download, or a smaller umT5 of any width) with
`fastwan_core.text_encoder.UMT5TextEncoder`, the loader the headless pipeline uses. Its output goes
into core CLIPTextEncode, which calls `tokenize` and `encode_from_tokens_scheduled`; the
CONDITIONING holds Wan's context: [1, 512, d_model], rows past the prompt's tokens zero.

The list shows every folder under models/text_encoders holding `text_encoder/<weights>.safetensors`
(the names ComfyUI's folder_paths lists), named by the model folder's path there.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import torch

from ..fastwan_core.errors import FastWanError, InputError
from ..fastwan_core.text_encoder import UMT5TextEncoder, check_text_encoder_folder
from . import comfy_env
from .model_nodes import CATEGORY, validation_result

NODE_NAME = "Load FastWan Text Encoder"
FOLDER_NAME = "text_encoders"


def text_encoder_folders() -> dict[str, Path]:
    """Model folder name (relative to models/text_encoders) -> its path, for every folder whose
    `text_encoder/` holds safetensors weights."""
    folders = {}
    for name in comfy_env.filename_list(FOLDER_NAME):
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or parts[-2] != "text_encoder" or not parts[-1].endswith(".safetensors"):
            continue
        folder_name = "/".join(parts[:-2])
        if folder_name not in folders:
            full = comfy_env.full_path(FOLDER_NAME, name)
            if full is not None:
                folders[folder_name] = Path(full).parent.parent
    return folders


def text_encoder_path(folder: str) -> Path:
    """The model folder of `folder` (headless: a plain path to it)."""
    path = text_encoder_folders().get(folder)
    if path is None and comfy_env.folder_paths() is None and Path(str(folder)).is_dir():
        path = Path(folder)
    if path is None:
        raise InputError(f"{NODE_NAME}: {folder!r} is not a folder with text_encoder/*.safetensors in "
                         "models/text_encoders. Copy the model's text_encoder/ and tokenizer/ folders (e.g. of "
                         "FastWan2.1-T2V-1.3B-Diffusers) into models/text_encoders/<name>/ and press R in the UI "
                         "to refresh the list.")
    return path


def check_folder(folder: str) -> Path:
    """Everything checkable without loading: listed, tokenizer present, config and safetensors
    weights complete, nothing pickled. Raises InputError naming the node."""
    path = text_encoder_path(folder)
    try:
        check_text_encoder_folder(path)
    except FastWanError as error:
        raise InputError(f"{NODE_NAME}: {error}") from error
    return path


def text_encoder_dtype() -> torch.dtype:
    """bf16 on a CUDA card that has it, else fp32 (umT5 overflows in fp16; CPU matmuls in half
    precision are slow)."""
    device = comfy_env.text_encoder_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class FolderTextEncoder:
    """The CLIP this node outputs: the few members core CLIPTextEncode calls. The weights stay on
    ComfyUI's text-encoder offload device and visit its text-encoder device for each prompt."""

    def __init__(self, encoder: UMT5TextEncoder, source: Path):
        self.encoder = encoder
        self.source = source

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs):
        # The prompt stays text: UMT5TextEncoder cleans and tokenizes it Wan's way when encoding.
        if return_word_ids:
            raise InputError(f"{NODE_NAME}: this text encoder works with CLIPTextEncode only; nodes that need "
                             "word ids (prompt weighting extensions) are not supported.")
        return {"fastwan_prompt": str(text)}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        prompt = tokens.get("fastwan_prompt") if isinstance(tokens, dict) else None
        if prompt is None:
            raise InputError(f"{NODE_NAME}: got tokens from another text encoder; connect this node's CLIP "
                             "straight to CLIPTextEncode.")
        device, offload = comfy_env.text_encoder_device(), comfy_env.text_encoder_offload_device()
        self.encoder.to(device)
        try:
            cond = self.encoder.encode(prompt)  # [1, 512, d_model]
        finally:
            self.encoder.to(offload)
        cond = cond.float().to(comfy_env.intermediate_device())
        if return_dict:
            return {"cond": cond, "pooled_output": None}
        return (cond, None) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        cond = self.encode_from_tokens(tokens)
        return [[cond, {"pooled_output": None, **(add_dict or {})}]]


class FastWanTextEncoderLoader:
    """Load FastWan Text Encoder: umT5 from a diffusers-style text_encoder/ + tokenizer/ folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": (sorted(text_encoder_folders()), {
                    "tooltip": "A model folder in models/text_encoders holding text_encoder/ (config.json + "
                               "model.safetensors) and tokenizer/, e.g. the one of FastWan2.1-T2V-1.3B-Diffusers. "
                               "Any umT5 size; its width must match the DiT's text channels (4096 for Wan2.1). "
                               "Safetensors only.",
                }),
            }
        }

    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The umT5 text encoder, for CLIPTextEncode (its CONDITIONING is Wan's [1, 512, width] "
                       "context).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a diffusers-style umT5 text encoder folder (text_encoder/ + tokenizer/) of any size, "
                   "for CLIPTextEncode.")

    @classmethod
    def VALIDATE_INPUTS(cls, folder=None):
        # Naming the input here turns off ComfyUI's own list check for it; check_folder does it.
        return True if folder is None else validation_result(check_folder, folder)

    def load(self, folder: str):
        path = check_folder(folder)
        try:
            encoder = UMT5TextEncoder.from_folder(path, dtype=text_encoder_dtype(),
                                                  device=comfy_env.text_encoder_offload_device())
        except FastWanError as error:
            raise InputError(f"{NODE_NAME}: {error}") from error
        return (FolderTextEncoder(encoder, path),)

