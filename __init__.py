"""FastWan for ComfyUI.

ComfyUI imports this folder as a package under the folder's own name (e.g. `ComfyUI-FastWan`) and
reads NODE_CLASS_MAPPINGS; `pip install -e .` maps the same folder to the package `fastwan`.
Every import inside the package is relative for that reason.
"""
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a lone file, outside any package: pytest does this to the root of a clone whose
    # folder name is not an identifier (`ComfyUI-FastWan`, `tmp.x1`) when it sets up the test tree.
    # There is no package to import the nodes relative to, and no ComfyUI to register them with.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
__version__ = "0.1.0"
