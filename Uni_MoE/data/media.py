"""Media files to arrays: images, video frames, soundtracks, waveforms and their chunking into windows;
the CLIP / Whisper transforms on top of them live in ``processing_uni_moe``.

Every reader checks its file first and raises `MediaError` naming the path and what is wrong, so a bad
sample stops a run with a message (or is counted when the caller chooses to skip) instead of crashing deep
inside a decoder.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from pathlib import Path

from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch
from PIL import Image, UnidentifiedImageError

from .schema import MIN_BASE64_LEN

if TYPE_CHECKING:
    import av

SAMPLE_RATE = 16000
MAX_IMAGE_PIXELS = 8192 * 8192  # larger images and video frames are refused before they are decoded
SILENCE_PEAK = 1e-4  # a waveform whose peak stays below this (-80 dBFS) counts as silent


class MediaError(ValueError):
    """A media file is missing, empty, corrupt, of the wrong kind, or unusable (e.g. zero duration)."""


def _checked_file(path: str | Path) -> Path:
    """The path, after checking that it names a non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: file not found")
    if not p.is_file():
        raise MediaError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise MediaError(f"{p}: file is empty")
    return p


# ---------------------------------------------------------------- images


def _check_resolution(width: int, height: int, name: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"{name}: resolution {width}x{height} exceeds the {MAX_IMAGE_PIXELS} pixel limit (media.MAX_IMAGE_PIXELS)"
        )


def _open_image(source: io.BytesIO | Path, name: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            _check_resolution(*img.size, name)
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"{name}: not a readable image ({err})") from err


