"""Reports: held-out agreement of heads and calibration results, as Markdown pages and plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy

from .calibration import CalibrationTable, ExitCosts, ExitScores, PolicyOutcome
from .training import ExitAgreement, TrainingCurve


@dataclass
class AgreementCurve:
    """Held-out agreement of one set of exits, for a table row group and a line of the plot."""

    label: str
    result: ExitAgreement
    parameters: int = 0


@dataclass
class HeadCosts:
    """What the heads of one folder cost, exit by exit.

    Attributes:
        exit_layers: the folder's exits.
        parameters: per exit, the head's parameters.
        full: decoding-step costs with every head scoring the full vocabulary.
        pruned: the same with the vocabulary pruned at the first exit (its head pays the full vocabulary and the
            top-k, the later ones score only the kept tokens).
        kept: the number of tokens kept by `pruned`.
    """

    exit_layers: list[int]
    parameters: list[int]
    full: ExitCosts
    pruned: ExitCosts
    kept: int


def head_costs_table(costs: HeadCosts) -> str:
    """A Markdown table: per exit, its head's parameters and the time of one head call (with its confidence metric)
    as a multiple of one decoder layer, over the full vocabulary and pruned."""
    rows = [
        "| exit after layer | head parameters | head call, full vocabulary (x layer) | "
        f"head call, pruned to {costs.kept} tokens (x layer) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for index, layer in enumerate(costs.exit_layers):
        full = costs.full.head_ms[index] / costs.full.layer_ms
        pruned = costs.pruned.head_ms[index] / costs.pruned.layer_ms
        note = " (prunes)" if index == costs.pruned.pruning_exit else ""
        rows.append(f"| {layer} | {costs.parameters[index]:,} | {full:.2f} | {pruned:.2f}{note} |")
    return "\n".join(rows)


def agreement_table(curves: list[AgreementCurve]) -> str:
    """A Markdown table: one row per exit layer, one agreement (and KL) column per curve."""
    layers = sorted({layer for curve in curves for layer in curve.result.exit_layers})
    header = "| exit after layer | " + " | ".join(f"{curve.label} agreement | KL" for curve in curves) + " |"
    rule = "| ---: |" + " ---: | ---: |" * len(curves)
    rows = []
    for layer in layers:
        cells = []
        for curve in curves:
            if layer in curve.result.exit_layers:
                index = curve.result.exit_layers.index(layer)
                cells += [f"{100 * curve.result.rates[index]:.1f}%", f"{curve.result.kl[index]:.2f}"]
            else:
                cells += ["", ""]
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    oracle_cells = [cell for curve in curves for cell in (f"{curve.result.oracle_mean_layers:.1f}", "")]
    oracle = (
        "| oracle: mean layers if each token left at its earliest agreeing exit | " + " | ".join(oracle_cells) + " |"
    )
    return "\n".join([header, rule, *rows, oracle])


def _figure():
    """A new (figure, axes) on the non-interactive backend, so plotting works on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(figsize=(7, 4.2), dpi=120)


def _save(figure, path: str | os.PathLike) -> Path:
    from matplotlib import pyplot

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
    return path


