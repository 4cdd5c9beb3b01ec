"""The experts' LoRA-B factors transposed, [E, out, r] -> [E, r, out]: the tiled kernel the MoE blocks use
(``factor_layout.swap_last_two``) against torch's copy of the transposed view, alternately in one process.

Each MoE block makes four such copies a step: gate-B and up-B [E, I, r] into the Triton kernels' layout, and
down-B [E, H, r] stacked for the down LoRA-B product, once in the forward and once in the backward.

    python benchmarks/factor_transpose.py --out FILE    # CUDA, LLaMA-7B widths, bf16
    python benchmarks/factor_transpose.py --smoke       # tiny shapes on the CPU
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import device_name, emit_table, timing_parser  # noqa: E402

from Uni_MoE.model.moe.factor_layout import swap_last_two  # noqa: E402


def torch_copy(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous()


def gpu_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Mean microseconds of device time ``fn``'s kernels take a call, over ``calls`` calls (torch.profiler's kernel
    durations: the host's launch cost, larger than these kernels, stays out); on the CPU, wall time a call."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / calls


def main() -> None:
    parser = timing_parser(__doc__, reps=50, settle=0.0)
    args = parser.parse_args()
    if args.smoke:
        device, dtype, widths, experts, ranks, calls = torch.device("cpu"), torch.float32, (128,), (4,), (8,), 3
    else:
        device, dtype, widths, experts, ranks, calls = (torch.device("cuda"), torch.bfloat16, (11008, 4096), (4, 8),
                                                        (8, 64, 128), args.reps)
    lines = [f"# LoRA-B factor transposes ({device_name(device)})", "",
             f"{datetime.date.today()}, {str(dtype).split('.')[-1]}; us: device time a call, the best of three "
             f"alternating means over {calls} calls; `python benchmarks/factor_transpose.py`", "",
             "| E | out | r | MB | torch copy us | tiled us | torch / tiled | equal |",
             "|---|---|---|---|---|---|---|---|"]
    for e in experts:
        for width in widths:
            for r in ranks:
                b = torch.randn(e, width, r, device=device, dtype=dtype)
                equal = torch.equal(swap_last_two(b), torch_copy(b))
                times: dict[str, list[float]] = {"torch": [], "tiled": []}
                for _ in range(3):
                    times["torch"].append(gpu_us(lambda: torch_copy(b), device, calls))
                    times["tiled"].append(gpu_us(lambda: swap_last_two(b), device, calls))
                base, ours = min(times["torch"]), min(times["tiled"])
                mb = b.numel() * b.element_size() / 1e6
                lines.append(f"| {e} | {width} | {r} | {mb:.1f} | {base:.1f} | {ours:.1f} | **{base / ours:.2f}** | "
                             f"{'yes' if equal else 'NO'} |")
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
