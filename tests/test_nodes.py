"""The ComfyUI nodes, without ComfyUI: package loading as ComfyUI does it, each node on tiny
checkpoints in temporary model folders (a stand-in `folder_paths` module), the sampler's LATENT
through diffusers' Wan VAE, Video Save's files read back."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fastwan.fastwan_core.attention import AttentionConfig
from fastwan.fastwan_core.checkpoint import save_dit
from fastwan.fastwan_core.config import WanConfig
from fastwan.fastwan_core.errors import InputError
from fastwan.fastwan_core.model import WanDiT
from fastwan.fastwan_core.video_io import read_video_info, read_video_metadata
from fastwan.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_env, model_nodes, native_model
from fastwan.nodes.native_model import attention_of, fastwan_dit

REPO = Path(__file__).resolve().parents[1]
EXPECTED_NODES = {
    "FastWanModelLoader": "Load FastWan",
    "FastWanVSAPatch": "VSA Attention Patch",
    "FastWanDMDSampler": "3-Step DMD Sampler",
    "FastWanDMDSamplerSelect": "FastWan DMD Sampler (SAMPLER)",
    "FastWanDMDSigmas": "FastWan DMD Sigmas",
    "FastWanTextEncoderLoader": "Load FastWan Text Encoder",
    "FastWanVAELoader": "Load FastWan VAE",
    "FastWanVideoSave": "FastWan Video File Save",
}
# Wan2.1 VAE latent statistics, copied from the reference release (DESIGN §5), as an oracle
# independent of fastwan_core.latents.
WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


# ------------------------------------------------------------------------------------------------
# A stand-in for ComfyUI's folder_paths module: model folders and an output folder in tmp_path.


def make_folder_paths(root: Path) -> types.ModuleType:
    module = types.ModuleType("folder_paths")
    models = root / "models"
    output = root / "output"
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

    def get_filename_list(folder_name):
        base = models / folder_name
        return sorted(str(p.relative_to(base)).replace(os.sep, "/") for p in base.rglob("*")
                      if p.is_file() and p.suffix in extensions)

    def get_full_path(folder_name, filename):
        path = models / folder_name / filename
        return str(path) if path.is_file() else None

    def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
        # Same contract as ComfyUI's: (folder, file name, next counter, subfolder, prefix).
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        folder = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:
            raise Exception("Saving image outside the output folder is not allowed.")
        os.makedirs(folder, exist_ok=True)
        counters = [int(name[len(filename) + 1:].split("_")[0]) for name in os.listdir(folder)
                    if name.startswith(filename + "_") and name[len(filename) + 1:].split("_")[0].isdigit()]
        return folder, filename, max(counters, default=0) + 1, subfolder, filename_prefix

    module.get_filename_list = get_filename_list
    module.get_full_path = get_full_path
    module.get_output_directory = lambda: str(output)
    module.get_save_image_path = get_save_image_path
    module.models_dir = str(models)
    return module


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    module = make_folder_paths(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", module)
    return module


def tiny_dit(seed: int, gates: bool = False) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(WanConfig.tiny())
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Default init leaves some weights zero (e.g. gates); give every weight signal so a
            # wrong or missing tensor shows up in the outputs.
            if "to_gate_compress" in name and not gates:
                param.zero_()
            else:
                param.copy_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture
def tiny_checkpoint(comfy_folders):
    model = tiny_dit(seed=int(time.time_ns() % 2**31))
    path = Path(comfy_folders.models_dir) / "diffusion_models" / "fastwan_tiny.safetensors"
    save_dit(model, path)
    return model, path


def loaded(name="fastwan_tiny.safetensors", dtype="fp32"):
    return NODE_CLASS_MAPPINGS["FastWanModelLoader"]().load(name, dtype)[0]


def vsa_patch(model, sparsity, backend="reference"):
    """VSA Attention Patch -> (patched model, the warning shown on the node or None)."""
    out = NODE_CLASS_MAPPINGS["FastWanVSAPatch"]().patch(model, sparsity, backend)
    if isinstance(out, dict):
        return out["result"][0], out["ui"]["text"][0]
    return out[0], None


def conditioning(batch=1, tokens=20, channels=None, seed=None):
    channels = channels or WanConfig.tiny().text_dim
    generator = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
    return [[torch.randn(batch, tokens, channels, generator=generator), {"pooled_output": None}]]


# ------------------------------------------------------------------------------------------------
# Loading the package the way ComfyUI does


def test_package_loads_as_comfyui_loads_custom_nodes(tmp_path):
    """ComfyUI imports custom_nodes/<folder>/__init__.py by file location under a module name
    taken from the path (here with a hyphen), with its own top-level `nodes` module already in
    sys.modules. Run in a fresh interpreter where `import fastwan` is blocked, so any absolute
    import inside the package fails."""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "ComfyUI-FastWan").symlink_to(REPO, target_is_directory=True)
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, json, sys, types

        class BlockFastwan(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "fastwan" or name.startswith("fastwan."):
                    raise ImportError("absolute import of " + name)
        sys.meta_path.insert(0, BlockFastwan())
        foreign_nodes = types.ModuleType("nodes")
        foreign_nodes.MARKER = "comfyui core nodes"
        sys.modules["nodes"] = foreign_nodes

        module_path = {str(custom_nodes / "ComfyUI-FastWan")!r}
        module_name = module_path.replace(".", "_x_")   # what ComfyUI's load_custom_node does
        spec = importlib.util.spec_from_file_location(module_name, module_path + "/__init__.py",
                                                      submodule_search_locations=[module_path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        assert sys.modules["nodes"] is foreign_nodes, "the package replaced ComfyUI's nodes module"
        comfy_modules = sorted(m for m in sys.modules if m == "folder_paths" or m.split(".")[0] == "comfy")
        print(json.dumps({{
            "classes": {{k: [v.__module__, v.CATEGORY, v.FUNCTION, list(v.RETURN_TYPES)]
                        for k, v in module.NODE_CLASS_MAPPINGS.items()}},
            "display": module.NODE_DISPLAY_NAME_MAPPINGS,
            "comfy_modules": comfy_modules,
        }}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["display"] == EXPECTED_NODES
    assert set(report["classes"]) == set(EXPECTED_NODES)
    for module_name, category, _, _ in report["classes"].values():
        assert module_name.startswith(str(custom_nodes / "ComfyUI-FastWan")), module_name
        assert category == "FastWan"
    assert report["classes"]["FastWanDMDSampler"][3] == ["LATENT"]
    assert report["comfy_modules"] == [], "importing the package must not import ComfyUI modules"


def test_node_classes_follow_the_v1_conventions():
    assert NODE_DISPLAY_NAME_MAPPINGS == EXPECTED_NODES
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("FastWan")
        assert cls.CATEGORY == "FastWan"
        assert callable(getattr(cls(), cls.FUNCTION))
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, definition in spec.get(section, {}).items():
                assert len(definition) == 2 and definition[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert NODE_CLASS_MAPPINGS["FastWanVideoSave"].OUTPUT_NODE is True
    assert NODE_CLASS_MAPPINGS["FastWanVideoSave"].INPUT_TYPES()["hidden"] == {
        "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    seed = NODE_CLASS_MAPPINGS["FastWanDMDSampler"].INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] is True and seed["max"] == 2**64 - 1


def test_loader_lists_nothing_without_comfyui(monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", None)  # import of folder_paths fails
    assert NODE_CLASS_MAPPINGS["FastWanModelLoader"].INPUT_TYPES()["required"]["model_name"][0] == []


# ------------------------------------------------------------------------------------------------
# Load FastWan


def test_loader_lists_safetensors_and_loads_the_weights(tiny_checkpoint, comfy_folders):
    model, path = tiny_checkpoint
    (path.parent / "notes.txt").write_text("not a model")
    (path.parent / "old.ckpt").write_bytes(b"pickle")
    names = NODE_CLASS_MAPPINGS["FastWanModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert names == ["fastwan_tiny.safetensors"]

    patcher = loaded()
    dit = fastwan_dit(patcher)
    assert isinstance(patcher, comfy_env.PlainModelPatcher)
    reference = model.state_dict()
    for name, tensor in dit.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


def test_loader_weight_dtype_and_comfy_layout(comfy_folders):
    model = tiny_dit(seed=3)
    path = Path(comfy_folders.models_dir) / "diffusion_models" / "wan_comfy_layout.safetensors"
    save_dit(model, path, layout="comfy")
    dit = fastwan_dit(loaded("wan_comfy_layout.safetensors", "bf16"))
    assert dit.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert dit.blocks[0].modulation.dtype == torch.float32  # modulation tables stay fp32
    torch.testing.assert_close(dit.blocks[1].ffn[2].weight.float(), model.blocks[1].ffn[2].weight.bfloat16().float(),
                               rtol=0, atol=0)


def test_loader_reads_a_file_once_while_it_is_in_use(tiny_checkpoint, monkeypatch):
    _, path = tiny_checkpoint
    reads = []
    real_load = model_nodes.load_dit
    monkeypatch.setattr(model_nodes, "load_dit", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    first = loaded()
    second = loaded()
    assert len(reads) == 1 and fastwan_dit(first) is fastwan_dit(second)
    # Another dtype is another model; a changed file is read again.
    loaded(dtype="bf16")
    assert len(reads) == 2
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = loaded()
    assert len(reads) == 3 and fastwan_dit(third) is not fastwan_dit(first)


def test_loader_missing_file_names_the_folder(comfy_folders):
    with pytest.raises(InputError, match="diffusion_models") as info:
        loaded("nope.safetensors")
    assert "nope.safetensors" in str(info.value) and "refresh" in str(info.value)


def test_loader_loads_a_sharded_checkpoint_from_any_shard(comfy_folders):
    model = tiny_dit(seed=5)
    folder = Path(comfy_folders.models_dir) / "diffusion_models" / "sharded"
    folder.mkdir()
    from safetensors.torch import save_file

    from fastwan.fastwan_core.checkpoint import dit_state_dict

    state = model.state_dict()
    weight_map = {}
    exported = dit_state_dict(model, layout="diffusers")
    keys = sorted(exported)
    for index, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2:]], start=1):
        shard = f"diffusion_pytorch_model-0000{index}-of-00002.safetensors"
        save_file({k: exported[k].contiguous() for k in part}, str(folder / shard))
        weight_map.update({k: shard for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(WanConfig.tiny().to_diffusers_config()))
    listed = NODE_CLASS_MAPPINGS["FastWanModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    shard_name = "sharded/diffusion_pytorch_model-00002-of-00002.safetensors"
    assert shard_name in listed
    dit = fastwan_dit(loaded(shard_name))
    for name, tensor in dit.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------
# VSA Attention Patch


def test_vsa_patch_returns_a_patched_copy(tiny_checkpoint, caplog):
    base = loaded()
    options_before = json.dumps(base.model_options, default=str)
    with caplog.at_level(logging.WARNING, logger="FastWan"):
        patched, warning = vsa_patch(base, 0.8, "reference")
    assert patched is not base and patched.model is base.model  # shared weights, separate options
    assert json.dumps(base.model_options, default=str) == options_before
    assert attention_of(base) == AttentionConfig()
    assert attention_of(patched) == AttentionConfig("vsa", 0.8, "reference")
    assert "no trained VSA gates" in caplog.text and "sparsity" in caplog.text
    assert "no trained VSA gates" in warning and "fastwan_tiny.safetensors" in warning  # shown on the node

    dense, warning = vsa_patch(patched, 0.0, "auto")
    assert warning is None
    assert attention_of(dense) == AttentionConfig("dense", 0.0, "auto")
    assert attention_of(patched) == AttentionConfig("vsa", 0.8, "reference")


def test_vsa_patch_is_quiet_for_a_model_with_trained_gates(comfy_folders, caplog):
    save_dit(tiny_dit(seed=7, gates=True), Path(comfy_folders.models_dir) / "diffusion_models" / "gated.safetensors")
    with caplog.at_level(logging.WARNING, logger="FastWan"):
        _, warning = vsa_patch(loaded("gated.safetensors"), 0.8, "auto")
    assert "gates" not in caplog.text and warning is None


def test_vsa_patch_refuses_a_core_model():
    with pytest.raises(InputError, match="Load FastWan"):
        NODE_CLASS_MAPPINGS["FastWanVSAPatch"]().patch(object(), 0.8, "auto")


# ------------------------------------------------------------------------------------------------
# 3-Step DMD Sampler


def oracle_dmd(dit, attention, context, shape, seed):
    """The FastWan sampler written out from DESIGN §5: sigmas of timesteps 1000/757/522 on the
    shift-8 grid, x0 = x - sigma*v, fresh noise between steps, CPU generator; then Wan's
    denormalization with the published statistics."""
    unshifted = np.linspace(1.0, 1.0 / 1000, 1000)
    grid = 8.0 * unshifted / (1 + 7.0 * unshifted) * 1000
    sigmas = [float(grid[np.argmin(np.abs(grid - t))]) / 1000 for t in (1000, 757, 522)]
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    for step, sigma in enumerate(sigmas):
        v = dit.with_attention(attention)(x, torch.full((shape[0],), sigma * 1000.0), context).float()
        x0 = x - sigma * v
        if step + 1 < len(sigmas):
            x = (1 - sigmas[step + 1]) * x0 + sigmas[step + 1] * torch.randn(shape, generator=generator)
    mean = torch.tensor(WAN_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN_STD).view(1, 16, 1, 1, 1)
    return x0 * std + mean


def test_sampler_matches_the_written_out_recipe(tiny_checkpoint):
    patched, _ = vsa_patch(loaded(), 0.5, "reference")
    positive = conditioning(batch=1, tokens=20)
    seed = int(time.time_ns() % 10**9)
    (latent,) = NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(
        patched, positive, width=64, height=48, length=9, batch_size=2, seed=seed)
    samples = latent["samples"]
    assert samples.shape == (2, 16, 3, 6, 8) and samples.dtype == torch.float32
    dit = fastwan_dit(patched)
    context = torch.zeros(2, 512, WanConfig.tiny().text_dim)
    context[:, :20] = positive[0][0]
    expected = oracle_dmd(dit, AttentionConfig("vsa", 0.5, "reference"), context, (2, 16, 3, 6, 8), seed)
    torch.testing.assert_close(samples, expected, rtol=1e-4, atol=1e-4)
    # Another seed, another video.
    (other,) = NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(
        patched, positive, width=64, height=48, length=9, batch_size=2, seed=seed + 1)
    assert not torch.allclose(other["samples"], samples)


def test_sampler_passes_attention_and_padded_context_to_the_model(tiny_checkpoint, monkeypatch):
    calls = []
    real_forward = WanDiT.forward

    def recording_forward(self, x, timestep, context):
        calls.append((self.attention, context.detach().clone(), timestep.detach().clone()))
        return real_forward(self, x, timestep, context)

    monkeypatch.setattr(WanDiT, "forward", recording_forward)
    patched, _ = vsa_patch(loaded(), 0.8, "reference")
    positive = conditioning(tokens=7)
    NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(patched, positive, width=32, height=32, length=5,
                                                      batch_size=1, seed=1)
    assert len(calls) == 3
    assert all(attention == AttentionConfig("vsa", 0.8, "reference") for attention, _, _ in calls)
    context = calls[0][1]
    assert context.shape == (1, 512, WanConfig.tiny().text_dim)
    torch.testing.assert_close(context[:, :7], positive[0][0])
    assert context[:, 7:].abs().max() == 0
    torch.testing.assert_close(torch.stack([t for _, _, t in calls]).flatten(),
                               torch.tensor([1000.0, 756.8, 521.7]), atol=0.1, rtol=0)

    calls.clear()  # an over-long prompt is kept whole, as ComfyUI's own Wan model does
    NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(patched, conditioning(tokens=600), width=32, height=32,
                                                      length=5, batch_size=1, seed=1)
    assert calls[0][1].shape[1] == 600


def test_sampler_takes_the_size_from_a_latent(tiny_checkpoint):
    empty = {"samples": torch.zeros(2, 16, 2, 4, 6)}  # 48x32 pixels, 5 frames, batch 2
    (latent,) = NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(
        loaded(), conditioning(), width=832, height=480, length=81, batch_size=1, seed=0, latent=empty)
    assert latent["samples"].shape == (2, 16, 2, 4, 6)
    with pytest.raises(InputError, match="video latent"):
        NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(
            loaded(), conditioning(), seed=0, latent={"samples": torch.zeros(1, 4, 8, 8)})


@pytest.mark.parametrize("size, message", [
    ((830, 480, 81), "816 or 832"),
    ((832, 470, 81), "464 or 480"),
    ((832, 480, 80), "77 or 81"),
])
def test_sampler_invalid_size_names_the_nearest_valid_values(tiny_checkpoint, size, message):
    width, height, length = size
    with pytest.raises(InputError, match=message) as info:
        NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(loaded(), conditioning(), width=width, height=height,
                                                          length=length, batch_size=1, seed=0)
    assert "3-Step DMD Sampler" in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(timesteps="1000,abc"), "comma-separated"),
    (dict(timesteps="1000,1200"), "outside"),
    (dict(timesteps="522,757,1000"), "decrease"),
    (dict(shift=0.0), "shift"),
])
def test_sampler_rejects_bad_advanced_inputs(tiny_checkpoint, kwargs, message):
    with pytest.raises(InputError, match=message):
        NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(loaded(), conditioning(), width=32, height=32,
                                                          length=5, batch_size=1, seed=0, **kwargs)


def test_sampler_rejects_conditioning_of_another_text_encoder(tiny_checkpoint):
    with pytest.raises(InputError, match="umT5") as info:
        NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(loaded(), conditioning(channels=768), width=32,
                                                          height=32, length=5, batch_size=1, seed=0)
    assert "type wan" in str(info.value)
    with pytest.raises(InputError, match="batch"):
        NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(loaded(), conditioning(batch=3), width=32,
                                                          height=32, length=5, batch_size=2, seed=0)


def test_sampler_latent_decodes_with_the_wan_vae_to_the_requested_size(tiny_checkpoint):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    (latent,) = NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(
        loaded(), conditioning(), width=48, height=32, length=9, batch_size=1, seed=3)
    with torch.no_grad():
        video = vae.decode(latent["samples"]).sample  # ComfyUI's VAEDecode also takes raw latents
    assert video.shape == (1, 3, 9, 32, 48)
    assert torch.isfinite(video).all()


# ------------------------------------------------------------------------------------------------
# The native pieces: DMD as a SAMPLER + SIGMAS for ComfyUI's own sampling, LoRA key names


class FlowModelSampling:
    """ComfyUI's flow-matching (CONST) noise scaling, written out: x = sigma*noise + (1-sigma)*x0."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image


