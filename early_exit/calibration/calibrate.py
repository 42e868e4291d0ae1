"""Choosing exit thresholds so that the early-exit policy keeps a stated agreement with the full model.

The policy being calibrated is the one decoding runs: a token leaves at the first exit whose confidence reaches
that exit's threshold, and otherwise runs to full depth (where it agrees with the full model by definition). Its
accuracy is the share of tokens whose emitted token equals the full model's on the same prefix.

Candidate policies form a one-parameter family: for a per-exit precision p, each exit in turn (on the tokens the
earlier exits let through) takes the loosest threshold whose emitted tokens agree at rate at least p. Lowering p
lets more tokens out earlier. Two ways to pick p for an accuracy level:

- "ltt" (Learn then Test, Angelopoulos et al. 2021): the family is built on one half of the calibration data, and
  p is lowered step by step on the other half while a binomial test rejects "disagreement > 1 - level" at
  significance delta (fixed-sequence testing). With probability at least 1 - delta over the calibration data, the
  chosen policy's disagreement rate is at most 1 - level (for tokens exchangeable with the calibration tokens).
- "empirical": the loosest p whose measured accuracy on all calibration data is at least the level.

A budget mode picks instead the most accurate policy of the family whose average depth is within a target.

With measured `ExitCosts`, calibration is cost-aware: an exit that rarely fires costs every token that reaches it
more than it saves, so exits are dropped (never scored) while the expected time per token falls, the subset chosen
on the selection half only; among the policies that keep the level, the one with the least expected time is taken
rather than the shallowest. The pruning exit may stop emitting, but its head still runs (and is charged) while a
later exit may emit, since the later exits' scores were collected with its choice of tokens.
"""

from __future__ import annotations

import math

import torch

from ..errors import CalibrationError
from ..generation.thresholds import CalibrationTable, ExitCosts, PolicyOutcome
from ..pruning import exits_to_score
from .scores import ExitScores

DEFAULT_LEVELS = (0.80, 0.90, 0.95, 0.99)
METHODS = ("ltt", "empirical")
#: Per-exit precisions tried, strictest first (the order fixed-sequence testing needs).
PRECISION_GRID = torch.linspace(1.0, 0.0, 201)


