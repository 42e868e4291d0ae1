"""Projections onto some rows of an LM head (vocabulary pruning), in the form that moves the least memory."""

from __future__ import annotations

import torch


def project_rows(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor
) -> torch.Tensor:
    """`hidden @ weight.T + bias` restricted to the output rows `token_ids` (shape `hidden.shape[:-1] + (k,)`):
    vocabulary pruning's logits. (The full vocabulary goes through the LM head module itself, which
    `FewPositionLinears` speeds up during decoding.)"""
    if hidden.shape[:-1].numel() * token_ids.shape[-1] < weight.shape[0]:
        # Decoding: few positions, so gather the k rows of the weight and multiply by those only.
        logits = torch.einsum("...d,...kd->...k", hidden, weight[token_ids])
        return logits if bias is None else logits + bias[token_ids]
    # Many positions (calibration): one full matmul and a gather move less memory than a weight copy per position.
    return torch.nn.functional.linear(hidden, weight, bias).gather(-1, token_ids)
