"""Against a real ComfyUI (opt-in): FASTWAN_COMFYUI_DIR=<ComfyUI checkout>, and optionally
FASTWAN_COMFYUI_PYTHON=<python of ComfyUI's environment> (default: this interpreter) and
FASTWAN_COMFYUI_PORT (default 8199).

The server runs `main.py --cpu` on 127.0.0.1 with --base-directory pointing at a temporary folder
whose custom_nodes/ holds this repository (as ComfyUI-FastWan) and the test-only nodes in
tests/comfyui_test_nodes, and whose models/ holds a tiny FastWan checkpoint plus placeholder files
with the shipped workflow's file names. The ComfyUI checkout itself is not modified.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastwan.fastwan_core.attention import AttentionConfig
from fastwan.fastwan_core.checkpoint import load_dit, save_dit
from fastwan.fastwan_core.config import WanConfig
from fastwan.fastwan_core.latents import denormalize_latents
from fastwan.fastwan_core.model import WanDiT
from fastwan.fastwan_core.sampling import sample_dmd
from fastwan.fastwan_core.video_io import read_video_info, read_video_metadata

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("FASTWAN_COMFYUI_DIR")
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
                       reason="set FASTWAN_COMFYUI_DIR to a ComfyUI checkout to run the real-ComfyUI tests"),
]
HOST = "127.0.0.1"
PORT = int(os.environ.get("FASTWAN_COMFYUI_PORT", "8199"))
BASE_URL = f"http://{HOST}:{PORT}"
WORKFLOW_FILES = {
    "diffusion_models": "fastwan2.1_t2v_1.3B_bf16.safetensors",
    "text_encoders": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}


RANDOM_VAE = "random_wan_2.1_vae.safetensors"
TINY = "fastwan_tiny.safetensors"
# ComfyUI's own Wan loader assumes umT5's 4096 text channels and a 256-wide time embedding.
NATIVE_CONFIG = WanConfig(dim=256, ffn_dim=384, num_heads=2, num_layers=2, text_dim=4096, freq_dim=256)
NATIVE_TINY = "wan_native_tiny.safetensors"
LORA_RANK = 4
FP8_TINY = "fastwan_tiny_fp8_e4m3fn_scaled.safetensors"
TEXT_ENCODER = "tiny_umt5"  # a folder with text_encoder/ and tokenizer/ in models/text_encoders
FOLDER_VAE = "wan/tiny_vae"  # a diffusers AutoencoderKLWan folder (base width 8) in models/vae
WORLD = REPO / "models" / "tiny_world"  # the trained tiny world, once it ships
# Latent previews as a user who wants the tiny decoder runs them; 8 px keeps a 64x48 clip's preview
# at its latent size (ComfyUI resizes every preview to fit this).
PREVIEW_SIZE = 8


def random_dit(config: WanConfig, seed: int) -> WanDiT:
    """Every weight random (gates included), so a wrong or missing tensor shows in the outputs."""
    torch.manual_seed(seed)
    model = WanDiT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
    return model.eval()


def lora_factors(model: WanDiT, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random rank-4 (down, up) factors for every self-attention q and FFN output layer."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for index in range(len(model.blocks)):
        for name in (f"blocks.{index}.self_attn.q", f"blocks.{index}.ffn.2"):
            out_features, in_features = model.get_submodule(name).weight.shape
            factors[name] = (torch.randn(LORA_RANK, in_features, generator=generator) * 0.2,
                             torch.randn(out_features, LORA_RANK, generator=generator) * 0.2)
    return factors


def kohya_lora(factors, alpha: float) -> dict:
    """ComfyUI/kohya-style keys: lora_unet_blocks_0_self_attn_q.lora_down.weight, .alpha."""
    state = {}
    for name, (down, up) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(alpha)})
    return state


def peft_lora(factors) -> dict:
    """diffusers / PEFT keys (no alpha: scale 1): transformer.blocks.0.attn1.to_q.lora_A.weight."""
    diffusers_names = {"self_attn.q": "attn1.to_q", "ffn.2": "ffn.net.2"}
    state = {}
    for name, (down, up) in factors.items():
        block, rest = name.rsplit(".", 2)[0], ".".join(name.split(".")[2:])
        key = f"transformer.{block}.{diffusers_names[rest]}"
        state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    return state


def merged_by_hand(model: WanDiT, factors, scale: float) -> WanDiT:
    """W + scale * up @ down on a copy: the oracle of a LoRA applied at `scale`."""
    import copy

    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, (down, up) in factors.items():
            merged.get_submodule(name).weight += scale * (up @ down)
    return merged


def make_random_wan_vae(python: str, path: Path) -> None:
    """A Wan2.1 VAE file with random weights in ComfyUI's key layout, built with ComfyUI's own
    WanVAE class (ComfyUI builds the real VAE's fixed architecture from such a file)."""
    code = f"""
import sys
sys.argv = ["make_vae", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.ldm.wan.vae as wan_vae
from safetensors.torch import save_file
torch.manual_seed(0)
vae = wan_vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
state = {{k: (torch.randn(v.shape) * 0.05).to(torch.float16) if v.is_floating_point() else v.contiguous()
         for k, v in vae.state_dict().items()}}
save_file(state, {str(path)!r})
"""
    subprocess.run([python, "-c", code], cwd=COMFYUI_DIR, check=True, capture_output=True, timeout=300)


def request(path: str, payload=None, timeout=30):
    """GET (or POST JSON) on the local ComfyUI; returns (status, decoded JSON or bytes)."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(BASE_URL + path, data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui-base")
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "ComfyUI-FastWan").symlink_to(REPO, target_is_directory=True)
    (custom_nodes / "fastwan_test_nodes").symlink_to(REPO / "tests" / "comfyui_test_nodes", target_is_directory=True)
    for folder, name in WORKFLOW_FILES.items():
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / name).write_bytes(b"placeholder: validation only checks the name")
    diffusion_models = base / "models" / "diffusion_models"
    tiny = random_dit(WanConfig.tiny(), seed=11)
    save_dit(tiny, diffusion_models / TINY)
    save_dit(tiny, diffusion_models / WORKFLOW_FILES["diffusion_models"])  # Load FastWan validates the file
    save_dit(random_dit(NATIVE_CONFIG, seed=12), diffusion_models / NATIVE_TINY, layout="comfy")
    from test_nodes import save_fp8_file

    fp8_weights = save_fp8_file(tiny, diffusion_models / FP8_TINY, scaled=True)
    (base / "models" / "loras").mkdir()
    factors = lora_factors(tiny, seed=13)
    save_file(kohya_lora(factors, alpha=2.0), str(base / "models" / "loras" / "kohya.safetensors"))
    save_file(peft_lora(factors), str(base / "models" / "loras" / "peft.safetensors"))
    from test_nodes import build_text_encoder_folder

    build_text_encoder_folder(base / "models" / "text_encoders" / TEXT_ENCODER, WanConfig.tiny().text_dim)
    from test_nodes import build_vae_folder

    build_vae_folder(base / "models" / "vae" / FOLDER_VAE, seed=14)
    (base / "output").mkdir()
    (base / "input").mkdir()
    python = os.environ.get("FASTWAN_COMFYUI_PYTHON", sys.executable)
    make_random_wan_vae(python, base / "models" / "vae" / RANDOM_VAE)

    with socket.socket() as probe:  # a server already there would answer in place of ours
        if probe.connect_ex((HOST, PORT)) == 0:
            pytest.fail(f"port {PORT} on {HOST} is in use; stop that server or set FASTWAN_COMFYUI_PORT")
    log_path = base / "comfyui.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", HOST, "--port", str(PORT), "--base-directory", str(base),
         "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--preview-method", "taesd",
         "--preview-size", str(PREVIEW_SIZE)],
        cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                status, _ = request("/system_stats", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"ComfyUI did not start within 300 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield {"base": base, "log": log_path, "tiny": tiny, "lora_factors": factors, "fp8_weights": fp8_weights,
               "python": python}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def queue(prompt: dict):
    client_id = uuid.uuid4().hex
    return request("/prompt", {"prompt": prompt, "client_id": client_id})


def wait_for(prompt_id: str, timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, history = request(f"/history/{prompt_id}")
        if status == 200 and prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish within {timeout} s")


def test_object_info_lists_our_nodes_with_their_inputs(comfyui):
    status, info = request("/object_info")
    assert status == 200
    expected = {
        "FastWanModelLoader": ("Load FastWan", ["model_name", "weight_dtype"], ["MODEL"]),
        "FastWanVSAPatch": ("VSA Attention Patch", ["model", "sparsity", "backend"], ["MODEL"]),
        "FastWanDMDSampler": ("3-Step DMD Sampler", ["model", "positive", "width", "height", "length",
                                                     "batch_size", "seed", "timesteps", "shift"], ["LATENT"]),
        "FastWanDMDSamplerSelect": ("FastWan DMD Sampler (SAMPLER)", [], ["SAMPLER"]),
        "FastWanDMDSigmas": ("FastWan DMD Sigmas", ["timesteps", "shift"], ["SIGMAS"]),
        "FastWanVideoSave": ("FastWan Video File Save", ["images", "fps", "format", "quality", "filename_prefix"],
                             []),
        "FastWanTextEncoderLoader": ("Load FastWan Text Encoder", ["folder"], ["CLIP"]),
        "FastWanVAELoader": ("Load FastWan VAE", ["folder"], ["VAE"]),
    }
    for node_id, (display, required, outputs) in expected.items():
        node = info[node_id]
        assert node["display_name"] == display and node["category"] == "FastWan"
        assert node["input_order"]["required"] == required
        assert node["output"] == outputs
        assert node["python_module"].startswith("custom_nodes.ComfyUI-FastWan")
    assert info["FastWanDMDSampler"]["input_order"]["optional"] == ["latent"]
    assert info["FastWanVideoSave"]["output_node"] is True
    models = info["FastWanModelLoader"]["input"]["required"]["model_name"][0]
    assert "fastwan_tiny.safetensors" in models and WORKFLOW_FILES["diffusion_models"] in models
    assert info["FastWanTextEncoderLoader"]["input"]["required"]["folder"][0] == [TEXT_ENCODER]
    assert FOLDER_VAE in info["FastWanVAELoader"]["input"]["required"]["folder"][0]
    # The core nodes the workflow uses, with the widget order tests/test_workflows.py assumes.
    from test_workflows import CORE_WIDGETS

    for node_id, widgets in CORE_WIDGETS.items():
        if node_id in ("Note", "MarkdownNote"):
            continue
        order = info[node_id]["input_order"]
        names = order["required"] + order.get("optional", [])
        assert [n for n in names if n in widgets] == widgets, node_id


def test_the_workflow_is_in_the_template_browser(comfyui):
    status, templates = request("/workflow_templates")
    assert status == 200 and templates.get("ComfyUI-FastWan") == ["fastwan_t2v_480p"]
    status, body = request("/api/workflow_templates/ComfyUI-FastWan/fastwan_t2v_480p.json")
    assert status == 200 and body == json.loads((REPO / "workflows" / "fastwan_t2v_480p.json").read_text())


def tiny_video_prompt(format: str) -> dict:
    """Our four nodes on the tiny checkpoint, with test-only nodes for text and decoding."""
    return {
        "1": {"class_type": "FastWanModelLoader", "inputs": {"model_name": "fastwan_tiny.safetensors",
                                                              "weight_dtype": "fp32"}},
        "2": {"class_type": "FastWanVSAPatch", "inputs": {"model": ["1", 0], "sparsity": 0.8, "backend": "reference"}},
        "3": {"class_type": "FastWanTestConditioning", "inputs": {"seed": 1, "tokens": 12,
                                                                   "channels": WanConfig.tiny().text_dim}},
        "4": {"class_type": "FastWanDMDSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "width": 64, "height": 48, "length": 9, "batch_size": 1,
            "seed": 123, "timesteps": "1000,757,522", "shift": 8.0}},
        "5": {"class_type": "FastWanTestLatentToImage", "inputs": {"samples": ["4", 0]}},
        "6": {"class_type": "FastWanVideoSave", "inputs": {"images": ["5", 0], "fps": 16.0, "format": format,
                                                            "quality": 80, "filename_prefix": "fastwan_it/run"}},
    }


def make_tiny_video(comfyui, format: str, workflow: dict) -> tuple[Path, dict]:
    """Queue `tiny_video_prompt` as the UI does (the UI graph rides along as extra_pnginfo) and
    return the saved file and its history entry."""
    prompt = tiny_video_prompt(format)
    status, answer = request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex,
                                         "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    assert status == 200 and answer["node_errors"] == {}, answer
    entry = wait_for(answer["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    (saved,) = entry["outputs"]["6"]["images"]
    assert saved["subfolder"] == "fastwan_it" and saved["type"] == "output" and saved["filename"].endswith(format)
    return comfyui["base"] / "output" / "fastwan_it" / saved["filename"], entry


def test_our_four_nodes_generate_a_video(comfyui):
    workflow = {"nodes": [], "links": [], "version": 0.4, "extra": {"marker": uuid.uuid4().hex}}
    path, entry = make_tiny_video(comfyui, "mp4", workflow)
    assert entry["outputs"]["6"]["animated"] == [True]
    assert read_video_info(path)[:3] == (9, 48, 64)
    metadata = read_video_metadata(path)
    assert json.loads(metadata["prompt"])["4"]["class_type"] == "FastWanDMDSampler"
    assert json.loads(metadata["workflow"]) == workflow
    log = comfyui["log"].read_text()
    assert "Requested to load FastWanWAN21" in log  # went through ComfyUI's model management
    assert "latent preview" not in log  # previews (--preview-method taesd) ran without errors


def test_core_vae_decode_takes_our_latent(comfyui):
    """Sampler LATENT -> core VAEDecode with a (random-weight) Wan2.1 VAE -> Video Save."""
    prompt = tiny_video_prompt("webp")
    prompt["7"] = {"class_type": "VAELoader", "inputs": {"vae_name": RANDOM_VAE}}
    prompt["5"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["7", 0]}}
    status, answer = queue(prompt)
    assert status == 200 and answer["node_errors"] == {}, answer
    entry = wait_for(answer["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    (saved,) = entry["outputs"]["6"]["images"]
    count, height, width, fps = read_video_info(comfyui["base"] / "output" / saved["subfolder"] / saved["filename"])
    assert (count, height, width) == (9, 48, 64) and fps == pytest.approx(16.0, abs=0.2)


def test_a_text_encoder_folder_drives_fastwan_through_clip_text_encode(comfyui):
    """Load FastWan Text Encoder (a diffusers-style umT5 folder) -> core CLIPTextEncode -> our sampler ->
    core VAEDecode -> Video Save. The sampled latent equals our DMD sampler on transformers'
    UMT5EncoderModel's embeddings of the prompt, run directly; the video has the clip's size.
    (The tiny world's judge cannot check content yet: the tree has no trained world models.)"""
    from test_nodes import transformers_embeddings

    text = "a red circle moves left on a black background"
    prompt = tiny_video_prompt("mp4")
    prompt["3"] = {"class_type": "FastWanTextEncoderLoader", "inputs": {"folder": TEXT_ENCODER}}
    prompt["8"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["3", 0]}}
    prompt["4"]["inputs"].update(positive=["8", 0], seed=77)
    prompt["7"] = {"class_type": "VAELoader", "inputs": {"vae_name": RANDOM_VAE}}
    prompt["5"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["7", 0]}}
    prompt["9"] = {"class_type": "FastWanTestSaveLatent", "inputs": {"samples": ["4", 0], "name": "text_encoded"}}
    entry = run_ok(prompt)
    context = transformers_embeddings(comfyui["base"] / "models" / "text_encoders" / TEXT_ENCODER, text)
    expected = dmd_oracle(comfyui["tiny"], AttentionConfig("vsa", 0.8, "reference"), context, (1, 16, 3, 6, 8), 77)
    torch.testing.assert_close(latent_of(comfyui, "text_encoded"), expected, rtol=1e-4, atol=1e-4)
    (saved,) = entry["outputs"]["6"]["images"]
    path = comfyui["base"] / "output" / saved["subfolder"] / saved["filename"]
    count, height, width, fps = read_video_info(path)
    assert (count, height, width) == (9, 48, 64) and fps == pytest.approx(16.0, abs=0.2)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_bad_text_encoder_folder_is_refused_by_prompt(comfyui):
    incomplete = comfyui["base"] / "models" / "text_encoders" / "no_tokenizer" / "text_encoder"
    incomplete.mkdir(parents=True)
    (incomplete / "config.json").write_text("{}")
    (incomplete / "model.safetensors").write_bytes(b"placeholder")
    for folder, message in [("no_tokenizer", "no tokenizer/ folder"), ("gone", "press R in the UI")]:
        prompt = tiny_video_prompt("gif")
        prompt["3"] = {"class_type": "FastWanTextEncoderLoader", "inputs": {"folder": folder}}
        prompt["8"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["3", 0]}}
        prompt["4"]["inputs"]["positive"] = ["8", 0]
        status, answer = queue(prompt)
        assert status == 400, answer
        details = answer["node_errors"]["3"]["errors"][0]["details"]
        assert "Load FastWan Text Encoder: " in details and message in details, details
    shutil.rmtree(incomplete.parent)


