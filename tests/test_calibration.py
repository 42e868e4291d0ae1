"""Calibration: the cascade policy, the Learn-then-Test guarantee, budgets, the config's table, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import early_exit
from early_exit.calibration import (
    ExitScores,
    binomial_cdf,
    calibrate_budget,
    calibrate_level,
    calibrate_table,
    collect_exit_scores,
    costs,
    evaluate_policy,
    exit_positions,
    measure_exit_costs,
    minimum_tokens,
    select_budget_thresholds,
    select_thresholds,
    store_calibration,
)
from early_exit.confidence import CONFIDENCE_METRICS, register_confidence_metric
from early_exit.data.corpus import TokenBlocks
from early_exit.errors import CalibrationError
from early_exit.generation.thresholds import CalibrationTable, ExitCosts
from early_exit.pruning import VocabPruningConfig
from early_exit.reporting import HeadCosts, head_costs_table
from early_exit.training import EarlyExitTrainer, EarlyExitTrainingArguments


def _synthetic(seed: int, tokens: int, exits: int = 2, sharpness: float = 4.0) -> ExitScores:
    """Scores in [0, 1]; an exit agrees with the full model with probability rising with its score (and depth)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, exits, generator=generator)
    depth_bonus = torch.linspace(0.0, 1.0, exits)
    agree_probability = torch.sigmoid(sharpness * (scores - 0.5) + depth_bonus)
    correct = torch.rand(tokens, exits, generator=generator) < agree_probability
    layers = [2 * (index + 1) for index in range(exits)]
    return ExitScores(layers, 2 * exits + 2, {"score": scores}, correct, torch.arange(tokens))


def test_the_cascade_leaves_at_the_first_exit_that_passes():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.1]])
    correct = torch.tensor([[True, False], [False, False], [False, True]])
    thresholds = torch.tensor([0.5, 0.5])
    assert exit_positions(scores, thresholds).tolist() == [0, 1, 2]
    outcome = evaluate_policy(scores, correct, thresholds, [3, 6], 10)
    assert outcome.accuracy == pytest.approx(2 / 3)  # right, wrong, full depth (right by definition)
    assert outcome.mean_layers == pytest.approx((3 + 6 + 10) / 3)
    assert outcome.exit_counts == [1, 1, 1]


@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.1), (3, 10, 0.1), (7, 20, 0.5), (40, 400, 0.05)])
def test_binomial_cdf_is_exact(k, n, p):
    expected = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
    assert binomial_cdf(k, n, p) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", ["ltt", "empirical"])
def test_each_level_is_kept_on_the_calibration_data_and_stricter_levels_go_deeper(method):
    scores = _synthetic(0, 6000, exits=3)
    outcomes = [calibrate_level(scores, "score", level, method) for level in (0.8, 0.9, 0.95, 0.99)]
    for level, outcome in zip((0.8, 0.9, 0.95, 0.99), outcomes):
        assert outcome.accuracy >= level
    depths = [outcome.mean_layers for outcome in outcomes]
    assert depths == sorted(depths) and depths[0] < scores.num_layers  # some tokens do leave early


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    level=st.sampled_from([0.8, 0.9, 0.95]),
    sharpness=st.floats(1.0, 8.0),
    delta=st.sampled_from([0.05, 0.1, 0.2]),
)
def test_the_learn_then_test_guarantee_holds_in_at_least_1_minus_delta_of_resamplings(seed, level, sharpness, delta):
    """Calibrate on many independent small samples; judge each chosen policy on a large fresh sample from the same
    distribution (its true disagreement, to within a fraction of a point); count how often it breaks the level."""
    population = _synthetic(seed, 200_000, sharpness=sharpness)
    resamplings, violations = 40, 0
    for index in range(resamplings):
        sample = _synthetic(seed * 1000 + index + 1, 600, sharpness=sharpness)
        outcome = calibrate_level(sample, "score", level, "ltt", delta)
        true = evaluate_policy(
            population.scores["score"], population.correct, torch.tensor(outcome.thresholds), [2, 4], 6
        )
        violations += true.accuracy < level
    # Violations are Binomial(resamplings, p) with p <= delta when the guarantee holds: a count this high must not
    # be implausible under p = delta (one in a thousand). A method without the guarantee fails about half the time.
    assert 1.0 - binomial_cdf(violations - 1, resamplings, delta) > 1e-3, (violations, resamplings)


