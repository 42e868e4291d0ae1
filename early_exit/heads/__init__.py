"""Exit head types and their registry."""

from .layer import HEAD_TYPES, ExitHead, LinearHead, LogitLensHead, ResidualAdapterHead, build_head, register_head_type

__all__ = [
    "HEAD_TYPES",
    "ExitHead",
    "LinearHead",
    "LogitLensHead",
    "ResidualAdapterHead",
    "build_head",
    "register_head_type",
]
