"""Generation tokens/s, in one process on the same weights and prompts: our engine at batch 1 and 16, the
paths it replaces, the transformers dense anchor, and the weight-read floor.

Rows: our engine (``serve.engine``: static KV cache, CUDA-graph decode step, sync-free MoE decode path);
transformers' generate on our model (the previous path: dynamic cache, eager steps); a plain one-by-one
greedy loop calling the model with its KV cache (the baseline whose tokens the others are checked
against); optionally the same loop without a cache, as the original v1 decoded. The anchor is
transformers' dense ``LlamaForCausalLM`` of the same width and depth on random prompts of the typical
length, with the default dynamic cache and with ``cache_implementation="static"`` (compiled on a GPU).
The floor is the time to read, per decoding step, the weights a step needs (attention, the experts the
batch's tokens pick, the head) at the device's bandwidth. Prompts: one image (CLIP patch tokens through the
mlp2x_gelu connector) plus questions of different lengths, so batches are left-padded.

    python benchmarks/generation.py --out generation.md     # LLaMA-7B width, 4 layers, 4 experts top-2, bf16, CUDA
    python benchmarks/generation.py --smoke                 # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from Uni_MoE import presets
from Uni_MoE.checkpoint.tiny import tokenizer_corpus
from Uni_MoE.data.collate import collate
from Uni_MoE.data.conversation import tokenize_conversation
from Uni_MoE.data.tokenizer import train_tokenizer
from Uni_MoE.modalities import MEDIA_INPUT_KEYS
from Uni_MoE.model.uni_moe import UniMoEForCausalLM
from Uni_MoE.serve.engine import GenerationEngine, GenerationSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import device_name, emit_table  # noqa: E402

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
    bandwidth: float  # bytes/s the weight-read floor assumes (H200 HBM3e: 4.8 TB/s)


FULL = Shapes(
    text={**presets.LLAMA_7B, "num_hidden_layers": 4, "vocab_size": 32000}, vision=presets.CLIP_L_336,
    num_experts=4, samples=32, new_tokens=64, batch_sizes=(1, 16), uncached_samples=0, dtype=torch.bfloat16,
    bandwidth=4.8e12,
)
SMOKE = Shapes(
    text={**presets.LLAMA_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1024},
    vision={**presets.CLIP_L_336, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    num_experts=4, samples=4, new_tokens=4, batch_sizes=(1, 4), uncached_samples=2, dtype=torch.float32,
    bandwidth=4.8e12,
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


def batches(items: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    return [collate(items[i:i + batch_size], pad_id, padding_side="left") for i in range(0, len(items), batch_size)]


def ours(engine: GenerationEngine, items: list[dict], batch_size: int, new_tokens: int) -> list[list[int]]:
    """Our engine on left-padded batches (collated beforehand: timing covers generation, not padding)."""
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out: list[list[int]] = []
    for batch in tqdm(batches(items, batch_size, engine.tokenizer.pad_token_id), desc=f"ours, batch {batch_size}",
                      leave=False):
        out += engine.generate(batch, settings).tolist()
    return out


def hf_generate(model, tokenizer, items: list[dict], batch_size: int, new_tokens: int) -> list[list[int]]:
    """The previous path: transformers' generate (dynamic cache) from the spliced embeddings."""
    out: list[list[int]] = []
    for batch in tqdm(batches(items, batch_size, tokenizer.pad_token_id), desc=f"generate, batch {batch_size}",
                      leave=False):
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        embeds = model.model.embed_multimodal(ids, pixel_values=batch["pixel_values"].to(model.device, model.dtype))
        new = model.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out += new[:, ids.shape[1]:].tolist()
    return out


def cache_keyword() -> str:
    """The KV cache's keyword and output field in this transformers version ("past_key_values" before 5.18)."""
    return "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"