class DenoiserLikeComfyUI:
    """What ComfyUI hands a sampler function: model(x, sigma) -> denoised x0 = x - sigma * v, with
    the model sampling at .inner_model.inner_model.model_sampling."""

    def __init__(self, dit, context, attention):
        self.dit, self.context, self.attention = dit, context, attention
        self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=FlowModelSampling()))

    def __call__(self, x, sigma, **extra_args):
        v = self.dit(x, sigma * 1000.0, self.context, attention=self.attention).float()
        return x - sigma.view(-1, 1, 1, 1, 1) * v


def test_dmd_sigmas_are_fastwans_student_sigmas():
    (sigmas,) = NODE_CLASS_MAPPINGS["FastWanDMDSigmas"]().get_sigmas("1000,757,522", 8.0)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.7568, 0.5217, 0.0]), atol=1e-4, rtol=0)  # DESIGN §5
    assert NODE_CLASS_MAPPINGS["FastWanDMDSigmas"].VALIDATE_INPUTS(timesteps="522,757").endswith(
        "must decrease from noise to clean (e.g. 1000,757,522)")


def test_dmd_sampler_function_equals_the_written_out_recipe(tiny_checkpoint):
    """The SAMPLER given to SamplerCustomAdvanced, fed the way ComfyUI feeds it (initial noise from
    the seed as RandomNoise draws it), gives the recipe's latents for that seed."""
    dit = fastwan_dit(loaded())
    attention = AttentionConfig("vsa", 0.5, "reference")
    context = torch.zeros(2, 512, WanConfig.tiny().text_dim)
    context[:, :9] = conditioning(tokens=9)[0][0]
    seed = int(time.time_ns() % 10**9)
    shape = (2, 16, 3, 6, 8)
    noise = torch.randn(shape, generator=torch.manual_seed(seed))  # comfy.sample.prepare_noise
    (sigmas,) = NODE_CLASS_MAPPINGS["FastWanDMDSigmas"]().get_sigmas("1000,757,522", 8.0)
    x0 = native_model.sample_dmd_native(DenoiserLikeComfyUI(dit, context, attention), noise * sigmas[0], sigmas,
                                        extra_args={"seed": seed})
    mean = torch.tensor(WAN_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN_STD).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(x0 * std + mean, oracle_dmd(dit, attention, context, shape, seed), rtol=1e-4, atol=1e-4)