def diffusers_vae(folder: Path):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def saved_frames(comfyui, entry: dict, node: str) -> torch.Tensor:
    """The PNGs core SaveImage wrote for `node`, as float [F, H, W, 3] in 0..1."""
    from PIL import Image

    images = entry["outputs"][node]["images"]
    return torch.stack([torch.from_numpy(np.array(Image.open(
        comfyui["base"] / "output" / image["subfolder"] / image["filename"]).convert("RGB"))).float() / 255
        for image in images])


def test_the_folder_vae_decodes_and_encodes_like_diffusers_through_core_nodes(comfyui):
    """Load FastWan VAE (a random diffusers AutoencoderKLWan of base width 8 and one residual block
    a level, which ComfyUI's VAELoader cannot build) -> core VAEDecode, VAEDecodeTiled and VAEEncode.
    Oracle: diffusers' AutoencoderKLWan on the same folder, decoding the same latent (frames saved
    as 8-bit PNGs by core SaveImage) and encoding the same image (the posterior mean)."""
    folder = comfyui["base"] / "models" / "vae" / FOLDER_VAE
    latent = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(5)) * 2
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
              str(comfyui["base"] / "input" / "fastwan_vae_test.latent"))
    from PIL import Image

    ys, xs = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    pixels = (torch.stack([xs, ys, (xs - ys).abs()], -1) * 255).round().to(torch.uint8)  # [48, 64, 3]
    Image.fromarray(pixels.numpy()).save(comfyui["base"] / "input" / "fastwan_vae.png")
    picture = pixels.float() / 255  # what LoadImage gives
    prompt = {
        "1": {"class_type": "FastWanVAELoader", "inputs": {"folder": FOLDER_VAE}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "fastwan_vae_test.latent"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fastwan_vae/plain"}},
        # One tile bigger than the clip: the tiled path (ratios, index formulas) must give the same frames.
        "5": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["2", 0], "vae": ["1", 0], "tile_size": 512,
                                                         "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "fastwan_vae/tiled"}},
        "7": {"class_type": "LoadImage", "inputs": {"image": "fastwan_vae.png"}},
        "8": {"class_type": "VAEEncode", "inputs": {"pixels": ["7", 0], "vae": ["1", 0]}},
        "9": {"class_type": "FastWanTestSaveLatent", "inputs": {"samples": ["8", 0], "name": "fastwan_vae_encoded"}},
    }
    entry = run_ok(prompt)
    vae = diffusers_vae(folder)
    with torch.no_grad():
        video = vae.decode(latent).sample  # [1, 3, 9, 48, 64] in -1..1
        mean = vae.encode(picture.permute(2, 0, 1)[None, :, None] * 2 - 1).latent_dist.mode()
    expected = ((video.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0)  # [9, 48, 64, 3]
    assert expected.std() > 0.05 and ((expected > 0.02) & (expected < 0.98)).float().mean() > 0.5  # not flat
    for node in ("4", "6"):
        frames = saved_frames(comfyui, entry, node)
        assert frames.shape == (9, 48, 64, 3)
        # SaveImage truncates to 8 bits: within 1/255, plus float noise.
        assert (frames - expected).abs().max() <= 1.5 / 255
    torch.testing.assert_close(latent_of(comfyui, "fastwan_vae_encoded"), mean, rtol=1e-4, atol=1e-4)
    log = comfyui["log"].read_text()
    assert "No VAE weights detected" not in log and "Missing VAE keys" not in log


def test_a_bad_vae_folder_is_refused_by_prompt(comfyui):
    folder = comfyui["base"] / "models" / "vae" / "wan22_vae"
    shutil.copytree(comfyui["base"] / "models" / "vae" / FOLDER_VAE, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_residual": True}))
    try:
        for name, message in [("wan22_vae", "Wan2.2 VAE"), ("gone", "press R in the UI")]:
            prompt = {"1": {"class_type": "FastWanVAELoader", "inputs": {"folder": name}},
                      "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                      "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
                      "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
            status, answer = queue(prompt)
            assert status == 400, answer
            details = answer["node_errors"]["1"]["errors"][0]["details"]
            assert "Load FastWan VAE: " in details and message in details, details
    finally:
        shutil.rmtree(folder)


WORLD_CAPTIONS = ("a red circle moves left on a black background", "a blue square moves down on a white background")


def install_world(comfyui, world: Path, name: str) -> None:
    """A diffusers model folder's parts into ComfyUI's model folders, linked: the transformer file
    in diffusion_models, text_encoder/ + tokenizer/ in text_encoders/<name>/, vae/ as vae/<name>."""
    models = comfyui["base"] / "models"
    (models / "diffusion_models" / f"{name}.safetensors").symlink_to(
        world / "transformer" / "diffusion_pytorch_model.safetensors")
    (models / "text_encoders" / name).mkdir()
    for part in ("text_encoder", "tokenizer"):
        (models / "text_encoders" / name / part).symlink_to(world / part, target_is_directory=True)
    (models / "vae" / name).symlink_to(world / "vae", target_is_directory=True)


def world_prompt(name: str, captions, seed: int) -> dict:
    """Load FastWan -> VSA Attention Patch (0.5) -> 3-Step DMD Sampler at the world's size (29 frames
    of 256x192) for each caption through Load FastWan Text Encoder + CLIPTextEncode -> core VAEDecode
    with Load FastWan VAE -> FastWan Video File Save (mp4)."""
    prompt = {
        "1": {"class_type": "FastWanModelLoader", "inputs": {"model_name": f"{name}.safetensors",
                                                              "weight_dtype": "fp32"}},
        "2": {"class_type": "FastWanVSAPatch", "inputs": {"model": ["1", 0], "sparsity": 0.5, "backend": "reference"}},
        "3": {"class_type": "FastWanTextEncoderLoader", "inputs": {"folder": name}},
        "4": {"class_type": "FastWanVAELoader", "inputs": {"folder": name}},
    }
    for index, caption in enumerate(captions):
        node = 10 * (index + 1)
        prompt.update({
            f"{node}": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["3", 0]}},
            f"{node + 1}": {"class_type": "FastWanDMDSampler", "inputs": {
                "model": ["2", 0], "positive": [f"{node}", 0], "width": 256, "height": 192, "length": 29,
                "batch_size": 1, "seed": seed + index, "timesteps": "1000,757,522", "shift": 8.0}},
            f"{node + 2}": {"class_type": "VAEDecode", "inputs": {"samples": [f"{node + 1}", 0], "vae": ["4", 0]}},
            f"{node + 3}": {"class_type": "FastWanVideoSave", "inputs": {
                "images": [f"{node + 2}", 0], "fps": 8.0, "format": "mp4", "quality": 90,
                "filename_prefix": f"{name}/caption{index}"}},
        })
    return prompt


def world_in_comfyui(comfyui, world: Path, name: str, seed: int) -> list[tuple[torch.Tensor, object]]:
    """Install `world`, run `world_prompt` on WORLD_CAPTIONS and read each saved video back (float
    [F, H, W, 3] in 0..1) with the tiny world's judge: [(video, reading)] in caption order."""
    from fastwan.fastwan_core.video_io import read_video_frames
    from fastwan.training.tiny_world import judge

    install_world(comfyui, world, name)
    entry = run_ok(world_prompt(name, WORLD_CAPTIONS, seed))
    results = []
    for index in range(len(WORLD_CAPTIONS)):
        (saved,) = entry["outputs"][f"{10 * (index + 1) + 3}"]["images"]
        assert saved["filename"].endswith(".mp4")
        video = torch.from_numpy(read_video_frames(comfyui["base"] / "output" / saved["subfolder"] / saved["filename"]))
        video = video.float() / 255
        (reading,) = judge(video)
        results.append((video, reading))
    return results


@pytest.mark.slow
def test_a_world_shaped_model_folder_runs_through_our_loaders_and_core_vae_decode(comfyui, tmp_path):
    """The tiny world's workflow on a random-weight folder packed as `fastwan world-pack` ships
    models/tiny_world (the demo folder's parts: a FastWan-layout student, a narrow umT5, a diffusers
    Wan VAE of base width 8 in bf16): every part is found in ComfyUI's model folders, the videos
    have the world's size and the judge reads them. Their content is noise; the next test checks it
    on the trained world."""
    from fastwan.fastwan_core.demo_models import build_demo_model_folder
    from fastwan.training.world_training import pack

    stand_in = build_demo_model_folder(tmp_path / "random", seed=3)
    world = pack(stand_in, stand_in / "transformer", tmp_path / "stand_in", log=lambda line: None)
    for video, reading in world_in_comfyui(comfyui, world, "stand_in", seed=7):
        assert video.shape == (29, 192, 256, 3) and video.std() > 0.01
        assert reading.background in ("black", "white", "gray")


@pytest.mark.slow
@pytest.mark.skipif(not (WORLD / "transformer").is_dir(),
                    reason="models/tiny_world is not in this checkout yet (train it with scripts/train_tiny_world.sh)")
def test_the_tiny_world_in_comfyui_draws_what_the_caption_asks(comfyui):
    """The trained tiny world in ComfyUI's real model folders, through our loaders, VSA at 0.5, the
    3-step sampler, core VAEDecode and our mp4 saver: the world's judge reads colour, shape,
    direction and background of each saved video as its caption asked."""
    from fastwan.training.tiny_world import parse_caption

    for caption, (video, reading) in zip(WORLD_CAPTIONS, world_in_comfyui(comfyui, WORLD, "tiny_world", seed=0)):
        assert video.shape == (29, 192, 256, 3)
        assert reading.matches(parse_caption(caption)) == dict.fromkeys(
            ("color", "shape", "direction", "background"), True), (caption, reading)


def test_an_error_found_while_running_reaches_the_ui_with_its_message(comfyui):
    prompt = tiny_video_prompt("gif")
    prompt["3"]["inputs"]["channels"] = 768  # CLIP-L sized conditioning: only known once it is computed
    status, answer = queue(prompt)
    assert status == 200, answer
    entry = wait_for(answer["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    errors = [message for kind, message in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == "FastWanDMDSampler"
    assert "umT5" in errors[0]["exception_message"] and "type wan" in errors[0]["exception_message"]


def output_files(comfyui) -> set:
    return {p for p in (comfyui["base"] / "output").rglob("*") if p.is_file()}


@pytest.mark.parametrize("node, name, value, message", [
    ("4", "width", 830, "816 or 832"),
    ("4", "length", 80, "77 or 81"),
    ("4", "timesteps", "522,757,1000", "must decrease"),
    ("2", "sparsity", 0.99, "sparsity 0.99 is outside"),
    ("6", "filename_prefix", "../escape", "points outside ComfyUI's output folder"),
    ("6", "filename_prefix", "%KSampler.seed%/clip", "placeholders this node does not expand"),
    ("1", "model_name", RANDOM_VAE, "not in models/diffusion_models"),
])
def test_a_bad_value_is_refused_by_prompt_before_anything_runs(comfyui, node, name, value, message):
    before = output_files(comfyui)
    _, history_before = request("/history")
    prompt = tiny_video_prompt("gif")
    prompt[node]["inputs"][name] = value
    status, answer = queue(prompt)
    assert status == 400, answer
    details = " ".join(error["details"] for error in answer["node_errors"][node]["errors"])
    assert message in details, answer
    time.sleep(1)
    _, history_after = request("/history")
    assert history_after == history_before and output_files(comfyui) == before


def test_a_file_that_is_not_a_wan_dit_is_refused_by_prompt(comfyui):
    vae_in_wrong_folder = comfyui["base"] / "models" / "diffusion_models" / "a_vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(vae_in_wrong_folder))
    prompt = tiny_video_prompt("gif")
    prompt["1"]["inputs"]["model_name"] = "a_vae.safetensors"
    status, answer = queue(prompt)
    assert status == 400
    assert "Is this a VAE or text encoder file?" in answer["node_errors"]["1"]["errors"][0]["details"]


def test_video_save_expands_date_placeholders_and_writes_0644(comfyui):
    prompt = tiny_video_prompt("webp")
    prompt["6"]["inputs"]["filename_prefix"] = "fastwan_it/%date:yyyy-MM-dd%/clip"
    days = {time.strftime("%Y-%m-%d")}
    status, answer = queue(prompt)
    assert status == 200 and answer["node_errors"] == {}, answer
    entry = wait_for(answer["prompt_id"])
    days.add(time.strftime("%Y-%m-%d"))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    (saved,) = entry["outputs"]["6"]["images"]
    assert saved["subfolder"] in {f"fastwan_it/{day}" for day in days}
    path = comfyui["base"] / "output" / saved["subfolder"] / saved["filename"]
    # ComfyUI's own savers leave files at 0644 (the server runs under umask 022). Passes once
    # fastwan_core.video_io creates files with the umask's mode.
    assert path.stat().st_mode & 0o777 == 0o644


def latent_of(comfyui, name: str) -> torch.Tensor:
    return load_file(str(comfyui["base"] / "output" / f"{name}.safetensors"))["samples"]


def run_ok(prompt: dict) -> dict:
    status, answer = queue(prompt)
    assert status == 200 and answer["node_errors"] == {}, answer
    entry = wait_for(answer["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    return entry


def padded_context(tokens: int, channels: int, seed: int = 1) -> torch.Tensor:
    """FastWanTestConditioning's embeddings, zero-padded to Wan's 512 rows."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.zeros(1, 512, channels)
    context[:, :tokens] = torch.randn(1, tokens, channels, generator=generator)
    return context


def dmd_oracle(dit: WanDiT, attention: AttentionConfig, context, shape, seed: int) -> torch.Tensor:
    x0 = sample_dmd(dit.with_attention(attention), context, shape, seed)
    return denormalize_latents(x0)


def euler_oracle(dit: WanDiT, attention, context, shape, seed: int, steps: int, shift: float) -> torch.Tensor:
    """KSampler euler / simple written out: sigmas at t = 1, 1-1/steps, ... of the shifted flow
    schedule (sigma(t) = s t / (1 + (s - 1) t), 1000 training steps), then 0; Euler steps on the
    velocity; initial noise from torch.manual_seed(seed)."""
    table = [shift * t / (1 + (shift - 1) * t) for t in (torch.arange(1, 1001, dtype=torch.float64) / 1000).tolist()]
    sigmas = [table[-(1 + int(i * 1000 / steps))] for i in range(steps)] + [0.0]
    x = torch.randn(shape, generator=torch.manual_seed(seed))
    dit = dit.with_attention(attention)
    for sigma, next_sigma in zip(sigmas, sigmas[1:]):
        v = dit(x, torch.full((shape[0],), sigma * 1000.0), context).float()
        x = x + (next_sigma - sigma) * v
    return denormalize_latents(x)


def test_native_samplers_drive_fastwan(comfyui):
    """One FastWan MODEL (through VSA Attention Patch) sampled by our node, by SamplerCustomAdvanced
    with our SAMPLER and SIGMAS, by KSampler and by KSampler after ModelSamplingSD3."""
    seed, channels = 321, WanConfig.tiny().text_dim
    prompt = tiny_video_prompt("gif")
    del prompt["5"], prompt["6"]
    prompt["4"]["inputs"]["seed"] = seed
    prompt.update({
        "10": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 48, "length": 9,
                                                                    "batch_size": 1}},
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "12": {"class_type": "BasicGuider", "inputs": {"model": ["2", 0], "conditioning": ["3", 0]}},
        "13": {"class_type": "FastWanDMDSamplerSelect", "inputs": {}},
        "14": {"class_type": "FastWanDMDSigmas", "inputs": {"timesteps": "1000,757,522", "shift": 8.0}},
        "15": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["11", 0], "guider": ["12", 0], "sampler": ["13", 0], "sigmas": ["14", 0],
            "latent_image": ["10", 0]}},
        "16": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["10", 0], "denoise": 1.0}},
        "17": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 3.0}},
        "18": {"class_type": "KSampler", "inputs": {
            "model": ["17", 0], "seed": seed, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["10", 0], "denoise": 1.0}},
    })
    for node, name in (("4", "dmd_node"), ("15", "dmd_custom"), ("16", "ksampler"), ("18", "ksampler_sd3")):
        prompt[f"save_{name}"] = {"class_type": "FastWanTestSaveLatent", "inputs": {"samples": [node, 0], "name": name}}
    run_ok(prompt)

    dit, attention = comfyui["tiny"], AttentionConfig("vsa", 0.8, "reference")
    context, shape = padded_context(12, channels), (1, 16, 3, 6, 8)
    expected = dmd_oracle(dit, attention, context, shape, seed)
    torch.testing.assert_close(latent_of(comfyui, "dmd_node"), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latent_of(comfyui, "dmd_custom"), latent_of(comfyui, "dmd_node"), rtol=0, atol=1e-6)
    torch.testing.assert_close(latent_of(comfyui, "ksampler"),
                               euler_oracle(dit, attention, context, shape, seed, 3, 8.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latent_of(comfyui, "ksampler_sd3"),
                               euler_oracle(dit, attention, context, shape, seed, 3, 3.0), rtol=1e-4, atol=1e-4)
    assert "latent preview" not in comfyui["log"].read_text()


@pytest.mark.slow
def test_torch_compile_model_compiles_fastwan(comfyui):
    """TorchCompileModel (inductor) wraps our DiT like any diffusion model; the compiled run gives the
    eager result."""
    prompt = tiny_video_prompt("gif")
    del prompt["2"], prompt["5"], prompt["6"]
    prompt["30"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "inductor"}}
    prompt["4"]["inputs"].update(model=["30", 0], seed=7)
    prompt["31"] = {"class_type": "FastWanTestSaveLatent", "inputs": {"samples": ["4", 0], "name": "compiled"}}
    run_ok(prompt)
    context = padded_context(12, WanConfig.tiny().text_dim)
    expected = dmd_oracle(comfyui["tiny"], AttentionConfig(), context, (1, 16, 3, 6, 8), 7)
    torch.testing.assert_close(latent_of(comfyui, "compiled"), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora_file, scale", [("kohya.safetensors", 0.7 * 2.0 / LORA_RANK), ("peft.safetensors", 0.7)])
def test_a_lora_applies_through_lora_loader_model_only(comfyui, lora_file, scale):
    """LoraLoaderModelOnly at strength 0.7 on FastWan equals sampling weights merged by hand
    (kohya files scale by alpha / rank, PEFT files by 1)."""
    name = lora_file.split(".")[0]
    prompt = tiny_video_prompt("gif")
    del prompt["2"], prompt["5"], prompt["6"]
    prompt["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_file,
                                                                     "strength_model": 0.7}}
    prompt["4"]["inputs"]["model"] = ["20", 0]
    prompt["21"] = {"class_type": "FastWanTestSaveLatent", "inputs": {"samples": ["4", 0], "name": f"lora_{name}"}}
    run_ok(prompt)
    merged = merged_by_hand(comfyui["tiny"], comfyui["lora_factors"], scale)
    context = padded_context(12, WanConfig.tiny().text_dim)
    expected = dmd_oracle(merged, AttentionConfig(), context, (1, 16, 3, 6, 8), 123)
    unpatched = dmd_oracle(comfyui["tiny"], AttentionConfig(), context, (1, 16, 3, 6, 8), 123)
    got = latent_of(comfyui, f"lora_{name}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - unpatched).abs().max() > 1e-2  # the LoRA changed the result
    assert "lora key not loaded" not in comfyui["log"].read_text()


def test_an_fp8_file_samples_like_its_dequantized_weights(comfyui):
    prompt = tiny_video_prompt("gif")
    del prompt["5"], prompt["6"]
    prompt["1"]["inputs"] = {"model_name": FP8_TINY, "weight_dtype": "auto"}
    prompt["7"] = {"class_type": "FastWanTestSaveLatent", "inputs": {"samples": ["4", 0], "name": "fp8"}}
    run_ok(prompt)
    dequantized = WanDiT(WanConfig.tiny())
    dequantized.load_state_dict(comfyui["fp8_weights"])
    context = padded_context(12, WanConfig.tiny().text_dim)
    attention = AttentionConfig("vsa", 0.8, "reference")
    got = latent_of(comfyui, "fp8")
    torch.testing.assert_close(got, dmd_oracle(dequantized, attention, context, (1, 16, 3, 6, 8), 123),
                               rtol=1e-4, atol=1e-4)
    # The whole 3-step run against the bf16 original: the cost of fp8 storage on this random tiny model.
    original = dmd_oracle(comfyui["tiny"], attention, context, (1, 16, 3, 6, 8), 123)
    assert (got - original).abs().max() / original.abs().max() < 0.05


WEBSOCKET_CLIENT = """
import asyncio, base64, json, struct, sys, uuid
import aiohttp

async def main(base_url, prompt):
    client_id = uuid.uuid4().hex
    events = {"previews": 0, "images": [], "texts": []}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(base_url.replace("http", "ws") + "/ws?clientId=" + client_id) as ws:
            async with session.post(base_url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                prompt_id = (await r.json())["prompt_id"]
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    kind = struct.unpack(">I", message.data[:4])[0]
                    if kind in (1, 4):
                        events["previews"] += 1
                        start = 8 if kind == 1 else 8 + struct.unpack(">I", message.data[4:8])[0]
                        events["images"].append(base64.b64encode(message.data[start:]).decode())
                    elif kind == 3:
                        length = struct.unpack(">I", message.data[4:8])[0]
                        node = message.data[8:8 + length].decode()
                        events["texts"].append([node, message.data[8 + length:].decode()])
                elif message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    if data["type"] in ("executing", "execution_success", "execution_error"):
                        done = data["data"].get("prompt_id") == prompt_id and (
                            data["type"] != "executing" or data["data"].get("node") is None)
                        if done:
                            break
    print(json.dumps(events))

asyncio.run(main(sys.argv[1], json.loads(sys.stdin.read())))
"""


def run_watching_the_websocket(prompt: dict) -> dict:
    """Queue `prompt` as the frontend does and collect what the UI receives over the websocket:
    the number of latent preview images and the texts shown on nodes (run with ComfyUI's Python,
    which has aiohttp)."""
    python = os.environ.get("FASTWAN_COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, "-c", WEBSOCKET_CLIENT, BASE_URL], input=json.dumps(prompt), text=True,
                          capture_output=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_ui_gets_latent_previews_and_the_dense_weights_warning(comfyui):
    """Each of the 3 steps sends a latent preview for Wan;
    VSA Attention Patch on dense-trained weights (ComfyUI's own Wan loader) shows its warning on the
    node."""
    prompt = tiny_video_prompt("gif")
    prompt["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": NATIVE_TINY, "weight_dtype": "default"}}
    prompt["3"]["inputs"]["channels"] = 4096
    prompt["4"]["inputs"]["seed"] = 99  # not cached from another test
    events = run_watching_the_websocket(prompt)
    assert events["previews"] == 3
    assert [node for node, _ in events["texts"]] == ["2"]
    assert events["texts"][0][1].startswith("VSA Attention Patch: this model has no trained VSA gates")


def comfyui_wan21_preview_factors() -> tuple[torch.Tensor, torch.Tensor, object]:
    """ComfyUI's Wan2.1 latent-to-RGB factors [16, 3] and bias [3], and its Wan tiny-decoder file
    prefix (None where that ComfyUI has no tiny decoder for Wan), read from the ComfyUI under test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("comfyui_latent_formats",
                                                  Path(COMFYUI_DIR) / "comfy" / "latent_formats.py")
    formats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(formats)
    wan = formats.Wan21()
    return (torch.tensor(wan.latent_rgb_factors), torch.tensor(wan.latent_rgb_factors_bias),
            wan.taesd_decoder_name)


def test_previews_of_fastwan_show_each_steps_denoised_latent(comfyui):
    """--preview-method taesd with a FastWan MODEL: each step's preview is ComfyUI's Wan preview of
    that step's denoised latent x0 (first frame), computed here from our DiT and the Latent2RGB
    rule written out: RGB = x0 . factors + bias in -1..1, then 0..255.

    ComfyUI 0.3.64 has no tiny decoder for Wan (its Wan21 latent format names none), so it shows
    Latent2RGB for every Wan model, its own and ours; a ComfyUI that ships one uses it for our MODEL
    too, which carries ComfyUI's own Wan21 latent format (no file for it is placed here)."""
    from io import BytesIO

    from PIL import Image

    factors, bias, tiny_decoder = comfyui_wan21_preview_factors()
    seed = 4321
    prompt = tiny_video_prompt("gif")
    del prompt["5"], prompt["6"]
    prompt["4"]["inputs"]["seed"] = seed
    prompt["7"] = {"class_type": "FastWanTestSaveLatent", "inputs": {"samples": ["4", 0], "name": "previewed"}}
    events = run_watching_the_websocket(prompt)
    assert events["previews"] == 3

    denoised = []
    context = padded_context(12, WanConfig.tiny().text_dim)
    dit = comfyui["tiny"].with_attention(AttentionConfig("vsa", 0.8, "reference"))
    sample_dmd(dit, context, (1, 16, 3, 6, 8), seed, callback=lambda step, steps, x0: denoised.append(x0))
    # Compared in luma: JPEG keeps it per pixel, but averages colour over 2x2 pixels, which on an
    # 8x6 image of random latents is most of the picture.
    previews = [np.asarray(Image.open(BytesIO(base64.b64decode(image))).convert("L"), dtype=np.float64)
                for image in events["images"]]
    for step, (x0, preview) in enumerate(zip(denoised, previews)):
        rgb = x0[0, :, 0].permute(1, 2, 0) @ factors + bias                        # [6, 8, 3] in -1..1
        expected = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
        expected = np.asarray(Image.fromarray(expected).convert("L"), dtype=np.float64)
        assert preview.shape == expected.shape, (step, preview.shape)
        assert np.abs(preview - expected).mean() < 4, (step, np.abs(preview - expected).mean())
        if step:
            assert np.abs(preview - previews[0]).mean() > 6  # each step shows its own latent
    if tiny_decoder is None:
        assert "TAESD previews enabled, but could not find" in comfyui["log"].read_text()


def test_vsa_patch_on_a_wan_model_from_comfyuis_own_loader(comfyui):
    """Load Diffusion Model (ComfyUI's Wan network) -> VSA Attention Patch -> our sampler: equals our
    DiT with VSA on the same weights (no trained gates), and the node says so in the UI."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": NATIVE_TINY, "weight_dtype": "default"}},
        "2": {"class_type": "FastWanVSAPatch", "inputs": {"model": ["1", 0], "sparsity": 0.5, "backend": "reference"}},
        # 512 tokens, as umT5 gives: ComfyUI's Wan network does not pad shorter contexts, Wan does.
        "3": {"class_type": "FastWanTestConditioning", "inputs": {"seed": 1, "tokens": 512, "channels": 4096}},
        "4": {"class_type": "FastWanDMDSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "width": 128, "height": 128, "length": 9, "batch_size": 1,
            "seed": 5, "timesteps": "1000,757,522", "shift": 8.0}},
        "5": {"class_type": "FastWanTestSaveLatent", "inputs": {"samples": ["4", 0], "name": "native_vsa"}},
    }
    entry = run_ok(prompt)
    assert "no trained VSA gates" in entry["outputs"]["2"]["text"][0]
    ours = load_dit(comfyui["base"] / "models" / "diffusion_models" / NATIVE_TINY, dtype=torch.float32)
    with torch.no_grad():  # ComfyUI's Wan network has no VSA gates (it drops them from the file)
        for block in ours.blocks:
            block.to_gate_compress.weight.zero_()
            block.to_gate_compress.bias.zero_()
    context = padded_context(512, 4096)
    shape = (1, 16, 3, 16, 16)  # 3x8x8 tokens: 4 VSA tiles, 2 kept at sparsity 0.5
    expected = dmd_oracle(ours, AttentionConfig("vsa", 0.5, "reference"), context, shape, 5)
    dense = dmd_oracle(ours, AttentionConfig(), context, shape, 5)
    got = latent_of(comfyui, "native_vsa")
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert (got - dense).abs().max() > 1e-2  # sparse attention did change the result


def test_the_shipped_workflow_passes_validation(comfyui):
    prompt = json.loads((REPO / "workflows" / "api" / "fastwan_t2v_480p.json").read_text())
    status, answer = queue(prompt)
    assert status == 200, answer
    assert answer["node_errors"] == {}
    # Validation passed and execution started; the placeholder model files then fail to load.
    entry = wait_for(answer["prompt_id"])
    assert entry["status"]["status_str"] == "error"


@pytest.fixture
def browser_page(comfyui):
    """ComfyUI's real frontend in a headless Chromium. Needs the `playwright` package and a
    Chromium (FASTWAN_CHROMIUM, default /usr/bin/chromium)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = os.environ.get("FASTWAN_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        pytest.skip(f"no Chromium at {chromium}; set FASTWAN_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.failed_fastwan_urls = []
            page.on("response", lambda r: page.failed_fastwan_urls.append(r.url)
                    if r.status >= 400 and "FastWan" in r.url else None)
            page.goto(BASE_URL + "/", wait_until="networkidle")
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            page.wait_for_timeout(2000)
            yield page
        finally:
            browser.close()


def test_the_frontend_opens_the_template_and_makes_our_api_twin(browser_page):
    """Open the workflow the way a user does (template browser), then let the frontend convert it
    to API format: it must equal our twin."""
    page = browser_page
    if not page.get_by_text("ComfyUI-FastWan", exact=True).count():
        page.get_by_text("Templates", exact=True).first.click()  # the sidebar's template browser
    page.get_by_text("ComfyUI-FastWan", exact=True).first.click()
    page.get_by_text("fastwan_t2v_480p").first.click()
    page.wait_for_function("window.app.graph._nodes.length === 9", timeout=30_000)
    api = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert page.failed_fastwan_urls == []  # e.g. the template's thumbnail
    twin = json.loads((REPO / "workflows" / "api" / "fastwan_t2v_480p.json").read_text())
    for node in list(api.values()) + list(twin.values()):
        node.pop("_meta", None)
    assert api == twin


@pytest.mark.parametrize("format", ["mp4", "webm", "webp"])
def test_dropping_a_saved_video_on_comfyui_restores_the_workflow(comfyui, browser_page, format):
    """What a user does with a result: drag the file back into ComfyUI to get the graph again."""
    workflow = json.loads((REPO / "workflows" / "fastwan_t2v_480p.json").read_text())
    path, _ = make_tiny_video(comfyui, format, workflow)
    restored = browser_page.evaluate("""async ([name, mime]) => {
        window.app.graph.clear();
        const response = await fetch('/view?type=output&subfolder=fastwan_it&filename=' + name);
        await window.app.handleFile(new File([await response.blob()], name, {type: mime}));
        await new Promise(resolve => setTimeout(resolve, 1000));
        return window.app.graph._nodes.map(node => node.type).sort();
    }""", [path.name, {"mp4": "video/mp4", "webm": "video/webm", "webp": "image/webp"}[format]])
    assert restored == sorted(node["type"] for node in workflow["nodes"])
