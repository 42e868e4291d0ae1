"""Which decoder adapter serves which `model_type`, and the lookup that fails clearly for the rest."""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn
from transformers import PreTrainedModel

from ..errors import UnsupportedArchitectureError

_ADAPTERS: dict[str, type] = {}
AdapterType = TypeVar("AdapterType", bound=type)


def register_architecture(*model_types: str) -> Callable[[AdapterType], AdapterType]:
    """Class decorator: make a `DecoderAdapter` subclass serve the given `config.model_type` values.

    Users can support a new architecture the same way, from their own code.
    """

    def decorator(cls: AdapterType) -> AdapterType:
        cls.model_types = tuple(model_types)
        for model_type in model_types:
            _ADAPTERS[model_type] = cls
        return cls

    return decorator


def supported_model_types() -> list[str]:
    """The `model_type`s that have a layer-by-layer adapter."""
    return sorted(_ADAPTERS)


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The `transformers` causal LM inside a PEFT `PeftModel` (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def get_decoder_adapter(model: nn.Module):
    """The `DecoderAdapter` for `model` (a causal LM, possibly wrapped by PEFT).

    Raises:
        UnsupportedArchitectureError: the architecture has no adapter, or the model has no LM head.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedArchitectureError(
            f"Early exits are not supported for model_type {model_type!r} ({type(model).__name__}). "
            f"Supported model types: {', '.join(supported_model_types())}. "
            "Support another decoder by subclassing early_exit.architectures.DecoderAdapter and decorating it "
            "with @register_architecture('<model_type>')."
        )
    if model.get_output_embeddings() is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no LM head; load the model with AutoModelForCausalLM, not AutoModel."
        )
    return _ADAPTERS[model_type](model)
