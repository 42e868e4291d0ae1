"""Train exit heads for the default model (SmolLM2-135M-Instruct) on this machine, and save them to a heads folder.

The heads learn what the model's last layer predicts, so no labels are needed: the text is the project's mix (the
model's own answers to the project's prompts, then Python's documentation and source) or your own files. Held-out
agreement with the last layer is printed before and after training. With the defaults this took 10 minutes on 2 busy
CPU cores; `make heads` trains the shipped heads (80,000 tokens, 3 epochs, under 30 minutes).

    python examples/train.py                                  # writes my-heads/
    python examples/train.py --files notes/*.txt --eval-files held-out.txt --output notes-heads

Then: examples/calibrate.py, examples/generate.py, examples/push.py. `early-exit train --help` has more options.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the module docstring is its description)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("my-heads"), help="heads folder to write (my-heads)")
    parser.add_argument(
        "--exit-layers",
        nargs="+",
        type=int,
        metavar="LAYER",
        help="the layers the exits follow (default: a quarter, half and three quarters of the depth)",
    )
    parser.add_argument("--files", nargs="+", type=Path, help="your training text (.txt, .json, .jsonl, .csv, ...)")
    parser.add_argument("--eval-files", nargs="+", type=Path, help="your held-out text; needed with --files")
    parser.add_argument("--train-tokens", type=int, default=16_000, help="training tokens (16000)")
    parser.add_argument("--eval-tokens", type=int, default=2_000, help="held-out tokens (2000)")
    parser.add_argument(
        "--generation-tokens", type=int, default=32, help="tokens of the model's own answer per prompt (32; 0: none)"
    )
    parser.add_argument("--block-size", type=int, default=512, help="tokens per training sequence (512)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training text (1)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (1)")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (0.002)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AVX512-BF16)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line), train the heads, print their held-out agreement and save them."""
    args = build_parser().parse_args(argv)
    if args.files and not args.eval_files:
        raise SystemExit(
            "train.py: give --eval-files too: a file is used whole, so held-out text needs files of its own."
        )
    import torch  # after parsing, so that --help and mistakes answer at once

    import early_exit
    from early_exit.checkpoint import check_writable
    from early_exit.data.corpus import distillation_corpus
    from early_exit.training import EarlyExitTrainer, EarlyExitTrainingArguments

    try:
        check_writable(args.output)  # now, not after the training
        base, tokenizer = early_exit.load_default_model()
        model = early_exit.add_exit_heads(base, args.exit_layers)
        text = {
            split: distillation_corpus(
                base, tokenizer, split, tokens, args.block_size, args.generation_tokens, files=files or ()
            )
            for split, tokens, files in (
                ("train", args.train_tokens, args.files),
                ("eval", args.eval_tokens, args.eval_files),
            )
        }
        with tempfile.TemporaryDirectory(prefix="train-heads-") as scratch:  # Trainer wants a folder; nothing stays
            training_args = EarlyExitTrainingArguments(
                scratch,
                num_train_epochs=args.epochs,
                per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                warmup_steps=4,
                lr_scheduler_type="cosine",
                bf16=args.bf16,
                use_cpu=not torch.cuda.is_available(),
                cache_hidden_states=True,  # the frozen base runs over the text once
                save_strategy="no",
                logging_steps=10,
                report_to="none",
            )
            trainer = EarlyExitTrainer(model, training_args, train_dataset=text["train"], eval_dataset=text["eval"])
            before = trainer.evaluate()
            trainer.train()
            after = trainer.evaluate()
        model.save_pretrained(args.output, tokenizer=tokenizer)
    except (early_exit.EarlyExitError, OSError) as error:
        raise SystemExit(f"train.py: {error}") from error
    print(f"\nHeld-out agreement with the last layer ({text['eval'].num_tokens} tokens never trained on)")
    print(f"{'exit after layer':>16}  {'before':>7}  {'after':>7}")
    for layer in model.exit_layers:
        key = f"eval_agreement_layer_{layer}"
        print(f"{layer:>16}  {before[key]:>7.1%}  {after[key]:>7.1%}")
    print(f"heads written to {args.output}")


if __name__ == "__main__":
    main()
