"""Samples -> model-ready tensors through the processor: media loaded lazily, prompt tokenised with expanded
placeholders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import UniMoEConfig
from ..processing_uni_moe import UniMoEProcessor
from . import media
from .schema import Sample, resolve_media_path


class UniMoEDataset(Dataset):
    """One item per sample: input_ids, labels and the media tensors of that sample.

    A sample longer than ``model_max_length`` raises (naming it) instead of being cut: cutting would
    drop placeholder tokens or the answer.
    """

    def __init__(
        self,
        samples: list[Sample],
        tokenizer: PreTrainedTokenizerBase,
        config: UniMoEConfig,
        data_root: str | Path | None = None,
        model_max_length: int | None = None,
        for_generation: bool = False,
        processor: UniMoEProcessor | None = None,
    ) -> None:
        self.samples = samples
        self.tokenizer = tokenizer
        self.config = config
        self.data_root = data_root
        self.model_max_length = model_max_length
        self.for_generation = for_generation
        self.processor = processor or UniMoEProcessor.from_config(config, tokenizer)

    def __len__(self) -> int:
        return len(self.samples)

    def _path(self, p: str) -> Path:
        return resolve_media_path(p, self.data_root)

    def load_media(self, sample: Sample) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """Encoder inputs of one sample and the placeholder length of each item."""
        videos = [[self._path(f) for f in v] if isinstance(v, list) else self._path(v) for v in sample.videos]
        paths = {m: [self._path(p) for p in sample.media(m)] for m in ("image", "speech", "audio")}
        return self.processor.media_inputs(paths["image"], videos, paths["speech"], paths["audio"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        try:
            item, lengths = self.load_media(sample)
            ids, labels = self.processor.tokenize_conversation(sample.conversations, lengths, self.for_generation)
        except (media.MediaError, ValueError) as err:
            raise ValueError(f"sample {sample.index} (id {sample.id}): {err}") from err
        if self.model_max_length is not None and len(ids) > self.model_max_length:
            raise ValueError(
                f"sample {sample.index} (id {sample.id}): {len(ids)} tokens after expanding media placeholders, "
                f"more than model_max_length={self.model_max_length}"
            )
        item.update(input_ids=torch.tensor(ids), labels=torch.tensor(labels), sample_index=sample.index,
                    modality=sample.modality)
        return item
