"""The Wan2.1 text-to-video DiT, with a swappable self-attention (dense SDPA or VSA).

Module and parameter names follow the original Wan release (`self_attn.q`, `ffn.0`, `modulation`,
`head.head`, ...), plus FastWan's per-block VSA gate `to_gate_compress`; `state_dict_adapter.py`
maps them to the diffusers and ComfyUI layouts. With the same weights, the forward pass equals
diffusers' `WanTransformer3DModel` (fp32, relative error <= 1e-5).

The self-attention backend is a per-instance setting, `WanDiT.attention` (an `AttentionConfig`),
and the only way to choose it: set the attribute on a model you own, or take
`model.with_attention(config)`, a copy that shares the weights, when others hold the model.
"""
from __future__ import annotations

import copy
import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import AttentionConfig, dense_attention
from .config import ROPE_THETA, WanConfig

# Parameters kept in float32 whatever the model dtype: the timestep path and the modulation tables
# feed every block's scale/shift/gate, and bf16 there visibly shifts outputs (Wan runs them in fp32).
FP32_PARAMETER_MARKERS = ("time_embedding.", "time_projection.", "modulation")


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in float32 (Wan does all its norms in fp32); returns float32."""
    return F.layer_norm(x.float(), (x.shape[-1],),
                        None if weight is None else weight.float(),
                        None if bias is None else bias.float(), eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (all heads together, as Wan's q/k norm), with PyTorch's fused
    kernel, which accumulates in fp32 as Wan's own norm does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class AffineLayerNorm(nn.Module):
    """The only affine LayerNorm of a Wan block: before cross-attention (original name `norm3`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_fp32(x, self.eps, self.weight, self.bias).to(x.dtype)


def timestep_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim], (cos, sin) halves, max period 10000, in fp32."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


@lru_cache(maxsize=32)
def rope_table(head_split: tuple[int, int, int], grid: tuple[int, int, int], device: str = "cpu"):
    """The 3D RoPE angles for every token of `grid` in (t, h, w) order as [L, head_dim/2, 2] float32
    (cos, sin), computed in float64. Each axis uses its own channel group with frequencies
    theta^(-2i/n)."""
    tables = []
    for axis_dim, axis_len in zip(head_split, grid):
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim))
        tables.append(torch.outer(torch.arange(axis_len, dtype=torch.float64), inv_freq))  # [n, axis_dim/2]
    t_len, h_len, w_len = grid
    angles = torch.cat([
        tables[0][:, None, None, :].expand(t_len, h_len, w_len, -1),
        tables[1][None, :, None, :].expand(t_len, h_len, w_len, -1),
        tables[2][None, None, :, :].expand(t_len, h_len, w_len, -1),
    ], dim=-1).reshape(t_len * h_len * w_len, -1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).to(device=device, dtype=torch.float32)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs by the RoPE angles. x [B, L, h, D]; rope [L, D/2, 2] float32
    (cos, sin). Computed in fp32, returned in x's dtype."""
    rope = rope[None, :, None]  # [1, L, 1, D/2, 2]
    if torch.compiler.is_compiling():
        # Real arithmetic: inductor fuses it into one kernel (it does not lower complex ops).
        even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rope.unbind(-1)
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2).to(x.dtype)
    # Eager: one complex product instead of six real passes over the tensor.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.view_as_complex(rope)).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """q/k/v/o projections with RMSNorm on q and k across all heads: the weights of both Wan
    attentions; the subclasses differ only in what they attend to."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)


class SelfAttention(Attention):
    """Self-attention over the video tokens with 3D RoPE: dense SDPA, or VSA with the block's gate."""

    def forward(self, x, rope, gate_proj: nn.Linear, attention: "ResolvedAttention"):
        # x [B, L, dim] -> q/k/v (and the VSA gate) [B, L, heads, head_dim]
        heads = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (heads, -1))
        v = self.v(x).unflatten(-1, (heads, -1))
        # One dtype for the attention kernels: under autocast the norms return fp32, the
        # projections the autocast dtype.
        q = apply_rope(q, rope).to(v.dtype)
        k = apply_rope(k, rope).to(v.dtype)
        gate = None if attention.tile_layout is None else gate_proj(x).unflatten(-1, (heads, -1)).to(v.dtype)
        return self.o(self.attend(q, k, v, gate, attention).flatten(2))

    def attend(self, q, k, v, gate, attention: "ResolvedAttention"):
        """The attention kernel over the whole token sequence: q, k, v, gate [B, L, heads, head_dim]
        (gate None for dense). Sequence parallelism wraps this call (training/distributed.py)."""
        if attention.tile_layout is None:
            return dense_attention(q, k, v)
        from ..kernels.vsa import video_sparse_attention_tiled

        return video_sparse_attention_tiled(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention.tile_layout,
            attention.topk, gate=gate.transpose(1, 2), implementation=attention.config.implementation,
        ).transpose(1, 2)


class CrossAttention(Attention):
    def forward(self, x, context):
        heads = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (heads, -1))
        k = self.norm_k(self.k(context)).unflatten(-1, (heads, -1))
        v = self.v(context).unflatten(-1, (heads, -1))
        return self.o(dense_attention(q, k, v).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.self_attn = SelfAttention(config)
        self.norm3 = AffineLayerNorm(dim, config.eps)
        self.cross_attn = CrossAttention(config)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        # (shift, scale, gate) for self-attention, then for the FFN; added to the time projection.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        # FastWan's VSA gate on the coarse branch; zeros (no coarse term) for dense-trained models.
        self.to_gate_compress = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_gate_compress.weight)
        nn.init.zeros_(self.to_gate_compress.bias)

    def forward(self, x, time_mod, context, rope, attention):
        # x [B, L, dim]; time_mod [B, 6, dim] float32
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + time_mod).unbind(1)
        normed = (layer_norm_fp32(x, self.eps) * (1 + scale_sa[:, None]) + shift_sa[:, None]).to(x.dtype)
        attn_out = self.self_attn(normed, rope, self.to_gate_compress, attention)
        x = (x.float() + attn_out.float() * gate_sa[:, None]).to(x.dtype)
        x = x + self.cross_attn(self.norm3(x), context)
        normed = (layer_norm_fp32(x, self.eps) * (1 + scale_ff[:, None]) + shift_ff[:, None]).to(x.dtype)
        x = (x.float() + self.ffn(normed).float() * gate_ff[:, None]).to(x.dtype)
        return x


