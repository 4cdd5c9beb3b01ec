from pathlib import Path

import pytest
import torch

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.data.collate import collate
from Uni_MoE.data.conversation import IGNORE_INDEX
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.data.schema import load_samples
from Uni_MoE.data.tokenizer import load_tokenizer
from Uni_MoE.model.uni_moe import UniMoEForCausalLM

SAMPLES = Path(__file__).resolve().parents[1] / "data_sample" / "samples.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-moe", moe=True)
    return UniMoEForCausalLM.from_pretrained(path), load_tokenizer(path)


def test_sample_data_goes_through_dataset_collate_and_model(tiny):
    model, tokenizer = tiny
    samples = load_samples(SAMPLES)
    assert {s.modality for s in samples} >= {"image", "speech", "audio", "video", "image+speech"}
    ds = UniMoEDataset(samples, tokenizer, model.config, data_root=SAMPLES.parent)
    q = model.config.query_tokens_size
    ids = model.config.placeholder_token_ids()
    for i in range(0, len(ds), 3):
        item = ds[i]
        sample = samples[i]
        assert (item["input_ids"] == ids["image"]).sum() == 64 * len(sample.images)
        if sample.speech:
            windows = item["input_features"].shape[0]
            assert (item["input_ids"] == ids["speech"]).sum() == q * windows
        answer = sample.conversations[-1]["value"]
        target = item["labels"][item["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(target).replace(" ", "") == answer.replace(" ", "") + "</s>"

    picks = [0, 8, 16, 20, 24, 28]  # one sample of each media mix in samples.json, in file order
    batch = collate([ds[i] for i in picks], tokenizer.pad_token_id)
    assert batch.pop("modality") == ["image", "speech", "image+speech", "audio", "video", "video+audio"]
    assert batch.pop("sample_index") == picks
    assert batch["pixel_values"].shape[0] == 2 and batch["pixel_values_videos"].shape[0] == 2
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_left_padding_for_generation(tiny):
    model, tokenizer = tiny
    samples = load_samples(SAMPLES)[:3]
    ds = UniMoEDataset(samples, tokenizer, model.config, data_root=SAMPLES.parent, for_generation=True)
    batch = collate([ds[i] for i in range(3)], tokenizer.pad_token_id, padding_side="left")
    assert (batch["attention_mask"][:, -1] == 1).all()
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    assert batch["attention_mask"].sum(1).tolist() == lengths


def test_overlong_sample_is_reported_not_cut(tiny):
    model, tokenizer = tiny
    samples = load_samples(SAMPLES)[:1]
    ds = UniMoEDataset(samples, tokenizer, model.config, data_root=SAMPLES.parent, model_max_length=10)
    with pytest.raises(ValueError, match=r"sample 0 .*more than model_max_length=10"):
        ds[0]


def test_missing_media_names_the_sample_and_file(tiny, tmp_path):
    model, tokenizer = tiny
    from Uni_MoE.data.schema import parse_sample

    s = parse_sample({"id": "x7", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}, 0)
    ds = UniMoEDataset([s], tokenizer, model.config, data_root=tmp_path)
    with pytest.raises(ValueError, match=r"id x7.*nope\.png"):
        ds[0]
