"""Checkpoint key layouts of the Wan DiT, and the one key map between them.

Layouts differ by key names only (no reshapes):
- "original": the Wan release (`blocks.N.self_attn.q`, `blocks.N.norm3`, `head.head`, ...). This is
  also `WanDiT`'s own parameter naming.
- "diffusers": `WanTransformer3DModel` (`blocks.N.attn1.to_q`, `blocks.N.norm2`, `proj_out`, ...).
  FastWan's diffusers checkpoints add `blocks.N.to_gate_compress.*`.
- "comfy": the original names under `model.diffusion_model.` (ComfyUI's repackaged files).
- "fastwan": our export: diffusers names plus the model config in the safetensors metadata.
"""
from __future__ import annotations

import re
from typing import Iterable

LAYOUTS = ("diffusers", "original", "comfy", "fastwan")
COMFY_PREFIX = "model.diffusion_model."
# Other prefixes seen on Wan files in the wild, stripped before layout detection.
STRIPPABLE_PREFIXES = (COMFY_PREFIX, "diffusion_model.", "model.")

# Per-block renames original -> diffusers (the suffix after `blocks.N.`).
_BLOCK_RENAMES = {
    "self_attn.q.": "attn1.to_q.",
    "self_attn.k.": "attn1.to_k.",
    "self_attn.v.": "attn1.to_v.",
    "self_attn.o.": "attn1.to_out.0.",
    "self_attn.norm_q.": "attn1.norm_q.",
    "self_attn.norm_k.": "attn1.norm_k.",
    "cross_attn.q.": "attn2.to_q.",
    "cross_attn.k.": "attn2.to_k.",
    "cross_attn.v.": "attn2.to_v.",
    "cross_attn.o.": "attn2.to_out.0.",
    "cross_attn.norm_q.": "attn2.norm_q.",
    "cross_attn.norm_k.": "attn2.norm_k.",
    "norm3.": "norm2.",  # the affine LayerNorm before cross-attention
    "ffn.0.": "ffn.net.0.proj.",
    "ffn.2.": "ffn.net.2.",
    "to_gate_compress.": "to_gate_compress.",
}
_BLOCK_EXACT = {"modulation": "scale_shift_table"}

_TOP_RENAMES = {
    "patch_embedding.": "patch_embedding.",
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "head.head.": "proj_out.",
}
_TOP_EXACT = {"head.modulation": "scale_shift_table"}

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, block_renames, block_exact, top_renames, top_exact) -> str | None:
    match = _BLOCK_KEY.match(key)
    if match:
        index, rest = match.groups()
        if rest in block_exact:
            return f"blocks.{index}.{block_exact[rest]}"
        for old, new in block_renames.items():
            if rest.startswith(old):
                return f"blocks.{index}.{new}{rest[len(old):]}"
        return None
    if key in top_exact:
        return top_exact[key]
    for old, new in top_renames.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _invert(mapping: dict) -> dict:
    return {v: k for k, v in mapping.items()}


def original_to_diffusers_key(key: str) -> str | None:
    """An original-layout key -> its diffusers name, or None if it is not a Wan T2V DiT key."""
    return _rename(key, _BLOCK_RENAMES, _BLOCK_EXACT, _TOP_RENAMES, _TOP_EXACT)


def diffusers_to_original_key(key: str) -> str | None:
    """A diffusers key -> its original-layout name, or None if it is not a Wan T2V DiT key."""
    return _rename(key, _invert(_BLOCK_RENAMES), _invert(_BLOCK_EXACT), _invert(_TOP_RENAMES),
                   _invert(_TOP_EXACT))


def strip_prefix(keys: Iterable[str]) -> str:
    """The common wrapper prefix of a key set ('' if none), e.g. 'model.diffusion_model.'."""
    keys = list(keys)
    for prefix in STRIPPABLE_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def detect_layout(keys: Iterable[str]) -> str | None:
    """'diffusers' or 'original' for un-prefixed keys, or None when neither layout fits."""
    keys = set(keys)
    diffusers_markers = {"proj_out.weight", "condition_embedder.time_proj.weight"}
    original_markers = {"head.head.weight", "time_projection.1.weight"}
    if keys & diffusers_markers or any(".attn1." in k for k in keys):
        return "diffusers"
    if keys & original_markers or any(".self_attn." in k for k in keys):
        return "original"
    return None


def is_image_to_video(keys: Iterable[str]) -> bool:
    return any(("img_emb" in k or "k_img" in k or "add_k_proj" in k or "image_embedder" in k) for k in keys)
