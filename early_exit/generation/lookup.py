"""Drafts that cost nothing: the tokens that followed the newest n-gram the last time it appeared (prompt lookup).

Text repeats itself (names, code identifiers, quoted passages, and a small model's own loops), so the tokens that
came after the last occurrence of the current n-gram are often the ones that come next. Self-speculative decoding
verifies them in the same full-depth pass that verifies the exits' drafts, where a few more positions cost far less
than another pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidOptionError

#: Copied drafts per cycle of self-speculative decoding unless `prompt_lookup_num_tokens` says otherwise: the fastest
#: of 2 and 3 on the default model (docs/speculative-smollm2-135m.md); longer copies are rarely right to the end.
DEFAULT_LOOKUP_TOKENS = 3


@dataclass(frozen=True)
class PromptLookup:
    """Where prompt-lookup drafts come from (`generate`'s `prompt_lookup_num_tokens` and `max_matching_ngram_size`).

    Attributes:
        num_tokens: the most tokens copied per cycle.
        max_ngram_size: the longest n-gram matched against the context; shorter ones are tried when it has no match,
            down to `min_ngram_size`.
        min_ngram_size: the shortest n-gram that counts as a match (one token matches too often to be worth a
            verification position).
    """

    num_tokens: int
    max_ngram_size: int = 3
    min_ngram_size: int = 2

    def __post_init__(self) -> None:
        for name in ("num_tokens", "max_ngram_size", "min_ngram_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"Prompt lookup's {name} must be a positive integer, got {value!r}.")
        if self.min_ngram_size > self.max_ngram_size:
            raise InvalidOptionError(
                f"Prompt lookup's min_ngram_size ({self.min_ngram_size}) is larger than its max_ngram_size "
                f"({self.max_ngram_size})."
            )

    def propose(self, sequence: torch.Tensor, limit: int | None = None) -> list[int]:
        """The tokens that followed the latest earlier occurrence of `sequence`'s last n tokens (the longest n that
        occurs, from `max_ngram_size` down to `min_ngram_size`), `num_tokens` of them (or `limit` if fewer); empty
        when no n-gram recurs."""
        wanted = self.num_tokens if limit is None else min(self.num_tokens, limit)
        tokens = sequence.tolist()
        length = len(tokens)
        if wanted < 1:
            return []
        for size in range(min(self.max_ngram_size, length - 1), self.min_ngram_size - 1, -1):
            ngram = tokens[length - size :]
            # The latest occurrence that ends before the sequence does, so something follows it.
            for start in range(length - size - 1, -1, -1):
                if tokens[start : start + size] == ngram:
                    # A match that runs into the newest tokens (a loop) goes on copying what it has just proposed.
                    for index in range(start + size, start + size + wanted):
                        tokens.append(tokens[index])
                    return tokens[length:]
        return []
