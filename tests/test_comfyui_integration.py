"""Against a real ComfyUI (opt-in): FASTWAN_COMFYUI_DIR=<ComfyUI checkout>, and optionally
FASTWAN_COMFYUI_PYTHON=<python of ComfyUI's environment> (default: this interpreter) and
FASTWAN_COMFYUI_PORT (default 8199).

The server runs `main.py --cpu` on 127.0.0.1 with --base-directory pointing at a temporary folder
whose custom_nodes/ holds this repository (as ComfyUI-FastWan) and the test-only nodes in
tests/comfyui_test_nodes, and whose models/ holds a tiny FastWan checkpoint plus placeholder files
with the shipped workflow's file names. The ComfyUI checkout itself is not modified.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from fastwan.fastwan_core.checkpoint import save_dit
from fastwan.fastwan_core.config import WanConfig
from fastwan.fastwan_core.model import WanDiT
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
    save_dit(WanDiT(WanConfig.tiny()), base / "models" / "diffusion_models" / "fastwan_tiny.safetensors")
    (base / "output").mkdir()
    python = os.environ.get("FASTWAN_COMFYUI_PYTHON", sys.executable)
    make_random_wan_vae(python, base / "models" / "vae" / RANDOM_VAE)

    with socket.socket() as probe:  # a server already there would answer in place of ours
        if probe.connect_ex((HOST, PORT)) == 0:
            pytest.fail(f"port {PORT} on {HOST} is in use; stop that server or set FASTWAN_COMFYUI_PORT")
    log_path = base / "comfyui.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", HOST, "--port", str(PORT), "--base-directory", str(base),
         "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--preview-method", "auto"],
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
        yield {"base": base, "log": log_path}
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
        "FastWanModelLoader": ("Load FastWan", ["model_name", "weight_dtype"], ["FASTWAN_MODEL"]),
        "FastWanVSAPatch": ("VSA Attention Patch", ["model", "sparsity", "backend"], ["FASTWAN_MODEL"]),
        "FastWanDMDSampler": ("3-Step DMD Sampler", ["model", "positive", "width", "height", "length",
                                                     "batch_size", "seed", "timesteps", "shift"], ["LATENT"]),
        "FastWanVideoSave": ("Video Save", ["images", "fps", "format", "quality", "filename_prefix"], []),
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
    assert "Requested to load FastWanDiffusionModel" in log  # went through ComfyUI's model management
    assert "latent preview" not in log  # previews (--preview-method auto) ran without errors


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


def test_a_user_error_reaches_the_ui_with_its_message(comfyui):
    prompt = {
        "1": {"class_type": "FastWanModelLoader", "inputs": {"model_name": "fastwan_tiny.safetensors",
                                                              "weight_dtype": "auto"}},
        "3": {"class_type": "FastWanTestConditioning", "inputs": {"seed": 1, "tokens": 4,
                                                                   "channels": WanConfig.tiny().text_dim}},
        "4": {"class_type": "FastWanDMDSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "width": 830, "height": 48, "length": 9, "batch_size": 1,
            "seed": 1, "timesteps": "1000,757,522", "shift": 8.0}},
        "5": {"class_type": "FastWanTestLatentToImage", "inputs": {"samples": ["4", 0]}},
        "6": {"class_type": "FastWanVideoSave", "inputs": {"images": ["5", 0], "fps": 16.0, "format": "gif",
                                                            "quality": 80, "filename_prefix": "fastwan_it/bad"}},
    }
    status, answer = queue(prompt)
    assert status == 200, answer
    entry = wait_for(answer["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    errors = [message for kind, message in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == "FastWanDMDSampler"
    assert "816 or 832" in errors[0]["exception_message"]


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
