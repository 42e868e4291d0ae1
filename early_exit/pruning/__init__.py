"""Dynamic vocabulary pruning at early exits."""

from .vocab import VocabPruner, VocabPruningConfig, exits_to_score, scatter_to_vocabulary

__all__ = ["VocabPruner", "VocabPruningConfig", "exits_to_score", "scatter_to_vocabulary"]
