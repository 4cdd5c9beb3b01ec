"""Time MoE layer steps of two or more code trees, alternating fresh processes on one GPU.

A kernel change has no module-level setting that one process could flip (``setting_ab.py``), so this compares whole
trees: each is a directory holding a ``Uni_MoE`` package, e.g. ``git archive REV Uni_MoE | tar -x -C DIR``. Per
round, each tree in turn runs ``moe_layer.py --back-to-back --no-deepspeed`` in a new process with the tree first on
``PYTHONPATH`` (whose ``Uni_MoE`` it imports is checked first and printed). The table gives, per layer and round, each
tree's step, its ratio to the dense baseline timed just before it, and the step relative to the first tree's in the
same round; alternating the order of the trees' runs across rounds keeps the GPU's warm-up from favouring one.

    python benchmarks/tree_ab.py --trees OLD NEW --tokens 8192 --experts 8 --ranks 64 --rounds 3 --out FILE
    python benchmarks/tree_ab.py --smoke --trees . .
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit_table  # noqa: E402

LAYER_SCRIPT = Path(__file__).resolve().parent / "moe_layer.py"


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a run of ``tree``: that tree first on PYTHONPATH."""
    rest = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), rest) if p)}


def imported_package(tree: Path) -> Path:
    """The ``Uni_MoE`` directory a process with ``tree_env(tree)`` imports; exits when it is not the tree's own (an
    installed copy, or none)."""
    result = subprocess.run([sys.executable, "-c", "import Uni_MoE; print(Uni_MoE.__file__)"], capture_output=True,
                            text=True, env=tree_env(tree), cwd=tempfile.gettempdir())  # as the script would
    if result.returncode != 0:
        raise SystemExit(f"--trees {tree}: no Uni_MoE can be imported with it first on PYTHONPATH")
    package = Path(result.stdout.strip()).resolve().parent
    if package != (tree / "Uni_MoE").resolve():
        raise SystemExit(f"--trees {tree}: a process with it first on PYTHONPATH imports {package} instead")
    return package


def layer_rows(table: str) -> dict[tuple[str, ...], tuple[float, float]]:
    """``moe_layer.py``'s table -> {(kind, E, r, T): (our step ms, its ratio to the baseline)}."""
    rows = {}
    for line in table.splitlines():
        if line.startswith(("| mlp", "| shared")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(cells[0].split()[0], *cells[1:4])] = (float(cells[8]), float(cells[11].strip("*")))
    return rows


def run_tree(tree: Path, layer_args: list[str], folder: Path) -> dict[tuple[str, ...], tuple[float, float]]:
    """One ``moe_layer.py`` process of ``tree``; its rows."""
    out = folder / "table.md"
    result = subprocess.run([sys.executable, str(LAYER_SCRIPT), *layer_args, "--out", str(out)], capture_output=True,
                            text=True, env=tree_env(tree))
    if result.returncode != 0:
        raise SystemExit(f"moe_layer.py with {tree} failed:\n{result.stderr[-3000:]}")
    return layer_rows(out.read_text(encoding="utf-8"))


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
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    if len(args.trees) < 2:
        raise SystemExit("--trees: give at least two")
    for tree in args.trees:
        imported_package(tree)
    layer_args = (["--smoke"] if args.smoke else
                  ["--back-to-back", "--no-deepspeed", "--reps", str(args.reps), "--settle", str(args.settle),
                   "--tokens", *map(str, args.tokens), "--experts", *map(str, args.experts),
                   "--ranks", *map(str, args.ranks)])
    names = [f"tree {i + 1}" for i in range(len(args.trees))]
    lines = ["# MoE layer steps of code trees, alternating processes", "",
             f"{datetime.date.today()}; `python benchmarks/tree_ab.py --trees ... {' '.join(layer_args)}`; "
             "each cell: our step ms, its ratio to the baseline (k × dense for distinct experts, 1 × dense for the "
             "shared base) timed just before it, and the step relative to tree 1's in the same round", "",
             *[f"- {name}: `{tree}` (its `Uni_MoE` imported)" for name, tree in zip(names, args.trees)], "",
             "| kind | E | r | T | round | " + " | ".join(names) + " |", "|---|---|---|---|---|" + "---|" * len(names)]
    results: dict[tuple[str, ...], list[list[tuple[float, float]]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            order = list(range(len(args.trees)))
            order = order if round_ % 2 == 0 else order[::-1]
            measured = {i: run_tree(args.trees[i], layer_args, Path(folder)) for i in order}
            for key in measured[0]:
                results.setdefault(key, []).append([measured[i][key] for i in range(len(args.trees))])
    for key, rounds in results.items():
        for round_, cells in enumerate(rounds, 1):
            first = cells[0][0]
            text = " | ".join(f"{ms:.2f} ms, {ratio:.3f}, {ms / first:.3f}" for ms, ratio in cells)
            lines.append(f"| {' | '.join(key)} | {round_} | {text} |")
    emit_table("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