class Head(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, config.out_channels * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x, time_emb):
        shift, scale = (self.modulation.float() + time_emb.float()[:, None]).unbind(1)
        x = (layer_norm_fp32(x, self.eps) * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)
        return self.head(x)


class ResolvedAttention:
    """An AttentionConfig bound to one forward's token grid."""

    def __init__(self, config: AttentionConfig, grid, device):
        self.config = config
        self.tile_layout = None
        self.topk = 0
        if config.backend == "vsa":
            from ..kernels.vsa import TileLayout, topk_for_sparsity

            self.tile_layout = TileLayout.for_grid(tuple(grid), device)
            self.topk = topk_for_sparsity(self.tile_layout.num_tiles, config.sparsity)


class WanDiT(nn.Module):
    """Wan2.1 T2V DiT: `forward(x, timestep, context) -> velocity` (see `forward`), with the
    self-attention backend of `self.attention` (dense unless set)."""

    def __init__(self, config: WanConfig, attention: Optional[AttentionConfig] = None):
        super().__init__()
        self.config = config
        self.attention = attention or AttentionConfig()
        self.activation_checkpointing = False
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.head = Head(config)

    # -- settings ---------------------------------------------------------------------------------
    def with_attention(self, attention: AttentionConfig) -> "WanDiT":
        """This model with another attention setting: a shallow copy whose blocks, weights and
        buffers are this model's own objects (no memory, no copy), so choosing a backend for one
        caller (a ComfyUI patched copy) never changes the model that others hold."""
        view = copy.copy(self)
        view.attention = attention
        return view

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.activation_checkpointing = bool(enabled)

    def compile_blocks(self, **compile_options) -> "WanDiT":
        """torch.compile each block (regional compilation: the blocks share one compiled graph, so the
        first call compiles once, not once per block). It fuses RoPE, norms and modulation around
        the attention op; docs/performance.md has the speed-up."""
        for block in self.blocks:
            block.compile(**compile_options)
        return self

    def has_trained_gates(self) -> bool:
        """True when any block's VSA gate is non-zero (a FastWan/VSA-trained checkpoint)."""
        return any(bool(b.to_gate_compress.weight.detach().abs().sum() + b.to_gate_compress.bias.detach().abs().sum())
                   for b in self.blocks if b.to_gate_compress.weight.device.type != "meta")

    def cast_for_inference(self, dtype: torch.dtype) -> "WanDiT":
        """Cast weights to `dtype`, keeping the timestep path and modulation tables in float32."""
        for name, param in self.named_parameters():
            target = torch.float32 if any(m in name for m in FP32_PARAMETER_MARKERS) else dtype
            param.data = param.data.to(target)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Predict the flow velocity v = noise - x0, with the self-attention of `self.attention`.

        Args:
            x: normalized latents [B, C_in, T, H, W]; T, H, W divisible by the patch size (1, 2, 2).
            timestep: [B] (or a scalar / [1], broadcast) float in 0..1000 (= 1000 * sigma).
            context: text embeddings [B, L, text_dim] (umT5: L = 512, zero-padded rows).
        Returns:
            velocity [B, C_out, T, H, W] in x's dtype.
        """
        batch, _, frames, height, width = x.shape
        pt, ph, pw = self.config.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent size {frames}x{height}x{width} is not divisible by the patch size "
                             f"{self.config.patch_size}")
        grid = (frames // pt, height // ph, width // pw)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(batch)

        tokens = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2)  # [B, L, dim]
        time_emb = self.time_embedding(timestep_embedding(timestep, self.config.freq_dim)
                                       .to(self.time_embedding[0].weight.dtype)).float()  # [B, dim]
        time_mod = self.time_projection(time_emb.to(self.time_projection[1].weight.dtype)).float()
        time_mod = time_mod.unflatten(1, (6, -1))  # [B, 6, dim]
        context = self.text_embedding(context.to(self.dtype))

        rope = rope_table(self.config.rope_split, grid, str(x.device))
        resolved = ResolvedAttention(self.attention, grid, x.device)
        layout = resolved.tile_layout
        if layout is not None:
            # Stay in VSA tile order for the whole forward: every op but self-attention is per
            # token, so one permutation here (and one back) replaces two per block.
            tokens = tokens[:, layout.perm]
            rope = rope[layout.perm]
        tokens = tokens.contiguous()

        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, time_mod, context, rope, resolved, use_reentrant=False)
            else:
                tokens = block(tokens, time_mod, context, rope, resolved)

        out = self.head(tokens, time_emb)  # [B, L, C_out * pt*ph*pw]
        if layout is not None:
            out = out[:, layout.inv_perm]
        return self._unpatchify(out, grid).to(x.dtype)

    def _unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        batch = tokens.shape[0]
        pt, ph, pw = self.config.patch_size
        t, h, w = grid
        out = tokens.reshape(batch, t, h, w, pt, ph, pw, -1)       # [B, t, h, w, pt, ph, pw, C]
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)                  # [B, C, t, pt, h, ph, w, pw]
        return out.reshape(batch, -1, t * pt, h * ph, w * pw)
