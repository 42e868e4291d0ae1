"""Measuring what a decoding step costs on this machine, so that calibration can weigh time against accuracy."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache

from ..confidence import get_confidence_metric
from ..generation.thresholds import ExitCosts
from ..heads import exit_logits
from ..modeling_early_exit import EarlyExitForCausalLM
from ..pruning import VocabPruner, VocabPruningConfig


def _milliseconds(work: Callable[[], object], repeats: int) -> float:
    """The median time of `work` over `repeats` runs after one warm-up, in milliseconds."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


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
    `kernels` (as `generate` runs them): a decoder layer for one and for two positions, each exit's head and `metric`
    over the tokens it scores under `vocab_pruning`, and the final head. Layers are timed in the middle of the stack,
    each run cut back out of the cache afterwards."""
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
    middle = model.num_layers // 2

    def layer_for(positions: int) -> Callable[[], object]:
        ids = torch.randint(0, model.vocab_size, (1, positions), device=device)
        position_ids = torch.arange(context, context + positions, device=device)[None]
        hidden, inputs = decoder.start(ids, None, position_ids, cache)

        def run() -> None:
            decoder.layer(middle, hidden, inputs)
            cache.layers[middle].crop(-positions)  # back to `context` positions

        return run

    layer_ms = _milliseconds(layer_for(1), repeats)
    carry_fraction = max(_milliseconds(layer_for(2), repeats) / layer_ms - 1.0, 0.0)

    confidence = get_confidence_metric(metric)
    pruner = VocabPruner(vocab_pruning, model.exit_layers, model.vocab_size)
    hidden = torch.randn(1, 1, model.hidden_size, device=device, dtype=model.dtype)
    head_ms, token_ids = [], None
    for index, head in enumerate(model.exit_heads.values()):
        token_ids = pruner.scored_tokens(index, token_ids, device)

        def score(head=head, token_ids=token_ids, index=index) -> torch.Tensor:
            logits = exit_logits(head, hidden, decoder, token_ids)
            confidence(logits, hidden, hidden)
            return pruner.next_tokens(index, logits, token_ids)

        head_ms.append(_milliseconds(score, repeats))
        token_ids = score()
    final_head_ms = _milliseconds(lambda: decoder.final_logits(hidden), repeats)
    return ExitCosts(layer_ms, carry_fraction, head_ms, final_head_ms, pruner.prune_index)
