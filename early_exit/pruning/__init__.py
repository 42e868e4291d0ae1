"""Dynamic vocabulary pruning at early exits."""

from .vocab import VocabPruner, VocabPruningConfig, scatter_to_vocabulary

__all__ = ["VocabPruner", "VocabPruningConfig", "scatter_to_vocabulary"]
