"""Tiny randomly initialised causal LMs of every supported architecture (built from configs, no downloads), and
the layer-by-layer run the tests compare them with."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

#: A real but tiny pretrained Llama with a tokenizer (5 layers, tied embeddings; MIT, see its PROVENANCE.md).
STORIES260K = Path(__file__).resolve().parent / "data" / "stories260k"

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48)
_GQA = dict(_COMMON, num_key_value_heads=2, max_position_embeddings=128)

#: model_type -> config keyword arguments (small, with the features that make each architecture different).
TINY_CONFIGS: dict[str, dict] = {
    "llama": _GQA,
    "mistral": dict(_GQA, sliding_window=5),
    "qwen2": dict(_GQA, use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "qwen3": dict(_GQA, head_dim=8),
    "phi3": dict(_GQA, pad_token_id=0),
    "gemma": dict(_GQA, head_dim=8),
    "gemma2": dict(_GQA, head_dim=8, sliding_window=5, final_logit_softcapping=30.0, query_pre_attn_scalar=8),
    "gemma3_text": dict(_GQA, head_dim=8, sliding_window=5, sliding_window_pattern=2, query_pre_attn_scalar=8),
    "gpt_neox": dict(_COMMON, max_position_embeddings=128, rotary_pct=0.5),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128),
    "opt": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=48,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        pad_token_id=1,
    ),
}


def tiny_model(model_type: str, seed: int = 0, attention: str = "eager", **overrides) -> PreTrainedModel:
    """A tiny random causal LM of `model_type` in eval mode, float32, with the attention implementation
    `attention` (eager by default)."""
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def run_layers(adapter, input_ids, attention_mask=None, position_ids=None, cache=None):
    """Run one forward step through the adapter; returns (logits, hidden states entering layer 0 and after each
    layer)."""
    hidden, inputs = adapter.start(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
    hiddens = [hidden]
    for index in range(adapter.num_layers):
        hidden = adapter.layer(index, hidden, inputs)
        hiddens.append(hidden)
    return adapter.unembed(adapter.norm(hidden)), hiddens
