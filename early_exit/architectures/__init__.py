"""Per-architecture layer-by-layer access to causal LMs (see `DecoderAdapter`)."""

from .base import FULL_ATTENTION, SLIDING_ATTENTION, DecoderAdapter, LayerInputs
from .registry import ARCHITECTURES, get_decoder_adapter, register_architecture, supported_model_types, unwrap_model

# Imported for their registrations.
from . import absolute, rotary  # noqa: E402,F401  isort: skip

__all__ = [
    "ARCHITECTURES",
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "DecoderAdapter",
    "LayerInputs",
    "get_decoder_adapter",
    "register_architecture",
    "supported_model_types",
    "unwrap_model",
]
