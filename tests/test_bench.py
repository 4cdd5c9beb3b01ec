"""The benchmark scripts' CPU smoke modes run every path and print their markdown tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(script: str, tmp_path: Path) -> tuple[str, str]:
    out = tmp_path / "table.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, out.read_text()


@pytest.mark.slow
def test_moe_layer_smoke(tmp_path: Path) -> None:
    stdout, table = run_smoke("moe_layer.py", tmp_path)
    for row in ("| mlp (k×dense) | 4 | 8 | 64 |", "| shared (1×dense) | 4 | 8 | 64 |"):
        assert row in table and row in stdout
    rows = [line for line in table.splitlines() if line.startswith(("| mlp", "| shared"))]
    errors = [float(line.rsplit("|", 2)[1]) for line in rows]
    assert errors and max(errors) < 1e-5  # fused and loop agree in float32


@pytest.mark.slow
def test_train_step_smoke(tmp_path: Path) -> None:
    _, table = run_smoke("train_step.py", tmp_path)
    rows = [line for line in table.splitlines() if line.startswith(("| mlp", "| shared"))]
    assert [r.split("|")[2].strip() for r in rows] == ["per-expert loop", "fused grouped"] * 2
    assert "tokens/s" in table and "device: cpu" in table


@pytest.mark.slow
def test_moe_decode_smoke(tmp_path: Path) -> None:
    _, table = run_smoke("moe_decode.py", tmp_path)
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith(("| mlp", "| shared"))]
    assert [(k.strip(), t.strip()) for k, t in rows] == [("mlp", "1"), ("mlp", "4"), ("shared", "1"), ("shared", "4")]


def test_lm_loss_smoke(tmp_path: Path) -> None:
    _, table = run_smoke("lm_loss.py", tmp_path)
    assert "| chunked (ours) |" in table and "| transformers, full logits |" in table
    error = float(table.rsplit("relative error ", 1)[1].split()[0])
    assert error < 1e-5  # float32 on the CPU: the same loss gradient


def test_check_attention_smoke() -> None:
    """The GPU check of the fused attention and LoRA runs on the CPU too, and passes both dtypes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_attention.py"), "--smoke"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["float32", "bfloat16"]
    assert all(line.endswith("-> pass") for line in lines)
