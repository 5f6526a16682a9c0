"""Error base types, at the lowest layer so that the kernels need nothing from the rest of the package.

Each message says what is wrong, where, and how to fix it. ``fastwan_core.errors`` re-exports these.
"""


class FastWanError(Exception):
    """Base class for errors a user of FastWan can hit and fix."""


class InputError(FastWanError, ValueError):
    """A user-supplied value (size, frame count, prompt, option) is invalid."""
