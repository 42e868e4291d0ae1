"""Decoders with rotary position embeddings: the Llama family (Llama, SmolLM, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3)
and GPT-NeoX (Pythia).

They share one layer signature; they differ only in attribute names, in whether Gemma 3's rotary tables depend on the
layer type, and in the keyword GPT-NeoX uses for the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..transformers_compat import CACHE_NAME
from .base import DecoderAdapter, LayerInputs
from .registry import register_architecture


@register_architecture("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")
class RotaryDecoderAdapter(DecoderAdapter):
    """Adapter for decoders whose inner model holds `embed_tokens`, `layers`, `norm` and `rotary_emb`."""

    norm_attribute = "norm"
    cache_argument = CACHE_NAME

    @property
    def inner(self) -> nn.Module:
        return self.model.base_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    def embed(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.LongTensor) -> dict[str, Any]:
        shared = self.inner.rotary_emb(hidden, position_ids)
        return {self.layer_type(i): shared for i in range(self.num_layers)}

    def run_block(self, block: nn.Module, layer_type: str, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        return block(
            hidden,
            attention_mask=inputs.attention_masks[layer_type],
            position_ids=inputs.position_ids,
            position_embeddings=inputs.position_embeddings[layer_type],
            use_cache=inputs.cache is not None,
            **{self.cache_argument: inputs.cache},
        )

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(self.inner, self.norm_attribute)(hidden)


@register_architecture("gemma3_text")
class Gemma3DecoderAdapter(RotaryDecoderAdapter):
    """Gemma 3 keeps separate rotary tables for its local (sliding) and global layers."""

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.LongTensor) -> dict[str, Any]:
        used = {self.layer_type(i) for i in range(self.num_layers)}
        return {layer_type: self.inner.rotary_emb(hidden, position_ids, layer_type) for layer_type in used}


@register_architecture("gpt_neox")
class GPTNeoXDecoderAdapter(RotaryDecoderAdapter):
    """GPT-NeoX / Pythia: `embed_in`, `final_layer_norm`, embedding dropout, and `layer_past` for the cache."""

    norm_attribute = "final_layer_norm"
    cache_argument = "layer_past"

    def embed(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor) -> torch.Tensor:
        return self.inner.emb_dropout(super().embed(input_ids, position_ids))
