"""Run the frozen backbone once and keep the hidden states the heads read, so heads can train for many epochs.

With a frozen base, every epoch would recompute the same hidden states; caching them leaves only the heads, the
final norm and the LM head to run per step. The memory this takes is estimated and printed before caching starts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data import hidden_states_over_blocks, require_examples
from ..modeling_early_exit import EarlyExitForCausalLM


def estimate_cache_bytes(num_tokens: int, num_exits: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes needed to cache, per token, the hidden state at each exit and at the last layer."""
    return num_tokens * (num_exits + 1) * hidden_size * torch.empty((), dtype=dtype).element_size()


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class HiddenStateCache(Dataset):
    """Cached hidden states of a token dataset.

    Items are `{"exit_hidden_states": (exits, seq, hidden), "final_hidden_states": (seq, hidden),
    "attention_mask": (seq,)}`; `EarlyExitTrainer` recognises them and trains the heads without running the base.
    """

    exit_hidden_states: torch.Tensor  # (examples, exits, seq, hidden)
    final_hidden_states: torch.Tensor  # (examples, seq, hidden): the last layer's output, before the final norm
    attention_mask: torch.Tensor  # (examples, seq)

    def __len__(self) -> int:
        return self.attention_mask.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "exit_hidden_states": self.exit_hidden_states[index],
            "final_hidden_states": self.final_hidden_states[index],
            "attention_mask": self.attention_mask[index],
        }

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: EarlyExitForCausalLM,
        dataset: Dataset,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
        bf16: bool = False,
    ) -> HiddenStateCache:
        """Run `model`'s base over `dataset` once and keep the hidden states at its exits and last layer.

        Args:
            model: the model whose exit layers to cache (its base must be frozen: a jointly tuned base changes
                while training, so its hidden states cannot be cached).
            dataset: items with `input_ids` and `attention_mask`, as `TokenBlocks` gives them.
            batch_size: sequences per backbone pass.
            dtype: dtype to store the states in (default: the model's); `torch.bfloat16` halves a float32 cache.
            bf16: run the base under bfloat16 autocast, as training and evaluation with `bf16` run the heads: about
                1.6x faster on CPUs with AVX512-BF16.

        Raises:
            InvalidOptionError: `dataset` is empty.
            MemoryError: the cache would take more than 80% of this machine's memory (checked before any work).
        """
        require_examples(dataset, "training or evaluation")
        dtype = dtype or model.dtype
        count, hidden_size = len(dataset), model.hidden_size
        width = max(len(dataset[index]["input_ids"]) for index in range(count))
        needed = estimate_cache_bytes(count * width, len(model.exit_layers), hidden_size, dtype)
        available = _physical_memory_bytes()
        tqdm.write(
            f"Caching hidden states: {count} sequences x {width} positions x {len(model.exit_layers) + 1} "
            f"layers x {hidden_size} ({dtype}) = {needed / 2**30:.2f} GiB"
            + (f" of {available / 2**30:.1f} GiB memory" if available else ""),
            file=sys.stderr,
        )
        if available is not None and needed > 0.8 * available:
            raise MemoryError(
                f"Caching hidden states needs about {needed / 2**30:.1f} GiB, more than 80% of this machine's "
                f"{available / 2**30:.1f} GiB: train on fewer tokens, cache in torch.bfloat16, or train without the "
                "cache."
            )
        cache = cls(
            torch.zeros(count, len(model.exit_layers), width, hidden_size, dtype=dtype),
            torch.zeros(count, width, hidden_size, dtype=dtype),
            torch.zeros(count, width, dtype=torch.long),
        )
        start = 0
        for block in hidden_states_over_blocks(
            model, dataset, batch_size, bf16=bf16, description="caching hidden states"
        ):
            rows, length = block.input_ids.shape
            cache.exit_hidden_states[start : start + rows, :, :length] = torch.stack(block.exit_states, dim=1).to(
                "cpu", dtype
            )
            cache.final_hidden_states[start : start + rows, :length] = block.final_state.to("cpu", dtype)
            cache.attention_mask[start : start + rows, :length] = block.attention_mask.to("cpu")
            start += rows
        return cache
