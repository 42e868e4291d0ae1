"""`ExitDecodingConfig`: every early-exit option of `generate`, checked once, in one place.

`EarlyExitForCausalLM.generate`, the command line and the benchmarks all build one of these, so a type or range
mistake gets the same clear message wherever it was made. What can only be checked against a model (the number of
exits, the depth, the calibration table) is checked when the policy is resolved (`policy.resolve_exit_policy`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ..confidence import ConfidenceMetric, get_confidence_metric
from ..errors import InvalidOptionError
from ..pruning import VocabPruningConfig

#: How the KV cache of layers a token skipped is kept right.
#: "deferred": the skipped layers run the token later, together with the next token that goes deep (exact);
#: "propagate": the skipped layers' keys and values are computed from the exited hidden state (CALM; approximate).
KV_STRATEGIES = ("deferred", "propagate")

#: The matmul forms decoding runs its linear layers with (`early_exit.kernels.FewPositionLinears`):
#: "packed": the form timed fastest on this machine per weight shape and row count (`early_exit.kernels.tuning`), with a
#: packed copy of each weight whose fastest forms need one (as much memory again as those weights, made once per
#: model); "unpacked": the fastest forms that need no copy; "stock": `F.linear`, as the base model runs.
KERNELS = ("packed", "unpacked", "stock")

#: The options that choose where tokens may leave; at most one is given.
_POLICY_CHOICES = ("accuracy_level", "exit_thresholds", "depth_budget")

#: Drafts per cycle of self-speculative decoding unless told otherwise; the exits' confidence usually ends a draft
#: sooner.
DEFAULT_MAX_DRAFT_TOKENS = 8


@dataclass(frozen=True)
class ExitDecodingConfig:
    """How `generate` decodes with exits. Every field is optional: the default decodes at full depth, exactly as
    `base.generate` does.

    Attributes:
        accuracy_level: the share of tokens that must equal the full model's (in (0, 1), e.g. 0.95); the thresholds
            come from the heads' calibration table.
        exit_thresholds: explicit per-exit thresholds instead (`None` or `inf` for an exit that never emits);
            stored as a tuple of floats.
        depth_budget: or a target average depth (decoder layers per token): the thresholds of the deepest budget
            calibrated within it (`early-exit calibrate --budgets`), the most accurate that fits.
        confidence_metric: a registered metric name or a `ConfidenceMetric` (default: the calibration's default
            metric, else "max_prob").
        min_exit_layer: exits before this layer never emit.
        kv_strategy: "deferred" (skipped layers' cache filled exactly, later) or "propagate" (computed from the
            exited hidden state, approximate).
        vocab_pruning: a `VocabPruningConfig` (a top-k, a list schedule or a dict are turned into one); `None`
            uses the heads' configured pruning, `False` none.
        speculative: dynamic self-speculative decoding: exits only draft tokens, which the full model verifies, so
            the output is the full model's.
        max_draft_tokens: with `speculative`, the most drafts per verification (default 8).
        kernels: "packed" (default), "unpacked" or "stock": the matmul forms of the decoding loop (see `KERNELS`).
            The output is the full model's up to float rounding whichever is chosen.

    Raises:
        InvalidOptionError: a field of the wrong type or out of range, or options that contradict each other.
    """

    accuracy_level: float | None = None
    exit_thresholds: tuple[float, ...] | None = None
    depth_budget: float | None = None
    confidence_metric: str | ConfidenceMetric | None = None
    min_exit_layer: int | None = None
    kv_strategy: str = "deferred"
    vocab_pruning: VocabPruningConfig | bool | None = None
    speculative: bool = False
    max_draft_tokens: int | None = None
    kernels: str = "packed"

    def __post_init__(self) -> None:
        if self.accuracy_level is not None:
            level = _real("accuracy_level", self.accuracy_level)
            if not 0.0 < level < 1.0:
                raise InvalidOptionError(
                    f"accuracy_level={level} is outside (0, 1); use e.g. 0.9 for 90% agreement with the full model."
                )
            self._set("accuracy_level", level)
        chosen = [name for name in _POLICY_CHOICES if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise InvalidOptionError(f"Pass one of accuracy_level, exit_thresholds and depth_budget, not {chosen}.")
        if self.exit_thresholds is not None:
            self._set("exit_thresholds", _thresholds(self.exit_thresholds))
        if self.depth_budget is not None:
            budget = _real("depth_budget", self.depth_budget)
            if not budget > 0:
                raise InvalidOptionError(f"depth_budget={budget} must be a positive number of layers per token.")
            self._set("depth_budget", budget)
        if self.confidence_metric is not None and not isinstance(self.confidence_metric, ConfidenceMetric):
            if not isinstance(self.confidence_metric, str) or not self.confidence_metric:
                raise InvalidOptionError(
                    f"confidence_metric must be a registered metric's name or a ConfidenceMetric, got "
                    f"{self.confidence_metric!r}."
                )
            get_confidence_metric(self.confidence_metric)  # an unknown name fails here, listing the known ones
        if self.min_exit_layer is not None:
            self._set("min_exit_layer", _integer("min_exit_layer", self.min_exit_layer, minimum=1))
        if self.kv_strategy not in KV_STRATEGIES:
            raise InvalidOptionError(
                f"Unknown kv_strategy {self.kv_strategy!r}; choose one of {', '.join(KV_STRATEGIES)}."
            )
        if self.kernels not in KERNELS:
            raise InvalidOptionError(f"Unknown kernels {self.kernels!r}; choose one of {', '.join(KERNELS)}.")
        self._set("vocab_pruning", _vocab_pruning(self.vocab_pruning))
        if not isinstance(self.speculative, bool):
            raise InvalidOptionError(f"speculative must be True or False, got {self.speculative!r}.")
        if self.speculative:
            if self.kv_strategy != "deferred":
                raise InvalidOptionError(
                    "Self-speculative decoding reuses the drafts' exact KV cache; it only runs with "
                    f"kv_strategy='deferred', not {self.kv_strategy!r}."
                )
            drafts = DEFAULT_MAX_DRAFT_TOKENS if self.max_draft_tokens is None else self.max_draft_tokens
            self._set("max_draft_tokens", _integer("max_draft_tokens", drafts, minimum=0))
        elif self.max_draft_tokens is not None:
            raise InvalidOptionError("max_draft_tokens only applies with speculative=True.")

    @property
    def full_depth(self) -> bool:
        """Whether these options alone keep every token at full depth (no level, thresholds or budget)."""
        return all(getattr(self, name) is None for name in _POLICY_CHOICES)

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any], base: ExitDecodingConfig | None = None) -> ExitDecodingConfig:
        """Take this class's fields out of `kwargs` (e.g. `generate`'s keyword arguments), over `base` if given; an
        `accuracy_level`, `exit_thresholds` or `depth_budget` in `kwargs` replaces whichever of them `base` has.

        Raises:
            InvalidOptionError: `base` is not an `ExitDecodingConfig`, or a value is invalid.
        """
        if base is not None and not isinstance(base, cls):
            raise InvalidOptionError(f"exit_config must be an ExitDecodingConfig, got {type(base).__name__}.")
        given = {field.name: kwargs.pop(field.name) for field in fields(cls) if field.name in kwargs}
        if base is None:
            return cls(**given)
        if given.keys() & set(_POLICY_CHOICES):  # a level, thresholds or budget given replace base's choice
            given = {name: None for name in _POLICY_CHOICES} | given
        return replace(base, **given)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # normalising a field of a frozen dataclass, during __post_init__


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidOptionError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidOptionError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise InvalidOptionError(f"{name} must be {minimum} or more, got {value}.")
    return int(value)


def _thresholds(values: Any) -> tuple[float, ...]:
    one_dimensional = values.dim() == 1 if isinstance(values, torch.Tensor) else isinstance(values, Sequence)
    if isinstance(values, str | bytes) or not one_dimensional:
        raise InvalidOptionError(
            f"exit_thresholds must be a list of numbers, one per exit (None: never exit there), got {values!r}."
        )
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if not values:
        raise InvalidOptionError(
            "exit_thresholds is empty: give one threshold per exit (None: never exit there), or leave it out."
        )
    checked = []
    for index, value in enumerate(values):
        value = math.inf if value is None else _real(f"exit_thresholds[{index}]", value)
        if math.isnan(value):
            raise InvalidOptionError(f"exit_thresholds[{index}] is NaN; use None to disable an exit.")
        checked.append(value)
    return tuple(checked)


def _vocab_pruning(value: Any) -> VocabPruningConfig | bool | None:
    if value is None or value is False:
        return value
    if value is True:
        raise InvalidOptionError(
            "vocab_pruning=True is ambiguous: pass a top-k (e.g. 512), a VocabPruningConfig, None for the heads' own "
            "setting or False for none."
        )
    return VocabPruningConfig.from_dict(value)
