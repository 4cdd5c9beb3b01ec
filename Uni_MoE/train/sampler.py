"""Modality-grouped, length-aware sampling for ``--group_by_modality_length``.

Every optimizer step (world size x batch x accumulation samples, a "megabatch") sees one modality mix,
which keeps padding and encoder work uniform, as the original's sampler intends. Unlike the original,
leftover samples that do not fill a megabatch of their modality are pooled into mixed megabatches at
the end instead of being dropped, so every sample is seen once per epoch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import torch
from torch.utils.data import Sampler


def modality_megabatches(
    modalities: list[str], lengths: list[int], megabatch: int, generator: torch.Generator
) -> list[list[int]]:
    """Shuffled megabatches of sample indices: full single-modality ones, then the pooled leftovers; each
    sorted longest first."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, modality in enumerate(modalities):
        groups[modality].append(index)
    full, leftover = [], []
    for modality in sorted(groups):
        members = groups[modality]
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        cut = len(order) - len(order) % megabatch
        full += [order[i : i + megabatch] for i in range(0, cut, megabatch)]
        leftover += order[cut:]
    batches = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    batches += [leftover[i : i + megabatch] for i in range(0, len(leftover), megabatch)]
    return [sorted(b, key=lambda i: -lengths[i]) for b in batches]


class ModalityGroupedSampler(Sampler[int]):
    """Yields every index once per epoch, megabatch by megabatch (see module docstring)."""

    def __init__(self, modalities: list[str], lengths: list[int], megabatch: int, seed: int = 0) -> None:
        if len(modalities) != len(lengths):
            raise ValueError(f"{len(modalities)} modality labels but {len(lengths)} lengths")
        self.modalities = modalities
        self.lengths = lengths
        self.megabatch = max(1, megabatch)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.modalities)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for batch in modality_megabatches(self.modalities, self.lengths, self.megabatch, generator):
            yield from batch
