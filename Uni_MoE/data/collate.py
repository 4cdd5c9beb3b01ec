"""Batching: pad token sequences and concatenate each modality's inputs in sample order."""

from __future__ import annotations

from typing import Any

import torch

from ..modalities import MEDIA_INPUT_KEYS
from .conversation import IGNORE_INDEX


def collate(batch: list[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad input_ids/labels (right for training, left for generation) and build the attention mask.

    Media tensors of all samples are concatenated along dim 0 in sample order, which is the order
    their placeholders appear in the flattened batch, so the model can splice them in one scatter.
    """
    longest = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        ids[row, span] = item["input_ids"]
        labels[row, span] = item["labels"]
        mask[row, span] = 1
    out: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    for key in MEDIA_INPUT_KEYS:
        parts = [item[key] for item in batch if key in item]
        if parts:
            out[key] = torch.cat(parts)
    out["modality"] = [item.get("modality", "text") for item in batch]
    out["sample_index"] = [item.get("sample_index", -1) for item in batch]
    return out


class Collator:
    """Picklable collate_fn for DataLoader workers."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(batch, self.pad_token_id, self.padding_side)
