"""Training data: the JSON files validated and read into one dataset, an optional in-memory cache, and
cheap length estimates for the modality-grouped sampler.

Every sample is checked before training starts (``Uni_MoE.data.validate``): bad samples stop the run with
a report naming each one, or with ``--skip_bad_samples`` are left out and counted, so no sample that could
be checked up front fails mid-epoch."""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import UniMoEConfig
from ..data.dataset import UniMoEDataset
from ..data.schema import Sample
from ..data.validate import DataValidationError, ValidationReport, validate_files

logger = logging.getLogger(__name__)


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


def checked_samples(
    paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    config: UniMoEConfig,
    data_root: str | None,
    model_max_length: int,
    skip_bad_samples: bool = False,
    num_workers: int = 0,
    show_progress: bool = True,
) -> ValidationReport:
    """The validation report of ``paths``, whose ``samples`` are the ones to train on. A data file that cannot
    be read stops the run even with ``skip_bad_samples`` (it is a wrong path, not a bad sample); bad samples
    raise DataValidationError listing every one unless ``skip_bad_samples``."""
    report = validate_files(paths, tokenizer, config, data_root, model_max_length, num_workers=num_workers,
                            show_progress=show_progress)
    unreadable = [i for i in report.errors if i.index < 0]
    if unreadable:
        raise DataValidationError("\n".join(f"--data_path {i.file}: {i.reason}" for i in unreadable))
    for issue in report.warnings:
        logger.warning("%s", issue)
    if report.errors and not skip_bad_samples:
        raise DataValidationError(
            f"{report.format()}\nfix or remove these samples, or pass --skip_bad_samples True to train on the rest"
        )
    for issue in report.errors:
        logger.warning("skipping %s", issue)
    if not report.samples:
        raise DataValidationError(f"no usable training sample in {paths}\n{report.format()}")
    return report


def training_dataset(
    samples: list[Sample],
    tokenizer: PreTrainedTokenizerBase,
    config: UniMoEConfig,
    data_root: str | None,
    model_max_length: int,
    cache: bool = False,
) -> Dataset:
    """The checked samples as the training dataset (kept in memory after the first load with ``cache``)."""
    dataset: Dataset = UniMoEDataset(samples, tokenizer, config, data_root, model_max_length)
    return CachedDataset(dataset) if cache else dataset
