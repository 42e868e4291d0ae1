"""The model card (`README.md`) `save_pretrained` writes into a heads folder: Hub metadata, then what the heads are,
how they were trained, how they are calibrated, and how to load them."""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .configuration_early_exit import EarlyExitConfig
from .generation.thresholds import CalibrationTable, table_key
from .heads import HEAD_TYPES
from .pruning import VocabPruningConfig

#: The licence of the heads' own weights (the base model keeps its own).
HEADS_LICENSE = "apache-2.0"
TAGS = ["early-exit", "self-speculative-decoding"]


def _base_model_on_hub(config: EarlyExitConfig) -> str | None:
    """The Hub id of the heads' base model; `None` when the config names a local folder (an absolute path) or none."""
    name = config.base_model_name_or_path
    return name if name and not os.path.isabs(name) else None


def heads_model_card(config: EarlyExitConfig, head_parameters: int, base_parameters: int) -> ModelCard:
    """The model card of the heads `config` describes (a saved one: exit layers resolved, base shape recorded).

    Its metadata name the library, the heads' licence, the base model (only when it is a Hub id: a local path means
    nothing to the Hub), tags and the pipeline; its text says what the heads are and what share of the base they
    add, the config's training record, every calibrated table (thresholds, agreement and mean depth per level), and
    how to load and run them.
    """
    hub_base = _base_model_on_hub(config)
    metadata = ModelCardData(
        library_name="early-exit",
        license=HEADS_LICENSE,
        base_model=hub_base,
        tags=TAGS + ([config.base_model_type] if config.base_model_type else []),
        pipeline_tag="text-generation",
    )
    text = [
        f"# Early-exit heads for {config.base_model_name_or_path or 'a causal language model'}",
        "",
        *_what_they_are(config, hub_base, head_parameters, base_parameters),
        *_usage(config, hub_base),
        *_training(config.training),
        *_calibration(config),
    ]
    return ModelCard("\n".join(["---", metadata.to_yaml(), "---", "", *text]))


def _what_they_are(
    config: EarlyExitConfig, hub_base: str | None, head_parameters: int, base_parameters: int
) -> list[str]:
    layers, depth = list(config.exit_layers), config.base_num_hidden_layers
    share = 100.0 * head_parameters / base_parameters
    lines = [
        f"{len(layers)} exit heads after layers {', '.join(map(str, layers))} of the base model's {depth}: an exit "
        "lets decoding emit a token without running the layers after it when the exit is confident enough, and "
        "self-speculative decoding uses the exits to draft tokens that the full model verifies.",
        "",
        *_head_types(config),
        f"- Parameters: {head_parameters:,} in all, {share:.2f}% of the base model's {base_parameters:,}",
    ]
    if hub_base:
        revision = f" at revision `{config.base_model_revision}`" if config.base_model_revision else ""
        lines.append(f"- Base model: [{hub_base}](https://huggingface.co/{hub_base}){revision}, loaded from the Hub")
    elif config.base_model_name_or_path:
        lines.append(
            f"- Base model: a local folder, `{config.base_model_name_or_path}`, on the machine that saved the heads; "
            "it is not on the Hub, so elsewhere pass your copy of it as `base_model=` when loading"
        )
    else:
        lines.append("- Base model: not recorded; pass it as `base_model=` when loading")
    if config.base_adapter:
        lines.append(
            f"- The base model runs with a PEFT adapter, stored in `{config.base_adapter}/` and applied on loading"
        )
    lines.append("- Only the heads are stored here, never the base model's weights.")
    return [*lines, ""]


def _head_types(config: EarlyExitConfig) -> list[str]:
    grouped = config.exits_by_head_type()
    lines = []
    for name, layers in grouped.items():
        head_class = HEAD_TYPES.get(name)
        described = inspect.getdoc(head_class).split("\n\n")[0].replace("\n", " ").rstrip(".") if head_class else None
        where = (
            f" after layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}" if len(grouped) > 1 else ""
        )
        settings = getattr(head_class, "size_settings", ())
        # A setting left at None takes the default that the head's docstring states.
        sizes = [f"`{key}={getattr(config, key)}`" for key in settings if getattr(config, key) is not None]
        sized = f", {', '.join(sizes)}" if sizes else ""
        lines.append(f"- Head type: `{name}`{where}{sized}" + (f" ({described})" if described else ""))
    return lines


