"""Which decoder adapter serves which `model_type`, and the lookup that fails clearly for the rest."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn
from transformers import PreTrainedModel

from ..errors import UnsupportedArchitectureError
from ..registry import Registry

if TYPE_CHECKING:
    from .base import DecoderAdapter

AdapterType = TypeVar("AdapterType", bound=type)

#: `config.model_type` -> the `DecoderAdapter` subclass that runs it layer by layer.
ARCHITECTURES: Registry[type[DecoderAdapter]] = Registry(
    "model_type",
    "support another decoder by subclassing early_exit.architectures.DecoderAdapter and decorating it with "
    "@early_exit.register_architecture('<model_type>').",
    unknown_error=UnsupportedArchitectureError,
)


def register_architecture(*model_types: str) -> Callable[[AdapterType], AdapterType]:
    """Class decorator: make a `DecoderAdapter` subclass serve the given `config.model_type` values.

    Users can support a new architecture the same way, from their own code.
    """

    def decorator(cls: AdapterType) -> AdapterType:
        cls.model_types = tuple(model_types)
        return ARCHITECTURES.register(*model_types)(cls)

    return decorator


def supported_model_types() -> list[str]:
    """The `model_type`s that have a layer-by-layer adapter."""
    return ARCHITECTURES.names()


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The `transformers` causal LM inside a PEFT `PeftModel` (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def get_decoder_adapter(model: nn.Module) -> DecoderAdapter:
    """The `DecoderAdapter` for `model` (a causal LM, possibly wrapped by PEFT).

    Raises:
        UnsupportedArchitectureError: the architecture has no adapter, or the model has no LM head.
    """
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"Early exits are not supported for model_type {model_type!r} ({type(model).__name__}). "
            f"Supported model types: {', '.join(supported_model_types())}. {ARCHITECTURES.how_to_add}"
        )
    if model.get_output_embeddings() is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no LM head; load the model with AutoModelForCausalLM, not AutoModel."
        )
    return ARCHITECTURES[model_type](model)
