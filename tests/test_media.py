"""Media loading: base64 images, video frames, soundtracks, waveforms, chunking, sound windows."""

import base64
import io
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from Uni_MoE.data.media import (
    MediaError,
    audio_chunks,
    frame_indices,
    load_audio_track,
    load_image,
    load_video_frames,
    load_waveform,
    num_chunks,
    split_into_chunks,
)
from Uni_MoE.data.synthetic import write_mp4


def _random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _peak_hz(wave: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(wave.size, 1 / rate)[spectrum.argmax()])


def _tone(hz: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


# ---------------------------------------------------------------- images


def test_load_image_from_file_and_base64(tmp_path):
    img = _random_image(20, 12)
    img.save(tmp_path / "a.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    encoded = base64.b64encode(buf.getvalue()).decode()
    assert len(encoded) >= 200
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), encoded, "data:image/png;base64," + encoded):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(img))


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (5, 5), 7).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (7, 7, 7)


# ---------------------------------------------------------------- video


def _grey_frames(n: int, size: int = 32) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (20 * k,) * 3) for k in range(n)]


def _frame_ids(frames: list[Image.Image]) -> list[int]:
    return [int(round(np.asarray(f, dtype=float).mean() / 20)) for f in frames]


def test_frame_indices_rule():
    assert frame_indices(8, 8) == list(range(8))
    assert frame_indices(17, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("n, expected", [(8, list(range(8))), (12, list(range(8))), (4, [0, 0, 1, 1, 2, 2, 3, 3])])
def test_video_frames_from_frame_list(tmp_path, n, expected):
    paths = []
    for k, img in enumerate(_grey_frames(n)):
        paths.append(tmp_path / f"f{k}.png")
        img.save(paths[-1])
    frames = load_video_frames([str(p) for p in paths], num_frames=8)
    assert len(frames) == 8 and _frame_ids(frames) == expected


def test_video_frames_and_soundtrack_from_mp4(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(path, _grey_frames(12), _tone(440, 1.5, 16000), fps=8)
    assert _frame_ids(load_video_frames(path, num_frames=4)) == [0, 3, 6, 9]
    assert len(load_video_frames(str(path))) == 8
    track = load_audio_track(path)
    assert track.dtype == np.float32 and abs(track.size - 24000) < 2048
    assert abs(_peak_hz(track) - 440) < 5
    np.testing.assert_array_equal(load_waveform(path), track)


def test_mp4_without_soundtrack(tmp_path):
    write_mp4(tmp_path / "silent.mp4", _grey_frames(8), None)
    assert load_audio_track(tmp_path / "silent.mp4") is None
    with pytest.raises(MediaError, match="silent.mp4.*no audio stream"):
        load_waveform(tmp_path / "silent.mp4")


# ---------------------------------------------------------------- waveforms


def test_waveform_resampling_keeps_frequency(tmp_path):
    sf.write(tmp_path / "tone.wav", _tone(1000, 1.0, 8000), 8000)
    wave = load_waveform(tmp_path / "tone.wav")
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    assert abs(_peak_hz(wave) - 1000) < 2


def test_waveform_downmix_and_odd_rate(tmp_path):
    left = _tone(300, 0.5, 22050)
    sf.write(tmp_path / "stereo.flac", np.stack([left, np.zeros_like(left)], axis=1), 22050)
    wave = load_waveform(tmp_path / "stereo.flac")
    assert wave.shape == (8000,)
    assert abs(np.abs(wave).max() - 0.25) < 0.01  # mean of the tone and silence


# ---------------------------------------------------------------- chunks and features


def test_split_into_chunks_counts():
    c = 100
    assert [x.size for x in split_into_chunks(np.ones(3 * c), c)] == [c, c, c]
    assert [x.size for x in split_into_chunks(np.ones(3 * c + 5), c)] == [c, c, c, 5]
    assert [x.size for x in split_into_chunks(np.ones(c - 1), c)] == [c - 1]
    assert num_chunks(3 * c, c) == 3 and num_chunks(3 * c + 5, c) == 4
    wave = np.arange(2 * c + 1)
    np.testing.assert_array_equal(np.concatenate(split_into_chunks(wave, c)), wave)


def test_split_into_chunks_cap_names_file_and_duration():
    wave = np.zeros(5 * 16000)
    with pytest.raises(MediaError, match=r"talk\.wav: audio lasts 5\.0 s \(3 chunks of 2 s\).*2 chunks \(4 s\)"):
        split_into_chunks(wave, 32000, max_chunks=2, source="talk.wav")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(split_into_chunks(wave, 32000, max_chunks=3)) == 3
    with pytest.raises(MediaError, match="zero duration"):
        split_into_chunks(np.zeros(0), 32000)


def test_audio_chunks_pad_by_repeating_last_sample():
    waves, mask = audio_chunks([np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 6.0])], 4)
    assert torch.equal(waves, torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 6.0, 6.0]]))
    assert torch.equal(mask, torch.tensor([[False] * 4, [False, False, True, True]]))
    with pytest.raises(ValueError, match="chunk 0 has 5 samples"):
        audio_chunks([np.ones(5)], 4)


# ---------------------------------------------------------------- bad files


def test_missing_and_empty_files_name_the_path(tmp_path):
    for loader in (load_image, load_waveform, load_video_frames, load_audio_track):
        with pytest.raises(MediaError, match=r"nope\.xyz: file not found"):
            loader(tmp_path / "nope.xyz")
    (tmp_path / "empty.wav").touch()
    with pytest.raises(MediaError, match=r"empty\.wav: file is empty"):
        load_waveform(tmp_path / "empty.wav")
    with pytest.raises(MediaError, match="empty list"):
        load_video_frames([])


def test_corrupt_files_name_the_path(tmp_path):
    (tmp_path / "speech.wav").write_text("this is not audio at all\n" * 10)
    with pytest.raises(MediaError, match=r"speech\.wav: not a readable audio file"):
        load_waveform(tmp_path / "speech.wav")
    good = io.BytesIO()
    _random_image(16, 16).save(good, format="PNG")
    (tmp_path / "broken.png").write_bytes(good.getvalue()[:60])
    with pytest.raises(MediaError, match=r"broken\.png: not a readable image"):
        load_image(tmp_path / "broken.png")
    (tmp_path / "clip.mp4").write_text("plain text")
    with pytest.raises(MediaError, match=r"clip\.mp4: not a readable media container"):
        load_video_frames(tmp_path / "clip.mp4")
    with pytest.raises(MediaError, match="not valid base64"):
        load_image("#" * 300)


def test_zero_length_audio(tmp_path):
    sf.write(tmp_path / "silence.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(MediaError, match=r"silence\.wav: (file is empty|audio has zero duration)"):
        load_waveform(tmp_path / "silence.wav")
