"""Compile the MoE expert kernels for SM90 without a GPU and report, per autotuning config, what limits them.

Each config of the six expert kernels (swiglu_lora_kernels.py, shared_kernels.py, rank_grad_kernels.py) that the
autotuner would try (its pruning applied) is compiled by Triton for sm_90a at LLaMA-7B width (I=11008), bf16 (or
``--dtype float32``), E experts and LoRA rank r, and its output read:

- registers a thread and spilled bytes (``ptxas -v``): above 128 registers a SM holds fewer than four programs
  of four warps, and fewer programs hide less memory latency;
- async copies: global tiles Triton prefetches a few loop steps ahead into shared memory (``cp.async``);
- 16-bit global loads: loads of single bf16 elements, which Triton cannot prefetch, so each loop step waits for
  them; a tile read along a runtime-strided axis compiles to these;
- 128-bit global loads: whole 16-byte vectors read directly;
- shared memory a program takes: above SHARED_LIMIT (227 KB, what one block may take on an H100/H200) the config
  cannot launch, and where no config of a kernel fits, the layer raises ``OutOfResources`` at that rank and dtype;
- tile loads waited on: global loads of 2-D tiles in a loop that are neither asynchronous copies nor read a step
  ahead by the kernel (their values carried to the next step), so each loop step waits for them. Triton's pipeliner
  prefetches only loads whose values reach a ``tl.dot``; a kernel whose loop holds no such product must read its
  tiles ahead itself (the shared backward kernel with stored slot rows took 27 % less time on an H200 once it did).

    python benchmarks/kernel_ptx.py --ranks 8 64 --out FILE   # needs Triton (no GPU)
    python benchmarks/kernel_ptx.py --ranks 128 256 --dtype float32
    python benchmarks/kernel_ptx.py --smoke                    # the first config of each kernel at r=8
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KERNELS = {  # name -> (module, attribute)
    "distinct forward": ("swiglu_lora_kernels", "_forward_kernel"),
    "distinct backward": ("swiglu_lora_kernels", "_backward_kernel"),
    "shared forward": ("shared_kernels", "_forward_kernel"),
    "shared backward": ("shared_kernels", "_backward_kernel"),
    "shared weight gradients": ("shared_kernels", "_weight_grads_kernel"),
    "rank gradients": ("rank_grad_kernels", "_rank_grad_kernel"),
}
POINTERS = {  # argument -> element type, where it is not bf16
    "zd_ptr": "fp32", "dzg_ptr": "fp32", "dzu_ptr": "fp32", "part_ptr": "fp32", "dz_ptr": "fp32", "gw_ptr": "fp32",
    "keep_ptr": "i8", "sched_ptr": "i32", "order_ptr": "i32", "perm_ptr": "i32", "offs_ptr": "i32",
    "counts_ptr": "i64", "row_ptr": "i64", "rows_ptr": "i64",
}
FLOATS = ("scale", "keep_scale")
N_COLS = 11008
SHARED_LIMIT = 232448  # bytes of shared memory one block may take on SM90
DTYPES = {"bfloat16": "bf16", "float32": "fp32"}
HEADER = ("| kernel | r | config | registers | spilled bytes | async copies | 16-bit global loads "
          "| 128-bit global loads | shared KB | tile loads waited on |\n|---|---|---|---|---|---|---|---|---|---|")


def constants(names: list[str], rank: int, experts: int, config_kwargs: dict, distinct: bool = False,
              dtype: str = "bfloat16") -> dict:
    """Values of a kernel's compile-time (``tl.constexpr``) arguments ``names`` at these shapes (LoRA on, no
    dropout, fused weight gradients or stored slot rows as the rank decides; the tile height of the rank and dtype
    for a ``distinct`` block's kernel). Other integers stay runtime arguments."""
    import torch

    from Uni_MoE.model.moe.shared_kernels import slot_rows_pay
    from Uni_MoE.model.moe.swiglu_lora_kernels import BLOCK_M, _block_r, _precision, block_m, fuses_weight_grads

    torch_dtype = getattr(torch, dtype)
    values = dict(n_cols=N_COLS, rank=rank, n_experts=experts, K=2, SPLIT=8, HAS_LORA=True, HAS_KEEP=False,
                  STORE_H=False, WGRAD=fuses_weight_grads(rank), NEED_W=True, SLOT_ROWS=slot_rows_pay(rank),
                  WIDE=False, TRANSPOSE=True, GATHER=False, PREC=_precision(torch_dtype), INTERPRET=False,
                  BLOCK_M=block_m(rank, torch_dtype) if distinct else BLOCK_M, BLOCK_R=_block_r(rank))
    values.update(config_kwargs)
    return {name: values[name] for name in names if name in values}


def pointer_types(kernel: object, dtype: str) -> dict[str, str]:
    """Triton's element type of each pointer argument: the block's dtype where POINTERS names none."""
    return {n: POINTERS.get(n, DTYPES[dtype]) for n in kernel.fn.arg_names if n.endswith("_ptr")}


