"""Projections onto some rows of an LM head (vocabulary pruning), in the form that moves the least memory."""

from __future__ import annotations

import weakref

import torch

#: The rows of a weight for a shared set of token ids, copied once while those ids live:
#: {id(token_ids): {(id(weight), weight.data_ptr()): (weight version, rows)}}.
_SHARED_ROWS: dict[int, dict[tuple[int, int], tuple[int, torch.Tensor]]] = {}


def project_rows(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor
) -> torch.Tensor:
    """`hidden @ weight.T + bias` restricted to the output rows `token_ids`: vocabulary pruning's logits.

    `token_ids` is either one set per position (shape `hidden.shape[:-1] + (k,)`) or a 1-D tensor of ids shared by
    every position (a fixed pruning vocabulary), whose rows are copied into one contiguous matrix on first use and
    reused while that `token_ids` tensor lives: a few thousand rows then stay in the CPU's cache. (The full vocabulary
    goes through the LM head module itself, which `FewPositionLinears` speeds up during decoding.)"""
    if token_ids.dim() == 1:
        trained = torch.is_grad_enabled() and weight.requires_grad  # a copy would cut the gradient off
        rows = weight[token_ids] if trained else _shared_rows(weight, token_ids)
        logits = torch.nn.functional.linear(hidden, rows)
        return logits if bias is None else logits + bias[token_ids]
    if hidden.shape[:-1].numel() * token_ids.shape[-1] < weight.shape[0]:
        # Decoding: few positions, so gather the k rows of the weight and multiply by those only.
        logits = torch.einsum("...d,...kd->...k", hidden, weight[token_ids])
        return logits if bias is None else logits + bias[token_ids]
    # Many positions (calibration): one full matmul and a gather move less memory than a weight copy per position.
    return torch.nn.functional.linear(hidden, weight, bias).gather(-1, token_ids)


def _shared_rows(weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    by_weight = _SHARED_ROWS.get(id(token_ids))
    if by_weight is None:
        by_weight = _SHARED_ROWS[id(token_ids)] = {}
        weakref.finalize(token_ids, _SHARED_ROWS.pop, id(token_ids), None)
    key = (id(weight), weight.data_ptr())
    version, rows = by_weight.get(key, (None, None))
    if version != weight._version:  # new, or the weight was changed in place since the copy
        rows = weight.detach()[token_ids].contiguous()
        by_weight[key] = (weight._version, rows)
    return rows
