"""The DiT's Linear layers the way ComfyUI's model management expects them, and fp8 files.

`CastableLinear` follows ComfyUI's weight-casting protocol (`comfy_cast_weights`, `weight_function`,
`bias_function`): when ComfyUI loads a model only partly onto the card (low VRAM), the layers left in
system memory fetch their weights (with LoRA patches) for each call, as ComfyUI's own layers do.

fp8 files (`*_fp8_e4m3fn`, `*_fp8_e4m3fn_scaled`): `Fp8Linear` keeps the block weights float8 in
memory and up-casts them for each matmul to the compute dtype (bf16 / fp16 / fp32), times the
per-tensor scale of scaled files. Where ComfyUI would multiply in fp8 (`use_fp8_matmul`: its
`--fast fp8_matrix_mult` switch, an sm_89+ NVIDIA card, bf16/fp16 compute), e4m3 layers instead
call `torch._scaled_mm` on the stored weight (`fp8_linear`). Its `convert_weight` / `set_weight` are
the hooks ComfyUI's ModelPatcher calls to read a weight in full precision and write it back, so
LoRAs patch fp8 weights as they patch ComfyUI's own fp8 models.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..fastwan_core.checkpoint import index_checkpoint

FP8_FILE_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_MATMUL_COMPUTE_DTYPES = (torch.bfloat16, torch.float16)
FP8_MATMUL_ALIGNMENT = 16  # torch._scaled_mm: in_features and out_features must be multiples of 16
FP8_MATMUL_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm_89), Hopper (sm_90) and newer


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_weight: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) bf16/fp16, weight (N, K) float8_e4m3fn on x's device, scale_weight a float32
    scalar (None = 1), bias (N,) in x's dtype or None -> (..., N) in x's dtype, by one fp8 matmul.

    The input is quantized as ComfyUI quantizes it for files without `scale_input`: a per-tensor
    scale of 1, values clamped to e4m3's finite range (+-448) and rounded to e4m3 (3 mantissa bits).
    No dynamic amax scale, so there is no reduction and no host sync."""
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    rows8 = rows.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    unit = torch.ones((), device=x.device, dtype=torch.float32)
    scale_b = unit if scale_weight is None else scale_weight.to(device=x.device, dtype=torch.float32)
    # weight.t() is (K, N) column-major, the layout _scaled_mm wants for its second operand.
    out = torch._scaled_mm(rows8, weight.t(), scale_a=unit, scale_b=scale_b, bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


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
    """A Linear whose weight is float8 (with an optional float32 `scale_weight`).

    `fp8_matmul` (set once by `use_fp8_matmul` when the model is loaded) says whether this layer may
    multiply in fp8; a call then takes `fp8_linear` when its input is 2-D or 3-D bf16/fp16 and no
    LoRA patch hangs in `weight_function` (a patched weight is no longer the stored fp8 one), and
    the up-cast path otherwise. The per-call test reads shapes and dtypes only: no host sync."""

    fp8_matmul = False

    def takes_fp8_matmul(self, x: torch.Tensor) -> bool:
        return (self.fp8_matmul and not self.weight_function and x.dim() in (2, 3)
                and x.dtype in FP8_MATMUL_COMPUTE_DTYPES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_fp8_matmul(x):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if self.comfy_cast_weights:
            weight = weight.to(x.device, non_blocking=True)
        if bias is not None:
            bias = bias.to(x.device, non_blocking=True)
            for patch in self.bias_function:
                bias = patch(bias)
            bias = bias.to(x.dtype)
        return fp8_linear(x, weight, self.scale_weight, bias)

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


def fp8_matmul_capable(device: torch.device | str) -> bool:
    """True for an NVIDIA card with fp8 tensor cores (compute capability 8.9 or newer)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MATMUL_MIN_CAPABILITY


def use_fp8_matmul(model: torch.nn.Module, switch_on: bool, device: torch.device | str,
                   compute_dtype: torch.dtype) -> int:
    """Decide, once at load time, which Fp8Linear layers of `model` multiply in fp8 on `device`:
    all e4m3 layers whose in/out features are multiples of 16, if `switch_on` (ComfyUI's
    `--fast fp8_matrix_mult`, see `comfy_env.fp8_matmul_switch`), the device is fp8-capable and the
    model computes in bf16/fp16; none otherwise. Returns how many layers multiply in fp8."""
    enabled = (switch_on and compute_dtype in FP8_MATMUL_COMPUTE_DTYPES and fp8_matmul_capable(device))
    count = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.fp8_matmul = (enabled and module.weight.dtype == torch.float8_e4m3fn
                                 and module.in_features % FP8_MATMUL_ALIGNMENT == 0
                                 and module.out_features % FP8_MATMUL_ALIGNMENT == 0)
            count += module.fp8_matmul
    return count


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
