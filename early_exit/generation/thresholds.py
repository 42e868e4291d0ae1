"""The thresholds table: accuracy levels to per-exit thresholds, as calibration stores it in the heads' config and
decoding reads it back.

Calibration (`early_exit.calibration`, the tools wing) writes these records; generation reads them. They live here,
beside the runtime that reads them, so that decoding never imports calibration's data collection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..configuration_early_exit import EarlyExitConfig
from ..errors import CalibrationError
from ..pruning import VocabPruningConfig


@dataclass
class ExitCosts:
    """What one decoding step spends where, measured on the machine that calibrated (milliseconds, batch 1).

    Attributes:
        layer_ms: one decoder layer for one position.
        carry_fraction: what one more position adds to a layer's cost, as a fraction of `layer_ms`: the price of
            running a skipped token's deep layers later, beside the next deep token (deferred fill).
        head_ms: per exit, its head and confidence metric over the tokens it scores under the calibrated vocabulary
            pruning (the full vocabulary up to the pruning exit, the kept tokens after it).
        final_head_ms: the final norm and LM head over the full vocabulary, paid by tokens that reach full depth.
        pruning_exit: the index of the pruning exit, which runs its head whenever a later exit may emit (`None`
            without pruning).
    """

    layer_ms: float
    carry_fraction: float
    head_ms: list[float]
    final_head_ms: float
    pruning_exit: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready form, as stored in a calibration table."""
        return asdict(self)


@dataclass
class PolicyOutcome:
    """How a set of thresholds behaves on a set of tokens.

    Attributes:
        thresholds: per exit; a token leaves at the first exit whose score reaches its threshold (`inf`: the exit
            is never scored).
        accuracy: share of tokens whose emitted token is the full model's.
        mean_layers: average number of layers run per token.
        exit_counts: tokens leaving at each exit, then those running to full depth.
        ms_per_token: expected decoding time per token under the calibration's `ExitCosts` (`None` without them).
    """

    thresholds: list[float]
    accuracy: float
    mean_layers: float
    exit_counts: list[int] = field(default_factory=list)
    ms_per_token: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready (infinite thresholds, meaning "never exit here", become None)."""
        values = asdict(self)
        values["thresholds"] = [None if math.isinf(value) else value for value in self.thresholds]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> PolicyOutcome:
        """The inverse of `to_dict`."""
        thresholds = [math.inf if value is None else float(value) for value in values["thresholds"]]
        return cls(
            thresholds,
            values["accuracy"],
            values["mean_layers"],
            list(values.get("exit_counts", [])),
            values.get("ms_per_token"),
        )


@dataclass
class CalibrationTable:
    """Thresholds of one confidence metric for several accuracy levels, and what they were calibrated on.

    Attributes:
        metric: the confidence metric's registry name.
        method: "ltt" (with a finite-sample guarantee at `delta`) or "empirical".
        delta: the allowed probability that the guarantee fails ("ltt" only).
        tokens: calibration tokens used; `data_hash` identifies them.
        base_model_revision: the base model revision the heads were calibrated with.
        exit_layers: the exits the thresholds belong to, in order.
        levels: accuracy level -> thresholds and their outcome on the calibration tokens.
        vocab_pruning: the vocabulary pruning the scores were computed with (`VocabPruningConfig.to_dict()`), or
            `None`; thresholds only hold under the same pruning.
        costs: the measured costs the thresholds were chosen with (`ExitCosts.to_dict()`), or `None` when they
            were chosen by depth alone.
        budgets: target average depth (layers per token) -> the most accurate thresholds of the calibration's family
            within it and their outcome on the calibration tokens (`calibration.calibrate_budget`), for decoding with
            `depth_budget`; empty unless budgets were calibrated.
        on_policy: for tables calibrated on the model's own generations (`calibration.calibrate_on_policy`), per
            level ("0.9"): the rounds run, whether the thresholds settled, the share of the last round's tokens whose
            exit its recalibration changed, and that round's tokens; `None` for tables calibrated on fixed text.
    """

    metric: str
    method: str
    delta: float | None
    tokens: int
    data_hash: str
    base_model_revision: str | None
    exit_layers: list[int]
    levels: dict[float, PolicyOutcome] = field(default_factory=dict)
    vocab_pruning: dict | None = None
    costs: dict | None = None
    budgets: dict[float, PolicyOutcome] = field(default_factory=dict)
    on_policy: dict | None = None

    @property
    def key(self) -> str:
        """The name this table is stored under in `EarlyExitConfig.calibration["tables"]`."""
        return table_key(self.metric, VocabPruningConfig.from_dict(self.vocab_pruning))

    def to_dict(self) -> dict:
        """JSON-ready form, as stored in `EarlyExitConfig.calibration`."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in _OUTCOMES}
        for name in _OUTCOMES:
            values[name] = {f"{key:g}": outcome.to_dict() for key, outcome in sorted(getattr(self, name).items())}
        return values

    @classmethod
    def from_dict(cls, values: dict) -> CalibrationTable:
        """The inverse of `to_dict`."""
        fields = {name: values.get(name) for name in cls.__dataclass_fields__ if name not in _OUTCOMES}
        outcomes = {
            name: {float(key): PolicyOutcome.from_dict(outcome) for key, outcome in (values.get(name) or {}).items()}
            for name in _OUTCOMES
        }
        return cls(**fields, **outcomes)


