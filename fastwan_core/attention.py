"""Self-attention backends of the DiT: dense (SDPA) or VSA (video sparse attention).

The backend is a per-call setting (`AttentionConfig`), so a ComfyUI patch node can switch it on a
copy of a model without touching the shared weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("dense", "vsa")
IMPLEMENTATIONS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class AttentionConfig:
    backend: str = "dense"
    sparsity: float = 0.0
    implementation: str = "auto"

    def __post_init__(self):
        from .errors import InputError

        if self.backend not in BACKENDS:
            raise InputError(f"attention backend {self.backend!r} is unknown; use one of {BACKENDS}")
        if self.implementation not in IMPLEMENTATIONS:
            raise InputError(f"attention implementation {self.implementation!r} is unknown; "
                             f"use one of {IMPLEMENTATIONS}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise InputError(f"VSA sparsity {self.sparsity} is outside [0, 1); FastWan runs at 0.8")

    @classmethod
    def vsa(cls, sparsity: float = 0.8, implementation: str = "auto") -> "AttentionConfig":
        return cls(backend="vsa", sparsity=sparsity, implementation=implementation)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full softmax attention. q [B,Lq,h,D], k/v [B,Lk,h,D] -> [B,Lq,h,D] (scale 1/sqrt(D))."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
