"""Dynamic vocabulary pruning (Vincenti et al., 2024): score the full vocabulary once at an early exit, then let
later exits score only the tokens it ranked highest.

A full-vocabulary LM head costs as much as several decoder layers on small models, so confidence at every exit
would eat the time early exits save. After the pruning exit, an exit's logits are those of the kept tokens only:
its confidence is read over them (renormalised), which is why thresholds must be calibrated with the same pruning.
A token that reaches the final layer is scored there over the full vocabulary, as the base model does.

The pruning exit itself may score a fixed vocabulary instead of the full one: the tokens most frequent in the model's
own text (as FR-Spec and VocabTrim do for drafters). A few thousand rows of the LM head stay in the CPU's cache, so
that exit then costs a small fraction of a full-vocabulary projection; a token outside them can still be emitted, by
a deeper layer.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
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
        vocabulary: the token ids the pruning exit scores (e.g. `frequent_tokens` of the model's own text), or `None`
            for the full vocabulary. Exits before the pruning exit, and the final layer, always score the full
            vocabulary.
    """

    top_k: int | list[int] = 256
    prune_at: int | None = None
    vocabulary: list[int] | None = None

    def __post_init__(self) -> None:
        schedule = self.schedule
        if not schedule or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in schedule):
            raise VocabPruningError(
                f"Vocabulary pruning top_k must be a positive integer or a list of them, got {self.top_k!r}."
            )
        if any(later > earlier for earlier, later in zip(schedule, schedule[1:])):
            raise VocabPruningError(f"A top_k schedule must not grow from one exit to the next, got {schedule}.")
        if self.vocabulary is not None:
            vocabulary = self.vocabulary
            if not isinstance(vocabulary, list | tuple) or not all(
                isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in vocabulary
            ):
                raise VocabPruningError("A pruning vocabulary must be a list of token ids (non-negative integers).")
            if len(set(vocabulary)) != len(vocabulary) or len(vocabulary) < schedule[0]:
                raise VocabPruningError(
                    f"A pruning vocabulary must hold distinct token ids, at least as many as top_k={schedule[0]} "
                    f"keeps; got {len(vocabulary)} ids ({len(set(vocabulary))} distinct)."
                )
            self.vocabulary = list(vocabulary)

    @property
    def schedule(self) -> list[int]:
        """Tokens kept after each exit from the pruning exit on (the last entry repeats)."""
        return [self.top_k] if isinstance(self.top_k, int) else list(self.top_k)

    def kept_after(self, exits_since_pruning: int) -> int:
        """How many tokens the exit `exits_since_pruning` exits after the pruning exit passes on."""
        return self.schedule[min(exits_since_pruning, len(self.schedule) - 1)]

    @property
    def name(self) -> str:
        """A short name of the setting, as calibration tables are keyed: "top512", "top2048-256@layer12",
        "vocab4096-top512" (a fixed vocabulary of 4096 tokens)."""
        vocabulary = f"vocab{len(self.vocabulary)}-" if self.vocabulary is not None else ""
        at = f"@layer{self.prune_at}" if self.prune_at is not None else ""
        return f"{vocabulary}top{'-'.join(map(str, self.schedule))}{at}"

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
                "A vocabulary pruning setting needs top_k and may have prune_at and vocabulary; got fields "
                f"{sorted(values)}."
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
        vocab_size: the model's vocabulary size, which a fixed pruning vocabulary must lie inside.

    Raises:
        VocabPruningError: `config` prunes at a layer without an exit, or names tokens outside the vocabulary.
    """

    def __init__(self, config: VocabPruningConfig | None, exit_layers: list[int], vocab_size: int) -> None:
        self.config = config
        self.prune_index = None
        self.vocabulary = None
        if config is not None and config.vocabulary is not None:
            if max(config.vocabulary) >= vocab_size:
                raise VocabPruningError(
                    f"The pruning vocabulary names token {max(config.vocabulary)}, outside the model's vocabulary of "
                    f"{vocab_size}: it was made for another model; calibrate again with --prune-vocabulary."
                )
            self.vocabulary = torch.tensor(config.vocabulary)
        if config is not None:
            if config.prune_at is not None and config.prune_at not in exit_layers:
                raise VocabPruningError(
                    f"Vocabulary pruning at layer {config.prune_at}: there is no exit there (exits: {exit_layers})."
                )
            self.prune_index = 0 if config.prune_at is None else exit_layers.index(config.prune_at)

    def scored_tokens(
        self, exit_index: int, token_ids: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """The token ids the exit `exit_index` scores, given those the previous exit passed on (`None`: the full
        vocabulary): the fixed vocabulary at the pruning exit, if there is one (a 1-D tensor, the same for every
        position), else what was passed on."""
        if self.vocabulary is None or exit_index != self.prune_index:
            return token_ids
        if self.vocabulary.device != device:
            self.vocabulary = self.vocabulary.to(device)
        return self.vocabulary

    def next_tokens(self, exit_index: int, logits: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The token ids the exit after `exit_index` should score, given this exit's `logits` over `token_ids`
        (`None`: the full vocabulary). Returns `None` while pruning has not started."""
        if self.prune_index is None or exit_index < self.prune_index:
            return token_ids
        keep = self.config.kept_after(exit_index - self.prune_index)
        if keep >= logits.shape[-1]:
            return token_ids
        return vocabulary_ids(logits.topk(keep, dim=-1).indices, token_ids)


def vocabulary_ids(indices: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
    """The vocabulary ids of positions `indices` in logits over `token_ids` (`None`: the full vocabulary; 1-D: the
    same tokens for every position; else one set per position, shaped like the logits)."""
    if token_ids is None:
        return indices
    return token_ids[indices] if token_ids.dim() == 1 else token_ids.gather(-1, indices)


def frequent_tokens(sequences: Iterable[torch.Tensor], vocab_size: int, count: int) -> list[int]:
    """The `count` token ids most frequent in `sequences` (ties, such as tokens never seen, go to the lower id: byte-
    pair tokenizers number their tokens roughly from the most frequent), most frequent first.

    Raises:
        VocabPruningError: `count` is not in [1, vocab_size].
    """
    if not 1 <= count <= vocab_size:
        raise VocabPruningError(
            f"A pruning vocabulary of {count} tokens: give 1 to {vocab_size} (the vocabulary size)."
        )
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in sequences:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        counts += torch.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
    # A stable sort of the negated counts keeps equal counts in id order.
    return torch.sort(-counts, stable=True).indices[:count].tolist()


def scatter_to_vocabulary(logits: torch.Tensor, token_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from logits over `token_ids` (1-D: the same for every position): the tokens not kept
    get -inf (never chosen)."""
    if token_ids is None:
        return logits
    full = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    return full.scatter_(-1, token_ids.expand_as(logits), logits)
