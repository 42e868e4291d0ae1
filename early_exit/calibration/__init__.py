"""Calibrating exit thresholds: per-token scores, the cascade policy, Learn-then-Test, and the config's table."""

from .calibrate import (
    DEFAULT_LEVELS,
    METHODS,
    CalibrationError,
    PolicyOutcome,
    binomial_cdf,
    calibrate_budget,
    calibrate_level,
    candidate_thresholds,
    evaluate_policy,
    exit_positions,
    minimum_tokens,
    policy_curve,
    threshold_family,
)
from .scores import ExitScores, collect_exit_scores
from .table import CalibrationTable, calibrate_table, select_thresholds, store_calibration

__all__ = [
    "DEFAULT_LEVELS",
    "METHODS",
    "CalibrationError",
    "CalibrationTable",
    "ExitScores",
    "PolicyOutcome",
    "binomial_cdf",
    "calibrate_budget",
    "calibrate_level",
    "calibrate_table",
    "candidate_thresholds",
    "collect_exit_scores",
    "evaluate_policy",
    "exit_positions",
    "minimum_tokens",
    "policy_curve",
    "select_thresholds",
    "store_calibration",
    "threshold_family",
]
