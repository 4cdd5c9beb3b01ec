"""LM head + causal-LM loss, forward and backward: the chunked loss the model trains with
(``Uni_MoE.model.lm_loss``, its softmax gradient a Triton kernel on CUDA) vs transformers' loss over the
full logits (bf16 logits, a float32 copy, cross-entropy), one process; prints both times, their ratio,
peak memory and the differences of loss and hidden-state gradient.

    python benchmarks/lm_loss.py --out lm_loss.md     # 16384 tokens, H=4096, V=32004, bf16, CUDA
    python benchmarks/lm_loss.py --smoke              # tiny CPU run
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import median_ms  # noqa: E402
from report import device_name, emit_table  # noqa: E402

from Uni_MoE.model.lm_loss import causal_lm_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="batch x sequence rows")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32004)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.seq, args.reps = 64, 32, 100, 16, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens // args.seq, args.seq, args.hidden, device=device, dtype=dtype,
                         requires_grad=True)
    weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * 0.02
    labels = torch.randint(0, args.vocab, hidden.shape[:2], device=device)
    labels[:, : args.seq // 3] = -100  # media and prompt positions

    def full() -> torch.Tensor:
        return ForCausalLMLoss(hidden @ weight.t(), labels, args.vocab)

    def chunked() -> torch.Tensor:
        return causal_lm_loss(hidden, weight, labels)[0]

    results = {}
    for name, fn in (("transformers, full logits", full), ("chunked (ours)", chunked)):
        def step(fn=fn) -> None:
            hidden.grad = None
            fn().backward()

        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, device, args.reps)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
        hidden.grad = None
        loss = fn()
        loss.backward()
        results[name] = (ms, peak, loss.detach().float(), hidden.grad.float())
    (full_ms, full_gb, full_loss, full_grad), (ours_ms, ours_gb, ours_loss, ours_grad) = results.values()
    grad_err = ((ours_grad - full_grad).norm() / full_grad.norm()).item()
    name = device_name(device)
    lines = [
        "# LM head + loss, forward and backward",
        "",
        f"- device: {name}; torch {torch.__version__}; date {datetime.date.today()}",
        f"- command: `python benchmarks/lm_loss.py{' --smoke' if args.smoke else ''}`",
        f"- {args.tokens} rows ({args.tokens // args.seq} x {args.seq}, first third ignored), hidden {args.hidden}, "
        f"vocab {args.vocab}, {str(dtype).replace('torch.', '')}; head frozen, gradient to the hidden states",
        "",
        "| loss | ms | peak GB above inputs |",
        "|---|---|---|",
        f"| transformers, full logits | {full_ms:.2f} | {full_gb:.2f} |",
        f"| chunked (ours) | {ours_ms:.2f} | {ours_gb:.2f} |",
        "",
        f"- ours / transformers: {ours_ms / full_ms:.2f}x time, loss {ours_loss.item():.6f} vs "
        f"{full_loss.item():.6f}, hidden-gradient relative error {grad_err:.1e}",
    ]
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
