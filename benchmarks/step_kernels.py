"""Where one settled MoE layer step's GPU time goes: its kernels by kind, next to the dense frozen MLP step's.

Each step (the dense baseline first, then each ``--layers`` kind:E:r) runs for ``--settle`` seconds, so a
power-capped GPU sits at that step's own clock, and then once under the profiler. Its kernels are summed by kind:
grouped GEMMs (torch's CUTLASS kernels over expert segments, with their setup kernels), other GEMMs (cuBLAS),
Triton kernels (the project's, named after their Python functions) and the rest (torch's elementwise, copies,
reductions); the span is the first kernel's start to the last one's end. ``--list`` also lists every kernel of
at least ``--min-us`` in launch order, the raw material for a per-kernel comparison. ``--owners`` profiles each step
once more with the CPU operators recorded and sums its kernels by the operators that launched them (for example
``aten::mm < DistinctExperts``: a cuBLAS GEMM, with its memsets, of the distinct block's forward). ``--gaps`` reads
the same profile and sums the time the GPU sat idle within the step, each stretch by the operators that
launched the kernel it then waited for (the host's launches running behind the GPU), and the host's lead: the
step's first operator to its first kernel. On the CPU (``--smoke``) the rows are the step's top-level operators and
their CPU time, and there are no owners or gaps.

    python benchmarks/step_kernels.py --layers mlp:8:64 shared:8:64 --tokens 8192 --list --out FILE
    python benchmarks/step_kernels.py --layers mlp:8:64 --tokens 8192 --owners --out FILE
    python benchmarks/step_kernels.py --layers mlp:8:64 shared:4:8 --tokens 8192 --gaps --out FILE
    python benchmarks/step_kernels.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as bench  # noqa: E402
from report import device_name, emit_table  # noqa: E402
from setting_ab import parse_layer  # noqa: E402

KINDS = ("grouped GEMM", "GEMM", "Triton", "rest")


def kind_of(name: str) -> str:
    """The kind of a kernel (or, on the CPU, operator) by its name."""
    lowered = name.lower()
    if "grouped" in lowered or "groupproblemshape" in lowered:
        return "grouped GEMM"
    if lowered.startswith(("nvjet", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")) or any(
            word in lowered for word in ("gemm", "cublas", "cutlass")):
        return "GEMM"
    if name.startswith("_") and not name.startswith("_Z") and not any(c in name for c in ": ("):  # not C++
        return "Triton"
    return "rest"


def step_kernels(step: Callable[[], None], device: torch.device, settle_s: float) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every kernel of one ``step`` after ``settle_s`` seconds of it, in launch
    order; on the CPU the top-level operators with their CPU time."""
    step()
    bench.settle(step, device, settle_s)
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        rows = [(e.name, e.time_range.start, e.device_time) for e in events]
    else:
        rows = [(e.name, e.time_range.start, e.cpu_time_total) for e in prof.events() if e.cpu_parent is None]
    return sorted(rows, key=lambda row: row[1])


def owner_of(event: object, depth: int = 3) -> str:
    """The operator that launched a kernel and up to ``depth - 1`` of its callers, innermost first."""
    chain = []
    while event is not None and len(chain) < depth:
        chain.append(event.name)
        event = event.cpu_parent
    return " < ".join(chain)


