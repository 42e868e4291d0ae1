"""Dynamic vocabulary pruning at early exits."""

from .vocab import VocabPruner, VocabPruningConfig, VocabPruningError, project_rows, scatter_to_vocabulary

__all__ = ["VocabPruner", "VocabPruningConfig", "VocabPruningError", "project_rows", "scatter_to_vocabulary"]
