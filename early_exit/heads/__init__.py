"""Exit head types and their registry."""

from .layer import (
    HEAD_TYPES,
    ExitHead,
    LinearHead,
    LogitLensHead,
    ResidualAdapterHead,
    build_head,
    exit_logits,
    register_head_type,
)

__all__ = [
    "HEAD_TYPES",
    "ExitHead",
    "LinearHead",
    "LogitLensHead",
    "ResidualAdapterHead",
    "build_head",
    "exit_logits",
    "register_head_type",
]
