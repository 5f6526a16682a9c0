"""ComfyUI nodes: thin adapters that turn widget values into `fastwan_core` calls.

Classic (V1) node classes, so they run unchanged in every ComfyUI release users have and can be
tested without ComfyUI. Node ids start with FastWan; all live in the FastWan category. Models travel
as ComfyUI's own MODEL type (see `native_model`).
"""
from .model_nodes import FastWanModelLoader, FastWanVSAPatch
from .sampler_node import FastWanDMDSampler, FastWanDMDSamplerSelect, FastWanDMDSigmas
from .text_encoder_node import FastWanTextEncoderLoader
from .vae_node import FastWanVAELoader
from .video_save_node import FastWanVideoSave

NODE_CLASS_MAPPINGS = {
    "FastWanModelLoader": FastWanModelLoader,
    "FastWanVSAPatch": FastWanVSAPatch,
    "FastWanDMDSampler": FastWanDMDSampler,
    "FastWanDMDSamplerSelect": FastWanDMDSamplerSelect,
    "FastWanDMDSigmas": FastWanDMDSigmas,
    "FastWanTextEncoderLoader": FastWanTextEncoderLoader,
    "FastWanVAELoader": FastWanVAELoader,
    "FastWanVideoSave": FastWanVideoSave,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FastWanModelLoader": "Load FastWan",
    "FastWanVSAPatch": "VSA Attention Patch",
    "FastWanDMDSampler": "3-Step DMD Sampler",
    "FastWanDMDSamplerSelect": "FastWan DMD Sampler (SAMPLER)",
    "FastWanDMDSigmas": "FastWan DMD Sigmas",
    "FastWanTextEncoderLoader": "Load FastWan Text Encoder",
    "FastWanVAELoader": "Load FastWan VAE",
    "FastWanVideoSave": "FastWan Video File Save",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
