"""Attention kernels (Triton) and their PyTorch references; knows nothing of models.

This folder is the subpackage ``fastwan.kernels`` (or ``<custom node folder>.kernels`` in ComfyUI).
Whenever the repository root itself is on ``sys.path`` (``python -m``, ``python -c`` or a notebook
started in the clone), Python also finds it as a top-level ``kernels`` -- the name of Hugging Face's
``kernels`` package, which transformers and diffusers import. Imported under that name, this file
hands the import over to the real top-level ``kernels`` (or fails as if there were none), so the
clone never shadows it.
"""

if __name__ == "kernels":

    def _hand_over_to_the_real_top_level_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        def same_dir(a: str, b: str) -> bool:
            return os.path.realpath(a or os.curdir) == os.path.realpath(b)

        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        search_path = [entry for entry in sys.path if not same_dir(entry, repo_root)]
        spec = importlib.machinery.PathFinder.find_spec("kernels", search_path)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
        module = importlib.util.module_from_spec(spec)
        # The import system returns whatever sys.modules holds under the name once this file has run.
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _hand_over_to_the_real_top_level_kernels()
