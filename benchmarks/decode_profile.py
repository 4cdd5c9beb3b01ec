"""Where a generated token's time goes, on the model of benchmarks/generation.py: per MoE decoding path
(all experts, chosen experts; the named path runs in every MoE call, prefill included), media encoding,
prefill, one decoding step replayed from its CUDA graph and run eagerly, and whole generation at batch 1;
a torch.profiler table of one eager step; and one MoE layer's two decoding paths side by side over token
counts (and the chosen path's kernel block sizes).

    python benchmarks/decode_profile.py --out decode_profile.md     # CUDA
    python benchmarks/decode_profile.py --smoke                     # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import datetime

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from generation import FULL, SMOKE, Shapes, batches, build, median_ms, ours, prompts, time_split
from report import device_name, emit_table
from Uni_MoE.model.moe import experts_reference, gemv_kernels
from Uni_MoE.model.moe.chosen import experts_chosen
from Uni_MoE.model.moe.decode import experts_all_dense
from Uni_MoE.serve.engine import GenerationEngine

PATHS = ("all_dense", "chosen")
BLOCK_CHOICES = ((8, 512, 4), (4, 512, 4), (16, 256, 4), (8, 256, 2), (16, 512, 8), (32, 256, 8))


def replay_ms(fn, device: torch.device, repeats: int = 30) -> float:
    """Median ms of ``fn``: a CUDA-graph replay on a GPU (launch costs as in the engine's step), else eager."""
    if device.type != "cuda":
        return median_ms(fn, device, repeats)
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, device, repeats)


def generation_rows(shapes: Shapes, model, tokenizer, items: list[dict], device: torch.device) -> list[str]:
    lines = ["| MoE decoding path | batch | ms per sample (generate) | media ms | prefill ms | step ms (graph) | "
             "step ms (eager) |", "|---|---|---|---|---|---|---|"]
    for path in PATHS:
        for layer in model.moe_mlps():
            layer.implementation = path
        for bs in shapes.batch_sizes[:1] + shapes.batch_sizes[-1:]:
            if path == "chosen" and bs * model.config.num_experts_per_tok > model.config.num_experts:
                continue
            engine = GenerationEngine(model, tokenizer)
            one = batches(items, bs, tokenizer.pad_token_id)[0]
            ours(engine, items[:bs], bs, shapes.new_tokens)  # warm-up and capture
            seconds = median_ms(lambda: ours(engine, items[:bs], bs, shapes.new_tokens), device, 3) / 1e3
            split = time_split(engine, one, shapes.new_tokens, device)
            eager = time_split(GenerationEngine(model, tokenizer, cuda_graphs=False), one, shapes.new_tokens, device)
            lines.append(f"| {path} | {bs} | {seconds * 1e3 / bs:.1f} | {split['encode']:.2f} | "
                         f"{split['prefill']:.2f} | {split['step']:.3f} | {eager['step']:.3f} |")
            print(lines[-1], flush=True)
    for layer in model.moe_mlps():
        layer.implementation = "auto"
    return lines


def profile_step(model, tokenizer, items: list[dict], shapes: Shapes, device: torch.device) -> str:
    """torch.profiler's table of one eager decoding step at batch 1 (the ``auto`` MoE path)."""
    engine = GenerationEngine(model, tokenizer, cuda_graphs=False)
    one = batches(items, 1, tokenizer.pad_token_id)[0]
    with torch.inference_mode():
        inputs = engine.inputs(one)
        embeds = model.model.embed_multimodal(inputs["input_ids"], pixel_values=inputs["pixel_values"])
        step, logits, position = engine.prefill(embeds, inputs["attention_mask"], shapes.new_tokens)
        tokens, slot = logits.argmax(-1), inputs["attention_mask"].shape[1]
        step(tokens, position, slot)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step(tokens, position, slot)
            if device.type == "cuda":
                torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)


def layer_rows(model, device: torch.device, token_counts: tuple[int, ...]) -> list[str]:
    """One MoE layer's experts (the model's first), both decoding paths, random routing; ms per call."""
    experts = model.moe_mlps()[0].experts
    k, e, h = model.config.num_experts_per_tok, model.config.num_experts, experts.hidden_size
    lines = ["| tokens | all experts ms | chosen experts ms | all / chosen | chosen's max error / loop's max |",
             "|---|---|---|---|---|"]
    torch.manual_seed(0)
    with torch.inference_mode():
        for t in token_counts:
            x = torch.randn(t, h, device=device, dtype=model.dtype)
            indices = torch.rand(t, e, device=device).argsort(dim=-1)[:, :k]
            weights = torch.softmax(torch.randn(t, k, device=device), dim=-1).to(model.dtype)
            dense = replay_ms(lambda: experts_all_dense(x, weights, indices, experts), device)
            chosen = replay_ms(lambda: experts_chosen(x, weights, indices, experts), device)
            loop = experts_reference(x, weights, indices, experts)
            error = (experts_chosen(x, weights, indices, experts) - loop).abs().max() / loop.abs().max()
            lines.append(f"| {t} | {dense:.3f} | {chosen:.3f} | {dense / chosen:.2f} | {error:.1e} |")
            print(lines[-1], flush=True)
        if device.type == "cuda":
            lines += ["", "| chosen, 1 token: rows x cols, warps | ms |", "|---|---|"]
            x, indices = x[:1], indices[:1]
            default = dict(gemv_kernels.BLOCKS)
            for rows, cols, warps in BLOCK_CHOICES:
                gemv_kernels.BLOCKS.update(rows=rows, cols=cols, warps=warps)
                ms = replay_ms(lambda: experts_chosen(x, weights[:1], indices, experts), device)
                lines.append(f"| {rows} x {cols}, {warps} | {ms:.3f} |")
                print(lines[-1], flush=True)
            gemv_kernels.BLOCKS.update(default)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shapes = SMOKE if args.smoke else FULL
    model, tokenizer = build(shapes, device)
    items = prompts(model, tokenizer, max(shapes.batch_sizes))
    name = device_name(device)
    text = [f"# Decoding profile ({name}, {datetime.date.today().isoformat()}, {shapes.new_tokens} new tokens)", ""]
    for part in tqdm(("generation", "layer", "profile"), desc="profile"):
        if part == "generation":
            text += generation_rows(shapes, model, tokenizer, items, device) + [""]
        elif part == "layer":
            text += layer_rows(model, device, (1, 2, 4, 8, 16)) + [""]
        else:
            text += ["One eager decoding step, batch 1:", "", "```", profile_step(model, tokenizer, items, shapes,
                                                                                 device), "```", ""]
    emit_table("\n".join(text), args.out)


if __name__ == "__main__":
    main()