def exit_positions(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For each token (row of `scores`, one column per exit), the index of the exit it leaves at; the number of
    exits means it runs to full depth."""
    passes = scores >= thresholds.to(scores)
    first = passes.int().argmax(dim=1)
    return torch.where(passes.any(dim=1), first, torch.full_like(first, scores.shape[1]))


def evaluate_policy(
    scores: torch.Tensor,
    correct: torch.Tensor,
    thresholds: torch.Tensor,
    exit_layers: list[int],
    num_layers: int,
    costs: ExitCosts | None = None,
) -> PolicyOutcome:
    """Accuracy, average depth and exit counts of the cascade with `thresholds` on these tokens (and, with `costs`,
    its expected time per token)."""
    where = exit_positions(scores, thresholds)
    padded = torch.cat([correct, torch.ones_like(correct[:, :1])], dim=1)  # full depth always agrees
    agrees = padded.gather(1, where[:, None]).squeeze(1)
    layers = torch.tensor([*exit_layers, num_layers], dtype=torch.float64)
    tokens = max(scores.shape[0], 1)
    return PolicyOutcome(
        [float(value) for value in thresholds],
        float(agrees.sum()) / tokens,
        float(layers[where].sum()) / tokens,
        torch.bincount(where, minlength=len(exit_layers) + 1).tolist(),
        None if costs is None else float(_token_ms(where, thresholds, exit_layers, num_layers, costs).mean()),
    )


def _token_ms(
    where: torch.Tensor, thresholds: torch.Tensor, exit_layers: list[int], num_layers: int, costs: ExitCosts
) -> torch.Tensor:
    """Each token's expected decoding time: the layers it runs, the deferred fill of those it skips (carried beside
    a later token), every scored exit it reaches, and the final head if it reaches full depth."""
    may_emit = torch.isfinite(thresholds.double()).nonzero().flatten().tolist()
    head = torch.zeros(len(exit_layers), dtype=torch.float64)
    for index in exits_to_score(may_emit, costs.pruning_exit):  # as decoding runs them
        head[index] = costs.head_ms[index]
    reached = torch.cat([head.cumsum(0), head.sum().reshape(1)])  # heads paid by a token leaving at each position
    layers = torch.tensor([*exit_layers, num_layers], dtype=torch.float64)[where]
    skipped = num_layers - layers
    full_depth = (where == len(exit_layers)).double()
    return (
        layers * costs.layer_ms
        + skipped * costs.layer_ms * costs.carry_fraction
        + reached[where]
        + full_depth * costs.final_head_ms
    )


def threshold_family(
    scores: torch.Tensor, correct: torch.Tensor, precisions: torch.Tensor = PRECISION_GRID
) -> torch.Tensor:
    """(precisions, exits) thresholds: for each per-exit precision p, the cascade where each exit, on the tokens
    that earlier exits let through, takes the loosest threshold whose emitted tokens agree at rate >= p."""
    family = torch.full((len(precisions), scores.shape[1]), math.inf)
    for row, precision in enumerate(precisions.tolist()):
        remaining = torch.ones(scores.shape[0], dtype=torch.bool)
        for column in range(scores.shape[1]):
            values, hits = scores[remaining, column], correct[remaining, column]
            if values.numel() == 0:
                break
            order = values.argsort(descending=True)
            running = hits[order].double().cumsum(0) / torch.arange(1, len(order) + 1)
            passing = (running >= precision - 1e-12).nonzero()
            if len(passing):
                family[row, column] = values[order[passing[-1, 0]]]
                remaining &= scores[:, column] < family[row, column]
    return family


def binomial_cdf(successes: int, trials: int, probability: float) -> float:
    """P(X <= successes) for X ~ Binomial(trials, probability), summed in log space (exact, no SciPy)."""
    if successes >= trials:
        return 1.0
    k = torch.arange(successes + 1, dtype=torch.float64)
    n = torch.tensor(float(trials), dtype=torch.float64)
    log_pmf = (
        torch.lgamma(n + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma(n - k + 1)
        + k * math.log(probability)
        + (n - k) * math.log1p(-probability)
    )
    return float(torch.logsumexp(log_pmf, 0).exp().clamp(max=1.0))


def minimum_tokens(level: float, delta: float) -> int:
    """Fewest test tokens with which a policy making no error at all can be certified at `level` with confidence
    1 - delta: level ** n <= delta."""
    return math.ceil(math.log(delta) / math.log(level))


def _check_level(level: float, delta: float) -> None:
    if not 0.0 < level < 1.0:
        raise CalibrationError(f"Accuracy level {level} is outside (0, 1); use e.g. 0.9 for 90% agreement.")
    if not 0.0 < delta < 1.0:
        raise CalibrationError(f"delta {delta} is outside (0, 1); it is the allowed chance that the guarantee fails.")


def candidate_thresholds(scores: ExitScores, metric: str, method: str = "ltt") -> torch.Tensor:
    """The threshold family `calibrate_level` chooses from: built on all tokens ("empirical") or on the selection
    half ("ltt", even-numbered groups), so that it can be computed once and shared by several levels."""
    if method not in METHODS:
        raise ValueError(f"Unknown calibration method {method!r}; use one of {METHODS}.")
    keep = torch.ones_like(scores.groups, dtype=torch.bool) if method == "empirical" else scores.groups % 2 == 0
    return threshold_family(scores.scores[metric][keep], scores.correct[keep])


def calibrate_level(
    scores: ExitScores,
    metric: str,
    level: float,
    method: str = "ltt",
    delta: float = 0.1,
    family: torch.Tensor | None = None,
    costs: ExitCosts | None = None,
) -> PolicyOutcome:
    """Thresholds for one metric and accuracy level; the outcome reported is measured on all the tokens given.
    `family` is `candidate_thresholds(scores, metric, method)`, computed here when not given. With `costs`, the
    choice is cost-aware (see the module docstring) and `family` is not used: it depends on the exits kept.

    Raises:
        CalibrationError: the level or delta is outside (0, 1), or (method "ltt") the test half has fewer tokens
            than `minimum_tokens(level, delta)`: the message says how many are needed.
        ValueError: an unknown method.
    """
    _check_level(level, delta)
    if method not in METHODS:
        raise ValueError(f"Unknown calibration method {method!r}; use one of {METHODS}.")
    values, correct = scores.scores[metric], scores.correct
    test = scores.groups % 2 == 1
    if method == "ltt" and int(test.sum()) < minimum_tokens(level, delta):
        needed = minimum_tokens(level, delta)
        raise CalibrationError(
            f"Too little calibration data for level {level} at delta {delta}: the test half has "
            f"{int(test.sum())} tokens, and certifying even an error-free policy needs at least {needed} "
            f"(about {2 * needed} tokens in all). Calibrate on more text, or ask for a lower level or a larger delta."
        )
    if costs is not None:
        selection = torch.ones_like(test) if method == "empirical" else ~test
        kept = _cost_aware_exits(scores, metric, level, costs, selection)
        family = _family_over(values[selection], correct[selection], kept)
    elif family is None:
        family = candidate_thresholds(scores, metric, method)

    def outcome_on(rows: torch.Tensor, row: torch.Tensor) -> PolicyOutcome:
        return evaluate_policy(values[rows], correct[rows], row, scores.exit_layers, scores.num_layers, costs)

    everything = torch.ones_like(test)
    if method == "empirical":
        valid = [row for row in family if outcome_on(everything, row).accuracy >= level]
    else:
        valid = []
        for row in family:  # strictest first; stop at the first policy the test cannot certify
            errors = round((1.0 - outcome_on(test, row).accuracy) * int(test.sum()))
            if binomial_cdf(errors, int(test.sum()), 1.0 - level) > delta:
                break
            valid.append(row)
    never_exit = torch.full((len(scores.exit_layers),), math.inf)
    if not valid:  # nothing certified: never exit early
        chosen = never_exit
    elif costs is None:
        chosen = valid[-1]  # the loosest valid policy: the fewest layers
    else:
        # Every valid policy keeps the level, and so does never exiting: the fastest is taken (its time measured on
        # all tokens). Where exits cost more than they save, that is full depth.
        chosen = min([*valid, never_exit], key=lambda row: outcome_on(everything, row).ms_per_token)
    return evaluate_policy(values, correct, chosen, scores.exit_layers, scores.num_layers, costs)


def _family_over(values: torch.Tensor, correct: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The threshold family over the exits `kept` (column indices); the other exits never emit."""
    family = torch.full((len(PRECISION_GRID), values.shape[1]), math.inf)
    family[:, kept] = threshold_family(values[:, kept], correct[:, kept])
    return family


