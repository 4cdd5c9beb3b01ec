"""The generation engine: the same greedy tokens as transformers' generate, placeholders never generated,
a reused static cache, streaming and cancellation, and length-ordered batches."""

from __future__ import annotations

import json

import pytest
import torch

from Uni_MoE.checkpoint.loader import load_model
from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.data.collate import collate
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.data.synthetic import make_dataset
from Uni_MoE.model.moe import EXPERT_IMPLEMENTATIONS
from Uni_MoE.serve.engine import GenerationEngine, GenerationSettings
from Uni_MoE.serve.generate import length_ordered_batches, to_samples

TASKS = ["image_colour", "speech_word", "image_speech"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny MoE model and a left-padded batch of mixed modalities with different prompt lengths."""
    root = tmp_path_factory.mktemp("engine")
    model, tokenizer = load_model(build_tiny(root / "model", moe=True), "cpu")
    records = json.loads(make_dataset(root / "data", 1, seed=4, split="test", tasks=TASKS).read_text())
    for i, rec in enumerate(records):
        rec["conversations"][0]["value"] += " Please answer." * (2 * i)
    dataset = UniMoEDataset(to_samples(records, "speech"), tokenizer, model.config, root / "data", for_generation=True)
    items = [dataset[i] for i in range(len(dataset))]
    return model, tokenizer, collate(items, tokenizer.pad_token_id, "left"), items


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "modality", "sample_index")}


def test_greedy_equals_transformers_generate(tiny):
    model, tokenizer, batch, _ = tiny
    engine = GenerationEngine(model, tokenizer)
    ours = engine.generate(batch, GenerationSettings(max_new_tokens=8, min_new_tokens=8))
    with torch.inference_mode():
        theirs = model.generate(**model_inputs(batch), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert ours.tolist() == theirs[:, batch["input_ids"].shape[1]:].tolist()
    assert len({tuple(row) for row in ours.tolist()}) > 1


def test_batch_of_one_takes_the_chosen_expert_path_and_equals_generate(tiny, monkeypatch):
    """One sequence at a time (the decoding steps run only the chosen experts): the same greedy tokens as
    transformers' generate on each sample alone."""
    model, tokenizer, _, items = tiny
    calls = []
    chosen = EXPERT_IMPLEMENTATIONS["chosen"]
    monkeypatch.setitem(EXPERT_IMPLEMENTATIONS, "chosen", lambda *args: calls.append(1) or chosen(*args))
    engine = GenerationEngine(model, tokenizer)
    for item in items:
        one = collate([item], tokenizer.pad_token_id, "left")
        ours = engine.generate(one, GenerationSettings(max_new_tokens=6, min_new_tokens=6))
        assert len(calls) == 5 * len(model.moe_mlps())  # the 5 steps after the prefill, in every MoE layer
        calls.clear()
        with torch.inference_mode():
            theirs = model.generate(**model_inputs(one), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        calls.clear()
        assert ours.tolist() == theirs[:, one["input_ids"].shape[1]:].tolist()


def text_batch(tokenizer, texts: list[str]) -> dict:
    """A left-padded batch of plain text prompts."""
    items = [{"input_ids": torch.tensor(tokenizer(t).input_ids)} for t in texts]
    return collate([it | {"labels": it["input_ids"]} for it in items], tokenizer.pad_token_id, "left")


def test_a_reused_static_cache_gives_the_same_tokens(tiny):
    """A second batch in the same cache bucket reuses the step (stale keys of the first, longer batch sit
    beyond its prompt) and decodes exactly as a fresh engine does."""
    model, tokenizer, _, _ = tiny
    settings = GenerationSettings(max_new_tokens=6, min_new_tokens=6)
    engine = GenerationEngine(model, tokenizer)
    engine.generate(text_batch(tokenizer, ["red green blue " * 6, "a circle", "what colour is it?"]), settings)
    first_step = engine._step
    short = text_batch(tokenizer, ["blue", "say a word", "square"])
    again = engine.generate(short, settings)
    assert engine._step is first_step
    assert again.tolist() == GenerationEngine(model, tokenizer).generate(short, settings).tolist()


@pytest.mark.parametrize("settings", [
    GenerationSettings(max_new_tokens=6, min_new_tokens=6),
    GenerationSettings(max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9),
    GenerationSettings(max_new_tokens=4, min_new_tokens=4, num_beams=2),
], ids=["greedy", "sampled", "beams"])
def test_placeholders_are_never_generated(tiny, settings):
    """A head biased so hard toward the placeholders that plain argmax always picks one: every decoding
    mode still answers (no 'placeholder tokens but no image inputs' error) and emits none of them."""
    model, tokenizer, _, _ = tiny
    batch = text_batch(tokenizer, ["Describe it.", "What colour is the square on the left?"])
    placeholders = sorted(model.config.placeholder_token_ids().values())
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[placeholders] = 1e4 + torch.arange(len(placeholders), dtype=torch.float)
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))
    try:
        with torch.inference_mode():
            logits = model(**model_inputs(batch)).logits[:, -1]
        assert set(logits.argmax(-1).tolist()) <= set(placeholders)
        torch.manual_seed(0)
        new = GenerationEngine(model, tokenizer).generate(batch, settings)
    finally:
        hook.remove()
    assert new.shape == (batch["input_ids"].shape[0], settings.max_new_tokens)
    assert not torch.isin(new, torch.tensor(placeholders)).any()


def test_streaming_and_cancelling(tiny):
    model, tokenizer, batch, _ = tiny
    one = text_batch(tokenizer, ["Tell me a long story."])
    seen: list[int] = []

    class Collect:
        def put(self, value: torch.Tensor) -> None:
            seen.extend(value.tolist())

        def end(self) -> None:
            seen.append(-1)

    settings = GenerationSettings(max_new_tokens=10, min_new_tokens=10)
    engine = GenerationEngine(model, tokenizer)
    full = engine.generate(one, settings, streamer=Collect())
    assert seen == full[0].tolist() + [-1]
    seen.clear()
    cut = engine.generate(one, settings, streamer=Collect(), should_stop=lambda: len(seen) >= 3)
    assert cut[0].tolist() == full[0, :3].tolist() and seen[-1] == -1


def test_length_ordered_batches():
    assert length_ordered_batches([5, 9, 1, 9, 3], 2) == [[1, 3], [0, 4], [2]]
