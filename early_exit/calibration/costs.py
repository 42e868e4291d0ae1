"""Measuring what a decoding step costs on this machine, so that calibration can weigh time against accuracy."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache

from ..confidence import get_confidence_metric
from ..generation.thresholds import ExitCosts
from ..heads import exit_logits
from ..modeling_early_exit import EarlyExitForCausalLM
from ..pruning import VocabPruner, VocabPruningConfig


def _milliseconds(works: list[Callable[[], object]], rounds: int) -> list[float]:
    """The fastest time of each of `works` over `rounds` rounds that run each once in turn, after one warm-up round,
    in milliseconds. Interleaved, so that a burst of load from other tenants of the machine hits every part alike; the
    minimum, because load only ever adds time."""
    best = [float("inf")] * len(works)
    for round_index in range(rounds + 1):
        for index, work in enumerate(works):
            started = time.perf_counter()
            work()
            if round_index:  # the first round warms up
                best[index] = min(best[index], time.perf_counter() - started)
    return [1000 * seconds for seconds in best]


@torch.no_grad()
def measure_exit_costs(
    model: EarlyExitForCausalLM,
    metric: str,
    vocab_pruning: VocabPruningConfig | None = None,
    context: int = 128,
    repeats: int = 20,
    kernels: str = "packed",
) -> ExitCosts:
    """Time one decoding step's parts at batch size 1 after `context` cached positions, with the matmul forms
    `kernels` (as `generate` runs them): a decoder layer for one and for two positions (a pass through all layers, as
    decoding streams them, over their number), each exit's head and `metric` over the tokens it scores under
    `vocab_pruning`, and the final head, each the fastest of `repeats` rounds that run every part in turn. Each pass
    is cut back out of the cache afterwards."""
    model.eval()
    with model.decoding_kernels(kernels):
        return _measure(model, metric, vocab_pruning, context, repeats)


def _measure(
    model: EarlyExitForCausalLM, metric: str, vocab_pruning: VocabPruningConfig | None, context: int, repeats: int
) -> ExitCosts:
    decoder = model.decoder
    device = model.device
    cache = DynamicCache(config=decoder.config)
    prompt = torch.randint(0, model.vocab_size, (1, context), device=device)
    for _ in model.iter_layers(prompt, past_key_values=cache):
        pass

    def pass_for(positions: int) -> Callable[[], object]:
        ids = torch.randint(0, model.vocab_size, (1, positions), device=device)
        position_ids = torch.arange(context, context + positions, device=device)[None]
        hidden, inputs = decoder.start(ids, None, position_ids, cache)

        def run() -> None:
            layer_hidden = hidden
            for index in range(model.num_layers):
                layer_hidden = decoder.layer(index, layer_hidden, inputs)
            for layer in cache.layers[: model.num_layers]:  # back to `context` positions (heads' slots untouched)
                layer.crop(-positions)

        return run

    confidence = get_confidence_metric(metric)
    pruner = VocabPruner(vocab_pruning, model.exit_layers, model.vocab_size)
    hidden = torch.randn(1, 1, model.hidden_size, device=device, dtype=model.dtype)
    scores, token_ids = [], None
    for index, head in enumerate(model.exit_heads.values()):
        token_ids = pruner.scored_tokens(index, token_ids, device)

        def score(head=head, token_ids=token_ids, index=index) -> torch.Tensor:
            logits = exit_logits(head, hidden, decoder, token_ids)
            confidence(logits, hidden, hidden)
            return pruner.next_tokens(index, logits, token_ids)

        scores.append(score)
        token_ids = score()  # what the next exit scores

    def final_head() -> torch.Tensor:
        return decoder.final_logits(hidden)

    one, two, *head_ms, final_head_ms = _milliseconds([pass_for(1), pass_for(2), *scores, final_head], repeats)
    layer_ms, carry_fraction = one / model.num_layers, max(two / one - 1.0, 0.0)
    return ExitCosts(layer_ms, carry_fraction, head_ms, final_head_ms, pruner.prune_index)
