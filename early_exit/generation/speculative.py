"""Dynamic self-speculative decoding (DSSD): draft with the calibrated early exits, verify in one full-depth pass.

A cycle starts from the newest token, whose keys and values are not cached yet. It is run layer by layer as in
early-exit decoding; while an exit is confident, that exit's token is taken as a draft and fed back in. Drafting
stops at the first token no exit is confident about (that token simply goes on to full depth) or after
`max_draft_tokens` drafts (the newest one is then run to full depth). Either way, that one pass carries every
drafted position through the layers it skipped, as the deferred KV fill does, so the drafts' shallow keys and values
are reused and only the missing deep layers run; the prompt and accepted prefix are never run again.

The full model's logits at every drafted position then decide, row by row: the longest prefix of drafts the full
model agrees with is kept, followed by the full model's own token at the first disagreement (or a bonus token after
the last draft). Greedy output is therefore always `base.generate`'s. With sampling, a draft `d` drawn from the
exit's distribution `q` is kept with probability `min(1, p(d) / q(d))` against the full model's `p`, and a rejected
one is replaced by a draw from `max(p - q, 0)`, normalised: every token follows `p` exactly (Leviathan et al.,
2023). The accuracy level sets the exits' thresholds, hence both where drafts leave and how long drafts run.

The cache is cut back after each cycle to the longest kept prefix over the batch. Rows that kept fewer drafts have
their rejected positions masked out of attention, so each row accepts its own number of drafts while the cache
stays rectangular; positions are tracked per row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from ..transformers_compat import CACHE_NAME
from .decoding import LayerwiseDecoder, start_decoding
from .lookup import PromptLookup
from .options import DEFAULT_MAX_DRAFT_TOKENS


@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s output with `speculative=True` and `return_dict_in_generate=True`.

    Args:
        drafted: (batch, cycles) tokens each row drafted in each draft-and-verify cycle (0 once it had finished).
        accepted: (batch, cycles) of those, the ones the full model agreed with and that were kept.
        acceptance_rate: accepted drafts over drafted ones, over the whole batch (`nan` when nothing was drafted).
        tokens_per_full_pass: tokens emitted per full-depth pass, over the rows that took part in each pass:
            the accepted drafts plus the full model's own token.
        layer_seconds: time in decoder layers (drafting and verification).
        head_seconds: time in exit heads and confidence metrics.
    """

    drafted: torch.LongTensor | None = None
    accepted: torch.LongTensor | None = None
    acceptance_rate: float | None = None
    tokens_per_full_pass: float | None = None
    layer_seconds: float | None = None
    head_seconds: float | None = None


class _Slots:
    """The cache's positions ("slots") per row: the attention mask over them and each slot's position id.

    Slots a row rejected stay in the cache (another row may have kept the same slot) but are masked out, so a row's
    positions can lag its slots. `mask` stays `None` while nothing is padded or masked."""

    def __init__(self, attention_mask: torch.Tensor | None, position_ids: torch.LongTensor) -> None:
        self.mask = attention_mask
        self.positions = position_ids
        self.next_position = position_ids[:, -1] + 1

    def append(self) -> None:
        """Open one slot per row at its next position."""
        self.positions = torch.cat([self.positions, self.next_position[:, None]], dim=1)
        self.next_position = self.next_position + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)

    def keep(self, kept: torch.Tensor, opened: int, cache: Cache) -> None:
        """Of the `opened` newest slots, keep the first `kept[row]` for each row: drop the slots no row keeps (from
        the cache too) and mask the rest where a row rejected them."""
        dropped = opened - int(kept.max())
        if dropped:
            self.positions = self.positions[:, :-dropped]
            if self.mask is not None:
                self.mask = self.mask[:, :-dropped]
        cache.crop(-dropped)  # also trims sliding-window layers back to their window when nothing is dropped
        width = opened - dropped
        rejected = torch.arange(width, device=kept.device)[None, :] >= kept[:, None]
        if rejected.any():
            if self.mask is None:
                self.mask = torch.ones_like(self.positions)
            self.mask[:, -width:] = self.mask[:, -width:].masked_fill(rejected, 0)
        self.next_position = self.positions[:, -width] + kept


