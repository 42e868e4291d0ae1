"""Exit heads: small modules that turn the hidden state after an intermediate layer into next-token logits.

Heads are adapters in the PEFT sense: they never modify or copy the base model's weights. A head that reuses the
base's final norm and LM head receives them through the `DecoderAdapter` at call time, so they are neither
registered as the head's submodules nor saved with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..kernels import project_rows
from ..registry import Registry

if TYPE_CHECKING:
    from ..architectures import DecoderAdapter, LayerInputs
    from ..configuration_early_exit import EarlyExitConfig


class ExitHead(nn.Module):
    """Base class of exit heads.

    Subclasses implement `build` (construct a head for a given base model, config and exit layer) and `forward`.
    """

    #: The `EarlyExitConfig` fields that size this type of head (the model card names their values).
    size_settings: tuple[str, ...] = ()

    @classmethod
    def build(cls, decoder: DecoderAdapter, config: EarlyExitConfig, layer: int) -> ExitHead:
        """A new head for the exit after `layer` of the base model behind `decoder`, configured by `config`."""
        raise NotImplementedError

    def forward(
        self, hidden: torch.Tensor, decoder: DecoderAdapter, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits over the vocabulary from the hidden state `hidden` (batch, seq, hidden_size); with `token_ids`
        (batch, seq, k), over those tokens only (vocabulary pruning)."""
        raise NotImplementedError


#: Head type name (`EarlyExitConfig.head_type`) -> `ExitHead` subclass.
HEAD_TYPES: Registry[type[ExitHead]] = Registry(
    "head type", "add one with @early_exit.register_head_type('<name>') on an ExitHead subclass."
)
HeadClass = TypeVar("HeadClass", bound=type[ExitHead])


def register_head_type(name: str) -> Callable[[HeadClass], HeadClass]:
    """Class decorator: make an `ExitHead` subclass available as `EarlyExitConfig(head_type=name)`.

    Raises:
        DuplicateNameError: a head type of that name is already registered.
    """
    return HEAD_TYPES.register(name)


def build_head(decoder: DecoderAdapter, config: EarlyExitConfig, layer: int) -> ExitHead:
    """A head of the type `config` gives the exit after `layer`, on the base model's device and in its dtype.

    Raises:
        UnknownNameError: the head type is not registered (the message lists the known ones).
    """
    weight = decoder.lm_head.weight
    return (
        HEAD_TYPES[config.head_type_at(layer)]
        .build(decoder, config, layer)
        .to(device=weight.device, dtype=weight.dtype)
    )


def exit_logits(
    head: nn.Module,
    hidden: torch.Tensor,
    decoder: DecoderAdapter,
    token_ids: torch.Tensor | None = None,
    inputs: LayerInputs | None = None,
) -> torch.Tensor:
    """`head`'s logits from the hidden state after its layer (batch, seq, hidden); with `token_ids` (batch, seq, k),
    only those tokens' logits (vocabulary pruning).

    `inputs` (masks, positions and cache of the positions in `hidden`) matter only to a `ContextHead`, which attends
    over them; without them it reads `hidden` as whole sequences starting at position 0.
    """
    if isinstance(head, ContextHead):
        return head(hidden, decoder, token_ids, inputs)
    # Heads written without vocabulary pruning in mind take two arguments; they still work unpruned.
    return head(hidden, decoder) if token_ids is None else head(hidden, decoder, token_ids)


