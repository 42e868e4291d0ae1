"""Confidence metrics: how sure an exit is of its token, by name in a registry users can add to."""

from .metrics import (
    CONFIDENCE_METRICS,
    ConfidenceMetric,
    get_confidence_metric,
    register_confidence_metric,
)

__all__ = ["CONFIDENCE_METRICS", "ConfidenceMetric", "get_confidence_metric", "register_confidence_metric"]
