"""The demo's model side: a chat conversation with media, turned into model inputs, answered with
streamed tokens while the experts chosen for every token are recorded.

The model is not thread-safe, so each generation runs in its own thread behind one lock; a reply whose
reader goes away (a closed browser tab) is cancelled at the next token rather than left running.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from transformers import TextIteratorStreamer

from ..checkpoint.loader import load_checkpoint
from ..data import media
from ..data.collate import collate
from ..data.dataset import UniMoEDataset
from ..data.tokenizer import load_tokenizer
from ..modalities import MODALITIES
from .chat import PROMPT_ORDER, Conversation
from .demo_cache import CachedMediaProcessor
from .demo_media import RequestError, UploadError, UploadLimits, check_upload, has_soundtrack
from .demo_routing import RoutingRecorder
from .engine import GenerationEngine, GenerationSettings

class Reply:
    """Text pieces of one answer as they are generated; ``routing`` and ``error`` once it is done."""

    def __init__(self, engine: "DemoEngine", inputs: dict[str, Any], settings: GenerationSettings) -> None:
        self.engine = engine
        self.prompt_groups = engine.token_groups(inputs["input_ids"][0])
        self.streamer = TextIteratorStreamer(engine.tokenizer, skip_special_tokens=True)
        self.cancelled = threading.Event()
        self.error: Exception | None = None
        self.routing: dict[str, np.ndarray] = {}
        self.thread = threading.Thread(target=self._run, args=(inputs, settings), daemon=True)
        self.thread.start()

    def _run(self, inputs: dict[str, Any], settings: GenerationSettings) -> None:
        engine = self.engine
        try:
            with engine.lock, engine.recorder.recording() as rec:
                engine.generator.generate(inputs, settings, streamer=self.streamer,
                                          should_stop=self.cancelled.is_set)
                self.routing = rec.counts(self.prompt_groups, engine.model.config.num_experts)
        except Exception as err:  # shown to the user; the demo keeps serving
            self.error = err
            self.streamer.end()

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.streamer
        finally:
            self.cancelled.set()
            self.thread.join()


class DemoEngine:
    """Model, tokenizer and media processing for the demo; one generation at a time."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 limits: UploadLimits = UploadLimits()) -> None:
        self.model = load_checkpoint(model_dir, dtype).to(device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.config = self.model.config
        self.device = torch.device(device)
        self.limits = limits
        self.processor = CachedMediaProcessor.for_model(self.config, self.tokenizer)
        self.lock = threading.Lock()
        self.recorder = RoutingRecorder(self.model.moe_mlps())
        self.generator = GenerationEngine(self.model, self.tokenizer)
        self.moe_layer_ids = self.config.moe_layer_indices()
        self.group_of_id = {tid: m for m, tid in self.config.placeholder_token_ids().items()}

    @property
    def modalities(self) -> list[str]:
        """Media this model has an encoder for."""
        return [m for m in PROMPT_ORDER if m in self.config.enabled_modalities()]

    def token_groups(self, input_ids: torch.Tensor) -> list[str]:
        """Per prompt token: its modality for placeholder tokens, else ``text``."""
        return [self.group_of_id.get(int(t), "text") for t in input_ids]

    def check_uploads(self, uploads: dict[str, str | None]) -> dict[str, list[str]]:
        """Per modality, the files the model will read for these uploads, after checking kind, size,
        duration and that they decode; UploadError if any fails. A video's soundtrack, if it has one,
        is also heard as speech (as the original demo does) when the model has a speech encoder."""
        checked: dict[str, list[str]] = {}
        for modality, path in uploads.items():
            if not path:
                continue
            if modality not in self.modalities:
                raise UploadError(f"{Path(path).name}: this model has no {modality} encoder, so it cannot "
                                  "take this upload")
            p = check_upload(path, modality, self.limits)
            self._decode(modality, p)
            checked.setdefault(modality, []).append(str(p))
            if modality == "video" and "speech" in self.modalities and has_soundtrack(p):
                self._decode("speech", p)
                checked.setdefault("speech", []).append(str(p))
        return checked

    def _decode(self, modality: str, path: Path) -> None:
        """Decode the file as the model input will (the result is dropped); UploadError if it fails."""
        decode = getattr(self.processor, MODALITIES[modality].processor_step)
        try:
            decode(path)
        except (media.MediaError, ValueError) as err:
            raise UploadError(str(err).replace(str(path), path.name)) from err

    def inputs(self, conversation: Conversation, max_new_tokens: int) -> dict[str, Any]:
        """Model inputs (batch of one, on the model's device) for answering the conversation's last turn."""
        dataset = UniMoEDataset([conversation.sample()], self.tokenizer, self.config, for_generation=True,
                                processor=self.processor)
        batch = collate([dataset[0]], self.tokenizer.pad_token_id, padding_side="left")
        length, room = batch["input_ids"].shape[1], self.config.text_config.max_position_embeddings
        if length + max_new_tokens > room:
            raise RequestError(f"the conversation is {length} tokens long; with {max_new_tokens} new tokens it "
                              f"exceeds the model's {room}-token context: clear the chat to start over")
        dtype = self.model.dtype
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype)
                for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}

    def reply(self, inputs: dict[str, Any], temperature: float, max_new_tokens: int) -> Reply:
        """Start generating (sampled at ``temperature``, greedy at 0) and return the streaming reply.
        The engine suppresses placeholder tokens: one generated would ask for media that is not there."""
        settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                      temperature=temperature)
        return Reply(self, inputs, settings)
