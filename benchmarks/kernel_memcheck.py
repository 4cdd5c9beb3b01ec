"""Run every autotuning config of the MoE expert kernels under compute-sanitizer's memcheck, one process each.

The autotuner may pick any config of a kernel on some GPU and shape, so each must be free of out-of-bounds
accesses, and a compiler fault shows up only for some tile shapes (Triton 3.6 lowered one r=64 product to a
wgmma that read past shared memory). Each child process fixes one config of one kernel (the other kernels
keep their first config), runs one forward+backward of a MoE layer of the kind that uses it at LLaMA-7B width
and ``--tokens`` tokens, and the table lists what memcheck found. A process per config keeps one fault from
hiding the configs after it (a CUDA context does not survive an illegal access).

    python benchmarks/kernel_memcheck.py --ranks 8 64 --jobs 6 --out memcheck.md   # CUDA
    python benchmarks/kernel_memcheck.py --smoke    # the harness on the CPU: Triton's interpreter, no sanitizer
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {  # name -> (module, attribute, layer kind)
    "shared forward": ("shared_kernels", "_forward_kernel", "shared"),
    "shared backward": ("shared_kernels", "_backward_kernel", "shared"),
    "shared weight gradients": ("shared_kernels", "_weight_grads_kernel", "shared"),
    "distinct forward": ("swiglu_lora_kernels", "_forward_kernel", "mlp"),
    "distinct backward": ("swiglu_lora_kernels", "_backward_kernel", "mlp"),
    "rank gradients": ("rank_grad_kernels", "_rank_grad_kernel", "mlp"),
}
OK, SKIPPED = "step ok", "skipped by the autotuner"


def autotuner_skips() -> tuple[type[Exception], ...]:
    """The errors for which Triton's autotuner drops a config (times it as infinitely slow) instead of failing:
    too many registers or too much shared memory, a failed compile-time assertion, or ptxas rejecting it."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    return OutOfResources, CompileTimeAssertionFailure, PTXASError


def telling_line(text: str) -> str:
    """The line of a failed compile's message that says why: ptxas's fatal line where there is one (the rest
    says only that ptxas failed), else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line.split(":", 1)[-1].strip() for line in lines if "fatal" in line]
    return (fatal or lines or ["?"])[0][:120]


def skip_reason(err: Exception) -> str:
    """One line for a config the autotuner would skip: the error's kind and its telling line."""
    return f"{type(err).__name__}: {telling_line(str(err))}"


def autotuned(name: str, suffix: str = ""):  # noqa: ANN201 (a triton Autotuner; Triton is imported lazily)
    """Kernel ``name``'s autotuner, or with ``suffix="_in_place"`` that of its twin which writes over its inputs
    (None where there is none)."""
    import importlib

    module, attribute, _ = KERNELS[name]
    return getattr(importlib.import_module(f"Uni_MoE.model.moe.{module}"), attribute + suffix, None)


_ORIGINAL: dict = {}  # each autotuner's own config list, before ``pin_configs`` first narrows it


def pin_configs(name: str | None, index: int = 0) -> None:
    """Give every expert kernel one autotuning config: kernel ``name`` (and its in-place twin) its config
    ``index``, the others their first; ``name`` None restores every kernel's own list."""
    for other in KERNELS:
        for kernel in filter(None, (autotuned(other), autotuned(other, "_in_place"))):
            configs = _ORIGINAL.setdefault(kernel, list(kernel.configs))
            kernel.configs = configs if name is None else [configs[index if other == name else 0]]
            kernel.cache.clear()


def child(name: str, index: int, rank: int, tokens: int, experts: int, small: bool) -> None:
    """One layer step with config ``index`` of kernel ``name`` and the first config of the others."""
    import moe_layer as bench

    pin_configs(name, index)
    device = torch.device("cpu" if small else "cuda")
    shapes = bench.Shapes(32, 96, (experts,), (rank,), (tokens,), torch.float32) if small else bench.FULL
    torch.manual_seed(0)
    layer = bench.make_layer(shapes, experts, rank, KERNELS[name][2], device)
    x = torch.randn(tokens, shapes.hidden, device=device, dtype=shapes.dtype, requires_grad=True)
    try:
        bench.layer_step(layer, x, "grouped")()
        if device.type == "cuda":
            torch.cuda.synchronize()
    except autotuner_skips() as err:
        print(f"{SKIPPED} ({skip_reason(err)})")
        return
    print(OK)


def verdict(result: subprocess.CompletedProcess) -> str:
    """What one child's run says: clean, skipped by the autotuner (and why), or the first finding and memcheck's
    error count."""
    text = result.stdout + result.stderr
    skipped = next((line for line in result.stdout.splitlines() if line.startswith(SKIPPED)), None)
    if skipped:
        return skipped
    summary = re.search(r"ERROR SUMMARY: (\d+) error", text)
    errors = int(summary.group(1)) if summary else 0
    if result.returncode == 0 and OK in result.stdout and errors == 0:
        return "clean"
    finding = next((line.strip("= ").strip() for line in text.splitlines()
                    if re.search(r"Invalid|Program hit|Error|error:", line)), f"exit status {result.returncode}")
    return f"**{errors} errors**: {finding[:160]}" if errors else f"**failed**: {finding[:160]}"


def run_child(name: str, index: int, rank: int, args: argparse.Namespace, sanitizer: list[str]) -> str:
    command = [*sanitizer, sys.executable, str(Path(__file__).resolve()), "--child", name, str(index), str(rank),
               "--tokens", str(args.tokens), "--experts", str(args.experts)] + (["--smoke"] if args.smoke else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"**timed out** after {args.timeout} s"
    return verdict(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--jobs", type=int, default=4, help="children at once")
    parser.add_argument("--timeout", type=int, default=300, help="seconds a child may take")
    parser.add_argument("--sanitizer",
                        default=shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes, no sanitizer")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--child", nargs=3, metavar=("KERNEL", "INDEX", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, index, rank = args.child
        child(name, int(index), int(rank), args.tokens, args.experts, args.smoke)
        return
    if args.smoke:
        args.tokens, args.ranks, sanitizer = 40, [8], []
        os.environ["TRITON_INTERPRET"] = "1"  # the parent lists the configs the interpreter's children see
    else:
        if not Path(args.sanitizer).exists():
            sys.exit(f"compute-sanitizer not found at {args.sanitizer} (pass --sanitizer PATH)")
        sanitizer = [args.sanitizer, "--tool", "memcheck", "--print-limit", "3"]
    jobs = [(name, index, str(config), rank) for name in args.kernels
            for index, config in enumerate(autotuned(name).configs) for rank in args.ranks]
    with ThreadPoolExecutor(args.jobs) as pool:
        verdicts = list(pool.map(lambda job: run_child(job[0], job[1], job[3], args, sanitizer), jobs))
    title, column = ((f"T={args.tokens}, E={args.experts}, H=4096, I=11008, bf16", "memcheck") if not args.smoke
                     else ("smoke: Triton's interpreter on the CPU, no sanitizer", "run"))
    lines = [title, "", f"| kernel | config | r | {column} |", "|---|---|---|---|"]
    lines += [f"| {name} | {config} | {rank} | {v} |" for (name, _, config, rank), v in zip(jobs, verdicts)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if any(v.startswith("**") for v in verdicts):
        sys.exit(1)


if __name__ == "__main__":
    main()
