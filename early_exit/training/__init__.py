"""Self-supervised training of exit heads."""

from .loss import WEIGHTING_SCHEMES, exit_distillation_loss, exit_weights

__all__ = ["WEIGHTING_SCHEMES", "exit_distillation_loss", "exit_weights"]
