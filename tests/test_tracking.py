"""Training statistics: expert load per token modality and loss per sample modality equal the values worked
out token by token, and recording a micro-batch needs nothing from the device (it runs on meta tensors,
where any read of values or data-dependent shape fails)."""

import math
from types import SimpleNamespace

import pytest
import torch

from Uni_MoE.train.tracking import TOKEN_MODALITIES, RoutingTracker, expert_load, per_sample_loss, token_modality_ids

PLACEHOLDERS = {m: 100 + i for i, m in enumerate(TOKEN_MODALITIES[1:])}  # image 100, video 101, ...


def batch(seed: int = 0, layers: int = 3, experts: int = 4, k: int = 2):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 20, (2, 7), generator=g)
    input_ids[0, 1:3] = PLACEHOLDERS["image"]
    input_ids[1, 2] = PLACEHOLDERS["speech"]
    attention = torch.ones(2, 7, dtype=torch.long)
    attention[1, 5:] = 0  # padding
    routing = [torch.randint(0, experts, (2, 7, k), generator=g) for _ in range(layers)]
    return input_ids, attention, routing


def test_token_modality_ids():
    input_ids, attention, _ = batch()
    ids = token_modality_ids(input_ids, attention, PLACEHOLDERS)
    image, speech = TOKEN_MODALITIES.index("image"), TOKEN_MODALITIES.index("speech")
    assert ids[0].tolist() == [0, image, image, 0, 0, 0, 0]
    assert ids[1].tolist() == [0, 0, speech, 0, 0, -1, -1]


def test_expert_load_counts_each_token_and_choice():
    input_ids, attention, routing = batch()
    ids = token_modality_ids(input_ids, attention, PLACEHOLDERS)
    got = expert_load(routing, ids, 4)
    want = torch.zeros(3, len(TOKEN_MODALITIES), 4, dtype=torch.long)
    for layer, r in enumerate(routing):
        for b in range(2):
            for s in range(7):
                if attention[b, s]:
                    for e in r[b, s].tolist():
                        want[layer, ids[b, s], e] += 1
    assert torch.equal(got, want)
    assert int(got.sum()) == 3 * 12 * 2  # 12 real tokens, 2 choices each, 3 layers


def test_per_sample_loss_by_hand():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 2, -100, 4], [-100, -100, -100, -100]])
    got = per_sample_loss(logits, labels)
    logp = logits.log_softmax(-1)
    want = -(logp[0, 0, 2] + logp[0, 2, 4]) / 2  # targets at positions 1 and 3 are predicted from 0 and 2
    assert got[0].item() == pytest.approx(want.item(), rel=1e-6)
    assert math.isnan(got[1].item())  # no target in the row


def _outputs(logits, lm, aux):
    return SimpleNamespace(logits=logits, lm_loss=lm, aux_loss=aux)


def test_tracker_logs_means_and_shares():
    tracker = RoutingTracker(PLACEHOLDERS, num_experts=4, num_layers=3)
    input_ids, attention, routing = batch()
    labels = torch.full_like(input_ids, -100)
    labels[:, 4:6] = 7
    logits = torch.randn(2, 7, 20)
    modalities = ["image", "speech"]
    inputs = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    tracker.update(inputs, _outputs(logits, torch.tensor(2.0), torch.tensor(0.5)), modalities, routing)
    tracker.update(inputs, _outputs(logits, torch.tensor(4.0), None), modalities, routing)
    logs = tracker.pop_logs()
    assert logs["lm_loss"] == pytest.approx(3.0)
    assert logs["aux_loss"] == pytest.approx(0.5)
    rows = per_sample_loss(logits, labels)
    assert logs["loss/image"] == pytest.approx(rows[0].item(), rel=1e-6)
    assert logs["loss/speech"] == pytest.approx(rows[1].item(), rel=1e-6)
    ids = token_modality_ids(input_ids, attention, PLACEHOLDERS)
    counts = expert_load(routing, ids, 4).sum(dim=0)  # [M, E], the same in both micro-batches
    for i, m in enumerate(TOKEN_MODALITIES):
        total = int(counts[i].sum())
        for e in range(4):
            key = f"expert_load/{m}/e{e}"
            assert (key in logs) == bool(total)
            if total:
                assert logs[key] == pytest.approx(int(counts[i, e]) / total)
    assert logs["tokens_per_second_per_device"] > 0
    load = tracker.pop_load()
    assert torch.equal(load["image"], 2 * expert_load(routing, ids, 4)[:, TOKEN_MODALITIES.index("image")])
    assert int(tracker.pop_load()["text"].sum()) == 0  # emptied by the pop
    assert "lm_loss" not in tracker.pop_logs()  # so is the log window


def test_update_reads_nothing_back_from_the_device():
    tracker = RoutingTracker(PLACEHOLDERS, num_experts=4, num_layers=3)
    input_ids, attention, routing = batch()
    meta = {"input_ids": input_ids.to("meta"), "attention_mask": attention.to("meta"),
            "labels": input_ids.to("meta")}
    outputs = _outputs(torch.empty(2, 7, 20, device="meta"), torch.empty((), device="meta"),
                       torch.empty((), device="meta"))
    tracker.update(meta, outputs, ["image", "speech"], [r.to("meta") for r in routing])
    assert tracker.load.shape == (3, len(TOKEN_MODALITIES), 4)
