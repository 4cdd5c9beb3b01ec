"""Decoded media kept between chat turns: a conversation re-reads every file of its earlier turns on each
new turn, and the upload check decodes a file just before the prompt does, so without a cache a long
video would be decoded again and again. Uploads are stored under content-hashed paths, so a path names
one content for the life of the server.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase

from ..config import UniMoEConfig
from ..processing_uni_moe import UniMoEProcessor


class CachedMediaProcessor(UniMoEProcessor):
    """A ``UniMoEProcessor`` that keeps the encoder inputs of the ``size`` files used most recently."""

    @classmethod
    def for_model(cls, config: UniMoEConfig, tokenizer: PreTrainedTokenizerBase,
                  size: int = 16) -> "CachedMediaProcessor":
        """The model's processor, caching the ``size`` most recent files."""
        processor = cls.from_config(config, tokenizer)
        processor.size = size
        processor.decoded = OrderedDict()
        return processor

    def _cached(self, kind: str, source: Any, decode: Callable[[Any], Any]) -> Any:
        key = (kind, str(source))
        if key in self.decoded:
            self.decoded.move_to_end(key)
            return self.decoded[key]
        value = decode(source)
        self.decoded[key] = value
        if len(self.decoded) > self.size:
            self.decoded.popitem(last=False)
        return value

    def image(self, path: Path) -> torch.Tensor:
        return self._cached("image", path, super().image)

    def video(self, source: Any) -> torch.Tensor:
        return self._cached("video", source, super().video)

    def speech(self, path: Path) -> torch.Tensor:
        return self._cached("speech", path, super().speech)

    def audio(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cached("audio", path, super().audio)
