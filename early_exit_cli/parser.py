"""The `early-exit` command line's arguments.

This module imports nothing heavy (no torch, no transformers, not `early_exit`), so `--help` and argument mistakes
answer at once; the commands load the library only after the arguments are parsed. Defaults that belong to the
library (the base model, where new exits sit, which options are valid) are left to it: the parser passes `None`
and the library decides and validates, so the two can never drift apart.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
from pathlib import Path

#: The weight dtypes `--dtype` offers (names of torch dtypes).
DTYPES = ("float32", "bfloat16", "float16")

#: `early-exit bench` NAME -> what it measures; each is the module `early_exit_cli.benchmarks.NAME`.
BENCHMARKS = {
    "generate": "early-exit generation against plain generate: speed ratio and agreement by level, batch sizes",
    "speculative": "self-speculative decoding (DSSD) against plain generate, assistant_early_exit and fixed drafters",
    "kernels": "passes of a few positions through the default model's decoder: stock against packed matmuls",
}


def _exit_layer(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"must be a whole number of {minimum} or more, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of tokens, prompts, steps)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0 (where 0 turns something off)."""
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a rate, a temperature, a number of passes)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, for every command that loads a model (read by `placement.model_placement`)."""
    parser.add_argument("--device", help="where to run the model, e.g. cpu, cuda, cuda:1, mps (default: cpu)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="dtype to load the weights in (default: the base model's, as saved)"
    )


def _add_model_arguments(parser: argparse.ArgumentParser, saved_heads: bool = True) -> None:
    """The model a command runs: saved heads (with `saved_heads`), or new untrained heads on a base model."""
    if saved_heads:
        parser.add_argument(
            "--heads",
            help="a heads folder or Hub repo to load; without it, new untrained heads are attached as the options "
            "below say",
        )
    parser.add_argument(
        "--model", help="base model for new heads (default: the library's default model, SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--exit-layers",
        nargs="+",
        type=_exit_layer,
        metavar="LAYER",
        help="layer numbers or fractions of depth for new heads (default: a quarter, half and three quarters)",
    )
    parser.add_argument(
        "--head-type",
        nargs="+",
        metavar="TYPE",
        help="head type for new heads, a name in early_exit.HEAD_TYPES, e.g. linear or attention, or one name per "
        "--exit-layers entry (default: the library's, residual_adapter)",
    )
    parser.add_argument(
        "--adapter-size",
        type=positive_int,
        help="bottleneck width of residual adapter heads (default: the base model's hidden size)",
    )
    parser.add_argument(
        "--attention-blocks",
        type=positive_int,
        help="decoder blocks in each attention head, copies of the base's last layers (default 1)",
    )


class _BenchmarkParser(argparse.ArgumentParser):
    """Stands in for one benchmark's parser under `early-exit bench`: the benchmark's own `build_parser()` parses,
    imported only when the benchmark is named (the benchmarks load torch; `early-exit --help` must not)."""

    def __init__(self, *args, benchmark: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.benchmark = benchmark

    def parse_known_args(self, args=None, namespace=None):
        """Parse with the benchmark's own parser, keeping the arguments as given in `bench_argv`."""
        module = importlib.import_module(f"early_exit_cli.benchmarks.{self.benchmark}")
        parsed, rest = module.build_parser(prog=self.prog).parse_known_args(args, namespace)
        parsed.bench_argv = list(args)  # the benchmark's `main` takes them as given
        return parsed, rest


