"""One decoding step through the layers, leaving at the first confident exit, with the KV cache kept right.

The cache of a layer must hold every earlier position, but a token that leaves at exit `e` never runs the layers
after `e`. Two ways to fill the gap (`kv_strategy`):

- "deferred" (exact): the token's hidden state after its last layer is kept, and the next token that runs deeper
  carries it through the layers it missed, as one chunk of consecutive positions (on a CPU or GPU at batch size 1,
  a layer costs about the same for a few positions as for one). Before the cache is handed back, `finish` runs
  whatever is still pending to full depth. The cache then equals a full forward pass's, and every token's own
  computation is the full model's: only the exit heads' guesses differ from it.
- "propagate" (CALM's state propagation, approximate): each skipped layer's keys and values are computed from the
  exited hidden state, at the cost of its key/value projections only.

In a batch every row makes its own decision: a row whose exit is confident takes its token there, and the batch
stops at the first exit where every unfinished row has decided. Rows that decided earlier keep running with the
others until then (at no extra time: the layers run for the batch anyway), so the batch's cache stays rectangular.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache

from ..heads import SlotCache, exit_logits, head_cache_slots, head_inputs, open_head_slots
from ..pruning import VocabPruner, exits_to_score, scatter_to_vocabulary
from ..transformers_compat import CACHE_NAME
from .policy import ExitPolicy

if TYPE_CHECKING:
    from ..architectures import DecoderAdapter


@dataclass
class DecodingStatistics:
    """What a decoding run spent, step by step.

    Attributes:
        exit_layers: per generated token, (batch,) the layer whose logits chose it (the model's depth for full-depth
            tokens; 0 for rows that had already finished).
        layers_run: per generated token, how many layers the batch ran for it.
        layer_seconds: time in decoder layers (including deferred positions carried along by deeper tokens).
        head_seconds: time in exit heads and confidence metrics.
        fill_seconds: time filling skipped layers' caches (state propagation, and the final deferred fill).
    """

    exit_layers: list[torch.Tensor] = field(default_factory=list)
    layers_run: list[int] = field(default_factory=list)
    layer_seconds: float = 0.0
    head_seconds: float = 0.0
    fill_seconds: float = 0.0


class _PendingPositions:
    """Positions whose deep layers have not run yet, as runs of consecutive positions that have been through the
    same number of layers. A pass that reaches layer `l` carries every earlier position to `l`, so earlier runs have
    always been through at least as many layers as later ones."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, int, torch.Tensor]] = []  # (layers run, first position, hidden state after them)

    def add(self, layers_run: int, start: int, hidden: torch.Tensor) -> None:
        """Add the positions from `start` on (after every pending one), merged into the last run if it has been
        through as many layers."""
        if self.runs and self.runs[-1][0] == layers_run:
            _, first, previous = self.runs.pop()
            start, hidden = first, torch.cat([previous, hidden], dim=1)
        self.runs.append((layers_run, start, hidden))

    def take(self, layers_run: int) -> tuple[int, torch.Tensor] | None:
        """Remove and return `(first position, hidden)` of the run that has been through `layers_run` layers."""
        for index, (run_layers, start, hidden) in enumerate(self.runs):
            if run_layers == layers_run:
                del self.runs[index]
                return start, hidden
        return None

    def __bool__(self) -> bool:
        return bool(self.runs)


@dataclass
class _ExitSearch:
    """The state of one step's search for an exit, per row."""

    decided: torch.Tensor  # (batch,) bool: the row has its token (or needs none)
    exit_layers: torch.Tensor  # (batch,) long
    logits: torch.Tensor | None = None  # (batch, vocab) of decided rows
    token_ids: torch.Tensor | None = None  # (batch, 1, k) or (k,): tokens the next exit scores (vocabulary pruning)
    previous_hidden: torch.Tensor | None = None  # the last scored exit's hidden state (for saturation)


