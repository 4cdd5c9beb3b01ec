"""Time the shared-base MoE layer (forward+backward) under fixed Triton configs of its three kernels, or
print the autotuner's time for every config of every expert kernel.

Each candidate fixes (BLOCK_N, warps, stages[, BLOCK_M], max registers) of the forward, backward and
LoRA weight-gradient kernels of shared_kernels.py, without autotuning, so one process compares tile
shapes for the cost of a few compiles instead of a full autotuned benchmark. Same layer, step and
dense baseline as moe_layer.py (shared base: ratio to 1 x the dense frozen MLP), each timed after ``--settle``
seconds of itself, the dense step again before each candidate. With ``--autotuned``
one step of each kind (shared and distinct) runs with autotuning and the timings of the kernels tuned
for those shapes are listed, fastest first.

    python benchmarks/kernel_configs.py --tokens 8192 --experts 8 --ranks 8 64
    python benchmarks/kernel_configs.py --autotuned --tokens 8192 --experts 4 --ranks 8
"""

from __future__ import annotations

import argparse

import torch

import moe_layer as bench
from kernel_memcheck import KERNELS as EXPERT_KERNELS
from kernel_memcheck import autotuned
from report import device_name
from Uni_MoE.model.moe import shared_kernels

# (BLOCK_N, warps, stages, BLOCK_M or None, maxnreg or None) for forward, backward, weight gradients
CANDIDATES = {
    "64 cols, 4 warps": ((64, 4, 3, None, None), (64, 4, 3, None, None), (64, 4, 3, 64, None)),
    "128 cols, 4 warps": ((128, 4, 3, None, None), (128, 4, 3, None, None), (128, 4, 3, 64, None)),
    "64 cols, 4 warps, 128 registers": ((64, 4, 3, None, 128), (64, 4, 3, None, 128), (64, 4, 3, 64, 128)),
    "32/16/32 cols, 4 warps, 128 registers": ((32, 4, 2, None, 128), (16, 4, 2, None, 128), (32, 4, 2, 64, 128)),
}
KERNELS = ("_forward_kernel", "_backward_kernel", "_weight_grads_kernel")


def fix_configs(choice: tuple) -> None:
    """Give each shared kernel exactly one config (the autotuner then runs it without tuning)."""
    import triton

    for name, (n, warps, stages, block_m, maxnreg) in zip(KERNELS, choice):
        meta = {"BLOCK_N": n, **({"BLOCK_M": block_m} if block_m else {})}
        kernel = getattr(shared_kernels, name)
        kernel.configs = [triton.Config(meta, num_warps=warps, num_stages=stages, maxnreg=maxnreg)]
        kernel.cache = {}


def autotuned_timings(layer: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """One autotuned step of ``layer``; rows (kernel, ms, config) of each kernel it tuned, fastest first."""
    kernels = {label: kernel for name in EXPERT_KERNELS
               for label, kernel in ((name, autotuned(name)), (f"{name}, in place", autotuned(name, "_in_place")))
               if kernel is not None}
    for kernel in kernels.values():
        kernel.configs_timings = None
    bench.layer_step(layer, x, "grouped")()
    torch.cuda.synchronize()
    rows = []
    for name, kernel in kernels.items():
        timings = kernel.configs_timings or {}  # set by the autotuner for the key it tuned last
        for config, ms in sorted(timings.items(), key=lambda item: item[1][0]):
            rows.append(f"| {name} | {ms[0]:.3f} | {config} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds each step runs before it is timed")
    parser.add_argument("--autotuned", action="store_true", help="list the autotuner's timings instead")
    args = parser.parse_args()
    device = torch.device("cuda")
    shapes = bench.FULL
    torch.manual_seed(0)
    x = torch.randn(args.tokens, shapes.hidden, device=device, dtype=shapes.dtype, requires_grad=True)
    dense = bench.dense_step(x, shapes)
    name = device_name(device)
    print(f"{name}; T={args.tokens}, E={args.experts}; each step timed after {args.settle} s of itself", flush=True)
    if args.autotuned:
        for rank in args.ranks:
            for kind in ("shared", "mlp"):
                layer = bench.make_layer(shapes, args.experts, rank, kind, device)
                print(f"\nr={rank}, {kind}\n| kernel | ms | config |\n|---|---|---|")
                print("\n".join(autotuned_timings(layer, x)), flush=True)
                del layer
        return
    print("| r | candidate | dense ms | shared ms | / dense |\n|---|---|---|---|---|")
    for rank in args.ranks:
        layer = bench.make_layer(shapes, args.experts, rank, "shared", device)
        for label, choice in CANDIDATES.items():
            fix_configs(choice)
            dense_ms, _ = bench.time_ms(dense, device, 3, args.reps, settle_s=args.settle)
            ms, _ = bench.time_ms(bench.layer_step(layer, x, "grouped"), device, 3, args.reps, settle_s=args.settle)
            print(f"| {rank} | {label} | {dense_ms:.2f} | {ms:.2f} | {ms / dense_ms:.3f} |", flush=True)
        del layer


if __name__ == "__main__":
    main()
