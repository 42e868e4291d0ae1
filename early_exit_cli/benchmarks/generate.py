"""Benchmark early-exit generation against plain `generate` on the default model, in one process.

For each accuracy level, with and without vocabulary pruning: tokens/s as a ratio to `base.generate` (greedy, batch
1, same prompts, same run), agreement of each generated token with the full model's greedy token on the same prefix,
and mean exit layer. Then the cost of scoring one exit with and without pruning, and throughput at batch 1, 4 and 8.
Writes a Markdown report and a plot of speed against agreement.

    early-exit bench generate --output docs/generation-smollm2-135m.md
    python examples/benchmark_generate.py --output docs/generation-smollm2-135m.md  (the same)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from early_exit import EarlyExitForCausalLM, ExitDecodingConfig  # noqa: E402
from early_exit.calibration import DEFAULT_LEVELS, agreeing_tokens  # noqa: E402
from early_exit.data import format_prompt, load_prompts  # noqa: E402
from early_exit.default_model import load_base_tokenizer  # noqa: E402
from early_exit.pruning import VocabPruningConfig  # noqa: E402
from early_exit.reporting import benchmark_page  # noqa: E402

from ..parser import add_placement_arguments, positive_int  # noqa: E402
from ..placement import SHIPPED_HEADS, model_placement  # noqa: E402
from .machine import describe_machine  # noqa: E402

#: How the report names the command when `main` is given no `prog` (the script that runs this module).
SCRIPT = "python examples/benchmark_generate.py"


def encode(tokenizer, prompts: list[dict], batch_size: int = 1) -> list[dict]:
    """Left-padded batches of the formatted prompts (a tokenizer without a pad token pads with its end-of-sequence or
    unknown token: the attention mask hides the padding either way)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    texts = [format_prompt(prompt, tokenizer) for prompt in prompts]
    return [
        tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        for start in range(0, len(texts), batch_size)
    ]


