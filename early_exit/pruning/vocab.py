"""Dynamic vocabulary pruning (Vincenti et al., 2024): score the full vocabulary once at an early exit, then let
later exits score only the tokens it ranked highest.

A full-vocabulary LM head costs as much as several decoder layers on small models, so confidence at every exit
would eat the time early exits save. After the pruning exit, an exit's logits are those of the kept tokens only:
its confidence is read over them (renormalised), which is why thresholds must be calibrated with the same pruning.
A token that reaches the final layer is scored there over the full vocabulary, as the base model does.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from ..errors import VocabPruningError


@dataclass
class VocabPruningConfig:
    """Which tokens later exits score.

    Attributes:
        top_k: tokens kept at the pruning exit. A list is a schedule: `top_k[i]` tokens are kept after the `i`-th
            exit from the pruning exit on (the last entry repeats), each exit re-ranking the previous exit's tokens;
            it must not grow.
        prune_at: the exit layer whose full-vocabulary logits choose the kept tokens; `None` means the first exit.
    """

    top_k: int | list[int] = 256
    prune_at: int | None = None

    def __post_init__(self) -> None:
        schedule = self.schedule
        if not schedule or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in schedule):
            raise VocabPruningError(
                f"Vocabulary pruning top_k must be a positive integer or a list of them, got {self.top_k!r}."
            )
        if any(later > earlier for earlier, later in zip(schedule, schedule[1:])):
            raise VocabPruningError(f"A top_k schedule must not grow from one exit to the next, got {schedule}.")

    @property
    def schedule(self) -> list[int]:
        """Tokens kept after each exit from the pruning exit on (the last entry repeats)."""
        return [self.top_k] if isinstance(self.top_k, int) else list(self.top_k)

    def kept_after(self, exits_since_pruning: int) -> int:
        """How many tokens the exit `exits_since_pruning` exits after the pruning exit passes on."""
        return self.schedule[min(exits_since_pruning, len(self.schedule) - 1)]

    def to_dict(self) -> dict:
        """JSON-ready form, as stored in `EarlyExitConfig.vocab_pruning` and calibration tables."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | list[int] | int | VocabPruningConfig | None) -> VocabPruningConfig | None:
        """A config from its dict form, a fixed top-k (an integer) or a top-k schedule (a list); `None` stays
        `None`.

        Raises:
            VocabPruningError: a dict with unknown or missing fields, or a value of another type.
        """
        if values is None or isinstance(values, VocabPruningConfig):
            return values
        if isinstance(values, numbers.Integral) and not isinstance(values, bool):
            return cls(top_k=int(values))
        if isinstance(values, list | tuple):
            return cls(top_k=list(values))
        if not isinstance(values, Mapping):
            raise VocabPruningError(
                f"A vocabulary pruning setting must be a top-k, a list of top-ks, a dict or a VocabPruningConfig, "
                f"got {values!r}."
            )
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown or "top_k" not in values:
            raise VocabPruningError(
                f"A vocabulary pruning setting needs top_k and may have prune_at; got fields {sorted(values)}."
            )
        return cls(**values)


def exits_to_score(may_emit: list[int], prune_index: int | None) -> list[int]:
    """The indices of the exits whose heads run: those that may emit, and the pruning exit when an exit after it may
    (it chooses the tokens that exit scores, as calibration scored it), in order."""
    scored = set(may_emit)
    if prune_index is not None and scored and prune_index < max(scored):
        scored.add(prune_index)
    return sorted(scored)


class VocabPruner:
    """Decides, exit after exit, which tokens the next exit scores.

    Pruning happens at the same exit whatever the thresholds (`config.prune_at`, else the first exit), so that
    decoding scores later exits over exactly the tokens calibration scored them over: the pruning exit runs its head
    even when it may not emit.

    Args:
        config: the pruning setting (`None`: every exit scores the full vocabulary).
        exit_layers: the exits, in order.
    """

    def __init__(self, config: VocabPruningConfig | None, exit_layers: list[int]) -> None:
        self.config = config
        self.prune_index = None
        if config is not None:
            if config.prune_at is not None and config.prune_at not in exit_layers:
                raise VocabPruningError(
                    f"Vocabulary pruning at layer {config.prune_at}: there is no exit there (exits: {exit_layers})."
                )
            self.prune_index = 0 if config.prune_at is None else exit_layers.index(config.prune_at)

    def next_tokens(self, exit_index: int, logits: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The token ids the exit after `exit_index` should score, given this exit's `logits` over `token_ids`
        (`None`: the full vocabulary). Returns `None` while pruning has not started."""
        if self.prune_index is None or exit_index < self.prune_index:
            return token_ids
        keep = self.config.kept_after(exit_index - self.prune_index)
        if keep >= logits.shape[-1]:
            return token_ids
        top = logits.topk(keep, dim=-1).indices
        return top if token_ids is None else token_ids.gather(-1, top)


def scatter_to_vocabulary(logits: torch.Tensor, token_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from logits over `token_ids`: the tokens not kept get -inf (never chosen)."""
    if token_ids is None:
        return logits
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.scatter_(-1, token_ids, logits)
