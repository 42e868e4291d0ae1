"""Per-token confidence scores and correctness of every exit on a calibration or evaluation set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..confidence import get_confidence_metric
from ..data import hidden_states_over_blocks, require_examples
from ..modeling_early_exit import EarlyExitForCausalLM
from ..pruning import VocabPruner, VocabPruningConfig, vocabulary_ids


@dataclass
class ExitScores:
    """What calibration needs to know about each counted position.

    Attributes:
        exit_layers: the exits, in order; `num_layers` is the full depth.
        scores: per metric name, a (tokens, exits) float tensor of confidence scores.
        correct: (tokens, exits) bool: whether each exit's top-1 token equals the final layer's.
        groups: (tokens,) the batch each token came from, so data can be split without cutting sequences.
        data_hash: a hash of the token ids, recorded with the thresholds calibrated on them.
        vocab_pruning: the vocabulary pruning the exits were scored with (`VocabPruningConfig.to_dict()`), or `None`.
    """

    exit_layers: list[int]
    num_layers: int
    scores: dict[str, torch.Tensor]
    correct: torch.Tensor
    groups: torch.Tensor
    data_hash: str = ""
    vocab_pruning: dict | None = None

    @property
    def num_tokens(self) -> int:
        """How many positions were scored."""
        return int(self.correct.shape[0])

    def separation(self, metric: str) -> list[float]:
        """Per exit, the AUROC of `metric` for telling tokens the exit gets right from those it gets wrong: 0.5 is
        no better than chance, 1.0 separates perfectly (NaN when an exit is always right or always wrong)."""
        result = []
        for column in range(len(self.exit_layers)):
            values, labels = self.scores[metric][:, column].double(), self.correct[:, column]
            positives, negatives = int(labels.sum()), int((~labels).sum())
            if positives == 0 or negatives == 0:
                result.append(float("nan"))
                continue
            ranks = torch.empty_like(values)
            ranks[values.argsort()] = torch.arange(1, len(values) + 1, dtype=torch.float64)
            # Tied scores share their average rank, so ties count one half as they should.
            unique, inverse = values.unique(return_inverse=True)
            ranks = (
                torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)[inverse]
                / torch.bincount(inverse)[inverse]
            )
            result.append(float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)))
        return result

    def subset(self, keep: torch.Tensor) -> ExitScores:
        """The positions where the boolean `keep` is true."""
        return ExitScores(
            self.exit_layers,
            self.num_layers,
            {name: values[keep] for name, values in self.scores.items()},
            self.correct[keep],
            self.groups[keep],
            self.data_hash,
            self.vocab_pruning,
        )


@torch.no_grad()
def collect_exit_scores(
    model: EarlyExitForCausalLM,
    dataset: Dataset,
    metrics: list[str],
    batch_size: int = 1,
    bf16: bool = False,
    vocab_pruning: VocabPruningConfig | None = None,
) -> ExitScores:
    """Run `model` over `dataset` (token blocks) and record every exit's confidence under each metric, and whether
    its top-1 token is the final layer's, at every attended position (or, for items with a `scored_mask`, at the
    positions it marks).

    With `vocab_pruning`, exits after the pruning exit score only the tokens kept there, exactly as decoding with
    that pruning does, so thresholds calibrated on these scores hold for it.

    Raises:
        ValueError: an unknown metric name (the message lists the known ones).
        InvalidOptionError: `dataset` is empty.
    """
    require_examples(dataset, "calibration")
    resolved = [get_confidence_metric(name) for name in metrics]
    exits = model.exit_layers
    scores: dict[str, list[torch.Tensor]] = {metric.name: [] for metric in resolved}
    correct, groups = [], []
    digest = hashlib.sha256()
    pruner = VocabPruner(vocab_pruning, exits, model.vocab_size)
    for index, block in enumerate(hidden_states_over_blocks(model, dataset, batch_size, bf16, "scoring exits")):
        mask = block.scored_mask.bool()
        digest.update(block.input_ids[mask].cpu().numpy().tobytes())
        per_metric: dict[str, list[torch.Tensor]] = {metric.name: [] for metric in resolved}
        tokens, previous, token_ids = [], None, None
        for exit_index, (layer, hidden) in enumerate(zip(exits, block.exit_states)):
            token_ids = pruner.scored_tokens(exit_index, token_ids, hidden.device)
            logits = model.exit_logits_at(layer, hidden, token_ids)
            tokens.append(vocabulary_ids(logits.argmax(-1, keepdim=True), token_ids)[..., 0][mask])
            for metric in resolved:
                per_metric[metric.name].append(metric(logits, hidden, previous)[mask])
            previous = hidden
            token_ids = pruner.next_tokens(exit_index, logits, token_ids)
        final = model.final_logits(block.final_state).argmax(-1)[mask]
        for name, values in per_metric.items():
            scores[name].append(torch.stack(values, dim=1).cpu())
        correct.append((torch.stack(tokens, dim=1) == final[:, None]).cpu())
        groups.append(torch.full((final.numel(),), index, dtype=torch.long))
    return ExitScores(
        exits,
        model.num_layers,
        {name: torch.cat(values) for name, values in scores.items()},
        torch.cat(correct),
        torch.cat(groups),
        digest.hexdigest()[:16],
        vocab_pruning.to_dict() if vocab_pruning is not None else None,
    )