def plain_loop(model, tokenizer, items: list[dict], new_tokens: int, use_cache: bool,
               top2: list[list[torch.Tensor]] | None = None) -> list[list[int]]:
    """One sample at a time, greedy argmax (placeholders suppressed, as everywhere), no batching: with the
    KV cache, or re-running everything. ``top2`` collects each step's two best logits (left on the device:
    a launch per step, no extra host sync) to tell near-ties from real differences afterwards."""
    device, dtype, cache_kw = model.device, model.dtype, cache_keyword()
    placeholders = torch.tensor(sorted(model.config.placeholder_token_ids().values()), device=device)
    out = []
    desc = "one-by-one, " + ("KV cache" if use_cache else "no cache")
    for item in tqdm(items, desc=desc, leave=False):
        ids = item["input_ids"][None].to(device)
        pixels = item["pixel_values"].to(device, dtype)
        step_ids, cache, tokens, best = ids, None, [], []
        for _ in range(new_tokens):
            kwargs = {cache_kw: cache} if cache is not None else {"pixel_values": pixels}
            result = model(input_ids=step_ids, use_cache=use_cache, logits_to_keep=1, **kwargs)
            logits = result.logits[:, -1].index_fill(-1, placeholders, float("-inf"))
            nxt = logits.argmax(-1, keepdim=True)
            if top2 is not None:
                best.append(logits[0].topk(2).values)
            tokens.append(int(nxt))
            if use_cache:
                cache = getattr(result, cache_kw)
                step_ids = nxt
            else:
                ids = torch.cat([ids, nxt], dim=1)
                step_ids = ids
        out.append(tokens)
        if top2 is not None:
            top2.append(best)
    return out


def tie_gap(got: list[list[int]], reference: list[list[int]], top2: list[list[torch.Tensor]]) -> float | None:
    """The largest gap between the loop's two best logits at the first step where a sample's tokens differ
    from the loop's (None if none differ): small gaps are bf16 near-ties, not different decoding."""
    gaps = []
    for a, b, best in zip(got, reference, top2):
        first = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None:
            gaps.append(float(best[first][0] - best[first][1]))
    return max(gaps) if gaps else None


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall milliseconds of ``fn`` (synchronised around each call)."""
    times = []
    for _ in range(repeats):
        times.append(timed(lambda: (fn(), [])[1], device)[1] * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def time_split(engine: GenerationEngine, batch: dict, new_tokens: int, device: torch.device) -> dict:
    """Milliseconds of one batch's parts, each alone: media encoding with the embedding splice, the
    language-model prefill into the static cache, and one decoding step (a graph replay when captured)."""
    inputs = engine.inputs(batch)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    media = {key: inputs[key] for key in MEDIA_INPUT_KEYS if key in inputs}
    encode = median_ms(lambda: engine.model.model.embed_multimodal(ids, **media), device, 5)
    embeds = engine.model.model.embed_multimodal(ids, **media)
    prefill = median_ms(lambda: engine.prefill(embeds, mask, new_tokens), device, 5)
    step, logits, position = engine.prefill(embeds, mask, new_tokens)
    tokens, slot = logits.argmax(-1), mask.shape[1]
    step(tokens, position, slot)  # captures the graph if this step has none yet
    decode = median_ms(lambda: step(tokens, position, slot), device, 50)
    return dict(batch=mask.shape[0], prompt=mask.shape[1], encode=encode, prefill=prefill, step=decode,
                graph=step.use_graph)


def dense_anchor(shapes: Shapes, device: torch.device, prompt_len: int, samples: int, static: bool,
                 batch_size: int) -> float:
    """Seconds for transformers' dense LlamaForCausalLM (same width and depth) to greedily decode
    ``shapes.new_tokens`` tokens for ``samples`` random prompts of ``prompt_len`` tokens, in batches."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(shapes.dtype)
    try:
        with torch.device(device):
            llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in shapes.text.items() if k != "model_type"})).eval()
    finally:
        torch.set_default_dtype(default)
    kwargs = dict(do_sample=False, pad_token_id=0, **({"cache_implementation": "static"} if static else {}))
    prompts = torch.randint(3, 1000, (samples, prompt_len), device=device)
    for _ in range(2):  # warm-up (and, for the static cache on a GPU, compilation) at the timed shapes
        llama.generate(prompts[:batch_size], max_new_tokens=shapes.new_tokens, min_new_tokens=shapes.new_tokens,
                       **kwargs)

    def run() -> list[list[int]]:
        for i in range(0, samples, batch_size):
            llama.generate(prompts[i:i + batch_size], max_new_tokens=shapes.new_tokens,
                           min_new_tokens=shapes.new_tokens, **kwargs)
        return []

    seconds = timed(run, device)[1]
    del llama
    return seconds


def floor_tok_s(model: UniMoEForCausalLM, batch: int, bandwidth: float) -> float:
    """Tokens/s if a step took only the time to read its weights once: attention, the experts that
    ``batch`` uniformly routed tokens pick (expected distinct count), final norm and head."""
    tc, cfg = model.config.text_config, model.config
    h, i, v = tc.hidden_size, tc.intermediate_size, tc.vocab_size
    head_dim = h // tc.num_attention_heads
    attention = h * (2 * h + 2 * tc.num_key_value_heads * head_dim)
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    experts = e * (1 - ((e - k) / e) ** batch)
    params = tc.num_hidden_layers * (attention + experts * 3 * h * i) + v * h
    return batch / (params * model.dtype.itemsize / bandwidth)


