"""Decoders with learned absolute position embeddings: GPT-2 and OPT."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..transformers_compat import CACHE_NAME
from .base import DecoderAdapter, LayerInputs
from .registry import register_architecture


@register_architecture("gpt2")
class GPT2DecoderAdapter(DecoderAdapter):
    """GPT-2: token plus position embeddings, blocks in `transformer.h`, final `ln_f`."""

    @property
    def inner(self) -> nn.Module:
        return self.model.transformer

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.h

    def embed(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor) -> torch.Tensor:
        hidden = self.inner.wte(input_ids) + self.inner.wpe(position_ids)
        return self.inner.drop(hidden)

    def run_block(self, block: nn.Module, layer_type: str, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        return block(
            hidden,
            inputs.cache,
            inputs.attention_masks[layer_type],
            use_cache=inputs.cache is not None,
            position_ids=inputs.position_ids,
        )

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.ln_f(hidden)


@register_architecture("opt")
class OPTDecoderAdapter(DecoderAdapter):
    """OPT: positions counted over the attention mask (so left padding shifts them), optional in/out projections."""

    @property
    def inner(self) -> nn.Module:
        return self.model.model.decoder

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    def default_position_ids(
        self, attention_mask: torch.Tensor | None, past_length: int, seq_length: int, device: torch.device
    ) -> torch.LongTensor:
        if attention_mask is None:
            attention_mask = torch.ones(1, past_length + seq_length, device=device, dtype=torch.long)
        positions = torch.cumsum(attention_mask, dim=1) * attention_mask - 1
        return positions[:, past_length:].long()

    def embed(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor) -> torch.Tensor:
        hidden = self.inner.embed_tokens(input_ids)
        if self.inner.project_in is not None:
            hidden = self.inner.project_in(hidden)
        # The positional embedding reads only `position_ids` when they are given; its mask argument is unused.
        return hidden + self.inner.embed_positions(None, 0, position_ids=position_ids)

    def attention_mask(
        self,
        layer_type: str,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        cache_index: int | None = None,
    ) -> Any:
        # OPT builds its mask without positions: its padding-shifted positions would look like packed sequences.
        return super().attention_mask(layer_type, hidden, attention_mask, None, cache, cache_index)

    def run_block(self, block: nn.Module, layer_type: str, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        return block(
            hidden,
            attention_mask=inputs.attention_masks[layer_type],
            position_ids=inputs.position_ids,
            **{CACHE_NAME: inputs.cache},
            use_cache=inputs.cache is not None,
        )

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.inner.final_layer_norm is not None:
            hidden = self.inner.final_layer_norm(hidden)
        if self.inner.project_out is not None:
            hidden = self.inner.project_out(hidden)
        return hidden
