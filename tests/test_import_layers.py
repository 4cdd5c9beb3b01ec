"""The package imports only downward: each module imports its own subpackage or a lower layer, never a
higher or a sibling one, and no chain of imports comes back to where it started. Every import counts,
those inside functions too (a lazy import hides a dependency; it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("Uni_MoE", "Uni_MoE_v2")
# Lowest first. A module may import modules of its own unit and of units in lower layers; units that
# share a layer (eval and train) do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("Uni_MoE.modalities", "Uni_MoE.compat", "Uni_MoE.cli_args", "Uni_MoE.model_folder"),  # tables, shims, helpers
    ("Uni_MoE.config",),
    ("Uni_MoE.presets",),
    ("Uni_MoE.data",),  # schema, media, conversation, dataset, collate: never the model
    ("Uni_MoE.model",),  # never checkpoint, train, eval or serve
    ("Uni_MoE",),  # the package's public names (UniMoEConfig, UniMoEForCausalLM)
    ("Uni_MoE.checkpoint",),  # the loader and converters, over model and data
    ("Uni_MoE.serve",),  # the generation engine, CLI and demo
    ("Uni_MoE.eval", "Uni_MoE.train"),  # applications over the engine
    ("Uni_MoE_v2", "Uni_MoE.integrations"),  # the expert-parallel edition's scripts, the lmms-eval plug-in
]
# The processor sits beside the model file, as transformers places processing_*.py, but is the data
# pipeline's front: the dataset builds on it and it builds on the schema, template, collate and media.
SAME_UNIT = {"Uni_MoE.processing_uni_moe": "Uni_MoE.data"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Package modules that the file imports anywhere (``from a import b`` counts as a.b when b is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return {m for m in found if m.split(".")[0] in PACKAGES and m != name}


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest unit name that is the module or a package above it."""
    module = SAME_UNIT.get(module, module)
    best = max((u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")), key=len,
               default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS; add it where it belongs")
    return next(i for i, layer in enumerate(LAYERS) if best in layer), best


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    return {module_name(p): imports_of(p) for p in files}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        layer, unit = unit_of(module)
        for dep in sorted(deps):
            dep_layer, dep_unit = unit_of(dep)
            if dep_unit != unit and dep_layer >= layer:
                bad.append(f"{module} imports {dep} ({dep_unit} is not below {unit})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_goes_down_a_layer_or_stays_in_its_unit() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    """The two checks, on made-up graphs: model importing checkpoint, train importing eval, a 3-cycle."""
    graph = {"Uni_MoE.model.uni_moe": {"Uni_MoE.checkpoint.loader", "Uni_MoE.config"},
             "Uni_MoE.train.quick_eval": {"Uni_MoE.eval.tasks"},
             "Uni_MoE.eval.tasks": {"Uni_MoE.serve.generate"}}
    assert upward_imports(graph) == [
        "Uni_MoE.model.uni_moe imports Uni_MoE.checkpoint.loader (Uni_MoE.checkpoint is not below Uni_MoE.model)",
        "Uni_MoE.train.quick_eval imports Uni_MoE.eval.tasks (Uni_MoE.eval is not below Uni_MoE.train)",
    ]
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(ring) == [["a", "b", "c"]]


def test_relative_and_lazy_imports_are_resolved(tmp_path) -> None:
    """``from .. import presets`` names the presets module and an import inside a function counts."""
    graph = import_graph()
    assert "Uni_MoE.presets" in graph["Uni_MoE.checkpoint.original_config"]
    assert "Uni_MoE.model.uni_moe" in graph["Uni_MoE"]
    with pytest.raises(AssertionError, match="in no layer"):
        unit_of("elsewhere.module")
