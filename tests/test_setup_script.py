"""scripts/comfyui_setup.sh, offline: comfy-cli, the downloader and ComfyUI's Python are stand-ins
that record their calls and lay out files the way the real ones do."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "comfyui_setup.sh"
MODEL_FILES = {
    "diffusion_models/fastwan2.1_t2v_1.3B_bf16.safetensors",
    "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae/wan_2.1_vae.safetensors",
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def stubs(tmp_path):
    """comfy-cli, downloader and python stand-ins; each appends its argv to a log."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    comfy = write_exe(bin_dir / "comfy", f"""#!/usr/bin/env bash
echo "comfy $*" >> {log}
ws=""
while [[ $# -gt 0 ]]; do case "$1" in --workspace) ws="$2"; shift 2;; --skip-prompt) shift;; *) break;; esac; done
if [[ "$1" == install ]]; then
  mkdir -p "$ws/comfy" "$ws/custom_nodes" "$ws/.venv/bin" "$ws/output"
  for d in checkpoints diffusion_models text_encoders vae loras; do mkdir -p "$ws/models/$d"; done
  echo "# ComfyUI" > "$ws/main.py"
  printf '#!/usr/bin/env bash\\necho "python $*" >> {log}\\n' > "$ws/.venv/bin/python"
  chmod +x "$ws/.venv/bin/python"
fi
""")
    # Sizes the "server" reports: a few hundred bytes, different per file.
    downloader = write_exe(bin_dir / "downloader", f"""#!/usr/bin/env bash
echo "downloader $*" >> {log}
size_of() {{ echo $(( 100 + ${{#1}} )); }}
case "$1" in
  size) size_of "$2" ;;
  get) [[ -n "${{STUB_DOWNLOAD_FAILS:-}}" ]] && exit 22
       head -c "$(size_of "$2")" /dev/zero > "$3" ;;
esac
""")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FASTWAN_PYTHON")}
    env.update(FASTWAN_COMFY=str(comfy), FASTWAN_DOWNLOADER=str(downloader), HOME=str(tmp_path / "home"))
    return {"env": env, "log": log, "tmp": tmp_path}


def run_setup(stubs, *args, extra_env=None):
    env = dict(stubs["env"], **(extra_env or {}))
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)


def calls(stubs) -> list[str]:
    log = stubs["log"]
    return log.read_text().splitlines() if log.exists() else []


def expected_size(url: str) -> int:
    return 100 + len(url)


def script_models() -> list[tuple[str, str, str]]:
    text = SCRIPT.read_text()
    block = re.search(r"^MODELS=\((.*?)^\)", text, re.S | re.M).group(1)
    return [tuple(entry.split("|")) for entry in re.findall(r'"([^"]+)"', block)]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ------------------------------------------------------------------------------------------------


def test_help_and_argument_errors(stubs):
    result = run_setup(stubs, "--help")
    assert result.returncode == 0 and "WORKSPACE" in result.stdout and "--reuse" in result.stdout
    cases = [
        ((), "missing WORKSPACE"),
        (("--gpu", "tpu", stubs["tmp"] / "ws"), "--gpu must be nvidia, amd, m-series or cpu"),
        (("--gpu",), "--gpu needs a value"),
        (("--frobnicate", stubs["tmp"] / "ws"), "unknown option --frobnicate"),
        ((stubs["tmp"] / "a", stubs["tmp"] / "b"), "only one WORKSPACE"),
    ]
    for args, message in cases:
        result = run_setup(stubs, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert not result.stderr.rstrip().endswith(" 2"), result.stderr  # no exit code glued to the message
    assert calls(stubs) == []
    assert not (stubs["tmp"] / "ws").exists()


def test_fresh_install_lays_out_comfyui_with_fastwan_and_launches(stubs):
    workspace = stubs["tmp"] / "ComfyUI"
    result = run_setup(stubs, "--gpu", "cpu", workspace, "--", "--port", "8190")
    assert result.returncode == 0, result.stderr
    log = calls(stubs)
    comfy_calls = [line for line in log if line.startswith("comfy ")]
    assert comfy_calls == [f"comfy --skip-prompt --workspace {workspace} install --cpu",
                           f"comfy --skip-prompt --workspace {workspace} launch -- --port 8190"]
    link = workspace / "custom_nodes" / "ComfyUI-FastWan"
    assert link.is_symlink() and link.resolve() == REPO.resolve()
    assert (link / "workflows" / "fastwan_t2v_480p.json").is_file()
    for name, folder, url in script_models():
        path = workspace / "models" / folder / name
        assert path.stat().st_size == expected_size(url), name
    models = workspace / "models"
    assert {str(p.relative_to(models)) for p in models.rglob("*.safetensors")} == MODEL_FILES
    assert not list(workspace.rglob("*.part"))
    (pip_call,) = [line for line in log if line.startswith("python ")]
    assert pip_call.startswith("python -m pip install") and "imageio-ffmpeg" in pip_call
    assert "torch" not in pip_call.split("install", 1)[1]  # ComfyUI's own torch build stays


def test_refuses_to_clobber_an_existing_workspace(stubs):
    workspace = stubs["tmp"] / "mine"
    workspace.mkdir()
    (workspace / "precious.txt").write_text("keep me")
    before = tree(workspace)
    result = run_setup(stubs, "--gpu", "cpu", workspace)
    assert result.returncode == 3
    assert "not empty" in result.stderr and "--reuse" in result.stderr and str(workspace) in result.stderr
    assert tree(workspace) == before and (workspace / "precious.txt").read_text() == "keep me"
    assert calls(stubs) == []

    a_file = stubs["tmp"] / "a-file"
    a_file.write_text("x")
    result = run_setup(stubs, "--gpu", "cpu", a_file)
    assert result.returncode == 3 and "not a folder" in result.stderr


def test_an_empty_folder_is_a_fine_workspace(stubs):
    workspace = stubs["tmp"] / "empty"
    workspace.mkdir()
    result = run_setup(stubs, "--gpu", "nvidia", "--no-launch", workspace)
    assert result.returncode == 0, result.stderr
    assert [line for line in calls(stubs) if line.startswith("comfy ")] == [
        f"comfy --skip-prompt --workspace {workspace} install --nvidia"]


def test_reuse_keeps_good_files_and_replaces_wrong_sized_ones(stubs):
    workspace = stubs["tmp"] / "ComfyUI"
    assert run_setup(stubs, "--gpu", "cpu", "--no-launch", workspace).returncode == 0
    models = {folder: (workspace / "models" / folder / name, url) for name, folder, url in script_models()}
    vae_path, vae_url = models["vae"]
    vae_path.write_bytes(b"truncated")
    stubs["log"].unlink()
    result = run_setup(stubs, "--reuse", "--no-launch", workspace)
    assert result.returncode == 0, result.stderr
    gets = [line for line in calls(stubs) if line.startswith("downloader get")]
    assert gets == [f"downloader get {vae_url} {vae_path}.part"]
    assert vae_path.stat().st_size == expected_size(vae_url)
    assert "keeping diffusion_models/fastwan2.1_t2v_1.3B_bf16.safetensors" in result.stdout
    assert not any(line.startswith("comfy ") and " install" in line for line in calls(stubs))


def test_reuse_needs_a_comfyui_and_never_replaces_a_foreign_node_folder(stubs):
    not_comfy = stubs["tmp"] / "notcomfy"
    not_comfy.mkdir()
    result = run_setup(stubs, "--reuse", not_comfy)
    assert result.returncode == 3 and "is not a ComfyUI folder" in result.stderr

    workspace = stubs["tmp"] / "ComfyUI"
    assert run_setup(stubs, "--gpu", "cpu", "--no-launch", workspace).returncode == 0
    link = workspace / "custom_nodes" / "ComfyUI-FastWan"
    link.unlink()
    link.mkdir()
    (link / "other.py").write_text("# someone else's node")
    result = run_setup(stubs, "--reuse", workspace)
    assert result.returncode == 3 and "is not this repository" in result.stderr
    assert (link / "other.py").is_file()


def test_a_failed_download_leaves_no_model_file(stubs):
    workspace = stubs["tmp"] / "ComfyUI"
    result = run_setup(stubs, "--gpu", "cpu", "--no-launch", workspace, extra_env={"STUB_DOWNLOAD_FAILS": "1"})
    assert result.returncode == 5
    assert "failed" in result.stderr and "run the same command again" in result.stderr
    assert not list((workspace / "models").rglob("*.safetensors"))


def test_dry_run_changes_nothing(stubs):
    workspace = stubs["tmp"] / "ComfyUI"
    result = run_setup(stubs, "--gpu", "cpu", workspace, extra_env={"FASTWAN_SETUP_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    assert not workspace.exists()
    assert "would run:" in result.stdout and "install --cpu" in result.stdout and "launch" in result.stdout
    assert not any(line.startswith(("comfy ", "downloader get")) for line in calls(stubs))


def test_script_downloads_what_the_workflow_asks_for():
    workflow = json.loads((REPO / "workflows" / "fastwan_t2v_480p.json").read_text())
    wanted = {(m["name"], m["directory"], m["url"].split("?")[0])
              for node in workflow["nodes"] for m in node.get("properties", {}).get("models", [])}
    assert set(script_models()) == wanted
