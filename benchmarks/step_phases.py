"""Host and GPU time of a MoE layer step's forward and backward, with each step started on an idle GPU (the default
timing of moe_layer.py) and back to back (as layers run in a model).

For the dense frozen MLP and each ``--layers`` kind:E:r, ``--reps`` steps run in each mode after ``--settle`` seconds
of the step. Per step: the host's time in the forward call and in the backward call (``time.perf_counter``), the part
of the forward spent waiting for the row counts (distinct experts' one device-to-host copy, for one cuBLAS GEMM per
expert), and the GPU's time between CUDA events recorded at the step's start, after its forward and after its
backward. Medians. Where the host's forward takes about as long as the GPU's, or the idle start's GPU forward
exceeds the back-to-back one, the step waits for the host's launches. On the CPU (``--smoke``) only host times.

    python benchmarks/step_phases.py --layers mlp:8:64 mlp:4:8 shared:4:8 --tokens 8192 --out FILE
    python benchmarks/step_phases.py --smoke
"""

from __future__ import annotations

import contextlib
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as bench  # noqa: E402
from report import device_name, emit_table, timing_parser  # noqa: E402
from setting_ab import parse_layer, timing_setup  # noqa: E402

from Uni_MoE.model.moe import segments  # noqa: E402


@contextlib.contextmanager
def counted_waits(waits: list[float]) -> Iterator[None]:
    """Append the seconds of each ``SlotGrouping.counts_on_host`` call (the device-to-host copy) to ``waits``."""
    original = segments.SlotGrouping.counts_on_host

    def timed(grouping: segments.SlotGrouping) -> list[int]:
        start = time.perf_counter()
        try:
            return original(grouping)
        finally:
            waits.append(time.perf_counter() - start)

    segments.SlotGrouping.counts_on_host = timed
    try:
        yield
    finally:
        segments.SlotGrouping.counts_on_host = original


def phases(forward: Callable[[], torch.Tensor], device: torch.device, reps: int, idle_start: bool) -> list[float]:
    """Medians over ``reps`` steps: host forward ms, of it waiting for row counts ms, host backward ms, and on CUDA
    the GPU's forward, backward and step ms."""
    cuda = device.type == "cuda"
    rows, waits = [], []
    with counted_waits(waits):
        for _ in range(reps):
            if idle_start and cuda:
                torch.cuda.synchronize()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else []
            waits.clear()
            t0 = time.perf_counter()
            if cuda:
                events[0].record()
            loss = forward()
            t1 = time.perf_counter()
            if cuda:
                events[1].record()
            loss.backward()
            t2 = time.perf_counter()
            if cuda:
                events[2].record()
            rows.append(([t1 - t0, sum(waits), t2 - t1], events))
    if cuda:
        torch.cuda.synchronize()
    columns = [[1e3 * host[i] for host, _ in rows] for i in range(3)]
    if cuda:
        columns += [[e[a].elapsed_time(e[b]) for _, e in rows] for a, b in ((0, 1), (1, 2), (0, 2))]
    return [statistics.median(c) for c in columns]


def measure(name: str, forward: Callable[[], torch.Tensor], device: torch.device, reps: int,
            settle: float) -> list[str]:
    """Table rows of one step, idle start and back to back."""
    step = bench.with_backward(forward)
    for _ in range(3):
        step()
    lines = []
    for mode, idle_start in (("idle start", True), ("back to back", False)):
        bench.settle(step, device, settle)
        values = phases(forward, device, reps, idle_start)
        cells = [f"{v:.2f}" for v in values] + ["—"] * (6 - len(values))
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = timing_parser(__doc__, reps=20, settle=1.0)
    parser.add_argument("--layers", nargs="+", default=["mlp:8:64", "mlp:4:8", "shared:4:8"],
                        help="kind:E:r, kind mlp or shared")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    layers = [parse_layer(text) for text in args.layers]
    device, shapes, reps, settle, x = timing_setup(args, smoke_reps=3)
    tokens = x.shape[0]
    lines = [f"# Host and GPU time of a layer step's forward and backward ({device_name(device)})", "",
             f"{datetime.date.today()}, H={shapes.hidden}, I={shapes.intermediate}, top-{bench.TOP_K}, T={tokens}, "
             f"{str(shapes.dtype).split('.')[-1]}; medians of {reps} steps after {settle} s of each; ms; "
             f"`python benchmarks/step_phases.py --layers {' '.join(args.layers)} --tokens {tokens}`", "",
             "| step | start | host forward | of it waiting for row counts | host backward | GPU forward "
             "| GPU backward | GPU step |", "|---|---|---|---|---|---|---|---|"]
    lines += measure("dense", bench.dense_loss(x, shapes), device, reps, settle)
    for kind, experts, rank in layers:
        layer = bench.make_layer(shapes, experts, rank, kind, device)
        lines += measure(f"{kind} E={experts} r={rank}", bench.layer_loss(layer, x, "grouped"), device, reps, settle)
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
