"""Samples -> model-ready tensors: media loaded lazily, prompt tokenised with expanded placeholders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import UniMoEConfig
from . import media
from .conversation import tokenize_conversation
from .schema import Sample, resolve_media_path


class MediaProcessor:
    """Turns media files into encoder inputs, with the model config's sizes."""

    def __init__(self, config: UniMoEConfig, image_transform: media.ImageTransform | None = None) -> None:
        self.config = config
        if config.vision_config is not None and image_transform is None:
            image_transform = media.ImageTransform(size=config.vision_config.image_size,
                                                   aspect=config.image_aspect_ratio)
        self.image_transform = image_transform

    def tokens_per_visual(self) -> int:
        vc = self.config.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        return patches if self.config.mm_vision_select_feature == "patch" else patches + 1

    def image(self, path: Path) -> torch.Tensor:
        """[3, S, S]"""
        return self.image_transform(media.load_image(path))

    def video(self, source: Any) -> torch.Tensor:
        """[F, 3, S, S] from a frame list or a video file."""
        frames = media.load_video_frames(source, self.config.video_num_frames)
        return torch.stack([self.image_transform(f) for f in frames])

    def speech(self, path: Path) -> torch.Tensor:
        """[n_windows, mel, frames] Whisper log-mel windows."""
        n = self.config.speech_chunk_samples()
        chunks = media.split_into_chunks(media.load_waveform(path), n, self.config.max_audio_chunks, source=path)
        return media.speech_features(chunks, n, self.config.speech_config.num_mel_bins)

    def audio(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """([n_windows, samples], padding mask [n_windows, samples]) for BEATs."""
        n = self.config.audio_chunk_samples()
        chunks = media.split_into_chunks(media.load_waveform(path), n, self.config.max_audio_chunks, source=path)
        return media.audio_chunks(chunks, n)


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
        processor: MediaProcessor | None = None,
    ) -> None:
        self.samples = samples
        self.tokenizer = tokenizer
        self.config = config
        self.data_root = data_root
        self.model_max_length = model_max_length
        self.for_generation = for_generation
        self.processor = processor or MediaProcessor(config)

    def __len__(self) -> int:
        return len(self.samples)

    def _path(self, p: str) -> Path:
        return resolve_media_path(p, self.data_root)

    def load_media(self, sample: Sample) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """Encoder inputs of one sample and the placeholder length of each item."""
        proc, q = self.processor, self.config.query_tokens_size
        out: dict[str, torch.Tensor] = {}
        lengths: dict[str, list[int]] = {}
        if sample.images:
            out["pixel_values"] = torch.stack([proc.image(self._path(p)) for p in sample.images])
            lengths["image"] = [proc.tokens_per_visual()] * len(sample.images)
        if sample.videos:
            vids = [proc.video([self._path(f) for f in v] if isinstance(v, list) else self._path(v))
                    for v in sample.videos]
            out["pixel_values_videos"] = torch.stack(vids)
            lengths["video"] = [proc.tokens_per_visual()] * len(vids)
        if sample.speech:
            feats = [proc.speech(self._path(p)) for p in sample.speech]
            out["input_features"] = torch.cat(feats)
            lengths["speech"] = [q * f.shape[0] for f in feats]
        if sample.audio:
            waves = [proc.audio(self._path(p)) for p in sample.audio]
            out["input_values"] = torch.cat([w for w, _ in waves])
            out["padding_mask"] = torch.cat([m for _, m in waves])
            lengths["audio"] = [q * w.shape[0] for w, _ in waves]
        return out, lengths

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        try:
            item, lengths = self.load_media(sample)
            ids, labels = tokenize_conversation(
                self.tokenizer, sample.conversations, lengths, self.config.placeholder_token_ids(),
                self.for_generation,
            )
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
