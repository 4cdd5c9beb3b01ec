"""MoE layer forward+backward: grouped experts vs the per-expert loop vs DeepSpeed-MoE vs a dense frozen
MLP, one process.

Stage-3 trainable set: frozen expert bases, trainable LoRA (gate, up, down-on-intermediate) and router,
x.requires_grad; loss = y.float().sum() + 0.01 * aux. Ratios: distinct experts ("mlp") against k x the
dense frozen MLP (the floor for k distinct experts per token), shared base against 1 x dense.
DeepSpeed-MoE (distinct experts only): ``deepspeed.moe.layer.MoE(ep_size=1, capacity_factor=1.5,
drop_tokens=False)`` over the same LoRA-integrated experts (its own expert loop and einsum dispatch),
in a one-process torch.distributed world. Every timing follows ``--settle`` seconds of the same step: an H200
training at full load runs at its power limit, where its clock follows the work of the last fraction of a second,
so an unsettled timing inherits the clock of whatever ran before it.

    python benchmarks/moe_layer.py --out moe_layer.md          # LLaMA-7B MLP shapes, bf16, CUDA
    python benchmarks/moe_layer.py --back-to-back --out FILE   # repetitions without a sync between them
    python benchmarks/moe_layer.py --profile mlp --tokens 8192 # host vs GPU time a step, and the kernel table
    ncu --profile-from-start off -k regex:_kernel python benchmarks/moe_layer.py --ncu-step shared --tokens 8192
        # Nsight Compute over one warmed-up layer step (the largest E and smallest r given, as --profile)
    python benchmarks/moe_layer.py --smoke                     # tiny CPU run of every path
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from report import device_name, emit_table
from Uni_MoE.model.moe import MoELayer

TOP_K = 2


@dataclass
class Shapes:
    hidden: int
    intermediate: int
    experts: tuple[int, ...]
    ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    dtype: torch.dtype


FULL = Shapes(4096, 11008, (4, 8), (8, 64), (8192, 32768), torch.bfloat16)
SMALL = Shapes(64, 128, (4,), (8,), (64,), torch.float32)


def time_ms(step: Callable[[], None], device: torch.device, warmup: int, reps: int,
            back_to_back: bool = False, settle_s: float = 0.0) -> tuple[float, float]:
    """Median ms of ``step`` (CUDA events on GPU) and the peak memory it allocates beyond what it found, GB.

    Each repetition starts on an idle GPU, so the host's launches before the first kernel count.
    With ``back_to_back`` the repetitions run without a synchronisation between them and the result is their
    mean, as layers run inside a model: the host enqueues one while the GPU still works on the one before.
    ``settle_s``: after the warm-up, keep running the step for this many seconds first. A GPU at its power
    limit sets its clock by the work of the last fraction of a second, so without settling a step is timed at
    the clock that the step before it left."""
    for _ in range(warmup):
        step()
    settle(step, device, settle_s)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if back_to_back:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / reps, (torch.cuda.max_memory_allocated() - base) / 2**30
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = float("nan")
    return statistics.median(times), peak


def settle(step: Callable[[], None], device: torch.device, seconds: float) -> None:
    """Keep running ``step`` (synchronised) for ``seconds`` on a GPU, so that a power-capped one reaches the clock
    of this step's own work; nothing on the CPU."""
    if device.type != "cuda" or seconds <= 0:
        return
    torch.cuda.synchronize()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()
        torch.cuda.synchronize()


def gpu_clock(device: torch.device) -> str:
    """The GPU's current SM clock and power draw ("1410 MHz 680 W") from nvidia-smi; "—" without one."""
    if device.type != "cuda" or shutil.which("nvidia-smi") is None:
        return "—"
    index = device.index if device.index is not None else torch.cuda.current_device()
    query = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=clocks.sm,power.draw",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True)
    fields = [f.strip() for f in query.stdout.strip().split(",")]
    if query.returncode != 0 or len(fields) != 2 or not all(f.replace(".", "").isdigit() for f in fields):
        return "—"
    return f"{fields[0]} MHz {float(fields[1]):.0f} W"


