"""The exit policy a decoding run follows: which exits may emit a token, at what confidence, and over which tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..confidence import ConfidenceMetric, get_confidence_metric
from ..configuration_early_exit import EarlyExitConfig
from ..errors import InvalidOptionError
from ..pruning import VocabPruningConfig
from .options import ExitDecodingConfig
from .thresholds import select_budget_thresholds, select_thresholds

#: The metric explicit thresholds refer to when none is named and the heads are not calibrated.
DEFAULT_METRIC = "max_prob"


@dataclass
class ExitPolicy:
    """A token leaves at the first exit whose confidence reaches that exit's threshold.

    Attributes:
        exit_layers: the exits, in order.
        thresholds: one per exit; `inf` means the exit never emits.
        metric: the confidence metric the thresholds refer to.
        vocab_pruning: which tokens later exits score (`None`: the full vocabulary everywhere).
    """

    exit_layers: list[int]
    thresholds: list[float]
    metric: ConfidenceMetric
    vocab_pruning: VocabPruningConfig | None = None

    @property
    def active_exits(self) -> list[int]:
        """Indices of the exits that can emit a token."""
        return [index for index, threshold in enumerate(self.thresholds) if threshold != math.inf]

    @property
    def full_depth(self) -> bool:
        """Whether every token runs the whole model (no exit can emit)."""
        return not self.active_exits


def resolve_exit_policy(config: EarlyExitConfig, num_layers: int, options: ExitDecodingConfig) -> ExitPolicy:
    """The policy `generate` runs: `options` (already checked on their own) read against the heads' `config`.

    Without a level, thresholds or a depth budget every token runs to full depth.

    Raises:
        InvalidOptionError: thresholds of the wrong length, or a minimum layer deeper than the model.
        CalibrationError: a level or budget the heads are not calibrated for (with this metric and pruning).
    """
    exits = list(config.exit_layers)
    pruning = options.vocab_pruning
    if pruning is None:
        pruning = VocabPruningConfig.from_dict(config.vocab_pruning)
    elif pruning is False:
        pruning = None
    metric = options.confidence_metric
    metric_name = metric.name if isinstance(metric, ConfidenceMetric) else metric
    if options.accuracy_level is not None:
        metric_name, thresholds = select_thresholds(config, options.accuracy_level, metric_name, pruning)
    elif options.depth_budget is not None:
        metric_name, thresholds = select_budget_thresholds(config, options.depth_budget, metric_name, pruning)
    elif options.exit_thresholds is not None:
        thresholds = list(options.exit_thresholds)
        if len(thresholds) != len(exits):
            raise InvalidOptionError(
                f"exit_thresholds has {len(thresholds)} values, but the heads have {len(exits)} exits (after layers "
                f"{exits}): give one threshold per exit, None for an exit that should never emit."
            )
        metric_name = metric_name or (config.calibration or {}).get("default_metric") or DEFAULT_METRIC
    else:
        thresholds = [math.inf] * len(exits)
        metric_name = metric_name or DEFAULT_METRIC
    if options.min_exit_layer is not None:
        if options.min_exit_layer > num_layers:
            raise InvalidOptionError(
                f"min_exit_layer={options.min_exit_layer} is outside the model's layers 1 to {num_layers}."
            )
        thresholds = [math.inf if layer < options.min_exit_layer else value for layer, value in zip(exits, thresholds)]
    if not isinstance(metric, ConfidenceMetric):
        metric = get_confidence_metric(metric_name)
    return ExitPolicy(exits, thresholds, metric, pruning)
