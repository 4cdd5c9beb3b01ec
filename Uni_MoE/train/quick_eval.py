"""Held-out accuracy per task of a trained checkpoint on closed-answer data (the synthetic tasks):
greedy generation, first word of the reply against the record's ``answer``, chance = 1 / #choices.

    python -m Uni_MoE.train.quick_eval --model output/stage3 --data_path data/test.json --data_root data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..data.dataset import UniMoEDataset
from ..data.schema import load_samples
from ..data.synthetic_tasks import synthetic_accuracy
from ..data.tokenizer import load_tokenizer
from ..model.uni_moe import UniMoEForCausalLM
from ..serve.generate import GenerationSettings, iter_replies


def predict(model: UniMoEForCausalLM, tokenizer: PreTrainedTokenizerBase, dataset: UniMoEDataset, batch_size: int,
            max_new_tokens: int) -> list[str]:
    """Greedy replies through the generation engine, in dataset order."""
    replies = [""] * len(dataset)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    for i, reply in iter_replies(model, tokenizer, dataset, settings, batch_size, progress="held-out generation"):
        replies[i] = reply
    return replies


def evaluate(model_dir: str, data_path: str, data_root: str | None, batch_size: int = 16,
             max_new_tokens: int = 4) -> dict[str, dict[str, float]]:
    """Per task: n, accuracy, chance."""
    model = UniMoEForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    samples = load_samples(data_path, model.config.voice_modality)
    missing = [s.id for s in samples if "answer" not in s.meta or "task" not in s.meta]
    if missing:
        raise KeyError(f"{data_path}: samples {missing[:3]} have no 'task'/'answer' field")
    dataset = UniMoEDataset(samples, tokenizer, model.config, data_root, for_generation=True)
    replies = predict(model, tokenizer, dataset, batch_size, max_new_tokens)
    per_task, _ = synthetic_accuracy([s.meta["task"] for s in samples], [str(s.meta["answer"]) for s in samples],
                                     replies)
    return per_task


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<16}{'n':>6}{'accuracy':>10}{'chance':>9}", "-" * 41]
    for task, r in results.items():
        lines.append(f"{task:<16}{r['n']:>6}{r['accuracy']:>10.2f}{r['chance']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="save_pretrained folder")
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--data_root", default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = evaluate(args.model, args.data_path, args.data_root, args.batch_size)
    print(format_table(results))
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
