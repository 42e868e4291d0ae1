"""Self-supervised training of exit heads: the distillation loss, `EarlyExitTrainer`, the hidden-state cache, and
the agreement measures that evaluate heads."""

from .curve import TrainingCurve, TrainingCurvePoint
from .evaluation import ExitAgreement, held_out_agreement, measure_agreement
from .hidden_cache import HiddenStateCache, estimate_cache_bytes
from .loss import WEIGHTING_SCHEMES, exit_distillation_loss, exit_weights
from .trainer import EarlyExitTrainer, EarlyExitTrainingArguments

__all__ = [
    "WEIGHTING_SCHEMES",
    "EarlyExitTrainer",
    "EarlyExitTrainingArguments",
    "ExitAgreement",
    "HiddenStateCache",
    "TrainingCurve",
    "TrainingCurvePoint",
    "estimate_cache_bytes",
    "exit_distillation_loss",
    "exit_weights",
    "held_out_agreement",
    "measure_agreement",
]
