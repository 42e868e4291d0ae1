"""early-exit: faster decoding for Hugging Face causal LMs by leaving the layer stack early.

Importing the package registers `EarlyExitConfig` with `AutoConfig` and `EarlyExitForCausalLM` with
`AutoModelForCausalLM`, so a heads folder loads with `AutoModelForCausalLM.from_pretrained`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .architectures import DecoderAdapter, get_decoder_adapter, register_architecture, supported_model_types
from .configuration_early_exit import EarlyExitConfig
from .default_model import DEFAULT_MODEL_ID, load_default_model
from .errors import CheckpointError, EarlyExitError, HeadMismatchError, UnsupportedArchitectureError
from .heads import HEAD_TYPES, ExitHead, register_head_type
from .hub import HubUnreachableError
from .modeling_early_exit import EarlyExitCausalLMOutput, EarlyExitForCausalLM, add_exit_heads

AutoConfig.register(EarlyExitConfig.model_type, EarlyExitConfig, exist_ok=True)
AutoModelForCausalLM.register(EarlyExitConfig, EarlyExitForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL_ID",
    "HEAD_TYPES",
    "CheckpointError",
    "DecoderAdapter",
    "EarlyExitCausalLMOutput",
    "EarlyExitConfig",
    "EarlyExitError",
    "EarlyExitForCausalLM",
    "ExitHead",
    "HeadMismatchError",
    "HubUnreachableError",
    "UnsupportedArchitectureError",
    "add_exit_heads",
    "get_decoder_adapter",
    "load_default_model",
    "register_architecture",
    "register_head_type",
    "supported_model_types",
]
