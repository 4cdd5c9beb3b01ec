"""The distinct-expert block's frozen-base GEMMs: one grouped GEMM per product (what the block runs,
``segments.segment_mm``) against one cuBLAS GEMM per expert on its row slice (what the block runs from
``segments.PER_EXPERT_MIN_SLOTS`` slot rows, ``segments.expert_products``), and against the floor of one
cuBLAS GEMM over all slot rows with a single weight (the same FLOPs, as a dense MLP runs them), one process.

The per-expert way needs every expert's row count on the host, so it pays one device-to-host copy (a
synchronisation) per call; the grouped GEMM needs none. For each product of a step (forward gate + up, the
down projection; backward d h, and the input gradient of gate + up, summed in the per-expert way by an
accumulating GEMM), the three are timed alternately (the best of five medians), with slot rows spread evenly
over the experts as a balanced router gives them.

    python benchmarks/expert_gemm.py --out FILE                 # CUDA, LLaMA-7B MLP shapes, bf16
    python benchmarks/expert_gemm.py --tokens 8192 --experts 8  # one shape
    python benchmarks/expert_gemm.py --smoke                    # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import median_ms  # noqa: E402
from report import device_name, emit_table, relative_difference  # noqa: E402

from Uni_MoE.model.moe.segments import expert_products, group_slots, segment_mm  # noqa: E402

TOP_K = 2


def products(tokens: int, experts: int, hidden: int, inter: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, tuple[Callable[[], object], ...]]:
    """(grouped, per-expert, dense) closures for each product of one forward and backward; dense multiplies
    all slot rows by expert 0's weight, laid out as the grouped GEMM reads it."""
    rows = tokens * TOP_K
    indices = (torch.arange(tokens, device=device)[:, None] * TOP_K + torch.arange(TOP_K, device=device)) % experts
    g = group_slots(indices, experts)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    xs, hs, dys = rand(rows, hidden), rand(rows, inter, scale=0.1), rand(rows, hidden, scale=0.01)
    dg, du = rand(rows, inter, scale=0.01), rand(rows, inter, scale=0.01)
    gate_w, up_w = rand(experts, inter, hidden, scale=0.02), rand(experts, inter, hidden, scale=0.02)
    down_w = rand(experts, hidden, inter, scale=0.02)
    gate_t, up_t, down_t = (w.transpose(1, 2) for w in (gate_w, up_w, down_w))

    def per_expert(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The block's per-expert way, with its host copy of the counts (made once per grouping) each call."""
        g.host_counts = None
        return expert_products(pairs, g, per_expert=True)[0]

    return {
        "forward gate + up": (lambda: (segment_mm(xs, gate_t, g), segment_mm(xs, up_t, g)),
                              lambda: (per_expert([(xs, gate_t)]), per_expert([(xs, up_t)])),
                              lambda: (xs @ gate_t[0], xs @ up_t[0])),
        "forward down": (lambda: segment_mm(hs, down_t, g), lambda: per_expert([(hs, down_t)]),
                         lambda: hs @ down_t[0]),
        "backward d h": (lambda: segment_mm(dys, down_w, g), lambda: per_expert([(dys, down_w)]),
                         lambda: dys @ down_w[0]),
        "backward d x (gate + up)": (lambda: segment_mm(dg, gate_w, g).add_(segment_mm(du, up_w, g)),
                                     lambda: per_expert([(dg, gate_w), (du, up_w)]),
                                     lambda: (dg @ gate_w[0]).add_(du @ up_w[0])),
    }


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[str]:
    rows = []
    for tokens in args.tokens:
        for experts in args.experts:
            for name, ways in products(tokens, experts, args.hidden, args.intermediate, device, dtype).items():
                difference = relative_difference(ways[0](), ways[1]())
                ways[2]()  # its warm-up
                times: list[list[float]] = [[], [], []]
                for _ in range(5):
                    for way, spent in zip(ways, times):
                        spent.append(median_ms(way, device, args.reps))
                a, b, d = (min(spent) for spent in times)
                rows.append(f"| {tokens} | {experts} | {name} | {a:.3f} | {b:.3f} | {d:.3f} | **{b / a:.3f}** "
                            f"| **{a / d:.3f}** | {difference:.1e} |")
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.experts, args.hidden, args.intermediate, args.reps = [64], [4], 32, 48, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = run(args, device, dtype)
    name = device_name(device)
    text = "\n".join([
        "# Frozen-base GEMMs of the distinct-expert block: grouped GEMM against one GEMM per expert",
        "",
        f"- device: {name}; torch {torch.__version__}; date {datetime.date.today().isoformat()}",
        f"- H={args.hidden}, I={args.intermediate}, top-{TOP_K}, slot rows = {TOP_K} x tokens spread evenly over the "
        f"experts, {str(dtype).removeprefix('torch.')}; ms: the best of five alternating medians of {args.reps} "
        "synchronised calls; per expert includes its host synchronisation; dense: one GEMM of all slot rows with "
        "expert 0's weight",
        "",
        "| tokens | E | product | grouped ms | per expert ms | dense ms | per expert / grouped | grouped / dense "
        "| max difference / max |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    emit_table(text, args.out)


if __name__ == "__main__":
    main()