def self_speculative_sampling(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: BaseStreamer | None = None,
    *,
    layerwise: LayerwiseDecoder,
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS,
    prompt_lookup: PromptLookup | None = None,
    token_streamer: BaseStreamer | None = None,
    **model_kwargs,
) -> SpeculativeGenerateOutput | torch.LongTensor:
    """The decoding function `generate` calls for DSSD (greedy, or speculative sampling when `do_sample`), drafting
    with `layerwise`'s exit policy. `model` is the base model `generate` was called on.

    Logits processors and stopping criteria see each row on its own ((1, length) inputs), token by token, since
    rows advance by different numbers of tokens per cycle; custom processors that keep per-row state of a batch
    are not supported (`generate`'s own are). Rows that finish early are padded with the pad token.
    The returned cache (`return_dict_in_generate=True`) holds every kept position; in a batch it may also hold
    positions some rows rejected (masked for them), so it is not meant to be reused for further generation there.
    """
    streamer = streamer or token_streamer
    attention_mask, position_ids, cache = start_decoding(model, input_ids, generation_config, synced_gpus, model_kwargs)
    _check_cache(cache, input_ids, generation_config.max_length, max_draft_tokens)
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("Streaming self-speculative decoding supports one sequence at a time (batch size 1).")
    if token_streamer is not None:
        token_streamer.put(input_ids.cpu())
    return_dict = generation_config.return_dict_in_generate
    keep_scores = return_dict and generation_config.output_scores
    keep_logits = return_dict and generation_config.output_logits
    batch = input_ids.shape[0]
    rows = [input_ids[row] for row in range(batch)]
    processors = _row_processors(logits_processor, batch)
    row_scores = [[] for _ in range(batch)]
    row_logits = [[] for _ in range(batch)]
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)

    def emit(row: int, token: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor) -> bool:
        """Append `token` to `row`; returns whether the row has now finished."""
        rows[row] = torch.cat([rows[row], token.view(1)])
        if keep_scores:
            row_scores[row].append(scores[0])
        if keep_logits:
            row_logits[row].append(logits[0])
        return bool(stopping_criteria(rows[row][None], scores)[0])

    # The prompt's pass gives the first token from the full model, as `generate` does.
    first = layerwise.prefill(input_ids, attention_mask, position_ids, cache).float()
    vocab = first.shape[-1]
    for row in range(batch):
        scores = processors[row](rows[row][None], first[row : row + 1].clone())
        token = _choose(scores, generation_config.do_sample)
        unfinished[row] = not emit(row, token, scores, first[row : row + 1])
        if streamer is not None:
            streamer.put(token.view(1).cpu())
    cache.activate_past_recording()  # after the prefill, so sliding-window layers can be cut back after a cycle
    slots = _Slots(attention_mask, position_ids)
    drafted_per_cycle, accepted_per_cycle, tokens_per_pass = [], [], []

    while unfinished.any():
        tokens = torch.stack([sequence[-1] for sequence in rows])[:, None]
        drafts, draft_probs = [], []
        slots.append()
        final = None
        while len(drafts) < max_draft_tokens:
            copied = _lookup_drafts(prompt_lookup, rows, drafts, unfinished, max_draft_tokens - len(drafts))
            if copied is not None:  # drafts from the context: verify them with the newest token in one pass
                for column in copied.unbind(dim=1):
                    drafts.append(column)
                    draft_probs.append(_point_mass(column, vocab) if generation_config.do_sample else None)
                    slots.append()
                tokens = torch.cat([tokens, copied], dim=1)
                break
            exit_logits, final = layerwise.draft(tokens, slots.mask, slots.positions, cache, unfinished)
            if final is not None:
                break
            draft, probs = _draft_tokens(rows, drafts, exit_logits.float(), unfinished, processors, generation_config)
            drafts.append(draft)
            draft_probs.append(probs)
            tokens = draft[:, None]
            slots.append()
        if final is None:
            final = layerwise.verify(tokens, slots.mask, slots.positions, cache)
        final = final.float()

        kept = torch.ones(batch, dtype=torch.long, device=input_ids.device)
        drafted = torch.zeros(batch, dtype=torch.long)
        accepted = torch.zeros(batch, dtype=torch.long)
        emitted_tokens = []
        for row in torch.nonzero(unfinished).flatten().tolist():
            drafted[row] = len(drafts)
            start = len(rows[row])
            for index in range(len(drafts) + 1):
                logits = final[row : row + 1, index]
                scores = processors[row](rows[row][None], logits.clone())
                draft = drafts[index][row] if index < len(drafts) else None
                probs = draft_probs[index][row] if generation_config.do_sample and draft is not None else None
                token, agreed = _verify_token(scores, draft, probs, generation_config.do_sample)
                finished = emit(row, token, scores, logits)
                accepted[row] += int(agreed)
                if finished or not agreed:
                    break
            kept[row] = index + 1
            unfinished[row] = not finished
            emitted_tokens.append(len(rows[row]) - start)
            if streamer is not None:
                streamer.put(rows[row][start:].cpu())
        slots.keep(kept, len(drafts) + 1, cache)
        drafted_per_cycle.append(drafted)
        accepted_per_cycle.append(accepted)
        tokens_per_pass.extend(emitted_tokens)

    if streamer is not None:
        streamer.end()
    sequences = _pad_rows(rows, generation_config._pad_token_tensor)
    if not return_dict:
        return sequences
    drafted = torch.stack(drafted_per_cycle, dim=1) if drafted_per_cycle else torch.zeros(batch, 0, dtype=torch.long)
    accepted = torch.stack(accepted_per_cycle, dim=1) if accepted_per_cycle else torch.zeros_like(drafted)
    return SpeculativeGenerateOutput(
        sequences=sequences,
        scores=_steps(row_scores) if keep_scores else None,
        logits=_steps(row_logits) if keep_logits else None,
        **{CACHE_NAME: cache},
        drafted=drafted,
        accepted=accepted,
        acceptance_rate=accepted.sum().item() / drafted.sum().item() if drafted.sum() else float("nan"),
        tokens_per_full_pass=sum(tokens_per_pass) / len(tokens_per_pass) if tokens_per_pass else float("nan"),
        layer_seconds=layerwise.stats.layer_seconds,
        head_seconds=layerwise.stats.head_seconds,
    )


