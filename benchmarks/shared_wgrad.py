"""The shared-base block's LoRA weight gradients two ways, one process: the Triton kernel that recomputes every
slot's SwiGLU backward per expert (``shared_kernels.lora_weight_grads``), and per-expert products
(``rank_grad_kernels.rank_grad``) over per-slot rows that the backward kernel stores (``SLOT_ROWS_MIN_RANK``).
Each way runs the whole layer step (forward and backward, stage-3 trainable set) back to back after ``--settle``
seconds of itself, alternately, best of two; the dense frozen MLP step, settled likewise, is the baseline. Also
the step's peak memory beyond what it found, and the largest gradient difference between them.

    python benchmarks/shared_wgrad.py --out FILE        # CUDA, LLaMA-7B MLP shapes, bf16
    python benchmarks/shared_wgrad.py --smoke           # tiny shapes on the CPU (both ways run PyTorch there)
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as bench  # noqa: E402
from report import device_name, emit_table, relative_difference, timing_parser  # noqa: E402

from Uni_MoE.model.moe import shared_kernels  # noqa: E402

CASES = ((8192, 4, 8), (8192, 4, 16), (8192, 4, 32), (8192, 4, 64), (8192, 8, 8), (8192, 8, 64),
         (32768, 4, 8), (32768, 4, 64), (32768, 8, 64))
WAYS = {"kernel": 10**9, "rows": 0}  # SLOT_ROWS_MIN_RANK that picks each way


def gradients(layer: torch.nn.Module, x: torch.Tensor, min_rank: int) -> list[torch.Tensor]:
    shared_kernels.SLOT_ROWS_MIN_RANK = min_rank
    bench.layer_step(layer, x, "grouped")()
    return [x.grad.clone()] + [p.grad.clone() for p in layer.experts.lora_parameters()]


def measure(tokens: int, experts: int, rank: int, hidden: int, inter: int, dtype: torch.dtype,
            device: torch.device, reps: int, settle: float) -> str:
    shapes = bench.Shapes(hidden, inter, (experts,), (rank,), (tokens,), dtype)
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    dense, _ = bench.time_ms(bench.dense_step(x, shapes), device, 3, reps, True, settle)
    layer = bench.make_layer(shapes, experts, rank, "shared", device)
    step = bench.layer_step(layer, x, "grouped")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    for _ in range(2):
        for name, min_rank in WAYS.items():
            shared_kernels.SLOT_ROWS_MIN_RANK = min_rank
            runs[name].append(bench.time_ms(step, device, 3, reps, True, settle))
    diff = relative_difference(*(gradients(layer, x, m) for m in WAYS.values()))
    ms = {name: min(t for t, _ in r) for name, r in runs.items()}
    gb = {name: max(g for _, g in r) for name, r in runs.items()}
    return (f"| {tokens} | {experts} | {rank} | {dense:.2f} | {ms['kernel']:.2f} | {ms['rows']:.2f} | "
            f"**{ms['rows'] / ms['kernel']:.3f}** | {ms['kernel'] / dense:.3f} | {ms['rows'] / dense:.3f} | "
            f"{gb['kernel']:.2f} | {gb['rows']:.2f} | {diff:.1e} |")


def main() -> None:
    args = timing_parser(__doc__, reps=10, settle=1.0).parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        cases, dims, dtype, reps = ((64, 4, 8),), (32, 96), torch.float32, 2
    else:
        cases, dims, dtype, reps = CASES, (4096, 11008), torch.bfloat16, args.reps
    lines = [f"# Shared-base LoRA weight gradients: recomputing kernel vs stored slot rows ({device_name(device)})",
             "", f"{datetime.date.today()}, H={dims[0]}, I={dims[1]}, top-2, {str(dtype).split('.')[-1]}, "
             f"mean of {reps} back-to-back steps after {args.settle} s of each, best of two; "
             f"`python benchmarks/shared_wgrad.py`", "",
             "| T | E | r | dense ms | kernel ms | rows ms | rows / kernel | kernel / dense | rows / dense "
             "| peak GB kernel | peak GB rows | grad diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for tokens, experts, rank in cases:
        lines.append(measure(tokens, experts, rank, *dims, dtype, device, reps, args.settle))
        print(lines[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
