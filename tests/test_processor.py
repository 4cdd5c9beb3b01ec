"""UniMoEProcessor: AutoProcessor on the tiny default, the inputs it makes against transforms written out by
hand (CLIP resize/crop/normalise, Whisper windows, repeat-last sound windows, frame sampling), and the
dataset, which goes through it."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, WhisperFeatureExtractor

import Uni_MoE
from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.data.conversation import SYSTEM
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.data.schema import load_samples
from Uni_MoE.processing_uni_moe import CLIP_MEAN, CLIP_STD, CLIPImageProcessorPil, UniMoEProcessor

SAMPLES = Path(__file__).resolve().parents[1] / "data_sample" / "samples.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def processor(tiny):
    return AutoProcessor.from_pretrained(tiny)


def _clip_by_hand(img: Image.Image, size: int) -> torch.Tensor:
    """Shortest side to `size` (bicubic), centre crop, /255, CLIP mean/std: CLIP's preprocessing."""
    w, h = img.size
    scale = size / min(w, h)
    new = (size, int(h * scale)) if w <= h else (int(w * scale), size)
    img = img.convert("RGB").resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    x = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def _windows(wave: np.ndarray, n: int) -> list[np.ndarray]:
    """Consecutive n-sample windows, the last one shorter (the original's speech split)."""
    return [wave[i:i + n] for i in range(0, len(wave), n)]


def _prompt_ids(tokenizer, before: str, runs: list[tuple[int, int]], after: str) -> list[int]:
    ids = [tokenizer.bos_token_id] + tokenizer(before, add_special_tokens=False)["input_ids"]
    for i, (token, count) in enumerate(runs):
        ids += [token] * count + (tokenizer("\n", add_special_tokens=False)["input_ids"] if i < len(runs) - 1 else [])
    return ids + tokenizer(after, add_special_tokens=False)["input_ids"]


def test_auto_classes_load_model_and_processor_from_the_saved_folder(tiny, processor):
    assert json.loads((tiny / "processor_config.json").read_text())["processor_class"] == "UniMoEProcessor"
    assert type(processor) is UniMoEProcessor
    assert type(AutoModelForCausalLM.from_pretrained(tiny)) is Uni_MoE.UniMoEForCausalLM
    config = Uni_MoE.UniMoEConfig.from_pretrained(tiny)
    assert processor.placeholder_ids() == config.placeholder_token_ids()
    assert (processor.tokens_per_visual, processor.query_tokens_size, processor.num_frames) == (64, 8, 8)
    assert processor.feature_extractor.n_samples == config.speech_chunk_samples() == 64000
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)


def test_folder_saved_without_processor_gets_it_from_config(tiny, tmp_path, processor):
    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    (bare / "processor_config.json").unlink()
    rebuilt = AutoProcessor.from_pretrained(bare)
    assert type(rebuilt) is UniMoEProcessor and rebuilt.to_dict() == processor.to_dict()
    rebuilt.save_pretrained(tmp_path / "again")
    assert AutoProcessor.from_pretrained(tmp_path / "again", num_frames=4).num_frames == 4


def test_chat_template_is_vicuna_v1(processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Hi?"}]},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And?"}]
    expected = f"{SYSTEM} USER: <image>\nHi? ASSISTANT: Red.</s>USER: And? ASSISTANT:"
    assert processor.apply_chat_template(messages) == expected
    schema = [{"from": "human", "value": "<speech>\nQ"}, {"from": "gpt", "value": ""}]
    assert processor.apply_chat_template(schema) == f"{SYSTEM} USER: <speech>\nQ ASSISTANT:"
    with pytest.raises(ValueError, match="role 'tool'"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])


def test_image_speech_sound_video_against_transforms_by_hand(processor):
    samples = {s.id: s for s in load_samples(SAMPLES)}
    root, tok, ids = SAMPLES.parent, processor.tokenizer, processor.placeholder_ids()

    image = root / samples["samples_image_colour_00000"].images[0]
    out = processor(text=f"{SYSTEM} USER: <image>\nWhat colour? ASSISTANT:", images=[str(image)])
    assert torch.equal(out["pixel_values"][0], _clip_by_hand(Image.open(image), 64))
    assert out["input_ids"][0].tolist() == _prompt_ids(tok, f"{SYSTEM} USER: ", [(ids["image"], 64)],
                                                       "\nWhat colour? ASSISTANT:")

    speech = root / samples["samples_speech_word_00000"].speech[0]
    wave, rate = sf.read(speech, dtype="float32")
    assert rate == 16000 and wave.ndim == 1
    windows = [np.pad(w, (0, 64000 - len(w))) for w in _windows(wave, 64000)]
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=4)
    expected = torch.from_numpy(extractor(windows, sampling_rate=16000, return_tensors="np")["input_features"])
    out = processor(text="<speech>\nWord?", speech=[str(speech)])
    assert torch.equal(out["input_features"], expected)
    assert (out["input_ids"] == ids["speech"]).sum() == 8 * len(windows)

    sound = root / samples["samples_audio_class_00000"].audio[0]
    wave, _ = sf.read(sound, dtype="float32")
    out = processor(text="<audio>\nWhat sound?", audio=[{"array": wave, "sampling_rate": 16000}])
    windows = _windows(wave, 64000)
    expected = torch.stack([torch.from_numpy(np.pad(w, (0, 64000 - len(w)), mode="edge")) for w in windows])
    assert torch.equal(out["input_values"], expected) and int(out["padding_mask"].sum()) == expected.numel() - len(wave)
    tail = len(windows[-1])
    assert bool(out["padding_mask"][-1, tail:].all()) and not out["padding_mask"][-1, :tail].any()
    assert (out["input_ids"] == ids["audio"]).sum() == 8 * len(windows)

    frames = [root / f for f in samples["samples_video_colour_00000"].videos[0]]
    out = processor(text="<video>\nColour?", videos=[[str(f) for f in frames]])
    step = len(frames) // 8
    expected = torch.stack([_clip_by_hand(Image.open(frames[i * step]), 64) for i in range(8)])
    assert out["pixel_values_videos"].shape == (1, 8, 3, 64, 64)
    assert torch.equal(out["pixel_values_videos"][0], expected)