def _costs(exits: int, head_ms: float) -> ExitCosts:
    return ExitCosts(layer_ms=1.0, carry_fraction=0.0, head_ms=[head_ms] * exits, final_head_ms=0.0)


def test_an_exit_that_costs_more_than_it_saves_is_not_scored():
    scores = _synthetic(2, 6000, exits=3)
    # The middle exit is sure and right on 1% of tokens, unsure and wrong on the rest: calibrated by depth it emits
    # there (it saves layers), but it saves 2 layers on 1% of tokens and costs every token that reaches it 0.5.
    rare = torch.arange(scores.num_tokens) % 100 == 0
    scores.scores["score"][:, 1] = rare.float()
    scores.correct[:, 1] = rare
    by_depth = calibrate_level(scores, "score", 0.9, "ltt")
    assert math.isfinite(by_depth.thresholds[1]) and by_depth.exit_counts[1] > 0
    costly = calibrate_level(scores, "score", 0.9, "ltt", costs=_costs(3, head_ms=0.5))
    assert math.isinf(costly.thresholds[1]) and costly.exit_counts[1] == 0
    assert costly.accuracy >= 0.9
    scored_anyway = costly.thresholds.copy()
    scored_anyway[1] = 2.0  # scored, never confident: same tokens leave where they did, and each pays its head
    worse = evaluate_policy(
        scores.scores["score"], scores.correct, torch.tensor(scored_anyway), scores.exit_layers, 8, _costs(3, 0.5)
    )
    assert worse.ms_per_token > costly.ms_per_token and worse.exit_counts == costly.exit_counts


def test_when_no_exit_pays_for_itself_cost_aware_calibration_runs_at_full_depth():
    scores = _synthetic(4, 6000, exits=3)
    outcome = calibrate_level(scores, "score", 0.9, "ltt", costs=_costs(3, head_ms=50.0))
    assert all(math.isinf(value) for value in outcome.thresholds) and outcome.accuracy == 1.0
    assert outcome.ms_per_token == pytest.approx(scores.num_layers * 1.0)  # the layers, and no head at all


def test_expected_time_counts_layers_skipped_layers_heads_and_the_final_head():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.1]])
    correct = torch.ones(3, 2, dtype=torch.bool)
    costs = ExitCosts(layer_ms=1.0, carry_fraction=0.5, head_ms=[2.0, 0.3], final_head_ms=5.0)
    outcome = evaluate_policy(scores, correct, torch.tensor([0.5, 0.5]), [3, 6], 10, costs)
    # exit 0: 3 layers + 7 carried at half price + its head; exit 1: 6 + 4 * 0.5 + both heads; full: 10 + heads + 5.
    assert outcome.ms_per_token == pytest.approx((3 + 3.5 + 2.0 + 6 + 2.0 + 2.3 + 10 + 2.3 + 5) / 3)
    # Exit 0 silenced: only exit 1's head is paid (tokens 0 and 2 run to full depth)...
    silenced = torch.tensor([math.inf, 0.5])
    assert evaluate_policy(scores, correct, silenced, [3, 6], 10, costs).ms_per_token == pytest.approx(
        (10 + 0.3 + 5 + 6 + 2.0 + 0.3 + 10 + 0.3 + 5) / 3
    )
    # ...unless exit 0 prunes the vocabulary for exit 1: then it runs for every token that reaches it.
    pruning = ExitCosts(layer_ms=1.0, carry_fraction=0.5, head_ms=[2.0, 0.3], final_head_ms=5.0, pruning_exit=0)
    assert evaluate_policy(scores, correct, silenced, [3, 6], 10, pruning).ms_per_token == pytest.approx(
        (10 + 2.3 + 5 + 6 + 2.0 + 2.3 + 10 + 2.3 + 5) / 3
    )


def test_costs_are_measured_per_exit_under_the_pruning_they_will_run_with():
    model = early_exit.add_exit_heads(tiny_model("llama"), [1, 2, 3])
    pruned = measure_exit_costs(model, "max_prob", VocabPruningConfig(top_k=4, prune_at=2), context=16, repeats=3)
    assert pruned.pruning_exit == 1 and len(pruned.head_ms) == 3
    assert pruned.layer_ms > 0 and pruned.final_head_ms > 0 and pruned.carry_fraction >= 0
    assert measure_exit_costs(model, "max_prob", context=16, repeats=3).pruning_exit is None


