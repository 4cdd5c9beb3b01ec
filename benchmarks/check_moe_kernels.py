"""Check the fused MoE expert kernels against the per-expert reference loop on the GPU.

For distinct and shared experts, E in {4, 8}, LoRA r in {0, 8, 64}, a skewed router (one expert empty,
one overloaded), float32 and bfloat16: outputs and the gradients of x, router and every LoRA factor of
the grouped path vs the loop. float32 must agree to ``--tol32`` (or, for a gradient that cancels, be as
close to a float64 loop as the float32 loop is, within ``--slack``); in bfloat16 both are compared with a
float64 loop on the same weights and the grouped path's error may be at most ``--slack`` x the loop's
own bf16 error (plus 1e-3). With LoRA dropout, the Triton path and the PyTorch path (UNI_MOE_TRITON=0)
must agree under the same seed (float32), for both kinds. ``--each-config`` runs the bfloat16 check once for
every autotuning config of every kernel (the autotuner may pick any of them on some GPU and shape; a config
that does not fit is skipped, as the autotuner skips it). Exit status 1 on any failure.

    UNI_MOE_AUTOTUNE=0 python benchmarks/check_moe_kernels.py       # CUDA, one kernel config: no tuning time
    python benchmarks/check_moe_kernels.py --expert-types shared --experts 8 --ranks 8 64
    python benchmarks/check_moe_kernels.py --each-config --expert-types mlp --experts 8 --ranks 8 64
    TRITON_INTERPRET=1 python benchmarks/check_moe_kernels.py --small --device cpu
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from Uni_MoE.model.moe import MoELayer

TOP_K = 2


def make_layer(hidden: int, inter: int, experts: int, rank: int, expert_type: str, dropout: float) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(hidden, inter, experts, TOP_K, expert_type=expert_type, lora_r=rank, lora_alpha=16,
                     lora_dropout=dropout)
    with torch.no_grad():
        layer.experts.reset_parameters(std=0.02)
        for p in layer.experts.lora_parameters():
            p.normal_(0.0, 0.02)
        layer.router.weight.normal_(0.0, 0.02)
        layer.router.weight[0] = -1.0  # inputs are positive: expert 0 gets no token
        layer.router.weight[1] += 0.01  # expert 1 takes most first choices
    for p in layer.experts.base_parameters():
        p.requires_grad_(False)
    return layer


def run(layer: MoELayer, x: torch.Tensor, implementation: str, seed: int = 0) -> dict[str, torch.Tensor]:
    layer.implementation = implementation
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    probe = torch.linspace(-1.0, 1.0, y.shape[-1], device=y.device, dtype=torch.float32)
    ((y.float() * probe).sum() + 0.01 * layer.aux_loss).backward()
    out = {"y": y.detach(), "dx": x.grad}
    out.update({n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
    return {k: v.double() for k, v in out.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_layer(args: argparse.Namespace, expert_type: str, experts: int, rank: int, fp32: bool = True) -> bool:
    """One layer's check (float32 against the loop unless ``fp32`` is False, bfloat16 against float64); prints
    its line."""
    device = torch.device(args.device)
    layer = make_layer(args.hidden, args.inter, experts, rank, expert_type, 0.0).to(device)
    x = torch.rand(args.tokens, args.hidden, device=device)
    ref64 = run(layer.double(), x.double(), "reference")
    ok32, text32 = True, ""
    if fp32:
        layer.float()
        ours32, loop32 = run(layer, x, "grouped"), run(layer, x, "reference")
        # a gradient that cancels (the router's, when every expert computes the same function) may differ from
        # the loop's by more than tol32; it must then be as close to float64 as the loop
        ok32 = all(rel(ours32[k], loop32[k]) < args.tol32
                   or rel(ours32[k], ref64[k]) < args.slack * rel(loop32[k], ref64[k]) + args.tol32 for k in loop32)
        text32 = f"fp32 rel err vs loop {max(rel(ours32[k], loop32[k]) for k in loop32):.1e}; "
    layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    ours16, loop16 = run(layer, xb, "grouped"), run(layer, xb, "reference")
    worst = max(rel(ours16[k], ref64[k]) - args.slack * rel(loop16[k], ref64[k]) for k in ref64)
    ok = ok32 and worst < 1e-3 and set(ours16) == set(ref64)
    print(f"{expert_type:6} E={experts} r={rank:2}: {text32}bf16 rel err vs fp64 "
          f"ours {max(rel(ours16[k], ref64[k]) for k in ref64):.1e} / loop "
          f"{max(rel(loop16[k], ref64[k]) for k in ref64):.1e}  {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def check_each_config(args: argparse.Namespace) -> list[str]:
    """The bfloat16 check with each autotuning config of each kernel of the kinds in turn (the other kernels at
    their first config), pinned as ``kernel_memcheck.py`` pins them."""
    from kernel_memcheck import KERNELS, SKIPPED, autotuned, autotuner_skips, pin_configs, skip_reason

    failures = []
    for name, (*_, kind) in KERNELS.items():
        if kind not in args.expert_types:
            continue
        for index, config in enumerate(list(autotuned(name).configs)):
            pin_configs(name, index)
            print(f"{name}, config {index}: {config}", flush=True)
            for experts in args.experts:
                for rank in args.ranks:
                    try:
                        ok = check_layer(args, kind, experts, rank, fp32=False)
                    except autotuner_skips() as err:
                        print(f"  {SKIPPED} ({skip_reason(err)})", flush=True)
                        continue
                    if not ok:
                        failures.append(f"{name} config {index}: {kind} E={experts} r={rank}")
            pin_configs(None)
    return failures


def check(args: argparse.Namespace) -> list[str]:
    device = torch.device(args.device)
    failures = [f"{expert_type} E={experts} r={rank}" for expert_type in args.expert_types
                for experts in args.experts for rank in args.ranks
                if not check_layer(args, expert_type, experts, rank)]
    for expert_type in args.expert_types if args.dropout else ():
        layer = make_layer(args.hidden, args.inter, 8, 8, expert_type, 0.1).to(device).train()
        x = torch.rand(args.tokens, args.hidden, device=device)
        fused = run(layer, x, "grouped", seed=1)
        os.environ["UNI_MOE_TRITON"] = "0"
        plain = run(layer, x, "grouped", seed=1)
        del os.environ["UNI_MOE_TRITON"]
        err = max(rel(fused[k], plain[k]) for k in plain)
        ok = err < args.tol32
        print(f"dropout 0.1, {expert_type} E=8 r=8: Triton vs PyTorch path rel err {err:.1e}  {'ok' if ok else 'FAIL'}",
              flush=True)
        if not ok:
            failures.append(f"{expert_type} dropout")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (H=32, I=200, 40 tokens)")
    parser.add_argument("--tol32", type=float, default=1e-4)
    parser.add_argument("--slack", type=float, default=1.5)
    parser.add_argument("--expert-types", nargs="+", default=["mlp", "shared"], choices=["mlp", "shared"])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 8, 64])
    parser.add_argument("--no-dropout", dest="dropout", action="store_false", help="skip the dropout check")
    parser.add_argument("--each-config", action="store_true",
                        help="instead: the bfloat16 check with every autotuning config of every kernel in turn")
    args = parser.parse_args()
    args.hidden, args.inter, args.tokens = (32, 200, 40) if args.small else (1024, 2816, 2048)
    failures = check_each_config(args) if args.each_config else check(args)
    print("all checks passed" if not failures else f"FAILED: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
