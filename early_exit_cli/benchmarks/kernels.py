"""Benchmark passes of a few new positions through the default model's decoder: stock `F.linear` against
`FewPositionLinears`, in float32 and bfloat16.

A pass runs through our `DecoderAdapter` as the decoding loop does: embedding, masks and rotary tables, all decoder
layers with a KV cache of `--context` positions, and the final norm (the LM head is timed apart). The cache is cropped
back after each timed pass, so every pass sees the same cache length. Passes of every variant and row count are
interleaved in a new shuffled order each round, `--repeats` rounds, so machine noise hits all alike; the tables give
the minimum and median ms, ratios of minimums, and the memory-bandwidth bound: the bytes a pass must read (weights and
KV cache) over the streaming read bandwidth measured in the same run (one sum over 512 MB per round; the bound is
given at the best and at the median of the rounds, as other tenants of the machine share its memory bus).

Variants: stock; `FewPositionLinears` with and without packed weights; the former with `FewPositionAttention`,
which lets SDPA share key/value heads instead of copying them when a pass of several positions needs a mask; and
those with `FusedDecoderLayers`, which runs each layer from fused q/k/v and gate/up matrices: what the decoding loop
runs (`EarlyExitForCausalLM.decoding_kernels`).

    early-exit bench kernels --output docs/kernels-smollm2-135m.md
    python examples/benchmark_kernels.py --output docs/kernels-smollm2-135m.md  (the same)

`--profile` adds where the time of a pass goes (each linear, attention, norms; forward hooks, summed over the
layers; for the variant before `FusedDecoderLayers`, whose layers call no submodules but o_proj and down_proj),
`--sweep` a table of each matmul form on random matrices of the shapes of the model's decoder linears, as many as it
has so that they stream from memory (what `early_exit.kernels.tuning` times on the model's own weights, at more
rounds), beside the form `linear_for_rows` chose.
"""

from __future__ import annotations

import argparse
import inspect
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from early_exit import load_default_model
from early_exit.architectures import DecoderAdapter, get_decoder_adapter
from early_exit.kernels import FewPositionAttention, FusedDecoderLayers, decoding_products, entered_together
from early_exit.kernels.forms import PACKINGS, LinearForm, apply_form, can_pack, pack_weight
from early_exit.kernels.multi_position import FewPositionLinears, linear_for_rows
from early_exit.kernels.tuning import ROW_BUCKETS, choice_for, tune_forms

from ..parser import positive_int
from .machine import describe_machine

#: How the report names the command when `main` is given no `prog` (the script that runs this module).
SCRIPT = "python examples/benchmark_kernels.py"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STOCK, LINEARS_ONLY, UNPACKED = "stock", "FewPositionLinears", "FewPositionLinears(prepack=False)"
#: The previous release's decoding, which the profile compares with stock (hooks cannot see inside fused layers).
SHARED = "FewPositionLinears + FewPositionAttention"
#: What decoding runs (`EarlyExitForCausalLM.decoding_kernels`).
CHOSEN = "FusedDecoderLayers + FewPositionLinears + FewPositionAttention"
#: The sweep's row for the form `linear_for_rows` chose.
CHOSEN_FORM = "chosen (linear_for_rows)"
VARIANTS = (STOCK, LINEARS_ONLY, UNPACKED, SHARED, CHOSEN)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Model:
    """One dtype of the default model: its adapter, a filled KV cache, tokens to feed, and the scopes compared."""

    name: str
    adapter: DecoderAdapter
    cache: DynamicCache
    continuation: torch.Tensor
    scopes: dict[str, list[FusedDecoderLayers | FewPositionLinears | FewPositionAttention]]  # by variant

    def linears(self) -> Iterator[tuple[str, nn.Linear]]:
        """The decoder layers' linears with their names inside their layer (e.g. `self_attn.q_proj`)."""
        for layer in self.adapter.layers:
            for module_name, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    yield module_name, module

    def linear_bytes(self, name: str | None = None) -> int:
        """Bytes of the weights of the decoder linears called `name` (all of them by default), over all layers."""
        return sum(
            module.weight.numel() * module.weight.element_size()
            for module_name, module in self.linears()
            if name is None or module_name.endswith(name)
        )

    def pass_bytes(self, rows: int) -> int:
        """Bytes one pass of `rows` new positions must read: every parameter of the layers and the cached keys and
        values (the final norm's weight is negligible)."""
        weights = sum(p.numel() * p.element_size() for p in self.adapter.layers.parameters())
        keys, values = self.cache.layers[0].keys, self.cache.layers[0].values
        per_position = (keys[0, :, 0].numel() + values[0, :, 0].numel()) * keys.element_size()
        return weights + per_position * (self.cache.get_seq_length() + rows) * self.adapter.num_layers


