"""Wan2.1 DiT hyper-parameters, with named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Facts of every Wan2.1 text-to-video DiT (DESIGN §5); not configurable in the published models.
WAN_HEAD_DIM = 128
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class WanConfig:
    """Sizes of a Wan2.1 text-to-video DiT. The defaults are the 1.3B model (`t2v_1_3b()`);
    `t2v_14b()` is the 14B one, `tiny()` a few-MB model for tests. `load_dit` infers a config from
    a checkpoint's tensor shapes."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    text_len: int = 512
    rope_max_seq_len: int = 1024

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"WanConfig: head dim {self.head_dim} must be even and >= 6 for 3D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head rotated by (t, h, w) positions: 44/42/42 for head dim 128."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    @classmethod
    def t2v_1_3b(cls) -> "WanConfig":
        return cls(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)

    @classmethod
    def t2v_14b(cls) -> "WanConfig":
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    @classmethod
    def tiny(cls) -> "WanConfig":
        """A few-MB model for tests and the offline demo. Head dim 128 like the real models, so its
        config is inferable from tensor shapes alone; a small text dim so tiny text encoders fit."""
        return cls(dim=256, ffn_dim=384, num_heads=2, num_layers=2, text_dim=64, freq_dim=32)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WanConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"WanConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The `config.json` of a diffusers `WanTransformer3DModel` with these sizes."""
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": self.rope_max_seq_len,
        }

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> "WanConfig":
        """Read a diffusers `config.json`. Raises ValueError for variants this DiT does not implement."""
        if d.get("image_dim") or d.get("added_kv_proj_dim"):
            raise ValueError("image-to-video Wan models (image_dim / added_kv_proj_dim) are not supported")
        if d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"qk_norm {d.get('qk_norm')!r} is not supported (Wan2.1 uses rms_norm_across_heads)")
        if not d.get("cross_attn_norm", True):
            raise ValueError("cross_attn_norm=False is not supported (Wan2.1 uses True)")
        heads = int(d.get("num_attention_heads", 12))
        return cls(
            dim=heads * int(d.get("attention_head_dim", WAN_HEAD_DIM)),
            ffn_dim=int(d.get("ffn_dim", 8960)),
            num_heads=heads,
            num_layers=int(d.get("num_layers", 30)),
            in_channels=int(d.get("in_channels", 16)),
            out_channels=int(d.get("out_channels") or d.get("in_channels", 16)),
            patch_size=tuple(d.get("patch_size", (1, 2, 2))),
            text_dim=int(d.get("text_dim", 4096)),
            freq_dim=int(d.get("freq_dim", 256)),
            eps=float(d.get("eps", 1e-6)),
            rope_max_seq_len=int(d.get("rope_max_seq_len", 1024)),
        )
