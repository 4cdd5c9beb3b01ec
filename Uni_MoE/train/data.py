"""Training data: the JSON files read into one dataset, with optional skipping of bad samples, an
in-memory cache, and cheap length estimates for the modality-grouped sampler."""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import UniMoEConfig
from ..data.dataset import UniMoEDataset
from ..data.schema import Sample, load_samples

logger = logging.getLogger(__name__)


class SkippingDataset(Dataset):
    """Wraps a dataset: an item that fails to load is reported (naming it) and replaced by the next one."""

    def __init__(self, inner: UniMoEDataset) -> None:
        self.inner = inner
        self.skipped: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, Any]:
        for offset in range(len(self.inner)):
            j = (i + offset) % len(self.inner)
            try:
                return self.inner[j]
            except ValueError as err:
                if j not in self.skipped:
                    self.skipped[j] = str(err)
                    logger.warning("skipping bad sample (%d skipped so far): %s", len(self.skipped), err)
        raise ValueError("every sample failed to load; see the warnings above")


class CachedDataset(Dataset):
    """Keeps each decoded item in memory after its first load (for small data read for many epochs)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner
        self.cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i not in self.cache:
            self.cache[i] = self.inner[i]
        return self.cache[i]


def estimated_length(sample: Sample, config: UniMoEConfig, tokens_per_visual: int) -> int:
    """Token count without reading media: the record's ``tokens`` field when present (8e data), else words
    plus each media item's placeholder run (one window per speech/audio file)."""
    if isinstance(sample.meta.get("tokens"), int):
        return sample.meta["tokens"]
    words = sum(len(t["value"].split()) for t in sample.conversations)
    visual = tokens_per_visual * (len(sample.images) + len(sample.videos))
    return words + visual + config.query_tokens_size * (len(sample.speech) + len(sample.audio))


def build_dataset(
    paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    config: UniMoEConfig,
    data_root: str | None,
    model_max_length: int,
    skip_bad_samples: bool = False,
    cache: bool = False,
) -> tuple[Dataset, list[Sample]]:
    """All records of ``paths`` as one training dataset (and the parsed samples, for the sampler)."""
    samples: list[Sample] = []
    for path in paths:
        samples += load_samples(path, config.voice_modality)
    dataset: Dataset = UniMoEDataset(samples, tokenizer, config, data_root, model_max_length)
    if skip_bad_samples:
        dataset = SkippingDataset(dataset)
    if cache:
        dataset = CachedDataset(dataset)
    return dataset, samples
