"""Early-exit decoding: the exit policy, the layer-by-layer step with its KV-cache strategies, `generate`, and
dynamic self-speculative decoding (drafts from the exits, verified by the full model)."""

from .decoding import DecodingStatistics, LayerwiseDecoder
from .generate import EarlyExitGenerateOutput, decoding_function, early_exit_sampling
from .policy import KV_STRATEGIES, ExitPolicy, resolve_exit_policy
from .speculative import (
    DEFAULT_MAX_DRAFT_TOKENS,
    SpeculativeGenerateOutput,
    self_speculative_sampling,
    speculative_decoding_function,
)

__all__ = [
    "DEFAULT_MAX_DRAFT_TOKENS",
    "KV_STRATEGIES",
    "DecodingStatistics",
    "EarlyExitGenerateOutput",
    "ExitPolicy",
    "LayerwiseDecoder",
    "decoding_function",
    "early_exit_sampling",
    "SpeculativeGenerateOutput",
    "resolve_exit_policy",
    "self_speculative_sampling",
    "speculative_decoding_function",
]
