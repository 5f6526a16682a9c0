"""FastWan as a native ComfyUI MODEL, and the native pieces that sample it.

Inside ComfyUI, Load FastWan returns a `comfy.model_patcher.ModelPatcher` over a `comfy.model_base.WAN21`
(config `WAN21_T2V`: latent format Wan21, flow-matching sampling with shift 8) whose diffusion model is
our `WanDiT` with VSA. Its parameters keep the original Wan names under `diffusion_model.` (the names
ComfyUI's own Wan model has), so ComfyUI's LoRA key map, weight patches, model management and
model patches (TorchCompileModel, ModelSamplingSD3, ...) reach our weights.

The attention setting travels per call in `transformer_options[ATTENTION_OPTION]`, so VSA Attention
Patch changes a clone, never the shared weights. A Wan2.1 MODEL from ComfyUI's own loader runs
ComfyUI's Wan model; VSA reaches its self-attention through ComfyUI's attention override.

Outside ComfyUI (tests, headless use) the same nodes work on a `comfy_env.PlainModelPatcher`.
"""
from __future__ import annotations

import functools
import math

import torch

from ..fastwan_core.attention import AttentionConfig
from ..fastwan_core.errors import InputError
from ..fastwan_core.model import WanDiT
from ..fastwan_core.sampling import seeded_noise
from ..fastwan_core.state_dict_adapter import original_to_diffusers_key
from . import comfy_env
from .fp8_weights import make_castable

# transformer_options key holding the AttentionConfig a model samples with.
ATTENTION_OPTION = "fastwan_attention"
# Keys of the native-Wan VSA patch inside transformer_options.
_NATIVE_GRID = "fastwan_vsa_grid"
_NATIVE_SELF_ATTENTION_NEXT = "fastwan_vsa_self_attention_next"
_NATIVE_PATCH_KEY = "fastwan_vsa"


class ComfyWanDiT(WanDiT):
    """`WanDiT` called the way ComfyUI calls a diffusion model: `forward(x, timestep, context,
    transformer_options=..., **conds)`. Reads the attention setting from the transformer options
    and zero-pads the text context to the model's text length (Wan's own context layout)."""

    def forward(self, x, timestep, context, attention=None, transformer_options=None, **unused_conds):
        options = transformer_options or {}
        attention = attention or options.get(ATTENTION_OPTION)
        if context.shape[-1] != self.config.text_dim:
            raise InputError(f"FastWan: the text conditioning has {context.shape[-1]} channels but the model expects "
                             f"{self.config.text_dim} (umT5-XXL). Encode the prompt with CLIPTextEncode on CLIPLoader "
                             "umt5_xxl_fp8_e4m3fn_scaled.safetensors, type wan.")
        if context.shape[1] < self.config.text_len:
            context = torch.nn.functional.pad(context, (0, 0, 0, self.config.text_len - context.shape[1]))
        self._load_small_layers(x.device)
        # A patched clone's setting applies to this call only: the clones share this module.
        sampling_dit = self if attention is None else self.with_attention(attention)
        return WanDiT.forward(sampling_dit, x, timestep, context)

    def _load_small_layers(self, device: torch.device) -> None:
        """When ComfyUI loads the model partly (low VRAM), its Linear layers fetch their weights per
        call; the few small layers without that ability (norms, modulation tables, the patch
        embedding: a few MB) are moved to the compute device here."""
        for module in self.modules():
            if getattr(module, "comfy_cast_weights", None) is None:
                for name, param in module.named_parameters(recurse=False):
                    if param.device != device:
                        param.data = param.data.to(device)


def as_comfy_dit(dit: WanDiT) -> ComfyWanDiT:
    """The same module, callable with ComfyUI's diffusion-model signature (no copy: the class only
    adds that signature, it holds no state of its own)."""
    if not isinstance(dit, ComfyWanDiT):
        dit.__class__ = ComfyWanDiT
    return dit


class FastWanDiffusionModel(torch.nn.Module):
    """Outside ComfyUI: what the plain patcher holds, shaped like ComfyUI's model (`diffusion_model`,
    `get_dtype`, a writable `device`)."""

    def __init__(self, dit: WanDiT, source: str):
        super().__init__()
        self.diffusion_model = dit
        self.source = source
        self.device = dit.device

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype


