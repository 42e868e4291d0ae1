"""Attention over a few new positions that shares key/value heads instead of copying them.

In grouped-query attention several query heads read one key/value head. For a single new position transformers'
SDPA attention folds each group into one head; for several (DSSD's verification, the deferred fill), which need a
causal mask over the cache, it first copies every key and value head once per query head. Letting SDPA share the
heads itself (`enable_gqa`) takes a 4-position pass of SmolLM2-135M from 1.32x to 1.24x the time of a 1-position pass
on 2 CPU cores (`docs/kernels-smollm2-135m.md`, both in one run). Transformers only lets SDPA share with a mask under an
environment switch, global to the process; `FewPositionAttention` does it for the threads inside its `with` block
only.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .scope import ThreadScope

#: The name `FewPositionAttention` registers `shared_kv_sdpa` under in transformers' `AttentionInterface`.
ATTENTION_NAME = "early_exit_shared_kv_sdpa"

_inside = threading.local()  # how many `FewPositionAttention` blocks the current thread is in


def shared_kv_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a thread inside a `FewPositionAttention` block, attending from
    several positions under a mask on a CPU, lets SDPA share each key/value head among its query heads."""
    if getattr(_inside, "depth", 0) and _shares_heads(module, query, attention_mask, dropout, kwargs):
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _shares_heads(
    module: nn.Module, query: torch.Tensor, mask: torch.Tensor | None, dropout: float, kwargs: dict[str, Any]
) -> bool:
    """Whether this call is one `shared_kv_sdpa` computes itself: grouped heads, several positions, a plain mask, on
    a CPU, and none of the options (soft-capping, position biases, paged caches, weights returned) that transformers'
    own function handles."""
    # Cheapest and most often false first: most decoding passes are of one position.
    return (
        query.shape[2] > 1
        and getattr(module, "num_key_value_groups", 1) > 1
        and query.device.type == "cpu"
        and mask is not None
        and mask.dim() == 4
        and not (dropout and module.training)
        and not any(kwargs.get(name) for name in ("softcap", "position_bias", "cache", "output_attentions"))
    )


# Registered for masks too: transformers builds no mask at all for an attention name it does not know.
AttentionInterface.register(ATTENTION_NAME, shared_kv_sdpa)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class FewPositionAttention(ThreadScope):
    """Run the SDPA attention of the model `module` through `shared_kv_sdpa` while the current thread is inside a
    `with` block of this object.

    While some thread is inside a block, the configs of the model's modules that named `"sdpa"` name
    `ATTENTION_NAME`, whose function computes exactly what `"sdpa"` does for every thread not inside a block; the
    last exit puts `"sdpa"` back. Models on another attention implementation are left alone. Make one per model.
    """

    def __init__(self, module: nn.Module) -> None:
        configs = (getattr(child, "config", None) for child in module.modules())
        unique = {id(config): config for config in configs if isinstance(config, PretrainedConfig)}
        self._configs = list(unique.values())
        self._switched: list[PretrainedConfig] = []
        super().__init__()

    def __enter__(self) -> FewPositionAttention:
        super().__enter__()
        _inside.depth = getattr(_inside, "depth", 0) + 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _inside.depth -= 1
        super().__exit__(*exc_info)

    # The attribute behind `config._attn_implementation` is set directly: the property's setter would also rewrite
    # every sub-config (a vision tower's, say) to the same name.
    def _open(self) -> None:
        for config in self._configs:
            if config._attn_implementation == "sdpa":
                config._attn_implementation_internal = ATTENTION_NAME
                self._switched.append(config)

    def _close(self) -> None:
        for config in self._switched:
            config._attn_implementation_internal = "sdpa"
        self._switched.clear()
