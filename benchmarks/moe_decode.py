"""MoE layer forward at decoding sizes (no gradient): the fused grouped path vs the per-expert loop, one process.

Generation runs the MoE layers on a handful of tokens per step (one per sequence in the batch), where the
layer reads each chosen expert's weights once and launch and sorting overheads, not FLOPs, set the time.
This measures both implementations there, to pick which one inference uses at which token count.

    python benchmarks/moe_decode.py --out moe_decode.md     # LLaMA-7B MLP shapes, bf16, CUDA
    python benchmarks/moe_decode.py --smoke                 # tiny CPU run
"""

from __future__ import annotations

import argparse
import datetime

import torch

from moe_layer import FULL, SMALL, make_layer, time_ms
from report import device_name, emit_table

TOKENS = (1, 4, 16, 64, 256, 1024)


def run(shapes, tokens: tuple[int, ...], device: torch.device, warmup: int, reps: int) -> list[dict]:
    rows = []
    for expert_type in ("mlp", "shared"):
        layer = make_layer(shapes, shapes.experts[0], shapes.ranks[0], expert_type, device).eval()
        for t in tokens:
            x = torch.randn(1, t, shapes.hidden, device=device, dtype=shapes.dtype)
            times = {}
            for implementation in ("reference", "grouped"):
                layer.implementation = implementation

                def step() -> None:
                    with torch.no_grad():
                        layer(x)

                times[implementation] = time_ms(step, device, warmup, reps)[0]
            rows.append(dict(kind=expert_type, tokens=t, loop=times["reference"], fused=times["grouped"]))
            print(f"{expert_type:6s} T={t:5d}  loop {times['reference']:.3f} ms  fused {times['grouped']:.3f} ms",
                  flush=True)
    return rows


def report(rows: list[dict], shapes, device: torch.device, reps: int) -> str:
    name = device_name(device)
    lines = [
        "# MoE layer forward at decoding sizes",
        "",
        f"- device: {name}; torch {torch.__version__}; date {datetime.date.today()}",
        f"- H={shapes.hidden}, I={shapes.intermediate}, E={shapes.experts[0]}, top-2, expert LoRA r={shapes.ranks[0]},"
        f" {str(shapes.dtype).removeprefix('torch.')}; forward without gradient; median of {reps}",
        "",
        "| experts | tokens | per-expert loop ms | fused grouped ms | loop / fused |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['kind']} | {r['tokens']} | {r['loop']:.3f} | {r['fused']:.3f} | {r['loop'] / r['fused']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shapes, reps = (SMALL, 2) if args.smoke else (FULL, args.reps)
    tokens = (1, 4) if args.smoke else TOKENS
    emit_table(report(run(shapes, tokens, device, 3, reps), shapes, device, reps), args.out)


if __name__ == "__main__":
    main()
