"""Without a CUDA GPU, Triton's kernels run in its CPU interpreter.

``triton.jit`` reads TRITON_INTERPRET when a kernel is defined, and Triton's own library functions
(``tl.sum``, ...) are jitted when triton is imported, so it must be set before anything imports
triton: here, as Triton's tutorials do. With a GPU the kernels compile, and the interpreter-only
tests skip themselves.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