def test_costs_are_timed_interleaved_and_keep_each_parts_fastest_round(monkeypatch):
    """Every part runs once per round in turn (a burst of load hits all alike), the first round only warms up, and
    each part keeps its fastest round, whatever order its slow rounds came in."""
    durations = {"a": [9.0, 5.0, 3.0, 4.0], "b": [9.0, 2.0, 7.0, 1.0]}  # seconds per round, warm-up first
    clock, calls = [0.0], []

    def work(name: str):
        def run() -> None:
            calls.append(name)
            clock[0] += durations[name][calls.count(name) - 1]

        return run

    monkeypatch.setattr(costs.time, "perf_counter", lambda: clock[0])
    assert costs._milliseconds([work("a"), work("b")], rounds=3) == [3000.0, 1000.0]
    assert calls == ["a", "b"] * 4


def test_the_heads_report_tabulates_each_heads_size_and_cost_relative_to_a_layer():
    model = early_exit.add_exit_heads(tiny_model("llama"), [1, 3], head_type="attention")
    full = ExitCosts(layer_ms=2.0, carry_fraction=0.1, head_ms=[4.0, 3.0], final_head_ms=5.0)
    pruned = ExitCosts(layer_ms=2.0, carry_fraction=0.1, head_ms=[5.0, 1.0], final_head_ms=5.0, pruning_exit=0)
    parameters = [sum(p.numel() for p in head.parameters()) for head in model.exit_heads.values()]
    rows = head_costs_table(HeadCosts(model.exit_layers, parameters, full, pruned, kept=4)).splitlines()
    assert len(rows) == 2 + 2 and "pruned to 4 tokens" in rows[0]
    assert rows[2] == f"| 1 | {parameters[0]:,} | 2.00 | 2.50 (prunes) |"
    assert rows[3] == f"| 3 | {parameters[1]:,} | 1.50 | 0.50 |"
    measured = measure_exit_costs(model, "max_prob", context=16, repeats=3)  # attention heads are timed too
    assert len(measured.head_ms) == 2 and min(measured.head_ms) > 0


def test_cost_aware_tables_record_their_costs():
    scores = _synthetic(3, 6000, exits=3)
    table = calibrate_table(scores, "score", (0.9,), "ltt", costs=_costs(3, head_ms=0.5))
    assert table.costs == _costs(3, head_ms=0.5).to_dict()
    assert CalibrationTable.from_dict(table.to_dict()).levels[0.9].ms_per_token == table.levels[0.9].ms_per_token


def test_budget_mode_finds_the_most_accurate_policy_within_the_depth():
    scores = _synthetic(1, 4000, exits=3)
    outcome = calibrate_budget(scores, "score", mean_layers=5.0)
    assert outcome.mean_layers <= 5.0
    deeper = calibrate_budget(scores, "score", mean_layers=7.0)
    assert deeper.accuracy >= outcome.accuracy
    with pytest.raises(CalibrationError, match="shallowest policy averages"):
        calibrate_budget(scores, "score", mean_layers=0.5)


def test_bad_requests_are_named():
    scores = _synthetic(2, 60)
    needed = minimum_tokens(0.99, 0.1)
    assert needed == 230 and 0.99**needed <= 0.1 < 0.99 ** (needed - 1)
    with pytest.raises(CalibrationError, match=f"needs at least {needed}"):
        calibrate_level(scores, "score", 0.99, "ltt", 0.1)
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(CalibrationError, match="outside \\(0, 1\\)"):
            calibrate_level(scores, "score", level)
    with pytest.raises(ValueError, match="method"):
        calibrate_level(scores, "score", 0.8, "bayes")