def _is_base64_candidate(text: str) -> bool:
    if len(text) < MIN_BASE64_LEN:
        return False
    try:
        return not Path(text).exists()
    except OSError:  # e.g. name too long for a path
        return True


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file, or from a base64 string (the original's rule: strings >= 200 chars)."""
    if isinstance(path, str) and _is_base64_candidate(path):
        payload = path.split(",", 1)[1] if path.startswith("data:") else path
        short = f"base64 image '{path[:40]}...'"
        try:
            raw = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise MediaError(f"{short}: not a file and not valid base64 ({err})") from err
        return _open_image(io.BytesIO(raw), short)
    p = _checked_file(path)
    return _open_image(p, str(p))


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: pad the short side evenly with `fill` so the image becomes square."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


# ---------------------------------------------------------------- video


def frame_indices(total: int, num_frames: int) -> list[int]:
    """The original's rule, i * (total // num_frames); with fewer frames than wanted, each repeats evenly."""
    if total >= num_frames:
        step = total // num_frames
        return [i * step for i in range(num_frames)]
    return [i * total // num_frames for i in range(num_frames)]


def _pyav() -> ModuleType:
    """PyAV (FFmpeg), imported on the first video or non-soundfile container: images and WAV speech need
    neither it nor its libraries."""
    import av

    return av


def _open_container(p: Path) -> av.container.InputContainer:
    av = _pyav()
    try:
        return av.open(str(p))
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise MediaError(f"{p}: not a readable media container ({err})") from err


def _check_video_stream(container: av.container.InputContainer, p: Path) -> av.video.stream.VideoStream:
    """The first video stream, after checking the file is a video (not a still image) of sane resolution."""
    if not container.streams.video:
        raise MediaError(f"{p}: has no video stream")
    if container.format.name.endswith("_pipe") or container.format.name == "image2":
        raise MediaError(f"{p}: is a still image ({container.format.name}), not a video")
    stream = container.streams.video[0]
    _check_resolution(stream.codec_context.width, stream.codec_context.height, str(p))
    return stream


def _decode_frames(p: Path, wanted: list[int]) -> list[Image.Image]:
    """Frames at the (sorted, possibly repeated) indices `wanted`, in one decoding pass."""
    av = _pyav()
    keep: dict[int, Image.Image] = {}
    targets = set(wanted)
    with _open_container(p) as container:
        _check_video_stream(container, p)
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i in targets:
                    keep[i] = frame.to_image().convert("RGB")
                    if len(keep) == len(targets):
                        break
        except av.error.FFmpegError as err:
            raise MediaError(f"{p}: corrupt video ({err})") from err
    return [keep[i] for i in wanted if i in keep]


def _count_frames(p: Path, trust_header: bool = True) -> int:
    """Frames in the first video stream: the container's count if it declares one, else by decoding."""
    av = _pyav()
    with _open_container(p) as container:
        declared = _check_video_stream(container, p).frames
        if trust_header and declared > 0:
            return declared
        try:
            return sum(1 for _ in container.decode(video=0))
        except av.error.FFmpegError as err:
            raise MediaError(f"{p}: corrupt video ({err})") from err


def load_video_frames(source: str | Path | list[str | Path], num_frames: int = 8) -> list[Image.Image]:
    """Exactly `num_frames` RGB frames from a list of frame files (original format) or a video file.

    Both sources use `frame_indices`: the original's i * (total // num_frames), so a list of 8 frames is
    used as given; a shorter list repeats each frame evenly (the mean over frames is then unchanged).
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("video: empty list of frame files")
        return [load_image(source[i]) for i in frame_indices(len(source), num_frames)]
    p = _checked_file(source)
    frames = _decode_frames(p, frame_indices(_count_frames(p), num_frames))
    if len(frames) < num_frames:  # the declared frame count was too high
        total = _count_frames(p, trust_header=False)
        if total == 0:
            raise MediaError(f"{p}: video has no frames")
        frames = _decode_frames(p, frame_indices(total, num_frames))
    return frames


# ---------------------------------------------------------------- audio


def _mono_resampled(data: np.ndarray, rate: int, sample_rate: int, name: str) -> np.ndarray:
    """[channels, n] or [n] float audio at `rate` -> mono float32 at `sample_rate` (exact rational ratio)."""
    wave = data.mean(axis=0) if data.ndim == 2 else data
    if wave.size == 0:
        raise MediaError(f"{name}: audio has zero duration")
    if rate != sample_rate:
        from scipy.signal import resample_poly  # only when the rate differs

        g = math.gcd(int(rate), int(sample_rate))
        wave = resample_poly(wave, sample_rate // g, int(rate) // g)
    return np.ascontiguousarray(wave, dtype=np.float32)


def _decode_audio_av(p: Path) -> tuple[np.ndarray, int] | None:
    """[channels, n] float32 audio of the first audio stream and its rate, or None without one."""
    av = _pyav()
    with _open_container(p) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")
        parts, rate = [], stream.rate
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray())
                    rate = out.sample_rate
            for out in resampler.resample(None):
                parts.append(out.to_ndarray())
        except av.error.FFmpegError as err:
            raise MediaError(f"{p}: corrupt audio stream ({err})") from err
    if not parts:
        return np.zeros((1, 0), np.float32), rate
    return np.concatenate(parts, axis=1), rate


def waveform_from_array(data: np.ndarray, rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio at `sample_rate` from an array in memory: [n] or [channels, n] at `rate`."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim not in (1, 2):
        raise MediaError(f"audio array: expected [samples] or [channels, samples], got shape {data.shape}")
    return _mono_resampled(data, rate, sample_rate, "audio array")


def load_audio_track(video_path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """The soundtrack of a video file as mono float32 at `sample_rate`, or None if it has none."""
    p = _checked_file(video_path)
    decoded = _decode_audio_av(p)
    if decoded is None:
        return None
    return _mono_resampled(decoded[0], decoded[1], sample_rate, str(p))


def _check_wav_complete(p: Path) -> None:
    """A RIFF/WAVE file whose ``data`` chunk is shorter than its header declares is truncated (soundfile
    would silently read the part that is there)."""
    with p.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return
        size = p.stat().st_size
        while len(chunk := f.read(8)) == 8:
            declared = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                held = size - f.tell()
                if 0 < held < declared and declared != 0xFFFFFFFF:  # 0xFFFFFFFF: length unknown (streamed)
                    raise MediaError(f"{p}: truncated WAV: its header declares {declared} bytes of audio, "
                                     f"the file holds {held}")
                return
            f.seek(declared + declared % 2, io.SEEK_CUR)


def load_waveform(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio at `sample_rate`: soundfile for wav/flac/ogg/mp3, PyAV for other containers."""
    p = _checked_file(path)
    _check_wav_complete(p)
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
        return _mono_resampled(data.T, rate, sample_rate, str(p))
    except sf.SoundFileError as sf_err:
        try:
            decoded = _decode_audio_av(p)
        except MediaError as av_err:
            raise MediaError(f"{p}: not a readable audio file (soundfile: {sf_err}; {av_err})") from av_err
    if decoded is None:
        raise MediaError(f"{p}: has no audio stream")
    return _mono_resampled(decoded[0], decoded[1], sample_rate, str(p))


def is_silent(wave: np.ndarray, peak: float = SILENCE_PEAK) -> bool:
    """True when no sample of `wave` reaches `peak` (digital silence or near it)."""
    return wave.size == 0 or float(np.max(np.abs(wave))) < peak


def num_chunks(n_samples: int, chunk_samples: int) -> int:
    """How many chunks `split_into_chunks` makes of `n_samples` (before any cap)."""
    return max(1, math.ceil(n_samples / chunk_samples))


def split_into_chunks(
    wave: np.ndarray,
    chunk_samples: int,
    max_chunks: int | None = None,
    *,
    source: str | Path = "audio",
) -> list[np.ndarray]:
    """The original's speech chunking of 16 kHz `wave`: full chunks while more than one chunk remains,
    then the remainder (never an empty extra chunk).

    More than `max_chunks` chunks raises MediaError naming `source` and its duration (nothing is cut).
    """
    if wave.size == 0:
        raise MediaError(f"{source}: audio has zero duration")
    chunks, start = [], 0
    while wave.size - start > chunk_samples:
        chunks.append(wave[start : start + chunk_samples])
        start += chunk_samples
    chunks.append(wave[start:])
    if max_chunks is not None and len(chunks) > max_chunks:
        seconds = wave.size / SAMPLE_RATE
        limit = max_chunks * chunk_samples / SAMPLE_RATE
        raise MediaError(
            f"{source}: audio lasts {seconds:.1f} s ({len(chunks)} chunks of {chunk_samples / SAMPLE_RATE:g} s), "
            f"more than the {max_chunks} chunks ({limit:g} s) allowed"
        )
    return chunks


def audio_chunks(chunks: list[np.ndarray], chunk_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BEATs input: chunks padded to `chunk_samples` by repeating the last sample (the original's rule).

    Returns waveforms [n, chunk_samples] float32 and a padding mask [n, chunk_samples], True where padded.
    """
    waves = torch.zeros(len(chunks), chunk_samples)
    mask = torch.zeros(len(chunks), chunk_samples, dtype=torch.bool)
    for i, chunk in enumerate(chunks):
        n = len(chunk)
        if n == 0 or n > chunk_samples:
            raise ValueError(f"chunk {i} has {n} samples; expected 1..{chunk_samples}")
        waves[i, :n] = torch.from_numpy(np.asarray(chunk, dtype=np.float32))
        waves[i, n:] = float(chunk[-1])
        mask[i, n:] = True
    return waves, mask
