"""Trains the same exit heads in every process of a `torch.distributed.run` launch (and, imported, in one process).

`test_distributed.py` launches this file in two CPU processes (gloo) and compares what each saves with the heads one
process trains on the same global batches. Run as a script: `distributed_training.py OUTPUT_DIR`; each process saves
`OUTPUT_DIR/<setup>-rank<r>.pt` (the heads' state dict) for every setup in `PROCESS_SETUPS`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from tiny_models import VOCAB, tiny_model

import early_exit
from early_exit import EarlyExitForCausalLM
from early_exit.data.corpus import TokenBlocks
from early_exit.training import EarlyExitTrainer, EarlyExitTrainingArguments

#: Examples in the training set, and global batches (optimizer steps) trained on.
EXAMPLES, STEPS = 16, 4
#: Sequences per optimizer step, over all processes and accumulated micro-batches.
GLOBAL_BATCH = EXAMPLES // STEPS
#: (name, per-device batch size, gradient accumulation steps) each process of a two-process launch trains with:
#: both make global batches of `GLOBAL_BATCH`.
PROCESS_SETUPS = [("halved-batch", GLOBAL_BATCH // 2, 1), ("accumulated", GLOBAL_BATCH // 4, 2)]


def training_set() -> TokenBlocks:
    """Random token sequences of different lengths, so processes see different token counts (padding included)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 20, (EXAMPLES,), generator=generator).tolist()
    return TokenBlocks([torch.randint(0, VOCAB, (length,), generator=generator).tolist() for length in lengths])


def untrained_model() -> EarlyExitForCausalLM:
    """A tiny random Llama with three exits, built the same in every process."""
    # A wide init gives the random model peaked predictions; no dropout anywhere, so every process computes the same.
    base = tiny_model("llama", initializer_range=0.3, attention_dropout=0.0)
    model = early_exit.add_exit_heads(base, [1, 2, 3])
    with torch.no_grad():  # start away from the identity, so that every head parameter gets a gradient at once
        for parameter in model.exit_heads.parameters():
            parameter.add_(0.05)
    return model


def train_heads(
    output_dir: Path, cache_hidden_states: bool, batch_size: int, accumulation: int
) -> dict[str, torch.Tensor]:
    """Train `untrained_model()`'s heads for `STEPS` plain SGD steps over `training_set()` in order; their state
    dict."""
    model = untrained_model()
    args = EarlyExitTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        cache_hidden_states=cache_hidden_states,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    EarlyExitTrainer(model, args, train_dataset=training_set()).train()
    return {name: tensor.detach().clone() for name, tensor in model.exit_heads.state_dict().items()}


def result_name(setup: str, cache_hidden_states: bool, rank: int) -> str:
    """The file a process saves a setup's heads to."""
    return f"{setup}-{'cached' if cache_hidden_states else 'through-base'}-rank{rank}.pt"


def main(output_dir: Path) -> None:
    """Train every setup with and without the hidden-state cache; save this process's heads."""
    rank = int(os.environ["RANK"])
    for setup, batch_size, accumulation in PROCESS_SETUPS:
        for cache in (False, True):
            heads = train_heads(output_dir / "trainer", cache, batch_size, accumulation)
            torch.save(heads, output_dir / result_name(setup, cache, rank))
    # Left to process exit, gloo's threads sometimes abort the process ("terminate called without an active
    # exception") after all its work is done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
