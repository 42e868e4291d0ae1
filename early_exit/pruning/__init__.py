"""Dynamic vocabulary pruning at early exits."""

from .vocab import (
    VocabPruner,
    VocabPruningConfig,
    exits_to_score,
    frequent_tokens,
    scatter_to_vocabulary,
    vocabulary_ids,
)

__all__ = [
    "VocabPruner",
    "VocabPruningConfig",
    "exits_to_score",
    "frequent_tokens",
    "scatter_to_vocabulary",
    "vocabulary_ids",
]