class Rows(list):
    """Table rows, each printed as it is measured (a long run that is cut short still shows its rows)."""

    def append(self, row: dict) -> None:
        super().append(row)
        print(f"{row['path']}, batch {row['batch']}: {row['tokens'] / row['seconds']:.1f} tokens/s "
              f"({row['seconds']:.2f} s)", flush=True)


def run(shapes: Shapes, device: torch.device,
        anchors: bool) -> tuple[list[dict], list[dict], UniMoEForCausalLM, list[int]]:
    """Table rows (the cached loop first, as the baseline), our engine's time split per batch size, the
    model, and the prompt lengths."""
    model, tokenizer = build(shapes, device)
    engine = GenerationEngine(model, tokenizer)
    items = prompts(model, tokenizer, shapes.samples)
    lengths = [len(it["input_ids"]) for it in items]
    n_tok = len(items) * shapes.new_tokens
    with torch.inference_mode():
        plain_loop(model, tokenizer, items[:1], 2, True)  # warm-up
        top2: list[list[torch.Tensor]] = []
        reference, loop_s = timed(lambda: plain_loop(model, tokenizer, items, shapes.new_tokens, True, top2),
                                  device)
        rows = Rows()
        rows.append(dict(path="one-by-one loop, KV cache (baseline)", batch=1, samples=len(items), seconds=loop_s,
                         tokens=n_tok, same=None))
        k = shapes.uncached_samples
        if k:
            slow, slow_s = timed(lambda: plain_loop(model, tokenizer, items[:k], shapes.new_tokens, False), device)
            rows.append(dict(path="one-by-one loop, no cache (original v1)", batch=1, samples=k, seconds=slow_s,
                             tokens=k * shapes.new_tokens, same=sum(a == b for a, b in zip(slow, reference)),
                             gap=tie_gap(slow, reference, top2)))
        for bs in shapes.batch_sizes:
            hf_generate(model, tokenizer, items[:bs], bs, 2)  # warm-up
            got, s = timed(lambda: hf_generate(model, tokenizer, items, bs, shapes.new_tokens), device)
            rows.append(dict(path="transformers generate on our model (previous path)", batch=bs, samples=len(items),
                             seconds=s, tokens=sum(map(len, got)), same=sum(a == b for a, b in zip(got, reference)),
                             gap=tie_gap(got, reference, top2)))
        splits = []
        for bs in shapes.batch_sizes:
            longest = batches(items, bs, tokenizer.pad_token_id)
            longest = max(longest, key=lambda b: b["input_ids"].shape[1])
            engine.generate(longest, GenerationSettings(max_new_tokens=shapes.new_tokens))  # warm-up: cache, graph
            made = engine.steps_made
            got, s = timed(lambda: ours(engine, items, bs, shapes.new_tokens), device)
            mode = "CUDA-graph step" if engine._step.use_graph else "eager step"
            rows.append(dict(path=f"**ours: engine** (static cache, {mode})", batch=bs,
                             samples=len(items), seconds=s, tokens=sum(map(len, got)),
                             same=sum(a == b for a, b in zip(got, reference)), gap=tie_gap(got, reference, top2),
                             rebuilt=engine.steps_made - made))
            splits.append(time_split(engine, longest, shapes.new_tokens, device))
    if anchors:
        mean_len = round(sum(lengths) / len(lengths))
        for static in (False, True):
            for bs in shapes.batch_sizes:
                s = dense_anchor(shapes, device, mean_len, len(items), static, bs)
                cache = "static cache" + (", compiled" if device.type == "cuda" else "") if static else "dynamic cache"
                rows.append(dict(path=f"transformers dense LlamaForCausalLM, {cache}, {mean_len}-token prompts",
                                 batch=bs, samples=len(items), seconds=s, tokens=n_tok, same=None))
    for bs in shapes.batch_sizes:
        rate = floor_tok_s(model, bs, shapes.bandwidth)
        rows.append(dict(path=f"weight-read floor of our model ({shapes.bandwidth / 1e12:.1f} TB/s)", batch=bs,
                         samples=len(items), seconds=n_tok / rate, tokens=n_tok, same=None))
    base = rows[0]["tokens"] / rows[0]["seconds"]
    for r in rows:
        r["tok_s"] = r["tokens"] / r["seconds"]
        r["speedup"] = r["tok_s"] / base
    return rows, splits, model, lengths


