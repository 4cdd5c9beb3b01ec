"""Generation tokens/s: our batched KV-cached path (``serve.generate``) at batch 1 and 16 against one-by-one
decoding without our batching, in one process on the same weights and prompts.

Baselines: a plain greedy loop calling the model one sample at a time with its KV cache (HF-style), and
the same loop without a cache, which re-runs the whole prompt and the image encoder every token, as the
original v1 inference did (``use_cache=False``). Prompts: one image (CLIP patch tokens through the
mlp2x_gelu connector) plus questions of different lengths, so batches are left-padded.

    python benchmarks/generation.py --out generation.md     # LLaMA-7B width, 4 layers, 4 experts top-2, bf16, CUDA
    python benchmarks/generation.py --smoke                 # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from tqdm import tqdm

from Uni_MoE import presets
from Uni_MoE.checkpoint.tiny import tokenizer_corpus
from Uni_MoE.data.collate import collate
from Uni_MoE.data.conversation import tokenize_conversation
from Uni_MoE.data.tokenizer import train_tokenizer
from Uni_MoE.model.uni_moe import UniMoEForCausalLM
from Uni_MoE.serve.generate import GenerationSettings, generate_token_ids

QUESTION = "Describe the picture in detail."


@dataclass(frozen=True)
class Shapes:
    text: dict
    vision: dict
    num_experts: int
    samples: int
    new_tokens: int
    batch_sizes: tuple[int, ...]
    uncached_samples: int
    dtype: torch.dtype


FULL = Shapes(
    text={**presets.LLAMA_7B, "num_hidden_layers": 4, "vocab_size": 32000}, vision=presets.CLIP_L_336,
    num_experts=4, samples=32, new_tokens=64, batch_sizes=(1, 16), uncached_samples=4, dtype=torch.bfloat16,
)
SMOKE = Shapes(
    text={**presets.LLAMA_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1024},
    vision={**presets.CLIP_L_336, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    num_experts=4, samples=4, new_tokens=4, batch_sizes=(1, 4), uncached_samples=2, dtype=torch.float32,
)


def build(shapes: Shapes, device: torch.device):
    """Random-init model (MoE in every layer, top-2, CLIP + connector) and a locally trained tokenizer."""
    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size=1024)
    ids = {f"{m}_token_index": tokenizer.convert_tokens_to_ids(f"<{m}>") for m in ("image", "video", "audio", "speech")}
    config = presets.speech_v1(text_config=shapes.text, vision_config=shapes.vision, speech_config=None,
                               num_experts=shapes.num_experts, num_experts_per_tok=2, moe_layers="all", **ids)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(shapes.dtype)  # built in its dtype: no float32 copy of ~3B parameters
    try:
        with torch.device(device):
            model = UniMoEForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model, tokenizer


def prompts(model: UniMoEForCausalLM, tokenizer, n: int) -> list[dict]:
    """``n`` image questions of different lengths, tokenised with the image placeholder expanded."""
    vc = model.config.vision_config
    image_tokens = (vc.image_size // vc.patch_size) ** 2
    items = []
    for i in range(n):
        turns = [{"from": "human", "value": "<image>\n" + QUESTION + " Please be precise." * (i % 8)}]
        ids, labels = tokenize_conversation(tokenizer, turns, {"image": [image_tokens]},
                                            model.config.placeholder_token_ids(), for_generation=True)
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                      "pixel_values": torch.randn(1, 3, vc.image_size, vc.image_size)})
    return items


def timed(fn: Callable[[], list[list[int]]], device: torch.device) -> tuple[list[list[int]], float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def ours(model, tokenizer, items: list[dict], batch_size: int, new_tokens: int) -> list[list[int]]:
    """Our path: left-padded batches through ``generate_token_ids`` (HF generate with a KV cache)."""
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out: list[list[int]] = []
    for start in tqdm(range(0, len(items), batch_size), desc=f"ours, batch {batch_size}", leave=False):
        batch = collate(items[start:start + batch_size], tokenizer.pad_token_id, padding_side="left")
        out += generate_token_ids(model, tokenizer, batch, settings).tolist()
    return out


def cache_keyword() -> str:
    """The KV cache's keyword and output field in this transformers version ("past_key_values" before 5.18)."""
    return "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"


