"""Synthetic data: valid original-schema JSON, loadable media, determinism, and answers carried by the media."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from Uni_MoE.data.media import load_audio_track, load_image, load_video_frames, load_waveform
from Uni_MoE.data.synthetic import espeak, main, make_dataset
from Uni_MoE.data.synthetic_tasks import COLOURS, TASK_CHOICES

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="speech samples need espeak-ng")

N = 4
LONG_SECONDS = 2.5
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "speech": "<speech>", "audio": "<audio>"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("synthetic")
    path = make_dataset(root, N, seed=0, split="train", image_size=48, long_speech_seconds=LONG_SECONDS)
    assert path == root / "train.json"
    return root, json.loads(path.read_text())


def _by_task(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for rec in records:
        out.setdefault(rec["task"], []).append(rec)
    return out


def _shape_colour(img) -> str:
    """The palette colour nearest to the mean of the pixels that differ from the background."""
    x = np.asarray(img, dtype=float)
    background = x[0, 0] if np.abs(x[0, 0] - x[-1, -1]).max() < 30 else x[0, -1]
    mask = np.abs(x - background).max(axis=2) > 40
    mean = x[mask].mean(axis=0)
    return min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))


def _sound_class(wave: np.ndarray) -> str:
    spectrum = np.abs(np.fft.rfft(wave)) ** 2
    flatness = np.exp(np.mean(np.log(spectrum[1:] + 1e-12))) / np.mean(spectrum[1:])
    if flatness > 0.3:
        return "noise"
    peak = np.fft.rfftfreq(wave.size, 1 / 16000)[spectrum.argmax()]
    return {220: "hum", 880: "beeps", 1760: "whistle"}[min((220, 880, 1760), key=lambda f: abs(f - peak))]


def test_schema_and_files(dataset):
    root, records = dataset
    assert len(records) == N * len(TASK_CHOICES)
    assert len({r["id"] for r in records}) == len(records)
    for rec in records:
        human, gpt = rec["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert gpt["value"] == rec["answer"] and rec["answer"] in TASK_CHOICES[rec["task"]]
        assert "voice" not in rec
        for key, token in PLACEHOLDERS.items():
            expected = len(rec.get(key, [])) if key in ("speech", "audio") else int(key in rec)
            assert human["value"].count(token) == expected, rec["id"]
        if "image" in rec:
            assert load_image(root / rec["image"]).size == (48, 48)
        if "video" in rec:
            video = rec["video"]
            source = [root / p for p in video] if isinstance(video, list) else root / video
            assert len(load_video_frames(source)) == 8
        for p in rec.get("speech", []) + rec.get("audio", []):
            assert not Path(p).is_absolute()
            assert load_waveform(root / p).size > 8000


def test_answers_are_balanced(dataset):
    for task, recs in _by_task(dataset[1]).items():
        counts = [sum(r["answer"] == c for r in recs) for c in TASK_CHOICES[task]]
        assert max(counts) - min(counts) <= 1, task


def test_pictures_show_the_answer(dataset):
    root, records = dataset
    for rec in _by_task(records)["image_colour"]:
        assert _shape_colour(load_image(root / rec["image"])) == rec["answer"], rec["id"]
    for rec in _by_task(records)["video_colour"]:
        frames = load_video_frames([root / p for p in rec["video"]])
        assert {_shape_colour(f) for f in frames} == {rec["answer"]}, rec["id"]
        assert np.asarray(frames[0]).tobytes() != np.asarray(frames[-1]).tobytes()  # it moves


def test_sounds_carry_their_class(dataset):
    root, records = dataset
    by_task = _by_task(records)
    for rec in by_task["audio_class"]:
        assert _sound_class(load_waveform(root / rec["audio"][0])) == rec["answer"], rec["id"]
    for rec in by_task["video_sound"]:
        assert rec["video"].endswith(".mp4") and rec["audio"] == [rec["video"]]
        assert _sound_class(load_audio_track(root / rec["video"])) == rec["answer"], rec["id"]


def test_speech_is_audible_and_long_speech_is_long(dataset):
    root, records = dataset
    by_task = _by_task(records)
    for rec in by_task["speech_word"] + by_task["image_speech"] + by_task["speech_long"]:
        wave = load_waveform(root / rec["speech"][0])
        assert np.sqrt(np.mean(wave**2)) > 0.02, rec["id"]
    for rec in by_task["speech_long"]:
        assert load_waveform(root / rec["speech"][0]).size >= LONG_SECONDS * 16000
    words = [espeak(w) for w in TASK_CHOICES["speech_word"]]
    assert len({w.tobytes() for w in words}) == len(words)


def test_same_seed_same_data_other_seed_other_data(dataset, tmp_path):
    root, records = dataset
    tasks = ["image_shape", "speech_word", "audio_class"]
    again = json.loads(make_dataset(tmp_path / "a", N, seed=0, tasks=tasks, image_size=48).read_text())
    assert again == [r for r in records if r["task"] in tasks]
    for rec in again:
        for p in [rec.get("image")] + rec.get("speech", []) + rec.get("audio", []):
            if p:
                assert (tmp_path / "a" / p).read_bytes() == (root / p).read_bytes()
    other = json.loads(make_dataset(tmp_path / "b", N, seed=1, tasks=tasks, image_size=48).read_text())
    assert [r["answer"] for r in other] != [r["answer"] for r in again]


def test_original_schema(tmp_path):
    tasks = ["image_speech", "audio_class", "video_sound"]
    path = make_dataset(tmp_path, 2, seed=3, split="val", tasks=tasks, original_schema=True)
    for rec in json.loads(path.read_text()):
        text = rec["conversations"][0]["value"]
        assert "speech" not in rec and "audio" not in rec and "<speech>" not in text
        assert text.count("<audio>") == len(rec["voice"])
        for p in rec["voice"]:
            assert p.endswith(".wav") and load_waveform(tmp_path / p).size > 0
        if "video" in rec:
            assert isinstance(rec["video"], list) and len(rec["video"]) == 8


def test_cli_and_unknown_task(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n_per_task", "1", "--split", "samples", "--tasks", "image_colour"])
    assert "wrote 1 samples" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "samples.json").read_text())) == 1
    with pytest.raises(ValueError, match="unknown tasks"):
        make_dataset(tmp_path, 1, seed=0, tasks=["smell"])
