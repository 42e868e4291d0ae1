"""Generate with early exits, or losslessly with self-speculative decoding, from a heads folder for the default model.

The text is shown as it is generated; then, for early exits, how many tokens left at each exit, or, for
self-speculative decoding, how many of the exits' drafts the full model accepted.

    python examples/generate.py                               # the shipped heads, level 0.9
    python examples/generate.py --level 0.95 --speculative "Write a haiku about the sea."
    python examples/generate.py --heads my-heads "What is the capital of France?"

`early-exit generate --help` has more options (explicit thresholds, sampling, colours by exit layer, a histogram).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

#: The heads shipped with the repository for the default model, calibrated.
SHIPPED_HEADS = Path(__file__).resolve().parents[1] / "adapters" / "SmolLM2-135M-Instruct-exits"


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the module docstring is its description)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?", help="an instruction")
    parser.add_argument("--heads", type=Path, default=SHIPPED_HEADS, help="a calibrated heads folder (the shipped)")
    parser.add_argument("--level", type=float, default=0.9, help="accuracy level, calibrated in the heads (0.9)")
    parser.add_argument("--speculative", action="store_true", help="exits only draft; the full model's text is kept")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (64)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line), generate from the prompt and print the text and what the exits
    did."""
    args = build_parser().parse_args(argv)
    from transformers import AutoModelForCausalLM, TextStreamer  # after parsing: --help and mistakes answer at once

    import early_exit

    try:
        model = AutoModelForCausalLM.from_pretrained(args.heads)
        tokenizer = model.base_tokenizer()
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        started = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            accuracy_level=args.level,
            speculative=args.speculative,
            return_dict_in_generate=True,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        )
    except (early_exit.EarlyExitError, OSError) as error:
        raise SystemExit(f"generate.py: {error}") from error
    seconds = time.perf_counter() - started
    tokens = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    print(f"\n{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s), level {args.level:g}")
    if args.speculative:
        print(
            f"{out.accepted.sum()} of {out.drafted.sum()} drafts accepted, "
            f"{out.tokens_per_full_pass:.2f} tokens per full pass"
        )
        return
    exits = Counter(out.exit_layers[0, :tokens].tolist())
    print("tokens by the layer they left at: " + ", ".join(f"{layer}: {exits[layer]}" for layer in sorted(exits)))
    print(f"mean {sum(layer * count for layer, count in exits.items()) / tokens:.1f} of {model.num_layers} layers")


if __name__ == "__main__":
    main()
