"""The package imports cleanly in every way it is used, next to Hugging Face's top-level `kernels` package.

Our `kernels/` folder sits at the repository root, so whenever the root is on `sys.path` (pytest or
`python -m`/`-c` started in the clone, a notebook opened there) Python can also find it as a top-level
`kernels` -- the name transformers and diffusers import for Hugging Face's kernel hub. These tests
import both in fresh interpreters: from the repository root, from elsewhere (the pip-installed
package), and the way ComfyUI loads a custom node folder of any name.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUR_KERNELS = REPO / "kernels" / "__init__.py"


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Prints where the top-level `kernels` came from (or None when Python has none) after transformers'
# kernel-hub integration and our VSA op are both imported in one process.
PROBE = textwrap.dedent("""
    import json, sys
    import transformers
    import transformers.integrations.hub_kernels
    {import_ours}
    try:
        import kernels
        where = kernels.__file__
    except ModuleNotFoundError:
        where = None
    print(json.dumps({{"top_level_kernels": where, "ours": ours}}))
""")

IMPORT_INSTALLED = textwrap.dedent("""
    from fastwan.kernels.vsa import video_sparse_attention
    import fastwan.kernels.vsa as vsa_package
    ours = vsa_package.__file__
""")


def _run_probe(import_ours: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = PROBE.format(import_ours=import_ours.strip())
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_top_level(found: dict) -> None:
    if _hub_kernels_installed():
        assert found["top_level_kernels"] is not None
        assert Path(found["top_level_kernels"]).resolve() != OUR_KERNELS, found
    else:
        assert found["top_level_kernels"] is None, found


def test_from_the_repository_root():
    # `python -c` puts the current directory first on sys.path, as `python -m pytest` does.
    found = _run_probe(IMPORT_INSTALLED, cwd=REPO)
    _check_top_level(found)
    assert Path(found["ours"]).resolve() == REPO / "kernels" / "vsa" / "__init__.py"


def test_installed_package_from_elsewhere(tmp_path):
    found = _run_probe(IMPORT_INSTALLED, cwd=tmp_path)
    _check_top_level(found)
    assert Path(found["ours"]).resolve() == REPO / "kernels" / "vsa" / "__init__.py"


@pytest.mark.parametrize("folder_name", ["ComfyUI-FastWan", "fastwan_nodes"])
def test_as_a_comfyui_custom_node_folder(tmp_path, folder_name):
    # ComfyUI imports custom_nodes/<folder>/__init__.py under the folder's own name, hyphens included,
    # with its own root (not ours) on sys.path.
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / folder_name).symlink_to(REPO, target_is_directory=True)
    load_like_comfyui = textwrap.dedent(f"""
        import importlib, importlib.util, sys
        folder = {str(custom_nodes / folder_name)!r}
        spec = importlib.util.spec_from_file_location({folder_name!r}, folder + "/__init__.py")
        package = importlib.util.module_from_spec(spec)
        sys.modules[{folder_name!r}] = package
        spec.loader.exec_module(package)
        assert package.NODE_CLASS_MAPPINGS, "no nodes registered"
        ours = importlib.import_module({folder_name!r} + ".kernels.vsa").__file__
    """)
    found = _run_probe(load_like_comfyui, cwd=tmp_path)
    _check_top_level(found)
    assert Path(found["ours"]) == custom_nodes / folder_name / "kernels" / "vsa" / "__init__.py"


def test_under_pytest_in_this_process():
    # This process is pytest, started from the repository root by scripts/test.sh.
    import transformers.integrations.hub_kernels  # noqa: F401

    from fastwan.kernels.vsa import video_sparse_attention  # noqa: F401

    if _hub_kernels_installed():
        import kernels

        assert Path(kernels.__file__).resolve() != OUR_KERNELS
    else:
        with pytest.raises(ModuleNotFoundError):
            import kernels  # noqa: F401
