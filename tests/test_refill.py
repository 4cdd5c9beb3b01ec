"""Finished rows refilled with waiting samples: the same greedy tokens as decoding each sample alone, in
one round or across rounds, and the same eval replies as batch-by-batch decoding."""

from __future__ import annotations

import json

import pytest
import torch

from Uni_MoE.checkpoint.loader import load_model
from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.data.collate import collate
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.data.synthetic import make_dataset
from Uni_MoE.serve import refill
from Uni_MoE.serve.engine import GenerationEngine, GenerationSettings
from Uni_MoE.serve.generate import iter_replies, to_samples

TASKS = ["image_colour", "speech_word", "image_speech"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny MoE model with its end-of-sequence logit raised so that answers end after 1 to 7 tokens,
    and a dataset of six mixed-modality questions of different lengths."""
    root = tmp_path_factory.mktemp("refill")
    model, tokenizer = load_model(build_tiny(root / "model", moe=True), "cpu")
    records = json.loads(make_dataset(root / "data", 2, seed=4, split="test", tasks=TASKS).read_text())
    for i, rec in enumerate(records):
        rec["conversations"][0]["value"] += " Please answer." * (i % 3)
    dataset = UniMoEDataset(to_samples(records, "speech"), tokenizer, model.config, root / "data",
                            for_generation=True)
    items = [dataset[i] for i in range(len(dataset))]
    with torch.inference_mode():
        batch = collate(items, tokenizer.pad_token_id, "left")
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "modality", "sample_index")}
        logits = model(**inputs).logits[:, -1]
    eos = tokenizer.eos_token_id
    bias = torch.zeros(logits.shape[-1])
    # the median gap: about half the answers end at once, the rest later; the margin keeps the median
    # sample's first step off an exact tie, which any rounding difference between batch shapes would flip
    bias[eos] = (logits.max(-1).values - logits[:, eos]).median() + 1e-2
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))
    yield model, tokenizer, dataset, items
    hook.remove()


SETTINGS = GenerationSettings(max_new_tokens=7)


@pytest.fixture(scope="module")
def alone(tiny) -> dict[int, list[int]]:
    """Each sample's greedy tokens decoded on its own (padding dropped)."""
    model, tokenizer, _, items = tiny
    engine, pad = GenerationEngine(model, tokenizer), tokenizer.pad_token_id
    out = {}
    for i, item in enumerate(items):
        new = engine.generate(collate([item], pad, "left"), SETTINGS)[0]
        out[i] = new[new != pad].tolist()
    return out


@pytest.mark.parametrize("longest_first", [True, False], ids=["one round", "new rounds"])
def test_refilled_rows_decode_as_each_sample_alone(tiny, alone, monkeypatch, longest_first):
    """Longest prompt first, every later sample joins the running round; shortest first, a longer prompt
    cannot join (it does not fit before the cache position), so new rounds start. Tokens are the same."""
    model, tokenizer, _, items = tiny
    assert len({len(tokens) for tokens in alone.values()}) > 1  # rows end at different steps
    joins, rounds = [], []
    join, start = refill._Round.join, refill._Round.__init__
    monkeypatch.setattr(refill._Round, "join", lambda self, rows, *a: joins.append(len(rows)) or join(self, rows, *a))
    monkeypatch.setattr(refill._Round, "__init__", lambda self, *a: rounds.append(1) or start(self, *a))
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]), reverse=longest_first)
    pad = tokenizer.pad_token_id
    got = {key: new[new != pad].tolist() for key, new in refill.generate_refilling(
        GenerationEngine(model, tokenizer), [(i, items[i]) for i in order], SETTINGS, 3,
        lambda its: collate(its, pad, "left"))}
    assert got == alone
    assert sum(joins) == len(items) and len(joins) > len(rounds)  # some samples joined a running round
    assert (len(rounds) == 1) == longest_first


def test_eval_replies_are_the_same_with_refilled_rows(tiny):
    model, tokenizer, dataset, _ = tiny
    settings = GenerationSettings(max_new_tokens=6)
    batched = dict(iter_replies(model, tokenizer, dataset, settings, batch_size=4))
    refilled = dict(iter_replies(model, tokenizer, dataset, settings, batch_size=4, refill_rows=True))
    assert refilled == batched and len(refilled) == len(dataset)


def test_beam_search_is_refused(tiny):
    model, tokenizer, _, items = tiny
    with pytest.raises(ValueError, match="beam"):
        next(refill.generate_refilling(GenerationEngine(model, tokenizer), [(0, items[0])],
                                       GenerationSettings(num_beams=2), 2, lambda its: collate(its, 0, "left")))