def tried_configs(kernel: object, rank: int, experts: int, dtype: str) -> list:
    """The configs the autotuner would try at these shapes: its own pruning, given tensors of the arguments' types."""
    import torch

    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        return configs
    fn = kernel.fn
    torch_types = {"bf16": torch.bfloat16, "fp32": torch.float32, "i8": torch.int8, "i32": torch.int32,
                   "i64": torch.int64}
    named = {n: torch.empty(0, dtype=torch_types[t]) for n, t in pointer_types(kernel, dtype).items()}
    consts = constants([p.name for p in fn.params if p.is_constexpr], rank, experts, {},
                       fn.__module__.endswith("swiglu_lora_kernels"), dtype)
    return prune(configs, named, **consts)


def waited_tile_loads(ttgir: str) -> int:
    """2-D global loads inside the TTGIR's loops whose values the loop does not carry to its next step (a load read a
    step ahead shows up in its loop's ``scf.yield``); asynchronous copies are not ``tt.load``s."""
    start = ttgir.find("scf.for")
    if start < 0:
        return 0
    body = ttgir[start:]
    carried = " ".join(line for line in body.splitlines() if "scf.yield" in line)
    loads = re.findall(r"(%[\w.]+) = tt\.load [^\n]*: tensor<\d+x\d+x!tt\.ptr", body)
    return sum(1 for name in loads if not re.search(re.escape(name) + r"(?![\w.])", carried))


def compile_stats(kernel: object, config: object, rank: int, experts: int, dtype: str = "bfloat16") -> dict:
    """Compile one config of an autotuned kernel for sm_90a and count what its PTX and TTGIR hold."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = kernel.fn
    names = list(fn.arg_names)
    consts = constants([p.name for p in fn.params if p.is_constexpr], rank, experts, config.kwargs,
                       fn.__module__.endswith("swiglu_lora_kernels"), dtype)
    pointers = pointer_types(kernel, dtype)
    signature = {n: "constexpr" if n in consts else "fp32" if n in FLOATS
                 else f"*{pointers[n]}" if n in pointers else "i32" for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")}
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options=options)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    with tempfile.TemporaryDirectory() as folder:
        ptx_file = Path(folder) / "kernel.ptx"
        ptx_file.write_text(ptx)
        info = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx_file), "-o", "/dev/null"],
                              capture_output=True, text=True, check=True).stderr
    return dict(
        registers=int(re.search(r"Used (\d+) registers", info).group(1)),
        spilled=int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        async_copies=ttgir.count("async_copy_global_to_local"),
        b16_loads=len(re.findall(r"ld\.global\S*\.b16\b", ptx)),
        v4_loads=len(re.findall(r"ld\.global\S*\.v4\.", ptx)),
        shared=compiled.metadata.shared,
        waited=waited_tile_loads(ttgir),
    )


def describe(config: object) -> str:
    parts = [f"{k} {v}" for k, v in config.kwargs.items()] + [f"{config.num_warps} warps",
                                                              f"{config.num_stages} stages"]
    return ", ".join(parts + ([f"max {config.maxnreg} registers"] if config.maxnreg else []))


def row(name: str, rank: int, kernel: object, config: object, experts: int,
        dtype: str = "bfloat16") -> tuple[str, bool]:
    """One table row: the config's counts, or why it does not compile (ptxas's fatal line; the autotuner skips such a
    config on the GPU); and whether the config can launch (compiles, and its shared memory fits SHARED_LIMIT)."""
    from kernel_memcheck import telling_line
    from triton.runtime.errors import PTXASError

    try:
        s = compile_stats(kernel, config, rank, experts, dtype)
    except (PTXASError, subprocess.CalledProcessError) as error:
        reason = telling_line(str(error) + str(getattr(error, "stderr", "") or ""))
        return f"| {name} | {rank} | {describe(config)} | does not compile: {reason} | | | | | | |", False
    fits = s["shared"] <= SHARED_LIMIT
    shared = f"{s['shared'] / 1024:.0f}" + ("" if fits else " (over 227)")
    return (f"| {name} | {rank} | {describe(config)} | {s['registers']} | {s['spilled']} | {s['async_copies']} "
            f"| {s['b16_loads']} | {s['v4_loads']} | {shared} | {s['waited']} |"), fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=list(KERNELS))
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--smoke", action="store_true", help="the first config of each kernel at r=8")
    args = parser.parse_args()
    rows, stuck = [], []
    for rank in [8] if args.smoke else args.ranks:
        for name in args.kernels:
            module, attribute = KERNELS[name]
            kernel = getattr(importlib.import_module(f"Uni_MoE.model.moe.{module}"), attribute)
            configs = tried_configs(kernel, rank, args.experts, args.dtype)
            launchable = False
            for config in configs[:1] if args.smoke else configs:
                text, fits = row(name, rank, kernel, config, args.experts, args.dtype)
                rows.append(text)
                launchable |= fits
                print(text, flush=True)
            if not launchable:
                stuck.append(f"- {name}, r = {rank}: no config the autotuner tries can launch")
    text = "\n".join([f"SM90 compile, I={N_COLS}, E={args.experts}, {args.dtype}", "", HEADER, *rows, "", *stuck, ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if stuck:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