def _add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prune-top-k",
        nargs="+",
        type=int,
        metavar="K",
        help="dynamic vocabulary pruning: tokens kept at the pruning exit (several values: one per exit from there)",
    )
    parser.add_argument("--prune-at", type=int, help="exit layer that prunes (default: the first exit scored)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `early-exit` subcommand; each sets `args.command` to its name."""
    parser = argparse.ArgumentParser(
        prog="early-exit",
        description="Faster decoding for Hugging Face causal LMs with calibrated early-exit heads.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('early-exit')}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="show a model's layers, exits and head sizes")
    _add_model_arguments(info)
    add_placement_arguments(info)
    agreement = commands.add_parser(
        "agreement", help="each exit's top-1 agreement with the final layer on the project's prompts"
    )
    _add_model_arguments(agreement)
    add_placement_arguments(agreement)
    agreement.add_argument("--prompts", type=positive_int, default=8, help="how many prompts to use (default 8)")
    agreement.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="tokens to generate per prompt (default 32)"
    )

    train = commands.add_parser("train", help="train exit heads on the model's own predictions")
    _add_model_arguments(train, saved_heads=False)
    train.add_argument(
        "--heads",
        help="a heads folder or Hub repo to train further, instead of new heads (see --skip-train-tokens)",
    )
    train.add_argument("--output", type=Path, required=True, help="heads folder to write")
    train.add_argument("--train-files", nargs="+", type=Path, help="your own training text (default: built in)")
    train.add_argument("--eval-files", nargs="+", type=Path, help="your own held-out text (default: built in)")
    train.add_argument(
        "--installed-packages",
        action="store_true",
        help="train on the installed packages' docstrings and source too, not the standard library's alone (the "
        "held-out text stays the standard library's, so runs compare)",
    )
    train.add_argument("--train-tokens", type=positive_int, default=60_000, help="training tokens (default 60000)")
    train.add_argument(
        "--skip-train-tokens",
        type=non_negative_int,
        default=0,
        help="leave out the built-in text that --train-tokens N would give (with the other text options the same), "
        "so --heads trained on it go on with text they have not seen (default 0)",
    )
    train.add_argument("--eval-tokens", type=positive_int, default=8_000, help="held-out tokens (default 8000)")
    train.add_argument(
        "--block-size", type=positive_int, default=512, help="tokens per training sequence (default 512)"
    )
    train.add_argument(
        "--generation-tokens",
        type=non_negative_int,
        default=96,
        help="tokens the model generates per prompt (default 96; 0: no generations)",
    )
    train.add_argument("--epochs", type=positive_float, default=3.0, help="passes over the training text (default 3)")
    train.add_argument("--batch-size", type=positive_int, default=1, help="sequences per step (default 1)")
    train.add_argument(
        "--gradient-accumulation", type=positive_int, default=4, help="steps per optimizer update (default 4)"
    )
    train.add_argument("--learning-rate", type=positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    train.add_argument("--warmup-steps", type=non_negative_int, default=10, help="linear warm-up steps (default 10)")
    train.add_argument(
        "--exit-weighting",
        default="uniform",
        help="per-exit loss weights: uniform (default), linear (in depth), or comma-separated numbers",
    )
    train.add_argument("--temperature", type=positive_float, default=1.0, help="distillation temperature (default 1)")
    train.add_argument(
        "--top-k", type=positive_int, help="keep only the teacher's k most likely tokens (default: all of them)"
    )
    train.add_argument(
        "--cache-hidden-states", action="store_true", help="run the frozen base once, then train from the cache"
    )
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AVX512-BF16)")
    train.add_argument(
        "--lora-rank", type=non_negative_int, default=0, help="joint LoRA tuning of the base (default 0: frozen)"
    )
    train.add_argument("--lora-targets", nargs="+", help="modules LoRA adapts (default: all linear layers)")
    train.add_argument(
        "--checkpoint-dir", help="save Trainer checkpoints here after each epoch (default: none are saved)"
    )
    train.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --checkpoint-dir")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument(
        "--curve",
        type=Path,
        help="also measure held-out agreement during training and write it against training tokens here (Markdown, "
        "plot beside it)",
    )
    train.add_argument(
        "--curve-points",
        type=positive_int,
        default=8,
        help="points of --curve, the last at the end of training (default 8)",
    )

    report = commands.add_parser("report", help="held-out agreement of heads folders vs the logit lens")
    report.add_argument("--heads", nargs="+", required=True, help="heads folders (same base model)")
    report.add_argument("--output", type=Path, required=True, help="Markdown file to write (plot beside it)")
    report.add_argument("--eval-tokens", type=positive_int, default=8_000, help="held-out tokens (default 8000)")
    report.add_argument("--block-size", type=positive_int, default=512, help="tokens per sequence (default 512)")
    report.add_argument(
        "--generation-tokens", type=non_negative_int, default=96, help="tokens generated per prompt (default 96)"
    )
    report.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    add_placement_arguments(report)

    calibrate = commands.add_parser("calibrate", help="calibrate exit thresholds for accuracy levels")
    calibrate.add_argument("--heads", required=True, help="heads folder; the table is saved into its config")
    calibrate.add_argument(
        "--metrics",
        nargs="+",
        default=["entropy", "max_prob", "margin"],
        help="confidence metrics to calibrate (default: entropy max_prob margin)",
    )
    calibrate.add_argument(
        "--levels",
        nargs="+",
        type=float,
        default=[0.8, 0.9, 0.95, 0.99],
        help="accuracy levels to calibrate (default: 0.8 0.9 0.95 0.99)",
    )
    calibrate.add_argument(
        "--method", choices=["ltt", "empirical"], default="ltt", help="ltt (guaranteed, default) or empirical"
    )
    calibrate.add_argument(
        "--delta", type=float, default=0.1, help="chance the guarantee may fail, with ltt (default 0.1)"
    )
    calibrate.add_argument("--report", help="Markdown report to write, plots beside it (default: none)")
    calibrate.add_argument(
        "--by-depth",
        action="store_true",
        help="choose thresholds by depth alone (default: measure this machine's layer and head costs and choose the "
        "fastest policy that keeps each level, scoring only exits that pay for themselves)",
    )
    _add_pruning_arguments(calibrate)
    calibrate.add_argument(
        "--prune-vocabulary",
        type=positive_int,
        metavar="N",
        help="with --prune-top-k: the pruning exit scores only the N tokens most frequent in the model's own text "
        "(the training split, never the calibration text) instead of the full vocabulary, which is far cheaper; "
        "decoding then does the same (default: the full vocabulary)",
    )
    calibrate.add_argument(
        "--vocabulary-tokens",
        type=positive_int,
        default=40_000,
        help="tokens of the training split to count for --prune-vocabulary (default 40000)",
    )
    verify = commands.add_parser("verify-calibration", help="measure calibrated levels on held-out text")
    verify.add_argument("--heads", required=True, help="a calibrated heads folder")
    for command in (calibrate, verify):
        command.add_argument("--tokens", type=positive_int, default=32_000, help="tokens to score (default 32000)")
        command.add_argument("--block-size", type=positive_int, default=512, help="tokens per sequence (default 512)")
        command.add_argument(
            "--generation-tokens", type=non_negative_int, default=96, help="tokens generated per prompt (default 96)"
        )
        command.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
        add_placement_arguments(command)
    calibrate.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=[],
        help="target average depths (layers per token) to calibrate too: the most accurate thresholds within each, "
        "for generate --budget (default: none)",
    )
    calibrate.add_argument(
        "--on-policy",
        action="store_true",
        help="then recalibrate each level on the model's own greedy generations at that level (generate, score, "
        "recalibrate, until the thresholds settle), from the calibration prompts or --prompts-file",
    )
    calibrate.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="most generate-score-recalibrate rounds per level with --on-policy (default 3, the library's)",
    )
    verify.add_argument(
        "--tables",
        nargs="+",
        help="calibration tables to measure, by name, e.g. max_prob+top512 (default: every table of the heads)",
    )
    verify.add_argument(
        "--free-generation",
        action="store_true",
        help="measure each level on the model's own greedy generations from the eval prompts (or --prompts-file) "
        "instead of on fixed text: agreement with the full model's token on the same prefix, with a 95%% interval",
    )
    for command in (calibrate, verify):
        command.add_argument(
            "--prompts-file",
            help="prompts for --on-policy / --free-generation, one instruction per line (default: the project's "
            "calibration or eval prompts)",
        )
        command.add_argument(
            "--max-new-tokens",
            type=positive_int,
            default=128,
            help="tokens generated per prompt with --on-policy / --free-generation (default 128)",
        )

    generate = commands.add_parser("generate", help="generate with early exits, tokens coloured by exit layer")
    generate.add_argument(
        "--heads", help="heads folder or Hub repo (default: the shipped adapters/SmolLM2-135M-Instruct-exits)"
    )
    generate.add_argument(
        "--prompt",
        action="append",
        help="an instruction (chat template applied when the tokenizer has one); repeat for several "
        "(default: the first 2 eval prompts)",
    )
    generate.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    add_placement_arguments(generate)
    policy = generate.add_mutually_exclusive_group()
    policy.add_argument(
        "--level",
        type=float,
        help="calibrated accuracy level (default 0.9 for calibrated heads; uncalibrated heads run at full depth)",
    )
    policy.add_argument("--thresholds", nargs="+", type=float, help="explicit thresholds, one per exit (inf: never)")
    policy.add_argument(
        "--budget",
        type=float,
        help="target average depth in layers per token: the thresholds of the deepest budget calibrated within it "
        "(calibrate --budgets; default: none)",
    )
    generate.add_argument("--metric", help="confidence metric (default: the calibration's, else max_prob)")
    generate.add_argument(
        "--min-exit-layer", type=positive_int, help="exits before this layer never emit (default: every exit may)"
    )
    generate.add_argument(
        "--kv-strategy",
        default="deferred",
        help="how skipped layers' KV cache is filled: deferred (exact, default) or propagate (approximate)",
    )
    generate.add_argument("--no-pruning", action="store_true", help="no vocabulary pruning, whatever calibrated")
    _add_pruning_arguments(generate)
    generate.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding (DSSD): exits draft, the full model verifies; output is the full model's",
    )
    generate.add_argument(
        "--max-draft-tokens",
        type=non_negative_int,
        help="with --speculative: most drafts per verification (default: the library's, 8)",
    )
    generate.add_argument(
        "--kernels",
        default="packed",
        help="matmul forms of the decoding loop: packed (default, fastest; a packed copy of the weights), unpacked "
        "(no extra memory) or stock (as the base model runs)",
    )
    generate.add_argument(
        "--compare",
        action="store_true",
        help="also run plain base.generate on the same prompts, interleaved with the early-exit runs (greedy, "
        "exactly --max-new-tokens each, after an untimed warm-up), and print both speeds, their ratio and the share "
        "of tokens equal to the full model's greedy token on the same prefix",
    )
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    generate.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    generate.add_argument("--plot", type=Path, help="write a PNG histogram of exit layers here (default: none)")
    generate.add_argument(
        "--no-color", action="store_true", help="mark tokens as token[layer] instead of colouring (also: NO_COLOR)"
    )

    push = commands.add_parser("push", help="upload a heads folder to the Hugging Face Hub")
    push.add_argument("--heads", type=Path, required=True, help="the heads folder to upload (as train writes it)")
    push.add_argument("--repo-id", required=True, help="the Hub repository, e.g. your-name/SmolLM2-135M-Instruct-exits")
    push.add_argument(
        "--private",
        action="store_true",
        help="create the repository private (default: public; an existing one keeps its visibility)",
    )
    push.add_argument("--token", help="a Hub token with write access (default: the one `hf auth login` saved)")
    push.add_argument("--commit-message", help='the commit\'s message (default: "Upload early-exit heads")')

    bench = commands.add_parser(
        "bench", help="benchmarks of speed and agreement, each writing a Markdown report (as examples/benchmark_*.py)"
    )
    benchmarks = bench.add_subparsers(
        dest="benchmark", required=True, metavar="BENCHMARK", parser_class=_BenchmarkParser
    )
    for name, summary in BENCHMARKS.items():
        benchmarks.add_parser(name, help=summary, benchmark=name)
    return parser