@functools.lru_cache(maxsize=None)
def _native_model_class():
    import comfy.model_base

    class FastWanWAN21(comfy.model_base.WAN21):
        """ComfyUI's Wan2.1 T2V model with FastWan's DiT (VSA) as its diffusion model."""

        fastwan_source = ""

    return FastWanWAN21


def make_model(dit: WanDiT, source: str):
    """A MODEL around `dit`: a ModelPatcher over a native WAN21 inside ComfyUI, a PlainModelPatcher
    elsewhere."""
    dit = make_castable(as_comfy_dit(dit))
    load_dev, offload_dev = comfy_env.load_device(), comfy_env.offload_device()
    if not comfy_env.in_comfyui():
        return comfy_env.PlainModelPatcher(FastWanDiffusionModel(dit, source), load_dev, offload_dev)
    import comfy.model_patcher
    import comfy.supported_models

    install_lora_key_map()
    unet_config = {"image_model": "wan2.1", "model_type": "t2v", "dim": dit.config.dim,
                   "num_layers": dit.config.num_layers, "disable_unet_model_creation": True}
    model_config = comfy.supported_models.WAN21_T2V(unet_config)
    model_config.set_inference_dtype(dit.dtype, None)
    model = _native_model_class()(model_config, device=offload_dev)
    model.diffusion_model = dit
    model.fastwan_source = source
    return comfy.model_patcher.ModelPatcher(model, load_device=load_dev, offload_device=offload_dev)


def fastwan_dit(model):
    """The FastWan DiT inside a MODEL, or None for a MODEL that runs another network (e.g. ComfyUI's
    own Wan model from Load Diffusion Model)."""
    dit = getattr(getattr(model, "model", None), "diffusion_model", None)
    return dit if isinstance(dit, WanDiT) else None


