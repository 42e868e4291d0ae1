"""Exit head types and their registry."""

from .cache import SlotCache, head_cache_slots, head_inputs, open_head_slots
from .layer import (
    HEAD_TYPES,
    AttentionHead,
    ContextHead,
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
    "AttentionHead",
    "ContextHead",
    "ExitHead",
    "LinearHead",
    "LogitLensHead",
    "ResidualAdapterHead",
    "SlotCache",
    "build_head",
    "exit_logits",
    "head_cache_slots",
    "head_inputs",
    "open_head_slots",
    "register_head_type",
]
