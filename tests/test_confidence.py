"""Confidence metrics: what each measures, stability in half precision, pruned vocabularies, and the registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from early_exit.confidence import CONFIDENCE_METRICS, get_confidence_metric, register_confidence_metric


def test_built_in_metrics_on_a_known_distribution():
    probabilities = torch.tensor([[0.7, 0.2, 0.1]])
    logits = probabilities.log()
    assert get_confidence_metric("max_prob")(logits).item() == pytest.approx(0.7)
    assert get_confidence_metric("margin")(logits).item() == pytest.approx(0.5)
    entropy = -(probabilities * probabilities.log()).sum()
    assert get_confidence_metric("entropy")(logits).item() == pytest.approx(-entropy.item())


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(0.1, 300.0),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    metric=st.sampled_from(["max_prob", "margin", "entropy"]),
)
def test_metrics_are_stable_in_half_precision(scale, seed, dtype, metric):
    """Large half-precision logits (which overflow a naive exp) give the float32 answer of the rounded logits."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(seed)) * scale
    half = logits.to(dtype)
    scores = get_confidence_metric(metric)(half)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, get_confidence_metric(metric)(half.float()), rtol=1e-3, atol=1e-3)


def test_with_a_pruned_vocabulary_metrics_read_the_kept_tokens_as_a_distribution():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 3
    kept = logits.topk(8, dim=-1).indices
    pruned = logits.gather(-1, kept)
    renormalised = logits.softmax(-1).gather(-1, kept)
    renormalised = renormalised / renormalised.sum(-1, keepdim=True)
    torch.testing.assert_close(get_confidence_metric("max_prob")(pruned), renormalised.amax(-1))


def test_saturation_compares_consecutive_exit_states():
    metric = get_confidence_metric("saturation")
    state = torch.randn(2, 5, 16)
    logits = torch.randn(2, 5, 10)
    torch.testing.assert_close(metric(logits, state, state), torch.ones(2, 5))
    torch.testing.assert_close(metric(logits, state, -state), -torch.ones(2, 5))
    assert (metric(logits, state, None) == -1).all()  # the first exit has nothing to compare with
    with pytest.raises(ValueError, match="hidden state"):
        metric(logits)


def test_users_register_metrics_by_name():
    @register_confidence_metric("test_logit_gap")
    def logit_gap(logits, hidden, previous_hidden):
        top = logits.float().topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]

    try:
        assert get_confidence_metric("test_logit_gap")(torch.tensor([[3.0, 1.0, 0.5]])).item() == pytest.approx(2.0)
    finally:
        CONFIDENCE_METRICS.unregister("test_logit_gap")
    with pytest.raises(ValueError, match="Known confidence metrics: entropy, margin, max_prob, saturation"):
        get_confidence_metric("test_logit_gap")