@register_head_type("logit_lens")
class LogitLensHead(ExitHead):
    """No parameters: the base's own final norm and LM head applied to the intermediate state (LITE-style models)."""

    @classmethod
    def build(cls, decoder: DecoderAdapter, config: EarlyExitConfig, layer: int) -> LogitLensHead:
        return cls()

    def forward(
        self, hidden: torch.Tensor, decoder: DecoderAdapter, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return decoder.final_logits(hidden, token_ids)


@register_head_type("residual_adapter")
class ResidualAdapterHead(LogitLensHead):
    """`h + up(silu(down(rmsnorm(h))))`, then the base's final norm and LM head.

    `up` starts at zero, so an untrained head is exactly the logit lens and training learns a correction. The
    adapter's own RMSNorm keeps the bottleneck's input on one scale whatever the depth of its layer.
    """

    size_settings = ("adapter_size",)

    def __init__(self, hidden_size: int, adapter_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.down = nn.Linear(hidden_size, adapter_size, bias=False)
        self.up = nn.Linear(adapter_size, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    @classmethod
    def build(cls, decoder: DecoderAdapter, config: EarlyExitConfig, layer: int) -> ResidualAdapterHead:
        return cls(decoder.hidden_size, config.adapter_size or decoder.hidden_size)

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """The corrected hidden state that the base's final norm and LM head then read."""
        return hidden + self.up(nn.functional.silu(self.down(self.norm(hidden))))

    def forward(
        self, hidden: torch.Tensor, decoder: DecoderAdapter, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super().forward(self.adapt(hidden), decoder, token_ids)


@register_head_type("linear")
class LinearHead(ExitHead):
    """An independent LayerNorm and Linear(d, V) per exit, as in Valade (2024): large, but owes nothing to the base.

    The projection starts as a copy of the base's unembedding when the shapes allow, so training starts near the
    logit lens instead of from noise; the copy belongs to the head (the base is left untouched).
    """

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, vocab_size, bias=False)

    @classmethod
    def build(cls, decoder: DecoderAdapter, config: EarlyExitConfig, layer: int) -> LinearHead:
        head = cls(decoder.hidden_size, decoder.vocab_size)
        unembedding = decoder.lm_head.weight
        if unembedding.shape == head.proj.weight.shape:
            with torch.no_grad():
                head.proj.weight.copy_(unembedding)
        return head

    def forward(
        self, hidden: torch.Tensor, decoder: DecoderAdapter, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        normed = self.norm(hidden)
        return self.proj(normed) if token_ids is None else project_rows(normed, self.proj.weight, None, token_ids)


class ContextHead(ExitHead):
    """An exit head that reads earlier positions too, and so keeps keys and values of its own in the KV cache.

    When a decoding run scores the head's exit, it runs `attend` over every position that passes the exit layer
    (including prompt and deferred-fill positions that never stop there), so the head's cache holds what a full
    pass over the same tokens would give it, and `readout` on the position being scored.

    A head keeps its keys and values in one cache layer, whose attention pattern is `layer_type`, or in several
    (one per attention layer of its own, as `cache_layer_types` lists them).

    Attributes:
        layer_type: the attention pattern of the head's own attention ("full_attention" or "sliding_attention"), for a
            head with one cache layer; a head with several overrides `cache_layer_types` instead.
    """

    layer_type: str

    @property
    def cache_layer_types(self) -> tuple[str, ...]:
        """The attention pattern of each cache layer the head writes, in order (by default one: `layer_type`).
        `attend` reaches the i-th as `inputs.cache.layer(i)`, and `inputs.attention_masks` holds a mask for each
        pattern listed."""
        return (self.layer_type,)

    def attend(self, hidden: torch.Tensor, decoder: DecoderAdapter, inputs: LayerInputs) -> torch.Tensor:
        """The head's state at the positions of `hidden` (after its exit layer), given `inputs` for them (masks,
        positions, and the cache the head's keys and values go to, a `SlotCache`, or `None`)."""
        raise NotImplementedError

    def propagate(self, hidden: torch.Tensor, decoder: DecoderAdapter, inputs: LayerInputs) -> None:
        """Write to `inputs.cache` the keys and values the head would compute from `hidden`, and nothing else (state
        propagation for positions that left before the head's exit layer)."""
        raise NotImplementedError

    def readout(
        self, state: torch.Tensor, decoder: DecoderAdapter, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits from the head's state (over `token_ids` only, when given)."""
        raise NotImplementedError

    def forward(
        self,
        hidden: torch.Tensor,
        decoder: DecoderAdapter,
        token_ids: torch.Tensor | None = None,
        inputs: LayerInputs | None = None,
    ) -> torch.Tensor:
        if inputs is None:  # whole sequences from position 0, as training and calibration hand them over
            positions = decoder.default_position_ids(None, 0, hidden.shape[1], hidden.device)
            inputs = decoder.prepare(hidden, None, positions, None)
        return self.readout(self.attend(hidden, decoder, inputs), decoder, token_ids)


@register_head_type("attention")
class AttentionHead(ContextHead):
    """Decoder blocks of the head's own after the exit layer (self-attention over the context, then an MLP), then the
    base's final norm and LM head: the shape of Kangaroo's and EAGLE's drafters (one block, by default).

    The blocks start as copies of the base's last layers (`EarlyExitConfig.attention_blocks` of them), so an untrained
    head runs the end of the stack on the exit's state. One copy of the last layer trains to closer agreement than a
    copy of the layer right after the exit (on SmolLM2-135M at layer 15 of 30, same data and steps: 41.1% against
    39.6% top-1, KL 2.04 against 2.60), and three blocks to closer still (46.1%); see docs/training.md. The copies
    belong to the head: the base is untouched.
    """

    size_settings = ("attention_blocks",)

    def __init__(self, blocks: list[nn.Module], layer_types: list[str]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.layer_types = tuple(layer_types)

    @classmethod
    def build(cls, decoder: DecoderAdapter, config: EarlyExitConfig, layer: int) -> AttentionHead:
        count = config.attention_blocks or 1
        if count > decoder.num_layers:
            raise InvalidOptionError(
                f"attention_blocks={count} asks for copies of more layers than the base model has "
                f"({decoder.num_layers}); use at most {decoder.num_layers}."
            )
        copied = range(decoder.num_layers - count, decoder.num_layers)
        return cls(
            [copy.deepcopy(decoder.layers[index]).requires_grad_(True) for index in copied],
            [decoder.layer_type(index) for index in copied],
        )

    @property
    def cache_layer_types(self) -> tuple[str, ...]:
        return self.layer_types

    def attend(self, hidden: torch.Tensor, decoder: DecoderAdapter, inputs: LayerInputs) -> torch.Tensor:
        for index, (block, layer_type) in enumerate(zip(self.blocks, self.layer_types)):
            hidden = decoder.run_block(block, layer_type, hidden, _block_inputs(inputs, index))
        return hidden

    def propagate(self, hidden: torch.Tensor, decoder: DecoderAdapter, inputs: LayerInputs) -> None:
        # As for the base's skipped layers (CALM), every block's keys and values come from the exited state.
        for index, (block, layer_type) in enumerate(zip(self.blocks, self.layer_types)):
            decoder.propagate_block_kv(block, layer_type, hidden, _block_inputs(inputs, index))

    def readout(
        self, state: torch.Tensor, decoder: DecoderAdapter, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return decoder.final_logits(state, token_ids)


def _block_inputs(inputs: LayerInputs, index: int) -> LayerInputs:
    """`inputs` for a head's `index`-th attention layer: the cache routed to that layer's slot."""
    return inputs if inputs.cache is None else replace(inputs, cache=inputs.cache.layer(index))
