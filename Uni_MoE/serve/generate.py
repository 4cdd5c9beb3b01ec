"""Batched, KV-cached generation from samples of mixed modalities, and one-prompt building for the CLI.
The media stack (PyAV, soundfile) is imported only where samples are read, so the
generation core also runs where it is missing (the GPU benchmark machine).

Samples go through the training data pipeline (``UniMoEDataset(for_generation=True)``), are grouped by
prompt length into left-padded batches, and decoded by the generation engine (``engine.py``): the media
enter on the prefill step only, then every new token costs one cached step. The original decoded one
sample at a time without a cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.collate import Collator
from ..data.schema import Sample, parse_sample
from ..model.uni_moe import UniMoEForCausalLM
from .chat import Conversation
from .engine import GenerationSettings, cut_at_stop, engine_for
from .refill import generate_refilling

if TYPE_CHECKING:
    from ..data.dataset import UniMoEDataset

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def to_samples(
    samples_or_records: Sequence[Sample | dict], voice_modality: str, source: str = "<memory>"
) -> list[Sample]:
    """Parsed samples from records in the data JSON schema (samples pass through unchanged)."""
    return [s if isinstance(s, Sample) else parse_sample(s, i, voice_modality, source)
            for i, s in enumerate(samples_or_records)]


def generate_token_ids(
    model: UniMoEForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict[str, Any],
    settings: GenerationSettings,
    synced_gpus: bool = False,
) -> torch.Tensor:
    """New tokens [B, T] for one left-padded collated batch (pad after a sequence ends), through the
    model's generation engine (media encoded once at prefill, static cache, placeholders suppressed)."""
    return engine_for(model, tokenizer).generate(batch, settings, synced_gpus=synced_gpus)


def default_batch_size(device: torch.device | str) -> int:
    """Eval batch size for the device: a GPU decodes a batch for nearly the price of one sequence (reading
    the weights dominates) up to the MoE decode path's token limit; a CPU gains little from batching."""
    return 32 if torch.device(device).type == "cuda" else 8


def estimated_length(sample: Sample, config: Any) -> int:
    """A prompt's token count estimated without reading its media (text ~4 characters a token; each image
    or video its visual tokens; each speech or audio file one window of query tokens), to order batches."""
    vc = config.vision_config
    visual = (vc.image_size // vc.patch_size) ** 2 if vc is not None else 0
    text = sum(len(turn.get("value", "")) for turn in sample.conversations) // 4
    voice = config.query_tokens_size * (len(sample.speech) + len(sample.audio))
    return text + visual * (len(sample.images) + len(sample.videos)) + voice


def length_ordered_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Dataset positions in batches of similar prompt length (longest first, so the first batch shows at
    once whether the largest fits in memory), which keeps left padding and cache length small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A DataLoader collate_fn that leaves the items as they are (picklable for workers)."""
    return items


def iter_replies(
    model: UniMoEForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    dataset: "UniMoEDataset",
    settings: GenerationSettings,
    batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool | str = False,
    synced_gpus: bool = False,
    refill_rows: bool = False,
) -> Iterator[tuple[int, str]]:
    """(dataset index, reply) for every sample, batch by batch in order of prompt length (not dataset
    order); media load in ``num_workers``. ``batch_size`` None picks the device's default. With
    ``refill_rows`` (greedy or sampled decoding on one process) a finished row takes the next waiting
    sample instead of waiting for its batch (``refill.py``); replies then come as rows finish."""
    batch_size = batch_size or default_batch_size(model.device)
    batches = length_ordered_batches([estimated_length(s, model.config) for s in dataset.samples], batch_size)
    collator = Collator(tokenizer.pad_token_id, padding_side="left")
    refill = refill_rows and settings.num_beams == 1 and not synced_gpus
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=as_list if refill else collator)
    bar = tqdm(total=len(dataset), desc=progress if isinstance(progress, str) else "generating",
               disable=not progress, unit="sample")
    engine = engine_for(model, tokenizer)
    if refill:
        items = ((i, item) for positions, got in zip(batches, loader) for i, item in zip(positions, got))
        for i, new in generate_refilling(engine, items, settings, batch_size, collator):
            yield i, cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), settings.stop)
            bar.update(1)
        bar.close()
        return
    for positions, batch in zip(batches, loader):
        new = engine.generate(batch, settings, synced_gpus=synced_gpus)
        for i, text in zip(positions, tokenizer.batch_decode(new, skip_special_tokens=True)):
            yield i, cut_at_stop(text, settings.stop)
        bar.update(len(positions))
    bar.close()


def generate_batch(
    model: UniMoEForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    samples_or_records: Sequence[Sample | dict],
    settings: GenerationSettings | None = None,
    *,
    data_root: str | Path | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool | str = False,
    seed: int | None = None,
) -> list[str]:
    """Replies (template and stop strings stripped) to samples of any modality mix, in input order.

    Each sample's last gpt turn, if present, is dropped, so eval records with an empty answer turn work.
    ``seed`` makes sampled decoding repeatable.
    """
    from ..data.dataset import UniMoEDataset  # the media stack (PyAV, soundfile) loads only when needed

    settings = settings or GenerationSettings()
    samples = to_samples(samples_or_records, model.config.voice_modality)
    dataset = UniMoEDataset(samples, tokenizer, model.config, data_root, for_generation=True)
    if seed is not None:
        torch.manual_seed(seed)
    replies = [""] * len(samples)
    for i, reply in iter_replies(model, tokenizer, dataset, settings, batch_size, num_workers, progress):
        replies[i] = reply
    return replies


def video_frames_or_file(video: str | Path) -> list[str] | str:
    """A folder of frames becomes its sorted frame list (the original read it unsorted); a file stays."""
    from ..data import media  # the media stack (PyAV, soundfile) loads only when needed

    p = Path(video)
    if p.is_dir():
        frames = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise media.MediaError(f"{p}: folder holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        return frames
    return str(p)


def build_chat_sample(
    question: str,
    image: str | None = None,
    speech: str | None = None,
    audio: str | None = None,
    video: str | None = None,
    history: Sequence[tuple[str, str]] | None = None,
    video_track_as: str | None = "speech",
) -> dict[str, Any]:
    """One record in the data schema from free text and media paths, media in the first turn, through the
    chat prompt builder the demo uses.

    The first human turn is ``<image>\\n<speech>\\n<audio>\\n<video>\\n`` (those present) + the first
    question, as the original's CLI builds it. ``history`` holds earlier (question, answer) pairs.
    A video file's soundtrack, if it has one, is added as ``video_track_as`` ("speech", "audio" or None).
    """
    from ..data import media

    uploads: dict[str, list[Any]] = {"image": [str(image)] if image else [], "speech": [str(speech)] if speech else [],
                                     "audio": [str(audio)] if audio else [], "video": []}
    if video:
        uploads["video"] = [video_frames_or_file(video)]
        if video_track_as and isinstance(uploads["video"][0], str) and media.load_audio_track(video) is not None:
            uploads[video_track_as].append(str(video))
    conversation = Conversation()
    for turn, (q, a) in enumerate([*(history or []), (question, "")]):
        conversation = conversation.with_question(q, uploads if turn == 0 else {}).with_answer(a)
    return conversation.record()

