"""Every exception early-exit raises on purpose, each naming what was wrong and what to do.

All derive from `EarlyExitError`; each also derives from the built-in error a caller would expect (`ValueError`
for bad values, `OSError` for files, `ConnectionError` for the network), so generic handlers keep working.
"""


class EarlyExitError(Exception):
    """Base class of the library's own errors."""


class InvalidOptionError(EarlyExitError, ValueError, TypeError):
    """An argument or setting of the wrong type or out of range (caught by `except ValueError` or `TypeError`)."""


class UnknownNameError(EarlyExitError, KeyError, ValueError):
    """A name that no registry entry has (a head type, confidence metric or architecture)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(EarlyExitError, ValueError):
    """A name registered twice."""


class UnsupportedArchitectureError(UnknownNameError):
    """The base model's architecture has no layer-by-layer adapter."""


class HeadMismatchError(EarlyExitError, ValueError):
    """Exit heads do not fit the base model they are attached to."""


class CheckpointError(EarlyExitError, OSError):
    """A heads checkpoint is missing, partial or corrupt."""


class CalibrationError(EarlyExitError, ValueError):
    """Calibration cannot give what was asked (too little data, or a level or budget out of reach), or decoding
    asked for a level the heads are not calibrated for."""


class VocabPruningError(InvalidOptionError):
    """A vocabulary pruning setting that cannot be used."""


class HubUnreachableError(EarlyExitError, ConnectionError):
    """The Hub could not be reached (no network, or offline mode)."""
