"""The exit policy a decoding run follows: which exits may emit a token, at what confidence, and over which tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..calibration import select_thresholds
from ..configuration_early_exit import EarlyExitConfig
from ..confidence import ConfidenceMetric, get_confidence_metric
from ..pruning import VocabPruningConfig

#: How the KV cache of layers a token skipped is kept right.
#: "deferred": the skipped layers run the token later, together with the next token that goes deep (exact);
#: "propagate": the skipped layers' keys and values are computed from the exited hidden state (CALM; approximate).
KV_STRATEGIES = ("deferred", "propagate")

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


def resolve_exit_policy(
    config: EarlyExitConfig,
    num_layers: int,
    accuracy_level: float | None = None,
    exit_thresholds: list[float | None] | None = None,
    confidence_metric: str | ConfidenceMetric | None = None,
    min_exit_layer: int | None = None,
    vocab_pruning: VocabPruningConfig | dict | int | bool | None = None,
) -> ExitPolicy:
    """The policy `generate` runs, from its early-exit arguments.

    Args:
        config: the heads' config (exits, calibration table, stored pruning setting).
        num_layers: the base model's depth.
        accuracy_level: agreement with the full model to keep, e.g. 0.95; thresholds come from the calibration
            table (the nearest stricter calibrated level).
        exit_thresholds: explicit thresholds, one per exit (`None` or `inf`: never exit there), instead of a level.
        confidence_metric: the metric to use (default: the calibration's default metric, else "max_prob").
        min_exit_layer: exits before this layer never emit.
        vocab_pruning: a `VocabPruningConfig` (or its dict, or an int top-k); `None` uses `config.vocab_pruning`,
            `False` turns pruning off.

    Without `accuracy_level` and `exit_thresholds` every token runs to full depth.

    Raises:
        ValueError: both a level and thresholds, thresholds of the wrong length or NaN, or a minimum layer outside
            the model.
        CalibrationError: a level the heads are not calibrated for (with this metric and pruning).
    """
    exits = list(config.exit_layers)
    if accuracy_level is not None and exit_thresholds is not None:
        raise ValueError("Pass either accuracy_level or exit_thresholds to generate, not both.")
    if vocab_pruning is None:
        vocab_pruning = config.vocab_pruning
    pruning = None if vocab_pruning is False else VocabPruningConfig.from_dict(vocab_pruning)
    metric_name = confidence_metric.name if isinstance(confidence_metric, ConfidenceMetric) else confidence_metric
    if accuracy_level is not None:
        metric_name, thresholds = select_thresholds(config, accuracy_level, metric_name, pruning)
    elif exit_thresholds is not None:
        thresholds = _check_thresholds(exit_thresholds, exits)
        metric_name = metric_name or (config.calibration or {}).get("default_metric") or DEFAULT_METRIC
    else:
        thresholds = [math.inf] * len(exits)
        metric_name = metric_name or DEFAULT_METRIC
    if min_exit_layer is not None:
        if not 1 <= min_exit_layer <= num_layers:
            raise ValueError(f"min_exit_layer={min_exit_layer} is outside the model's layers 1 to {num_layers}.")
        thresholds = [math.inf if layer < min_exit_layer else value for layer, value in zip(exits, thresholds)]
    metric = confidence_metric if isinstance(confidence_metric, ConfidenceMetric) else get_confidence_metric(metric_name)
    return ExitPolicy(exits, thresholds, metric, pruning)


def _check_thresholds(thresholds: list[float | None], exits: list[int]) -> list[float]:
    values = list(thresholds)
    if len(values) != len(exits):
        raise ValueError(
            f"exit_thresholds has {len(values)} values, but the heads have {len(exits)} exits (after layers "
            f"{exits}): give one threshold per exit, None for an exit that should never emit."
        )
    checked = []
    for layer, value in zip(exits, values):
        value = math.inf if value is None else float(value)
        if math.isnan(value):
            raise ValueError(f"The threshold of the exit after layer {layer} is NaN; use None to disable an exit.")
        checked.append(value)
    return checked
