"""Small, learnable multimodal data in the original JSON schema, made locally from nothing.

Every answer is one closed-set word decided by the media (a shape's colour, a spoken word, a tone), so a
tiny model trained on CPU for minutes can show held-out accuracy far above chance for every modality.
Speech comes from espeak-ng; shapes, tones and videos are drawn with PIL, numpy and PyAV.

Placeholders follow this project's convention: images `<image>`, videos `<video>`, speech files
`"speech": [...]` with `<speech>`, non-speech sounds `"audio": [...]` with `<audio>`. With
`original_schema=True` both kinds go to `"voice"` with `<audio>`, as in the original release.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from .synthetic_tasks import COLOURS, SHAPES, TASK_CHOICES

SAMPLE_RATE = 16000
NUM_FRAMES = 8
VIDEO_FPS = 8

FILLERS = ("one", "two", "three", "four", "five", "six")
SPOKEN_QUESTIONS = {"colour": "what colour is the shape", "shape": "what shape is it"}
ESPEAK_SPEEDS = (130, 160, 190)
ESPEAK_PITCHES = (30, 50, 70)

TASK_PROMPTS = {
    "image_colour": "<image>\nWhat colour is the shape?",
    "image_shape": "<image>\nWhat shape is in the picture?",
    "speech_word": "<speech>\nWhat word is spoken in the audio?",
    "speech_long": "<speech>\nWhat is the first word spoken in the audio?",
    "image_speech": "<image>\n<speech>\nAnswer the spoken question.",
    "audio_class": "<audio>\nWhat sound is this?",
    "video_colour": "<video>\nWhat colour is the moving shape?",
    "video_sound": "<video>\n<audio>\nWhat sound plays in the video?",
}


# ---------------------------------------------------------------- pictures


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = int(rng.integers(60, 200))
    return tuple(int(np.clip(grey + rng.integers(-8, 9), 0, 255)) for _ in range(3))


def _jittered(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])


def draw_shape(
    size: int,
    shape: str,
    fill: tuple[int, int, int],
    background: tuple[int, int, int],
    centre: Sequence[float],
    radius: float,
) -> Image.Image:
    """One filled shape on a plain background."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def _random_placement(rng: np.random.Generator, size: int) -> tuple[tuple[float, float], float]:
    radius = size * rng.uniform(0.18, 0.32)
    centre = tuple(rng.uniform(radius, size - radius, 2))
    return centre, radius


def random_shape_image(rng: np.random.Generator, size: int, colour: str, shape: str) -> Image.Image:
    """A shape of the given colour and kind at a random position and size."""
    centre, radius = _random_placement(rng, size)
    return draw_shape(size, shape, _jittered(colour, rng), _background(rng), centre, radius)


def moving_shape_frames(rng: np.random.Generator, size: int, colour: str, n: int = NUM_FRAMES) -> list[Image.Image]:
    """`n` frames of one shape of the given colour moving in a straight line."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = size * rng.uniform(0.15, 0.25)
    start, end = rng.uniform(radius, size - radius, (2, 2))
    fill, background = _jittered(colour, rng), _background(rng)
    return [draw_shape(size, shape, fill, background, start + (end - start) * k / (n - 1), radius) for k in range(n)]


# ---------------------------------------------------------------- sounds


def _fade(wave: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    n = min(int(seconds * SAMPLE_RATE), wave.size // 2)
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    wave[:n] *= ramp
    wave[wave.size - n :] *= ramp[::-1]
    return wave


def sound_wave(rng: np.random.Generator, kind: str, seconds: float) -> np.ndarray:
    """A non-speech sound at 16 kHz: hum (~220 Hz), whistle (~1760 Hz), white noise, or 880 Hz beeps."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    jitter = rng.uniform(0.96, 1.04)
    if kind == "hum":
        wave = np.sin(2 * np.pi * 220 * jitter * t)
    elif kind == "whistle":
        wave = np.sin(2 * np.pi * 1760 * jitter * t)
    elif kind == "noise":
        wave = np.clip(rng.normal(0.0, 0.35, t.size), -1, 1)
    elif kind == "beeps":
        gate = (np.floor(t * rng.uniform(3, 6) * 2) % 2 == 0).astype(float)
        wave = np.sin(2 * np.pi * 880 * jitter * t) * gate
    else:
        raise ValueError(f"unknown sound {kind!r}")
    wave = rng.uniform(0.3, 0.8) * wave + rng.normal(0.0, 0.003, t.size)
    return _fade(wave.astype(np.float32))