def plain_loop(model, tokenizer, items: list[dict], new_tokens: int, use_cache: bool) -> list[list[int]]:
    """One sample at a time, greedy argmax, no batching: with the KV cache, or re-running everything."""
    device, dtype, cache_kw = model.device, model.dtype, cache_keyword()
    out = []
    desc = "one-by-one, " + ("KV cache" if use_cache else "no cache")
    for item in tqdm(items, desc=desc, leave=False):
        ids = item["input_ids"][None].to(device)
        pixels = item["pixel_values"].to(device, dtype)
        step_ids, cache, tokens = ids, None, []
        for _ in range(new_tokens):
            kwargs = {cache_kw: cache} if cache is not None else {"pixel_values": pixels}
            logits = model(input_ids=step_ids, use_cache=use_cache, logits_to_keep=1, **kwargs)
            nxt = logits.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            if use_cache:
                cache = getattr(logits, cache_kw)
                step_ids = nxt
            else:
                ids = torch.cat([ids, nxt], dim=1)
                step_ids = ids
        out.append(tokens)
    return out


def run(shapes: Shapes, device: torch.device) -> tuple[list[dict], UniMoEForCausalLM, list[int]]:
    """Table rows (the cached loop first, as the baseline), the model, and the prompt lengths."""
    model, tokenizer = build(shapes, device)
    items = prompts(model, tokenizer, shapes.samples)
    with torch.inference_mode():
        ours(model, tokenizer, items[:2], 2, 2)  # warm-up
        plain_loop(model, tokenizer, items[:1], 2, True)
        reference, loop_s = timed(lambda: plain_loop(model, tokenizer, items, shapes.new_tokens, True), device)
        rows = [dict(path="one-by-one loop, KV cache (baseline)", batch=1, samples=len(items), seconds=loop_s,
                     tokens=len(items) * shapes.new_tokens, same=None)]
        k = shapes.uncached_samples
        if k:
            slow, slow_s = timed(lambda: plain_loop(model, tokenizer, items[:k], shapes.new_tokens, False), device)
            rows.append(dict(path="one-by-one loop, no cache (original v1)", batch=1, samples=k, seconds=slow_s,
                             tokens=k * shapes.new_tokens, same=sum(a == b for a, b in zip(slow, reference))))
        for bs in shapes.batch_sizes:
            got, s = timed(lambda: ours(model, tokenizer, items, bs, shapes.new_tokens), device)
            rows.append(dict(path="ours: batched, left-padded, KV cache", batch=bs, samples=len(items), seconds=s,
                             tokens=sum(map(len, got)), same=sum(a == b for a, b in zip(got, reference))))
    base = rows[0]["tokens"] / rows[0]["seconds"]
    for r in rows:
        r["tok_s"] = r["tokens"] / r["seconds"]
        r["speedup"] = r["tok_s"] / base
    return rows, model, [len(it["input_ids"]) for it in items]


def same_tokens(row: dict) -> str:
    return "-" if row["same"] is None else f"{row['same']}/{row['samples']}"


def report(rows: list[dict], shapes: Shapes, model: UniMoEForCausalLM, device: torch.device,
           lengths: list[int]) -> str:
    tc, vc = model.config.text_config, model.config.vision_config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    prompt_lens = f"{min(lengths)}-{max(lengths)} tokens, {(vc.image_size // vc.patch_size) ** 2} of them image"
    lines = [
        "# Generation throughput",
        "",
        f"- device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"date {datetime.date.today().isoformat()}",
        f"- model (random init): hidden {tc.hidden_size}, intermediate {tc.intermediate_size}, "
        f"{tc.num_attention_heads} heads, {tc.num_hidden_layers} layers, vocab {tc.vocab_size}, MoE "
        f"{model.config.num_experts} experts top-{model.config.num_experts_per_tok} in every layer; CLIP "
        f"{vc.hidden_size}x{vc.num_hidden_layers} layers at {vc.image_size}px + mlp2x_gelu; "
        f"{str(shapes.dtype).removeprefix('torch.')}",
        f"- prompts: {prompt_lens}; greedy, exactly {shapes.new_tokens} new tokens per sample",
        "- same tokens: samples whose greedy tokens equal the cached one-by-one loop's "
        "(bf16 batches may differ in the last bits)",
        "",
        "| path | batch | samples | new tokens | seconds | tokens/s | × baseline | same tokens |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['path']} | {r['batch']} | {r['samples']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} "
          f"| **{r['speedup']:.2f}** | {same_tokens(r)} |" for r in rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU")
    parser.add_argument("--new_tokens", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args(argv)
    shapes = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("new_tokens", args.new_tokens), ("samples", args.samples)) if v}
    shapes = Shapes(**{**shapes.__dict__, **overrides})
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    print(f"generation benchmark on {device}: {shapes.samples} samples x {shapes.new_tokens} tokens", flush=True)
    rows, model, lengths = run(shapes, device)
    text = report(rows, shapes, model, device, lengths)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
