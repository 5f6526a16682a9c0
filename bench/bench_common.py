"""Pieces shared by the benchmark scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""
from __future__ import annotations

import torch

from fastwan.fastwan_core import WanDiT
from fastwan.fastwan_core.checkpoint import dit_state_dict


def diffusers_transformer(ours: WanDiT, device, dtype):
    from diffusers import WanTransformer3DModel

    kwargs = {k: v for k, v in ours.config.to_diffusers_config().items() if k != "_class_name"}
    with torch.device(device):
        reference = WanTransformer3DModel(**kwargs)
    state = {k: v for k, v in dit_state_dict(ours, "diffusers").items() if "to_gate_compress" not in k}
    reference.load_state_dict(state, strict=True)
    reference = reference.to(dtype).eval()
    # diffusers keeps these in fp32 when loading bf16 weights (_keep_in_fp32_modules); match it.
    for name, module in reference.named_modules():
        if any(part in name for part in ("time_embedder", "norm1", "norm2", "norm3")):
            module.float()
    reference.scale_shift_table.data = reference.scale_shift_table.data.float()
    for block in reference.blocks:
        block.scale_shift_table.data = block.scale_shift_table.data.float()
    return reference