def plot_agreement_by_layer(curves: list[AgreementCurve], path: str | os.PathLike, title: str) -> Path:
    """Draw each curve's agreement against exit layer and save the figure (PNG) to `path`."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure()
    for curve in curves:
        style = {"linestyle": "--", "marker": None} if len(curve.result.exit_layers) > 12 else {"marker": "o"}
        axes.plot(curve.result.exit_layers, [100 * rate for rate in curve.result.rates], label=curve.label, **style)
    axes.set_xlabel(f"exit after layer (of {curves[0].result.num_layers})")
    axes.set_ylabel("top-1 agreement with the final layer (%)")
    axes.set_ylim(0, 100)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_accuracy_against_depth(
    curves: dict[str, list[PolicyOutcome]],
    calibrated: dict[str, dict[float, PolicyOutcome]],
    num_layers: int,
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Accuracy against average layers used, one line per metric (its whole threshold family) with its calibrated
    levels marked; the top axis reads the depth as the speedup it implies if heads cost nothing."""
    figure, axes = _figure()
    for metric, outcomes in curves.items():
        points = sorted((outcome.mean_layers, 100 * outcome.accuracy) for outcome in outcomes)
        line = axes.plot(*zip(*points), label=metric)[0]
        marks = calibrated.get(metric, {})
        axes.scatter(
            [outcome.mean_layers for outcome in marks.values()],
            [100 * outcome.accuracy for outcome in marks.values()],
            color=line.get_color(),
            zorder=3,
        )
    axes.set_xlabel(f"average layers per token (of {num_layers})")
    axes.set_ylabel("agreement with the full model (%)")
    axes.grid(alpha=0.3)

    def invert(values):  # layers <-> speedup, safe at 0 where matplotlib probes the axis ends
        return num_layers / numpy.clip(values, 1e-6, None)

    speedup = axes.secondary_xaxis("top", functions=(invert, invert))
    speedup.set_xlabel("implied speedup (layers only)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, title="dots: calibrated levels", title_fontsize=8)
    return _save(figure, path)


def plot_exit_histograms(
    outcomes: dict[float, PolicyOutcome], exit_layers: list[int], path: str | os.PathLike, title: str
) -> Path:
    """For each accuracy level, the share of tokens leaving at each exit (and at full depth), as grouped bars."""
    figure, axes = _figure()
    labels = [str(layer) for layer in exit_layers] + ["full"]
    width = 0.8 / max(len(outcomes), 1)
    for index, (level, outcome) in enumerate(sorted(outcomes.items())):
        total = max(sum(outcome.exit_counts), 1)
        positions = [slot + index * width for slot in range(len(labels))]
        axes.bar(positions, [100 * count / total for count in outcome.exit_counts], width, label=f"level {level:g}")
    axes.set_xticks([slot + 0.4 - width / 2 for slot in range(len(labels))], labels)
    axes.set_xlabel("exit after layer")
    axes.set_ylabel("tokens leaving there (%)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_exit_layer_histogram(
    exit_layers: list[int], exit_positions: list[int], num_layers: int, path: str | os.PathLike, title: str
) -> Path:
    """How many generated tokens left at each exit and at full depth, as bars at their layer numbers (PNG to `path`).

    Args:
        exit_layers: the exit layer of every generated token (`num_layers` for full depth); other values, such as
            the 0 of rows that had finished, are not counted.
        exit_positions: the layers with exits, each drawn even when no token left there.
        num_layers: the model's depth, where full-depth tokens are drawn.
    """
    positions = [*exit_positions, num_layers]
    counts = [sum(layer == position for layer in exit_layers) for position in positions]
    total = max(sum(counts), 1)
    figure, axes = _figure()
    bars = axes.bar(positions, counts, width=0.8, color=["C0"] * len(exit_positions) + ["C7"])
    axes.bar_label(bars, [f"{100 * count / total:.0f}%" for count in counts], fontsize=8)
    axes.set_xticks(positions, [str(layer) for layer in exit_positions] + [f"{num_layers}\n(full)"])
    axes.set_xlim(0, num_layers + 1)
    axes.set_xlabel(f"exit after layer (of {num_layers})")
    axes.set_ylabel("generated tokens leaving there")
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def heads_report(
    base_model: str,
    curves: list[AgreementCurve],
    tokens: int,
    command: str,
    plot: Path,
    trainings: dict[str, dict],
    costs: dict[str, HeadCosts] | None = None,
) -> str:
    """The Markdown page of `early-exit report`: agreement by layer of each heads folder against the logit lens,
    with how each was trained (`trainings`: folder name -> its config's `training` record) and, with `costs`
    (folder name -> its measured costs), what each head costs."""
    lines = [
        f"# Held-out agreement of exit heads: {base_model}",
        "",
        f"Top-1 agreement of each exit with the final layer, and KL(final || exit), on {tokens} tokens "
        "of the `eval` split (Python library modules and project prompts that training never sees; the model's own "
        "answers to the eval prompts included). Written by:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"![agreement by layer]({plot.name})",
        "",
        agreement_table(curves),
        "",
    ]
    for name, measured in (costs or {}).items():
        lines += [
            f"## What the heads of `{name}` cost",
            "",
            f"Measured on this machine at batch size 1 after 128 cached positions; one decoder layer took "
            f"{measured.full.layer_ms:.2f} ms.",
            "",
            head_costs_table(measured),
            "",
        ]
    for name, training in trainings.items():
        lines += [f"## How `{name}` was trained", ""]
        lines += [f"- {key}: {value}" for key, value in training.items() if "agreement" not in key] + [""]
    return "\n".join(lines)


def training_curve_table(curve: TrainingCurve) -> str:
    """A Markdown table: one row per evaluation during training, the training tokens seen and each exit's held-out
    agreement."""
    layers = curve.exit_layers
    rows = [
        "| training tokens | step | " + " | ".join(f"exit {layer}" for layer in layers) + " |",
        "| ---: | ---: |" + " ---: |" * len(layers),
    ]
    for point in curve.points:
        cells = [f"{100 * point.agreement[layer]:.1f}%" if layer in point.agreement else "" for layer in layers]
        rows.append(f"| {point.tokens:,} | {point.step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_training_curve(curve: TrainingCurve, path: str | os.PathLike, title: str) -> Path:
    """Draw each exit's held-out agreement against training tokens seen and save the figure (PNG) to `path`."""
    figure, axes = _figure()
    for layer in curve.exit_layers:
        points = [point for point in curve.points if layer in point.agreement]
        axes.plot(
            [point.tokens for point in points],
            [100 * point.agreement[layer] for point in points],
            marker="o",
            label=f"exit {layer}",
        )
    axes.set_xlabel("training tokens seen")
    axes.set_ylabel("held-out top-1 agreement with the final layer (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, ncol=2)
    return _save(figure, path)


def training_curve_report(base_model: str, curve: TrainingCurve, tokens: int, command: str, plot: Path) -> str:
    """The Markdown page `early-exit train --curve` writes: held-out agreement against training tokens."""
    return "\n".join(
        [
            f"# Held-out agreement against training tokens: {base_model}",
            "",
            f"Top-1 agreement of each exit with the final layer on {tokens} held-out tokens, measured during one "
            "training run. Points before the last are taken mid-schedule (the learning rate not yet annealed), so a "
            "run that ended there would score somewhat higher. Written by:",
            "",
            "```bash",
            command,
            "```",
            "",
            f"![agreement against training tokens]({plot.name})",
            "",
            training_curve_table(curve),
            "",
        ]
    )


def calibration_table(tables: Sequence[CalibrationTable], scores: ExitScores, levels: Sequence[float]) -> str:
    """A Markdown table: per calibrated table, each exit's AUROC and each level's agreement and mean depth (and the
    expected time per token, for cost-aware tables)."""
    header = (
        "| metric | AUROC per exit ("
        + ", ".join(map(str, scores.exit_layers))
        + ") | "
        + " | ".join(f"level {level:g}: agreement / layers (/ ms per token)" for level in levels)
        + " |"
    )
    lines = [header, "| --- | --- |" + " ---: |" * len(levels)]
    for table in tables:
        separation = ", ".join(f"{value:.2f}" for value in scores.separation(table.metric))
        cells = [_level_cell(table.levels[level]) for level in levels]
        lines.append(f"| {table.key} | {separation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _level_cell(outcome: PolicyOutcome) -> str:
    cell = f"{100 * outcome.accuracy:.1f}% / {outcome.mean_layers:.1f}"
    return cell if outcome.ms_per_token is None else f"{cell} / {outcome.ms_per_token:.1f} ms"


def calibration_report(
    base_model: str,
    heads_name: str,
    scores: ExitScores,
    method: str,
    command: str,
    table: str,
    default_metric: str,
    middle_level: float,
    plots: Sequence[Path],
    chosen_by: str = "fastest",
) -> str:
    """The Markdown page of `early-exit calibrate --report`: the calibration table and its plots (accuracy against
    depth, then exit layers by level)."""
    return "\n".join(
        [
            f"# Calibration: {base_model}, heads `{heads_name}`",
            "",
            f"{scores.num_tokens} tokens of the `calibration` split (data hash {scores.data_hash}), method: {method}. "
            "Agreement is the share of tokens whose emitted token equals the full model's on the same prefix; "
            "layers is the average depth per token. AUROC says how well a metric tells an exit's right tokens "
            "from its wrong ones. Written by:",
            "",
            "```bash",
            command,
            "```",
            "",
            table,
            "",
            f"Default metric: **{default_metric}** ({chosen_by} at level {middle_level:g}).",
            "",
            f"![accuracy against depth]({plots[0].name})",
            "",
            f"![exit layers by level]({plots[1].name})",
            "",
        ]
    )


def benchmark_page(title: str, command: str, lines: Sequence[str], plot: Path, caption: str) -> str:
    """The Markdown page of a benchmark script: its title, the command that wrote it, its tables and its plot."""
    return "\n".join(
        [
            f"# {title}",
            "",
            "Written by:",
            "",
            "```bash",
            command,
            "```",
            "",
            *lines,
            "",
            f"![{caption}]({plot.name})",
            "",
        ]
    )
