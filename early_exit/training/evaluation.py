"""How well the exits predict the final layer's token (and distribution)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ..data import hidden_states_over_blocks, require_examples
from ..modeling_early_exit import EarlyExitForCausalLM
from .loss import TeacherDistribution


@dataclass
class ExitAgreement:
    """Top-1 agreement and KL of each exit with the final layer over a set of token positions.

    Attributes:
        exit_layers: the exits, in order.
        num_layers: depth of the base model.
        agreeing: per exit, how many positions its top-1 token equals the final layer's.
        kl_sums: per exit, the sum over positions of KL(final layer's distribution || exit's).
        tokens: how many positions were counted.
        earliest_exit_layers: per position where some exit agrees, the first such exit (the oracle exit policy).
    """

    exit_layers: list[int]
    num_layers: int
    agreeing: list[int] = field(default_factory=list)
    kl_sums: list[float] = field(default_factory=list)
    tokens: int = 0
    earliest_exit_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.agreeing = self.agreeing or [0] * len(self.exit_layers)
        self.kl_sums = self.kl_sums or [0.0] * len(self.exit_layers)

    @torch.no_grad()
    def add(self, exit_logits: Iterable[torch.Tensor], final_logits: torch.Tensor, positions: torch.Tensor) -> None:
        """Count the positions where `positions` (batch, seq) is true, given each exit's and the final logits.

        `exit_logits` is read once, in exit order: a generator that makes each exit's logits when asked keeps one
        exit's in memory at a time."""
        final = final_logits.argmax(-1)[positions]
        count = final.numel()
        teacher = TeacherDistribution.of(final_logits)  # once for all exits
        hits = []
        for index, logits in enumerate(exit_logits):
            hits.append(logits.argmax(-1)[positions] == final)
            self.agreeing[index] += int(hits[-1].sum())
            self.kl_sums[index] += float(teacher.kl_per_token(logits)[positions].sum())
        self.tokens += count
        hits = torch.stack(hits)  # (exits, tokens)
        layers = torch.tensor(self.exit_layers)
        any_agrees = hits.any(dim=0)
        self.earliest_exit_layers += layers[hits.int().argmax(dim=0)[any_agrees]].tolist()

    @property
    def rates(self) -> list[float]:
        """Per exit, the fraction of positions where it agrees with the final layer."""
        return [count / max(self.tokens, 1) for count in self.agreeing]

    @property
    def kl(self) -> list[float]:
        """Per exit, the mean KL from the final layer's distribution to the exit's."""
        return [total / max(self.tokens, 1) for total in self.kl_sums]

    @property
    def oracle_mean_layers(self) -> float:
        """Mean layers per token if every token left at its earliest agreeing exit (and the rest ran in full)."""
        full_depth = self.tokens - len(self.earliest_exit_layers)
        return (sum(self.earliest_exit_layers) + full_depth * self.num_layers) / max(self.tokens, 1)


@torch.no_grad()
def measure_agreement(
    model: EarlyExitForCausalLM,
    input_ids: torch.LongTensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    into: ExitAgreement | None = None,
) -> ExitAgreement:
    """Count, at the positions where `positions` is true, how often each exit's top-1 token is the final layer's.

    Args:
        model: the model with heads.
        input_ids, attention_mask: the sequences, (batch, seq).
        positions: boolean (batch, seq): which positions' next-token predictions to count.
        into: an `ExitAgreement` to add these counts to, so several batches can be accumulated.
    """
    result = into or ExitAgreement(model.exit_layers, model.num_layers)
    output = model(input_ids, attention_mask=attention_mask, use_cache=False)
    result.add(output.exit_logits, output.logits, positions)
    return result


@torch.no_grad()
def held_out_agreement(
    model: EarlyExitForCausalLM, dataset: Dataset, batch_size: int = 4, bf16: bool = False
) -> ExitAgreement:
    """Each exit's top-1 agreement with (and KL from) the final layer over every position of `dataset`'s blocks."""
    require_examples(dataset, "held-out")
    result = ExitAgreement(model.exit_layers, model.num_layers)
    for block in hidden_states_over_blocks(model, dataset, batch_size, bf16, "held-out agreement"):
        # Made one exit at a time: with an exit after every layer, all of them at once would take gigabytes.
        exit_logits = (
            model.exit_logits_at(layer, hidden) for layer, hidden in zip(model.exit_layers, block.exit_states)
        )
        result.add(exit_logits, model.final_logits(block.final_state), block.attention_mask.bool())
    return result
