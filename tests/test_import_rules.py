"""The package's layers import only downwards: kernels <- fastwan_core <- {nodes, training}.

kernels/ imports nothing of ours outside kernels/; fastwan_core imports neither nodes nor training;
nodes and training never import each other. Read from the sources with ``ast`` (every import,
including those inside functions), so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `fastwan`
PACKAGE = "fastwan"

# layer -> the layers of ours it may import (besides itself)
ALLOWED = {
    "kernels": set(),
    "fastwan_core": {"kernels"},
    "nodes": {"kernels", "fastwan_core"},
    "training": {"kernels", "fastwan_core"},
}


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the file of ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            # `from . import x` may import a submodule x: count each name as one.
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
            found += [(node.lineno, name) for name in names]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Imports in ``source`` (the file of ``module``, e.g. ``fastwan.kernels.vsa.ops``) that break the layers."""
    layer = module.split(".")[1]
    allowed = ALLOWED[layer] | {layer}
    bad = []
    for line, name in imported_modules(source, module, is_package):
        parts = name.split(".")
        if parts[0] != PACKAGE:
            continue  # not ours (the top-level `kernels` is Hugging Face's package, not this folder)
        target = parts[1] if len(parts) > 1 else PACKAGE
        if target not in allowed:
            bad.append(f"{module}:{line} imports {name}")
    return bad


def _sources(layer: str):
    for path in sorted((ROOT / layer).rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        is_package = relative.name == "__init__"
        parts = relative.parts[:-1] if is_package else relative.parts
        yield path, ".".join((PACKAGE, *parts)), is_package


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_the_layers_below(layer):
    files = list(_sources(layer))
    assert files, f"no sources found under {layer}/"
    bad = [v for path, module, is_package in files for v in violations(path.read_text(), module, is_package)]
    assert not bad, "imports against the layering kernels <- fastwan_core <- {nodes, training}:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, module, is_package",
    [
        ("from ...fastwan_core.errors import InputError", "fastwan.kernels.vsa.ops", False),
        ("def f():\n    from ..training import dmd", "fastwan.fastwan_core.model", False),
        ("from .. import nodes", "fastwan.fastwan_core", True),
        ("import fastwan.training.trainer", "fastwan.nodes.sampler_node", False),
        ("from fastwan.nodes import model_nodes", "fastwan.training.trainer", False),
        ("from ... import cli", "fastwan.kernels.vsa.ops", False),
    ],
)
def test_a_violating_import_is_reported(source, module, is_package):
    assert len(violations(source, module, is_package)) == 1


@pytest.mark.parametrize(
    "source, module, is_package",
    [
        ("from ..errors import InputError\nfrom . import triton_vsa", "fastwan.kernels.vsa.ops", False),
        ("from ..kernels.vsa import TileLayout\nfrom .errors import InputError", "fastwan.fastwan_core.model", False),
        ("import torch\nimport kernels", "fastwan.kernels.vsa.ops", False),
        ("from ..fastwan_core import WanDiT", "fastwan.training.trainer", False),
    ],
)
def test_allowed_imports_pass(source, module, is_package):
    assert violations(source, module, is_package) == []
