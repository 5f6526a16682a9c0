"""User-facing errors. Each message says what is wrong, where, and how to fix it."""


class FastWanError(Exception):
    """Base class for errors a user of FastWan can hit and fix."""


class CheckpointError(FastWanError):
    """A model file or folder cannot be read as a Wan DiT checkpoint."""


class InputError(FastWanError, ValueError):
    """A user-supplied value (size, frame count, prompt, option) is invalid."""
