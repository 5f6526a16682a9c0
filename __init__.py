"""FastWan for ComfyUI.

ComfyUI imports this folder as a package under the folder's own name (e.g. `ComfyUI-FastWan`) and
reads NODE_CLASS_MAPPINGS; `pip install -e .` maps the same folder to the package `fastwan`.
Every import inside the package is relative for that reason.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
__version__ = "0.1.0"
