"""`EarlyExitForCausalLM.generate`: the base model's own `generate`, with a decoding loop that leaves early.

`transformers`' `generate` prepares everything (generation config, special tokens, attention mask and positions for
left-padded batches, logits processors, stopping criteria, the cache) and then hands over to a decoding function;
`custom_generate` is its supported way to plug one in. The loop below mirrors `transformers`' own sampling loop
token for token, so a policy that never exits reproduces `base.generate` exactly, greedy or sampled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..transformers_compat import CACHE_NAME
from .decoding import DecodingStatistics, LayerwiseDecoder, start_decoding
from .lookup import PromptLookup
from .options import ExitDecodingConfig
from .policy import resolve_exit_policy
from .speculative import speculative_decoding_function

if TYPE_CHECKING:
    from ..architectures import DecoderAdapter
    from ..configuration_early_exit import EarlyExitConfig


@dataclass
class EarlyExitGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s output with `return_dict_in_generate=True`: `transformers`' fields plus where tokens left.

    Args:
        exit_layers: (batch, new tokens) the layer whose logits chose each generated token (the model's depth for
            full-depth tokens, 0 after a row finished).
        layers_run: (new tokens,) how many layers the batch ran for each generated token.
        layer_seconds: time in decoder layers.
        head_seconds: time in exit heads and confidence metrics.
        fill_seconds: time filling skipped layers' caches (state propagation or the final deferred fill).
    """

    exit_layers: torch.LongTensor | None = None
    layers_run: torch.LongTensor | None = None
    layer_seconds: float | None = None
    head_seconds: float | None = None
    fill_seconds: float | None = None


def early_exit_sampling(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: BaseStreamer | None = None,
    *,
    layerwise: LayerwiseDecoder,
    token_streamer: BaseStreamer | None = None,
    **model_kwargs,
) -> EarlyExitGenerateOutput | torch.LongTensor:
    """The decoding function `generate` calls (greedy or multinomial sampling), with `layerwise` choosing each
    token's exit. `model` is the base model `generate` was called on.

    `generate` keeps its `streamer` from callables passed as `custom_generate`, so the streamer comes as
    `token_streamer` instead, and this loop also streams the prompt, as `generate` would have."""
    streamer = streamer or token_streamer
    attention_mask, position_ids, cache = start_decoding(model, input_ids, generation_config, synced_gpus, model_kwargs)
    if token_streamer is not None:
        token_streamer.put(input_ids.cpu())
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)

    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    next_logits = layerwise.prefill(input_ids, attention_mask, position_ids, cache)
    while True:
        next_logits = next_logits.to(copy=True, dtype=torch.float32, device=input_ids.device)
        next_scores = logits_processor(input_ids, next_logits)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (next_logits,)
        if generation_config.do_sample:
            next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, next_scores)
        if unfinished.max() == 0:
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=-1)
        next_logits = layerwise.step(input_ids[:, -1:], attention_mask, position_ids, cache, unfinished)
    layerwise.finish()
    if streamer is not None:
        streamer.end()
    if not return_dict:
        return input_ids
    stats: DecodingStatistics = layerwise.stats
    # The first new token comes from the prompt's full-depth pass.
    first_exit = torch.full_like(unfinished, layerwise.num_layers)
    return EarlyExitGenerateOutput(
        sequences=input_ids,
        scores=scores,
        logits=raw_logits,
        **{CACHE_NAME: cache},
        exit_layers=torch.stack([first_exit, *stats.exit_layers], dim=1),
        layers_run=torch.tensor([layerwise.num_layers, *stats.layers_run]),
        layer_seconds=stats.layer_seconds,
        head_seconds=stats.head_seconds,
        fill_seconds=stats.fill_seconds,
    )


def decoding_function(layerwise: LayerwiseDecoder, streamer: BaseStreamer | None = None):
    """The `custom_generate` callable that makes `base.generate` decode with `layerwise`, streaming to `streamer`."""
    return partial(early_exit_sampling, layerwise=layerwise, token_streamer=streamer)


def generate_with_exits(
    base: nn.Module,
    decoder: DecoderAdapter,
    heads: Mapping[int, nn.Module],
    config: EarlyExitConfig,
    options: ExitDecodingConfig,
    inputs: torch.LongTensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    streamer: BaseStreamer | None = None,
    prompt_lookup: PromptLookup | None = None,
    **kwargs,
) -> EarlyExitGenerateOutput | torch.LongTensor:
    """`base.generate(...)` with the decoding loop `options` ask for plugged in, running `decoder` layer by layer with
    the exit `heads` (by layer number) described by `config` (see `EarlyExitForCausalLM.generate`); with
    `options.speculative`, `prompt_lookup` adds drafts copied from the context. The other arguments are `generate`'s
    own.

    Raises:
        CalibrationError: a level the heads are not calibrated for.
        InvalidOptionError: `options` that do not fit these heads.
    """
    policy = resolve_exit_policy(config, decoder.num_layers, options)
    layerwise = LayerwiseDecoder(decoder, heads, policy, options.kv_strategy)
    if options.speculative:
        decode = speculative_decoding_function(layerwise, options.max_draft_tokens, prompt_lookup, streamer)
    else:
        decode = decoding_function(layerwise, streamer)
    return base.generate(
        inputs,
        generation_config=generation_config,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        custom_generate=decode,
        **kwargs,
    )
