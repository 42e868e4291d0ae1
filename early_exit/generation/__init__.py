"""Early-exit decoding: the exit policy, the layer-by-layer step with its KV-cache strategies, and `generate`."""

from .decoding import DecodingStatistics, LayerwiseDecoder
from .generate import EarlyExitGenerateOutput, decoding_function, early_exit_sampling
from .policy import KV_STRATEGIES, ExitPolicy, resolve_exit_policy

__all__ = [
    "KV_STRATEGIES",
    "DecodingStatistics",
    "EarlyExitGenerateOutput",
    "ExitPolicy",
    "LayerwiseDecoder",
    "decoding_function",
    "early_exit_sampling",
    "resolve_exit_policy",
]