class LayerwiseDecoder:
    """Runs a model with exit heads one token at a time, layer by layer, under an `ExitPolicy`.

    Args:
        decoder: the base model's layer-by-layer adapter.
        heads: the exit head after each exit layer, by layer number.
        policy: where tokens may leave.
        kv_strategy: "deferred" (exact) or "propagate" (see the module docstring); checked by `ExitDecodingConfig`.
    """

    def __init__(
        self,
        decoder: DecoderAdapter,
        heads: Mapping[int, nn.Module],
        policy: ExitPolicy,
        kv_strategy: str = "deferred",
    ) -> None:
        self.decoder = decoder
        self.heads = heads
        self.policy = policy
        self.kv_strategy = kv_strategy
        self.pruner = VocabPruner(policy.vocab_pruning, policy.exit_layers, self.decoder.vocab_size)
        scored = exits_to_score(policy.active_exits, self.pruner.prune_index)
        self.exit_index = {policy.exit_layers[index]: index for index in scored}
        # Heads that attend keep their own keys and values, but only the scored ones need them this run.
        self.head_slots = {
            layer: slot
            for layer, slot in head_cache_slots(heads, decoder.num_layers).items()
            if layer in self.exit_index
        }
        self.pending = _PendingPositions()
        self.stats = DecodingStatistics()
        # The mask, positions and cache of the last step, which the final deferred fill runs with.
        self._last_inputs: tuple | None = None

    @property
    def num_layers(self) -> int:
        return self.decoder.num_layers

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache,
    ) -> torch.Tensor:
        """Run the prompt through every layer (its cache must be exact); returns the final logits at its last
        position, (batch, vocab)."""
        open_head_slots(cache, self.heads, self.decoder, in_use=self.head_slots)
        past = cache.get_seq_length()
        hidden = self.decoder.embed(input_ids[:, past:], position_ids[:, past:])
        hidden, _, _ = self._run_layers(hidden, past, attention_mask, position_ids, cache)
        return self.decoder.final_logits(hidden[:, -1:])[:, 0]

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache,
        unfinished: torch.Tensor,
    ) -> torch.Tensor:
        """Decode the newest token of each row (`input_ids`, (batch, 1)), leaving at the first confident exit.

        Args:
            attention_mask: (batch, positions so far) or `None` when nothing is padded.
            position_ids: (batch, positions so far), the newest last.
            cache: the KV cache the prompt was prefilled into.
            unfinished: (batch,) rows still generating; finished rows never hold the batch back.

        Returns:
            (batch, vocab) logits for the next token: the exit's (-inf outside the kept tokens when the vocabulary
            was pruned) or the final layer's.
        """
        search, chunk, layers, inputs = self._search(input_ids, attention_mask, position_ids, cache, unfinished)
        if layers < self.num_layers and self.kv_strategy == "propagate":
            started = time.perf_counter()
            newest = self.pending.take(layers)[1]
            for index in range(layers, self.num_layers):
                self.decoder.propagate_kv(index, newest, inputs)
            for layer, slot in self.head_slots.items():
                if layer > layers:
                    self.heads[layer].propagate(newest, self.decoder, replace(inputs, cache=SlotCache(cache, slot)))
            self.stats.fill_seconds += time.perf_counter() - started
        if layers == self.num_layers:
            final = self.decoder.final_logits(chunk[:, -1:])[:, 0]
            self._decide(search, ~search.decided, final, self.num_layers)
        return search.logits

    @torch.no_grad()
    def draft(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache,
        unfinished: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One step of self-speculative drafting (deferred cache only): run the newest token until every unfinished
        row's exit is confident, or, when some row's never is, on to full depth, carrying every pending position.

        Returns:
            `(exit logits, None)` for a draft, (batch, vocab) as `step` returns them; or `(None, final logits)`
            when the pass reached full depth: (batch, positions, vocab) for every position that was pending, in
            order, the newest last. That pass verifies all of them at once.
        """
        search, chunk, layers, _ = self._search(input_ids, attention_mask, position_ids, cache, unfinished)
        if layers < self.num_layers:
            return search.logits, None
        return None, self.decoder.final_logits(chunk)

    @torch.no_grad()
    def verify(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache,
    ) -> torch.Tensor:
        """Run the newest tokens (`input_ids`, (batch, new)) and every pending position through the whole model in
        one pass; returns their final logits, (batch, positions, vocab), the newest last."""
        new = input_ids.shape[1]
        hidden = self.decoder.embed(input_ids, position_ids[:, -new:])
        chunk, _, _ = self._run_layers(hidden, position_ids.shape[1] - new, attention_mask, position_ids, cache)
        return self.decoder.final_logits(chunk)

    @torch.no_grad()
    def finish(self) -> None:
        """Run every position still pending through the layers it skipped (deferred fill), so that the cache holds
        exactly what a full forward pass would."""
        if not self.pending:
            return
        started, layer_seconds, head_seconds = time.perf_counter(), self.stats.layer_seconds, self.stats.head_seconds
        attention_mask, position_ids, cache = self._last_inputs
        self._run_layers(None, position_ids.shape[1], attention_mask, position_ids, cache)
        self.stats.fill_seconds += time.perf_counter() - started
        # The final fill counts as fill time only.
        self.stats.layer_seconds, self.stats.head_seconds = layer_seconds, head_seconds

    # --- internals -------------------------------------------------------------------------------------------
    def _search(self, input_ids, attention_mask, position_ids, cache, unfinished):
        """Run the newest token through the layers until every unfinished row has decided at an exit, or to full
        depth. Returns the search, the chunk's hidden state, the layers run and the layer inputs last used."""
        end = position_ids.shape[1]
        hidden = self.decoder.embed(input_ids, position_ids[:, -1:])
        batch = input_ids.shape[0]
        search = _ExitSearch(
            decided=~unfinished.bool(),
            exit_layers=torch.zeros(batch, dtype=torch.long, device=input_ids.device),
        )
        chunk, layers, inputs = self._run_layers(
            hidden,
            end - 1,
            attention_mask,
            position_ids,
            cache,
            stop=lambda layer, chunk, attended: self._exit(layer, chunk, attended, search),
        )
        self.stats.exit_layers.append(search.exit_layers)
        self.stats.layers_run.append(layers)
        self._last_inputs = (attention_mask, position_ids, cache)
        return search, chunk, layers, inputs

    def _run_layers(self, hidden, start, attention_mask, position_ids, cache, stop=None):
        """Run the positions from `start` on (entering layer 0 as `hidden`, or none) through the layers, picking up
        pending positions at the layers they stopped before. Returns the chunk's hidden state, the number of layers
        run, and the layer inputs last used. Stops after a layer where `stop(layer, chunk, head state)` is true
        (the state of the head there if it attends, else `None`), leaving the chunk pending there."""
        end = position_ids.shape[1]
        if hidden is not None:
            self.pending.add(0, start, hidden)
        chunk, chunk_start, inputs = None, end, None
        for index in range(self.num_layers):
            run = self.pending.take(index)
            if run is not None:
                chunk_start = run[0]
                chunk = run[1] if chunk is None else torch.cat([run[1], chunk], dim=1)
                inputs = None
            if chunk is None:
                continue
            if inputs is None:
                inputs = self.decoder.prepare(
                    chunk, attention_mask, position_ids[:, chunk_start:end], cache, layer_index=index
                )
            started = time.perf_counter()
            chunk = self.decoder.layer(index, chunk, inputs)
            self.stats.layer_seconds += time.perf_counter() - started
            attended = self._attend(index + 1, chunk, inputs, attention_mask)
            if stop is not None and index + 1 < self.num_layers and stop(index + 1, chunk, attended):
                self.pending.add(index + 1, chunk_start, chunk)
                return chunk, index + 1, inputs
        return chunk, self.num_layers, inputs

    def _attend(self, layer, chunk, inputs, attention_mask) -> torch.Tensor | None:
        """Run the head after `layer`, if it attends, over every position of the chunk (its cache must hold them all);
        returns its state, or `None` for other heads."""
        slot = self.head_slots.get(layer)
        if slot is None:
            return None
        started = time.perf_counter()
        head = self.heads[layer]
        state = head.attend(chunk, self.decoder, head_inputs(self.decoder, head, chunk, inputs, attention_mask, slot))
        self.stats.head_seconds += time.perf_counter() - started
        return state

    def _exit(self, layer: int, chunk: torch.Tensor, attended: torch.Tensor | None, search: _ExitSearch) -> bool:
        """Score the exit after `layer` for the newest position (from the head's state when it attends); returns
        whether every row has now decided."""
        index = self.exit_index.get(layer)
        if index is None:
            return False
        started = time.perf_counter()
        hidden = chunk[:, -1:]
        token_ids = self.pruner.scored_tokens(index, search.token_ids, hidden.device)
        if attended is None:
            logits = exit_logits(self.heads[layer], hidden, self.decoder, token_ids)
        else:
            logits = self.heads[layer].readout(attended[:, -1:], self.decoder, token_ids)
        scores = self.policy.metric(logits, hidden, search.previous_hidden)[:, 0]
        confident = (scores >= self.policy.thresholds[index]) & ~search.decided
        if confident.any():
            self._decide(
                search, confident, scatter_to_vocabulary(logits, token_ids, self.decoder.vocab_size)[:, 0], layer
            )
        search.token_ids = self.pruner.next_tokens(index, logits, token_ids)
        search.previous_hidden = hidden
        self.stats.head_seconds += time.perf_counter() - started
        return bool(search.decided.all())

    @staticmethod
    def _decide(search: _ExitSearch, rows: torch.Tensor, logits: torch.Tensor, layer: int) -> None:
        if search.logits is None:
            search.logits = torch.zeros_like(logits)
        search.logits[rows] = logits[rows].to(search.logits.dtype)
        search.exit_layers[rows] = layer
        search.decided |= rows


def start_decoding(
    model, input_ids: torch.LongTensor, generation_config: GenerationConfig, synced_gpus: bool, model_kwargs: dict
) -> tuple[torch.Tensor | None, torch.LongTensor, DynamicCache]:
    """What a decoding loop starts from: the attention mask (`None` when nothing is padded), the position ids of
    the prompt (left padding counted as `generate` counts it) and the cache. Refuses what no loop here supports."""
    if generation_config.num_beams > 1:
        raise ValueError("Beam search is not supported with early exits; use greedy decoding or sampling.")
    if synced_gpus:
        raise ValueError("Early-exit decoding does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation).")
    attention_mask = model_kwargs.get("attention_mask")
    position_ids = model_kwargs.get("position_ids")
    if position_ids is None:
        position_ids = model._prepare_position_ids_for_generation(input_ids, {"attention_mask": attention_mask})
    cache = model_kwargs.get(CACHE_NAME)
    if cache is None:
        cache = DynamicCache(config=model.config)
    return attention_mask, position_ids, cache
