"""benchmarks/generation.py runs on the CPU in smoke mode and its batched rows match the one-by-one loop."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"


def _load():
    spec = importlib.util.spec_from_file_location("generation_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_the_table(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "generation.md"
    bench.main(["--smoke", "--out", str(out)])
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    paths = [r[0].strip() for r in rows]
    assert paths[0] == "one-by-one loop, KV cache (baseline)" and "no cache" in paths[1]
    assert [r[1].strip() for r in rows[2:]] == ["1", "4"]  # our path at batch 1 and 4
    for r in rows[1:]:  # float32: every path gives the baseline's greedy tokens
        samples = r[2].strip()
        assert r[-1].strip() == f"{samples}/{samples}"
        assert float(r[5]) > 0
