"""lmms-eval requests -> Uni-MoE inputs, without lmms-eval itself (so it is testable anywhere).

lmms-eval hands a context string and the ``doc_to_visual`` list of a document: PIL images, audio dicts
(``{"array", "sampling_rate"}``) and video paths. Media go where the data schema puts them: an audio dict
is a ``voice`` item (speech or sound by the model's ``voice_modality``), and placeholders missing from the
context go in front of it, as ``parse_sample`` does for our own eval records, so both build one prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

from ..data.schema import parse_sample
from ..processing_uni_moe import UniMoEProcessor

VIDEO_SUFFIXES = frozenset(".mp4 .avi .mkv .mov .webm .m4v".split())
AUDIO_SUFFIXES = frozenset(".wav .flac .mp3 .ogg .m4a .opus".split())
IMAGE_SUFFIXES = frozenset(".jpg .jpeg .png .bmp .gif .webp .tif .tiff".split())


def flatten(visuals: Any) -> list[Any]:
    """doc_to_visual's output (None, an item, or nested lists) as a flat list of items."""
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [item for v in visuals for item in flatten(v)]
    return [visuals]


def sort_media(visuals: Any) -> dict[str, list[Any]]:
    """Items by schema key: ``image`` (PIL images, image files), ``video`` (video files, frame folders),
    ``voice`` (audio dicts, audio files)."""
    out: dict[str, list[Any]] = {"image": [], "video": [], "voice": []}
    for n, item in enumerate(flatten(visuals)):
        if isinstance(item, Image.Image):
            out["image"].append(item)
        elif isinstance(item, dict) and ("array" in item or "path" in item):
            out["voice"].append(item)
        elif isinstance(item, (str, Path)):
            path = Path(item)
            suffix = path.suffix.lower()
            if path.is_dir() or suffix in VIDEO_SUFFIXES:
                out["video"].append(_frames_or_file(path))
            elif suffix in AUDIO_SUFFIXES:
                out["voice"].append(str(path))
            elif suffix in IMAGE_SUFFIXES:
                out["image"].append(str(path))
            else:
                raise ValueError(f"visual {n}: cannot tell the modality of {item!r} from its suffix")
        else:
            raise ValueError(f"visual {n}: expected a PIL image, an audio dict or a media path, got "
                             f"{type(item).__name__}")
    if len(out["video"]) > 1:
        raise ValueError(f"{len(out['video'])} videos in one document; Uni-MoE takes one video per prompt")
    return out


def _frames_or_file(path: Path) -> list[str] | str:
    if path.is_dir():
        from ..serve.generate import video_frames_or_file

        return video_frames_or_file(path)
    return str(path)


def user_prompt(processor: UniMoEProcessor, context: str, media: dict[str, list[Any]],
                voice_modality: str) -> tuple[str, dict[str, list[Any]]]:
    """The vicuna_v1 prompt for one context and the processor's media lists (speech / audio resolved)."""
    record: dict[str, Any] = {"conversations": [{"from": "human", "value": context}]}
    for key in ("image", "voice"):
        if media[key]:
            record[key] = ["item"] * len(media[key])  # stand-ins: only the counts place the placeholders
    if media["video"]:
        record["video"] = "item"
    sample = parse_sample(record, 0, voice_modality, "lmms-eval request")
    voice = "speech" if voice_modality == "speech" else "audio"
    items = {"images": media["image"], "videos": media["video"], "speech": [], "audio": []}
    items[voice] = media["voice"]
    return processor.apply_chat_template(sample.conversations), items


def encode_prompts(processor: UniMoEProcessor, contexts: Sequence[str], visuals: Sequence[Any],
                   voice_modality: str, padding_side: str = "left") -> BatchFeature:
    """One padded batch of prompts with every document's media, in document order."""
    prompts, merged = [], {"images": [], "videos": [], "speech": [], "audio": []}
    for context, doc_visuals in zip(contexts, visuals):
        prompt, items = user_prompt(processor, context, sort_media(doc_visuals), voice_modality)
        prompts.append(prompt)
        for key, value in items.items():
            merged[key] += value
    return processor(text=prompts, padding_side=padding_side, **merged)


def continuation_logprobs(model: torch.nn.Module, batch: BatchFeature, continuations: Sequence[list[int]],
                          pad_token_id: int) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of each continuation after its right-padded prompt, whether greedy decoding
    would produce it) for one batch; the media enter once, with the prompts."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    rows = [ids[i, :n].tolist() + list(cont) for i, (n, cont) in enumerate(zip(lengths, continuations))]
    longest = max(len(r) for r in rows)
    full = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    full_mask = torch.zeros_like(full)
    for i, row in enumerate(rows):
        full[i, : len(row)] = torch.tensor(row)
        full_mask[i, : len(row)] = 1
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    device, dtype = model.device, model.dtype
    media = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in media.items()}
    with torch.inference_mode():
        logits = model(input_ids=full.to(device), attention_mask=full_mask.to(device), **media).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for i, (n, cont) in enumerate(zip(lengths, continuations)):
        positions = torch.arange(n - 1, n - 1 + len(cont), device=device)  # logits at t predict token t + 1
        target = torch.tensor(cont, device=device)
        picked = logprobs[i, positions].gather(-1, target[:, None]).squeeze(-1)
        greedy = bool((logprobs[i, positions].argmax(-1) == target).all())
        out.append((float(picked.sum()), greedy))
    return out
