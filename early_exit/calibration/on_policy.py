"""Calibration on the early-exit model's own generations (on-policy), and agreement measured in free generation.

Thresholds calibrated on text the full model wrote hold on that text, but generation feeds the early-exit model its
own tokens: after an exit's token that the full model would not have chosen, the prefix is one the calibration never
saw, and exits agree less often there. On-policy calibration therefore scores the exits on prefixes the early-exit
model wrote itself at the thresholds being calibrated: generate greedily with thresholds `t`, score every exit on each
generated position (against the full model's greedy token on the same prefix), recalibrate, keep for each exit the
stricter of the old and new threshold (`t'`), and repeat until the thresholds settle: `t'` takes every exit decision
on that text that `t` took, so greedy decoding with `t'` writes that very text and its tokens are `t'`'s own
generations. Thresholds only tighten: loosening them on text that stricter ones wrote lets more tokens out on a
prefix that then drifts further, and the rounds swing back and forth without settling (measured on the default
model). So a level's outcome is measured on its own greedy generations once it has settled, and its Learn-then-Test
test ran on those tokens (for the recalibrated thresholds, which the kept ones match or exceed at every exit): what it
states covers tokens exchangeable with them, from prompts like the calibration prompts, not text of another domain
(recalibrate on prompts of yours for that). A level still moving after the last round is recorded as not settled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data import require_examples
from ..errors import InvalidOptionError
from ..generation import CalibrationTable, ExitDecodingConfig
from ..generation.thresholds import ExitCosts
from ..modeling_early_exit import EarlyExitForCausalLM
from ..pruning import VocabPruningConfig
from .calibrate import binomial_cdf, calibrate_level, evaluate_policy, exit_positions
from .scores import collect_exit_scores

#: Draft-verify rounds of on-policy calibration unless told otherwise; levels usually settle in two.
DEFAULT_ROUNDS = 3


class GeneratedText(Dataset):
    """Sequences written after prompts; only the positions that predicted a generated token are scored (the prompt's
    own positions, bar its last, are context only).

    Args:
        sequences: each prompt followed by its generated tokens, (length,) each.
        prompt_lengths: the prompt's length in each sequence.
    """

    def __init__(self, sequences: list[torch.LongTensor], prompt_lengths: list[int]) -> None:
        self.sequences = sequences
        self.prompt_lengths = prompt_lengths

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.sequences[index]
        scored = torch.zeros_like(ids)
        scored[self.prompt_lengths[index] - 1 : -1] = 1
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "scored_mask": scored}

    @property
    def num_generated(self) -> int:
        """Generated tokens over all sequences."""
        return sum(len(ids) - length for ids, length in zip(self.sequences, self.prompt_lengths))


@dataclass
class FreeGeneration:
    """Agreement of an early-exit policy with the full model on its own generations.

    Attributes:
        agreement: share of generated tokens equal to the full model's greedy token on the same prefix.
        tokens: generated tokens measured.
        interval: a two-sided 95% (Clopper-Pearson) confidence interval for the agreement.
        mean_layers: average layers run per generated token.
    """

    agreement: float
    tokens: int
    interval: tuple[float, float]
    mean_layers: float


def policy_options(table: CalibrationTable, thresholds: list[float]) -> ExitDecodingConfig:
    """Decoding options that run `thresholds` as `table` scores them: its metric and its vocabulary pruning."""
    pruning = VocabPruningConfig.from_dict(table.vocab_pruning)
    return ExitDecodingConfig(
        exit_thresholds=thresholds,
        confidence_metric=table.metric,
        vocab_pruning=pruning if pruning is not None else False,
    )


@torch.no_grad()
def agreeing_tokens(
    model: EarlyExitForCausalLM, sequences: torch.LongTensor, prompt_length: int, excluded: Sequence[int] = ()
) -> tuple[int, int]:
    """Of the tokens after the first `prompt_length` of `sequences` ((batch, length), unpadded), how many equal the
    full model's greedy token on the same prefix, and how many there are. `excluded` tokens are never the full
    model's choice (e.g. end of sequence, when generation was told not to end)."""
    logits = model.base(sequences.to(model.device)).logits[:, prompt_length - 1 : -1]
    logits[..., list(excluded)] = float("-inf")
    generated = sequences[:, prompt_length:].to(logits.device)
    return int((logits.argmax(-1) == generated).sum()), generated.numel()


@torch.no_grad()
def generate_text(
    model: EarlyExitForCausalLM,
    prompts: list[torch.LongTensor],
    options: ExitDecodingConfig,
    max_new_tokens: int,
    batch_size: int = 8,
) -> tuple[GeneratedText, list[torch.Tensor]]:
    """Greedy generations from each prompt (token ids, (length,)) under `options`, and each one's exit layers per
    generated token. Prompts are left-padded into batches; a sequence ends at its first end-of-sequence token."""
    eos = model.generation_config.eos_token_id
    eos = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else next(iter(eos), 0)
    sequences, lengths, exits = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=None):
        chunk = prompts[start : start + batch_size]
        width = max(len(prompt) for prompt in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        output = model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            exit_config=options,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            return_dict_in_generate=True,
        )
        for row, prompt in enumerate(chunk):
            new = output.sequences[row, width:].cpu()
            ends = [index for index, token in enumerate(new.tolist()) if token in eos]
            kept = ends[0] + 1 if ends else len(new)
            sequences.append(torch.cat([prompt, new[:kept]]))
            lengths.append(len(prompt))
            exits.append(output.exit_layers[row, :kept].cpu())
    return GeneratedText(sequences, lengths), exits


