"""Text the project keeps: a small set of prompts (instructions and text openings) written for this project."""

from __future__ import annotations

import json
from importlib import resources

from transformers import PreTrainedTokenizerBase


def load_prompts(split: str | None = None) -> list[dict[str, str]]:
    """The project's prompts, each `{"kind": "instruction" | "text", "text": ..., "split": ...}`.

    Args:
        split: keep only the prompts of this split ("train", "calibration" or "eval"); all when omitted.
    """
    prompts = json.loads(resources.files(__package__).joinpath("prompts.json").read_text(encoding="utf-8"))
    return [prompt for prompt in prompts if split is None or prompt["split"] == split]


def format_prompt(prompt: dict[str, str], tokenizer: PreTrainedTokenizerBase) -> str:
    """The text to feed the model: instructions go through the chat template when the tokenizer has one."""
    if prompt["kind"] == "instruction" and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt["text"]}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt["text"]
