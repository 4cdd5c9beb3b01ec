"""Time MoE layer steps of two or more code trees, alternating fresh processes on one GPU.

A kernel change has no module-level setting that one process could flip (``setting_ab.py``), so this compares whole
trees: each is a directory holding a ``Uni_MoE`` package, e.g. ``git archive REV Uni_MoE | tar -x -C DIR``. Per
round, each tree in turn runs ``moe_layer.py --back-to-back --no-deepspeed`` in a new process with the tree first on
``PYTHONPATH`` (a tree whose processes would import another ``Uni_MoE`` stops the run first). The table gives, per
layer and round, each tree's step, its ratio to the dense baseline timed just before it, and the step relative to the
first tree's in the same round; alternating the order of the trees' runs across rounds keeps the GPU's warm-up from
favouring one.
With ``--kernels`` each run is ``step_kernels.py`` instead (both kinds of layer at each E and r, one token count):
per layer, the step's kernel time by kind and each Triton kernel's, summed over the step, for each tree. A step's
time moves with the GPU's clock from one process to the next; a kernel's time is the firmer measure of a kernel
change.

    python benchmarks/tree_ab.py --trees OLD NEW --tokens 8192 --experts 8 --ranks 64 --rounds 3 --out FILE
    python benchmarks/tree_ab.py --kernels --trees OLD NEW --tokens 8192 --experts 8 --ranks 64 --out FILE
    python benchmarks/tree_ab.py --smoke --trees . .
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import emit_table  # noqa: E402


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a run of ``tree``: that tree first on PYTHONPATH."""
    rest = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), rest) if p)}


def check_package(tree: Path) -> None:
    """Exit unless a process with ``tree_env(tree)`` imports the tree's own ``Uni_MoE`` (not an installed copy)."""
    result = subprocess.run([sys.executable, "-c", "import Uni_MoE; print(Uni_MoE.__file__)"], capture_output=True,
                            text=True, env=tree_env(tree), cwd=tempfile.gettempdir())  # as the script would
    if result.returncode != 0:
        raise SystemExit(f"--trees {tree}: no Uni_MoE can be imported with it first on PYTHONPATH")
    package = Path(result.stdout.strip()).resolve().parent
    if package != (tree / "Uni_MoE").resolve():
        raise SystemExit(f"--trees {tree}: a process with it first on PYTHONPATH imports {package} instead")


def layer_rows(table: str) -> dict[tuple[str, ...], tuple[float, float]]:
    """``moe_layer.py``'s table -> {(kind, E, r, T): (our step ms, its ratio to the baseline)}."""
    rows = {}
    for line in table.splitlines():
        if line.startswith(("| mlp", "| shared")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(cells[0].split()[0], *cells[1:4])] = (float(cells[8]), float(cells[11].strip("*")))
    return rows


def kernel_rows(table: str) -> dict[tuple[str, ...], tuple[float, float]]:
    """``step_kernels.py --list``'s table -> {(layer, "every KIND kernel" or a Triton kernel's name): (us, 0)}: each
    kind's summed time and each Triton kernel's, summed over the step."""
    rows: dict[tuple[str, ...], tuple[float, float]] = {}
    layers, layer = [], None
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| kind |"):
            layers = cells[1:]
        elif line.startswith("| ") and layers and not layer and ", " in cells[-1]:
            label = "every kernel" if cells[0] == "all" else f"every {cells[0]} kernel"
            for name, value in zip(layers, cells[1:]):
                rows[(name, label)] = (float(value.split(", ")[1]) * 1e3, 0.0)
        elif match := re.match(r"#+ (.+): kernels of at least", line):
            layer = match.group(1)
        elif layer and len(cells) == 3 and cells[1] == "Triton":
            key = (layer, cells[2].strip("`"))
            rows[key] = (rows.get(key, (0.0, 0.0))[0] + float(cells[0]), 0.0)
    return rows


