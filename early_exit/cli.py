"""The `early-exit` command line: `early-exit info` and `early-exit agreement` (more subcommands come later)."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import format_prompt, load_prompts
from .default_model import DEFAULT_MODEL_ID, load_base_model, load_base_tokenizer
from .evaluation import measure_agreement
from .modeling_early_exit import EarlyExitForCausalLM, add_exit_heads


def _exit_layer(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heads", help="a heads folder or Hub repo to load; without it, new untrained heads are attached"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_ID, help=f"base model for new heads (default: {DEFAULT_MODEL_ID}, offline)"
    )
    parser.add_argument(
        "--exit-layers", nargs="+", type=_exit_layer, default=[0.2, 0.4, 0.6, 0.8],
        help="layer numbers or fractions of depth for new heads (default: 0.2 0.4 0.6 0.8)",
    )
    parser.add_argument("--head-type", default="residual_adapter", help="head type for new heads")
    parser.add_argument("--adapter-size", type=int, help="bottleneck width of residual adapter heads")


def _load(args: argparse.Namespace) -> EarlyExitForCausalLM:
    if args.heads:
        return EarlyExitForCausalLM.from_pretrained(args.heads)
    base = load_base_model(args.model)
    return add_exit_heads(base, args.exit_layers, head_type=args.head_type, adapter_size=args.adapter_size).eval()


def _tokenizer(model: EarlyExitForCausalLM) -> PreTrainedTokenizerBase:
    return load_base_tokenizer(model.config.base_model_name_or_path, model.config.base_model_revision)


def info(args: argparse.Namespace) -> None:
    """Print the base model's shape, its exits and the size of their heads."""
    model = _load(args)
    decoder, config = model.decoder, model.config
    base_parameters = model.base_parameter_count()
    print(f"base model      {config.base_model_name_or_path} ({type(decoder.model).__name__})")
    print(f"layers          {decoder.num_layers}  hidden size {decoder.hidden_size}  vocabulary {decoder.vocab_size}")
    print(f"parameters      {base_parameters:,}")
    print(f"\n{'exit after layer':>16}  {'depth':>5}  {'head type':<18}{'parameters':>12}")
    for layer, head in model.exit_heads.items():
        head_parameters = sum(parameter.numel() for parameter in head.parameters())
        print(f"{layer:>16}  {int(layer) / decoder.num_layers:>5.2f}  {config.head_type:<18}{head_parameters:>12,}")
    heads = model.head_parameter_count()
    print(f"\nheads in total  {heads:,} parameters = {100 * heads / base_parameters:.2f}% of the base model")


def agreement(args: argparse.Namespace) -> None:
    """Greedy-decode the project's prompts with the base model, then report each exit's top-1 agreement with the
    final layer on the generated tokens, and the oracle bound (every token leaves at its earliest agreeing exit)."""
    model = _load(args)
    tokenizer = _tokenizer(model)
    prompts = load_prompts()[: args.prompts]
    result = None
    for prompt in tqdm(prompts, desc="prompts", disable=None):
        encoded = tokenizer(format_prompt(prompt, tokenizer), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            sequence = model.decoder.model.generate(
                **encoded, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        # Logits at position t predict token t + 1: count the positions that predicted generated tokens.
        positions = torch.zeros_like(sequence, dtype=torch.bool)
        positions[:, encoded["input_ids"].shape[1] - 1 : -1] = True
        result = measure_agreement(model, sequence, positions, into=result)
    num_layers = model.decoder.num_layers
    print(
        f"\nTop-1 agreement with the final layer: {model.config.base_model_name_or_path}, {len(prompts)} prompts, "
        f"{result.tokens} generated tokens, {model.config.head_type} heads"
    )
    print(f"{'exit after layer':>16}  {'depth':>5}  {'agreement':>9}")
    for layer, rate in zip(result.exit_layers, result.rates):
        print(f"{layer:>16}  {layer / num_layers:>5.2f}  {100 * rate:>8.1f}%")
    print(
        f"oracle: {100 * len(result.earliest_exit_layers) / result.tokens:.1f}% of tokens agree at some exit; "
        f"leaving at the earliest agreeing exit averages {result.oracle_mean_layers:.1f} of {num_layers} layers"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `early-exit` console script."""
    parser = argparse.ArgumentParser(prog="early-exit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="show a model's layers, exits and head sizes")
    _add_model_arguments(info_parser)
    info_parser.set_defaults(run=info)
    agreement_parser = commands.add_parser(
        "agreement", help="each exit's top-1 agreement with the final layer on the project's prompts"
    )
    _add_model_arguments(agreement_parser)
    agreement_parser.add_argument("--prompts", type=int, default=8, help="how many prompts to use (default 8)")
    agreement_parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    agreement_parser.set_defaults(run=agreement)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