def speculative_decoding_function(
    layerwise: LayerwiseDecoder,
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS,
    prompt_lookup: PromptLookup | None = None,
    streamer: BaseStreamer | None = None,
):
    """The `custom_generate` callable that makes `base.generate` decode with DSSD under `layerwise`'s exit policy,
    with drafts copied from the context too when `prompt_lookup` is given."""
    return partial(
        self_speculative_sampling,
        layerwise=layerwise,
        max_draft_tokens=max_draft_tokens,
        prompt_lookup=prompt_lookup,
        token_streamer=streamer,
    )


# --- internals -----------------------------------------------------------------------------------------------------
def _check_cache(cache: Cache, input_ids: torch.LongTensor, max_length: int, max_draft_tokens: int) -> None:
    """Refuse what rollback cannot serve: layers that cannot be cut back, and batches whose masked slots could
    reach past a sliding window."""
    layers = getattr(cache, "layers", [])
    if not all(getattr(layer, "is_croppable", True) for layer in layers):
        raise ValueError(
            "Self-speculative decoding must cut rejected drafts out of the KV cache, and this model's cache has layers "
            "that cannot be cut back (e.g. linear attention or recurrent states); use early-exit or plain decoding."
        )
    windows = [layer.sliding_window for layer in layers if getattr(layer, "is_sliding", False)]
    batch, prompt = input_ids.shape
    # Each cycle gives every unfinished row at least one token and opens at most `max_draft_tokens + 1` slots.
    most_slots = prompt + (max_length - prompt) * (max_draft_tokens + 1)
    if batch > 1 and windows and most_slots > min(windows):
        # A sliding window counts cache slots, and masked (rejected) slots would push real positions out of it.
        raise ValueError(
            f"Self-speculative decoding of a batch may fill up to {most_slots} cache slots here, more than this "
            f"model's sliding window of {min(windows)}: rows that accept different numbers of drafts leave masked "
            "slots, which the window would count as positions. Decode one sequence at a time, or lower "
            "max_new_tokens or max_draft_tokens."
        )


def _row_processors(logits_processor: LogitsProcessorList, batch: int) -> list[LogitsProcessorList]:
    """The logits processors each row runs alone. `generate` gives the repetition penalty each row's left-padding
    length; a row's copy keeps only its own."""
    if batch == 1:
        return [logits_processor]
    rows = []
    for row in range(batch):
        own = LogitsProcessorList()
        for processor in logits_processor:
            ignored = getattr(processor, "prompt_ignore_length", None)
            if isinstance(processor, RepetitionPenaltyLogitsProcessor) and isinstance(ignored, torch.Tensor):
                processor = copy.copy(processor)
                processor.prompt_ignore_length = int(ignored[row])
            own.append(processor)
        rows.append(own)
    return rows


def _choose(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """The token `generate` would pick from processed scores (1, vocab)."""
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0]
    return scores[0].argmax()