def load(name: str, context: int, max_rows: int) -> Model:
    """The default model in dtype `name`, with a cache of `context` positions of real text."""
    model, tokenizer = load_default_model(dtype=DTYPES[name])
    adapter = get_decoder_adapter(model)
    # Any real text will do: what a pass reads does not depend on the tokens.
    ids = tokenizer(inspect.getsource(argparse), return_tensors="pt").input_ids[:, : context + max_rows]
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        run_pass(adapter, cache, ids[:, :context])
    linears, attention = FewPositionLinears(adapter.layers), FewPositionAttention(adapter.layers)
    scopes = {
        STOCK: [],
        LINEARS_ONLY: [linears],
        UNPACKED: [FewPositionLinears(adapter.layers, prepack=False)],
        SHARED: [linears, attention],
        CHOSEN: [*decoding_products(adapter.layers), attention],
    }
    return Model(name, adapter, cache, ids[:, context:], scopes)


def run_pass(adapter: DecoderAdapter, cache: DynamicCache, ids: torch.Tensor) -> torch.Tensor:
    """Embed `ids`, run every decoder layer and the final norm, as the decoding loop does."""
    hidden, inputs = adapter.start(ids, cache=cache)
    for index in range(adapter.num_layers):
        hidden = adapter.layer(index, hidden, inputs)
    return adapter.norm(hidden)


@contextmanager
def running(model: Model, variant: str) -> Iterator[None]:
    """The scopes of `variant`, entered."""
    with entered_together(*model.scopes[variant]):
        yield


def timed_pass(model: Model, variant: str, rows: int) -> float:
    """Seconds of one pass of `rows` new positions; the variant's setting is entered before the timer starts and left
    after it stops (entering a scope is timed apart, see `scope_cost`)."""
    with running(model, variant), torch.inference_mode():
        started = time.perf_counter()
        run_pass(model.adapter, model.cache, model.continuation[:, :rows])
        elapsed = time.perf_counter() - started
    model.cache.crop(-rows)
    return elapsed


def scope_cost(scope: FewPositionLinears, repeats: int = 50) -> float:
    """Seconds to enter and leave `scope` once (its weights already packed)."""
    started = time.perf_counter()
    for _ in range(repeats):
        with scope:
            pass
    return (time.perf_counter() - started) / repeats


def streaming_bandwidth(buffer: torch.Tensor) -> float:
    """Bytes per second of one sum over `buffer` (larger than the caches)."""
    started = time.perf_counter()
    buffer.sum()
    return buffer.numel() * buffer.element_size() / (time.perf_counter() - started)


def interleaved(cases: list[tuple], measure: Callable, repeats: int, bandwidth: list[float]) -> dict[tuple, list]:
    """`measure(*case)` for every case, `repeats` rounds in a new shuffled order each, with one bandwidth measurement
    per round appended to `bandwidth`; returns the results per case."""
    # Random values: pages of equal content can be merged by the host and then read from cache.
    buffer = torch.randn(128 * 2**20)  # 512 MB
    results: dict[tuple, list] = defaultdict(list)
    order = list(cases)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for case in order:
            results[case].append(measure(*case))
        bandwidth.append(streaming_bandwidth(buffer))
    return results


def bound(nbytes: int, bandwidth: list[float]) -> str:
    """ms to read `nbytes` at the best and at the median measured bandwidth."""
    return f"{1e3 * nbytes / max(bandwidth):.2f} / {1e3 * nbytes / statistics.median(bandwidth):.2f}"