def profile_with_operators(step: Callable[[], None]) -> torch.profiler.profile:
    """One CUDA ``step`` profiled with its CPU operators recorded (what ``--owners`` and ``--gaps`` read)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    return prof


def launched_kernels(prof: torch.profiler.profile) -> list[tuple[str, str, float]]:
    """(owner, kernel name, us) of every kernel (memsets and copies included) of a ``profile_with_operators``."""
    return [(owner_of(e), k.name, k.duration) for e in prof.events() for k in getattr(e, "kernels", [])]


def by_owner(kernels: list[tuple[str, str, float]]) -> list[tuple[str, int, float, str]]:
    """(owner, kernel count, summed us, the longest kernel's name) per owner, the most time first."""
    groups: dict[str, list[tuple[float, str]]] = {}
    for owner, name, us in kernels:
        groups.setdefault(owner, []).append((us, name))
    rows = [(owner, len(ks), sum(us for us, _ in ks), max(ks)[1]) for owner, ks in groups.items()]
    return sorted(rows, key=lambda row: -row[2])


def _enclosing(ops: list[dict], call: dict, depth: int) -> str:
    """The CPU operators around a launch call of the same thread, innermost first, up to ``depth``."""
    around = sorted((op for op in ops if op["tid"] == call["tid"] and op["ts"] <= call["ts"] <= op["ts"] + op["dur"]),
                    key=lambda op: op["dur"])
    return " < ".join(op["name"] for op in around[:depth]) or call["name"]


def trace_gaps(trace: dict, depth: int = 3) -> tuple[float, list[tuple[float, str, str]]]:
    """From a Chrome trace of one step (torch.profiler's, CPU operators recorded): (the host's lead, us from the first
    CPU operator to the first kernel; [(idle us, owner, kernel)] for each stretch within the step on which the GPU
    ran nothing, with the kernel that ended it and the operators around that kernel's launch call)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                     key=lambda e: e["ts"])
    calls = {e["args"]["correlation"]: e for e in events
             if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    if not kernels:
        return 0.0, []
    lead = kernels[0]["ts"] - min((op["ts"] for op in ops), default=kernels[0]["ts"])
    gaps, busy_until = [], kernels[0]["ts"]
    for kernel in kernels:
        if kernel["ts"] > busy_until:
            call = calls.get(kernel.get("args", {}).get("correlation"))
            owner = _enclosing(ops, call, depth) if call is not None else "(no launch call)"
            gaps.append((kernel["ts"] - busy_until, owner, kernel["name"]))
        busy_until = max(busy_until, kernel["ts"] + kernel["dur"])
    return lead, gaps


def step_gaps(prof: torch.profiler.profile) -> tuple[float, list[tuple[float, str, str]]]:
    """``trace_gaps`` of a ``profile_with_operators``."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        return trace_gaps(json.loads(Path(f.name).read_text()))


def gap_lines(name: str, lead: float, gaps: list[tuple[float, str, str]], top: int = 25) -> list[str]:
    """A markdown section of a step's idle GPU time, summed by owner, the most first."""
    groups: dict[str, list[float]] = {}
    for us, owner, _ in gaps:
        groups.setdefault(owner, []).append(us)
    rows = sorted(((sum(v), len(v), owner) for owner, v in groups.items()), reverse=True)
    lines = ["", f"## {name}: idle GPU time, {sum(us for us, _, _ in gaps):.1f} us in {len(gaps)} stretches "
             f"(host lead before the first kernel {lead:.1f} us)", "",
             "| waiting for a kernel launched by | stretches | idle us |", "|---|---|---|"]
    return lines + [f"| {owner} | {count} | {us:.1f} |" for us, count, owner in rows[:top]]


def summary(rows: list[tuple[str, float, float]]) -> dict[str, tuple[int, float]]:
    """Per kind (and "all"): (kernel count, summed ms)."""
    out = {kind: (0, 0.0) for kind in (*KINDS, "all")}
    for name, _, us in rows:
        for kind in (kind_of(name), "all"):
            count, ms = out[kind]
            out[kind] = (count + 1, ms + us / 1e3)
    return out


def span_ms(rows: list[tuple[str, float, float]]) -> float:
    """First kernel's start to the last one's end."""
    return (max(start + us for _, start, us in rows) - min(start for _, start, _ in rows)) / 1e3 if rows else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--settle", type=float, default=1.5, help="seconds each step runs before it is profiled")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--layers", nargs="+", default=["mlp:8:64", "shared:8:64"], help="kind:E:r, kind mlp or shared")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--list", action="store_true", help="also list each layer's kernels in launch order")
    parser.add_argument("--min-us", type=float, default=20.0, help="shortest kernel --list shows")
    parser.add_argument("--owners", action="store_true", help="also sum each step's kernels by launching operator")
    parser.add_argument("--gaps", action="store_true", help="also sum each step's idle GPU time by launching operator")
    args = parser.parse_args()
    layers = [parse_layer(text) for text in args.layers]
    if args.smoke:
        device, shapes, tokens, settle = torch.device("cpu"), bench.SMALL, 64, 0.0
    else:
        device, shapes, tokens, settle = torch.device("cuda"), bench.FULL, args.tokens, args.settle
    torch.manual_seed(0)
    x = torch.randn(tokens, shapes.hidden, device=device, dtype=shapes.dtype, requires_grad=True)
    owners, gaps = (flag and device.type == "cuda" for flag in (args.owners, args.gaps))
    steps, owned, idle = {}, {}, {}

    def profile(name: str, step: Callable[[], None]) -> None:
        steps[name] = step_kernels(step, device, settle)
        if owners or gaps:
            prof = profile_with_operators(step)
            if owners:
                owned[name] = launched_kernels(prof)
            if gaps:
                idle[name] = step_gaps(prof)

    profile("dense", bench.dense_step(x, shapes))
    for kind, experts, rank in layers:
        layer = bench.make_layer(shapes, experts, rank, kind, device)
        profile(f"{kind} E={experts} r={rank}", bench.layer_step(layer, x, "grouped"))
        del layer
    sums = {name: summary(rows) for name, rows in steps.items()}
    unit = "kernels, ms" if device.type == "cuda" else "top-level operators, CPU ms"
    lines = [f"# Where a layer step's time goes ({device_name(device)})", "",
             f"{datetime.date.today()}, H={shapes.hidden}, I={shapes.intermediate}, top-{bench.TOP_K}, T={tokens}, "
             f"{str(shapes.dtype).split('.')[-1]}; one step profiled after {settle} s of itself; each cell: {unit}; "
             f"`python benchmarks/step_kernels.py --layers {' '.join(args.layers)} --tokens {tokens}`", "",
             "| kind | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
    for kind in (*KINDS, "all"):
        lines.append(f"| {kind} | " + " | ".join(f"{sums[s][kind][0]}, {sums[s][kind][1]:.3f}" for s in steps) + " |")
    lines.append("| span ms | " + " | ".join(f"{span_ms(rows):.3f}" for rows in steps.values()) + " |")
    if args.list:
        for name, rows in steps.items():
            lines += ["", f"## {name}: kernels of at least {args.min_us:g} us in launch order", "",
                      "| us | kind | kernel |", "|---|---|---|"]
            lines += [f"| {us:.1f} | {kind_of(k)} | `{k[:100]}` |" for k, _, us in rows if us >= args.min_us]
    for name, kernels in owned.items():
        lines += ["", f"## {name}: kernel time by the operator that launched it", "",
                  "| operator < callers | kernels | us | longest kernel |", "|---|---|---|---|"]
        lines += [f"| {owner} | {count} | {us:.1f} | `{longest[:60]}` |"
                  for owner, count, us, longest in by_owner(kernels)]
    for name, (lead, stretches) in idle.items():
        lines += gap_lines(name, lead, stretches)
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
