"""Exceptions raised by early-exit, each naming what was wrong and what to do."""


class EarlyExitError(Exception):
    """Base class of the library's own errors."""


class UnsupportedArchitectureError(EarlyExitError, ValueError):
    """The base model's architecture has no layer-by-layer adapter."""


class HeadMismatchError(EarlyExitError, ValueError):
    """Exit heads do not fit the base model they are attached to."""


class CheckpointError(EarlyExitError, OSError):
    """A heads checkpoint is missing, partial or corrupt."""