def test_lora_key_map_names_our_weights_in_diffusers_and_peft_form():
    model = types.SimpleNamespace(state_dict=lambda: {f"diffusion_model.{k}": v
                                                      for k, v in tiny_dit(seed=1).state_dict().items()})
    key_map = native_model.diffusers_lora_keys(model, {})
    # Names written out from diffusers' WanTransformer3DModel (independent of our rename table).
    expected = {
        "transformer.blocks.0.attn1.to_q": "diffusion_model.blocks.0.self_attn.q.weight",
        "transformer.blocks.1.attn1.to_out.0": "diffusion_model.blocks.1.self_attn.o.weight",
        "transformer.blocks.0.attn2.to_k": "diffusion_model.blocks.0.cross_attn.k.weight",
        "blocks.1.ffn.net.0.proj": "diffusion_model.blocks.1.ffn.0.weight",
        "base_model.model.blocks.0.ffn.net.2": "diffusion_model.blocks.0.ffn.2.weight",
        "transformer.condition_embedder.time_proj": "diffusion_model.time_projection.1.weight",
        "transformer.proj_out": "diffusion_model.head.head.weight",
        "lora_transformer_blocks_0_attn1_to_v": "diffusion_model.blocks.0.self_attn.v.weight",
    }
    assert {name: key_map.get(name) for name in expected} == expected


# ------------------------------------------------------------------------------------------------
# fp8 files