def _usage(config: EarlyExitConfig, hub_base: str | None) -> list[str]:
    table = _default_table(config)
    generate = "out = model.generate(**inputs, max_new_tokens=64)  # not calibrated yet: every token runs all layers"
    if table is not None:  # show the strictest level that still exits early, if any does
        depth = config.base_num_hidden_layers
        exiting = [level for level, outcome in table.levels.items() if outcome.mean_layers < depth]
        generate = f"out = model.generate(**inputs, max_new_tokens=64, accuracy_level={max(exiting or table.levels):g})"
    local_base = bool(config.base_model_name_or_path) and not hub_base
    load_base = ['base = AutoModelForCausalLM.from_pretrained("<your copy of the base model>")'] if local_base else []
    return [
        "## Usage",
        "",
        "```python",
        "# pip install early-exit",
        "from transformers import AutoModelForCausalLM",
        "",
        *load_base,
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", trust_remote_code=True'
        + (", base_model=base)" if local_base else ")"),
        "tokenizer = model.base_tokenizer()",
        'inputs = tokenizer("The early bird", return_tensors="pt")',
        generate,
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
        "`trust_remote_code=True` runs this folder's `modeling_early_exit.py`, which only imports the installed "
        "`early_exit` package; after `import early_exit` the heads load without it.",
        "",
    ]


def _training(training: Mapping | None) -> list[str]:
    if not training:
        return []
    return ["## Training", "", *(f"- {key}: {_shown(value)}" for key, value in training.items()), ""]


def _shown(value: Any) -> str:
    """A training record's value as text; a mapping (e.g. agreement by exit layer) in its keys' numeric order."""
    if isinstance(value, Mapping):
        keys = list(value)
        if all(str(key).isdigit() for key in keys):  # layer numbers, which JSON turned into strings
            keys.sort(key=int)
        return ", ".join(f"{key}: {_shown(value[key])}" for key in keys)
    return str(value)


def _default_table(config: EarlyExitConfig) -> CalibrationTable | None:
    """The table `generate(accuracy_level=...)` reads when given no metric or pruning of its own."""
    stored = config.calibration or {}
    if not stored.get("default_metric"):
        return None
    key = table_key(stored["default_metric"], VocabPruningConfig.from_dict(config.vocab_pruning))
    table = stored.get("tables", {}).get(key)
    return CalibrationTable.from_dict(table) if table else None


def _calibration(config: EarlyExitConfig) -> list[str]:
    tables = (config.calibration or {}).get("tables", {})
    if not tables:
        return [
            "## Calibration",
            "",
            "Not calibrated: run `early-exit calibrate --heads <folder>` to choose exit thresholds for accuracy "
            "levels.",
            "",
        ]
    default = _default_table(config)
    lines = [
        "## Calibration",
        "",
        "A token leaves at the first exit whose confidence reaches that exit's threshold. Each accuracy level's "
        "thresholds were chosen so that the emitted tokens agree with the full model's at least that often; "
        "`generate(accuracy_level=...)` picks a level. Agreement and mean depth (decoder layers run per token) are "
        "as measured on the calibration tokens.",
        "",
    ]
    for key in sorted(tables):
        table = CalibrationTable.from_dict(tables[key])
        lines += [f"### `{key}`" + (" (the default)" if default is not None and key == default.key else ""), ""]
        lines += [_table_summary(table), ""]
        columns = [f"layer {layer}" for layer in table.exit_layers]
        lines += [
            "| level | " + " | ".join(columns) + " | agreement | mean depth |",
            "|---" * (len(columns) + 3) + "|",
        ]
        for level, outcome in sorted(table.levels.items()):
            thresholds = " | ".join(_threshold(value) for value in outcome.thresholds)
            lines.append(
                f"| {level:g} | {thresholds} | {outcome.accuracy:.2%} | "
                f"{outcome.mean_layers:.2f} of {config.base_num_hidden_layers} |"
            )
        lines.append("")
    lines += ["A threshold of — means that exit never emits at that level.", ""]
    return lines


def _threshold(value: float) -> str:
    """A threshold as the model card shows it: four significant digits, or — for an exit that never emits."""
    return "—" if math.isinf(value) else f"{value:.4g}"


def _table_summary(table: CalibrationTable) -> str:
    if table.method == "ltt" and isinstance(table.delta, numbers.Real):
        method = (
            f"Learn then Test: each level holds with probability at least {1 - table.delta:g} over the "
            f"calibration text (δ = {table.delta:g})"
        )
    elif table.method == "empirical":
        method = "empirical: the loosest thresholds that met each level on the calibration text"
    else:
        method = f"method `{table.method}`"
    pruning = VocabPruningConfig.from_dict(table.vocab_pruning)
    pruned = "full vocabulary"
    if pruning is not None:
        pruned = f"vocabulary pruned to top {'-'.join(map(str, pruning.schedule))}"
    costs = "; thresholds chosen with measured per-layer and per-head costs" if table.costs else ""
    on_policy = ""
    if table.on_policy:
        rounds = ", ".join(
            f"{level}: {record['rounds']} round(s), {'settled' if record['settled'] else 'not settled'}"
            for level, record in table.on_policy.items()
        )
        on_policy = (
            ". Calibrated on policy: the tokens are the heads' own greedy generations at each level (generate, "
            f"score, recalibrate until the thresholds settle; {rounds}), so agreement is as measured in free "
            "generation from the calibration prompts"
        )
    return (
        f"Confidence metric `{table.metric}`, {pruned}, {table.tokens:,} calibration tokens (data hash "
        f"`{table.data_hash}`); {method}{costs}{on_policy}."
    )