def native_wan_model(model):
    """ComfyUI's own Wan2.1 text-to-video network inside a MODEL, or None."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    wan = comfy_env.optional_module("comfy.ldm.wan.model")
    if inner is None or wan is None or type(inner) is not wan.WanModel:
        return None
    return inner


def model_source(model) -> str:
    inner = getattr(model, "model", None)
    return getattr(inner, "fastwan_source", None) or getattr(inner, "source", None) or "this model"


def attention_of(model) -> AttentionConfig:
    """The attention a MODEL samples with (the DiT's own unless VSA Attention Patch set one)."""
    options = getattr(model, "model_options", {}).get("transformer_options", {})
    config = options.get(ATTENTION_OPTION)
    if config is not None:
        return config
    dit = fastwan_dit(model)
    return dit.attention if dit is not None else AttentionConfig()


def set_attention(model, config: AttentionConfig):
    """A clone of `model` that samples with `config` (the given model is not changed)."""
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    options = dict(options)
    options[ATTENTION_OPTION] = config
    patched.model_options["transformer_options"] = options
    if native_wan_model(patched) is not None:
        _patch_native_wan(patched, config)
    return patched


# ------------------------------------------------------------------------------------------------
# VSA on ComfyUI's own Wan model: ComfyUI's attention override, switched on for the first attention
# of each block (self-attention; cross-attention follows it), on the token grid the diffusion
# model wrapper records.


def _patch_native_wan(patcher, config: AttentionConfig) -> None:
    import comfy.patcher_extension

    patch_size = tuple(native_wan_model(patcher).patch_size)

    def record_grid(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        options[_NATIVE_GRID] = tuple(math.ceil(size / patch) for size, patch in zip(x.shape[2:], patch_size))
        return executor(x, *args, **kwargs)

    def first_attention_is_self(args, extra):
        options = args["transformer_options"]
        options[_NATIVE_SELF_ATTENTION_NEXT] = True
        try:
            return extra["original_block"](args)
        finally:
            options[_NATIVE_SELF_ATTENTION_NEXT] = False

    def override(attention_function, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if not options.get(_NATIVE_SELF_ATTENTION_NEXT):
            return attention_function(q, k, v, heads, *args, **kwargs)
        options[_NATIVE_SELF_ATTENTION_NEXT] = False
        grid = options.get(_NATIVE_GRID)
        if config.backend != "vsa" or grid is None or kwargs.get("skip_reshape") or q.shape[1] != math.prod(grid):
            return attention_function(q, k, v, heads, *args, **kwargs)
        from ..kernels.vsa import topk_for_sparsity, video_sparse_attention
        from ..kernels.vsa.layout import TileLayout

        batch, tokens, channels = q.shape
        split = [t.view(batch, tokens, heads, channels // heads).transpose(1, 2) for t in (q, k, v)]
        topk = topk_for_sparsity(TileLayout.for_grid(grid, q.device).num_tiles, config.sparsity)
        out = video_sparse_attention(*split, grid, topk, gate=None, implementation=config.implementation)
        return out.transpose(1, 2).reshape(batch, tokens, channels)

    for index in range(len(native_wan_model(patcher).blocks)):
        patcher.set_model_patch_replace(first_attention_is_self, "dit", "double_block", index)
    options = patcher.model_options["transformer_options"]  # set_model_patch_replace replaced the dict
    wrappers = options.setdefault("wrappers", {}).setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    wrappers[_NATIVE_PATCH_KEY] = [record_grid]  # one grid recorder however often the model is patched
    options["optimized_attention_override"] = override


# ------------------------------------------------------------------------------------------------
# Native sampling pieces


@torch.no_grad()
def sample_dmd_native(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI sampler function of FastWan's DMD sampler (for `comfy.samplers.KSAMPLER`).

    At each sigma: x0 = the model's denoised estimate; re-noise x0 to the next sigma with fresh noise
    (that is ComfyUI's LCM step). The fresh noise comes from the seed's CPU generator after the first
    draw, which is the initial noise ComfyUI drew from the same seed (RandomNoise, KSampler), so a run
    equals `fastwan_core.sampling.sample_dmd` with that seed.
    """
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed")
    generator = torch.Generator("cpu").manual_seed(int(seed or 0))
    seeded_noise(x.shape, generator, "cpu")  # the initial noise, already in x
    model_sampling = model.inner_model.inner_model.model_sampling
    ones = x.new_ones([x.shape[0]])
    for step in range(len(sigmas) - 1):
        denoised = model(x, sigmas[step] * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": step, "sigma": sigmas[step], "sigma_hat": sigmas[step], "denoised": denoised})
        x = denoised
        if sigmas[step + 1] > 0:
            noise = seeded_noise(x.shape, generator, x.device, x.dtype)
            x = model_sampling.noise_scaling(sigmas[step + 1], noise, x)
    return x


def dmd_sampler():
    """The DMD sampler as a ComfyUI SAMPLER."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_dmd_native)


# ------------------------------------------------------------------------------------------------
# LoRA keys


def diffusers_lora_keys(model, key_map: dict) -> dict:
    """Add the diffusers / PEFT names of a FastWan model's weights (`transformer.blocks.0.attn1.to_q`,
    `blocks.0.attn1.to_q`, `base_model.model.blocks...`) to ComfyUI's LoRA key map. ComfyUI already
    maps its own (`diffusion_model.blocks.0.self_attn.q`) and kohya (`lora_unet_blocks_0_self_attn_q`)
    names, which our parameters share with ComfyUI's Wan model."""
    for key in model.state_dict().keys():
        if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
            continue
        original = key[len("diffusion_model."):-len(".weight")]
        diffusers = original_to_diffusers_key(original + ".weight")
        if diffusers is None:
            continue
        diffusers = diffusers[:-len(".weight")]
        for prefix in ("", "transformer.", "diffusion_model.", "base_model.model.", "transformer.base_model.model."):
            key_map.setdefault(prefix + diffusers, key)
        key_map.setdefault("lora_transformer_" + diffusers.replace(".", "_"), key)
    return key_map


def install_lora_key_map() -> None:
    """Extend `comfy.lora.model_lora_keys_unet` (ComfyUI has no registration hook for key maps) so
    LoRA loaders also find diffusers / PEFT names on FastWan models; other models are unaffected."""
    import comfy.lora

    current = comfy.lora.model_lora_keys_unet
    if getattr(current, "fastwan_keys", False):
        return

    @functools.wraps(current)
    def model_lora_keys_unet(model, key_map=None):
        key_map = current(model, {} if key_map is None else key_map)
        if isinstance(getattr(model, "diffusion_model", None), WanDiT):
            diffusers_lora_keys(model, key_map)
        return key_map

    model_lora_keys_unet.fastwan_keys = True
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet
