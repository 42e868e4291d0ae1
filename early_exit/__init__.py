"""early-exit: faster decoding for Hugging Face causal LMs by leaving the layer stack early.

Importing the package registers `EarlyExitConfig` with `AutoConfig` and `EarlyExitForCausalLM` with
`AutoModelForCausalLM`, so a heads folder loads with `AutoModelForCausalLM.from_pretrained`.

The package has two wings, and one rule between them:

- the decoding runtime: `configuration_early_exit`, `modeling_early_exit`, `architectures`, `heads`, `confidence`,
  `pruning`, `kernels`, `generation` (with the thresholds table it reads), `checkpoint`, `hub`, `default_model`,
  `registry` and `errors`;
- the training-and-tools wing: `data`, `training`, `calibration` (collecting scores and choosing thresholds),
  `reporting`, and the command line (`early_exit_cli`, a package of its own).

The runtime never imports the tools wing: loading heads and generating with them must not pay for `Trainer`,
accelerate or datasets. Type-only imports go under `TYPE_CHECKING`; imports inside functions are only for optional
dependencies. `tests/test_layout.py` enforces the rule.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .architectures import DecoderAdapter, get_decoder_adapter, register_architecture, supported_model_types
from .confidence import register_confidence_metric
from .configuration_early_exit import DEFAULT_EXIT_LAYERS, EarlyExitConfig
from .default_model import DEFAULT_MODEL_ID, load_default_model
from .errors import (
    CalibrationError,
    CheckpointError,
    DuplicateNameError,
    EarlyExitError,
    HeadMismatchError,
    HubUnreachableError,
    InvalidOptionError,
    UnknownNameError,
    UnsupportedArchitectureError,
    VocabPruningError,
)
from .generation import ExitDecodingConfig
from .heads import HEAD_TYPES, ContextHead, ExitHead, register_head_type
from .modeling_early_exit import EarlyExitCausalLMOutput, EarlyExitForCausalLM, add_exit_heads

AutoConfig.register(EarlyExitConfig.model_type, EarlyExitConfig, exist_ok=True)
AutoModelForCausalLM.register(EarlyExitConfig, EarlyExitForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXIT_LAYERS",
    "DEFAULT_MODEL_ID",
    "HEAD_TYPES",
    "CalibrationError",
    "CheckpointError",
    "ContextHead",
    "DecoderAdapter",
    "DuplicateNameError",
    "EarlyExitCausalLMOutput",
    "EarlyExitConfig",
    "EarlyExitError",
    "EarlyExitForCausalLM",
    "ExitDecodingConfig",
    "ExitHead",
    "HeadMismatchError",
    "HubUnreachableError",
    "InvalidOptionError",
    "UnknownNameError",
    "UnsupportedArchitectureError",
    "VocabPruningError",
    "add_exit_heads",
    "get_decoder_adapter",
    "load_default_model",
    "register_architecture",
    "register_confidence_metric",
    "register_head_type",
    "supported_model_types",
]
