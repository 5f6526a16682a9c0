"""The DiT's Linear layers the way ComfyUI's model management expects them, and fp8 files.

`CastableLinear` follows ComfyUI's weight-casting protocol (`comfy_cast_weights`, `weight_function`,
`bias_function`): when ComfyUI loads a model only partly onto the card (low VRAM), the layers left in
system memory fetch their weights (with LoRA patches) for each call, as ComfyUI's own layers do.

fp8 files (`*_fp8_e4m3fn`, `*_fp8_e4m3fn_scaled`): `Fp8Linear` keeps the block weights float8 in
memory and up-casts them for each matmul to the compute dtype (bf16 / fp16 / fp32), times the
per-tensor scale of scaled files. Its `convert_weight` / `set_weight` are the hooks ComfyUI's
ModelPatcher calls to read a weight in full precision and write it back, so LoRAs patch fp8 weights
as they patch ComfyUI's own fp8 models.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..fastwan_core.checkpoint import index_checkpoint

FP8_FILE_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CastableLinear(torch.nn.Linear):
    """nn.Linear that ComfyUI can leave in system memory and patch on the fly."""

    def dequantize(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The stored weight (or a fetched copy of it) -> the weight it stands for, in `dtype`."""
        return stored.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.comfy_cast_weights or self.weight_function or self.bias_function:
            weight = weight.to(x.device, non_blocking=True)
            for patch in self.weight_function:
                weight = patch(weight)
            if bias is not None:
                bias = bias.to(x.device, non_blocking=True)
                for patch in self.bias_function:
                    bias = patch(bias)
        return F.linear(x, self.dequantize(weight, x.dtype), None if bias is None else bias.to(x.dtype))


def make_castable(model: torch.nn.Module) -> torch.nn.Module:
    """Every nn.Linear of `model` becomes a CastableLinear (same module, same weights)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = CastableLinear
        if isinstance(module, CastableLinear) and "weight_function" not in module.__dict__:
            module.comfy_cast_weights = False
            module.weight_function = []
            module.bias_function = []
    return model


class Fp8Linear(CastableLinear):
    """A Linear whose weight is float8 (with an optional float32 `scale_weight`)."""

    def dequantize(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        weight = stored.to(dtype)
        return weight if self.scale_weight is None else weight * self.scale_weight.to(device=weight.device, dtype=dtype)

    def full_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(self.weight, dtype)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **unused) -> torch.Tensor:
        """Stored (float8, or an up-cast copy of it) -> the weight it stands for, in weight's dtype."""
        if self.scale_weight is None:
            return weight
        scale = self.scale_weight.to(device=weight.device, dtype=weight.dtype)
        return weight.mul_(scale) if inplace else weight * scale

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **unused):
        """A full-precision weight (e.g. with a LoRA merged in) -> stored float8 (round to nearest)."""
        if self.scale_weight is not None:
            weight = weight / self.scale_weight.to(device=weight.device, dtype=weight.dtype)
        stored = weight.to(self.weight.dtype)
        if return_weight:
            return stored
        if inplace_update:
            self.weight.data.copy_(stored)
        else:
            self.weight = torch.nn.Parameter(stored, requires_grad=False)


def is_fp8_file(path: Path) -> bool:
    """True when most of the file's weights are float8 (read from the header only)."""
    entries = index_checkpoint(path).entries.values()
    return any(entry.dtype in FP8_FILE_DTYPES for entry in entries)


def keep_fp8_weights(dit: torch.nn.Module, path: Path) -> int:
    """Put the file's float8 block weights (and their scales) back into `dit`'s Linear layers, which
    `load_dit` loaded up-cast; returns how many layers now hold float8 weights."""
    index = index_checkpoint(path)
    count = 0
    handles = {}
    try:
        for key, entry in index.entries.items():
            if entry.dtype not in FP8_FILE_DTYPES or not key.startswith("blocks.") or not key.endswith(".weight"):
                continue
            if ".to_gate_compress." in key:
                continue  # the VSA gates (~5% of the weights) stay up-cast: WanDiT inspects them as numbers
            module = dit.get_submodule(key[: -len(".weight")])
            if type(module) not in (torch.nn.Linear, CastableLinear):
                continue
            if entry.file not in handles:
                handles[entry.file] = safe_open(str(entry.file), framework="pt", device="cpu")
            stored = handles[entry.file].get_tensor(entry.stored_key).to(module.weight.device)
            scale = None
            if key in index.scales:
                scale_entry = index.scales[key]
                if scale_entry.file not in handles:
                    handles[scale_entry.file] = safe_open(str(scale_entry.file), framework="pt", device="cpu")
                scale = handles[scale_entry.file].get_tensor(scale_entry.stored_key).float().reshape(())
            module.__class__ = Fp8Linear
            module.weight = torch.nn.Parameter(stored, requires_grad=False)
            module.register_buffer("scale_weight", None if scale is None else scale.to(module.weight.device))
            count += 1
    finally:
        handles.clear()
    return count