def _cost_aware_exits(scores: ExitScores, metric: str, level: float, costs: ExitCosts, rows: torch.Tensor) -> list[int]:
    """The exits that may emit at `level`, chosen on the tokens `rows` only: starting from all of them, drop the exit
    whose removal lowers the expected time per token most, while one does. A subset's time is that of the loosest
    policy of its family that keeps the level on these tokens."""
    values, correct = scores.scores[metric][rows], scores.correct[rows]

    def best_ms(kept: list[int]) -> float:
        for row in _family_over(values, correct, kept).flip(0):  # loosest first
            outcome = evaluate_policy(values, correct, row, scores.exit_layers, scores.num_layers, costs)
            if outcome.accuracy >= level:
                return outcome.ms_per_token
        return math.inf

    kept = list(range(len(scores.exit_layers)))
    current = best_ms(kept)
    while len(kept) > 1:
        trial_ms, dropped = min((best_ms([k for k in kept if k != dropped]), dropped) for dropped in kept)
        if trial_ms >= current:
            break
        kept.remove(dropped)
        current = trial_ms
    return kept


def policy_curve(scores: ExitScores, metric: str) -> list[PolicyOutcome]:
    """Every policy of the family built on all these tokens, with its accuracy and depth on them: the trade-off
    curve that budget mode chooses from and reports plot."""
    values, correct = scores.scores[metric], scores.correct
    return [
        evaluate_policy(values, correct, row, scores.exit_layers, scores.num_layers)
        for row in candidate_thresholds(scores, metric, "empirical")
    ]


def calibrate_budget(scores: ExitScores, metric: str, mean_layers: float) -> PolicyOutcome:
    """The most accurate policy of the family whose average depth on these tokens is at most `mean_layers`.

    Raises:
        CalibrationError: no policy of the family is that shallow (the message gives the shallowest reachable).
    """
    outcomes = policy_curve(scores, metric)
    within = [outcome for outcome in outcomes if outcome.mean_layers <= mean_layers]
    if not within:
        shallowest = min(outcome.mean_layers for outcome in outcomes)
        raise CalibrationError(
            f"No thresholds reach an average of {mean_layers} layers with these exits; the shallowest policy averages "
            f"{shallowest:.2f} of {scores.num_layers} layers."
        )
    return max(within, key=lambda outcome: (outcome.accuracy, -outcome.mean_layers))


def calibrate_table(
    scores: ExitScores,
    metric: str,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    method: str = "ltt",
    delta: float = 0.1,
    base_model_revision: str | None = None,
    costs: ExitCosts | None = None,
) -> CalibrationTable:
    """Calibrate `metric`'s thresholds for every level in `levels` (see `calibrate_level`, cost-aware with `costs`);
    the table records the vocabulary pruning `scores` were computed with, and the costs."""
    table = CalibrationTable(
        metric,
        method,
        delta if method == "ltt" else None,
        scores.num_tokens,
        scores.data_hash,
        base_model_revision,
        list(scores.exit_layers),
        vocab_pruning=scores.vocab_pruning,
        costs=None if costs is None else costs.to_dict(),
    )
    family = None if costs is not None else candidate_thresholds(scores, metric, method)
    for level in levels:
        table.levels[float(level)] = calibrate_level(scores, metric, level, method, delta, family, costs)
    return table
