"""The layer-by-layer view of a causal LM that every decoding loop in the library runs through.

A `DecoderAdapter` splits a `transformers` causal LM into the steps its own `forward` performs (embed, build masks
and position embeddings once, run each decoder layer with the shared cache, final norm, LM head) so that a caller
can stop after any layer. Each supported architecture subclasses it in its own module and registers the
`model_type`s it serves; the tests prove that running the steps reproduces the base model's own logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..kernels import project_rows
from ..transformers_compat import CACHE_NAME

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass
class LayerInputs:
    """What every decoder layer of one forward step needs besides the hidden state.

    Masks and position embeddings are keyed by layer type ("full_attention", "sliding_attention") because models
    such as Gemma 2/3 alternate attention patterns between layers.
    """

    position_ids: torch.LongTensor
    attention_masks: dict[str, Any]
    position_embeddings: dict[str, Any] | None
    cache: Cache | None


class DecoderAdapter(ABC):
    """Layer-by-layer access to a decoder-only causal LM.

    Args:
        model: the `*ForCausalLM` model (already unwrapped from any PEFT wrapper). Its modules are used in place:
            nothing is copied, so LoRA layers injected by PEFT take part as usual.
    """

    #: The `config.model_type` values this adapter serves; filled by `register_architecture`.
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.config = model.config

    # --- structure -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def lm_head(self) -> nn.Module:
        """The output projection (shared by the final layer and by every exit head that reuses it)."""
        return self.model.get_output_embeddings()

    def layer_type(self, index: int) -> str:
        """The attention pattern of layer `index`, mirroring how the base model picks its mask."""
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        return SLIDING_ATTENTION if getattr(self.config, "sliding_window", None) else FULL_ATTENTION

    # --- one forward step ------------------------------------------------------------------------------------
    def start(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, LayerInputs]:
        """Embed `input_ids` and prepare what the layers need; returns the hidden state entering layer 0."""
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = self.default_position_ids(attention_mask, past_length, input_ids.shape[1], input_ids.device)
        hidden = self.embed(input_ids, position_ids)
        return hidden, self.prepare(hidden, attention_mask, position_ids, cache)

    def prepare(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        layer_index: int | None = None,
    ) -> LayerInputs:
        """Masks and position embeddings for running the positions of `hidden` through the layers.

        `layer_index` names the cache layer the masks are sized against. Early-exit decoding leaves deep layers'
        caches shorter than shallow ones, so a chunk of positions entering layer `i` passes `i`; by default the
        masks fit a cache whose layers all hold the same number of positions.
        """
        return LayerInputs(
            position_ids=position_ids,
            attention_masks=self.attention_masks(hidden, attention_mask, position_ids, cache, layer_index),
            position_embeddings=self.position_embeddings(hidden, position_ids),
            cache=cache,
        )

    def default_position_ids(
        self, attention_mask: torch.Tensor | None, past_length: int, seq_length: int, device: torch.device
    ) -> torch.LongTensor:
        """Positions the base model would use when none are given (most models: count from the cache length)."""
        return (torch.arange(seq_length, device=device) + past_length).unsqueeze(0)

    @abstractmethod
    def embed(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor) -> torch.Tensor:
        """The hidden state entering the first decoder layer."""

    def attention_masks(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        layer_index: int | None = None,
    ) -> dict[str, Any]:
        """One mask per layer type in use, built with the same `transformers` helpers the base model uses (sized
        against cache layer `layer_index`, see `prepare`)."""
        # Each mask type is sized against the first layer of that type the positions will enter.
        first_of_type: dict[str, int] = {}
        for index in range(layer_index or 0, self.num_layers):
            first_of_type.setdefault(self.layer_type(index), index)
        return {
            layer_type: self.attention_mask(
                layer_type, hidden, attention_mask, position_ids, cache, index if layer_index is not None else None
            )
            for layer_type, index in first_of_type.items()
        }

    def attention_mask(
        self,
        layer_type: str,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        cache_index: int | None = None,
    ) -> Any:
        """The mask of one attention pattern for the positions of `hidden`, sized against cache layer `cache_index`
        (by default, the first layer of the cache)."""
        builder = create_causal_mask if layer_type == FULL_ATTENTION else create_sliding_window_causal_mask
        return builder(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            **{CACHE_NAME: cache},
            position_ids=position_ids,
            layer_idx=cache_index,
        )

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.LongTensor) -> dict[str, Any] | None:
        """Rotary (cos, sin) per layer type; `None` for models with absolute position embeddings."""
        return None

    @abstractmethod
    def run_block(self, block: nn.Module, layer_type: str, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """Run one decoder block of this architecture (a base layer, or an exit head's copy of one) whose attention
        follows `layer_type`'s pattern, appending its keys and values to `inputs.cache` if there is one."""

    def layer(self, index: int, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """Run decoder layer `index` (0-based), appending its keys and values to `inputs.cache` if there is one."""
        return self.run_block(self.layers[index], self.layer_type(index), hidden, inputs)

    def propagate_kv(self, index: int, hidden: torch.Tensor, inputs: LayerInputs) -> None:
        """Append to `inputs.cache` the keys and values layer `index` would compute from `hidden`, skipping the rest
        of the layer (CALM's state propagation for layers an early exit skips)."""
        self.propagate_block_kv(self.layers[index], self.layer_type(index), hidden, inputs)

    def propagate_block_kv(self, block: nn.Module, layer_type: str, hidden: torch.Tensor, inputs: LayerInputs) -> None:
        """Append to `inputs.cache` the keys and values `block` would compute from `hidden`, and nothing else.

        The block runs until its attention hands the new keys and values to the cache, then stops: the norm and
        key/value projections (with rotary or other position handling) are the model's own code, and the attention
        itself and the MLP are never computed.
        """
        writer = _KeyValueWriter(inputs.cache)
        try:
            self.run_block(block, layer_type, hidden, replace(inputs, cache=writer))
        except _KeysAndValuesWritten:
            return
        raise RuntimeError(
            f"A decoder block of {type(self.model).__name__} never wrote to its cache; state propagation needs a "
            "block that calls cache.update(key, value, layer_idx). Use kv_strategy='deferred' instead."
        )

    @abstractmethod
    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base model's final normalisation (and any projection) applied before the LM head."""

    def unembed(self, normed: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a normalised hidden state, with the final soft-capping of models that have one.

        With `token_ids` (shape `normed.shape[:-1] + (k,)`), only those tokens' logits are computed (vocabulary
        pruning)."""
        lm_head = self.lm_head
        if token_ids is None:
            logits = lm_head(normed)
        else:
            logits = project_rows(normed, lm_head.weight, getattr(lm_head, "bias", None), token_ids)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def final_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The logits the model's own head gives a hidden state: final norm, then LM head (`unembed`)."""
        return self.unembed(self.norm(hidden), token_ids)


class _KeysAndValuesWritten(Exception):
    """Raised by `_KeyValueWriter` to leave a layer as soon as its keys and values are in the cache."""


class _KeyValueWriter:
    """Stands in for the cache during one layer call: writes the keys and values, then stops the layer."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        raise _KeysAndValuesWritten

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)
