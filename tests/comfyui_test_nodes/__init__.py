"""Test-only ComfyUI nodes for tests/test_comfyui_integration.py; never shipped or loaded by users.

They stand in for the heavy core models (and hand latents back to the test) so a real ComfyUI can run our four nodes on a CPU in
seconds: random umT5-shaped CONDITIONING instead of CLIPTextEncode, and a cheap LATENT -> IMAGE
map instead of the Wan VAE.
"""
import torch


class FastWanTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 16, "min": 1, "max": 1024}),
            "channels": ("INT", {"default": 4096, "min": 1, "max": 8192}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "FastWan/testing"

    def make(self, seed, tokens, channels):
        generator = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, channels, generator=generator), {"pooled_output": None}]],)


class FastWanTestLatentToImage:
    """[B,16,T,H,W] latents -> IMAGE [B*F,8H,8W,3] with F = 4(T-1)+1, like the Wan VAE's sizes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "convert"
    CATEGORY = "FastWan/testing"

    def convert(self, samples):
        latents = samples["samples"].float()
        batch, _, frames, height, width = latents.shape
        rgb = torch.sigmoid(latents[:, :3])                                        # [B,3,T,H,W]
        rgb = torch.nn.functional.interpolate(rgb, size=(4 * (frames - 1) + 1, 8 * height, 8 * width))
        return (rgb.permute(0, 2, 3, 4, 1).reshape(-1, 8 * height, 8 * width, 3).contiguous(),)


class FastWanTestSaveLatent:
    """Writes LATENT samples to output/<name>.safetensors, for the test to compare with an oracle."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": "latent"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "FastWan/testing"

    def save(self, samples, name):
        import os

        import folder_paths
        from safetensors.torch import save_file

        save_file({"samples": samples["samples"].float().contiguous()},
                  os.path.join(folder_paths.get_output_directory(), f"{name}.safetensors"))
        return {}


NODE_CLASS_MAPPINGS = {
    "FastWanTestConditioning": FastWanTestConditioning,
    "FastWanTestLatentToImage": FastWanTestLatentToImage,
    "FastWanTestSaveLatent": FastWanTestSaveLatent,
}
