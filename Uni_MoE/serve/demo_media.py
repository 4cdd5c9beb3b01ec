"""Checks on the demo's uploads before any decoding: kind (by suffix), size and duration.

An upload that fails raises `UploadError` (a `RequestError`) naming the file as the user called it, so the chat can say
what is wrong with which file instead of failing deep inside a decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import soundfile as sf

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".m4a", ".aac", ".opus", ".webm"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".ogv", ".m4v"}
SUFFIXES = {"image": IMAGE_SUFFIXES, "speech": AUDIO_SUFFIXES, "audio": AUDIO_SUFFIXES, "video": VIDEO_SUFFIXES}
LABELS = {"image": "image", "speech": "speech recording", "audio": "sound", "video": "video"}


class RequestError(ValueError):
    """A chat turn the demo will not answer; the message tells the user why."""


class UploadError(RequestError):
    """An upload the demo will not use; the message starts with the file's name."""


@dataclass(frozen=True)
class UploadLimits:
    """Largest accepted upload, and longest accepted recording and video."""

    max_upload_mb: float = 50.0
    max_audio_seconds: float = 120.0
    max_video_seconds: float = 300.0


def media_duration(path: Path) -> float:
    """Seconds of an audio or video file: soundfile's header, else the container's; raises UploadError."""
    try:
        return sf.info(str(path)).duration
    except (sf.SoundFileError, RuntimeError):
        pass
    try:
        with av.open(str(path)) as container:
            if container.duration is not None:
                return container.duration / av.time_base
            stream = (container.streams.video or container.streams.audio or [None])[0]
            if stream is None or stream.duration is None or stream.time_base is None:
                raise UploadError(f"{path.name}: has no audio or video stream")
            return float(stream.duration * stream.time_base)
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise UploadError(f"{path.name}: not a readable media file ({err.__class__.__name__})") from err


def has_soundtrack(path: Path) -> bool:
    """Whether a (checked, readable) video file has an audio stream."""
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise UploadError(f"{path.name}: not a readable media file ({err.__class__.__name__})") from err


def check_upload(path: str | Path, modality: str, limits: UploadLimits) -> Path:
    """The upload's path once its suffix, size and (for sound and video) duration are acceptable."""
    p = Path(path)
    label = LABELS[modality]
    if p.suffix.lower() not in SUFFIXES[modality]:
        allowed = ", ".join(sorted(SUFFIXES[modality]))
        raise UploadError(f"{p.name}: unsupported {label} file type '{p.suffix or '(none)'}' (accepted: {allowed})")
    if not p.is_file() or p.stat().st_size == 0:
        raise UploadError(f"{p.name}: the {label} file is empty or missing")
    size_mb = p.stat().st_size / 2**20
    if size_mb > limits.max_upload_mb:
        raise UploadError(f"{p.name}: {size_mb:.1f} MB is larger than the {limits.max_upload_mb:g} MB upload limit")
    if modality == "image":
        return p
    limit = limits.max_video_seconds if modality == "video" else limits.max_audio_seconds
    seconds = media_duration(p)
    if seconds > limit:
        raise UploadError(f"{p.name}: the {label} lasts {seconds:.1f} s, longer than the {limit:g} s limit")
    return p
