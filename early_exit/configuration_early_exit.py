"""`EarlyExitConfig`: which base model the heads belong to, where they sit, and what they are.

Every field is checked when a config is made, so a hand-edited or damaged `config.json` fails on loading with an
error naming the field, instead of being read as something else.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
from collections.abc import Mapping
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedConfig

from .checkpoint import recover_interrupted_save
from .errors import CheckpointError, InvalidOptionError
from .pruning import VocabPruningConfig

#: Exits used when none are given: a quarter, half and three quarters of the depth.
DEFAULT_EXIT_LAYERS: tuple[float, ...] = (0.25, 0.5, 0.75)


class EarlyExitConfig(PreTrainedConfig):
    r"""Configuration of a set of exit heads attached to a pretrained causal LM.

    Like a PEFT adapter config, it names its base model rather than containing it: loading a heads folder with
    `AutoModelForCausalLM.from_pretrained` loads `base_model_name_or_path` (at `base_model_revision`) and attaches
    the heads.

    Args:
        base_model_name_or_path: Hub id, or an absolute local path, of the base causal LM.
        base_model_revision: revision of the base model on the Hub.
        exit_layers: where the exits sit, as the number of decoder layers run before the exit (1 to depth - 1), or
            as fractions of depth in (0, 1) which are resolved to layer numbers when the heads are attached.
        head_type: a name in `early_exit.heads.HEAD_TYPES` for every exit: "residual_adapter" (default; a small
            residual MLP that starts as the identity, followed by the base's own final norm and LM head), "attention"
            (a decoder block of its own, attending over the context), "linear" (an independent norm and Linear(d, V)
            per exit, as in Valade 2024) or "logit_lens" (no parameters); or a list of names, one per entry of
            `exit_layers` in the same order, to give exits heads of different types (e.g. attention only at the
            deep exits, where it pays).
        adapter_size: bottleneck width of the residual adapter; `None` means the base's hidden size.
        attention_blocks: decoder blocks in each attention head, started as copies of the base's last
            `attention_blocks` layers; `None` means one. More blocks agree more (on SmolLM2-135M at half depth, same
            recipe: 41% with one, 46% with three) and cost a base layer each per call.
        base_model_type, base_hidden_size, base_num_hidden_layers, base_vocab_size: the base model's shape, recorded
            when the heads are attached and checked when they are loaded again.
        base_adapter: subfolder of the heads folder holding a PEFT adapter (e.g. LoRA) of the base model, trained
            jointly with the heads (LITE-style) and applied to the base when the heads are loaded; `None` when the
            base is used as it is.
        training: how the heads were trained (data, steps, held-out agreement), as `early-exit train` records it;
            shown in the model card.
        calibration: exit thresholds by accuracy level, written by calibration (`None` until calibrated).
        vocab_pruning: dynamic vocabulary pruning settings used by early-exit decoding (`None`: no pruning).
        save_id: the save that wrote this config (its weights record the same id, so a loader never pairs the config
            of one save with the weights of another); `None` until saved.

    Raises:
        InvalidOptionError: a field of the wrong type or out of range (`CheckpointError` when read from a file).
    """

    model_type = "early_exit"

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    exit_layers: list[int | float] | None = None
    head_type: str | list[str] = "residual_adapter"
    adapter_size: int | None = None
    attention_blocks: int | None = None
    base_model_type: str | None = None
    base_hidden_size: int | None = None
    base_num_hidden_layers: int | None = None
    base_vocab_size: int | None = None
    base_adapter: str | None = None
    training: dict | None = None
    calibration: dict | None = None
    vocab_pruning: dict | None = None
    save_id: str | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Check every field (transformers also calls this before saving a config).

        Raises:
            InvalidOptionError: the first field of the wrong type or out of range, by name.
        """
        super().validate()
        for name in ("base_model_revision", "base_model_type", "save_id"):
            _optional_text(name, getattr(self, name))
        _check_base_model(self.base_model_name_or_path)
        _check_exit_layers(self.exit_layers)
        _check_head_type(self.head_type, self.exit_layers)
        for name in (
            "adapter_size",
            "attention_blocks",
            "base_hidden_size",
            "base_num_hidden_layers",
            "base_vocab_size",
        ):
            _optional_positive_integer(name, getattr(self, name))
        _check_base_adapter(self.base_adapter)
        if self.training is not None and not isinstance(self.training, Mapping):
            raise InvalidOptionError(f"training must be a dict (how the heads were trained), got {self.training!r}.")
        try:
            VocabPruningConfig.from_dict(self.vocab_pruning)
        except InvalidOptionError as error:
            raise InvalidOptionError(f"vocab_pruning: {error}") from error
        _check_calibration(self.calibration)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> tuple[dict, dict]:
        """Read a heads folder's `config.json` (see `PreTrainedConfig.get_config_dict`), first putting back a folder
        a killed save left aside.

        Raises:
            CheckpointError: there is no `config.json` (transformers would read that as a default config).
        """
        recover_interrupted_save(pretrained_model_name_or_path)
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config_dict:
            raise CheckpointError(
                f"{pretrained_model_name_or_path} has no config.json, so it is not a heads folder (or not all of one): "
                "pass the folder save_pretrained wrote, or save the heads there again."
            )
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> EarlyExitConfig:
        """A config from the contents of a `config.json` (as `AutoConfig` reads it).

        Raises:
            CheckpointError: a field of the wrong type or out of range, by name.
        """
        try:
            return super().from_dict(config_dict, **kwargs)
        except InvalidOptionError as error:
            raise CheckpointError(
                f"The heads' config.json is not valid: {error} Correct that field, or save the heads again."
            ) from error

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as `PreTrainedConfig.to_json_string` writes it, but with each list of integers (exit layers, a
        pruning vocabulary of thousands of token ids) on one line rather than one line per number."""
        compact: dict[str, str] = {}

        def mark(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {key: mark(item) for key, item in value.items()}
            if isinstance(value, list) and value and all(_is_integer(item) for item in value):
                placeholder = f"<integers {uuid.uuid4().hex}>"
                compact[placeholder] = json.dumps(value)
                return placeholder
            return [mark(item) for item in value] if isinstance(value, list) else value

        text = json.dumps(mark(json.loads(super().to_json_string(use_diff))), indent=2, sort_keys=True) + "\n"
        for placeholder, numbers_text in compact.items():
            text = text.replace(json.dumps(placeholder), numbers_text)
        return text

    def resolve_exit_layers(self, num_layers: int) -> list[int]:
        """Exit layers as sorted, distinct layer numbers in [1, num_layers - 1], fractions resolved against depth.

        Raises:
            InvalidOptionError: an entry is neither a layer number nor a fraction in (0, 1), an exit is not inside the
                layer stack, or two entries name the same layer.
        """
        return sorted(self.resolve_head_types(num_layers))

    def resolve_head_types(self, num_layers: int) -> dict[int, str]:
        """Each exit's layer number (fractions resolved against depth) and the type of its head, by layer.

        Raises:
            InvalidOptionError: as `resolve_exit_layers`, or `head_type` is a list of another length than `exit_layers`.
        """
        _check_exit_layers(self.exit_layers)  # again: the fields may have been set after the config was made
        requested = list(DEFAULT_EXIT_LAYERS if self.exit_layers is None else self.exit_layers)
        _check_head_type(self.head_type, requested)
        names = [self.head_type] * len(requested) if isinstance(self.head_type, str) else list(self.head_type)
        resolved: dict[int, str] = {}
        for entry, name in zip(requested, names, strict=True):
            if not isinstance(entry, numbers.Integral):  # a fraction of depth
                layer = max(1, min(num_layers - 1, round(entry * num_layers)))
            else:
                layer = int(entry)
            if not 1 <= layer <= num_layers - 1:
                raise InvalidOptionError(
                    f"Exit layer {entry} is outside the model: a model with {num_layers} layers takes exits after "
                    f"layers 1 to {num_layers - 1} (the final layer is the model's own output), or fractions in (0, 1)."
                )
            if layer in resolved:
                raise InvalidOptionError(
                    f"Exit layers {requested} name the same layer twice ({entry} is layer {layer} again)."
                )
            resolved[layer] = name
        return resolved

    def head_type_at(self, layer: int) -> str:
        """The type of the head of the exit after `layer`, one of the resolved `exit_layers`."""
        if isinstance(self.head_type, str):
            return self.head_type
        return self.head_type[list(self.exit_layers).index(layer)]

    def exits_by_head_type(self) -> dict[str, list[int]]:
        """The resolved exit layers grouped by the type of their heads, in the order the types first appear."""
        grouped: dict[str, list[int]] = {}
        for layer in self.exit_layers:
            grouped.setdefault(self.head_type_at(layer), []).append(layer)
        return grouped


def _optional_text(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidOptionError(f"{name} must be a non-empty string or None, got {value!r}.")


def _optional_positive_integer(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidOptionError(f"{name} must be a positive integer or None, got {value!r}.")


def _check_head_type(head_type: Any, exit_layers: Any) -> None:
    if isinstance(head_type, str) and head_type:
        return
    if not isinstance(head_type, list | tuple) or not all(isinstance(name, str) and name for name in head_type):
        raise InvalidOptionError(
            f"head_type must be a head type's name, or a list of names (one per exit layer), got {head_type!r}."
        )
    count = len(DEFAULT_EXIT_LAYERS if exit_layers is None else exit_layers)
    if len(head_type) != count:
        raise InvalidOptionError(
            f"head_type lists {len(head_type)} head types for {count} exit layers: give one per exit layer, in the "
            "order of exit_layers, or one name for all."
        )


def _check_base_model(name_or_path: Any) -> None:
    _optional_text("base_model_name_or_path", name_or_path)
    if name_or_path is None or os.path.isabs(name_or_path):
        return
    try:
        validate_repo_id(name_or_path)
    except HFValidationError as error:
        raise InvalidOptionError(
            f"base_model_name_or_path={name_or_path!r} is neither a Hub id nor an absolute path (a relative path "
            "would mean another folder, or a Hub repo, when loaded from elsewhere); record the base's Hub id or "
            "absolute path."
        ) from error


def _check_exit_layers(exit_layers: Any) -> None:
    if exit_layers is None:
        return
    if isinstance(exit_layers, str | bytes | Mapping) or not isinstance(exit_layers, list | tuple):
        raise InvalidOptionError(f"exit_layers must be a list of layer numbers or fractions, got {exit_layers!r}.")
    if not exit_layers:
        raise InvalidOptionError("exit_layers is empty: give at least one layer, or None for the default exits.")
    for index, entry in enumerate(exit_layers):
        where = f"exit_layers[{index}]={entry!r}"
        if isinstance(entry, bool) or not isinstance(entry, numbers.Real):
            raise InvalidOptionError(f"{where} must be a layer number (an integer) or a fraction of depth in (0, 1).")
        if isinstance(entry, numbers.Integral):
            if entry < 1:
                raise InvalidOptionError(
                    f"{where} is outside the model: layer numbers start at 1 (the exit after the first layer)."
                )
        elif not 0.0 < entry < 1.0:
            raise InvalidOptionError(
                f"{where}: a float is a fraction of depth and must lie in (0, 1); write a layer number as an "
                f"integer{f' ({int(entry)})' if float(entry).is_integer() else ''}."
            )


def _check_base_adapter(base_adapter: Any) -> None:
    _optional_text("base_adapter", base_adapter)
    if base_adapter is None:
        return
    posix, windows = PurePosixPath(base_adapter), PureWindowsPath(base_adapter)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise InvalidOptionError(
            f"base_adapter={base_adapter!r} must name a subfolder of the heads folder (like {'base_adapter'!r}), "
            "not a path outside it."
        )


def _check_calibration(calibration: Any) -> None:
    """The calibration table as `early_exit.generation.thresholds` writes it: per table, per level, one threshold per
    exit of the table."""
    if calibration is None:
        return
    again = "calibrate again (`early-exit calibrate --heads <folder>`)"
    if not isinstance(calibration, Mapping) or not isinstance(calibration.get("tables", {}), Mapping):
        raise InvalidOptionError(f"calibration must be a dict with a 'tables' dict, as calibration writes it; {again}.")
    tables = calibration.get("tables", {})
    metrics = set()
    for key, table in tables.items():
        where = f"calibration.tables[{key!r}]"
        if not isinstance(table, Mapping) or not isinstance(table.get("levels"), Mapping) or not table["levels"]:
            raise InvalidOptionError(f"{where} has no 'levels' (accuracy level -> thresholds); {again}.")
        if not isinstance(table.get("metric"), str) or not table["metric"]:
            raise InvalidOptionError(f"{where} has no 'metric' (the confidence metric's name); {again}.")
        metrics.add(table["metric"])
        exits = table.get("exit_layers")
        if not isinstance(exits, list) or not all(_is_integer(layer) for layer in exits):
            raise InvalidOptionError(f"{where}.exit_layers must be the list of exit layers; {again}.")
        for level, outcome in table["levels"].items():
            _check_level(f"{where}.levels[{level!r}]", level, outcome, exits, again)
        budgets = table.get("budgets") or {}
        if not isinstance(budgets, Mapping):
            raise InvalidOptionError(f"{where}.budgets must map average depths to thresholds; {again}.")
        for budget, outcome in budgets.items():
            _check_budget(f"{where}.budgets[{budget!r}]", budget, outcome, exits, again)
    default = calibration.get("default_metric")
    if tables and (not isinstance(default, str) or default not in metrics):
        raise InvalidOptionError(
            f"calibration.default_metric={default!r} names none of the calibrated metrics {sorted(metrics)}; {again}."
        )


def _check_level(where: str, level: Any, outcome: Any, exits: list[int], again: str) -> None:
    if not 0.0 < _number(level) < 1.0:
        raise InvalidOptionError(f"{where}: the level must be a number in (0, 1); {again}.")
    _check_outcome(where, outcome, exits, again)


def _check_budget(where: str, budget: Any, outcome: Any, exits: list[int], again: str) -> None:
    if not _number(budget) > 0.0:
        raise InvalidOptionError(f"{where}: the budget must be a positive number of layers; {again}.")
    _check_outcome(where, outcome, exits, again)


def _number(key: Any) -> float:
    """A table key (a level or a depth, written as text in JSON) as a number; NaN when it is none."""
    try:
        return float(key)
    except (TypeError, ValueError):
        return math.nan


def _check_outcome(where: str, outcome: Any, exits: list[int], again: str) -> None:
    thresholds = outcome.get("thresholds") if isinstance(outcome, Mapping) else None
    if not isinstance(thresholds, list):
        raise InvalidOptionError(f"{where} has no 'thresholds' list; {again}.")
    if len(thresholds) != len(exits):
        raise InvalidOptionError(
            f"{where}.thresholds has {len(thresholds)} values for the {len(exits)} exits {exits}; {again}."
        )
    for index, value in enumerate(thresholds):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)):
            raise InvalidOptionError(f"{where}.thresholds[{index}]={value!r} must be a number or null; {again}.")
    for name in ("accuracy", "mean_layers"):
        if not isinstance(outcome.get(name), numbers.Real) or isinstance(outcome.get(name), bool):
            raise InvalidOptionError(f"{where}.{name} must be a number; {again}.")


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