def _draft_tokens(rows, drafts, exit_logits, unfinished, processors, generation_config):
    """Each unfinished row's draft token from its exit logits, after the logits processors, and (when sampling) the
    distribution it was drawn from; finished rows get a placeholder."""
    batch, vocab = exit_logits.shape
    tokens = torch.zeros(batch, dtype=torch.long, device=exit_logits.device)
    probs = torch.zeros(batch, vocab, device=exit_logits.device) if generation_config.do_sample else None
    for row in torch.nonzero(unfinished).flatten().tolist():
        prefix = torch.cat([rows[row], *(draft[row].view(1) for draft in drafts)])
        scores = processors[row](prefix[None], exit_logits[row : row + 1].clone())
        if probs is None:
            tokens[row] = scores[0].argmax()
        else:
            probs[row] = torch.softmax(scores[0], dim=-1)
            tokens[row] = torch.multinomial(probs[row], num_samples=1)[0]
    return tokens, probs


def _lookup_drafts(
    prompt_lookup: PromptLookup | None,
    rows: list[torch.Tensor],
    drafts: list[torch.Tensor],
    unfinished: torch.Tensor,
    limit: int,
) -> torch.LongTensor | None:
    """(batch, n) drafts copied from each row's context (`rows` plus this cycle's `drafts`), or `None` when no
    unfinished row has any. Rows that found fewer than the longest proposal repeat their last token to fill the
    batch's rectangle: any token is a sound draft, since the full model decides, and finished rows are ignored."""
    if prompt_lookup is None:
        return None
    contexts = [torch.cat([sequence, *(draft[row].view(1) for draft in drafts)]) for row, sequence in enumerate(rows)]
    proposals = [prompt_lookup.propose(contexts[row], limit) if unfinished[row] else [] for row in range(len(contexts))]
    width = max(len(tokens) for tokens in proposals)
    if not width:
        return None
    copied = torch.stack([context[-1:] for context in contexts]).repeat(1, width)
    for row, tokens in enumerate(proposals):
        if tokens:
            copied[row, : len(tokens)] = torch.tensor(tokens)
            copied[row, len(tokens) :] = tokens[-1]
    return copied


def _point_mass(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """(batch, vocab) distributions that draw each row's token for sure: a copied draft's, for speculative sampling
    (it is then kept with probability p(token), and a rejection samples from p without it)."""
    return torch.nn.functional.one_hot(tokens, vocab).float()


def _verify_token(
    scores: torch.Tensor, draft: torch.Tensor | None, draft_probs: torch.Tensor | None, do_sample: bool
) -> tuple[torch.Tensor, bool]:
    """The token to emit at one position from the full model's processed scores (1, vocab), and whether it is the
    draft. Without a draft (after the last one) it is the full model's own (bonus) token."""
    if draft is None:
        return _choose(scores, do_sample), False
    if not do_sample:
        target = scores[0].argmax()
        return target, bool(target == draft)
    probs = torch.softmax(scores[0], dim=-1)
    if torch.rand(()) * draft_probs[draft] <= probs[draft]:  # accept with probability min(1, p / q)
        return draft, True
    residual = (probs - draft_probs).clamp(min=0)
    if residual.sum() <= 0:  # p == q: a rejection cannot happen in exact arithmetic; fall back to p
        residual = probs
    return torch.multinomial(residual / residual.sum(), num_samples=1)[0], False


def _pad_rows(rows: list[torch.Tensor], pad_token_id: torch.Tensor | None) -> torch.LongTensor:
    """Rows of different lengths as one tensor, padded on the right as `generate` pads finished rows."""
    length = max(len(sequence) for sequence in rows)
    if pad_token_id is None and any(len(sequence) < length for sequence in rows):
        raise ValueError("Rows finished at different lengths and there is no pad token: pass pad_token_id.")
    padded = rows[0].new_full((len(rows), length), 0 if pad_token_id is None else int(pad_token_id))
    for row, sequence in enumerate(rows):
        padded[row, : len(sequence)] = sequence
    return padded


def _steps(per_row: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Per-row lists of (vocab,) tensors as `generate`'s tuple of (batch, vocab) per step; zeros after a row's end."""
    steps = max(len(values) for values in per_row)
    template = next(values[0] for values in per_row if values)
    return tuple(
        torch.stack([values[step] if step < len(values) else torch.zeros_like(template) for values in per_row])
        for step in range(steps)
    )
