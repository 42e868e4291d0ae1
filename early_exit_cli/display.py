"""How `early-exit generate` shows tokens: coloured by the exit they left at, or marked with it."""

from __future__ import annotations

import os
import sys

from transformers import PreTrainedTokenizerBase

#: ANSI 256-colour codes for exits, earliest first (red to blue); full-depth tokens keep the terminal's colour.
EXIT_COLORS = (196, 208, 220, 112, 37, 33, 129, 201)


def use_color(no_color: bool = False) -> bool:
    """Whether to colour tokens: only on a terminal (never into a pipe or a file), and not when `--no-color` or the
    `NO_COLOR` environment variable (https://no-color.org) says no."""
    return not no_color and not os.environ.get("NO_COLOR") and sys.stdout.isatty()


def paint(text: str, color: int | None) -> str:
    """`text` in ANSI 256-colour `color`, or as it is for `None`."""
    return text if color is None else f"\033[38;5;{color}m{text}\033[0m"


def token_texts(tokenizer: PreTrainedTokenizerBase, context_id: int, token_ids: list[int]) -> list[str]:
    """Each token's text, decoded one at a time. Taken as the growth of the decoded text after `context_id` (the
    prompt's last token), because SentencePiece tokenizers drop a word's leading space when decoding it alone; a
    token that ends inside a multi-byte character gets "" and the next one the whole character."""
    texts, previous, ids = [], tokenizer.decode([context_id]), [context_id]
    for token_id in token_ids:
        ids.append(token_id)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            texts.append("")
            continue
        texts.append(text[len(previous) :] if text.startswith(previous) else tokenizer.decode([token_id]))
        previous = text
    return texts
