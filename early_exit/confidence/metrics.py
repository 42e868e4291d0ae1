"""The confidence metric registry and the built-in metrics.

A metric maps an exit's logits (and, if it asks for them, the exit's hidden state and the previous exit's) to one
score per position, where a higher score means more confident; an exit emits its token when the score reaches the
exit's calibrated threshold. Metrics compute in float32 whatever the logits' dtype, so fp16/bf16 models neither
overflow nor lose the small differences between confident distributions. With vocabulary pruning the logits
passed in are those of the kept tokens only, and the metrics read them as a distribution over those tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import Registry

#: A metric function: (logits, hidden, previous_hidden) -> scores; the last two may be None.
MetricFunction = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class ConfidenceMetric:
    """A named confidence metric.

    Attributes:
        name: the registry name, as calibration tables and `generate` refer to it.
        function: computes scores from `(logits, hidden, previous_hidden)`; higher is more confident.
        needs_hidden_states: whether `function` reads the hidden states (callers then pass them).
    """

    name: str
    function: MetricFunction
    needs_hidden_states: bool = False

    def __call__(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor | None = None,
        previous_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of shape `logits.shape[:-1]`, in float32."""
        if self.needs_hidden_states and hidden is None:
            raise ValueError(f"The confidence metric {self.name!r} needs the exit's hidden state; pass hidden=.")
        return self.function(logits, hidden, previous_hidden).float()


#: Metric name -> `ConfidenceMetric`.
CONFIDENCE_METRICS: Registry[ConfidenceMetric] = Registry(
    "confidence metric", "add one with @early_exit.register_confidence_metric('<name>')."
)


def register_confidence_metric(
    name: str, needs_hidden_states: bool = False
) -> Callable[[MetricFunction], MetricFunction]:
    """Decorator: register `function(logits, hidden, previous_hidden) -> scores` as the metric `name`.

    Example:
        >>> @register_confidence_metric("top2_ratio")
        ... def top2_ratio(logits, hidden, previous_hidden):
        ...     top = logits.float().topk(2, dim=-1).values
        ...     return top[..., 0] - top[..., 1]

    Raises:
        DuplicateNameError: a metric of that name is already registered.
    """

    def decorator(function: MetricFunction) -> MetricFunction:
        CONFIDENCE_METRICS.add(name, ConfidenceMetric(name, function, needs_hidden_states))
        return function

    return decorator


def get_confidence_metric(metric: str | ConfidenceMetric) -> ConfidenceMetric:
    """The registered metric called `metric` (a `ConfidenceMetric` is returned as it is).

    Raises:
        UnknownNameError: no metric has that name; the message lists the known ones.
    """
    return metric if isinstance(metric, ConfidenceMetric) else CONFIDENCE_METRICS[metric]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    # Upcast inside the fused kernel: fp16 logits of a few hundred would overflow exp() before normalisation.
    return logits.log_softmax(-1, dtype=torch.float32)


@register_confidence_metric("max_prob")
def max_prob(logits: torch.Tensor, hidden: torch.Tensor | None, previous_hidden: torch.Tensor | None) -> torch.Tensor:
    """The probability of the most likely token."""
    return _log_probs(logits).amax(-1).exp()


@register_confidence_metric("margin")
def margin(logits: torch.Tensor, hidden: torch.Tensor | None, previous_hidden: torch.Tensor | None) -> torch.Tensor:
    """The probability of the most likely token minus that of the second (CALM's softmax margin)."""
    top = _log_probs(logits).topk(2, dim=-1).values.exp()
    return top[..., 0] - top[..., 1]


@register_confidence_metric("entropy")
def negative_entropy(
    logits: torch.Tensor, hidden: torch.Tensor | None, previous_hidden: torch.Tensor | None
) -> torch.Tensor:
    """Minus the entropy of the distribution (in nats), so that, like the other metrics, higher is surer."""
    log_probs = _log_probs(logits)
    return (log_probs.exp() * log_probs).sum(-1)


@register_confidence_metric("saturation", needs_hidden_states=True)
def saturation(logits: torch.Tensor, hidden: torch.Tensor | None, previous_hidden: torch.Tensor | None) -> torch.Tensor:
    """Cosine similarity of this exit's hidden state with the previous exit's (CALM's state saturation): a state
    that has stopped changing suggests later layers will not change the token. The first exit, with no previous
    state, scores -1 (never confident)."""
    if previous_hidden is None:
        return torch.full(logits.shape[:-1], -1.0, device=logits.device)
    return torch.nn.functional.cosine_similarity(hidden.float(), previous_hidden.float(), dim=-1)