@lru_cache(maxsize=512)
def espeak(text: str, speed: int = 160, pitch: int = 50) -> np.ndarray:
    """espeak-ng saying `text`, mono float32 at 16 kHz (cached: espeak is deterministic and the slow part)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("speech samples need espeak-ng (e.g. `apt-get install espeak-ng`)")
    run = subprocess.run([exe, "--stdout", "-s", str(speed), "-p", str(pitch), text], capture_output=True, check=True)
    wave, rate = sf.read(io.BytesIO(run.stdout), dtype="float32")
    from scipy.signal import resample_poly  # here, as in data.media: pictures and tones do not need SciPy

    wave = resample_poly(wave, SAMPLE_RATE, rate).astype(np.float32)  # 22050 Hz -> 16 kHz
    wave.flags.writeable = False
    return wave


def spoken(rng: np.random.Generator, texts: list[str], min_seconds: float = 0.0) -> np.ndarray:
    """One random voice (speed, pitch) saying `texts` in turn, repeating the last until `min_seconds`."""
    speed = int(rng.choice(ESPEAK_SPEEDS))
    pitch = int(rng.choice(ESPEAK_PITCHES))
    gap = np.zeros(int(0.1 * SAMPLE_RATE), np.float32)
    parts = [np.zeros(int(rng.uniform(0.0, 0.15) * SAMPLE_RATE), np.float32)]
    for text in texts:
        parts += [espeak(text, speed, pitch), gap]
    while sum(p.size for p in parts) < min_seconds * SAMPLE_RATE:
        parts += [espeak(str(rng.choice(FILLERS)), speed, pitch), gap]
    wave = np.concatenate(parts)
    wave = wave * (rng.uniform(0.5, 0.9) / max(float(np.abs(wave).max()), 1e-6))
    return (wave + rng.normal(0.0, 0.003, wave.size)).astype(np.float32)


# ---------------------------------------------------------------- files


def write_wav(path: Path, wave: np.ndarray) -> None:
    """16-bit mono wav at 16 kHz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16")


def write_mp4(path: Path, frames: list[Image.Image], soundtrack: np.ndarray | None, fps: int = VIDEO_FPS) -> None:
    """An H.264 (or MPEG-4) mp4 of `frames`, with an AAC mono 16 kHz soundtrack when given."""
    import av  # only videos need PyAV (FFmpeg)

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height = frames[0].size
        video.pix_fmt = "yuv420p"
        video.codec_context.thread_count = 1
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono") if soundtrack is not None else None
        for img in frames:
            container.mux(video.encode(av.VideoFrame.from_image(img)))
        container.mux(video.encode())
        if audio is not None:
            for start in range(0, soundtrack.size, 1024):
                piece = np.ascontiguousarray(soundtrack[start : start + 1024], dtype=np.float32)[None]
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = SAMPLE_RATE, start
                container.mux(audio.encode(frame))
            container.mux(audio.encode())


def _save_image(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))


def _save_frames(frames: list[Image.Image], folder: Path) -> list[Path]:
    paths = [folder / f"frame_{k:03d}.jpg" for k in range(len(frames))]
    for img, p in zip(frames, paths):
        _save_image(img, p)
    return paths


# ---------------------------------------------------------------- samples


def _balanced(rng: np.random.Generator, choices: list[str], n: int) -> list[str]:
    """`n` answers, each choice as often as possible, in random order."""
    return [choices[i] for i in rng.permutation(np.arange(n) % len(choices))]


