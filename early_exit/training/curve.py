"""Held-out agreement against training tokens: where more text stops paying.

`TrainingCurve` is a `transformers` callback: every evaluation `EarlyExitTrainer` runs during training (and the ones
before and after it) becomes a point of per-exit agreement at the number of training tokens seen so far.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

# Only the default eval set's keys (`eval_agreement_layer_12`), not named sets' (`eval_code_agreement_layer_12`).
_AGREEMENT_KEY = re.compile(r"^eval_agreement_layer_(\d+)$")


@dataclass
class TrainingCurvePoint:
    """Held-out agreement of every exit after `tokens` training tokens (`step` optimizer steps)."""

    tokens: int
    step: int
    agreement: dict[int, float]


@dataclass
class TrainingCurve(TrainerCallback):
    """Records per-exit held-out agreement at each evaluation, against the training tokens seen.

    Attributes:
        train_tokens: training tokens over the whole run (the text's tokens times the epochs); a point after step s
            of the run's `max_steps` has seen `s / max_steps` of them.
        points: one per evaluation, in step order; a second evaluation at the same step replaces the first.
    """

    train_tokens: float
    points: list[TrainingCurvePoint] = field(default_factory=list)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        agreement = {
            int(match.group(1)): value for key, value in (metrics or {}).items() if (match := _AGREEMENT_KEY.match(key))
        }
        if not agreement:
            return
        seen = state.global_step * self.train_tokens / state.max_steps if state.max_steps else 0.0
        point = TrainingCurvePoint(round(seen), state.global_step, agreement)
        if self.points and self.points[-1].step == point.step:
            self.points[-1] = point
        else:
            self.points.append(point)

    @property
    def exit_layers(self) -> list[int]:
        """The exits measured, in order."""
        return sorted({layer for point in self.points for layer in point.agreement})