def pass_table(models: list[Model], rows_list: list[int], times: dict, bandwidth: list[float]) -> list[str]:
    """Markdown table of ms per pass, ratios of minimums, and the bound at the best and the median bandwidth."""
    lines = [
        "| dtype | variant | rows | ms min | ms median | min / same variant's 1 row | min / stock 1 row "
        "| bound ms (best / median bandwidth) | min / best bound |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model in models:
        stock_one = min(times[model.name, STOCK, 1])
        for variant in VARIANTS:
            one = min(times[model.name, variant, 1])
            for rows in rows_list:
                samples = times[model.name, variant, rows]
                nbytes = model.pass_bytes(rows)
                lines.append(
                    f"| {model.name} | {variant} | {rows} | {1e3 * min(samples):.2f} "
                    f"| {1e3 * statistics.median(samples):.2f} | {min(samples) / one:.2f}x "
                    f"| {min(samples) / stock_one:.2f}x | {bound(nbytes, bandwidth)} "
                    f"| {min(samples) * max(bandwidth) / nbytes:.2f} |"
                )
    return lines


def goal_lines(models: list[Model], rows_list: list[int], times: dict) -> list[str]:
    """The project's goal for a pass of 4 new positions (at most 1.2x one), per dtype and variant."""
    if 4 not in rows_list:
        return []
    lines = []
    for model in models:
        for variant in VARIANTS:
            ratio = min(times[model.name, variant, 4]) / min(times[model.name, variant, 1])
            verdict = "met" if ratio <= 1.2 else "**not met**"
            lines.append(f"- {model.name}, {variant}: 4 positions cost {ratio:.2f}x one; goal at most 1.2x: {verdict}.")
    return lines


@contextmanager
def module_timers(layers: nn.ModuleList) -> Iterator[dict[str, float]]:
    """Seconds spent in the modules of `layers` while the block runs, summed by name: each linear, `self_attn` and
    `mlp` (with their linears), "norms", and "layer" (whole layers)."""
    spent: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    handles = []

    def watch(module: nn.Module, name: str) -> None:
        def before(*_) -> None:
            started[id(module)] = time.perf_counter()

        def after(*_) -> None:
            spent[name] += time.perf_counter() - started.pop(id(module))

        handles.extend([module.register_forward_pre_hook(before), module.register_forward_hook(after)])

    for layer in layers:
        watch(layer, "layer")
        for name, module in layer.named_modules():
            if name:
                watch(module, "norms" if name.endswith("layernorm") else name.rsplit(".", 1)[-1])
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


def profiled_pass(model: Model, variant: str, rows: int) -> dict[str, float]:
    """Seconds per part of one pass: each linear (over all layers), attention without its linears, the MLP's
    activation and product, the norms inside the layers, what the layers do outside their modules (residual adds),
    and what the pass does outside the layers (embedding, masks, rotary tables, final norm)."""
    with module_timers(model.adapter.layers) as spent:
        total = timed_pass(model, variant, rows)
    parts = {name: spent[name] for name in LINEARS}
    parts["attention without linears"] = spent["self_attn"] - sum(spent[name] for name in LINEARS[:4])
    parts["MLP activation and product"] = spent["mlp"] - sum(spent[name] for name in LINEARS[4:])
    parts["RMS norms in layers"] = spent["norms"]
    parts["residual adds"] = spent["layer"] - spent["self_attn"] - spent["mlp"] - spent["norms"]
    parts["embed, masks, rotary, final norm"] = total - spent["layer"]
    parts["whole pass (hooks included)"] = total
    return parts


def profile_table(models: list[Model], rows_list: list[int], runs: dict, bandwidth: list[float]) -> list[str]:
    """Markdown table of the ms per part of a pass (each part's best of the rounds), with each linear's bandwidth
    bound."""
    columns = [(model, variant, rows) for model in models for variant in (STOCK, SHARED) for rows in rows_list]
    lines = [
        "| part | "
        + " | ".join(
            f"{model.name} {'stock' if variant == STOCK else 'forms + shared heads'} {rows}"
            for model, variant, rows in columns
        )
        + " | "
        + " | ".join(f"{model.name} bound (best / median bandwidth)" for model in models)
        + " |",
        "| --- |" + " ---: |" * (len(columns) + len(models)),
    ]
    for part in runs[columns[0][0].name, STOCK, rows_list[0]][0]:
        cells = [min(run[part] for run in runs[m.name, v, r]) for m, v, r in columns]
        bounds = [bound(model.linear_bytes(part), bandwidth) if part in LINEARS else "" for model in models]
        lines.append(
            f"| {part} | " + " | ".join(f"{1e3 * cell:.2f}" for cell in cells) + " | " + " | ".join(bounds) + " |"
        )
    return lines


def lm_head_table(models: list[Model], rows_list: list[int], repeats: int, bandwidth: list[float]) -> list[str]:
    """Markdown table of ms per full-vocabulary LM-head product: `F.linear` (what the base model runs), and
    `linear_for_rows` with and without a packed weight (what decoding runs)."""
    forms: dict[str, Callable] = {}
    for model in models:
        weight = model.adapter.lm_head.weight
        tune_forms([weight])  # as decoding's scope over the whole model does
        packing = choice_for(weight).packing
        packed = pack_weight(weight, packing) if packing else None
        forms[model.name, "F.linear"] = lambda x, w=weight: F.linear(x, w)
        forms[model.name, "linear_for_rows"] = lambda x, w=weight: linear_for_rows(x, w)
        forms[model.name, "linear_for_rows, packed"] = lambda x, w=weight, p=packed: linear_for_rows(x, w, None, p)
    inputs = {
        (m.name, rows): torch.randn(1, rows, m.adapter.hidden_size, dtype=DTYPES[m.name])
        for m in models
        for rows in rows_list
    }

    def measure(model: str, form: str, rows: int) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            forms[model, form](inputs[model, rows])
            return time.perf_counter() - started

    cases = [(model, form, rows) for model, form in forms for rows in rows_list]
    times = interleaved(cases, measure, repeats, bandwidth)
    lines = [
        "| dtype | form | "
        + " | ".join(f"{rows} row(s) ms min / median" for rows in rows_list)
        + " | bound ms (best / median bandwidth) |",
        "| --- | --- |" + " ---: |" * (len(rows_list) + 1),
    ]
    for model in models:
        weight = model.adapter.lm_head.weight
        weight_bound = bound(weight.numel() * weight.element_size(), bandwidth)
        for name, form in forms:
            if name == model.name:
                cells = [times[name, form, rows] for rows in rows_list]
                lines.append(
                    f"| {name} | {form} | "
                    + " | ".join(f"{1e3 * min(c):.2f} / {1e3 * statistics.median(c):.2f}" for c in cells)
                    + f" | {weight_bound} |"
                )
    return lines


def forms_table(models: list[Model]) -> list[str]:
    """Markdown table of the forms timed fastest on this machine for each weight shape of the decoder and the LM
    head, per row bucket, with and without packed weights (what `linear_for_rows` runs)."""
    lines = [
        "| dtype | out x in | weights | " + " | ".join(f"{rows} rows" for rows in ROW_BUCKETS) + " |",
        "| --- | --- | --- |" + " --- |" * len(ROW_BUCKETS),
    ]
    for model in models:
        weights = {tuple(model.adapter.lm_head.weight.shape): model.adapter.lm_head.weight}
        for _, module in model.linears():
            weights.setdefault(tuple(module.weight.shape), module.weight)
        for (out_features, in_features), weight in sorted(weights.items()):
            choice = choice_for(weight)
            for packed in (True, False):
                lines.append(
                    f"| {model.name} | {out_features}x{in_features} | {'packed' if packed else 'not packed'} | "
                    + " | ".join(choice.form(rows, packed).value for rows in ROW_BUCKETS)
                    + " |"
                )
    return lines


def sweep_table(
    models: list[Model],
    rows_list: list[int],
    extra_shapes: list[tuple[int, int]],
    repeats: int,
    bandwidth: list[float],
) -> list[str]:
    """Markdown table of us per matrix for each matmul form, on random matrices of every linear shape of the decoder
    (as many of each as the model has) and of `extra_shapes` (enough for 64 MB each), so that they stream from
    memory; then ms for all the decoder's linears."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for _, module in models[0].linears():
        counts[tuple(module.weight.shape)] += 1
    for out_features, in_features in extra_shapes:
        counts.setdefault((out_features, in_features), -(-64 * 2**20 // (4 * out_features * in_features)))
    weights = {
        (m.name, shape): [torch.randn(shape, dtype=DTYPES[m.name]) / shape[1] ** 0.5 for _ in range(count)]
        for m in models
        for shape, count in counts.items()
    }
    # Every packed layout of every matrix, and the one its choice uses (what `linear_for_rows` is given).
    packed = {
        (key, packing): [pack_weight(weight, packing) for weight in matrices]
        for key, matrices in weights.items()
        for packing in PACKINGS
        if can_pack(matrices[0], packing)
    }
    for key, matrices in weights.items():
        packing = choice_for(matrices[0]).packing
        packed[key, CHOSEN_FORM] = packed[key, packing] if packing else [None] * len(matrices)
    inputs = {
        (m.name, rows, shape[1]): torch.randn(rows, shape[1], dtype=DTYPES[m.name])
        for m in models
        for rows in rows_list
        for shape in counts
    }
    forms = [*LinearForm, CHOSEN_FORM]

    def measure(model: str, shape: tuple[int, int], form: LinearForm | str, rows: int) -> float:
        x, matrices = inputs[model, rows, shape[1]], weights[model, shape]
        copies = packed.get(((model, shape), form), [None] * len(matrices))
        with torch.inference_mode():
            started = time.perf_counter()
            for weight, copy in zip(matrices, copies):
                if form == CHOSEN_FORM:
                    linear_for_rows(x, weight, None, copy)
                else:
                    apply_form(form, x, weight, None, copy)
            return (time.perf_counter() - started) / len(matrices)

    cases = [
        (m.name, shape, form, rows)
        for m in models
        for shape in counts
        for form in forms
        for rows in rows_list
        if (form is not LinearForm.DOUBLED_ROW or rows == 1)
        and (form not in PACKINGS or ((m.name, shape), form) in packed)
    ]
    times = interleaved(cases, measure, repeats, bandwidth)
    lines = [
        "| dtype | out x in (count) | form | " + " | ".join(f"{rows}" for rows in rows_list) + " |",
        "| --- | --- | --- |" + " ---: |" * len(rows_list),
    ]
    model_shapes = [shape for shape in counts if shape not in extra_shapes]
    for m in models:
        for shape, count in counts.items():
            for form in forms:
                cells = [times.get((m.name, shape, form, rows)) for rows in rows_list]
                if not any(cells):
                    continue
                lines.append(
                    f"| {m.name} | {shape[0]}x{shape[1]} ({count}) | {form_label(form)} | "
                    + " | ".join(f"{1e6 * min(cell):.0f}" if cell else "" for cell in cells)
                    + " |"
                )
        for form in forms:
            totals = [
                sum(counts[shape] * min(times[m.name, shape, form, rows]) for shape in model_shapes)
                if (m.name, model_shapes[0], form, rows) in times
                else None
                for rows in rows_list
            ]
            if not any(totals):
                continue
            everything = f"all {sum(counts[shape] for shape in model_shapes)} of the model, ms"
            lines.append(
                f"| {m.name} | {everything} | {form_label(form)} | "
                + " | ".join(f"{1e3 * total:.1f}" if total else "" for total in totals)
                + " |"
            )
        lines.append(
            f"| {m.name} | all of the model, ms | bound (best / median bandwidth) | "
            + " | ".join(bound(m.linear_bytes(), bandwidth) for _ in rows_list)
            + " |"
        )
    lines += ["", "us per matrix, best of the rounds (all of the model: ms, sums of the best)."]
    return lines


def form_label(form: LinearForm | str) -> str:
    """How the sweep table names a form."""
    return form.value if isinstance(form, LinearForm) else form


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (`early-exit bench kernels` parses with it too)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", nargs="+", type=positive_int, default=[1, 2, 4, 8], help="new positions per pass (default 1 2 4 8)"
    )
    parser.add_argument("--context", type=positive_int, default=200, help="positions in the KV cache (default 200)")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        default=["fp32", "bf16"],
        help="dtypes to load the default model in (default: fp32 bf16)",
    )
    parser.add_argument("--repeats", type=positive_int, default=40, help="rounds of interleaved passes (default 40)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--profile", action="store_true", help="add the per-module breakdown")
    parser.add_argument("--sweep", action="store_true", help="add the synthetic table of matmul forms")
    parser.add_argument(
        "--sweep-rows",
        nargs="+",
        type=positive_int,
        default=[1, 2, 3, 4, 8, 16, 128],
        help="rows of the --sweep table (default 1 2 3 4 8 16 128)",
    )
    parser.add_argument(
        "--sweep-shapes", nargs="*", default=[], metavar="OUTxIN", help="more matrix shapes for --sweep, e.g. 576x1024"
    )
    parser.add_argument("--output", help="Markdown report to write (default: print it only)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run the benchmark with the options in `argv` (default: the command line's); `prog` names the command in the
    help and the report (default: this module's script in `examples/`)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if 1 not in args.rows:
        parser.error("--rows must include 1: ratios are to one position")
    try:
        extra_shapes = [tuple(int(size) for size in shape.split("x")) for shape in args.sweep_shapes]
    except ValueError:
        parser.error("--sweep-shapes takes OUTxIN sizes, e.g. 576x1024")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = [load(name, args.context, max(args.rows)) for name in args.dtypes]
    bandwidth: list[float] = []
    cases = [(model.name, variant, rows) for model in models for variant in VARIANTS for rows in args.rows]
    by_name = {model.name: model for model in models}
    # One untimed round first: oneDNN creates its kernels on first use.
    interleaved(cases, lambda name, variant, rows: timed_pass(by_name[name], variant, rows), 1, [])
    times = interleaved(
        cases, lambda name, variant, rows: timed_pass(by_name[name], variant, rows), args.repeats, bandwidth
    )

    report = [
        "# Few-position passes through the decoder",
        "",
        f"Default model (SmolLM2-135M-Instruct), {describe_machine()}. KV cache of {args.context} positions, "
        f"{args.repeats} interleaved rounds. Streaming read bandwidth, best of the rounds: "
        f"{max(bandwidth) / 1e9:.1f} GB/s (median {statistics.median(bandwidth) / 1e9:.1f}).",
        "",
        "## ms per pass (embedding, all layers, final norm; LM head apart)",
        "",
        *pass_table(models, args.rows, times, bandwidth),
        "",
        *goal_lines(models, args.rows, times),
    ]
    for model in models:
        scope = model.scopes[LINEARS_ONLY][0]  # the packed one
        report.append(
            f"- {model.name}: `FewPositionLinears` holds {scope.packed_bytes / 1e6:.0f} MB of packed weights; "
            f"entering and leaving it costs {1e3 * scope_cost(scope):.2f} ms; `FusedDecoderLayers` holds "
            f"{model.scopes[CHOSEN][0].copied_bytes / 1e6:.0f} MB of fused copies (and their packed copies)."
        )
    if args.profile:
        rows_list = sorted({1, max(r for r in args.rows if r <= 4)})
        profile_cases = [(m.name, v, rows) for m in models for v in (STOCK, SHARED) for rows in rows_list]
        runs = interleaved(
            profile_cases,
            lambda name, variant, rows: profiled_pass(by_name[name], variant, rows),
            max(5, args.repeats // 2),
            bandwidth,
        )
        report += [
            "",
            "## Where the time goes (ms per pass, summed over layers, best of the rounds; hooks add ~2 us per module)",
            "",
            f"Stock against {SHARED} (the fused layers call no q/k/v, gate or up module for hooks to time).",
            "",
            *profile_table(models, rows_list, runs, bandwidth),
        ]
    report += [
        "",
        "## LM head (full vocabulary), ms per product",
        "",
        *lm_head_table(models, args.rows, args.repeats, bandwidth),
        "",
        "## Forms timed fastest on this machine (`early_exit.kernels.tuning`)",
        "",
        *forms_table(models),
    ]
    if args.sweep:
        report += [
            "",
            "## Matmul forms on the decoder's linear shapes (random weights)",
            "",
            *sweep_table(models, args.sweep_rows, extra_shapes, max(5, args.repeats // 4), bandwidth),
        ]
    report += ["", f"Reproduce: `{prog or SCRIPT} " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", ""]
    text = "\n".join(report)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
