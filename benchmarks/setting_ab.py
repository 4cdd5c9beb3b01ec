"""Time MoE layer steps with one module-level setting at each of several values, alternating in one process.

A setting such as ``Uni_MoE.model.moe.swiglu_lora_kernels.TARGET_PROGRAMS`` is read by the code at call time, so
one process can compare its values without a second tree: per layer (kind, E, r) and round, each value in turn is
set, the dense step timed and then the layer step, both after ``--settle`` seconds of themselves (the calls
``moe_layer.py --back-to-back`` makes). The table gives the ratio of each layer step to its baseline (k x dense
for distinct experts, 1 x dense for the shared base), round by round, and each value's step time relative to the
first value's in the same round.

    python benchmarks/setting_ab.py --set Uni_MoE.model.moe.swiglu_lora_kernels.TARGET_PROGRAMS=2048,1024,4096 \\
        --layers mlp:8:64 shared:8:64 mlp:4:8 shared:4:8 --out FILE
    python benchmarks/setting_ab.py --smoke --set Uni_MoE.model.moe.shared_kernels.SLOT_ROWS_MIN_RANK=64,8
"""

from __future__ import annotations

import ast
import datetime
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer as bench  # noqa: E402
from report import device_name, emit_table, timing_parser  # noqa: E402


def parse_setting(text: str) -> tuple[object, str, list[object]]:
    """"package.module.NAME=v1,v2" -> (module, NAME, [v1, v2]) with the values as Python literals."""
    target, _, values = text.partition("=")
    module_name, _, attr = target.rpartition(".")
    if not module_name or not values:
        raise SystemExit(f"--set {text!r}: expected module.NAME=value,value")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise SystemExit(f"--set {text!r}: {err}") from err
    if not hasattr(module, attr):
        raise SystemExit(f"--set {text!r}: {module_name} has no setting {attr}")
    try:
        return module, attr, [ast.literal_eval(v) for v in values.split(",")]
    except (ValueError, SyntaxError) as err:
        raise SystemExit(f"--set {text!r}: each value must be a Python literal ({err})") from err


def parse_layer(text: str) -> tuple[str, int, int]:
    """"mlp:8:64" -> ("mlp", 8, 64)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in ("mlp", "shared") or not all(p.isdigit() for p in parts[1:]):
        raise SystemExit(f"--layers {text!r}: expected kind:E:r with kind mlp or shared and E, r whole numbers")
    return parts[0], int(parts[1]), int(parts[2])


def timing_setup(args: object, smoke_reps: int) -> tuple[torch.device, bench.Shapes, int, float, torch.Tensor]:
    """(device, shapes, reps, settle, the input x [T, H]) of a layer timing script's ``timing_parser`` arguments and
    ``--tokens``: tiny shapes and ``smoke_reps`` steps on the CPU with ``--smoke``, else LLaMA-7B shapes on CUDA."""
    if args.smoke:
        device, shapes, tokens, reps, settle = torch.device("cpu"), bench.SMALL, 64, smoke_reps, 0.0
    else:
        device, shapes, tokens, reps, settle = torch.device("cuda"), bench.FULL, args.tokens, args.reps, args.settle
    torch.manual_seed(0)
    x = torch.randn(tokens, shapes.hidden, device=device, dtype=shapes.dtype, requires_grad=True)
    return device, shapes, reps, settle, x


def measure(module: object, attr: str, values: list[object], layer_spec: tuple[str, int, int], x: torch.Tensor,
            shapes: bench.Shapes, rounds: int, reps: int, settle: float) -> list[str]:
    """One table row per round: each value's ratio to the baseline and its step relative to the first value's."""
    kind, experts, rank = layer_spec
    layer = bench.make_layer(shapes, experts, rank, kind, x.device)
    dense, step = bench.dense_step(x, shapes), bench.layer_step(layer, x, "grouped")
    factor = bench.TOP_K if kind == "mlp" else 1
    rows = []
    for round_ in range(rounds):
        cells = []
        first_ms = None
        for value in values:
            setattr(module, attr, value)
            dense_ms = bench.time_ms(dense, x.device, 3, reps, True, settle)[0]
            ms = bench.time_ms(step, x.device, 3, reps, True, settle)[0]
            first_ms = first_ms or ms
            cells.append(f"{ms:.2f} ms, {ms / (factor * dense_ms):.3f}, {ms / first_ms:.3f}")
        rows.append(f"| {kind} | {experts} | {rank} | {x.shape[0]} | {round_ + 1} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = timing_parser(__doc__, reps=10, settle=1.0)
    parser.add_argument("--set", required=True, help="module.NAME=value,value,...: the first value is the reference")
    parser.add_argument("--layers", nargs="+", default=["mlp:8:64", "shared:8:64"],
                        help="kind:E:r, kind mlp or shared")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    module, attr, values = parse_setting(args.set)
    original = getattr(module, attr)
    layers = [parse_layer(text) for text in args.layers]
    device, shapes, reps, settle, x = timing_setup(args, smoke_reps=2)
    lines = [f"# {attr} = {', '.join(map(repr, values))} ({device_name(device)})", "",
             f"{datetime.date.today()}, H={shapes.hidden}, I={shapes.intermediate}, top-{bench.TOP_K}, "
             f"{str(shapes.dtype).split('.')[-1]}; each cell: the layer step (mean of {reps} back-to-back steps after "
             f"{settle} s), its ratio to k × dense (distinct) or 1 × dense (shared) timed just before it, and the step "
             f"relative to {values[0]!r}'s in the same round;\n`python benchmarks/setting_ab.py --set "
             f"{args.set}`", "",
             "| kind | E | r | T | round | " + " | ".join(f"{attr} = {v!r}" for v in values) + " |",
             "|---|---|---|---|---|" + "---|" * len(values)]
    try:
        for layer_spec in layers:
            lines += measure(module, attr, values, layer_spec, x, shapes, args.rounds, reps, settle)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        setattr(module, attr, original)
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
