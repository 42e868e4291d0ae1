"""Batching token blocks, or the hidden states cached from them, for the model and the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Batch keys whose position axis is padded by `DistillationCollator` ("scored_mask": positions to count, where
#: a set counts fewer than it attends to).
_TOKEN_KEYS = ("input_ids", "attention_mask", "scored_mask")


@dataclass
class DistillationCollator:
    """Batches token blocks (right-padding `input_ids` and `attention_mask`) or cached hidden states (stacked)."""

    pad_token_id: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(feature["attention_mask"]) for feature in features)
        batch = {}
        for name in features[0]:
            tensors = [torch.as_tensor(feature[name]) for feature in features]
            if name in _TOKEN_KEYS:
                value = self.pad_token_id if name == "input_ids" else 0
                tensors = [nn.functional.pad(tensor, (0, width - tensor.shape[0]), value=value) for tensor in tensors]
            batch[name] = torch.stack(tensors)
        return batch
