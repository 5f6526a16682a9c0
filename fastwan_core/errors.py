"""User-facing errors. Each message says what is wrong, where, and how to fix it.

The base types live in ``kernels.errors`` (the lowest layer, which imports nothing of ours); they are
re-exported here so that the rest of the package has one place to import errors from.
"""

from ..kernels.errors import FastWanError, InputError

__all__ = ["CheckpointError", "FastWanError", "InputError"]


class CheckpointError(FastWanError):
    """A model file or folder cannot be read as a Wan DiT checkpoint."""
