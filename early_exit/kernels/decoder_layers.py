"""Decoder layers of the Llama family run as five products instead of seven, with little around them.

transformers' `LlamaDecoderLayer` makes seven products a layer (q, k, v, o, gate, up, down) and some forty small tensor
operations around them: RMS norms of eight operations each, the rotary embedding of queries and keys apart, the
attention function's checks and reshapes. On a CPU, in a decoding pass of one to a few positions, each call costs
microseconds beyond its arithmetic, and the key and value matrices (192 x 576 in SmolLM2-135M) cost three times what
reading them does. `FusedDecoderLayers` runs each supported layer, for the threads inside its `with` block, from one
matrix for q, k and v and one for gate and up (copies made once, in the matmul forms `linear_for_rows` times on the
machine), with the rotary embedding applied to queries and keys together, a fused RMS norm in float32 and SDPA called
directly. A float32 pass of SmolLM2-135M's decoder over one new position took 23.4 ms instead of 28.2 on 2 Zen 4
cores, over four 31.1 ms instead of 34.0 (and 25.2 ms once the panels kernel joined the forms;
docs/speed-before-after.md); the result equals the layer's own up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTENTION_NAME
from .forms import is_plain_matrix
from .multi_position import FewPositionLinears, chosen_form, linear_for_rows, weight_state
from .scope import ThreadScope
from .tuning import FormChoice, tune_forms

#: Decoder layer classes whose computation `FusedDecoderLayers` reproduces: pre-norm attention and gated MLP, each
#: with a residual; RMS norms; rotary embedding of the whole head; Qwen3's RMS norms of each query and key head
#: before it (`q_norm`, `k_norm`).
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
#: Their RMS norms, which compute `weight * x * rsqrt(mean(x ** 2) + eps)` (in float32 as `F.rms_norm` does).
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
#: The attention implementations computed here (what transformers' "sdpa" computes); others run the layer's own.
_SDPA_NAMES = ("sdpa", ATTENTION_NAME)


@dataclass
class _Product:
    """One fused matrix (the rows of several linears' weights, stacked) with its bias, form choice and packed copy."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    choice: FormChoice | None = None
    packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear_for_rows(x, self.weight, self.bias, self.packed, self.choice)


@dataclass
class _FusedLayer:
    """A supported layer, the `forward` that stands in for its class's while patched, and its fused products with
    the state of the weights they were made from."""

    layer: nn.Module
    forward: Callable[..., torch.Tensor] | None = None
    qkv: _Product | None = None
    gate_up: _Product | None = None
    made_for: tuple | None = None

    @property
    def qkv_linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attention = self.layer.self_attn
        return attention.q_proj, attention.k_proj, attention.v_proj

    @property
    def gate_up_linears(self) -> tuple[nn.Linear, nn.Linear]:
        return self.layer.mlp.gate_proj, self.layer.mlp.up_proj

    def weights_state(self) -> tuple:
        """What changes when any fused weight or bias is replaced or updated in place."""
        return tuple(
            weight_state(tensor)
            for linear in (*self.qkv_linears, *self.gate_up_linears)
            for tensor in (linear.weight, linear.bias)
            if tensor is not None
        )


def _plain_linear(module: Any) -> bool:
    return type(module) is nn.Linear and is_plain_matrix(module.weight)


def is_supported_layer(layer: nn.Module) -> bool:
    """Whether `FusedDecoderLayers` runs `layer`: one of `SUPPORTED_LAYERS` with its class's own `forward`, attention
    through SDPA, plain `nn.Linear` projections (not wrapped by an adapter such as LoRA) of one dtype and device,
    q/k/v biases all present or all absent (so with gate/up), and norms of query and key heads both or neither."""
    if type(layer).__name__ not in SUPPORTED_LAYERS or "forward" in vars(layer):
        return False
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attention is None or mlp is None or not all(_plain_linear(getattr(attention, n, None)) for n in names):
        return False
    if attention.config._attn_implementation not in _SDPA_NAMES:
        return False
    if hasattr(attention, "q_norm") != hasattr(attention, "k_norm"):
        return False
    if not all(_plain_linear(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    for group in ((attention.q_proj, attention.k_proj, attention.v_proj), (mlp.gate_proj, mlp.up_proj)):
        weights = [linear.weight for linear in group]
        if len({(w.dtype, w.device) for w in weights}) != 1 or len({linear.bias is None for linear in group}) != 1:
            return False
    return True


def _stacked(linears: tuple[nn.Linear, ...]) -> _Product:
    with torch.no_grad():
        weight = torch.cat([linear.weight.detach() for linear in linears])
        biases = [linear.bias for linear in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    return _Product(weight, bias)


def _norm(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # transformers' RMS norm takes eight operations; in float32 `F.rms_norm` computes the same in one. In other
    # dtypes it rounds differently, so the module runs.
    if hidden.dtype == torch.float32 and type(module).__name__ in _RMS_NORMS:
        return F.rms_norm(hidden, (hidden.shape[-1],), module.weight, module.variance_epsilon)
    return module(hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` for one tensor (queries and keys stacked on the head axis)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class FusedDecoderLayers(ThreadScope):
    """Run the supported decoder layers inside `module` (`is_supported_layer`) from fused q/k/v and gate/up matrices
    while the current thread is inside a `with` block of this object.

    As with `FewPositionLinears`, nothing changes for other code: while some thread is inside a block each supported
    layer's `forward` is an instance attribute that runs the class's own `forward` for every other thread, and for
    any call it does not compute itself (gradients, autocast, an attention implementation other than SDPA, extra
    keywords, dropout in training). The fused copies (and, with `prepack`, their packed copies) are made by the
    constructor and again on block entry for layers whose weights were replaced or updated in place since; the
    weights must not change while a block is open. Their memory is that of the q/k/v and gate/up weights, once more
    per copy. `fused_linears` names the linears whose products the fused copies make, so that a `FewPositionLinears`
    beside this block need not pack them too.

    Args:
        module: the model, or any part of it.
        prepack: keep packed copies of the fused matrices where a row count runs fastest packed.
    """

    def __init__(self, module: nn.Module, prepack: bool = True) -> None:
        self._layers = [_FusedLayer(child) for child in module.modules() if is_supported_layer(child)]
        for fused in self._layers:
            fused.forward = self._forward_for(fused)
        self._prepack = prepack
        self._timed_threads: int | None = None
        super().__init__()
        self._refresh()

    @property
    def fused_linears(self) -> list[nn.Linear]:
        """The q, k, v, gate and up projections of the fused layers."""
        return [linear for fused in self._layers for linear in (*fused.qkv_linears, *fused.gate_up_linears)]

    @property
    def copied_bytes(self) -> int:
        """Memory held by the fused copies and their packed copies."""
        products = [product for fused in self._layers for product in (fused.qkv, fused.gate_up)]
        tensors = [t for p in products for t in (p.weight, p.bias, p.packed) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _open(self) -> None:
        self._refresh()
        for fused in self._layers:
            vars(fused.layer)["forward"] = fused.forward

    def _close(self) -> None:
        for fused in self._layers:
            vars(fused.layer).pop("forward", None)

    def _refresh(self) -> None:
        """(Re)make the fused copies of layers whose weights changed; time their shapes' forms at the current thread
        count if not yet done, and look up the choice and pack where either changed."""
        stale = [fused for fused in self._layers if fused.made_for != fused.weights_state()]
        for fused in stale:
            fused.qkv, fused.gate_up = _stacked(fused.qkv_linears), _stacked(fused.gate_up_linears)
            fused.made_for = fused.weights_state()
        threads = torch.get_num_threads()
        if threads != self._timed_threads:
            tune_forms(product.weight for fused in self._layers for product in (fused.qkv, fused.gate_up))
            self._timed_threads = threads
            stale = self._layers
        for fused in stale:
            for product in (fused.qkv, fused.gate_up):
                product.choice, product.packed = chosen_form(product.weight, self._prepack)

    def _forward_for(self, fused: _FusedLayer) -> Callable[..., torch.Tensor]:
        layer = fused.layer
        attention, mlp = layer.self_attn, layer.mlp
        class_forward = type(layer).forward
        heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
        head_dim = attention.head_dim
        groups = heads // kv_heads
        query_norm, key_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)

        def forward(
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.LongTensor | None = None,
            past_key_values: Any = None,
            use_cache: bool | None = False,
            position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            if (
                not getattr(self._thread, "depth", 0)
                or kwargs
                or position_embeddings is None
                or attention.config._attn_implementation not in _SDPA_NAMES
                or (attention.training and attention.attention_dropout)
                or torch.is_grad_enabled()
                or torch.is_autocast_enabled(hidden_states.device.type)
                or hidden_states.dtype != fused.qkv.weight.dtype
            ):
                return class_forward(
                    layer,
                    hidden_states,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=past_key_values,
                    use_cache=use_cache,
                    position_embeddings=position_embeddings,
                    **kwargs,
                )
            batch, positions = hidden_states.shape[:2]
            qkv = fused.qkv(_norm(layer.input_layernorm, hidden_states))
            qkv = qkv.view(batch, positions, -1, head_dim)
            query_key = qkv[:, :, : heads + kv_heads]
            if query_norm is not None:
                query_key = torch.cat(
                    (_norm(query_norm, qkv[:, :, :heads]), _norm(key_norm, qkv[:, :, heads : heads + kv_heads])), 2
                )
            qkv = qkv.transpose(1, 2)
            cos, sin = position_embeddings
            rotated = _rotate(query_key.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
            query, key, value = rotated[:, :heads], rotated[:, heads:], qkv[:, heads + kv_heads :]
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, attention.layer_idx)
            # As transformers' SDPA attention: no mask means every cached position is seen (one new position) or,
            # for several, a causal mask from the first key on.
            attended = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=attention_mask,
                scale=attention.scaling,
                is_causal=positions > 1 and attention_mask is None,
                enable_gqa=groups > 1,
            )
            attended = attended.transpose(1, 2).reshape(batch, positions, heads * head_dim)
            hidden_states = hidden_states + attention.o_proj(attended)
            gate_up = fused.gate_up(_norm(layer.post_attention_layernorm, hidden_states))
            gate, up = gate_up.chunk(2, dim=-1)
            return hidden_states + mlp.down_proj(mlp.act_fn(gate) * up)

        return forward


def decoding_products(module: nn.Module, prepack: bool = True) -> tuple[FusedDecoderLayers, FewPositionLinears]:
    """The two scopes the products of decoding run in: supported layers from their fused copies
    (`FusedDecoderLayers`), every other linear in its timed form (`FewPositionLinears`, which leaves the fused
    linears alone rather than pack them a second time). Enter both, the fused layers first (`entered_together`)."""
    layers = FusedDecoderLayers(module, prepack=prepack)
    return layers, FewPositionLinears(module, prepack=prepack, exclude=layers.fused_linears)
