"""Text for training, calibrating and evaluating exits, and the loops that batch it through a model."""

from .blocks import BlockStates, hidden_states_over_blocks, require_examples
from .collator import DistillationCollator
from .prompts import format_prompt, load_prompts

__all__ = [
    "BlockStates",
    "DistillationCollator",
    "format_prompt",
    "hidden_states_over_blocks",
    "load_prompts",
    "require_examples",
]
