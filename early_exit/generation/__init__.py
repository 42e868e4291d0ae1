"""Early-exit decoding: the options and the exit policy they resolve to, the layer-by-layer step with its KV-cache
strategies, `generate`, and dynamic self-speculative decoding (drafts from the exits, verified by the full model)."""

from .decoding import DecodingStatistics, LayerwiseDecoder
from .generate import EarlyExitGenerateOutput, decoding_function, early_exit_sampling, generate_with_exits
from .lookup import DEFAULT_LOOKUP_TOKENS, PromptLookup
from .options import DEFAULT_MAX_DRAFT_TOKENS, KV_STRATEGIES, ExitDecodingConfig
from .policy import ExitPolicy, resolve_exit_policy
from .speculative import SpeculativeGenerateOutput, self_speculative_sampling, speculative_decoding_function
from .thresholds import (
    CalibrationTable,
    PolicyOutcome,
    select_budget_thresholds,
    select_thresholds,
    store_calibration,
    table_key,
)

__all__ = [
    "DEFAULT_LOOKUP_TOKENS",
    "DEFAULT_MAX_DRAFT_TOKENS",
    "KV_STRATEGIES",
    "CalibrationTable",
    "DecodingStatistics",
    "EarlyExitGenerateOutput",
    "ExitDecodingConfig",
    "ExitPolicy",
    "LayerwiseDecoder",
    "PolicyOutcome",
    "PromptLookup",
    "SpeculativeGenerateOutput",
    "decoding_function",
    "early_exit_sampling",
    "generate_with_exits",
    "resolve_exit_policy",
    "select_budget_thresholds",
    "select_thresholds",
    "self_speculative_sampling",
    "speculative_decoding_function",
    "store_calibration",
    "table_key",
]
