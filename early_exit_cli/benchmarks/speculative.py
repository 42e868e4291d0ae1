"""Benchmark self-speculative decoding against plain `generate` on the default model, in one process.

Every row decodes the same eval prompts greedily at batch 1, exactly `--max-new-tokens` new tokens each, timed over
all prompts after one warm-up, with all rows interleaved prompt by prompt (in a rotating order):

1. plain `base.generate`, the baseline every ratio is against;
2. transformers' own self-speculation, `base.generate(assistant_early_exit=E)`, over a sweep of E;
3. transformers' own prompt lookup, `base.generate(prompt_lookup_num_tokens=K)`, for each `--prompt-lookup` K;
4. a fixed drafter with our heads (LayerSkip-style: exit layer E, draft length K, both swept);
5. Dynamic Self-Speculative Decoding (DSSD) at each accuracy level with the exits' drafts alone, and with each
   `--prompt-lookup` K at each level and at full depth (drafts copied from the context only).

Each row gives tokens/s, the ratio to plain `generate`, the tokens emitted per full-depth pass, the acceptance rate
of drafted tokens and whether the output equals plain greedy `generate`'s. Then the project's DSSD goals. Writes
a Markdown report and a plot of speed against tokens per full pass.

    early-exit bench speculative --output docs/speculative-smollm2-135m.md
    python examples/benchmark_speculative.py --output docs/speculative-smollm2-135m.md  (the same)

An empty sweep skips its method, e.g. `--fixed-exits --levels` times only the first two.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from early_exit import EarlyExitForCausalLM, ExitDecodingConfig  # noqa: E402
from early_exit.calibration import DEFAULT_LEVELS  # noqa: E402
from early_exit.data import load_prompts  # noqa: E402
from early_exit.default_model import load_base_tokenizer  # noqa: E402
from early_exit.generation import DEFAULT_MAX_DRAFT_TOKENS  # noqa: E402
from early_exit.reporting import benchmark_page  # noqa: E402

from ..parser import add_placement_arguments, non_negative_int, positive_int  # noqa: E402
from ..placement import SHIPPED_HEADS, model_placement  # noqa: E402
from .generate import encode, timed  # noqa: E402
from .machine import describe_machine  # noqa: E402

#: How the report names the command when `main` is given no `prog` (the script that runs this module).
SCRIPT = "python examples/benchmark_speculative.py"

PLAIN, ASSISTED, LOOKUP, FIXED, DSSD = (
    "plain generate",
    "assistant_early_exit",
    "prompt lookup",
    "fixed drafter",
    "DSSD",
)


@dataclass
class Row:
    """One timed setting. `per_pass`: tokens emitted per full-depth forward pass (plain `generate`: 1);
    `acceptance`: accepted / drafted tokens (`None` where nothing is drafted); `differing` of `total` generated
    tokens differ from plain greedy `generate`'s."""

    method: str
    setting: str
    speed: float
    ratio: float
    per_pass: float
    acceptance: float | None
    differing: int
    total: int


@dataclass
class PassCounter:
    """Calls of the model's last decoder layer and the positions they ran."""

    passes: int = 0
    positions: int = 0


@contextmanager
def counting_full_passes(model: EarlyExitForCausalLM, counter: PassCounter | None = None) -> Iterator[PassCounter]:
    """Count the forward passes that reach the last decoder layer while the block runs (into `counter`, which may
    hold earlier counts, or a new one).

    transformers' `assistant_early_exit` drafts with the same model cut to its first E layers, so only its
    verification passes reach the last layer. The hook adds one Python call per full pass, far below a pass's cost,
    so it stays on during the timed run.
    """
    counter = PassCounter() if counter is None else counter

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        counter.passes += 1
        counter.positions += hidden.shape[1]

    handle = model.decoder.layers[-1].register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def counted(model: EarlyExitForCausalLM, counter: PassCounter, generate: Callable, **kwargs) -> Any:
    """`generate(**kwargs)`, adding the full passes it runs to `counter`."""
    with counting_full_passes(model, counter):
        return generate(**kwargs)