def same_tokens(row: dict) -> str:
    return "-" if row["same"] is None else f"{row['same']}/{row['samples']}"


def gap_text(row: dict) -> str:
    return "-" if row.get("gap") is None else f"{row['gap']:.3f}"


def split_table(splits: list[dict]) -> list[str]:
    """Our engine's time per batch, part by part (each measured alone on the batch with the longest prompt)."""
    lines = ["| batch | prompt tokens | media encoding ms | prefill ms | decoding step ms | step tokens/s |",
             "|---|---|---|---|---|---|"]
    for sp in splits:
        kind = "graph replay" if sp["graph"] else "eager"
        lines.append(f"| {sp['batch']} | {sp['prompt']} | {sp['encode']:.2f} | {sp['prefill']:.2f} | "
                     f"{sp['step']:.3f} ({kind}) | {sp['batch'] / sp['step'] * 1e3:.0f} |")
    return lines


def report(rows: list[dict], splits: list[dict], shapes: Shapes, model: UniMoEForCausalLM, device: torch.device,
           lengths: list[int], command: str) -> str:
    tc, vc = model.config.text_config, model.config.vision_config
    name = device_name(device)
    prompt_lens = f"{min(lengths)}-{max(lengths)} tokens, {(vc.image_size // vc.patch_size) ** 2} of them image"
    lines = [
        "# Generation throughput",
        "",
        f"- device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"date {datetime.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- model (random init): hidden {tc.hidden_size}, intermediate {tc.intermediate_size}, "
        f"{tc.num_attention_heads} heads, {tc.num_hidden_layers} layers, vocab {tc.vocab_size}, MoE "
        f"{model.config.num_experts} experts top-{model.config.num_experts_per_tok} in every layer; CLIP "
        f"{vc.hidden_size}x{vc.num_hidden_layers} layers at {vc.image_size}px + mlp2x_gelu; "
        f"{str(shapes.dtype).removeprefix('torch.')}",
        f"- prompts: {prompt_lens}; greedy, exactly {shapes.new_tokens} new tokens per sample; times include "
        "prefill and image encoding (the dense anchor has no image)",
        "- same tokens: samples whose greedy tokens equal the cached one-by-one loop's; tie gap: the largest "
        "difference between the loop's two best logits at the first step where a sample's tokens differ from "
        "the loop's (bf16 rounding moves near-ties)",
        "- our engine is warmed up on its longest batch with the timed number of new tokens first; static "
        "caches (and graphs) built during the timed runs: "
        + ", ".join(f"batch {r['batch']}: {r['rebuilt']}" for r in rows if "rebuilt" in r),
        "",
        "| path | batch | samples | new tokens | seconds | tokens/s | × baseline | same tokens | tie gap |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['path']} | {r['batch']} | {r['samples']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} "
          f"| **{r['speedup']:.2f}** | {same_tokens(r)} | {gap_text(r)} |" for r in rows),
        "",
        "Our engine's time split (each part alone, median; the batch with the longest prompt):",
        "",
        *split_table(splits),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU")
    parser.add_argument("--new_tokens", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--uncached_samples", type=int, default=None, help="also time the no-cache loop on N")
    parser.add_argument("--no_anchors", action="store_true", help="skip the dense transformers anchor")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="float32 (TF32 off): an exactness pass, where every path must give the loop's tokens")
    args = parser.parse_args(argv)
    shapes = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("new_tokens", args.new_tokens), ("samples", args.samples),
                                   ("uncached_samples", args.uncached_samples)) if v is not None}
    if args.dtype:
        overrides["dtype"] = getattr(torch, args.dtype)
        if args.dtype == "float32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    shapes = Shapes(**{**shapes.__dict__, **overrides})
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    print(f"generation benchmark on {device}: {shapes.samples} samples x {shapes.new_tokens} tokens", flush=True)
    rows, splits, model, lengths = run(shapes, device, not args.no_anchors)
    command = "python benchmarks/generation.py " + shlex.join(a for a in (argv if argv is not None else sys.argv[1:])
                                                              if a != args.out and a != "--out")
    text = report(rows, splits, shapes, model, device, lengths, command.strip())
    emit_table(text, args.out)


if __name__ == "__main__":
    main()
