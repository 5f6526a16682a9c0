"""Self-attention backends of the DiT: dense (SDPA) or VSA (video sparse attention).

An `AttentionConfig` names the backend, its sparsity and the VSA implementation; a `WanDiT` holds
one as its `attention` attribute (see `WanDiT.with_attention` for a copy that shares the weights).
`BACKENDS` and `IMPLEMENTATIONS` are the valid choices, for every config file, CLI and node that
offers them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("dense", "vsa")
# VSA implementations: "auto" = Triton on CUDA when importable, else the PyTorch reference.
IMPLEMENTATIONS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class AttentionConfig:
    """The DiT's self-attention: `backend` "dense" or "vsa"; for VSA, the fraction of key tiles each
    query tile skips (`sparsity` in [0, 1)) and which kernel runs it (`implementation`)."""

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