def run_tree(tree: Path, script: str, script_args: list[str],
             folder: Path) -> dict[tuple[str, ...], tuple[float, float]]:
    """One ``script`` process of ``tree``; its rows."""
    out = folder / "table.md"
    result = subprocess.run([sys.executable, str(HERE / script), *script_args, "--out", str(out)],
                            capture_output=True, text=True, env=tree_env(tree))
    if result.returncode != 0:
        raise SystemExit(f"{script} with {tree} failed:\n{result.stderr[-3000:]}")
    table = out.read_text(encoding="utf-8")
    return kernel_rows(table) if script == "step_kernels.py" else layer_rows(table)


def script_args(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The script each tree runs and its arguments."""
    if args.kernels:
        if len(args.tokens) != 1:
            raise SystemExit("--kernels: give one --tokens")
        layers = [f"{kind}:{e}:{r}" for e in args.experts for r in args.ranks for kind in ("mlp", "shared")]
        shapes = ["--smoke"] if args.smoke else ["--settle", str(args.settle), "--tokens", str(args.tokens[0])]
        return "step_kernels.py", [*shapes, "--list", "--min-us", "0", "--layers", *layers]
    if args.smoke:
        return "moe_layer.py", ["--smoke"]
    return "moe_layer.py", ["--back-to-back", "--no-deepspeed", "--reps", str(args.reps), "--settle", str(args.settle),
                            "--tokens", *map(str, args.tokens), "--experts", *map(str, args.experts),
                            "--ranks", *map(str, args.ranks)]


def cell(value: tuple[float, float] | None, first: tuple[float, float] | None, kernels: bool) -> str:
    """One tree's cell: its time (and ratio to the baseline for a step) and its time relative to tree 1's."""
    if value is None:
        return "—"
    relative = f"{value[0] / first[0]:.3f}" if first and first[0] else "—"
    return f"{value[0]:.1f} us, {relative}" if kernels else f"{value[0]:.2f} ms, {value[1]:.3f}, {relative}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, required=True, help="directories holding Uni_MoE; the first "
                        "is the reference")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192])
    parser.add_argument("--experts", type=int, nargs="+", default=[8])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds each step runs before it is timed")
    parser.add_argument("--kernels", action="store_true", help="kernel times from step_kernels.py instead of steps")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    args.trees = [tree.resolve() for tree in args.trees]  # the runs' processes start elsewhere
    if len(args.trees) < 2:
        raise SystemExit("--trees: give at least two")
    for tree in args.trees:
        check_package(tree)
    script, run_args = script_args(args)
    names = [f"tree {i + 1}" for i in range(len(args.trees))]
    what = ("each cell: the kernel time summed over one profiled step (a kind's, all its kernels'), and relative to "
            "tree 1's in the same round" if args.kernels else
            "each cell: our step ms, its ratio to the baseline (k × dense for distinct experts, 1 × dense for the "
            "shared base) timed just before it, and the step relative to tree 1's in the same round")
    key_names = "layer | kernel" if args.kernels else "kind | E | r | T"
    lines = ["# MoE layer steps of code trees, alternating processes", "",
             f"{datetime.date.today()}; each tree runs `python benchmarks/{script} {' '.join(run_args)}`; {what}", "",
             *[f"- {name}: `{tree}` (its `Uni_MoE` imported)" for name, tree in zip(names, args.trees)], "",
             f"| {key_names} | round | " + " | ".join(names) + " |",
             "|---" * (key_names.count("|") + 2) + "|" + "---|" * len(names)]
    results: dict[tuple[str, ...], list[list[tuple[float, float] | None]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            order = list(range(len(args.trees)))
            order = order if round_ % 2 == 0 else order[::-1]
            measured = {i: run_tree(args.trees[i], script, run_args, Path(folder)) for i in order}
            keys = list(dict.fromkeys(key for i in sorted(measured) for key in measured[i]))
            for key in keys:
                results.setdefault(key, []).append([measured[i].get(key) for i in range(len(args.trees))])
    layers = list(dict.fromkeys(key[0] for key in results))
    for key, rounds in sorted(results.items(), key=lambda item: layers.index(item[0][0])):  # stable: by layer
        for round_, values in enumerate(rounds, 1):
            text = " | ".join(cell(value, values[0], args.kernels) for value in values)
            lines.append(f"| {' | '.join(key)} | {round_} | {text} |")
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
