"""One stage-3 training step of a real-width Uni-MoE language model: fused experts vs the per-expert loop.

The model: LLaMA-7B-width decoder layers (random init, SDPA attention, bf16) whose MLPs are MoE layers
(frozen expert bases, trainable expert LoRA r=8 with dropout 0.05, trainable router, top-2), PEFT LoRA on
the attention projections, the image projector (mlp2x_gelu from CLIP-L features) and the speech Q-former
(Whisper-small decoder over Whisper encoder states, 50 queries per chunk) trained fully. Encoders are
stubbed by random features (they are frozen in stage 3 and identical for both paths). Each sample is
576 image tokens, 2 speech chunks (100 tokens) and text up to the sequence length. AdamW on the
trainable set. Both paths run on the same model, batch and optimizer, one after the other. The loss is
the one UniMoEForCausalLM trains with, the chunked LM-head cross-entropy of Uni_MoE.model.lm_loss (no
full-batch logits); ``--hf-loss`` uses transformers' causal-LM loss over full float32 logits instead.
The RMSNorms, the attention (rotary in the projections' layout) and the attention LoRA are the ones the
model trains with (Uni_MoE.model.rms_norm, Uni_MoE.model.attention, Uni_MoE.train.lora_linear);
``--hf-norm``, ``--hf-attention`` and ``--peft-lora`` keep transformers' and PEFT's instead.

MFU counts useful FLOPs of the language model and the image projector: 4 x frozen parameters (forward
and input gradient), 6 x trainable ones, per token, plus causal attention 6*S*H per layer; the speech
Q-former's FLOPs are not counted. Peak is the device's dense bf16 rate.

    python benchmarks/train_step.py --out train_step.md   # real width, CUDA
    python benchmarks/train_step.py --checkpointing       # the same with activation checkpointing
    python benchmarks/train_step.py --hf-loss             # transformers' loss over full logits
    python benchmarks/train_step.py --profile ops.txt     # also the fused path's operator table, one step
    python benchmarks/train_step.py --smoke               # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig

from report import device_name, emit_table
from Uni_MoE.model.attention import fuse_attention
from Uni_MoE.model.connectors import SpeechAligner, build_projector
from Uni_MoE.model.lm_loss import causal_lm_loss
from Uni_MoE.model.moe import MoELayer
from Uni_MoE.model.rms_norm import fuse_rms_norms
from Uni_MoE.train.lora_linear import fuse_lora
from Uni_MoE.train.gpu_gaps import gap_table
from Uni_MoE.train.profiling import operator_tables

TOP_K, QUERIES, SPEECH_CHUNKS = 2, 50, 2
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclass
class StepShapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    experts: int
    rank: int
    batch: int
    seq: int
    image_tokens: int
    image_dim: int
    speech_dim: int
    speech_layers: int
    speech_frames: int
    dtype: torch.dtype
    checkpointing: bool = False
    chunked_loss: bool = True
    fused_norm: bool = True
    fused_attention: bool = True
    fused_lora: bool = True


FULL = StepShapes(4096, 11008, 4, 32, 32004, 4, 8, 8, 2048, 576, 1024, 768, 12, 1500, torch.bfloat16)
SMOKE = StepShapes(64, 128, 2, 4, 256, 4, 4, 2, 192, 16, 32, 32, 1, 30, torch.float32)


class Stage3Model(nn.Module):
    """Connectors + MoE language model: the stage-3 trainable path of Uni-MoE on stubbed encoder features."""

    def __init__(self, s: StepShapes, expert_type: str) -> None:
        super().__init__()
        self.chunked_loss = s.chunked_loss
        config = LlamaConfig(
            hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, num_key_value_heads=s.heads, vocab_size=s.vocab,
            max_position_embeddings=s.seq, attn_implementation="sdpa",
        )
        self.llm = LlamaForCausalLM(config)
        if s.fused_norm:
            fuse_rms_norms(self.llm)
        if s.fused_attention:
            fuse_attention(self.llm)
        for layer in self.llm.model.layers:
            layer.mlp = MoELayer(s.hidden, s.intermediate, s.experts, TOP_K, expert_type=expert_type,
                                 lora_r=s.rank, lora_alpha=16, lora_dropout=0.05)
        whisper = WhisperConfig(d_model=s.speech_dim, decoder_layers=s.speech_layers,
                                decoder_attention_heads=max(1, s.speech_dim // 64),
                                decoder_ffn_dim=4 * s.speech_dim, max_target_positions=QUERIES)
        self.image_projector = build_projector("mlp2x_gelu", s.image_dim, s.hidden)
        self.speech_aligner = SpeechAligner(whisper, QUERIES, s.hidden, "linear")
        inject_adapter_in_model(
            LoraConfig(r=s.rank, lora_alpha=16, lora_dropout=0.05,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            self.llm,
        )
        if s.fused_lora:
            fuse_lora(self.llm)

    def moe_mlps(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.llm.model.layers]

    def set_trainable(self) -> list[nn.Parameter]:
        """Stage 3: attention LoRA, expert LoRA, routers and connectors train; everything else is frozen."""
        for name, p in self.named_parameters():
            p.requires_grad_(
                "lora_" in name or ".router." in name or name.startswith(("image_projector", "speech_aligner"))
            )
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self, image: torch.Tensor, speech: torch.Tensor, text: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """image [B, 576, d_img], speech [B*chunks, frames, d_sp], text [B, S_text] -> loss."""
        b = text.shape[0]
        media = [self.image_projector(image), self.speech_aligner(speech).view(b, -1, self.llm.config.hidden_size)]
        embeds = torch.cat([*media, self.llm.get_input_embeddings()(text)], dim=1)
        if self.chunked_loss:
            hidden = self.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # as UniMoE trains
            loss = causal_lm_loss(hidden, self.llm.lm_head.weight, labels)[0]
        else:
            loss = self.llm(inputs_embeds=embeds, labels=labels, use_cache=False).loss
        return loss + 0.01 * sum(layer.aux_loss for layer in self.moe_mlps())


def make_batch(s: StepShapes, device: torch.device) -> dict[str, torch.Tensor]:
    """Random encoder features and text; labels ignore the media positions."""
    text_len = s.seq - s.image_tokens - SPEECH_CHUNKS * QUERIES
    if text_len < 1:
        raise ValueError(f"sequence length {s.seq} leaves no room for text after the media tokens")
    text = torch.randint(0, s.vocab, (s.batch, text_len), device=device)
    labels = torch.cat([torch.full((s.batch, s.seq - text_len), -100, device=device), text], dim=1)
    return dict(
        image=torch.randn(s.batch, s.image_tokens, s.image_dim, device=device, dtype=s.dtype),
        speech=torch.randn(s.batch * SPEECH_CHUNKS, s.speech_frames, s.speech_dim, device=device, dtype=s.dtype),
        text=text,
        labels=labels,
    )


def flops_per_token(s: StepShapes, expert_type: str) -> float:
    """Useful training FLOPs per sequence token (see the module docstring for what is counted)."""
    h, i, r = s.hidden, s.intermediate, s.rank
    mlp_bases = TOP_K if expert_type == "mlp" else 1
    frozen = s.layers * (4 * h * h + mlp_bases * 3 * h * i) + s.vocab * h
    trainable = s.layers * (h * s.experts + 4 * r * 2 * h + TOP_K * r * 3 * (h + i))
    trainable += (s.image_dim * h + h * h) * s.image_tokens / s.seq
    return 4 * frozen + 6 * trainable + 6 * s.seq * h * s.layers


def time_steps(model: Stage3Model, batch: dict, opt: torch.optim.Optimizer, device: torch.device,
               warmup: int, steps: int) -> tuple[float, float]:
    """Median step time in ms and peak memory in GB over ``steps`` steps after ``warmup``."""
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**batch).backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def profile_step(model: Stage3Model, batch: dict, opt: torch.optim.Optimizer, device: torch.device) -> str:
    """One training step under torch.profiler: its operators by self device (CPU) time, then by self host
    time, as tables; on a GPU also its idle gaps by the host operation that ended them."""
    with torch.profiler.profile() as prof:
        opt.zero_grad(set_to_none=True)
        model(**batch).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    tables = operator_tables(prof, rows=45)
    if device.type != "cuda":
        return tables
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return f"{tables}\n\n{gap_table(trace, rows=45)}"


def run(s: StepShapes, expert_types: list[str], device: torch.device, warmup: int, steps: int,
        profile_to: str | None = None) -> list[dict]:
    rows = []
    name = device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    for expert_type in expert_types:
        torch.manual_seed(0)
        with torch.device(device):
            model = Stage3Model(s, expert_type).to(s.dtype)
        if s.checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.set_trainable(), lr=1e-5)
        batch = make_batch(s, device)
        tokens = s.batch * s.seq
        for implementation in ("reference", "grouped"):
            for layer in model.moe_mlps():
                layer.implementation = implementation
            ms, gb = time_steps(model, batch, opt, device, warmup, steps)
            tflops = flops_per_token(s, expert_type) * tokens / ms / 1e9
            rows.append(dict(type=expert_type, impl=implementation, ms=ms, tok_s=tokens / ms * 1e3, tflops=tflops,
                             mfu=tflops / peak if peak else float("nan"), gb=gb))
            print(format_row(rows[-1], rows[-2] if implementation == "grouped" else None), flush=True)
        if profile_to:
            with open(profile_to, "a") as f:
                f.write(f"{expert_type} experts, fused grouped path, one step\n\n")
                f.write(profile_step(model, batch, opt, device) + "\n\n")
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


HEADER = ("| experts | MoE path | step ms | tokens/s | speed-up vs loop | useful TFLOP/s | MFU | peak GB |\n"
          "|---|---|---|---|---|---|---|---|")


def format_row(r: dict, loop: dict | None) -> str:
    speedup = f"**{r['tok_s'] / loop['tok_s']:.2f}×**" if loop else "1.00×"
    name = "fused grouped" if r["impl"] == "grouped" else "per-expert loop"
    return (f"| {r['type']} | {name} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {speedup} | {r['tflops']:.0f} "
            f"| {r['mfu']:.1%} | {r['gb']:.1f} |")


def report(rows: list[dict], s: StepShapes, device: torch.device, steps: int) -> str:
    name = device_name(device)
    lines = [
        "# Stage-3 training step",
        "",
        f"- device: {name}; torch {torch.__version__}; date {datetime.date.today().isoformat()}",
        f"- {s.layers} decoder layers, H={s.hidden}, I={s.intermediate}, {s.heads} heads, vocab {s.vocab}, "
        f"all layers MoE: E={s.experts}, top-{TOP_K}, expert LoRA r={s.rank}; {str(s.dtype).removeprefix('torch.')}",
        f"- batch {s.batch} × {s.seq} tokens ({s.image_tokens} image, {SPEECH_CHUNKS * QUERIES} speech, rest text); "
        f"AdamW; median of {steps} steps after warm-up; activation checkpointing {'on' if s.checkpointing else 'off'}; "
        f"loss: {'chunked LM-head cross-entropy' if s.chunked_loss else 'transformers (full float32 logits)'}; "
        f"RMSNorm: {'fused (torch)' if s.fused_norm else 'transformers'}; "
        f"attention: {'rotary in [B, S, heads, dim]' if s.fused_attention else 'transformers'}; "
        f"attention LoRA: {'addmm' if s.fused_lora else 'PEFT'}",
        "- useful FLOPs: 4 × frozen + 6 × trainable parameters per token + causal attention (speech Q-former not "
        "counted); MFU against dense bf16 peak",
        "",
        HEADER,
        *(format_row(r, rows[i - 1] if r["impl"] == "grouped" else None) for i, r in enumerate(rows)),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 1 step")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 8)")
    parser.add_argument("--experts", type=int, help="experts per MoE layer (default 4)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of decoder layers")
    parser.add_argument("--hf-loss", action="store_true", help="transformers' loss over full float32 logits")
    parser.add_argument("--hf-norm", action="store_true", help="transformers' RMSNorm instead of the fused one")
    parser.add_argument("--hf-attention", action="store_true", help="transformers' attention forward (its rotary)")
    parser.add_argument("--peft-lora", action="store_true", help="PEFT's LoRA forward on the attention projections")
    parser.add_argument("--expert-types", nargs="+", default=["mlp", "shared"], choices=["mlp", "shared"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--profile", help="append the fused path's operator table of one step to this file")
    args = parser.parse_args()
    shapes = SMOKE if args.smoke else FULL
    if args.smoke:
        args.device, args.steps, args.warmup = "cpu", 1, 1
    overrides = {k: v for k, v in (("layers", args.layers), ("batch", args.batch), ("experts", args.experts)) if v}
    shapes = replace(shapes, checkpointing=args.checkpointing, chunked_loss=not args.hf_loss,
                     fused_norm=not args.hf_norm, fused_attention=not args.hf_attention,
                     fused_lora=not args.peft_lora, **overrides)
    device = torch.device(args.device)
    rows = run(shapes, args.expert_types, device, args.warmup, args.steps, args.profile)
    emit_table(report(rows, shapes, device, args.steps), args.out)


if __name__ == "__main__":
    main()
