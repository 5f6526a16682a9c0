"""FastWan core: the Wan2.1 DiT with VSA, checkpoint loading, latents and samplers.

Pure PyTorch; never imports ComfyUI. Import as `fastwan.fastwan_core` headless.
"""
from .attention import AttentionConfig
from .checkpoint import dit_state_dict, index_checkpoint, load_dit, save_dit
from .config import WanConfig
from .errors import CheckpointError, FastWanError, InputError
from .latents import denormalize_latents, latent_shape, normalize_latents, validate_video_size
from .model import WanDiT
from .sampling import sample_dmd

__all__ = [
    "AttentionConfig", "CheckpointError", "FastWanError", "InputError", "WanConfig", "WanDiT",
    "denormalize_latents", "dit_state_dict", "index_checkpoint", "latent_shape", "load_dit",
    "normalize_latents", "sample_dmd", "save_dit", "validate_video_size",
]