def save_fp8_file(model: WanDiT, path: Path, scaled: bool) -> dict[str, torch.Tensor]:
    """`model` as ComfyUI's fp8 repackaging stores it (comfy layout; every 2-D block weight float8
    e4m3fn, scaled files with a per-tensor `scale_weight` and the `scaled_fp8` marker). Returns the
    weights the file stands for (original names), the oracle of what a loader must compute with."""
    from safetensors.torch import save_file

    prefix = "model.diffusion_model."
    state, dequantized = {}, {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.float()
        if name.startswith("blocks.") and name.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max() / 448.0 if scaled else torch.tensor(1.0)
            stored = (tensor / scale).to(torch.float8_e4m3fn)
            state[prefix + name] = stored
            if scaled:
                state[prefix + name[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
            dequantized[name] = stored.float() * scale
        else:
            state[prefix + name] = tensor.to(torch.bfloat16)
            dequantized[name] = tensor.to(torch.bfloat16).float()
    if scaled:
        state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(state, str(path))
    return dequantized


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_fp8_files_stay_fp8_and_compute_like_their_dequantized_weights(comfy_folders, scaled):
    model = tiny_dit(seed=21, gates=True)
    name = f"tiny_fp8_e4m3fn{'_scaled' if scaled else ''}.safetensors"
    dequantized = save_fp8_file(model, Path(comfy_folders.models_dir) / "diffusion_models" / name, scaled)
    assert NODE_CLASS_MAPPINGS["FastWanModelLoader"].VALIDATE_INPUTS(model_name=name) is True
    dit = fastwan_dit(loaded(name, "fp32"))
    assert dit.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn  # in memory
    assert dit.blocks[1].ffn[2].weight.dtype == torch.float8_e4m3fn
    assert dit.patch_embedding.weight.dtype == torch.float32 and dit.dtype == torch.float32

    reference = WanDiT(WanConfig.tiny())
    reference.load_state_dict(dequantized)
    x = torch.randn(1, 16, 2, 4, 6)
    t = torch.tensor([757.0])
    context = torch.randn(1, 512, WanConfig.tiny().text_dim)
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, context), reference(x, t, context), rtol=1e-5, atol=1e-5)
        # Against the model before quantization: the error fp8 storage costs on this tiny model.
        original = model(x, t, context)
        error = (dit(x, t, context) - original).abs().max() / original.abs().max()
    assert error < 0.05, float(error)


def test_fp8_weights_take_a_patch_as_comfyuis_model_patcher_applies_it(comfy_folders):
    """ModelPatcher reads a weight through convert_weight and writes it back with set_weight."""
    model = tiny_dit(seed=22)
    dequantized = save_fp8_file(model, Path(comfy_folders.models_dir) / "diffusion_models" / "s.safetensors", True)
    layer = fastwan_dit(loaded("s.safetensors", "fp32")).blocks[0].self_attn.q
    full = layer.convert_weight(layer.weight.float(), inplace=True)
    torch.testing.assert_close(full, dequantized["blocks.0.self_attn.q.weight"], rtol=0, atol=0)
    delta = -0.1 * full + torch.rand_like(full) * full.abs().max() * 0.05  # stays inside fp8's range
    layer.set_weight(full + delta, inplace_update=True, seed=0)
    assert layer.weight.dtype == torch.float8_e4m3fn
    # fp8 e4m3 keeps 3 mantissa bits: a relative rounding error of at most 2^-4 per weight.
    torch.testing.assert_close(layer.full_weight(torch.float32), full + delta,
                               rtol=2**-4, atol=float(layer.scale_weight) * 2**-9)


def test_linear_layers_follow_comfyuis_weight_casting_protocol(comfy_folders):
    """What ComfyUI does to a layer it leaves in system memory (low VRAM): turn on comfy_cast_weights
    and hang its LoRA patch into weight_function; the layer then computes with the patched weight."""
    from fastwan.nodes.fp8_weights import CastableLinear

    model = tiny_dit(seed=23)
    save_fp8_file(model, Path(comfy_folders.models_dir) / "diffusion_models" / "s.safetensors", True)
    for name in ("fastwan_tiny.safetensors", "s.safetensors"):
        if name == "fastwan_tiny.safetensors":
            save_dit(model, Path(comfy_folders.models_dir) / "diffusion_models" / name)
        layer = fastwan_dit(loaded(name, "fp32")).blocks[1].cross_attn.k
        assert isinstance(layer, CastableLinear) and layer.comfy_cast_weights is False
        x = torch.randn(3, layer.in_features)
        full = layer.dequantize(layer.weight, torch.float32)
        torch.testing.assert_close(layer(x), x @ full.T + layer.bias, rtol=1e-5, atol=1e-5)
        layer.comfy_cast_weights = True
        layer.weight_function = [lambda stored: stored.flip(0)]  # any patch of the stored weight
        layer.bias_function = [lambda bias: bias * 2]
        expected = x @ layer.dequantize(layer.weight.flip(0), torch.float32).T + 2 * layer.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def fp8_layer(weight: torch.Tensor, bias: torch.Tensor, scaled: bool):
    """An Fp8Linear holding `weight` [out, in] as fp8 files store it: e4m3fn, scaled files divided
    by a per-tensor scale (amax / 448) kept in `scale_weight`; `bias` in the compute dtype."""
    from fastwan.nodes.fp8_weights import Fp8Linear, make_castable

    layer = make_castable(torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device))
    scale = weight.float().abs().max() / 448.0 if scaled else None
    layer.__class__ = Fp8Linear
    stored = (weight.float() / scale if scaled else weight.float()).to(torch.float8_e4m3fn)
    layer.weight = torch.nn.Parameter(stored, requires_grad=False)
    layer.register_buffer("scale_weight", scale)
    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Records each torch._scaled_mm call (its first operand's shape): proof of the fp8 path."""
    calls = []
    original = torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    return calls


def cpu_scaled_mm_works() -> bool:
    one, zeros = torch.ones((), dtype=torch.float32), torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(zeros, zeros.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def test_fp8_matmul_switch_is_comfyuis_fast_flag_on_a_card_it_calls_fp8_capable(monkeypatch):
    import enum

    assert comfy_env.fp8_matmul_switch(torch.device("cuda")) is False  # outside ComfyUI
    feature = enum.Enum("PerformanceFeature", {"Fp8MatrixMultiplication": "fp8_matrix_mult", "CublasOps": "cublas_ops"})
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.PerformanceFeature = feature
    cli_args.args = types.SimpleNamespace(fast=set())
    management = types.ModuleType("comfy.model_management")
    capable = {"value": True}
    management.supports_fp8_compute = lambda device=None: capable["value"]
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    monkeypatch.setitem(sys.modules, "comfy.model_management", management)
    device = torch.device("cuda", 0)
    assert comfy_env.fp8_matmul_switch(device) is False  # no --fast
    cli_args.args.fast = {feature.CublasOps}
    assert comfy_env.fp8_matmul_switch(device) is False
    cli_args.args.fast = {feature.Fp8MatrixMultiplication}
    assert comfy_env.fp8_matmul_switch(device) is True
    cli_args.args.fast = set(feature)  # a bare --fast turns on every feature
    assert comfy_env.fp8_matmul_switch(device) is True
    capable["value"] = False  # e.g. an RTX 30xx
    assert comfy_env.fp8_matmul_switch(device) is False


def test_fp8_matmul_is_chosen_once_at_load_where_comfyui_would(comfy_folders, monkeypatch):
    from fastwan.nodes.fp8_weights import Fp8Linear, use_fp8_matmul

    save_fp8_file(tiny_dit(seed=24, gates=True), Path(comfy_folders.models_dir) / "diffusion_models" / "f.safetensors",
                  scaled=True)
    # As on an sm_89 card with ComfyUI's --fast fp8_matrix_mult (no GPU needed: only the decision runs).
    capability = {"value": (8, 9)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(comfy_env, "load_device", lambda: torch.device("cuda", 0))
    switches = []
    monkeypatch.setattr(comfy_env, "fp8_matmul_switch", lambda device: switches.append(device) or True)
    dit = fastwan_dit(loaded("f.safetensors", "bf16"))
    assert switches == [torch.device("cuda", 0)]
    layers = [module for module in dit.modules() if isinstance(module, Fp8Linear)]
    assert len(layers) == 2 * 10 and all(layer.fp8_matmul for layer in layers)  # q k v o, twice; ffn 0, 2
    assert not isinstance(dit.blocks[0].to_gate_compress, Fp8Linear)  # the gates stay up-cast
    # The same file computing in fp32: up-cast, as ComfyUI multiplies in fp8 for bf16/fp16 only.
    assert not any(m.fp8_matmul for m in fastwan_dit(loaded("f.safetensors", "fp32")).modules()
                   if isinstance(m, Fp8Linear))

    cuda = torch.device("cuda", 0)
    assert use_fp8_matmul(dit, True, cuda, torch.float16) == len(layers)
    assert use_fp8_matmul(dit, False, cuda, torch.bfloat16) == 0 and not any(layer.fp8_matmul for layer in layers)
    assert use_fp8_matmul(dit, True, "cpu", torch.bfloat16) == 0
    assert use_fp8_matmul(dit, True, cuda, torch.float32) == 0
    capability["value"] = (8, 6)  # Ampere: no fp8 tensor cores
    assert use_fp8_matmul(dit, True, cuda, torch.bfloat16) == 0
    capability["value"] = (9, 0)
    assert use_fp8_matmul(dit, True, cuda, torch.bfloat16) == len(layers)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm cards use other fp8 formats
    assert use_fp8_matmul(dit, True, cuda, torch.bfloat16) == 0
    monkeypatch.setattr(torch.version, "hip", None)

    # Only e4m3 weights whose both dimensions are multiples of 16 (torch._scaled_mm's alignment).
    bias = torch.zeros(48, dtype=torch.bfloat16)
    aligned, unaligned_in = fp8_layer(torch.randn(48, 32), bias, False), fp8_layer(torch.randn(48, 40), bias, False)
    unaligned_out = fp8_layer(torch.randn(40, 32), torch.zeros(40, dtype=torch.bfloat16), True)
    e5m2 = fp8_layer(torch.randn(48, 32), bias, False)
    e5m2.weight = torch.nn.Parameter(e5m2.weight.float().to(torch.float8_e5m2), requires_grad=False)
    layers = torch.nn.ModuleList([aligned, unaligned_in, unaligned_out, e5m2])
    assert use_fp8_matmul(layers, True, cuda, torch.bfloat16) == 1
    assert [layer.fp8_matmul for layer in layers] == [True, False, False, False]


@pytest.mark.skipif(not cpu_scaled_mm_works(), reason="this PyTorch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_fp8_layers_multiply_in_fp8_only_for_inputs_scaled_mm_takes(scaled, scaled_mm_calls):
    """The fp8 path on the CPU's torch._scaled_mm, against the closed form of ComfyUI's input
    quantization: x clamped to +-448, rounded to e4m3, times the dequantized weight, plus bias."""
    torch.manual_seed(31)
    weight, bias = torch.randn(48, 64) * 0.05, torch.randn(48).to(torch.bfloat16)
    layer = fp8_layer(weight, bias, scaled)
    layer.fp8_matmul = True  # what use_fp8_matmul sets on an sm_89+ card
    full = layer.full_weight(torch.float32)

    def expected(x):
        rounded = x.float().clamp(-448, 448).to(torch.float8_e4m3fn).float()
        return rounded @ full.T + bias.float()

    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    x[0, 0, :4] = torch.tensor([1000.0, -600.0, 0.003, 1e-4])  # beyond e4m3's range: count as +-448
    with torch.no_grad():
        out = layer(x)
        assert scaled_mm_calls == [(10, 64)] and out.dtype == torch.bfloat16 and out.shape == (2, 5, 48)
        torch.testing.assert_close(out.float(), expected(x), rtol=2**-7, atol=2**-7 * float(expected(x).abs().max()))
        # The up-cast result differs by the input rounding: the check above can tell the paths apart.
        assert relative_rms(torch.nn.functional.linear(x.float(), full, bias.float()), expected(x)) > 0.01
        assert torch.isfinite(out).all()

        rows = torch.randn(7, 64).to(torch.float16)  # 2-D, fp16: bias follows the input dtype
        torch.testing.assert_close(layer(rows).float(), expected(rows), rtol=2**-9, atol=2**-9 * 8)
        assert len(scaled_mm_calls) == 2

        # Fallbacks to the up-cast path: no _scaled_mm call, the unrounded input times the weight.
        def upcast(x, weight):
            return (x.float() @ weight.T + bias.float()).to(x.dtype)

        for x in (torch.randn(3, 64), torch.randn(1, 2, 3, 64).to(torch.bfloat16)):  # fp32; 4-D
            torch.testing.assert_close(layer(x), upcast(x, full), rtol=2**-7, atol=2**-7)
        layer.weight_function = [lambda stored: stored.flip(0)]  # a LoRA patch (ComfyUI low-VRAM)
        x = torch.randn(3, 64).to(torch.bfloat16)
        torch.testing.assert_close(layer(x), upcast(x, full.flip(0)), rtol=2**-7, atol=2**-7)
        layer.weight_function = []
        layer.fp8_matmul = False
        torch.testing.assert_close(layer(x), upcast(x, full), rtol=2**-7, atol=2**-7)
    assert len(scaled_mm_calls) == 2


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs an NVIDIA card with fp8 tensor cores (sm_89+)")
def test_fp8_matmul_on_gpu_matches_the_upcast_path_and_the_original_weights(scaled, dtype, scaled_mm_calls):
    from fastwan.nodes.fp8_weights import use_fp8_matmul

    torch.manual_seed(41)
    for out_features, in_features in ((1536, 1536), (8960, 1536), (1536, 8960)):  # Wan 1.3B's shapes
        original = (torch.randn(out_features, in_features, device="cuda") * 0.02).to(torch.bfloat16)
        bias = (torch.randn(out_features, device="cuda") * 0.02).to(dtype)
        layer = fp8_layer(original, bias, scaled)
        assert use_fp8_matmul(layer, True, torch.device("cuda"), dtype) == 1
        x = torch.randn(2, 77, in_features, device="cuda", dtype=dtype)
        calls = len(scaled_mm_calls)
        with torch.no_grad():
            fast = layer(x)
            assert len(scaled_mm_calls) == calls + 1 and fast.dtype == dtype
            # A layer ComfyUI leaves in system memory (low VRAM) streams its fp8 weight per call. It is a
            # copy of the same stored bytes: quantizing again on the CPU may round a weight differently.
            streamed = copy.deepcopy(layer).cpu()
            assert use_fp8_matmul(streamed, True, torch.device("cuda"), dtype) == 1
            streamed.comfy_cast_weights = True
            torch.testing.assert_close(streamed(x), fast, rtol=0, atol=0)
            assert len(scaled_mm_calls) == calls + 2
            layer.fp8_matmul = False
            upcast = layer(x)
            reference = torch.nn.functional.linear(x, original.to(dtype), bias)
        vs_upcast, vs_original = relative_rms(fast, upcast), relative_rms(fast, reference)
        print(f"fp8 matmul {'scaled' if scaled else 'unscaled'} {str(dtype)[6:]} {out_features}x{in_features}: "
              f"relative RMS vs up-cast {vs_upcast:.4f}, vs original weights {vs_original:.4f} "
              f"(up-cast vs original {relative_rms(upcast, reference):.4f})")
        # e4m3 rounding of the input (3 mantissa bits) costs ~2.7 % RMS; the weight rounding adds
        # ~2.6 % (scaled) or ~3.3 % (unscaled, small weights near e4m3's subnormals).
        assert 0.01 < vs_upcast < 0.035
        assert vs_original < 0.055


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
@pytest.mark.gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs an NVIDIA card with fp8 tensor cores (sm_89+)")
def test_fp8_file_on_gpu_with_fp8_matmuls_matches_the_upcast_model(comfy_folders, monkeypatch, scaled,
                                                                    scaled_mm_calls):
    """A tiny Wan DiT from an fp8 file, loaded as ComfyUI with --fast fp8_matrix_mult would load it."""
    from fastwan.nodes.fp8_weights import Fp8Linear, use_fp8_matmul

    model = tiny_dit(seed=25)
    name = f"gpu_fp8_e4m3fn{'_scaled' if scaled else ''}.safetensors"
    save_fp8_file(model, Path(comfy_folders.models_dir) / "diffusion_models" / name, scaled)
    monkeypatch.setattr(comfy_env, "fp8_matmul_switch", lambda device: True)
    dit = fastwan_dit(loaded(name, "bf16")).cuda()
    layers = [module for module in dit.modules() if isinstance(module, Fp8Linear)]
    assert len(layers) == 20 and all(layer.fp8_matmul for layer in layers)
    torch.manual_seed(5)
    x = torch.randn(1, 16, 4, 16, 16, device="cuda")  # 256 tokens
    t = torch.tensor([757.0], device="cuda")
    context = torch.randn(1, 512, WanConfig.tiny().text_dim, device="cuda")
    with torch.no_grad():
        fast = dit(x, t, context)
        assert len(scaled_mm_calls) == len(layers)  # every block Linear multiplied in fp8, once
        use_fp8_matmul(dit, False, torch.device("cuda"), torch.bfloat16)
        upcast = dit(x, t, context)
        assert len(scaled_mm_calls) == len(layers)
        reference = model.cast_for_inference(torch.bfloat16).cuda()(x, t, context)
    vs_upcast, vs_original = relative_rms(fast, upcast), relative_rms(fast, reference)
    print(f"tiny WanDiT {'scaled' if scaled else 'unscaled'} fp8 file, bf16: relative RMS fp8 matmul vs up-cast "
          f"{vs_upcast:.4f}, vs original weights {vs_original:.4f} "
          f"(up-cast vs original {relative_rms(upcast, reference):.4f})")
    # Measured on CPU's _scaled_mm: ~1 % vs up-cast, ~1.3 % vs the original weights.
    assert 0 < vs_upcast < 0.03
    assert vs_original < 0.04


# ------------------------------------------------------------------------------------------------
# Errors before the run: each node's VALIDATE_INPUTS (what ComfyUI calls at /prompt) refuses what
# the node would refuse, with the same message.


def runtime_message(call) -> str:
    with pytest.raises(InputError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("kwargs", [
    dict(width=830), dict(height=470), dict(length=80), dict(width=4112), dict(timesteps="1000,abc"),
    dict(timesteps="1000,1200"), dict(timesteps="522,757,1000"),
])
def test_sampler_refuses_at_prompt_time_what_it_refuses_at_run_time(tiny_checkpoint, kwargs):
    values = dict(width=64, height=48, length=9, timesteps="1000,757,522")
    values.update(kwargs)
    sampler = NODE_CLASS_MAPPINGS["FastWanDMDSampler"]
    assert sampler.VALIDATE_INPUTS(**values) == runtime_message(
        lambda: sampler().sample(loaded(), conditioning(), batch_size=1, seed=0, shift=8.0, **values))
    assert sampler.VALIDATE_INPUTS(width=64, height=48, length=9, timesteps="1000,757,522") is True
    assert sampler.VALIDATE_INPUTS() is True  # every value linked from another node: nothing to check yet
    # ComfyUI skips its own min/max check for inputs the hook names, so the hook checks them.
    assert sampler.VALIDATE_INPUTS(width=4112, height=48, length=9) == (
        "3-Step DMD Sampler: width 4112 is outside 16..4096")


def test_loader_refuses_files_that_are_not_a_wan_dit_at_prompt_time(tiny_checkpoint, comfy_folders):
    from safetensors.torch import save_file

    folder = Path(comfy_folders.models_dir) / "diffusion_models"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(folder / "a_vae.safetensors"))
    (folder / "old.ckpt").write_bytes(b"pickle")
    loader = NODE_CLASS_MAPPINGS["FastWanModelLoader"]
    assert loader.VALIDATE_INPUTS(model_name="fastwan_tiny.safetensors", weight_dtype="fp32") is True
    message = loader.VALIDATE_INPUTS(model_name="a_vae.safetensors", weight_dtype="auto")
    assert "unknown key layout" in message and "vae/" in message
    assert message == runtime_message(lambda: loaded("a_vae.safetensors"))
    assert "not a .safetensors file" in loader.VALIDATE_INPUTS(model_name="old.ckpt")
    assert "not in models/diffusion_models" in loader.VALIDATE_INPUTS(model_name="gone.safetensors")
    assert "weight_dtype" in loader.VALIDATE_INPUTS(weight_dtype="fp8")


def test_vsa_patch_refuses_sparsity_at_prompt_time(tiny_checkpoint):
    patch = NODE_CLASS_MAPPINGS["FastWanVSAPatch"]
    assert patch.VALIDATE_INPUTS(sparsity=0.8) is True
    assert patch.VALIDATE_INPUTS(sparsity=0.99) == runtime_message(lambda: vsa_patch(loaded(), 0.99))

# ------------------------------------------------------------------------------------------------
# Load FastWan Text Encoder


def build_text_encoder_folder(folder: Path, d_model: int, seed: int = 0) -> Path:
    """A diffusers-style umT5 pair, text_encoder/ (config.json + model.safetensors) and tokenizer/,
    with random weights of width `d_model` (the layout of FastWan2.1-T2V-1.3B-Diffusers')."""
    from transformers import UMT5EncoderModel

    from fastwan.fastwan_core.demo_models import build_tiny_tokenizer, tiny_umt5_config

    tokenizer = build_tiny_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(tiny_umt5_config(vocab_size=len(tokenizer), d_model=d_model))
    encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def text_encoder_source(tmp_path_factory):
    return build_text_encoder_folder(tmp_path_factory.mktemp("umt5") / "tiny_umt5", WanConfig.tiny().text_dim)


@pytest.fixture
def text_encoder_folder(comfy_folders, text_encoder_source):
    import shutil

    target = Path(comfy_folders.models_dir) / "text_encoders" / "wan" / "tiny_umt5"
    shutil.copytree(text_encoder_source, target)
    return target


def transformers_embeddings(folder: Path, prompt: str) -> torch.Tensor:
    """The oracle: transformers' UMT5EncoderModel run directly on the prompt's tokens alone (no
    padding, no mask), placed in Wan's [1, 512, d] context with zero rows after them."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder")).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, -1] == tokenizer.eos_token_id
    with torch.no_grad():
        hidden = encoder(input_ids=ids).last_hidden_state
    context = torch.zeros(1, 512, hidden.shape[-1])
    context[:, :ids.shape[1]] = hidden
    return context


def test_text_encoder_loader_lists_folders_and_clip_text_encode_gives_umt5_embeddings(text_encoder_folder):
    loader = NODE_CLASS_MAPPINGS["FastWanTextEncoderLoader"]
    assert loader.INPUT_TYPES()["required"]["folder"][0] == ["wan/tiny_umt5"]
    assert loader.VALIDATE_INPUTS(folder="wan/tiny_umt5") is True
    (clip,) = loader().load("wan/tiny_umt5")
    prompt = "a red circle moves left on a black background"
    # What core CLIPTextEncode does with a CLIP.
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    (embeddings, extras), = conditioning
    assert extras == {"pooled_output": None} and embeddings.dtype == torch.float32
    expected = transformers_embeddings(text_encoder_folder, prompt)
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a blue square moves up"))[0][0]
    assert (other - embeddings).abs().max() > 1e-3  # the prompt matters


def test_text_encoder_conditioning_drives_the_sampler(text_encoder_folder, tiny_checkpoint):
    (clip,) = NODE_CLASS_MAPPINGS["FastWanTextEncoderLoader"]().load("wan/tiny_umt5")
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a green triangle moves right"))
    (latent,) = NODE_CLASS_MAPPINGS["FastWanDMDSampler"]().sample(
        loaded(), positive, width=32, height=32, length=5, batch_size=1, seed=3)
    assert latent["samples"].shape == (1, 16, 2, 4, 4) and torch.isfinite(latent["samples"]).all()


def test_text_encoder_loader_refuses_bad_folders_at_prompt_time(text_encoder_folder, comfy_folders):
    import shutil

    loader = NODE_CLASS_MAPPINGS["FastWanTextEncoderLoader"]
    root = Path(comfy_folders.models_dir) / "text_encoders"
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(text_encoder_folder / "text_encoder", no_tokenizer / "text_encoder")
    no_config = root / "no_config"
    shutil.copytree(text_encoder_folder, no_config)
    (no_config / "text_encoder" / "config.json").unlink()
    pickled = root / "pickled"
    shutil.copytree(text_encoder_folder, pickled)
    (pickled / "text_encoder" / "model.safetensors").rename(pickled / "text_encoder" / "pytorch_model.bin")
    truncated = root / "truncated"
    shutil.copytree(text_encoder_folder, truncated)
    weights = truncated / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    assert loader.INPUT_TYPES()["required"]["folder"][0] == ["no_config", "no_tokenizer", "truncated",
                                                             "wan/tiny_umt5"]
    for folder, words in [("no_tokenizer", "no tokenizer/ folder"), ("no_config", "no config.json"),
                          ("truncated", str(weights)), ("pickled", "not a folder with text_encoder/*.safetensors"),
                          ("gone", "press R in the UI")]:
        message = loader.VALIDATE_INPUTS(folder=folder)
        assert message.startswith("Load FastWan Text Encoder: ") and words in message, message
        assert message == runtime_message(lambda: loader().load(folder))


def test_text_encoder_loader_lists_nothing_without_comfyui(monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", None)
    assert NODE_CLASS_MAPPINGS["FastWanTextEncoderLoader"].INPUT_TYPES()["required"]["folder"][0] == []


# ------------------------------------------------------------------------------------------------
# Load FastWan VAE (building ComfyUI's VAE needs ComfyUI: tests/test_comfyui_integration.py decodes
# with it against diffusers; here the key map, the listing and the checks)

TINY_WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                    temperal_downsample=[False, True, True])


def build_vae_folder(folder: Path, seed: int = 0, **config) -> Path:
    """A diffusers AutoencoderKLWan folder (config.json + diffusion_pytorch_model.safetensors) with
    random weights, written by diffusers' save_pretrained. Every tensor is perturbed (the norms'
    gammas start at 1), so a tensor loaded into the wrong place shows in the outputs."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**{**TINY_WAN_VAE, **config})
    with torch.no_grad():
        for param in vae.parameters():
            param.mul_(1 + 0.3 * torch.randn_like(param))
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("sizes", [dict(), dict(base_dim=8, z_dim=4), dict(temperal_downsample=[True, True, False])])
def test_vae_key_map_is_the_inverse_of_diffusers_own_original_wan_map(sizes):
    """Oracle: diffusers' single-file converter, original Wan (= ComfyUI) layout -> diffusers. It
    knows only Wan2.1's block structure (dim_mult [1, 2, 4, 4], 2 residual blocks a level), so only
    widths vary here; the real-ComfyUI test decodes other structures against diffusers."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from fastwan.fastwan_core.vae import comfy_wan_vae_state_dict

    config = {"base_dim": 4, "z_dim": 16, **sizes, "num_res_blocks": 2}
    state = AutoencoderKLWan(**config).state_dict()
    converted = comfy_wan_vae_state_dict(state)
    assert len(converted) == len(state)
    back = convert_wan_vae_to_diffusers(converted)
    assert set(back) == set(state)
    assert all(back[key] is state[key] for key in state)


def test_vae_key_map_refuses_a_wan22_vae():
    from diffusers import AutoencoderKLWan

    from fastwan.fastwan_core.errors import CheckpointError
    from fastwan.fastwan_core.vae import comfy_wan_vae_state_dict

    wan22 = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=4, is_residual=True, dim_mult=[1, 2, 2, 2],
                             num_res_blocks=1, temperal_downsample=[False, True, True])
    with pytest.raises(CheckpointError, match="tensors that no Wan2.1 VAE has .*upsampler.resample"):
        comfy_wan_vae_state_dict(wan22.state_dict())


@pytest.mark.parametrize("change, words", [
    (dict(_class_name="AutoencoderKL"), "not an AutoencoderKLWan"),
    (dict(is_residual=True), "Wan2.2 VAE"),
    (dict(patch_size=2), "Wan2.2 VAE"),
    (dict(decoder_base_dim=16), "decoder_base_dim 16"),
    (dict(in_channels=12), "RGB"),
    (dict(dim_mult=[1, 2, 4]), "strides"),
    (dict(temperal_downsample=[False, False, True]), "strides"),
    (dict(attn_scales=[0.5]), "attn_scales"),
])
def test_vae_config_outside_wan21s_architecture_is_refused(change, words):
    from fastwan.fastwan_core.vae import comfy_wan_vae_config

    config = {"_class_name": "AutoencoderKLWan", **TINY_WAN_VAE}
    assert comfy_wan_vae_config(config) == {"dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                                            "attn_scales": [], "temperal_downsample": [False, True, True],
                                            "dropout": 0.0}
    with pytest.raises(InputError, match=words):
        comfy_wan_vae_config({**config, **change})


@pytest.fixture(scope="module")
def vae_source(tmp_path_factory):
    return build_vae_folder(tmp_path_factory.mktemp("wan_vae") / "tiny_vae")


def test_vae_loader_lists_wan_vae_folders_and_refuses_bad_ones_at_prompt_time(comfy_folders, vae_source):
    import shutil

    loader = NODE_CLASS_MAPPINGS["FastWanVAELoader"]
    root = Path(comfy_folders.models_dir) / "vae"
    (root / "wan_2.1_vae.safetensors").write_bytes(b"a single-file VAE: VAELoader's, not listed here")
    shutil.copytree(vae_source, root / "wan" / "tiny_vae")
    sd_vae = root / "sd_vae"  # a diffusers folder of another VAE class
    shutil.copytree(vae_source, sd_vae)
    (sd_vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    no_config = root / "no_config"
    shutil.copytree(vae_source, no_config)
    (no_config / "config.json").unlink()
    truncated = root / "truncated"
    shutil.copytree(vae_source, truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    pickled = root / "pickled"
    shutil.copytree(vae_source, pickled)
    (pickled / "diffusion_pytorch_model.safetensors").rename(pickled / "diffusion_pytorch_model.bin")
    wan22 = root / "wan22"
    shutil.copytree(vae_source, wan22)
    config = json.loads((wan22 / "config.json").read_text())
    (wan22 / "config.json").write_text(json.dumps({**config, "is_residual": True}))

    assert loader.INPUT_TYPES()["required"]["folder"][0] == ["no_config", "truncated", "wan/tiny_vae", "wan22"]
    assert loader.VALIDATE_INPUTS(folder="wan/tiny_vae") is True
    for folder, words in [("no_config", "no Wan VAE here"), ("truncated", str(weights)),
                          ("wan22", "Wan2.2 VAE"), ("pickled", "not a folder with diffusion_pytorch_model"),
                          ("sd_vae", "press R in the UI"), ("gone", "press R in the UI")]:
        message = loader.VALIDATE_INPUTS(folder=folder)
        assert message.startswith("Load FastWan VAE: ") and words in message, message
        assert message == runtime_message(lambda: loader().load(folder))
    # A good folder passes every check and only then needs ComfyUI to build its VAE.
    assert "run it inside ComfyUI" in runtime_message(lambda: loader().load("wan/tiny_vae"))


def test_vae_loader_lists_nothing_without_comfyui(monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", None)
    assert NODE_CLASS_MAPPINGS["FastWanVAELoader"].INPUT_TYPES()["required"]["folder"][0] == []


# ------------------------------------------------------------------------------------------------
# Video Save


def frames(count=9, height=48, width=64):
    generator = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    # Smooth content so lossy codecs keep it recognisable.
    base = torch.rand(count, height // 8, width // 8, 3, generator=generator)
    return torch.nn.functional.interpolate(base.permute(0, 3, 1, 2), size=(height, width),
                                           mode="bilinear").permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("format", ["mp4", "webm", "webp", "gif"])
def test_video_save_writes_a_video_with_the_workflow(comfy_folders, format):
    images = frames()
    prompt = {"8": {"class_type": "FastWanVideoSave", "inputs": {"fps": 16.0}}}
    workflow = {"nodes": [{"id": 8, "type": "FastWanVideoSave"}], "links": [], "version": 0.4}
    result = NODE_CLASS_MAPPINGS["FastWanVideoSave"]().save(
        images, fps=16.0, format=format, quality=90, filename_prefix="clips/FastWan",
        prompt=prompt, extra_pnginfo={"workflow": workflow})
    saved = result["ui"]["images"]
    assert result["ui"]["animated"] == (True,)
    assert saved == [{"filename": f"FastWan_00001_.{format}", "subfolder": "clips", "type": "output"}]
    path = Path(comfy_folders.get_output_directory()) / "clips" / saved[0]["filename"]
    count, height, width, fps = read_video_info(path)
    assert (count, height, width) == (9, 48, 64)
    assert fps == pytest.approx(16.0, abs=0.2)
    metadata = read_video_metadata(path)
    assert json.loads(metadata["prompt"]) == prompt
    assert json.loads(metadata["workflow"]) == workflow
    # The next save gets the next counter; nothing else is left in the folder.
    again = NODE_CLASS_MAPPINGS["FastWanVideoSave"]().save(images, 16.0, format, 90, "clips/FastWan")
    assert again["ui"]["images"][0]["filename"] == f"FastWan_00002_.{format}"
    assert sorted(p.name for p in path.parent.iterdir()) == [f"FastWan_00001_.{format}", f"FastWan_00002_.{format}"]


def test_video_save_frames_match_the_input(comfy_folders):
    from fastwan.fastwan_core.video_io import read_video_frames

    images = frames(count=5)
    result = NODE_CLASS_MAPPINGS["FastWanVideoSave"]().save(images, 16.0, "webp", 100, "FastWan")
    path = Path(comfy_folders.get_output_directory()) / result["ui"]["images"][0]["filename"]
    decoded = read_video_frames(path)
    expected = (images.numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)  # quality 100 webp is lossless


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/escape", "clips/../../escape", "..", "a/.."])
def test_video_save_refuses_prefixes_outside_the_output_folder(comfy_folders, prefix):
    output = Path(comfy_folders.get_output_directory())
    with pytest.raises(InputError, match="filename_prefix") as info:
        NODE_CLASS_MAPPINGS["FastWanVideoSave"]().save(frames(count=1), 16.0, "gif", 80, prefix)
    assert str(output) in str(info.value) and "relative name" in str(info.value)
    assert list(output.iterdir()) == []
    assert not (output.parent / "escape.gif").exists()


def test_video_save_expands_date_placeholders_and_refuses_unknown_ones(comfy_folders):
    save = NODE_CLASS_MAPPINGS["FastWanVideoSave"]
    before = time.strftime("%Y-%m-%d")
    result = save().save(frames(count=1), 16.0, "gif", 80, "clips/%date:yyyy-MM-dd%/FastWan_%date:hhmm%")
    after = time.strftime("%Y-%m-%d")
    (saved,) = result["ui"]["images"]
    assert saved["subfolder"] in (f"clips/{before}", f"clips/{after}")
    assert re.fullmatch(r"FastWan_\d{4}_00001_\.gif", saved["filename"])
    assert save.VALIDATE_INPUTS(filename_prefix="clips/%date:yyyy%/%year%-%width%x%height%") is True
    message = save.VALIDATE_INPUTS(filename_prefix="%KSampler.seed%/clip")
    assert "%KSampler.seed%" in message and "%date:yyyy-MM-dd%" in message
    assert message == runtime_message(lambda: save().save(frames(count=1), 16.0, "gif", 80, "%KSampler.seed%/clip"))


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/escape", "", "%date:yyyy%/../../x"])
def test_video_save_refuses_bad_prefixes_at_prompt_time(comfy_folders, prefix):
    save = NODE_CLASS_MAPPINGS["FastWanVideoSave"]
    message = save.VALIDATE_INPUTS(filename_prefix=prefix)
    assert message == runtime_message(lambda: save().save(frames(count=1), 16.0, "mp4", 80, prefix))


def test_video_save_refuses_mp4_without_ffmpeg_at_prompt_time(comfy_folders, monkeypatch):
    """Without imageio-ffmpeg, an mp4/webm Video Save is refused when the prompt is queued (the run
    would fail only after sampling and decoding); webp and gif need no ffmpeg."""
    save = NODE_CLASS_MAPPINGS["FastWanVideoSave"]
    assert save.VALIDATE_INPUTS(filename_prefix="FastWan", format="mp4") is True  # installed here
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` now fails
    for format in ("mp4", "webm"):
        message = save.VALIDATE_INPUTS(filename_prefix="FastWan", format=format)
        assert "imageio-ffmpeg" in message and "webp/gif" in message
        assert message == runtime_message(lambda: save().save(frames(count=1), 16.0, format, 80, "FastWan"))
    assert list(Path(comfy_folders.get_output_directory()).iterdir()) == []
    assert save.VALIDATE_INPUTS(filename_prefix="FastWan", format="webp") is True
    assert save.VALIDATE_INPUTS(format="gif") is True
    assert save.VALIDATE_INPUTS() is True  # both linked from other nodes: nothing to check yet


def test_video_save_checks_the_format_list_that_comfyui_skips_for_hooked_inputs(comfy_folders):
    save = NODE_CLASS_MAPPINGS["FastWanVideoSave"]
    message = save.VALIDATE_INPUTS(filename_prefix="FastWan", format="avi")
    assert "'avi'" in message and "mp4, webm, webp, gif" in message
    assert message == runtime_message(lambda: save().save(frames(count=1), 16.0, "avi", 80, "FastWan"))
    # the prefix is still checked when a format is given
    assert "filename_prefix" in save.VALIDATE_INPUTS(filename_prefix="../x", format="webp")


def test_video_save_writes_files_readable_by_everyone_like_comfyuis_savers(comfy_folders):
    """ComfyUI's savers create files with the default mode (0644 under the usual umask 022).
    Passes once fastwan_core.video_io creates the file with the umask's mode."""
    result = NODE_CLASS_MAPPINGS["FastWanVideoSave"]().save(frames(count=1), 16.0, "gif", 80, "FastWan")
    path = Path(comfy_folders.get_output_directory()) / result["ui"]["images"][0]["filename"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_video_save_honours_disable_metadata(comfy_folders, monkeypatch):
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=True)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    result = NODE_CLASS_MAPPINGS["FastWanVideoSave"]().save(frames(count=2), 16.0, "webp", 80, "FastWan",
                                                            prompt={"1": {}}, extra_pnginfo={"workflow": {}})
    path = Path(comfy_folders.get_output_directory()) / result["ui"]["images"][0]["filename"]
    assert read_video_metadata(path) == {}


def test_video_save_rejects_non_image_input(comfy_folders):
    with pytest.raises(InputError, match="VAEDecode"):
        NODE_CLASS_MAPPINGS["FastWanVideoSave"]().save(torch.zeros(1, 16, 2, 4, 4), 16.0, "mp4", 80, "FastWan")


def test_root_init_imports_as_a_lone_file_for_pytest():
    # pytest imports the clone's root __init__.py without a package when the folder name is not an
    # identifier (e.g. a clone in `tmp.x1`); that must not fail the whole test session.
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("__init__", root / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}
