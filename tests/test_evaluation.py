"""Per-exit agreement counting and the oracle bound."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import early_exit
from early_exit.training import measure_agreement


@torch.no_grad()
def test_agreement_counts_only_the_chosen_positions_and_accumulates():
    model = early_exit.add_exit_heads(tiny_model("llama", num_hidden_layers=6), [2, 4, 5], head_type="logit_lens")
    torch.manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (4, 10))
    positions = torch.rand(4, 10) < 0.6
    output = model(input_ids)
    final = output.logits.argmax(-1)
    hits = [(logits.argmax(-1) == final)[positions] for logits in output.exit_logits]

    whole = measure_agreement(model, input_ids, positions)
    # The seed gives hits, misses and tokens no exit gets right, so every branch of the counting is exercised.
    assert 0 < min(whole.agreeing) and max(whole.agreeing) < whole.tokens
    assert 0 < len(whole.earliest_exit_layers) < whole.tokens
    assert whole.tokens == int(positions.sum())
    assert whole.agreeing == [int(h.sum()) for h in hits]
    # Oracle: each counted position leaves at its first agreeing exit, or runs all 6 layers.
    earliest = [
        next((layer for layer, h in zip([2, 4, 5], column) if h), 6) for column in zip(*[h.tolist() for h in hits])
    ]
    assert abs(whole.oracle_mean_layers - sum(earliest) / len(earliest)) < 1e-9

    halves = measure_agreement(model, input_ids[:2], positions[:2])
    halves = measure_agreement(model, input_ids[2:], positions[2:], into=halves)
    assert (halves.tokens, halves.agreeing, sorted(halves.earliest_exit_layers)) == (
        whole.tokens,
        whole.agreeing,
        sorted(whole.earliest_exit_layers),
    )


@torch.no_grad()
def test_kl_sums_are_each_exits_kl_from_the_final_layer_over_the_counted_positions():
    model = early_exit.add_exit_heads(tiny_model("llama", num_hidden_layers=6), [2, 4, 5], head_type="logit_lens")
    torch.manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 9))
    positions = torch.rand(3, 9) < 0.7
    output = model(input_ids)
    final = output.logits.log_softmax(-1)
    expected = [
        float((final.exp() * (final - logits.log_softmax(-1))).sum(-1)[positions].sum())
        for logits in output.exit_logits
    ]
    result = measure_agreement(model, input_ids, positions)
    # float32 sums of differences of near terms: relative, not exact, equality.
    assert result.kl_sums == [pytest.approx(value, rel=1e-4) for value in expected]
    # Exits' logits may come from a generator, made one at a time (as the held-out evaluation passes them).
    once = early_exit.training.ExitAgreement(model.exit_layers, model.num_layers)
    once.add((logits for logits in output.exit_logits), output.logits, positions)
    assert (once.agreeing, once.kl_sums) == (result.agreeing, result.kl_sums)
