"""The training/eval JSON schema of the original release, parsed into ``Sample`` records.

A record is a dict with ``conversations`` ([{"from": "human"|"gpt", "value": str}, ...]) and optional
media: ``image`` (a file, or a list of files), ``video`` (a list of frame files or one video file),
``voice`` (the original's key: audio files, one per ``<audio>`` placeholder, whose meaning — speech or
sound — is the model's ``voice_modality``), and our explicit ``speech`` / ``audio`` lists. Everything
else (``id``, ``question_id``, ``answer``, ``gt``, ``category``, ``task`` ...) is kept in ``meta``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..modalities import MODALITIES, MODALITY_NAMES, PLACEHOLDERS, VOICE_KEY

MEDIA_KEYS = (*MODALITY_NAMES, VOICE_KEY)
MIN_BASE64_LEN = 200  # the original treats image strings at least this long as inline base64, not paths
PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(t) for t in PLACEHOLDERS.values()) + ")")
TOKEN_TO_MODALITY = {t: m for m, t in PLACEHOLDERS.items()}
MEDIA_SUFFIXES = frozenset(
    ".jpg .jpeg .png .bmp .gif .webp .tif .tiff .mp4 .avi .mkv .mov .webm .wav .flac .mp3 .ogg .m4a".split()
)


class SampleError(ValueError):
    """A record that cannot be used; the message names the file, index, id and reason."""


@dataclass
class Sample:
    index: int
    id: str
    conversations: list[dict[str, str]]
    images: list[str] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)  # each: list of frame files, or one video file
    speech: list[str] = field(default_factory=list)
    audio: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def media(self, modality: str) -> list[Any]:
        return getattr(self, MODALITIES[modality].sample_field)

    @property
    def modality(self) -> str:
        """Short label of the sample's media mix (``text``, ``image``, ``image+speech`` ...)."""
        on = [m for m in MODALITY_NAMES if self.media(m)]
        return "+".join(on) if on else "text"


def _as_list(value: Any, key: str, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise SampleError(f"{where}: field '{key}' must be a string or a list of strings, got {type(value).__name__}")


def parse_sample(record: Any, index: int, voice_modality: str = "speech", source: str = "<memory>") -> Sample:
    """Check one record and normalise it; placeholders missing from the text are put in front of the
    first human turn (as LLaVA does for images), and ``<audio>`` becomes ``<speech>`` for speech."""
    where = f"{source} sample {index}"
    if isinstance(record, SampleError):
        raise SampleError(f"{where}: {record}")
    if not isinstance(record, dict):
        raise SampleError(f"{where}: expected a JSON object, got {type(record).__name__}")
    sid = str(record.get("id", record.get("question_id", index)))
    where = f"{source} sample {index} (id {sid})"
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SampleError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(
            turn.get("value"), str
        ):
            raise SampleError(f"{where}: conversations[{t}] must be {{'from': 'human'|'gpt', 'value': str}}")
        turns.append({"from": turn["from"], "value": turn["value"]})
    if turns[0]["from"] != "human":
        raise SampleError(f"{where}: the first turn must be from 'human'")

    images = _as_list(record.get("image"), "image", where)
    video = record.get("video")
    videos = [] if video is None else [video] if isinstance(video, (str, list)) else None
    if videos is None:
        raise SampleError(f"{where}: field 'video' must be a list of frame files or a video file")
    if videos and isinstance(videos[0], list) and not videos[0]:
        raise SampleError(f"{where}: field 'video' is an empty frame list")
    speech = _as_list(record.get("speech"), "speech", where)
    audio = _as_list(record.get("audio"), "audio", where)
    voice = _as_list(record.get(VOICE_KEY), VOICE_KEY, where)
    if voice and voice_modality == "speech":
        if speech:
            raise SampleError(f"{where}: has both 'voice' and 'speech'; use one")
        speech = voice
        for turn in turns:
            turn["value"] = turn["value"].replace(PLACEHOLDERS["audio"], PLACEHOLDERS["speech"])
    elif voice:
        audio = audio + voice

    sample = Sample(index, sid, turns, images, videos, speech, audio,
                    {k: v for k, v in record.items() if k not in MEDIA_KEYS and k != "conversations"})
    _check_placeholders(sample, where)
    return sample


def _check_placeholders(sample: Sample, where: str) -> None:
    text = "".join(t["value"] for t in sample.conversations)
    for modality, token in PLACEHOLDERS.items():
        n_text, n_media = text.count(token), len(sample.media(modality))
        if n_text == 0 and n_media:
            first = sample.conversations[0]
            first["value"] = (token + "\n") * n_media + first["value"]
        elif n_text != n_media:
            raise SampleError(f"{where}: {n_text} '{token}' placeholders but {n_media} {modality} file(s)")


def _json_lines(text: str) -> list[Any]:
    """One record per non-empty line; a malformed line becomes a SampleError in its place, so only that
    sample is reported bad (by ``parse_sample``)."""
    records: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                records.append(SampleError(f"malformed JSON on line {number} column {err.colno}: {err.msg}"))
    return records


def read_records(path: str | Path, strict: bool = False) -> list[Any]:
    """The raw records of a JSON list (or JSON-lines) file; an unreadable or malformed file names itself.

    A malformed JSON line or a record that is not an object is returned in place as a SampleError (or
    left for ``parse_sample`` to report), so that validation reports only that sample; ``strict`` (eval,
    which has no sample to skip to) raises it instead, naming the file.
    """
    records = _read_raw_records(Path(path))
    if strict:
        for index, record in enumerate(records):
            if isinstance(record, SampleError):
                raise SampleError(f"{path}: {record}")
            if not isinstance(record, dict):
                raise SampleError(f"{path}: expected a list of JSON objects (record {index} is "
                                  f"{type(record).__name__})")
    return records


def _read_raw_records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SampleError(f"{path}: cannot read data file ({err})") from err
    if path.suffix == ".jsonl":
        return _json_lines(text)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise SampleError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(records, list):
        raise SampleError(f"{path}: expected a JSON list of samples")
    return records


def load_samples(path: str | Path, voice_modality: str = "speech") -> list[Sample]:
    """Read a JSON list (or JSON-lines file) of records and parse each one."""
    return [parse_sample(r, i, voice_modality, str(path)) for i, r in enumerate(read_records(path))]


def unknown_media_keys(record: dict[str, Any]) -> list[str]:
    """Keys outside the schema's media keys whose value names media files (``images``, ``audio_file`` ...).

    Such a key is almost surely a misspelt modality: its media would be silently ignored, so validation
    reports it. Other extra keys (``id``, ``answer``, ``image_id`` ...) hold no media paths and pass.
    """
    def names_media(value: Any) -> bool:
        values = value if isinstance(value, list) else [value]
        return bool(values) and all(
            isinstance(v, str) and Path(v).suffix.lower() in MEDIA_SUFFIXES for v in values
        )

    return [k for k, v in record.items() if k not in MEDIA_KEYS and names_media(v)]


def resolve_media_path(path: str, data_root: str | Path | None) -> Path:
    """Absolute paths stay; relative ones are taken under ``data_root``."""
    p = Path(path)
    if p.is_absolute() or data_root is None:
        return p
    return Path(data_root) / p