@torch.no_grad()
def free_generation(
    model: EarlyExitForCausalLM,
    prompts: list[torch.LongTensor],
    options: ExitDecodingConfig,
    max_new_tokens: int,
    batch_size: int = 8,
) -> FreeGeneration:
    """Generate from `prompts` under `options` and measure how many generated tokens equal the full model's greedy
    token on the same (generated) prefix, with a 95% confidence interval, and the mean layers run."""
    text, exits = generate_text(model, prompts, options, max_new_tokens, batch_size)
    require_examples(text, "free-generation")
    pairs = zip(text.sequences, text.prompt_lengths)
    agreed = sum(agreeing_tokens(model, ids[None], length)[0] for ids, length in pairs)
    tokens = text.num_generated
    layers = torch.cat(exits).double()
    return FreeGeneration(agreed / tokens, tokens, clopper_pearson(agreed, tokens), float(layers.mean()))


def calibrate_on_policy(
    model: EarlyExitForCausalLM,
    prompts: list[torch.LongTensor],
    start: CalibrationTable,
    method: str = "ltt",
    delta: float = 0.1,
    costs: ExitCosts | None = None,
    max_new_tokens: int = 128,
    rounds: int = DEFAULT_ROUNDS,
    batch_size: int = 8,
) -> CalibrationTable:
    """Recalibrate every level of `start` (a table calibrated on fixed text, whose metric and vocabulary pruning
    decoding will use) on the model's own generations from `prompts`, as the module docstring describes.

    Each level's outcome is measured on the tokens of its last round (generated at the thresholds before it), and the
    table records, per level, the rounds run, whether the thresholds settled, and the share of that round's tokens
    whose exit the last recalibration changed. The choice is cost-aware with `costs`, by default the costs `start`
    was calibrated with (measured when it was, so a busy machine now does not skew them).

    Raises:
        CalibrationError: too few generated tokens for a level (see `calibrate_level`).
        InvalidOptionError: `rounds` is not a positive integer.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidOptionError(f"rounds must be a positive integer (generate, score, recalibrate), got {rounds!r}.")
    pruning = VocabPruningConfig.from_dict(start.vocab_pruning)
    if costs is None and start.costs is not None:
        costs = ExitCosts(**start.costs)
    table = replace(start, method=method, delta=delta if method == "ltt" else None, levels={}, on_policy={})
    hashes = []
    for level, outcome in sorted(start.levels.items()):
        thresholds, rounds_run, settled = outcome.thresholds, 0, False
        while not settled and rounds_run < rounds:
            rounds_run += 1
            text, _ = generate_text(model, prompts, policy_options(start, thresholds), max_new_tokens, batch_size)
            scores = collect_exit_scores(model, text, [start.metric], vocab_pruning=pruning)
            values, correct = scores.scores[start.metric], scores.correct
            proposed = calibrate_level(scores, start.metric, level, method, delta, costs=costs).thresholds
            # Only ever stricter: loosening on text the stricter thresholds wrote makes the next text worse, and the
            # rounds would swing between the two (measured on the default model), never settling.
            stricter = torch.maximum(torch.tensor(thresholds), torch.tensor(proposed))
            outcome = evaluate_policy(values, correct, stricter, scores.exit_layers, scores.num_layers, costs)
            # Settled: the new thresholds take every decision of this round as the old ones did, so they would
            # write this very text, and its tokens are their own generations.
            old, new = (exit_positions(values, torch.tensor(row)) for row in (thresholds, outcome.thresholds))
            changed = float((old != new).double().mean())
            settled = changed == 0.0
            thresholds = outcome.thresholds
        table.levels[level] = outcome
        table.on_policy[f"{level:g}"] = {
            "rounds": rounds_run,
            "settled": settled,
            "changed": changed,
            "tokens": scores.num_tokens,
        }
        hashes.append(scores.data_hash)
    table.tokens = sum(entry["tokens"] for entry in table.on_policy.values())
    table.data_hash = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
    return table


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact two-sided binomial confidence interval for a rate of `successes` in `trials`."""
    alpha = 1.0 - confidence

    def bound(target: float, lower: bool) -> float:
        # binomial_cdf falls as the rate rises: bisect on it.
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            if lower:  # the rate at which seeing `successes` or more has probability alpha / 2
                value = 1.0 - binomial_cdf(successes - 1, trials, middle)
                low, high = (low, middle) if value >= target else (middle, high)
            else:  # the rate at which seeing `successes` or fewer has probability alpha / 2
                value = binomial_cdf(successes, trials, middle)
                low, high = (middle, high) if value >= target else (low, middle)
        return (low + high) / 2

    lower = 0.0 if successes == 0 else bound(alpha / 2, lower=True)
    upper = 1.0 if successes == trials else bound(alpha / 2, lower=False)
    return lower, upper