def sequences_of(output) -> torch.Tensor:
    """The token ids of a `generate` output, whether or not it is a dict."""
    return output.sequences if hasattr(output, "sequences") else output


def new_tokens(batch: dict, output) -> int:
    """Tokens generated for `batch`, over all its rows."""
    sequences = sequences_of(output)
    return (sequences.shape[1] - batch["input_ids"].shape[1]) * sequences.shape[0]


def differing_tokens(batches: list[dict], reference: list, outputs: list) -> tuple[int, int]:
    """Generated tokens that differ from the reference outputs' at the same position (a missing or extra token
    counts as differing), and how many tokens the reference generated."""
    differing = total = 0
    for batch, expected, output in zip(batches, reference, outputs):
        start = batch["input_ids"].shape[1]
        expected, got = sequences_of(expected)[:, start:], sequences_of(output)[:, start:]
        shared = min(expected.shape[1], got.shape[1])
        differing += int((expected[:, :shared] != got[:, :shared]).sum())
        differing += abs(expected.shape[1] - got.shape[1]) * expected.shape[0]
        total += expected.numel()
    return differing, total


def assisted_counts(batches: list[dict], outputs: list, counter: PassCounter) -> tuple[float, float | None]:
    """Tokens per full pass and acceptance rate of `assistant_early_exit` runs, from the full passes counted.

    Each verification pass emits its accepted drafts plus one token of its own, so accepted = emitted - passes.
    The first pass of a prompt runs the prompt and its drafts; every later pass runs the last emitted token and its
    drafts (transformers crops the cache back to the accepted tokens). So the positions run are
    (prompt length - 1) per prompt + passes + drafted.
    """
    emitted = sum(new_tokens(batch, output) for batch, output in zip(batches, outputs))
    prompts = sum((batch["input_ids"].shape[1] - 1) * batch["input_ids"].shape[0] for batch in batches)
    drafted = counter.positions - prompts - counter.passes
    accepted = emitted - counter.passes
    return emitted / counter.passes, accepted / drafted if drafted else None


def speculative_counts(batches: list[dict], outputs: list) -> tuple[float, float | None]:
    """Tokens per full pass and acceptance rate of our speculative runs, pooled over all prompts."""
    emitted = passes = 0.0
    for batch, output in zip(batches, outputs):
        tokens = new_tokens(batch, output)
        emitted += tokens
        passes += tokens / output.tokens_per_full_pass
    drafted = sum(int(output.drafted.sum()) for output in outputs)
    accepted = sum(int(output.accepted.sum()) for output in outputs)
    return emitted / passes, accepted / drafted if drafted else None


def fastest(rows: list[Row], method: str) -> Row | None:
    """The row of `method` with the most tokens/s, if it was measured."""
    return max((row for row in rows if row.method == method), key=lambda row: row.speed, default=None)


