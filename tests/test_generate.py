"""Batched KV-cached generation: left padding, position ids and cache with media spliced on prefill."""

from __future__ import annotations

import json

import pytest
import torch

from Uni_MoE.checkpoint.loader import load_model
from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.data.collate import collate
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.data.synthetic import make_dataset
from Uni_MoE.serve.generate import (
    GenerationSettings,
    build_chat_sample,
    cut_at_stop,
    generate_batch,
    generate_token_ids,
    to_samples,
)

TASKS = ["image_colour", "speech_word", "audio_class", "video_sound", "image_speech"]
GREEDY = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny MoE model, and one record per modality mix with prompts of different lengths + a text one."""
    root = tmp_path_factory.mktemp("gen")
    model, tokenizer = load_model(build_tiny(root / "model", moe=True), "cpu")
    records = json.loads(make_dataset(root / "data", 1, seed=3, split="test", tasks=TASKS).read_text())
    for i, rec in enumerate(records):
        rec["conversations"][0]["value"] += " Please answer." * (3 * i)
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Say a colour."}]})
    return model, tokenizer, records, root / "data"


def _items(model, tokenizer, records, data_root):
    dataset = UniMoEDataset(to_samples(records, "speech"), tokenizer, model.config, data_root, for_generation=True)
    return [dataset[i] for i in range(len(dataset))]


def test_cut_at_stop():
    assert cut_at_stop(" red</s> and more", ["</s>", "###"]) == "red"
    assert cut_at_stop("a ### b </s>", ["</s>", "###"]) == "a"
    assert cut_at_stop(" plain ", []) == "plain"


def test_temperature_zero_means_greedy():
    kwargs = GenerationSettings(do_sample=True, temperature=0.0).generate_kwargs()
    assert kwargs["do_sample"] is False and kwargs["use_cache"] is True
    sampled = GenerationSettings(do_sample=True, temperature=0.2, top_p=0.9).generate_kwargs()
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.2 and sampled["top_p"] == 0.9


def test_batched_greedy_matches_one_by_one(tiny):
    """Mixed modalities and prompt lengths in one left-padded batch give each sample's solo tokens."""
    model, tokenizer, records, data_root = tiny
    items = _items(model, tokenizer, records, data_root)
    lengths = [len(it["input_ids"]) for it in items]
    assert len(set(lengths)) == len(lengths)  # every row of the batch is padded differently
    with torch.inference_mode():
        batched = generate_token_ids(model, tokenizer, collate(items, tokenizer.pad_token_id, "left"), GREEDY)
        for row, item in zip(batched, items):
            alone = generate_token_ids(model, tokenizer, collate([item], tokenizer.pad_token_id, "left"), GREEDY)[0]
            n = len(alone)
            assert row[:n].tolist() == alone.tolist()
            assert (row[n:] == tokenizer.pad_token_id).all()
    assert len({tuple(r.tolist()) for r in batched}) > 1  # replies depend on the inputs


def test_cached_greedy_matches_uncached(tiny):
    """KV cache with media spliced on prefill only == recomputing everything every step (the original)."""
    model, tokenizer, records, data_root = tiny
    items = _items(model, tokenizer, records[-2:], data_root)  # image+speech, and text only
    batch = {k: v for k, v in collate(items, tokenizer.pad_token_id, "left").items()
             if k not in ("labels", "modality", "sample_index")}
    with torch.inference_mode():
        outs = [model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=cache,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
                for cache in (True, False)]
    assert outs[0].tolist() == outs[1].tolist()


def test_generate_batch_keeps_input_order_across_batches(tiny):
    model, tokenizer, records, data_root = tiny
    picked = [records[0], records[-1], records[1]]
    together = generate_batch(model, tokenizer, picked, GREEDY, data_root=data_root, batch_size=2)
    reversed_ = generate_batch(model, tokenizer, picked[::-1], GREEDY, data_root=data_root, batch_size=2)
    assert together == reversed_[::-1]
    assert all(isinstance(r, str) for r in together)


def test_stop_string_cuts_the_reply(tiny):
    model, tokenizer, records, data_root = tiny
    free = generate_batch(model, tokenizer, [records[0]], GREEDY, data_root=data_root)[0]
    words = free.split()
    assert len(words) >= 2, free
    stop = words[1]
    cut = generate_batch(model, tokenizer, [records[0]], GREEDY.with_overrides(stop=(stop,)), data_root=data_root)[0]
    assert cut == free[: free.find(stop)].strip()


def test_sampling_is_repeatable_with_a_seed(tiny):
    model, tokenizer, records, data_root = tiny
    sampled = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5)
    runs = [generate_batch(model, tokenizer, records[:2], sampled, data_root=data_root, seed=7) for _ in range(2)]
    assert runs[0] == runs[1]


def test_build_chat_sample_puts_media_in_the_first_turn(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("b.jpg", "a.jpg", "notes.txt"):
        (frames / name).write_bytes(b"")
    rec = build_chat_sample("and now?", image="x.png", speech="q.wav", video=str(frames),
                            history=[("what is it?", "a cat")])
    assert rec["image"] == "x.png" and rec["speech"] == ["q.wav"]
    assert rec["video"] == [str(frames / "a.jpg"), str(frames / "b.jpg")]
    assert [t["from"] for t in rec["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert rec["conversations"][0]["value"] == "<image>\n<speech>\n<video>\nwhat is it?"
    assert rec["conversations"][1]["value"] == "a cat" and rec["conversations"][3]["value"] == ""


def test_beams_of_a_multi_window_sample_all_see_its_whole_speech(tiny, tmp_path):
    """With beams, every copy of a sample gets all its speech windows in order (not window 1 twice)."""
    model, tokenizer, _, _ = tiny
    rec = json.loads(make_dataset(tmp_path, 1, seed=5, split="test", tasks=["speech_long"],
                                  long_speech_seconds=6.0).read_text())
    (item,) = _items(model, tokenizer, rec, tmp_path)
    assert item["input_features"].shape[0] == 2  # two 4 s windows
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].clone()), with_kwargs=True)
    try:
        with torch.inference_mode():
            generate_token_ids(model, tokenizer, collate([item], tokenizer.pad_token_id, "left"),
                               GenerationSettings(max_new_tokens=2, num_beams=2))
    finally:
        hook.remove()
    prefill = seen[0]
    assert prefill.shape[0] == 2
    torch.testing.assert_close(prefill[0], prefill[1])
    alone = model.model.embed_multimodal(item["input_ids"][None], input_features=item["input_features"])
    torch.testing.assert_close(prefill[0], alone[0])