def dense_loss(x: torch.Tensor, shapes: Shapes) -> Callable[[], torch.Tensor]:
    """The forward of one frozen SwiGLU MLP, no LoRA, to the scalar whose backward gives x its gradient only."""
    h, i = shapes.hidden, shapes.intermediate
    w_gate, w_up = (torch.randn(i, h, device=x.device, dtype=x.dtype) * 0.02 for _ in range(2))
    w_down = torch.randn(h, i, device=x.device, dtype=x.dtype) * 0.02

    def forward() -> torch.Tensor:
        x.grad = None
        y = (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()
        return y.float().sum()

    return forward


def with_backward(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """A step: ``forward`` (to a scalar) and its backward."""
    def step() -> None:
        forward().backward()

    return step


def dense_step(x: torch.Tensor, shapes: Shapes) -> Callable[[], None]:
    """One frozen SwiGLU MLP, no LoRA, gradient to x only: forward and backward."""
    return with_backward(dense_loss(x, shapes))


def make_layer(shapes: Shapes, experts: int, rank: int, expert_type: str, device: torch.device) -> MoELayer:
    """A stage-3 layer: random frozen bases, random (non-zero) trainable LoRA, trainable router."""
    layer = MoELayer(shapes.hidden, shapes.intermediate, experts, TOP_K, expert_type=expert_type, lora_r=rank)
    layer.to(device=device, dtype=shapes.dtype)
    with torch.no_grad():
        layer.experts.reset_parameters()
        for name in ("gate", "up", "down"):
            getattr(layer.experts, f"{name}_lora_B").normal_(0.0, 0.02)
    for p in layer.experts.base_parameters():
        p.requires_grad_(False)
    return layer


def layer_loss(layer: MoELayer, x: torch.Tensor, implementation: str) -> Callable[[], torch.Tensor]:
    """The layer's forward, its gradients cleared first, to the scalar (output sum plus balance loss) of a step."""
    def forward() -> torch.Tensor:
        layer.implementation = implementation
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        return y.float().sum() + 0.01 * layer.aux_loss

    return forward


def layer_step(layer: MoELayer, x: torch.Tensor, implementation: str) -> Callable[[], None]:
    """One layer step: ``layer_loss`` and its backward."""
    return with_backward(layer_loss(layer, x, implementation))


def init_world(device: torch.device) -> bool:
    """A one-process torch.distributed world for DeepSpeed-MoE; False when DeepSpeed is not installed."""
    if importlib.util.find_spec("deepspeed") is None:
        return False
    from Uni_MoE.eval.distributed import free_port
    from Uni_MoE.model.moe.deepspeed_backend import init_deepspeed_comm

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    init_deepspeed_comm(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return True


def make_deepspeed_layer(layer: MoELayer) -> torch.nn.Module:
    """DeepSpeed-MoE with the original's arguments, its experts and router copied from ``layer``."""
    from deepspeed.moe.layer import MoE

    from Uni_MoE.model.moe.deepspeed_backend import LoRAExpert

    ex = layer.experts
    expert = LoRAExpert(ex.hidden_size, ex.intermediate_size, lora_r=ex.lora_r, lora_alpha=16)
    moe = MoE(ex.hidden_size, expert=expert, num_experts=ex.num_experts, ep_size=1, k=TOP_K, capacity_factor=1.5,
              eval_capacity_factor=1.5, min_capacity=4, drop_tokens=False, top2_2nd_expert_sampling=False)
    moe.to(device=layer.router.weight.device, dtype=layer.router.weight.dtype)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight)
        for e, local in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            for name, p in local.named_parameters():
                p.copy_(getattr(ex, name)[e : e + 1])
                p.requires_grad_("lora" in name)
    return moe


def deepspeed_step(moe: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        moe.zero_grad(set_to_none=True)
        y, aux, _ = moe(x)
        (y.float().sum() + 0.01 * aux).backward()

    return step


def relative_error(layer: MoELayer, x: torch.Tensor) -> float:
    """max over (y, dx) of ||ours - loop|| / ||loop|| on the same weights and routing."""
    results = []
    for implementation in ("reference", "grouped"):
        layer_step(layer, x, implementation)()
        layer.implementation = implementation
        with torch.no_grad():
            y = layer(x).float()
        results.append((y, x.grad.float().clone()))
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(results[1], results[0]))


def run(shapes: Shapes, device: torch.device, warmup: int, reps: int, with_deepspeed: bool,
        back_to_back: bool = False, settle_s: float = 0.0) -> list[dict]:
    """One row per (kind, E, r, T). The dense step is timed again right before each layer, so that a row's
    baseline ran in the same minute and, with ``settle_s``, at the steady clock of its own work."""
    rows = []
    for tokens in shapes.tokens:
        torch.manual_seed(0)
        x = torch.randn(tokens, shapes.hidden, device=device, dtype=shapes.dtype, requires_grad=True)
        dense = dense_step(x, shapes)
        for expert_type in ("mlp", "shared"):
            for experts in shapes.experts:
                for rank in shapes.ranks:
                    layer = make_layer(shapes, experts, rank, expert_type, device)
                    timing = dict(warmup=warmup, reps=reps, back_to_back=back_to_back, settle_s=settle_s)
                    naive_ms, naive_gb = time_ms(layer_step(layer, x, "reference"), device, **timing)
                    dense_ms, dense_gb = time_ms(dense, device, **timing)
                    dense_clock = gpu_clock(device)
                    ours_ms, ours_gb = time_ms(layer_step(layer, x, "grouped"), device, **timing)
                    ours_clock = gpu_clock(device)
                    ds_ms = ds_gb = float("nan")
                    if with_deepspeed and expert_type == "mlp":
                        moe = make_deepspeed_layer(layer)
                        ds_ms, ds_gb = time_ms(deepspeed_step(moe, x), device, **timing)
                        del moe
                    floor = dense_ms * (TOP_K if expert_type == "mlp" else 1)
                    rows.append(dict(
                        type=expert_type, E=experts, r=rank, T=tokens, dense=dense_ms, floor=floor,
                        naive=naive_ms, ours=ours_ms, ds=ds_ms, naive_gb=naive_gb, ours_gb=ours_gb, ds_gb=ds_gb,
                        dense_gb=dense_gb, err=relative_error(layer, x), clocks=f"{dense_clock} / {ours_clock}",
                    ))
                    print(format_row(rows[-1]), flush=True)
                    del layer
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


HEADER = (
    "| experts | E | r | T | dense ms | baseline ms | naive loop ms | DeepSpeed ms | ours ms | naive / base "
    "| DeepSpeed / base | ours / base | DeepSpeed / ours | peak GB dense / naive / DeepSpeed / ours "
    "| rel. err vs loop | SM clock, power after dense / ours |\n|" + "---|" * 16
)


def format_row(r: dict) -> str:
    base = "k×dense" if r["type"] == "mlp" else "1×dense"
    has_ds = r["ds"] == r["ds"]  # not NaN
    ds = f"{r['ds']:.2f}" if has_ds else "—"
    ds_base = f"{r['ds'] / r['floor']:.3f}" if has_ds else "—"
    ds_ours = f"**{r['ds'] / r['ours']:.2f}×**" if has_ds else "—"
    ds_gb = f"{r['ds_gb']:.2f}" if has_ds else "—"
    return (
        f"| {r['type']} ({base}) | {r['E']} | {r['r']} | {r['T']} | {r['dense']:.2f} | {r['floor']:.2f} "
        f"| {r['naive']:.2f} | {ds} | {r['ours']:.2f} | {r['naive'] / r['floor']:.3f} | {ds_base} "
        f"| **{r['ours'] / r['floor']:.3f}** | {ds_ours} "
        f"| {r['dense_gb']:.2f} / {r['naive_gb']:.2f} / {ds_gb} / {r['ours_gb']:.2f} | {r['err']:.1e} "
        f"| {r['clocks']} |"
    )


def report(rows: list[dict], shapes: Shapes, device: torch.device, reps: int, back_to_back: bool = False,
           settle_s: float = 0.0) -> str:
    name = device_name(device)
    lines = [
        "# MoE layer forward+backward",
        "",
        f"- device: {name}; torch {torch.__version__}; date {datetime.date.today().isoformat()}",
        f"- H={shapes.hidden}, I={shapes.intermediate}, SwiGLU, top-{TOP_K},"
        f" {str(shapes.dtype).removeprefix('torch.')};"
        f" router random (near-uniform); "
        + (f"mean of {reps} back-to-back repetitions" if back_to_back else f"median of {reps}, each from an idle GPU")
        + " after warm-up, CUDA events"
        + (f", each after {settle_s:g} s of the same step (the steady clock of its own work)" if settle_s else ""),
        "- trainable: LoRA A/B on gate, up, down (alpha 16) and router; bases frozen; x.requires_grad;"
        " loss = y.float().sum() + 0.01 aux",
        "- baseline: k × dense frozen MLP (no LoRA) for distinct experts, 1 × dense for the shared base, the"
        " dense step timed right before each row's layer; peak GB = max allocated beyond weights and inputs",
        "- DeepSpeed: deepspeed.moe.layer.MoE(ep_size=1, k=2, capacity_factor=1.5, drop_tokens=False,"
        " top2_2nd_expert_sampling=False) with the same LoRA experts (distinct experts only)",
        "",
        HEADER,
        *map(format_row, rows),
        "",
    ]
    return "\n".join(lines)


def host_and_wall_ms(step: Callable[[], None], device: torch.device, reps: int = 5) -> tuple[float, float]:
    """(host ms a step, wall ms a step) of ``reps`` steps queued back to back after a sync: the host's time is
    what it takes to enqueue a step; when it is the smaller, the GPU never waits for the host."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / reps * 1e3, (time.perf_counter() - t0) / reps * 1e3


def profiled(step: Callable[[], None], device: torch.device, reps: int = 3) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof


def step_summary(name: str, step: Callable[[], None], device: torch.device,
                 reps: int = 3) -> tuple[str, torch.profiler.profile]:
    """One line: host and wall ms a step (``host_and_wall_ms``), and the GPU kernels' summed time and count a
    step (on the CPU: none); and the profile it read them from."""
    host, wall = host_and_wall_ms(step, device)
    prof = profiled(step, device, reps)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3 / reps
    return (f"{name}: host {host:.2f} ms a step, back-to-back wall {wall:.2f} ms a step, GPU kernels "
            f"{busy:.2f} ms in {len(kernels) / reps:.0f} launches a step"), prof


def profile_step(shapes: Shapes, device: torch.device,
                 expert_type: str) -> tuple[torch.Tensor, str, Callable[[], None]]:
    """(input, name, fused forward+backward step) of a layer at the largest E and smallest r and T given."""
    torch.manual_seed(0)
    x = torch.randn(shapes.tokens[0], shapes.hidden, device=device, dtype=shapes.dtype, requires_grad=True)
    experts, rank = shapes.experts[-1], shapes.ranks[0]
    layer = make_layer(shapes, experts, rank, expert_type, device)
    return x, f"{expert_type} E={experts} r={rank} T={x.shape[0]}", layer_step(layer, x, "grouped")


def profile(shapes: Shapes, device: torch.device, expert_type: str) -> str:
    """Where a fused forward+backward step goes, at the largest E and smallest r and T: host against GPU time for
    the dense baseline and the layer, then the layer's kernel table."""
    x, name, step = profile_step(shapes, device, expert_type)
    dense_line, _ = step_summary(f"dense MLP T={x.shape[0]}", dense_step(x, shapes), device)
    line, prof = step_summary(name, step, device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return "\n".join([dense_line, line, "", prof.key_averages().table(sort_by=sort, row_limit=30)])


def ncu_step(shapes: Shapes, device: torch.device, expert_type: str) -> None:
    """One fused forward+backward step, after three that autotune and warm up, between cudaProfilerStart and
    cudaProfilerStop: under ``ncu --profile-from-start off`` only its kernels are measured."""
    _, name, step = profile_step(shapes, device, expert_type)
    for _ in range(3):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"one step in the CUDA profiler range: {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 2 repetitions")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts to run (default 8192 32768)")
    parser.add_argument("--profile", choices=["mlp", "shared"], help="print a kernel profile of one kind instead")
    parser.add_argument("--ncu-step", choices=["mlp", "shared"],
                        help="run one step of one kind in a CUDA profiler range instead (for ncu)")
    parser.add_argument("--experts", type=int, nargs="+", help="expert counts to run (default 4 8)")
    parser.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks to run (default 8 64)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed-MoE column")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to run each step before timing it, so a power-capped GPU settles at that "
                             "step's clock (CUDA only; 0: none)")
    parser.add_argument("--back-to-back", action="store_true",
                        help="time the repetitions in one stretch, without a sync between them (as in a model)")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.small, args.reps, args.warmup = "cpu", True, 2, 1
    device = torch.device(args.device)
    shapes = SMALL if args.small else FULL
    for field in ("tokens", "experts", "ranks"):
        if getattr(args, field):
            shapes = replace(shapes, **{field: tuple(getattr(args, field))})
    if args.profile:
        print(profile(shapes, device, args.profile))
        return
    if args.ncu_step:
        ncu_step(shapes, device, args.ncu_step)
        return
    rows = run(shapes, device, args.warmup, args.reps, not args.no_deepspeed and init_world(device),
               args.back_to_back, args.settle)
    emit_table(report(rows, shapes, device, args.reps, args.back_to_back, args.settle), args.out)


if __name__ == "__main__":
    main()
