"""`EarlyExitConfig`: which base model the heads belong to, where they sit, and what they are."""

from __future__ import annotations

from transformers import PreTrainedConfig

#: Exits used when none are given: a quarter, half and three quarters of the depth.
DEFAULT_EXIT_LAYERS: tuple[float, ...] = (0.25, 0.5, 0.75)


class EarlyExitConfig(PreTrainedConfig):
    r"""Configuration of a set of exit heads attached to a pretrained causal LM.

    Like a PEFT adapter config, it names its base model rather than containing it: loading a heads folder with
    `AutoModelForCausalLM.from_pretrained` loads `base_model_name_or_path` (at `base_model_revision`) and attaches
    the heads.

    Args:
        base_model_name_or_path: Hub id, or a lasting local path, of the base causal LM.
        base_model_revision: revision of the base model on the Hub.
        exit_layers: where the exits sit, as the number of decoder layers run before the exit (1 to depth - 1), or
            as fractions of depth in (0, 1) which are resolved to layer numbers when the heads are attached.
        head_type: a name in `early_exit.heads.HEAD_TYPES`: "residual_adapter" (default; a small residual MLP
            that starts as the identity, followed by the base's own final norm and LM head), "linear" (an
            independent norm and Linear(d, V) per exit, as in Valade 2024) or "logit_lens" (no parameters).
        adapter_size: bottleneck width of the residual adapter; `None` means the base's hidden size.
        base_model_type, base_hidden_size, base_num_hidden_layers, base_vocab_size: the base model's shape, recorded
            when the heads are attached and checked when they are loaded again.
        base_adapter: subfolder of the heads folder holding a PEFT adapter (e.g. LoRA) of the base model, trained
            jointly with the heads (LITE-style) and applied to the base when the heads are loaded; `None` when the
            base is used as it is.
        training: how the heads were trained (data, steps, held-out agreement), as `early-exit train` records it;
            shown in the model card.
        calibration: exit thresholds by accuracy level, written by calibration (`None` until calibrated).
        vocab_pruning: dynamic vocabulary pruning settings used by early-exit decoding (`None`: no pruning).
    """

    model_type = "early_exit"

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    exit_layers: list[int | float] | None = None
    head_type: str = "residual_adapter"
    adapter_size: int | None = None
    base_model_type: str | None = None
    base_hidden_size: int | None = None
    base_num_hidden_layers: int | None = None
    base_vocab_size: int | None = None
    base_adapter: str | None = None
    training: dict | None = None
    calibration: dict | None = None
    vocab_pruning: dict | None = None

    def resolve_exit_layers(self, num_layers: int) -> list[int]:
        """Exit layers as sorted, distinct layer numbers in [1, num_layers - 1], fractions resolved against depth.

        Raises:
            ValueError: an exit is not inside the layer stack, or two entries name the same layer.
        """
        requested = list(self.exit_layers) if self.exit_layers else list(DEFAULT_EXIT_LAYERS)
        resolved = []
        for entry in requested:
            if isinstance(entry, float) and not entry.is_integer():
                if not 0.0 < entry < 1.0:
                    raise ValueError(f"Exit layer fraction {entry} must lie in (0, 1).")
                layer = max(1, min(num_layers - 1, round(entry * num_layers)))
            else:
                layer = int(entry)
            if not 1 <= layer <= num_layers - 1:
                raise ValueError(
                    f"Exit layer {entry} is outside the model: a model with {num_layers} layers takes exits after "
                    f"layers 1 to {num_layers - 1} (the final layer is the model's own output), or fractions in (0, 1)."
                )
            resolved.append(layer)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"Exit layers {requested} name the same layer twice (resolved to {resolved}).")
        return sorted(resolved)