#: The fields of a `CalibrationTable` that map a number (a level, a depth) to a `PolicyOutcome`.
_OUTCOMES = ("levels", "budgets")


def table_key(metric: str, vocab_pruning: VocabPruningConfig | None = None) -> str:
    """The storage name of `metric`'s table: the metric itself, or with the pruning's name appended, e.g.
    "max_prob+top256", "max_prob+top2048-256@layer12" or "max_prob+vocab4096-top512"."""
    return metric if vocab_pruning is None else f"{metric}+{vocab_pruning.name}"


def store_calibration(config: EarlyExitConfig, tables: list[CalibrationTable], default_metric: str) -> None:
    """Write `tables` into `config.calibration` (replacing earlier tables of the same metric and pruning)."""
    stored = dict(config.calibration or {})
    stored.setdefault("tables", {})
    stored["tables"] = {**stored["tables"], **{table.key: table.to_dict() for table in tables}}
    stored["default_metric"] = default_metric
    config.calibration = stored


def select_thresholds(
    config: EarlyExitConfig,
    level: float,
    metric: str | None = None,
    vocab_pruning: VocabPruningConfig | None = None,
) -> tuple[str, list[float]]:
    """The metric and per-exit thresholds to run at accuracy `level` (with `vocab_pruning`, if decoding prunes).

    An uncalibrated level takes the thresholds of the nearest stricter calibrated level, which keeps at least the
    accuracy asked for.

    Raises:
        CalibrationError: the heads are not calibrated (for `metric` with this pruning), the level is outside (0, 1),
            or it is stricter than every calibrated level.
    """
    if not 0.0 < level < 1.0:
        raise CalibrationError(f"Accuracy level {level} is outside (0, 1); use e.g. 0.9 for 90% agreement.")
    metric, table = _table_for(config, metric, vocab_pruning)
    stricter = sorted(candidate for candidate in table.levels if candidate >= level - 1e-12)
    if not stricter:
        calibrated = ", ".join(f"{value:g}" for value in sorted(table.levels))
        raise CalibrationError(
            f"Level {level} is stricter than every calibrated level ({calibrated}); "
            "calibrate for it with `early-exit calibrate --levels ...`."
        )
    return metric, table.levels[stricter[0]].thresholds


def select_budget_thresholds(
    config: EarlyExitConfig,
    mean_layers: float,
    metric: str | None = None,
    vocab_pruning: VocabPruningConfig | None = None,
) -> tuple[str, list[float]]:
    """The metric and per-exit thresholds to run within an average of `mean_layers` layers per token: those of the
    deepest calibrated budget that does not exceed it (the most accurate that fits).

    Raises:
        CalibrationError: the heads are not calibrated (for `metric` with this pruning), or no budget was
            calibrated at or below `mean_layers`.
    """
    metric, table = _table_for(config, metric, vocab_pruning)
    within = sorted(budget for budget in table.budgets if budget <= mean_layers + 1e-9)
    if not within:
        calibrated = ", ".join(f"{value:g}" for value in sorted(table.budgets)) or "none"
        raise CalibrationError(
            f"No depth budget of {mean_layers:g} layers or less is calibrated for {table.key!r} (calibrated: "
            f"{calibrated}); calibrate one with `early-exit calibrate --budgets {mean_layers:g}`."
        )
    return metric, table.budgets[within[-1]].thresholds


def _table_for(
    config: EarlyExitConfig, metric: str | None, vocab_pruning: VocabPruningConfig | None
) -> tuple[str, CalibrationTable]:
    """The calibration table decoding with `metric` (default: the calibration's default) and `vocab_pruning` reads.

    Raises:
        CalibrationError: the heads are not calibrated for it, or for other exits.
    """
    stored = config.calibration or {}
    tables = stored.get("tables", {})
    if not tables:
        raise CalibrationError(
            "These heads are not calibrated: run `early-exit calibrate --heads <folder>` (or "
            "early_exit.calibration.calibrate_table) first."
        )
    metric = metric or stored.get("default_metric")
    key = table_key(metric, vocab_pruning)
    if key not in tables:
        how = ""
        if vocab_pruning is not None:
            sized = "" if vocab_pruning.vocabulary is None else f" --prune-vocabulary {len(vocab_pruning.vocabulary)}"
            how = f" (calibrate with the same pruning: --prune-top-k {vocab_pruning.top_k}{sized})"
        raise CalibrationError(f"No calibration for {key!r}{how}; calibrated tables: {', '.join(sorted(tables))}.")
    table = CalibrationTable.from_dict(tables[key])
    if vocab_pruning is not None and VocabPruningConfig.from_dict(table.vocab_pruning) != vocab_pruning:
        raise CalibrationError(
            f"The {key} calibration scored a different pruning vocabulary (of the same size) from the one decoding "
            "uses: calibrate again with this one."
        )
    if table.exit_layers != list(config.exit_layers):
        raise CalibrationError(
            f"The {key} calibration was made for exits {table.exit_layers}, but the heads sit at "
            f"{list(config.exit_layers)}: calibrate again."
        )
    return metric, table