def test_processor_output_equals_the_dataset_item_for_every_sample(tiny, processor):
    """The prompt path (``apply_chat_template`` + ``processor(...)``) gives the same ids and tensors as the
    dataset's conversation path, for image, speech, sound, video and mixed samples."""
    config = Uni_MoE.UniMoEConfig.from_pretrained(tiny)
    samples = load_samples(SAMPLES)
    dataset = UniMoEDataset(samples, processor.tokenizer, config, data_root=SAMPLES.parent, for_generation=True)
    seen = set()
    for i, sample in enumerate(samples):
        if sample.modality in seen:
            continue
        seen.add(sample.modality)
        item = dataset[i]
        path = lambda p: str(SAMPLES.parent / p)  # noqa: E731
        videos = [[path(f) for f in v] if isinstance(v, list) else path(v) for v in sample.videos]
        question = sample.conversations[:-1]  # what the dataset keeps for generation
        out = processor(text=processor.apply_chat_template(question), images=[path(p) for p in sample.images],
                        videos=videos, speech=[path(p) for p in sample.speech],
                        audio=[{"path": path(p)} for p in sample.audio])
        assert out["input_ids"][0].tolist() == item["input_ids"].tolist(), sample.id
        for key in ("pixel_values", "pixel_values_videos", "input_features", "input_values", "padding_mask"):
            assert (key in out) == (key in item), (sample.id, key)
            if key in item:
                assert torch.equal(out[key], item[key]), (sample.id, key)
    assert seen >= {"image", "speech", "audio", "video", "image+speech", "video+audio"}


def test_batch_is_left_padded_and_media_follow_placeholders(processor):
    img = Image.new("RGB", (70, 90), (10, 200, 30))
    out = processor(text=["<image>\nA long question here?", "Q?", "<image>\nB?"], images=[img, img.rotate(90)])
    mask = out["attention_mask"]
    assert mask[:, -1].tolist() == [1, 1, 1] and mask[1].sum() < mask[0].sum()
    assert out["pixel_values"].shape == (2, 3, 64, 64)
    assert not torch.equal(out["pixel_values"][0], out["pixel_values"][1])
    with pytest.raises(ValueError, match=r"prompt 1: 1 <image> placeholder\(s\) but only 0"):
        processor(text=["<image>", "<image>"], images=[img])
    with pytest.raises(ValueError, match="without placeholders"):
        processor(text="no media", images=[img])


def test_pad_aspect_fills_with_the_mean_colour(processor):
    padded = UniMoEProcessor.from_pretrained(processor_folder(processor), image_aspect_ratio="pad")
    out = padded.image(Image.new("RGB", (32, 64), (255, 0, 0))).numpy()
    fill = np.array([int(m * 255) for m in CLIP_MEAN]) / 255.0
    np.testing.assert_allclose(out[:, 32, 0], (fill - CLIP_MEAN) / CLIP_STD, atol=1e-6)
    np.testing.assert_allclose(out[:, 32, 32], (np.array([1.0, 0, 0]) - CLIP_MEAN) / CLIP_STD, atol=1e-6)


def processor_folder(processor) -> Path:
    return Path(processor.tokenizer.name_or_path)


def test_multi_turn_prompt_ids_equal_the_conversation_ids(processor):
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "And the shape?"}]
    out = processor(text=processor.apply_chat_template(turns), images=[Image.new("RGB", (64, 64))])
    ids, _ = processor.tokenize_conversation(turns, {"image": [64]}, for_generation=True)
    assert out["input_ids"][0].tolist() == ids
    assert processor.tokenizer.eos_token_id in ids  # the first answer's </s> is a token, not text


def test_readme_example_runs(tiny, monkeypatch, capsys):
    readme = (SAMPLES.parents[1] / "README.md").read_text()
    block = re.search(r"## Transformers Auto classes.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(SAMPLES.parents[1])
    exec(compile(block.replace('"checkpoint/tiny"', repr(str(tiny))), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert f"{SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT:\n" in printed
    reply = printed.strip().splitlines()[-1]
    assert reply.startswith("['") and reply.endswith("']")
