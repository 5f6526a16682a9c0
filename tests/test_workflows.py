"""The shipped workflows: only our node ids and core node ids, widget values in our nodes' input
order and within their ranges, consistent links, download metadata on every loader, and an
API-format twin that is the same graph."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastwan.fastwan_core.latents import validate_video_size
from fastwan.nodes import NODE_CLASS_MAPPINGS

REPO = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
API_DIR = REPO / "workflows" / "api"

# Core nodes the workflows may use, with their widget inputs in order (ComfyUI 0.3.64; the real
# ComfyUI test checks these against /object_info). Note and MarkdownNote are frontend-only.
CORE_WIDGETS = {
    "CLIPLoader": ["clip_name", "type", "device"],
    "CLIPTextEncode": ["text"],
    "VAELoader": ["vae_name"],
    "VAEDecode": [],
    "Note": ["text"],
    "MarkdownNote": ["text"],
}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
LOADER_FOLDERS = {"CLIPLoader": "text_encoders", "VAELoader": "vae", "FastWanModelLoader": "diffusion_models"}
SOCKET_TYPES = {"CONDITIONING", "LATENT", "IMAGE", "CLIP", "VAE", "MODEL"}


def widget_inputs(node_type: str) -> list[tuple[str, object, dict]]:
    """(name, type, options) of the widget inputs of one of our nodes, in the order the frontend
    serialises them; a seed with control_after_generate is followed by its control value."""
    spec = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, (kind, options) in spec.get(section, {}).items():
            if isinstance(kind, str) and kind in SOCKET_TYPES:
                continue
            widgets.append((name, kind, options))
            if options.get("control_after_generate"):
                widgets.append((name + ":control", ["fixed", "increment", "decrement", "randomize"], {}))
    return widgets


def check_widget_value(node_type, name, kind, options, value, node):
    where = f"{node_type} input {name}"
    if isinstance(kind, list):
        if name == "model_name":  # the list depends on the user's files; the name must be downloadable
            assert value == node["properties"]["models"][0]["name"], where
        else:
            assert value in kind, f"{where}: {value!r} not in {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert options.get("min", -2**63) <= value <= options.get("max", 2**64), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)), where
        assert options.get("min", float("-inf")) <= value <= options.get("max", float("inf")), where
    elif kind == "STRING":
        assert isinstance(value, str) and value, where
    else:
        pytest.fail(f"{where}: unexpected widget type {kind}")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_is_the_480p_workflow_and_its_api_twin():
    assert (REPO / "workflows" / "fastwan_t2v_480p.json") in UI_WORKFLOWS
    for path in UI_WORKFLOWS:
        assert (API_DIR / path.name).is_file(), f"{path.name} has no API-format twin in workflows/api/"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_uses_known_nodes_with_widgets_in_input_order(path):
    workflow = load(path)
    assert workflow["version"] == 0.4
    types = {node["type"] for node in workflow["nodes"]}
    assert types <= set(NODE_CLASS_MAPPINGS) | set(CORE_WIDGETS), types - set(NODE_CLASS_MAPPINGS) - set(CORE_WIDGETS)
    assert {"FastWanModelLoader", "FastWanVSAPatch", "FastWanDMDSampler", "FastWanVideoSave"} <= types
    for node in workflow["nodes"]:
        if node["type"] in NODE_CLASS_MAPPINGS:
            widgets = widget_inputs(node["type"])
            values = node["widgets_values"]
            assert len(values) == len(widgets), f"{node['type']}: {values} vs {[w[0] for w in widgets]}"
            for (name, kind, options), value in zip(widgets, values):
                check_widget_value(node["type"], name, kind, options, value, node)
        else:
            assert len(node.get("widgets_values", [])) == len(CORE_WIDGETS[node["type"]]), node["type"]


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_settings_are_the_fastwan_recipe(path):
    nodes = {node["type"]: node for node in load(path)["nodes"]}
    values = {name: value for (name, _, _), value in
              zip(widget_inputs("FastWanDMDSampler"), nodes["FastWanDMDSampler"]["widgets_values"])}
    validate_video_size(values["width"], values["height"], values["length"])
    assert (values["width"], values["height"], values["length"]) == (832, 480, 81)
    assert values["timesteps"] == "1000,757,522" and values["shift"] == 8.0
    assert nodes["FastWanVSAPatch"]["widgets_values"][0] == 0.8
    assert nodes["CLIPLoader"]["widgets_values"][:2] == ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"]
    assert nodes["VAELoader"]["widgets_values"] == ["wan_2.1_vae.safetensors"]
    assert nodes["FastWanVideoSave"]["widgets_values"][0] == 16.0


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_links_are_consistent(path):
    workflow = load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"])
    assert workflow["last_node_id"] >= max(nodes)
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    targets = set()
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        output = nodes[origin]["outputs"][origin_slot]
        socket = nodes[target]["inputs"][target_slot]
        assert output["type"] == socket["type"] == kind, (link_id, output, socket)
        assert link_id in output["links"] and socket["link"] == link_id
        targets.add((target, socket["name"]))
    # Every required socket of every node is connected.
    for node in workflow["nodes"]:
        if node["type"] in NODE_CLASS_MAPPINGS:
            required = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"]
            for name, (kind, _) in required.items():
                if isinstance(kind, str) and kind in SOCKET_TYPES:
                    assert (node["id"], name) in targets, f"{node['type']}.{name} is not connected"
    # The graph the design describes: loaders -> patch -> sampler -> VAEDecode -> Video Save.
    by_type = {node["type"]: node["id"] for node in workflow["nodes"]}
    edges = {(nodes[o]["type"], nodes[t]["type"]) for _, o, _, t, _, _ in workflow["links"]}
    assert edges == {("CLIPLoader", "CLIPTextEncode"), ("CLIPTextEncode", "FastWanDMDSampler"),
                     ("FastWanModelLoader", "FastWanVSAPatch"), ("FastWanVSAPatch", "FastWanDMDSampler"),
                     ("FastWanDMDSampler", "VAEDecode"), ("VAELoader", "VAEDecode"),
                     ("VAEDecode", "FastWanVideoSave")}
    assert set(by_type) & FRONTEND_ONLY, "the workflow needs a note saying where the model files go"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_every_loader_says_where_to_download_its_file(path):
    workflow = load(path)
    note = " ".join(node["widgets_values"][0] for node in workflow["nodes"] if node["type"] in FRONTEND_ONLY)
    for node in workflow["nodes"]:
        if node["type"] not in LOADER_FOLDERS:
            continue
        (model,) = node["properties"]["models"]
        assert model["name"] == node["widgets_values"][0]
        assert model["name"].endswith(".safetensors")  # the frontend only offers these for download
        assert model["directory"] == LOADER_FOLDERS[node["type"]]
        assert model["url"].startswith("https://huggingface.co/") and "/resolve/" in model["url"]
        assert f"{model['directory']}/{model['name']}" in note, f"the note does not say where {model['name']} goes"
        assert model["url"].split("?")[0] in note


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_api_twin_is_the_same_graph(path):
    workflow = load(path)
    api = load(API_DIR / path.name)
    ui_nodes = {str(node["id"]): node for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY}
    assert set(api) == set(ui_nodes)
    links = {link[0]: link for link in workflow["links"]}
    for node_id, node in ui_nodes.items():
        entry = api[node_id]
        assert entry["class_type"] == node["type"]
        expected = {}
        for socket in node["inputs"]:
            if socket.get("link") is not None:
                _, origin, origin_slot, _, _, _ = links[socket["link"]]
                expected[socket["name"]] = [str(origin), origin_slot]
        if node["type"] in NODE_CLASS_MAPPINGS:
            names = [name for name, _, _ in widget_inputs(node["type"])]
        else:
            names = CORE_WIDGETS[node["type"]]
        for name, value in zip(names, node["widgets_values"]):
            if not name.endswith(":control"):
                expected[name] = value
        assert entry["inputs"] == expected, node["type"]
        if node["type"] in NODE_CLASS_MAPPINGS:
            spec = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
            assert set(spec["required"]) <= set(entry["inputs"]), node["type"]


def test_a_workflow_saved_with_the_old_model_type_still_connects():
    """Until Load FastWan returned ComfyUI's MODEL, its links were typed FASTWAN_MODEL (the shipped
    workflow then differed from today's only in that type name). The frontend restores links by
    slot, so such a workflow still connects when every FASTWAN_MODEL link joins an output and an
    input that today carry MODEL under the same name and slot."""
    current = (REPO / "workflows" / "fastwan_t2v_480p.json").read_text(encoding="utf-8")
    old = json.loads(current.replace('"MODEL"', '"FASTWAN_MODEL"'))
    nodes = {node["id"]: node for node in old["nodes"]}
    old_links = [link for link in old["links"] if link[5] == "FASTWAN_MODEL"]
    assert len(old_links) == 2  # Load FastWan -> VSA Attention Patch -> 3-Step DMD Sampler
    for _, origin, origin_slot, target, target_slot, _ in old_links:
        origin_class = NODE_CLASS_MAPPINGS[nodes[origin]["type"]]
        target_class = NODE_CLASS_MAPPINGS[nodes[target]["type"]]
        assert origin_class.RETURN_TYPES[origin_slot] == "MODEL"
        assert origin_class.RETURN_NAMES[origin_slot] == nodes[origin]["outputs"][origin_slot]["name"]
        sockets = [name for name, (kind, _) in target_class.INPUT_TYPES()["required"].items()
                   if isinstance(kind, str) and kind in SOCKET_TYPES]
        input_name = nodes[target]["inputs"][target_slot]["name"]
        assert sockets.index(input_name) == target_slot
        assert target_class.INPUT_TYPES()["required"][input_name][0] == "MODEL"
