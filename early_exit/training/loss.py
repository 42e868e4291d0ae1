"""The self-supervised objective: each exit learns the final layer's next-token distribution (no labels)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Per-exit weighting schemes accepted by `exit_weights`.
WEIGHTING_SCHEMES = ("uniform", "linear")


def exit_weights(exit_layers: Sequence[int], scheme: str | Sequence[float] = "uniform") -> list[float]:
    """Per-exit loss weights summing to 1: "uniform", "linear" (proportional to depth) or given values.

    Raises:
        ValueError: an unknown scheme, or given weights that do not match the exits or are not positive.
    """
    if isinstance(scheme, str):
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"Unknown exit weighting {scheme!r}; use one of {WEIGHTING_SCHEMES} or a list of weights.")
        raw = [1.0] * len(exit_layers) if scheme == "uniform" else [float(layer) for layer in exit_layers]
    else:
        raw = [float(weight) for weight in scheme]
        if len(raw) != len(exit_layers) or any(weight < 0 for weight in raw) or sum(raw) <= 0:
            raise ValueError(
                f"Exit weights {list(scheme)} must be {len(exit_layers)} non-negative numbers (one per exit "
                f"{list(exit_layers)}) with a positive sum."
            )
    total = sum(raw)
    return [weight / total for weight in raw]


def exit_distillation_loss(
    exit_logits: Sequence[torch.Tensor],
    final_logits: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted KL(final ‖ exit) per token, summed over exits, averaged over the tokens that count.

    Args:
        exit_logits: one (batch, seq, vocab) tensor per exit.
        final_logits: the final layer's (batch, seq, vocab) logits: the teacher (no gradient flows into it).
        token_mask: (batch, seq), true where a token counts (e.g. the attention mask); all count when omitted.
        weights: per-exit weights (see `exit_weights`); uniform when omitted.
        temperature: both distributions are softened by it, and the loss is scaled by its square so that gradient
            sizes do not depend on it.
        top_k: if set, the teacher keeps only its k most likely tokens (renormalised) and the exit is scored on
            those: less memory when teacher distributions are stored.
        num_items_in_batch: the number of counted tokens in the whole (gradient-accumulated) batch, as
            `transformers.Trainer` passes it. The loss is then a sum divided by it, so summing the micro-batches'
            losses gives exactly the loss of the whole batch. Without it, the loss averages over this batch's tokens.

    Returns:
        A scalar tensor.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    weights = exit_weights(range(len(exit_logits))) if weights is None else list(weights)
    if len(weights) != len(exit_logits):
        raise ValueError(f"Got {len(weights)} weights for {len(exit_logits)} exits.")
    if token_mask is None:
        token_mask = torch.ones(final_logits.shape[:-1], dtype=torch.bool, device=final_logits.device)
    token_mask = token_mask.bool()
    vocab_size = final_logits.shape[-1]
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}.")

    teacher = TeacherDistribution.of(final_logits, temperature, top_k)
    counted = token_mask.to(torch.float32)
    total = final_logits.new_zeros((), dtype=torch.float32)
    for weight, logits in zip(weights, exit_logits):
        total = total + weight * (teacher.kl_per_token(logits) * counted).sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else token_mask.sum().clamp(min=1)
    return total * temperature**2 / denominator


@dataclass
class TeacherDistribution:
    """The final layer's next-token distribution, made once and compared with any number of exits' (the parts of
    KL(final ‖ exit) that depend on the final layer alone).

    Fused log-softmaxes read low-precision logits and write float32, and nothing is divided when the temperature
    is 1: each is a full pass over (tokens x vocabulary) saved per exit.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    temperature: float = 1.0
    indices: torch.Tensor | None = None  # the teacher's top-k tokens, when it keeps only those

    @classmethod
    def of(cls, final_logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> TeacherDistribution:
        """The distribution of `final_logits` (no gradient flows into it), softened by `temperature` and, with
        `top_k`, kept to its k most likely tokens (renormalised)."""
        teacher = final_logits.detach()
        if temperature != 1.0:
            teacher = teacher / temperature
        indices = None
        if top_k is not None:
            teacher, indices = teacher.topk(top_k, dim=-1)
        log_probs = teacher.log_softmax(-1, dtype=torch.float32)
        probs = log_probs.exp()
        return cls(probs, (probs * log_probs).sum(-1), temperature, indices)

    def kl_per_token(self, exit_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher ‖ exit) at each position, (batch, seq), for an exit's (batch, seq, vocab) logits (not yet
        scaled by the temperature's square)."""
        student = exit_logits if self.temperature == 1.0 else exit_logits / self.temperature
        student_log_probs = student.log_softmax(-1, dtype=torch.float32)
        if self.indices is not None:
            student_log_probs = student_log_probs.gather(-1, self.indices)
        return self.neg_entropy - (self.probs * student_log_probs).sum(-1)
