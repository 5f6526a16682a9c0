"""fp8 DiT files (`*_fp8_e4m3fn`, `*_fp8_e4m3fn_scaled`): the block weights stay float8 in memory and
are up-cast for each matmul to the compute dtype (bf16 / fp16 / fp32), times the per-tensor scale of
scaled files.

`Fp8Linear` also offers `convert_weight` / `set_weight`, the hooks ComfyUI's ModelPatcher calls to
read a weight in full precision and write it back, so LoRAs patch fp8 weights as they patch ComfyUI's
own fp8 models.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..fastwan_core.checkpoint import index_checkpoint

FP8_FILE_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is float8 (with an optional float32 `scale_weight`)."""

    scale_weight: torch.Tensor | None

    def full_weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.weight.to(dtype)
        return weight if self.scale_weight is None else weight * self.scale_weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.full_weight(x.dtype), bias)

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
            if type(module) is not torch.nn.Linear:
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
