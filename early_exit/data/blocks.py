"""The one loop that runs a model with exits over a set of token blocks and hands back its hidden states.

Calibration scores, held-out agreement and the training cache all need the same thing from each batch: the hidden
state after every exit layer and after the last layer. They differ only in what they compute from them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import InvalidOptionError
from .collator import DistillationCollator

if TYPE_CHECKING:
    from ..modeling_early_exit import EarlyExitForCausalLM


@dataclass
class BlockStates:
    """One batch of token blocks and the model's hidden states on it.

    Attributes:
        input_ids, attention_mask: the batch, (batch, seq), right-padded.
        scored_mask: the positions to count, (batch, seq): the items' own `scored_mask` where they have one (e.g.
            only generated tokens), else `attention_mask`.
        exit_states: per exit (in `model.exit_layers` order), the hidden state after its layer, (batch, seq, hidden).
        final_state: the hidden state after the last layer, before the final norm, (batch, seq, hidden).
    """

    input_ids: torch.LongTensor
    attention_mask: torch.Tensor
    scored_mask: torch.Tensor
    exit_states: list[torch.Tensor]
    final_state: torch.Tensor


def require_examples(dataset: Dataset, name: str) -> None:
    """Refuse an empty dataset before any work, naming it (an empty set would otherwise fail deep inside, or give
    all-zero measurements).

    Raises:
        InvalidOptionError: `dataset` has no items.
    """
    if len(dataset) == 0:
        raise InvalidOptionError(
            f"The {name} set is empty: give it at least one block of tokens (more text, or a smaller block size)."
        )


@torch.no_grad()
def hidden_states_over_blocks(
    model: EarlyExitForCausalLM,
    dataset: Dataset,
    batch_size: int = 1,
    bf16: bool = False,
    description: str = "running the model",
) -> Iterator[BlockStates]:
    """Run `model`'s base over `dataset` (items with `input_ids`, `attention_mask` and optionally `scored_mask`) in
    eval mode, with a progress bar, yielding each batch's hidden states at the exits and the last layer.

    With `bf16`, the base runs under bfloat16 autocast, and so does whatever the caller computes from a batch before
    asking for the next one (the generator is suspended inside the autocast).
    """
    was_training = model.training
    model.eval()
    exits = set(model.exit_layers)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DistillationCollator())
    try:
        for batch in tqdm(loader, desc=description, disable=None):
            input_ids = batch["input_ids"].to(model.device)
            attention_mask = batch["attention_mask"].to(model.device)
            scored_mask = batch["scored_mask"].to(model.device) if "scored_mask" in batch else attention_mask
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                states = [
                    hidden
                    for layer, hidden in model.iter_layers(input_ids, attention_mask)
                    if layer in exits or layer == model.num_layers
                ]
                yield BlockStates(input_ids, attention_mask, scored_mask, states[:-1], states[-1])
    finally:
        model.train(was_training)
