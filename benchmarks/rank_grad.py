"""The MoE block's three r-wide LoRA weight gradients at LLaMA-7B width, two ways in one process: grouped GEMMs
(``segments.segment_mm_tn``, as the blocks computed them before) and the Triton kernel of
``rank_grad_kernels.rank_grad``. Per case: T tokens routed top-2 over E experts (uniform, or Zipf-skewed
expert loads), S = 2T slot rows sorted by expert, and the products d Bg = s d_gate^T zg, d Bu = s d_up^T zu
([E, I, r]) and d Ad = dzd^T h ([E, r, I]) over bf16 [S, I] and [S, r] operands. Each way is timed back to
back after settling, alternately, best of two; "kernel TB/s" is the three [S, I] operands' bytes over the
kernel's time; the error columns are each way's largest difference from a float32 computation, relative to
its largest value.

    python benchmarks/rank_grad.py --out FILE     # CUDA
    python benchmarks/rank_grad.py --smoke        # tiny shapes on the CPU (Triton's interpreter if installed)
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as bench  # noqa: E402
from report import device_name, emit_table, relative_difference, timing_parser  # noqa: E402

from Uni_MoE.model.moe.rank_grad_kernels import rank_grad  # noqa: E402
from Uni_MoE.model.moe.segments import SlotGrouping, group_slots, segment_mm_tn  # noqa: E402

CASES = ((8192, 4, 16, False), (8192, 4, 32, False), (8192, 4, 64, False), (8192, 8, 32, False),
         (8192, 8, 64, False), (8192, 8, 64, True), (32768, 4, 64, False), (32768, 8, 64, False),
         (32768, 8, 128, False))
SCALE = 2.0


def routing(tokens: int, experts: int, skewed: bool, device: torch.device) -> torch.Tensor:
    """[T, 2] distinct experts per token, drawn uniformly or with Zipf weights 1, 1/2, 1/3, ..."""
    weights = 1.0 / torch.arange(1, experts + 1) if skewed else torch.ones(experts)
    return torch.multinomial(weights.expand(tokens, experts), 2).to(device)


def grouped(ops: tuple, g: SlotGrouping) -> list[torch.Tensor]:
    zg, zu, dzd, d_gate, d_up, h = ops
    return [segment_mm_tn(d_gate, zg * SCALE, g), segment_mm_tn(d_up, zu * SCALE, g), segment_mm_tn(dzd, h, g)]


def kernel(ops: tuple, g: SlotGrouping) -> list[torch.Tensor]:
    zg, zu, dzd, d_gate, d_up, h = ops
    return [rank_grad(zg, d_gate, g, SCALE, transpose=True), rank_grad(zu, d_up, g, SCALE, transpose=True),
            rank_grad(dzd, h, g)]


def measure(tokens: int, experts: int, rank: int, skewed: bool, inter: int, dtype: torch.dtype,
            device: torch.device, reps: int, settle: float) -> str:
    torch.manual_seed(0)
    g = group_slots(routing(tokens, experts, skewed, device), experts)
    rows = 2 * tokens
    ops = tuple(torch.randn(rows, n, device=device, dtype=dtype) for n in (rank, rank, rank, inter, inter, inter))
    exact = [x.float() for x in grouped(tuple(o.float() for o in ops), g)]
    errors = {name: relative_difference(exact, way(ops, g)) for name, way in (("grouped", grouped),
                                                                              ("kernel", kernel))}
    ms: dict[str, float] = {"grouped": float("inf"), "kernel": float("inf")}
    for _ in range(2):
        for name, way in (("grouped", grouped), ("kernel", kernel)):
            ms[name] = min(ms[name], bench.time_ms(lambda: way(ops, g), device, 3, reps, True, settle)[0])
    tb_s = 3 * rows * inter * ops[3].element_size() / (ms["kernel"] * 1e-3) / 1e12
    loads = f"{int(g.counts.min())}-{int(g.counts.max())}"
    return (f"| {tokens} | {experts} | {rank} | {'Zipf' if skewed else 'uniform'} ({loads}) | {ms['grouped']:.3f} "
            f"| {ms['kernel']:.3f} | **{ms['grouped'] / ms['kernel']:.2f}×** | {tb_s:.2f} | {errors['grouped']:.1e} "
            f"| {errors['kernel']:.1e} |")


def main() -> None:
    args = timing_parser(__doc__, reps=20, settle=0.5).parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        cases, inter, dtype, reps = ((64, 4, 8, False), (64, 4, 8, True)), 96, torch.float32, 2
    else:
        cases, inter, dtype, reps = CASES, 11008, torch.bfloat16, args.reps
    lines = [f"# LoRA weight gradients: grouped GEMMs vs the rank-gradient kernel ({device_name(device)})", "",
             f"{datetime.date.today()}, I={inter}, top-2, {str(dtype).split('.')[-1]}, three products a step, mean "
             f"of {reps} back-to-back steps after {args.settle} s, best of two;\n`python benchmarks/rank_grad.py`", "",
             "| T | E | r | expert loads (rows) | grouped ms | kernel ms | grouped / kernel | kernel TB/s "
             "| grouped error | kernel error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        lines.append(measure(*case, inter, dtype, device, reps, args.settle))
        print(lines[-1], flush=True)
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
