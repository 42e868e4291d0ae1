"""Where heads that attend keep their keys and values: extra layers ("slots") appended to the model's own KV cache.

Keeping them in the same `Cache` object means everything done to the cache is done to them too: DSSD's rollback
(`crop`), batch reordering, sliding-window bookkeeping, and handing the cache back to the caller, who can continue
generating from it.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..errors import InvalidOptionError
from .layer import ContextHead

if TYPE_CHECKING:
    from ..architectures import DecoderAdapter, LayerInputs


def head_cache_slots(heads: Mapping[int, nn.Module], num_layers: int) -> dict[int, int]:
    """The first cache layer index of each `ContextHead`, by exit layer: after the base's own layers, in exit order,
    each head taking one layer per entry of its `cache_layer_types`.

    The slots depend only on the model's heads (not on which exits a run scores), so a cache handed back by one
    call lines up with the next.
    """
    slots, next_slot = {}, num_layers
    for layer in sorted(heads):
        if isinstance(heads[layer], ContextHead):
            slots[layer] = next_slot
            next_slot += len(heads[layer].cache_layer_types)
    return slots


def open_head_slots(
    cache: Cache, heads: Mapping[int, nn.Module], decoder: DecoderAdapter, in_use: Collection[int] | None = None
) -> dict[int, int]:
    """Make sure `cache` has the slots of every head of the model that attends (see `head_cache_slots`), and that
    the slots of each exit layer in `in_use` (default: all) hold as many positions as that layer; returns the first
    slot of each head.

    A cache built for the base's config gets each slot of a head in use as a layer of the kind it uses for that
    attention pattern (sliding-window or full), and the others as plain layers (safe to crop while empty); a cache
    that grows its layers on first use grows the slots the same way.

    Raises:
        InvalidOptionError: the cache already holds positions its heads never saw (it was filled by another model or
            with other exits scored), so the heads' attention would miss them.
    """
    slots = head_cache_slots(heads, decoder.num_layers)
    in_use = slots.keys() if in_use is None else in_use
    if getattr(cache, "layer_class_to_replicate", None) is None:
        empty = DynamicCache(config=decoder.config).layers
        kind = {decoder.layer_type(index): layer for index, layer in reversed(list(enumerate(empty)))}
        for layer, first in sorted(slots.items(), key=lambda item: item[1]):
            for slot, layer_type in enumerate(heads[layer].cache_layer_types, start=first):
                if len(cache.layers) == slot:  # each slot its own layer object
                    cache.layers.append(copy.deepcopy(kind[layer_type]) if layer in in_use else DynamicLayer())
    for layer in in_use:
        held, expected = _seq_length(cache, slots[layer]), _seq_length(cache, layer - 1)
        if held != expected:
            raise InvalidOptionError(
                f"The KV cache holds {expected} positions after layer {layer} but the exit head there has seen "
                f"{held}: the cache was not filled by these heads with this exit scored. Start from an empty cache "
                "(pass no past_key_values)."
            )
    return slots


def _seq_length(cache: Cache, index: int) -> int:
    return cache.layers[index].get_seq_length() if index < len(cache.layers) else 0


class SlotCache:
    """Stands in for the model's cache while a head's attention runs: its keys and values go to the head's slot
    whatever layer index its block was copied with (`layer(i)`: to the head's i-th slot); everything else is the
    model's cache."""

    def __init__(self, cache: Cache, slot: int) -> None:
        self._cache = cache
        self._slot = slot

    def layer(self, index: int) -> SlotCache:
        """The cache of the head's `index`-th attention layer (0: the first)."""
        return SlotCache(self._cache, self._slot + index)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cache.update(key_states, value_states, self._slot, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def head_inputs(
    decoder: DecoderAdapter,
    head: ContextHead,
    hidden: torch.Tensor,
    inputs: LayerInputs,
    attention_mask: torch.Tensor | None,
    slot: int,
) -> LayerInputs:
    """What `head.attend` needs for the positions of `hidden`, given the base layers' `inputs` for them: a mask per
    attention pattern of the head, sized against the head's first slot of that pattern (deeper base layers may hold
    fewer positions while a deferred fill is pending), and the cache routed to the head's slots."""
    first_of_type: dict[str, int] = {}
    for index, layer_type in enumerate(head.cache_layer_types):
        first_of_type.setdefault(layer_type, slot + index)
    masks = {
        layer_type: decoder.attention_mask(layer_type, hidden, attention_mask, inputs.position_ids, inputs.cache, first)
        for layer_type, first in first_of_type.items()
    }
    return replace(inputs, attention_masks=masks, cache=SlotCache(inputs.cache, slot))