def _trained_tiny_model(tmp_path):
    model = early_exit.add_exit_heads(tiny_model("llama", initializer_range=0.3), [1, 2, 3])
    generator = torch.Generator().manual_seed(0)
    blocks = TokenBlocks([torch.randint(0, VOCAB, (32,), generator=generator).tolist() for _ in range(48)])
    args = EarlyExitTrainingArguments(
        str(tmp_path / "trainer"),
        num_train_epochs=8,
        learning_rate=1e-2,
        per_device_train_batch_size=8,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    EarlyExitTrainer(model, args, train_dataset=blocks).train()
    return model.eval()


def _random_blocks(seed, count):
    generator = torch.Generator().manual_seed(seed)
    return TokenBlocks([torch.randint(0, VOCAB, (32,), generator=generator).tolist() for _ in range(count)])


def test_thresholds_keep_their_level_on_held_out_text_for_a_trained_tiny_model(tmp_path):
    model = _trained_tiny_model(tmp_path)
    metrics = ["entropy", "max_prob", "margin", "saturation"]
    calibration = collect_exit_scores(model, _random_blocks(1, 96), metrics, batch_size=8)
    held_out = collect_exit_scores(model, _random_blocks(2, 96), metrics, batch_size=8)
    assert calibration.data_hash != held_out.data_hash
    for metric in metrics:
        table = calibrate_table(calibration, metric, (0.6, 0.8, 0.9))
        for level, outcome in table.levels.items():
            measured = evaluate_policy(
                held_out.scores[metric], held_out.correct, torch.tensor(outcome.thresholds), model.exit_layers, 4
            )
            assert measured.accuracy >= level, (metric, level)
        if metric != "saturation":  # state similarity says little in a random model; the others must pay off
            assert table.levels[0.6].mean_layers < 4, metric


def test_a_user_metric_calibrates_saves_and_loads_with_the_heads(tmp_path):
    @register_confidence_metric("test_logit_gap")
    def logit_gap(logits, hidden, previous_hidden):
        top = logits.float().topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]

    try:
        tiny_model("llama", initializer_range=0.3).save_pretrained(tmp_path / "base")
        model = early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), [1, 2, 3])
        scores = collect_exit_scores(model, _random_blocks(1, 64), ["test_logit_gap", "entropy"], batch_size=8)
        tables = [calibrate_table(scores, name, (0.7, 0.9)) for name in ("test_logit_gap", "entropy")]
        store_calibration(model.config, tables, default_metric="test_logit_gap")
        model.save_pretrained(tmp_path / "heads")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
        metric, thresholds = select_thresholds(again.config, 0.85)  # the next stricter level: 0.9
        assert metric == "test_logit_gap"
        assert thresholds == tables[0].levels[0.9].thresholds
        assert select_thresholds(again.config, 0.7, "entropy")[1] == tables[1].levels[0.7].thresholds
        with pytest.raises(CalibrationError, match="stricter than every calibrated level"):
            select_thresholds(again.config, 0.95)
        with pytest.raises(CalibrationError, match="calibrated tables: entropy, test_logit_gap"):
            select_thresholds(again.config, 0.9, "margin")
    finally:
        CONFIDENCE_METRICS.unregister("test_logit_gap")


def test_depth_budgets_are_saved_with_the_heads_and_decoding_keeps_within_them(tmp_path):
    tiny_model("llama", initializer_range=0.3).save_pretrained(tmp_path / "base")
    model = early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), [1, 2, 3])
    scores = collect_exit_scores(model, _random_blocks(1, 64), ["max_prob"], batch_size=8)
    table = calibrate_table(scores, "max_prob", (0.9,))
    table.budgets = {budget: calibrate_budget(scores, "max_prob", budget) for budget in (2.5, 3.5)}
    store_calibration(model.config, [table], default_metric="max_prob")
    model.save_pretrained(tmp_path / "heads")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    # The deepest calibrated budget within the one asked for: the most accurate that fits.
    assert select_budget_thresholds(again.config, 3.0) == ("max_prob", table.budgets[2.5].thresholds)
    assert select_budget_thresholds(again.config, 4.0)[1] == table.budgets[3.5].thresholds
    with pytest.raises(CalibrationError, match="No depth budget of 2 layers or less.*calibrated: 2.5, 3.5"):
        select_budget_thresholds(again.config, 2.0)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    common = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    budgeted = again.generate(ids, depth_budget=3.0, **common)
    explicit = again.generate(ids, exit_thresholds=table.budgets[2.5].thresholds, **common)
    assert torch.equal(budgeted.sequences, explicit.sequences)
    assert torch.equal(budgeted.exit_layers, explicit.exit_layers)


def test_uncalibrated_heads_say_how_to_calibrate():
    model = early_exit.add_exit_heads(tiny_model("llama"), [2])
    with pytest.raises(CalibrationError, match="early-exit calibrate"):
        select_thresholds(model.config, 0.9)
    with pytest.raises(CalibrationError, match="outside"):
        select_thresholds(model.config, 1.2)
