"""Calibrating exit thresholds: per-token scores, the cascade policy, Learn-then-Test, and writing the table that
decoding reads (`early_exit.generation.thresholds`)."""

from ..generation.thresholds import (
    CalibrationTable,
    ExitCosts,
    PolicyOutcome,
    select_budget_thresholds,
    select_thresholds,
    store_calibration,
)
from .calibrate import (
    DEFAULT_LEVELS,
    METHODS,
    binomial_cdf,
    calibrate_budget,
    calibrate_level,
    calibrate_table,
    candidate_thresholds,
    evaluate_policy,
    exit_positions,
    minimum_tokens,
    policy_curve,
    threshold_family,
)
from .costs import measure_exit_costs
from .on_policy import (
    DEFAULT_ROUNDS,
    FreeGeneration,
    GeneratedText,
    agreeing_tokens,
    calibrate_on_policy,
    free_generation,
    policy_options,
)
from .scores import ExitScores, collect_exit_scores

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_ROUNDS",
    "METHODS",
    "CalibrationTable",
    "ExitCosts",
    "ExitScores",
    "FreeGeneration",
    "GeneratedText",
    "agreeing_tokens",
    "PolicyOutcome",
    "binomial_cdf",
    "calibrate_budget",
    "calibrate_level",
    "calibrate_on_policy",
    "calibrate_table",
    "candidate_thresholds",
    "collect_exit_scores",
    "evaluate_policy",
    "exit_positions",
    "free_generation",
    "measure_exit_costs",
    "minimum_tokens",
    "policy_curve",
    "policy_options",
    "select_budget_thresholds",
    "select_thresholds",
    "store_calibration",
    "threshold_family",
]