@torch.no_grad()
def timed(runs: dict[str, Callable], batches: list[dict], max_new_tokens: int) -> dict[str, tuple[float, list]]:
    """Per run (a `generate` with its settings), tokens generated per second over all batches, and the outputs. The
    runs are interleaved batch by batch, in an order that rotates, so that the machine's noise hits them alike."""
    results = {label: ([], 0, 0.0) for label in runs}
    labels = list(runs)
    for index, batch in enumerate(tqdm(batches, desc=f"timing {len(runs)} settings", disable=None)):
        for label in labels[index % len(labels) :] + labels[: index % len(labels)]:
            started = time.perf_counter()
            output = runs[label](**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - started
            sequences = output.sequences if hasattr(output, "sequences") else output
            outputs, tokens, total = results[label]
            outputs.append(output)
            new = (sequences.shape[1] - batch["input_ids"].shape[1]) * sequences.shape[0]
            results[label] = (outputs, tokens + new, total + seconds)
    return {label: (tokens / seconds, outputs) for label, (outputs, tokens, seconds) in results.items()}


def eos_token_ids(model: EarlyExitForCausalLM) -> list[int]:
    """The base model's end-of-sequence token ids (its generation config may name one, several or none)."""
    eos = model.base.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.no_grad()
def exit_cost(
    model: EarlyExitForCausalLM, top_k: int, vocabulary: list[int] | None = None, repeats: int = 200
) -> list[float]:
    """Seconds to score one late exit (head, logits and max-prob) for one token: over the full vocabulary, over
    `top_k` pruned tokens, and (if given) over a fixed `vocabulary`, as the pruning exit scores it."""
    layer = model.exit_layers[-1]
    hidden = torch.randn(1, 1, model.hidden_size, device=model.device, dtype=model.dtype)
    token_ids = torch.randperm(model.vocab_size, device=model.device)[:top_k].view(1, 1, -1)
    fixed = [] if vocabulary is None else [torch.tensor(vocabulary, device=model.device)]
    costs = []
    for ids in (None, token_ids, *fixed):
        for _ in range(10):
            model.exit_logits_at(layer, hidden, ids).softmax(-1).amax(-1)
        started = time.perf_counter()
        for _ in range(repeats):
            model.exit_logits_at(layer, hidden, ids).softmax(-1).amax(-1)
        costs.append((time.perf_counter() - started) / repeats)
    return costs


def pruning_variants(model: EarlyExitForCausalLM) -> dict[str, VocabPruningConfig | bool]:
    """The vocabulary prunings to compare, by name: none, the heads' own, and, when that scores a fixed vocabulary at
    the pruning exit and the top-k alone was calibrated too, the top-k alone (the setting before fixed
    vocabularies)."""
    variants: dict[str, VocabPruningConfig | bool] = {"off": False}
    pruning = VocabPruningConfig.from_dict(model.config.vocab_pruning)
    if pruning is None:
        return variants
    if pruning.vocabulary is not None:
        top_k_alone = replace(pruning, vocabulary=None)
        tables = (model.config.calibration or {}).get("tables", {})
        if any(key.endswith("+" + top_k_alone.name) for key in tables):
            variants[top_k_alone.name] = top_k_alone
    variants[pruning.name] = pruning
    return variants


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (`early-exit bench generate` parses with it too)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--heads",
        default=str(SHIPPED_HEADS),
        help="calibrated heads folder or Hub repo (default: the shipped adapters/SmolLM2-135M-Instruct-exits)",
    )
    parser.add_argument("--prompts", type=positive_int, default=4, help="eval prompts to decode, batch 1 (default 4)")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="new tokens per prompt, exactly (default 128)"
    )
    parser.add_argument(
        "--levels",
        nargs="+",
        type=float,
        default=list(DEFAULT_LEVELS),
        help=f"calibrated accuracy levels to time (default: {' '.join(map(str, DEFAULT_LEVELS))}, the library's)",
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=positive_int, default=[1, 4, 8], help="batch sizes to compare (default 1 4 8)"
    )
    parser.add_argument(
        "--batch-level", type=float, default=0.9, help="level of the batch-size comparison (default 0.9)"
    )
    parser.add_argument(
        "--batch-tokens", type=positive_int, default=32, help="new tokens per row in the batch comparison (default 32)"
    )
    parser.add_argument(
        "--kernels", default="packed", help="matmul forms of the decoding loop: packed (default), unpacked or stock"
    )
    add_placement_arguments(parser)
    parser.add_argument("--output", help="Markdown report to write, plot beside it (default: print the tables only)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run the benchmark with the options in `argv` (default: the command line's); `prog` names the command in the
    help and the report (default: this module's script in `examples/`)."""
    args = build_parser(prog).parse_args(argv)

    torch.manual_seed(0)
    model = EarlyExitForCausalLM.from_pretrained(args.heads, **model_placement(args))
    tokenizer = load_base_tokenizer(model.config.base_model_name_or_path)
    variants = pruning_variants(model)
    prompts = load_prompts("eval")[: args.prompts]
    batches = [batch.to(model.device) for batch in encode(tokenizer, prompts)]
    pad = dict(pad_token_id=tokenizer.pad_token_id)
    num_layers = model.num_layers
    eos = eos_token_ids(model)

    # Full depth with the base model's own matmuls, then with the decoding loop's (`kernels`), separates what the
    # kernels give from what the exits give.
    settings = [("full depth, stock kernels", None, "off", "stock"), ("full depth", None, "off", args.kernels)] + [
        (f"level {level:g}", level, prune, args.kernels) for level in args.levels for prune in variants
    ]
    runs = {"base.generate": partial(model.base.generate, **pad)}
    for label, level, prune, kernels in settings:
        options = ExitDecodingConfig(accuracy_level=level, vocab_pruning=variants[prune], kernels=kernels)
        runs[label, prune] = partial(model.generate, exit_config=options, return_dict_in_generate=True, **pad)
    model.generate(**batches[0], max_new_tokens=2, kernels=args.kernels, **pad)  # packs the weights, untimed
    results = timed(runs, batches, args.max_new_tokens)
    base_speed = results["base.generate"][0]
    print(f"base.generate: {base_speed:.2f} tokens/s", file=sys.stderr)
    rows = []
    for label, level, prune, _ in settings:
        speed, outputs = results[label, prune]
        agreed = total = 0
        for batch, output in zip(batches, outputs):
            counts = agreeing_tokens(model, output.sequences, batch["input_ids"].shape[1], eos)
            agreed, total = agreed + counts[0], total + counts[1]
        exits = torch.cat([output.exit_layers.flatten().float() for output in outputs])
        heads = sum(output.head_seconds for output in outputs)
        layers = sum(output.layer_seconds for output in outputs)
        fill = sum(output.fill_seconds for output in outputs)
        rows.append(
            dict(
                label=label,
                pruned=prune,
                speed=speed,
                ratio=speed / base_speed,
                agreement=agreed / total,
                mean_exit=exits.mean().item(),
                heads=heads,
                layers=layers,
                fill=fill,
                level=level,
            )
        )
        print(
            f"{label} pruning {prune}: {speed / base_speed:.2f}x, agreement {100 * agreed / total:.1f}%, "
            f"mean exit {exits.mean():.1f}",
            file=sys.stderr,
        )

    pruning = VocabPruningConfig.from_dict(model.config.vocab_pruning)
    kept = pruning.schedule[0] if pruning else 512
    vocabulary = pruning.vocabulary if pruning else None
    with model.decoding_kernels(args.kernels):  # as decoding scores exits
        full_cost, pruned_cost, *vocabulary_cost = exit_cost(model, kept, vocabulary)

    batch_rows = []
    for batch_size in args.batch_sizes:
        batched = [
            batch.to(model.device) for batch in encode(tokenizer, (prompts * batch_size)[:batch_size], batch_size)
        ]
        options = ExitDecodingConfig(accuracy_level=args.batch_level, kernels=args.kernels)
        batch_runs = {
            "base": partial(model.base.generate, **pad),
            "ours": partial(model.generate, exit_config=options, return_dict_in_generate=True, **pad),
        }
        batch_results = timed(batch_runs, batched, args.batch_tokens)
        base_batch, (ours, outputs) = batch_results["base"][0], batch_results["ours"]
        mean_run = torch.cat([output.layers_run.float() for output in outputs]).mean().item()
        batch_rows.append((batch_size, base_batch, ours, mean_run))
        print(f"batch {batch_size}: base {base_batch:.1f} tokens/s, early exit {ours:.1f}", file=sys.stderr)

    lines = [
        f"Machine: {describe_machine()}.",
        "",
        f"Plain `base.generate`: {base_speed:.2f} tokens/s (greedy, batch 1, {len(prompts)} eval prompts, "
        f"{args.max_new_tokens} new tokens each). Ratios are against it, measured in the same run.",
        "",
        "| setting | vocabulary pruning | tokens/s | ratio to generate | agreement with full model | mean exit layer "
        "| time in layers / heads / cache fill (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['pruned']} | {row['speed']:.2f} "
            f"| {row['ratio']:.2f}x | {100 * row['agreement']:.1f}% | {row['mean_exit']:.1f} of {num_layers} "
            f"| {row['layers']:.1f} / {row['heads']:.1f} / {row['fill']:.1f} |"
        )
    lines += [
        "",
        f"Scoring one late exit for one token (head, logits, max-prob): full vocabulary {1e3 * full_cost:.2f} ms, "
        f"pruned to {kept} tokens {1e3 * pruned_cost:.2f} ms "
        f"({100 * pruned_cost / full_cost:.0f}% of the full cost)"
        + (
            f"; over the fixed vocabulary of {len(vocabulary)} tokens that the pruning exit scores "
            f"{1e3 * vocabulary_cost[0]:.2f} ms ({100 * vocabulary_cost[0] / full_cost:.0f}%; timed in a loop, so "
            "those rows of the LM head stay in cache)."
            if vocabulary_cost
            else "."
        ),
        "",
        f"| batch size | base.generate tokens/s | early exit (level {args.batch_level:g}) tokens/s | ratio "
        "| mean layers run per step |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {size} | {base:.1f} | {ours:.1f} | {ours / base:.2f}x | {run:.1f} |"
            for size, base, ours, run in batch_rows
        ],
    ]
    print("\n".join(lines))
    if args.output:
        output = Path(args.output)
        plot = output.with_suffix(".png")
        figure, axes = plt.subplots(figsize=(6.5, 4.2))
        for prune, marker in zip(variants, "osD"):
            chosen = [row for row in rows if row["pruned"] == prune and row["level"] is not None]
            if chosen:
                axes.plot(
                    [100 * row["agreement"] for row in chosen],
                    [row["ratio"] for row in chosen],
                    marker=marker,
                    label="full vocabulary" if prune == "off" else f"pruned: {prune}",
                )
                for row in chosen:
                    axes.annotate(f"{row['level']:g}", (100 * row["agreement"], row["ratio"]), fontsize=8)
        axes.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="plain generate")
        axes.set_xlabel("agreement with the full model's greedy token (%)")
        axes.set_ylabel("tokens/s ratio to base.generate")
        axes.set_title(f"{model.config.base_model_name_or_path}: early-exit speed by accuracy level", fontsize=9)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(plot, dpi=120)
        command = f"{prog or SCRIPT} " + " ".join(argv if argv is not None else sys.argv[1:])
        page = benchmark_page(
            f"Early-exit generation: {model.config.base_model_name_or_path}",
            command,
            lines,
            plot,
            "speed against agreement",
        )
        output.write_text(page, encoding="utf-8")
        print(f"report written to {output}, plot to {plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
