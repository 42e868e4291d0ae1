"""Self-supervised training of exit heads: the distillation loss, `EarlyExitTrainer`, the hidden-state cache."""

from .hidden_cache import HiddenStateCache, estimate_cache_bytes
from .loss import WEIGHTING_SCHEMES, exit_distillation_loss, exit_weights
from .trainer import DistillationCollator, EarlyExitTrainer, EarlyExitTrainingArguments

__all__ = [
    "WEIGHTING_SCHEMES",
    "DistillationCollator",
    "EarlyExitTrainer",
    "EarlyExitTrainingArguments",
    "HiddenStateCache",
    "estimate_cache_bytes",
    "exit_distillation_loss",
    "exit_weights",
]
