"""Projections onto (some rows of) an LM head, in the matmul form that is fastest for the number of positions."""

from __future__ import annotations

import torch


def project_rows(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor | None
) -> torch.Tensor:
    """`hidden @ weight.T + bias` restricted to the output rows `token_ids` (shape `hidden.shape[:-1] + (k,)`), or
    over all rows when `token_ids` is `None`."""
    if token_ids is None:
        positions = hidden.shape[:-1].numel()
        if hidden.device.type == "cpu" and 1 < positions <= 16:
            # A few positions at once (speculative verification): on CPUs, `linear` picks a kernel about 3x slower
            # here than the weight-major product, which reads the weight once as for a single position.
            logits = (weight @ hidden.reshape(positions, -1).T).T.reshape(*hidden.shape[:-1], -1)
            return logits if bias is None else logits + bias
        return torch.nn.functional.linear(hidden, weight, bias)
    if hidden.shape[:-1].numel() * token_ids.shape[-1] < weight.shape[0]:
        # Decoding: few positions, so gather the k rows of the weight and multiply by those only.
        logits = torch.einsum("...d,...kd->...k", hidden, weight[token_ids])
        return logits if bias is None else logits + bias[token_ids]
    # Many positions (calibration): one full matmul and a gather move less memory than a weight copy per position.
    return torch.nn.functional.linear(hidden, weight, bias).gather(-1, token_ids)