def table(rows: list[Row]) -> list[str]:
    """Markdown table of `rows`."""
    lines = [
        "| method | setting | tokens/s | ratio to generate | accepted tokens per full pass | acceptance rate "
        "| identical to greedy generate |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        acceptance = "n/a" if row.acceptance is None else f"{100 * row.acceptance:.1f}%"
        identical = (
            "reference"
            if row.method == PLAIN
            else "yes"
            if row.differing == 0
            else f"no: {row.differing} of {row.total} tokens differ"
        )
        lines.append(
            f"| {row.method} | {row.setting} | {row.speed:.2f} | {row.ratio:.2f}x | {row.per_pass:.2f} "
            f"| {acceptance} | {identical} |"
        )
    return lines


def goal_lines(rows: list[Row]) -> list[str]:
    """The project's DSSD goals, each with its measured value and whether it is met."""
    dssd, assisted, fixed = fastest(rows, DSSD), fastest(rows, ASSISTED), fastest(rows, FIXED)
    if dssd is None:
        return ["- DSSD was not measured (empty `--levels`)."]

    def verdict(met: bool) -> str:
        return "met" if met else "**not met**"

    speculative = [row for row in rows if row.method != PLAIN]
    wrong = [f"{row.method} {row.setting}" for row in speculative if row.differing]
    lines = [
        f"- DSSD at its fastest level ({dssd.setting}): {dssd.ratio:.2f}x plain `generate`; goal at least 1.4x: "
        f"{verdict(dssd.ratio >= 1.4)}.",
        "- Output identical to greedy `generate`: "
        + (f"every speculative row ({len(speculative)})." if not wrong else f"**not** for {', '.join(wrong)}."),
    ]
    if assisted is not None:
        lines.append(
            f"- DSSD against `assistant_early_exit` at its best E ({assisted.setting}, {assisted.ratio:.2f}x): "
            f"{dssd.speed / assisted.speed:.2f}x as fast; goal faster: {verdict(dssd.speed > assisted.speed)}."
        )
    lookup = fastest(rows, LOOKUP)
    if lookup is not None:
        lines.append(
            f"- DSSD against transformers' prompt lookup at its best K ({lookup.setting}, {lookup.ratio:.2f}x): "
            f"{dssd.speed / lookup.speed:.2f}x as fast."
        )
    if fixed is not None:
        gain = dssd.per_pass / fixed.per_pass
        lines.append(
            f"- DSSD accepted tokens per full pass ({dssd.per_pass:.2f}, {dssd.setting}) against the fastest fixed "
            f"drafter's ({fixed.per_pass:.2f}, {fixed.setting}): {gain:.2f}x; goal at least 1.5x: "
            f"{verdict(gain >= 1.5)}."
        )
    return lines


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Speed ratio against accepted tokens per full pass, one marker family per method."""
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    for method, marker in ((ASSISTED, "^"), (LOOKUP, "v"), (FIXED, "s"), (DSSD, "o"), (PLAIN, "*")):
        chosen = [row for row in rows if row.method == method]
        if not chosen:
            continue
        axes.scatter(
            [row.per_pass for row in chosen],
            [row.ratio for row in chosen],
            marker=marker,
            label=method,
            s=80 if method == PLAIN else 30,
        )
        # Every fixed-drafter setting is in the report's table; the plot names only the fastest.
        labelled = [] if method == PLAIN else [fastest(rows, FIXED)] if method == FIXED else chosen
        for row in labelled:
            axes.annotate(row.setting, (row.per_pass, row.ratio), fontsize=6, xytext=(3, 2), textcoords="offset points")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("accepted tokens per full pass")
    axes.set_ylabel("tokens/s ratio to base.generate")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (`early-exit bench speculative` parses with it too)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--heads",
        default=str(SHIPPED_HEADS),
        help="heads folder or Hub repo, calibrated for --levels (default: the shipped "
        "adapters/SmolLM2-135M-Instruct-exits)",
    )
    parser.add_argument("--prompts", type=positive_int, default=4, help="eval prompts to decode, batch 1 (default 4)")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=128,
        help="new tokens per prompt, also the minimum (default 128)",
    )
    parser.add_argument(
        "--assistant-exits",
        nargs="*",
        type=int,
        default=[6, 12, 18, 21, 24, 27],
        help="layers E for base.generate(assistant_early_exit=E) (default 6 12 18 21 24 27; none: skip it)",
    )
    parser.add_argument(
        "--fixed-exits",
        nargs="*",
        type=int,
        default=[12, 18, 21, 24, 27],
        help="exit layers of the fixed drafter, exits of the heads (default 12 18 21 24 27; none: skip it)",
    )
    parser.add_argument(
        "--draft-lengths",
        nargs="+",
        type=positive_int,
        default=[1, 2, 3, 4, 6],
        help="draft lengths K of the fixed drafter (default 1 2 3 4 6)",
    )
    parser.add_argument(
        "--levels",
        nargs="*",
        type=float,
        default=list(DEFAULT_LEVELS),
        help=f"accuracy levels of DSSD, calibrated levels of the heads (default {' '.join(map(str, DEFAULT_LEVELS))}, "
        "the library's; none: skip DSSD)",
    )
    parser.add_argument(
        "--prompt-lookup",
        nargs="*",
        type=positive_int,
        default=[],
        help="prompt_lookup_num_tokens values: each adds transformers' own prompt lookup and DSSD at each level (and "
        "at full depth) with drafts copied from the context too (default none)",
    )
    parser.add_argument(
        "--max-draft-tokens",
        type=non_negative_int,
        default=DEFAULT_MAX_DRAFT_TOKENS,
        help=f"longest DSSD draft (default {DEFAULT_MAX_DRAFT_TOKENS}, the library's)",
    )
    add_placement_arguments(parser)
    parser.add_argument("--output", help="Markdown report to write, plot beside it (default: print the tables only)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run the benchmark with the options in `argv` (default: the command line's); `prog` names the command in the
    help and the report (default: this module's script in `examples/`)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = EarlyExitForCausalLM.from_pretrained(args.heads, **model_placement(args))
    num_layers = model.num_layers
    exits = list(model.config.exit_layers)
    if any(not 1 <= layer < num_layers for layer in args.assistant_exits):
        parser.error(f"--assistant-exits must lie in 1..{num_layers - 1}")
    if any(layer not in exits for layer in args.fixed_exits):
        parser.error(f"--fixed-exits must be exits of the heads: {exits}")
    tokenizer = load_base_tokenizer(model.config.base_model_name_or_path)
    batches = [batch.to(model.device) for batch in encode(tokenizer, load_prompts("eval")[: args.prompts])]
    pad = dict(pad_token_id=tokenizer.pad_token_id)
    tokens = args.max_new_tokens
    speculative = dict(return_dict_in_generate=True, **pad)
    settings = (
        [(ASSISTED, f"E={layer}", dict(assistant_early_exit=layer, **pad)) for layer in args.assistant_exits]
        + [(LOOKUP, f"K={length}", dict(prompt_lookup_num_tokens=length, **pad)) for length in args.prompt_lookup]
        + [
            (
                FIXED,
                f"E={layer}, K={length}",
                dict(
                    exit_config=ExitDecodingConfig(
                        exit_thresholds=[-math.inf if exit_layer == layer else None for exit_layer in exits],
                        speculative=True,
                        max_draft_tokens=length,
                    ),
                    prompt_lookup_num_tokens=0,
                    **speculative,
                ),
            )
            for layer in args.fixed_exits
            for length in args.draft_lengths
        ]
        + [
            (
                DSSD,
                f"level {level:g}",
                dict(
                    exit_config=ExitDecodingConfig(
                        accuracy_level=level, speculative=True, max_draft_tokens=args.max_draft_tokens
                    ),
                    prompt_lookup_num_tokens=0,  # the exits' drafts alone
                    **speculative,
                ),
            )
            for level in args.levels
        ]
        + [
            (
                DSSD,
                f"{'full depth' if level is None else f'level {level:g}'} + lookup K={length}",
                dict(
                    exit_config=ExitDecodingConfig(
                        accuracy_level=level, speculative=True, max_draft_tokens=args.max_draft_tokens
                    ),
                    prompt_lookup_num_tokens=length,
                    **speculative,
                ),
            )
            for length in args.prompt_lookup
            for level in [None, *args.levels]
        ]
    )

    with torch.no_grad():
        model.base.generate(**batches[0], max_new_tokens=4, do_sample=False, **pad)  # warm-up, untimed
        model.generate(**batches[0], max_new_tokens=2, do_sample=False, **pad)  # packs the decoding kernels, untimed
    # Every setting runs on one prompt before any runs on the next, in a rotating order, so the machine's noise
    # falls on all of them alike (plain `generate` included).
    counters = {(method, setting): PassCounter() for method, setting, _ in settings if method in (ASSISTED, LOOKUP)}
    runs = {(PLAIN, "greedy"): partial(model.base.generate, **pad)}
    for method, setting, kwargs in settings:
        if (method, setting) in counters:
            generate = partial(model.base.generate, **kwargs)
            runs[method, setting] = partial(counted, model, counters[method, setting], generate)
        else:
            runs[method, setting] = partial(model.generate, **kwargs)
    results = timed(runs, batches, tokens)
    base_speed, reference = results[PLAIN, "greedy"]
    rows = [Row(PLAIN, "greedy", base_speed, 1.0, 1.0, None, 0, sum(map(new_tokens, batches, reference)))]
    print(f"base.generate: {base_speed:.2f} tokens/s", file=sys.stderr)
    for method, setting, _ in settings:
        speed, outputs = results[method, setting]
        if (method, setting) in counters:
            per_pass, acceptance = assisted_counts(batches, outputs, counters[method, setting])
        else:
            per_pass, acceptance = speculative_counts(batches, outputs)
        differing, total = differing_tokens(batches, reference, outputs)
        rows.append(Row(method, setting, speed, speed / base_speed, per_pass, acceptance, differing, total))
        print(
            f"{method} {setting}: {speed / base_speed:.2f}x, {per_pass:.2f} tokens per full pass, {differing} of "
            f"{total} tokens differ from greedy",
            file=sys.stderr,
        )

    name = model.config.base_model_name_or_path
    best = [rows[0]] + [row for method in (ASSISTED, LOOKUP, FIXED, DSSD) if (row := fastest(rows, method))]
    lines = [
        f"Machine: {describe_machine()}.",
        "",
        f"Plain `base.generate`: {base_speed:.2f} tokens/s (greedy, batch 1, {len(batches)} eval prompts, exactly "
        f"{tokens} new tokens each, after one untimed warm-up). Ratios are against it, measured in the same run.",
        "",
        "Accepted tokens per full pass: tokens emitted per full-depth forward pass (accepted drafts plus the pass's "
        "own token; plain `generate` 1.00), from the outputs' `tokens_per_full_pass` for our drafters and from "
        "counting the calls of the last decoder layer for `assistant_early_exit`, whose drafts stop at layer E. "
        "Acceptance rate: accepted over drafted tokens, pooled over the prompts.",
        "",
        "## Goals",
        "",
        *goal_lines(rows),
        "",
        "## Fastest setting of each method",
        "",
        *table(best),
    ]
    for method, title in (
        (
            ASSISTED,
            "transformers `generate(assistant_early_exit=E)`: the first E layers draft, the full model "
            "verifies (transformers' defaults: up to 20 drafts, stopping below 0.4 confidence)",
        ),
        (LOOKUP, "transformers `generate(prompt_lookup_num_tokens=K)`: drafts copied from the context"),
        (FIXED, "Fixed drafter with our heads (LayerSkip-style): K drafts from exit E, then one full pass"),
        (
            DSSD,
            f"DSSD: calibrated exits draft until a token needs full depth (at most {args.max_draft_tokens} drafts); "
            "with lookup, drafts copied from the context join them in the same verification",
        ),
    ):
        chosen = [row for row in rows if row.method == method]
        if chosen:
            lines += ["", f"## {title}", "", *table(chosen)]
    print("\n".join(lines))

    if args.output:
        output = Path(args.output)
        image = output.with_suffix(".png")
        output.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, image, f"{name}: self-speculative decoding")
        command = f"{prog or SCRIPT} " + " ".join(argv if argv is not None else sys.argv[1:])
        page = benchmark_page(
            f"Self-speculative decoding: {name}", command, lines, image, "speed against tokens per full pass"
        )
        output.write_text(page, encoding="utf-8")
        print(f"report written to {output}, plot to {image}", file=sys.stderr)


if __name__ == "__main__":
    main()
