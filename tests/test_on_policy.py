"""On-policy calibration and free generation: only generated tokens are scored, a settled level's outcome is what
its own greedy generations give, free generation measures agreement on the model's own prefixes, and the interval
is the exact binomial one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_calibration import _trained_tiny_model
from tiny_models import VOCAB

from early_exit.calibration import (
    calibrate_on_policy,
    calibrate_table,
    collect_exit_scores,
    free_generation,
)
from early_exit.calibration.on_policy import clopper_pearson, generate_text
from early_exit.data.corpus import TokenBlocks
from early_exit.errors import InvalidOptionError
from early_exit.generation import ExitDecodingConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model whose heads were trained on its own predictions (as test_calibration trains them)."""
    torch.manual_seed(0)
    return _trained_tiny_model(tmp_path_factory.mktemp("on-policy"))


def _prompts(seed: int, count: int = 8, length: int = 5) -> list[torch.LongTensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length + index % 3,), generator=generator) for index in range(count)]


def _fixed_text_table(model, method: str, levels=(0.6, 0.8)):
    generator = torch.Generator().manual_seed(1)
    blocks = TokenBlocks([torch.randint(3, VOCAB, (24,), generator=generator).tolist() for _ in range(40)])
    return calibrate_table(collect_exit_scores(model, blocks, ["max_prob"]), "max_prob", levels, method)


def test_only_the_generated_positions_are_scored_against_the_full_models_token(model):
    prompts = _prompts(0)
    text, exits = generate_text(model, prompts, ExitDecodingConfig(exit_thresholds=[0.3, 0.3, 0.3]), 6)
    assert [len(ids) - length for ids, length in zip(text.sequences, text.prompt_lengths)] == [len(e) for e in exits]
    scores = collect_exit_scores(model, text, ["max_prob"])
    assert scores.num_tokens == text.num_generated
    expected = []
    with torch.no_grad():
        for ids, length in zip(text.sequences, text.prompt_lengths):
            output = model(ids[None], use_cache=False)
            final = output.logits[0, length - 1 : -1].argmax(-1)
            expected.append(
                torch.stack([logits[0, length - 1 : -1].argmax(-1) == final for logits in output.exit_logits], 1)
            )
    assert torch.equal(scores.correct, torch.cat(expected))


def test_free_generation_at_full_depth_agrees_everywhere(model):
    result = free_generation(model, _prompts(1), ExitDecodingConfig(), 5)
    assert result.agreement == 1.0 and result.mean_layers == model.num_layers
    assert result.interval[1] == 1.0 and result.interval[0] < 1.0


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_on_policy_levels_hold_on_their_own_greedy_generations(model, seed):
    """Thresholds only tighten from the fixed-text ones, and a settled level's thresholds, run greedily from the same
    prompts, write (up to scores that land on a threshold within float rounding) the text its outcome was measured
    on again: the same number of tokens, and agreement close to the outcome's."""
    prompts = _prompts(seed)
    start = _fixed_text_table(model, "empirical")
    table = calibrate_on_policy(model, prompts, start, method="empirical", max_new_tokens=8, rounds=4)
    assert table.on_policy.keys() == {"0.6", "0.8"}
    assert any(record["settled"] for record in table.on_policy.values())  # tightening converges
    for level, outcome in table.levels.items():
        record = table.on_policy[f"{level:g}"]
        assert record["settled"] == (record["changed"] == 0.0)
        assert record["settled"] or record["rounds"] == 4
        assert all(new >= old for new, old in zip(outcome.thresholds, start.levels[level].thresholds, strict=True))
        if record["settled"]:
            options = ExitDecodingConfig(exit_thresholds=outcome.thresholds, confidence_metric="max_prob")
            measured = free_generation(model, prompts, options, 8)
            assert measured.tokens == pytest.approx(record["tokens"], rel=0.1)
            assert measured.agreement == pytest.approx(outcome.accuracy, abs=0.1)


def test_rounds_must_be_positive(model):
    with pytest.raises(InvalidOptionError, match="rounds must be a positive integer"):
        calibrate_on_policy(model, _prompts(0), _fixed_text_table(model, "empirical"), rounds=0)


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [(0, 10, (0.0, 0.30850)), (5, 10, (0.18709, 0.81291)), (10, 10, (0.69150, 1.0)), (95, 100, (0.88716, 0.98357))],
)
def test_clopper_pearson_is_the_exact_binomial_interval(successes, trials, expected):
    lower, upper = clopper_pearson(successes, trials)
    assert lower == pytest.approx(expected[0], abs=1e-4) and upper == pytest.approx(expected[1], abs=1e-4)
    assert math.isclose(lower, 0.0) or lower < successes / trials < upper or upper == 1.0
