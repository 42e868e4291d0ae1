"""Calibrate a heads folder's exit thresholds for accuracy levels, and store them in the folder.

For each level, calibration picks the thresholds under which at least that share of tokens is the one the full
model would choose, on calibration text the heads were not trained on (Learn then Test: guaranteed with probability
1 - delta). By default the choice is the fastest on this machine's measured layer and head costs; with --by-depth,
the one that runs the fewest layers. Decoding then takes the thresholds by level:
`model.generate(..., accuracy_level=0.9)`.

    python examples/calibrate.py                              # the heads examples/train.py wrote to my-heads/
    python examples/calibrate.py --heads notes-heads --files calibration.txt --levels 0.9 0.95

`early-exit calibrate --help` has more options (several metrics, pruning, a report with plots).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the module docstring is its description)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=Path, default=Path("my-heads"), help="heads folder to calibrate (my-heads)")
    parser.add_argument(
        "--levels", nargs="+", type=float, default=[0.8, 0.9, 0.95, 0.99], help="accuracy levels (0.8 0.9 0.95 0.99)"
    )
    parser.add_argument("--metric", default="max_prob", help="confidence metric (max_prob; also entropy, margin)")
    parser.add_argument("--method", choices=["ltt", "empirical"], default="ltt", help="ltt (guaranteed) or empirical")
    parser.add_argument("--delta", type=float, default=0.1, help="ltt: the chance the guarantee may fail (0.1)")
    parser.add_argument("--by-depth", action="store_true", help="choose by layers run, not by measured time")
    parser.add_argument("--files", nargs="+", type=Path, help="your calibration text (default: the project's mix)")
    parser.add_argument("--tokens", type=int, default=16_000, help="calibration tokens (16000)")
    parser.add_argument(
        "--generation-tokens", type=int, default=32, help="tokens of the model's own answer per prompt (32; 0: none)"
    )
    parser.add_argument("--block-size", type=int, default=512, help="tokens per sequence (512)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the command line), calibrate the heads, store the table in their folder and print it."""
    args = build_parser().parse_args(argv)
    import early_exit  # after parsing, so that --help and mistakes answer at once
    from early_exit.calibration import calibrate_table, collect_exit_scores, measure_exit_costs, store_calibration
    from early_exit.checkpoint import check_writable
    from early_exit.data.corpus import distillation_corpus
    from early_exit.pruning import VocabPruningConfig

    try:
        check_writable(args.heads)  # the table is saved there: know now, not after the work
        model = early_exit.EarlyExitForCausalLM.from_pretrained(args.heads)
        text = distillation_corpus(
            model.base,
            model.base_tokenizer(),
            "calibration",
            args.tokens,
            args.block_size,
            args.generation_tokens,
            files=args.files or (),
        )
        # Calibrate as decoding runs: with the vocabulary pruning the heads decode with by default, if any.
        pruning = VocabPruningConfig.from_dict(model.config.vocab_pruning)
        scores = collect_exit_scores(model, text, [args.metric], vocab_pruning=pruning)
        costs = None if args.by_depth else measure_exit_costs(model, args.metric, pruning)
        table = calibrate_table(
            scores, args.metric, tuple(args.levels), args.method, args.delta, model.config.base_model_revision, costs
        )
        store_calibration(model.config, [table], default_metric=args.metric)
        model.save_pretrained(args.heads)
    except (early_exit.EarlyExitError, OSError) as error:
        raise SystemExit(f"calibrate.py: {error}") from error
    print(
        f"\n{args.metric} thresholds on {scores.num_tokens} calibration tokens, exits after layers {model.exit_layers}"
    )
    print(f"{'level':>6}  {'agreement':>9}  {'layers':>6}  thresholds (inf: the exit never fires)")
    for level, outcome in sorted(table.levels.items()):
        thresholds = " ".join(f"{value:.3g}" for value in outcome.thresholds)
        print(f"{level:>6g}  {outcome.accuracy:>9.1%}  {outcome.mean_layers:>6.1f}  {thresholds}")
    print(f"stored in {args.heads}; generate with accuracy_level set to one of the levels")


if __name__ == "__main__":
    main()