def _make_task_samples(
    task: str,
    rng: np.random.Generator,
    n: int,
    folder: Path,
    size: int,
    original: bool,
    long_speech_seconds: float,
) -> list[tuple]:
    """(answer, media) per sample; media is a list of (kind, path or frame paths) in placeholder order."""
    samples = []
    for i, answer in enumerate(_balanced(rng, TASK_CHOICES[task], n)):
        stem = folder / f"{i:05d}"
        if task in ("image_colour", "image_shape"):
            colour = answer if task == "image_colour" else str(rng.choice(list(COLOURS)))
            shape = answer if task == "image_shape" else str(rng.choice(SHAPES))
            _save_image(random_shape_image(rng, size, colour, shape), stem.with_suffix(".png"))
            media = [("image", stem.with_suffix(".png"))]
        elif task in ("speech_word", "speech_long"):
            min_seconds = long_speech_seconds if task == "speech_long" else 0.0
            write_wav(stem.with_suffix(".wav"), spoken(rng, [answer], min_seconds))
            media = [("speech", stem.with_suffix(".wav"))]
        elif task == "image_speech":
            kind = "colour" if answer in COLOURS else "shape"
            colour = answer if kind == "colour" else str(rng.choice(list(COLOURS)))
            shape = answer if kind == "shape" else str(rng.choice(SHAPES))
            _save_image(random_shape_image(rng, size, colour, shape), stem.with_suffix(".png"))
            write_wav(stem.with_suffix(".wav"), spoken(rng, [SPOKEN_QUESTIONS[kind]]))
            media = [("image", stem.with_suffix(".png")), ("speech", stem.with_suffix(".wav"))]
        elif task == "audio_class":
            write_wav(stem.with_suffix(".wav"), sound_wave(rng, answer, rng.uniform(0.8, 1.5)))
            media = [("audio", stem.with_suffix(".wav"))]
        elif task == "video_colour":
            media = [("video", _save_frames(moving_shape_frames(rng, size, answer), stem))]
        elif task == "video_sound":
            frames = moving_shape_frames(rng, size, str(rng.choice(list(COLOURS))))
            track = sound_wave(rng, answer, len(frames) / VIDEO_FPS)
            if original:  # the original reads frame lists and a separate soundtrack file
                write_wav(stem.with_suffix(".wav"), track)
                media = [("video", _save_frames(frames, stem)), ("audio", stem.with_suffix(".wav"))]
            else:
                write_mp4(stem.with_suffix(".mp4"), frames, track)
                media = [("video", stem.with_suffix(".mp4")), ("audio", stem.with_suffix(".mp4"))]
        else:
            raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_CHOICES)}")
        samples.append((answer, media))
    return samples


def _record(sample_id: str, task: str, answer: str, media: list[tuple], root: Path, original: bool) -> dict:
    """One JSON entry in the original schema (plus `task` and `answer` for scoring)."""
    def rel(p):
        return [rel(q) for q in p] if isinstance(p, list) else p.relative_to(root).as_posix()

    text = TASK_PROMPTS[task]
    rec: dict = {"id": sample_id}
    for kind, path in media:
        if kind in ("image", "video"):
            rec[kind] = rel(path)
        else:
            rec.setdefault("voice" if original else kind, []).append(rel(path))
    if original:
        text = text.replace("<speech>", "<audio>")
    rec["conversations"] = [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
    rec["task"], rec["answer"] = task, answer
    return rec


def make_dataset(
    out_dir: Path,
    n_per_task: int,
    seed: int,
    split: str = "train",
    tasks: list[str] | None = None,
    image_size: int = 64,
    *,
    original_schema: bool = False,
    long_speech_seconds: float = 3.0,
) -> Path:
    """Write `out_dir/<split>.json` and its media under `out_dir/<split>/<task>/`; paths are relative to out_dir.

    Deterministic in (seed, split, task); `long_speech_seconds` is the least length of `speech_long`
    recordings, set it above the speech chunk length to exercise multi-chunk speech.
    """
    out_dir = Path(out_dir)
    tasks = list(TASK_CHOICES) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASK_CHOICES]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASK_CHOICES)}")
    records = []
    for task in tasks:
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), zlib.crc32(task.encode())])
        folder = out_dir / split / task
        samples = _make_task_samples(task, rng, n_per_task, folder, image_size, original_schema, long_speech_seconds)
        for i, (answer, media) in enumerate(samples):
            records.append(_record(f"{split}_{task}_{i:05d}", task, answer, media, out_dir, original_schema))
    path = out_dir / f"{split}.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: write a synthetic split, e.g. `--out data_sample --split samples --n_per_task 4`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="data root; gets <split>.json and <split>/")
    parser.add_argument("--n_per_task", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--tasks", nargs="+", choices=list(TASK_CHOICES), default=None)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--long_speech_seconds", type=float, default=3.0)
    parser.add_argument("--original_schema", action="store_true", help="write `voice` and <audio> for all sound")
    args = parser.parse_args(argv)
    path = make_dataset(
        args.out,
        args.n_per_task,
        args.seed,
        args.split,
        args.tasks,
        args.image_size,
        original_schema=args.original_schema,
        long_speech_seconds=args.long_speech_seconds,
    )
    print(f"wrote {len(json.loads(path.read_text()))} samples to {path}")


if __name__ == "__main__":
    main()
